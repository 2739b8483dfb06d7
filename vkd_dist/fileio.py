"""Writing files so that a reader (another rank, a resumed run, a crash) never sees half of one: write a
temporary sibling, fsync it, then rename it over the target and fsync the directory. A rename within one
directory is atomic on POSIX; the fsyncs make it crash-consistent too (after a power loss or a node crash on
NFS/Lustre, the name never points at data that did not reach the disk). Directories that readers open by a fixed
name (`best/`, `final/`) are published with `publish_dir`. And who may read what a process writes
(`restrict_access`)."""

from __future__ import annotations

import grp
import os
import shutil
import socket
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from vkd_dist.config import ConfigError

if TYPE_CHECKING:
    from vkd_dist.config import Config


def fsync_path(path: str | Path) -> None:
    """Flush a file's data, or a directory's entries, to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file under `root`, then every directory bottom-up, `root` last. Any process on the machine
    that wrote the files may call it: fsync flushes the file's dirty pages whoever wrote them."""
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            fsync_path(os.path.join(dirpath, name))
        fsync_path(dirpath)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # per process: two ranks never share one
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())  # before the rename: the new name must never point at unwritten data
    os.replace(tmp, path)
    fsync_path(path.parent)  # the rename itself
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


def stage_version(link: str | Path) -> Path:
    """A new empty sibling directory `.NAME.vN` (N one more than any there) to write the next version of the
    directory `link` into; `publish_dir` then makes `link` point at it."""
    link = Path(link)
    link.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{link.name}.v"
    numbers = [int(p.name[len(prefix):]) for p in link.parent.glob(f"{prefix}*") if p.name[len(prefix):].isdigit()]
    path = link.with_name(f"{prefix}{max(numbers, default=0) + 1}")
    path.mkdir()
    return path


def publish_dir(staged: str | Path, link: str | Path) -> Path:
    """Make `link` a symlink to the finished directory `staged` (from `stage_version`), replacing the version it
    pointed at with no moment in which `link` is missing: a new symlink is renamed over the old one. (Linux's
    renameat2(RENAME_EXCHANGE) could swap two directories as atomically, but NFS and Lustre do not support it,
    and they are where runs live.) The version `link` pointed at until now is kept, so a reader that resolved it
    a moment ago still finds its files; older versions are removed. A plain directory at `link` (written before
    exports were versioned) is moved aside once: the only moment `link` is missing."""
    staged, link = Path(staged), Path(link)
    fsync_tree(staged)
    keep = {staged.name}
    if link.is_symlink():
        keep.add(Path(os.readlink(link)).name)
    elif link.exists():
        legacy = link.with_name(f".{link.name}.v0")
        shutil.rmtree(legacy, ignore_errors=True)
        os.replace(link, legacy)
        keep.add(legacy.name)
    tmp = link.with_name(f".{link.name}.link-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.symlink(staged.name, tmp)  # relative: the run directory may be moved or copied
    os.replace(tmp, link)
    fsync_path(link.parent)
    for old in link.parent.glob(f".{link.name}.v*"):
        if old.name not in keep:
            shutil.rmtree(old, ignore_errors=True)
    return link


def group_id(name: str, key: str) -> int:
    """The id of group `name`; a ValueError naming the setting `key` when this machine has no such group."""
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ValueError(f"{key}={name!r}: no such group on {socket.gethostname()} (see getent group)") from None


def check_config(cfg: Config) -> None:
    """data.shared_group names a group of this machine: an unknown one fails here, before any work."""
    if cfg.data.shared_group is not None:
        try:
            group_id(cfg.data.shared_group, "data.shared_group")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


def restrict_access(root: str | Path | None, group: str | None = None, key: str = "data.shared_group") -> None:
    """From now on everything this process creates, itself or through any library (checkpoints, TensorBoard
    events, token tables, shards), is owner-only: umask 077, so 0700 directories and 0600 files. With a `group`,
    umask 027 (0750 / 0640) and `root` is given to that group with the setgid bit, so that what is created under
    it belongs to the group too. `root` is created if missing and its own mode set when this user owns it; files
    and directories made before keep theirs. The umask is the whole process's: call this first."""
    gid = group_id(group, key) if group else None
    os.umask(0o077 if gid is None else 0o027)
    if root is None:
        return
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if root.stat().st_uid != os.getuid():  # a directory someone else made: theirs to set
        return
    if gid is not None:
        os.chown(root, -1, gid)
    os.chmod(root, 0o700 if gid is None else 0o2750)  # 2: setgid, new entries take the directory's group


def share_like_parent(root: str | Path) -> None:
    """Give the files under `root` the group read bit when `root` sits in a group-shared (setgid) directory: the
    umask cannot reach a file a library writes with its own mode (safetensors renames a 0600 temporary file
    into place). Nothing changes in an owner-only run directory."""
    root = Path(root)
    if not root.parent.stat().st_mode & stat.S_ISGID:
        return
    for path in [root, *root.rglob("*")] if root.is_dir() else [root]:
        if path.is_file() and not path.is_symlink():
            path.chmod(stat.S_IMODE(path.stat().st_mode) | stat.S_IRGRP)


def free_port() -> int:
    """A TCP port on the loopback that was free a moment ago (for rendezvous in launchers and tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
