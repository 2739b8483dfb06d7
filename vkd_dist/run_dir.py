"""A run directory, as one object: the one place that knows where a run keeps what. Everything that reads or
writes a run (training, checkpoints, evaluation, export, comparison, the SLURM launcher, the study) asks a
`RunDir` instead of joining paths by hand.

    RUN/config.yaml            the configuration the run was (last) started with
    RUN/labels.json            the label names and evaluation policy it was trained on
    RUN/tokenizer/             the tokenizer built from its training reports (when it built its own)
    RUN/tokens/                the training split's token table (removed at the end unless data.keep_token_table)
    RUN/checkpoints/step-N/    resumable checkpoints (vkd_dist/checkpoint.py); abandoned-*/ hold a rollback's
                               newer line
    RUN/best/, RUN/final/      image-only exports: model.safetensors + meta.json (symlinks to versioned directories)
    RUN/test_metrics.json      the test table of final/
    RUN/tensorboard/           TensorBoard event files
    RUN/ledger/rank-R.csv      the sample ledger (logging.sample_ledger)
    RUN/slurm_job.json         the SLURM launcher's record of the job; RUN/submitit/ is submitit's folder
    RUN/train.log              the console output, where a launcher keeps it (the study does)
    RUN/resumed.json           the last explicit resume=PATH: the checkpoint it loaded, the SLURM job that asked
    RUN.previous-<UTC time>/   a run that `overwrite=true` moved aside whole (beside RUN, itself a run directory)

Reports are never written here in clear text; RUN/tokens/ holds their token ids (see docs/data.md).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from vkd_dist.labels import LABELS

if TYPE_CHECKING:
    from vkd_dist.config import Config

EXPORTS = ("best", "final")
EXPORT_FILE = "model.safetensors"


class RunDir:
    CONFIG = "config.yaml"
    LABELS = "labels.json"
    TOKENIZER = "tokenizer"
    TOKENS = "tokens"
    CHECKPOINTS = "checkpoints"
    TEST_METRICS = "test_metrics.json"
    TENSORBOARD = "tensorboard"
    LEDGER = "ledger"
    SLURM_JOB = "slurm_job.json"
    SUBMITIT = "submitit"
    TRAIN_LOG = "train.log"
    RESUMED = "resumed.json"

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __str__(self) -> str:
        return str(self.path)

    @classmethod
    def containing(cls, path: str | Path, levels: int = 2) -> Optional[RunDir]:
        """The run directory `path` is, or is inside (an export or a checkpoint: up to `levels` folders up)."""
        path = Path(path)
        for candidate in [path, *list(path.parents)[:levels]]:
            if (candidate / cls.CONFIG).is_file():
                return cls(candidate)
        return None

    # --------------------------------------------------------------------------- what it holds, by name
    @property
    def config_file(self) -> Path:
        return self.path / self.CONFIG

    @property
    def labels_file(self) -> Path:
        return self.path / self.LABELS

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / self.TOKENIZER

    @property
    def tokens_dir(self) -> Path:
        return self.path / self.TOKENS

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / self.CHECKPOINTS

    def step_dir(self, step: int) -> Path:
        return self.checkpoints_dir / f"step-{step:08d}"

    def export_dir(self, which: str) -> Path:
        if which not in EXPORTS:
            raise ValueError(f"{which!r} is not an export of a run (allowed: {', '.join(EXPORTS)})")
        return self.path / which

    def export_weights(self, which: str) -> Path:
        return self.export_dir(which) / EXPORT_FILE

    def export_meta(self, which: str) -> Path:
        return self.export_dir(which) / "meta.json"

    @property
    def train_log(self) -> Path:
        return self.path / self.TRAIN_LOG

    @property
    def test_metrics_file(self) -> Path:
        return self.path / self.TEST_METRICS

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / self.TENSORBOARD

    @property
    def ledger_dir(self) -> Path:
        return self.path / self.LEDGER

    def ledger_file(self, rank: int) -> Path:
        return self.ledger_dir / f"rank-{rank}.csv"

    @property
    def slurm_job_file(self) -> Path:
        return self.path / self.SLURM_JOB

    @property
    def submitit_dir(self) -> Path:
        return self.path / self.SUBMITIT

    @property
    def resumed_file(self) -> Path:
        return self.path / self.RESUMED

    # --------------------------------------------------------------------------- what it says
    def held(self) -> list[str]:
        """What of a run this directory holds (config.yaml, checkpoints, exports, test metrics): a new run here
        would mix with it. Empty for a new directory, or one holding only a launcher's log or SLURM record."""
        checkpoints = self.checkpoints_dir
        found = [self.CONFIG] if self.config_file.is_file() else []
        if checkpoints.is_dir() and any(checkpoints.iterdir()):
            found.append(f"{self.CHECKPOINTS}/")
        found += [f"{name}/" for name in EXPORTS if (self.path / name).exists()]
        return found + ([self.TEST_METRICS] if self.test_metrics_file.is_file() else [])

    def move_aside(self) -> Path:
        """Move the whole directory to a sibling `NAME.previous-<UTC time>` (kept: itself a run directory) and
        make `self.path` a new empty directory with the same mode. One process only. Returns where it went."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        dest = self.path.with_name(f"{self.path.name}.previous-{stamp}")
        suffix = 1
        while dest.exists():  # two within a second
            suffix += 1
            dest = self.path.with_name(f"{self.path.name}.previous-{stamp}-{suffix}")
        mode = self.path.stat().st_mode
        os.replace(self.path, dest)
        self.path.mkdir()
        os.chmod(self.path, mode & 0o7777)
        return dest

    def is_run(self) -> bool:
        return self.config_file.is_file()

    def config(self) -> Config:
        """The run's config.yaml, as a validated Config."""
        import yaml

        from vkd_dist.config import config_from_dict

        if not self.is_run():
            raise FileNotFoundError(f"{self.config_file}: not found; is {self.path} a vkd_dist run directory?")
        return config_from_dict(yaml.safe_load(self.config_file.read_text()))

    def labels(self) -> tuple[str, ...]:
        """The label names the run was trained on; the 14 CheXpert labels for runs made before runs recorded
        them."""
        path = self.labels_file
        return tuple(json.loads(path.read_text())["labels"]) if path.is_file() else LABELS

    def check_labels(self, labels: Sequence[str], data_dir: str | Path) -> None:
        """Refuse data (at `data_dir`) whose label names differ from those the run was trained on."""
        from vkd_dist.config import ConfigError

        if tuple(self.labels()) != tuple(labels):
            raise ConfigError(f"run {self.path} was trained on labels [{', '.join(self.labels())}] but {data_dir} has "
                              f"labels [{', '.join(labels)}]")

    def test_metrics(self) -> Optional[dict]:
        path = self.test_metrics_file
        return json.loads(path.read_text()) if path.is_file() else None
