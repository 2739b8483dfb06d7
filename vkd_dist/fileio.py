"""Writing files so that a reader (another rank, a resumed run, a crash) never sees half of one: write a
temporary sibling, then rename it over the target. A rename within one directory is atomic on POSIX."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # per process: two ranks never share one
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def replace_dir(tmp: str | Path, final: str | Path) -> Path:
    """Move the finished directory `tmp` to `final`, replacing what was there (directories cannot be renamed
    over a non-empty one, so the old one is moved aside first and removed after)."""
    tmp, final = Path(tmp), Path(final)
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def free_port() -> int:
    """A TCP port on the loopback that was free a moment ago (for rendezvous in launchers and tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
