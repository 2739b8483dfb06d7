"""Run logging: TensorBoard scalars/hparams under the run directory, console lines on rank 0 only, and a
progress bar only when stderr is a terminal (a SLURM log, a pipe or a file reads as a log: one line per event, no
redraws). Report text is never logged (reports are patient data)."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any, Optional

from tqdm import tqdm

from vkd_dist.run_dir import RunDir

if TYPE_CHECKING:
    from vkd_dist.config import Config


class RunLogger:
    def __init__(self, cfg: Config, is_main: bool, total_steps: int, initial_step: int = 0):
        self.is_main = is_main
        self.cfg = cfg
        self.writer = None
        self.bar: Optional[tqdm] = None
        if not is_main:
            return
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(RunDir(cfg.run_dir).tensorboard_dir))
        if cfg.logging.progress and sys.stderr.isatty():
            self.bar = tqdm(total=total_steps, initial=initial_step, desc="train", unit="step",
                            dynamic_ncols=True, file=sys.stderr)

    def scalars(self, step: int, values: dict[str, float], prefix: str = "") -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            if v is not None:
                self.writer.add_scalar(f"{prefix}{k}", float(v), step)

    def evaluation(self, step: int, report: dict, pred, prefix: str = "val") -> None:
        """Every summary figure of an evaluation report, per-label AUROCs, and each label's PR curve and one
        ROC figure."""
        if self.writer is None:
            return
        summary = {k: v for k, v in report.items() if isinstance(v, float)}
        self.scalars(step, summary, f"{prefix}/")
        self.scalars(step, report["auroc"], f"{prefix}_auroc/")
        for i, name in enumerate(report["labels"]):
            m = pred.mask[:, i].astype(bool)
            if m.any():
                self.writer.add_pr_curve(f"{prefix}_pr/{name}", pred.targets[m, i], pred.probs[m, i], step)
        from vkd_dist.plots import roc_figure

        title = f"{self.cfg.run_dir}: {report.get('checkpoint', '')} (step {step}), split {report.get('split', '')}"
        self.writer.add_figure(f"{prefix}/roc", roc_figure(pred, report["labels"], title=title), step)

    def hparams(self, hparams: dict, metrics: dict) -> None:
        if self.writer is not None:
            clean = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()}
            self.writer.add_hparams(clean, {k: v for k, v in metrics.items() if v is not None},
                                    run_name="hparams")

    def info(self, message: str) -> None:
        if self.is_main:
            if self.bar is not None:
                self.bar.write(message)
            else:  # flushed: SLURM and nohup logs are files, where print would sit in a buffer
                print(message, flush=True)

    def advance(self, n: int = 1, **postfix) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


class LossWindow:
    """Each loss term's (and the gradient norm's) mean over the steps since the last train line: what the console
    and TensorBoard show, so a line is not one batch's noise. Summed on the device: no host wait per step."""

    def __init__(self) -> None:
        self.sums: dict[str, Any] = {}
        self.steps = 0

    def add(self, terms: dict[str, Any], grad_norm: Optional[Any] = None) -> None:
        extra = {"grad_norm": grad_norm} if grad_norm is not None else {}
        for key, value in {**terms, **extra}.items():
            self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.steps += 1

    def means(self) -> dict[str, float]:
        """The means since the last call (empty when no step was added); starts the next window."""
        out = {key: float(value) / self.steps for key, value in self.sums.items()}
        self.sums, self.steps = {}, 0
        return out


class Throughput:
    """Samples/s and the fraction of wall time spent waiting for data, over a logging window."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.wait = 0.0
        self.samples = 0

    def summary(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        out = {"samples_per_s": self.samples / elapsed, "data_wait_frac": self.wait / elapsed}
        self.reset()
        return out
