"""Preemption: SIGTERM/SIGUSR1/SIGUSR2 set a flag that all ranks agree on at a step boundary."""

from __future__ import annotations

import signal
from typing import Any


class StopRequest:
    """Set by SIGTERM/SIGUSR1/SIGUSR2 (SLURM's preemption and time-limit signals); agreed on by all ranks at
    a step boundary so that they checkpoint together."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self, install: bool = True):
        self.requested = False
        self._group: Any = None  # the CPU process group the ranks agree over (multi-process only)
        self.signals: list[int] = []  # which signals arrived: a launcher tells a cancel from a preemption notice
        self._previous = {}
        if install:
            for sig in self.SIGNALS:
                try:
                    self._previous[sig] = signal.signal(sig, self._handle)
                except ValueError:  # not the main thread
                    break

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self.signals.append(signum)

    def agreed(self, accelerator) -> bool:
        """Whether any rank was asked to stop. Asked every step, so it is settled on the CPU (gloo): a device
        tensor read back every step would make the host wait for the device each step."""
        if accelerator.num_processes == 1:
            return self.requested
        import torch.distributed as dist

        # The default group is not held here: a process that still references it at exit, after it was
        # destroyed, aborts in gloo's destructor ("terminate called without an active exception").
        if self._group is None and dist.get_backend() != "gloo":
            self._group = dist.new_group(backend="gloo")
        import torch

        flag = torch.tensor([1.0 if self.requested else 0.0])
        dist.all_reduce(flag, group=self._group)
        return bool(flag.item() > 0)

    def restore(self) -> None:
        """Reinstall the handlers that were in place when this object was created; let go of the CPU group."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._group = None
