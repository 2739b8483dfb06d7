"""What a run and a conversion leave on disk: owner-only files, or group-readable ones with a shared group
(vkd_dist/fileio.py restrict_access), and no token table when data.keep_token_table=false."""

import grp
import os
import stat
from pathlib import Path

import pytest

from conftest import tiny_overrides
from vkd_dist.configure import load_config
from vkd_dist.data_cli import main as data_main
from vkd_dist.train import train

PRIMARY_GROUP = grp.getgrgid(os.getgid()).gr_name


@pytest.fixture(autouse=True)
def permissive_umask():
    """Start from umask 0 (anyone may read what is created) so that the restriction is the code's; give the rest
    of the session its umask back (restrict_access sets the process's)."""
    old = os.umask(0)
    yield
    os.umask(old)


def _check_tree(root: Path, group: str | None) -> int:
    """No permission for others anywhere under `root`; for the group none, or read (and enter) with it owning
    everything. Returns the number of entries checked."""
    entries = [root, *root.rglob("*")]
    gid = grp.getgrnam(group).gr_gid if group else None
    for path in entries:
        if path.is_symlink():  # best/, final/ point at versioned directories, checked themselves; a link has no mode
            continue
        st = path.lstat()
        mode = stat.S_IMODE(st.st_mode)
        assert mode & 0o007 == 0, f"{path}: {oct(mode)} lets others in"
        if gid is None:
            assert mode & 0o070 == 0, f"{path}: {oct(mode)} lets the group in"
        else:
            assert st.st_gid == gid, f"{path}: group {st.st_gid}, expected {gid}"
            assert mode & 0o020 == 0, f"{path}: {oct(mode)} lets the group write"
            want = 0o2050 if path.is_dir() else 0o040  # directories: read, enter, and setgid to pass the group on
            assert mode & want == want, f"{path}: {oct(mode)}, expected the bits {oct(want)}"
    return len(entries)


@pytest.mark.parametrize("group", [None, PRIMARY_GROUP])
def test_a_run_directory_is_private_or_the_groups(tiny_data, tmp_path, group):
    run = tmp_path / "runs" / "r"
    extra = {"train.max_steps": 2, "train.eval_every": 2, "data.keep_token_table": group is not None}
    if group:
        extra["data.shared_group"] = group
    train(load_config(overrides=tiny_overrides(tiny_data, run, **extra)))
    assert (run / "final" / "model.safetensors").is_file() and (run / "tokenizer" / "tokenizer.json").is_file()
    assert (run / "tokens").is_dir() == (group is not None)  # data.keep_token_table=false: gone at the end
    assert _check_tree(run, group) > 20  # checkpoints, tensorboard, exports, tokenizer, config, metrics


@pytest.mark.parametrize("group", [None, PRIMARY_GROUP])
def test_converted_shards_are_private_or_the_groups(tmp_path, group):
    out = tmp_path / "data"
    args = ["--shared-group", group] if group else []
    assert data_main([*args, "synthetic", "--out", str(out), "--num-train", "6", "--num-val", "3", "--num-test", "3",
                      "--image-size", "32", "--samples-per-shard", "3", "--workers", "1"]) == 0
    assert len(list((out / "train").glob("shard-*.tar"))) == 2 and (out / "dataset.json").is_file()
    _check_tree(out, group)
