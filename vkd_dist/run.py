"""Everything a training run holds, built once before step 1: the accelerator, the data, the model, the
objective, the optimizer and the data stream, resumed from a checkpoint when one is asked for.

`build_run(cfg, stream)` is the set-up half of `vkd_dist.train.train`; an injected `stream` (any object with
`batches_per_epoch` and `epoch(epoch, skip)` yielding Batches) replaces the shard stream, e.g. in-memory batches
for a benchmark."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Optional, Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from vkd_dist import rank_buffers, resume
from vkd_dist.build import build_model
from vkd_dist.checkpoint import on_main
from vkd_dist.config import Config
from vkd_dist.data.augment import BatchAugment
from vkd_dist.data.compose import ComposedStream, describe, train_stream
from vkd_dist.data.pipeline import Batch, TrainStream, training_policy
from vkd_dist.data.schema import DatasetInfo
from vkd_dist.distributed import StrategyAccelerator, build_accelerator, sync_buffers
from vkd_dist.evaluate import load_teacher
from vkd_dist.fileio import restrict_access
from vkd_dist.init_from import init_modules
from vkd_dist.ledger import SampleLedger, open_ledger
from vkd_dist.objectives import Objective, build_objective, get_objective
from vkd_dist.optim import build_optimization
from vkd_dist.prepare import prepare_run
from vkd_dist.run_dir import RunDir
from vkd_dist.text_init import init_text_path
from vkd_dist.tracking import LossWindow, RunLogger, Throughput


class BatchStream(Protocol):
    batches_per_epoch: int

    def epoch(self, epoch: int, skip: int) -> Iterator[Batch]: ...


@dataclass
class TrainState:
    """What train_state.json holds besides the tensors: the step, the data position, the best validation value."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    samples: int = 0
    data_offsets: Optional[list] = None  # per rank, per data worker: raw samples read this epoch (TrainStream.offsets)
    data_reads: Optional[list] = None  # per rank, per data worker: through the last batch taken (TrainStream.reads)
    data_layout: Optional[dict] = None  # how the epoch was dealt to ranks and workers (vkd_dist/data/rest.py)
    world_size: int = 0  # processes and accumulation that wrote it: a resume on another number keeps the global batch
    grad_accum: int = 0
    global_batch: int = 0  # samples per step the run asked for, and the grad_accum it was asked with (world_size.py)
    asked_grad_accum: int = 0
    deferred: list = field(default_factory=list)  # actions a stop put off past its checkpoint (vkd_dist/actions.py)
    best_metric: Optional[str] = None  # the train.select_metric that best_value was measured with
    best_value: Optional[float] = None

    @classmethod
    def from_saved(cls, saved: dict, select_metric: str) -> TrainState:
        saved = dict(saved)
        if "best_macro_auroc" in saved:  # written before train.select_metric existed
            saved["best_metric"], saved["best_value"] = "macro_auroc", saved.pop("best_macro_auroc")
        state = cls(**{k: saved[k] for k in cls.__dataclass_fields__ if k in saved})
        if state.best_metric != select_metric:  # best/ was chosen by another metric: start comparing afresh
            state.best_metric, state.best_value = select_metric, None
        return state


@dataclass
class TrainResult:
    step: int
    preempted: bool = False
    val: Optional[dict] = None
    test: Optional[dict] = None
    run_dir: str = ""
    checkpoints: list = field(default_factory=list)
    resumed_from: Optional[str] = None  # the checkpoint the run loaded (verified), None for a fresh start


@dataclass
class Run:
    cfg: Config
    accelerator: StrategyAccelerator
    info: DatasetInfo
    tokenizer: Any
    model: torch.nn.Module
    objective: Objective
    optimizer: torch.optim.Optimizer
    schedule: Callable[[int], float]  # the learning rate's multiplier of optim.lr, by step
    stream: BatchStream
    augment: BatchAugment
    log: RunLogger
    state: TrainState
    batches: Iterator[tuple[int, int, Batch]] = field(init=False)
    meter: Throughput = field(default_factory=Throughput)
    window: LossWindow = field(default_factory=LossWindow)  # the loss terms since the last train line
    skipped_by_worker: dict = field(default_factory=dict)  # data workers' counts of skipped corrupt samples
    ledger: Optional[SampleLedger] = None  # logging.sample_ledger
    resumed_from: Optional[str] = None  # the checkpoint loaded (verified)
    own_buffers: bool = False  # each rank resumed its own buffers (vkd_dist/rank_buffers.py): they are not synced

    def __post_init__(self) -> None:
        self.batches = epochs(self.stream, self.state.epoch, self.state.batch_in_epoch)
        # Any non-finite loss since the last check, kept on the device: reading it makes the host wait.
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=self.accelerator.device)
        self.checked_step = self.state.step
        # Buffers are equal on every rank at step 0 (the same initial weights) and in a checkpoint (saved synced),
        # unless each rank resumed its own.
        self.synced_step = -1 if self.own_buffers else self.state.step

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run_dir)

    @property
    def dir(self) -> RunDir:
        return RunDir(self.cfg.run_dir)

    def sync_buffers(self) -> None:
        """Collective: every rank's buffers made one (`distributed.sync_buffers`), at most once a step: they change
        only in a training step, so a validation, a save and the export at the same step share one sync."""
        if self.synced_step != self.state.step:
            sync_buffers(self.accelerator, self.model)
            self.synced_step = self.state.step

    def check_finite(self) -> None:
        """Raise if any rank's loss since the last check was non-finite (called before anything is logged or
        saved). Collective: every rank raises the same error at the same step, none walks on into a collective
        the others have left."""
        nonfinite = self.nonfinite.float()
        if self.accelerator.num_processes > 1:
            nonfinite = self.accelerator.reduce(nonfinite, reduction="sum")
        ranks = int(nonfinite.item())
        if ranks:
            raise FloatingPointError(f"non-finite loss on {ranks} of {self.accelerator.num_processes} rank(s) between "
                                     f"steps {self.checked_step + 1} and {self.state.step}; lower optim.lr or check "
                                     "the data")
        self.checked_step = self.state.step


def epochs(stream: BatchStream, epoch: int, skip: int) -> Iterator[tuple[int, int, Batch]]:
    """(epoch, index-in-epoch, batch) forever, starting `skip` batches into `epoch`."""
    while True:
        index = skip
        for batch in stream.epoch(epoch, skip):
            index += 1
            yield epoch, index, batch
        epoch, skip = epoch + 1, 0


def label_header(cfg: Config, info: DatasetInfo) -> str:
    """How this run reads its labels, how it is scored, and how many training studies have labels at all."""
    policy = training_policy(info, cfg.data)
    overridden = [k for k in ("uncertain", "missing") if getattr(cfg.data, k) is not None]
    source = f"data.{', data.'.join(overridden)}" if overridden else "the data set's training policy"
    split = cfg.data.train_split
    unlabelled = info.num_unlabelled(split)
    counts = (f"{info.num_samples(split) - unlabelled} labelled, {unlabelled} with a report but no labels"
              if unlabelled else f"all {info.num_samples(split)} labelled")
    return (f"labels: trained with {policy.describe()} ({source}); scored with {info.eval_policy.describe()} | "
            f"{split} studies: {counts}")


def seed_per_rank(cfg: Config, accelerator: Accelerator) -> None:
    """Every rank built the same initial weights from train.seed; from here on each draws its own latent noise
    and dropout masks (seed + rank), or more ranks would average K identical samples instead of K x ranks
    independent ones. A single process is left as it is, so it draws exactly what it drew before ranks had
    their own seeds (reseeding it here would change every single-process result for nothing)."""
    if accelerator.num_processes == 1:
        return
    set_seed(cfg.train.seed + accelerator.process_index, deterministic=cfg.train.deterministic)


def build_run(cfg: Config, stream: Optional[BatchStream] = None) -> Run:
    restrict_access(cfg.run_dir, cfg.data.shared_group)  # before anything is written: owner-only (or the group's)
    accelerator = build_accelerator(cfg)
    decision = resume.decide(cfg, accelerator)  # the run directory, the checkpoint, grad_accum: one answer, all ranks
    set_seed(cfg.train.seed, device_specific=False, deterministic=cfg.train.deterministic)
    prepared = prepare_run(cfg, accelerator, tokens=stream is None, resumed=decision.ckpt)
    info, tokenizer = prepared.info, prepared.tokenizer
    model = build_model(cfg, len(tokenizer), num_labels=len(info.labels))
    init_text_path(model, cfg, info.labels)  # objective.text_init: the report path from a text_only run
    init_modules(model, cfg, info.labels)  # model.init_from: the modules model.init_modules names, from a run
    teacher = load_teacher(cfg, accelerator.device) if get_objective(cfg.objective.name).needs_teacher else None
    objective = build_objective(cfg.objective, cfg.model.num_samples, teacher)
    optimizer, schedule = build_optimization(model, cfg, accelerator.device)  # the model is still on the CPU
    if cfg.train.compile:
        # In place: the module and its state-dict keys stay as they are, so checkpoints and the image-only
        # export are the same with and without compile (torch.compile's wrapper would prefix "_orig_mod.").
        model.compile()
    model, optimizer = accelerator.prepare(model, optimizer)
    seed_per_rank(cfg, accelerator)  # a resumed run then restores each rank's own RNG state
    if stream is None:
        stream = train_stream(info, cfg.data.train_split, cfg.data, tokenizer, accelerator.process_index,
                              accelerator.num_processes, cfg.train.seed, prepared.tokens,
                              get_objective(cfg.objective.name).learns_from)
    state = TrainState(best_metric=cfg.train.select_metric)
    ckpt, saved, notes, best_kept = resume.restore(accelerator, cfg, decision)
    moved, own_buffers = None, False
    if ckpt is not None and saved is not None:
        state = TrainState.from_saved(saved, cfg.train.select_metric)
        own_buffers = rank_buffers.restore(accelerator, model, ckpt, state.world_size)
        if not best_kept:  # the continued line's best/ was replaced by the other line's: its next validation exports
            state.best_value = None
        # exact even when samples were skipped: each worker's raw position
        if isinstance(stream, (TrainStream, ComposedStream)):
            state.epoch, state.batch_in_epoch, moved = stream.resume(
                state.epoch, state.batch_in_epoch, state.data_offsets, state.data_reads, state.data_layout,
                shared=partial(on_main, accelerator))  # the shards' headers read once, on rank 0
    state.world_size, state.grad_accum = accelerator.num_processes, cfg.optim.grad_accum
    state.global_batch, state.asked_grad_accum = decision.batch.global_batch, decision.batch.asked_grad_accum
    ledger = open_ledger(cfg.run_dir, accelerator, state.step) if cfg.logging.sample_ledger else None
    log = RunLogger(cfg, accelerator.is_main_process, cfg.train.max_steps, state.step)
    if ckpt is not None:
        log.info(f"resumed from {ckpt} at step {state.step} (epoch {state.epoch}, batch {state.batch_in_epoch})")
    for line in (*decision.notes, *notes, moved):
        if line:
            log.info(line)
    log.info(f"run {cfg.run_dir} | objective {cfg.objective.name} | {accelerator.strategy.name} over "
             f"{accelerator.num_processes} process(es) on {accelerator.device}"
             f"{' | ' + accelerator.threads if accelerator.threads else ''} | "
             f"{stream.batches_per_epoch} batches/epoch/rank | "
             f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters | {len(info.labels)} labels")
    log.info(label_header(cfg, info))
    if composed := describe(stream):
        log.info(composed)
    for note in prepared.notes:
        log.info(note)
    augment = BatchAugment(cfg.data, cfg.train.seed, accelerator.process_index)
    return Run(cfg, accelerator, info, tokenizer, model, objective, optimizer, schedule, stream, augment, log,
               state, ledger=ledger, resumed_from=str(ckpt) if ckpt is not None else None, own_buffers=own_buffers)
