"""`accelerate launch -m vkd_dist.train [--config F] [key=value ...]` (or `python -m vkd_dist.train`, `vkd-train`).

build -> (resume) -> for step: batches -> loss terms -> backward -> optimizer step -> log -> maybe eval ->
maybe checkpoint -> maybe stop (preemption) ; then export the image-only model and evaluate on test.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from accelerate.utils import set_seed

from vkd_dist import RawDefaultsHelpFormatter, checkpoint
from vkd_dist.config import Config, ConfigError, load_config, save_config
from vkd_dist.data.augment import BatchAugment
from vkd_dist.data.pipeline import train_loader
from vkd_dist.data.schema import read_dataset
from vkd_dist.distributed import build_accelerator, check_compile_toolchain, mark_text_length_dynamic, param_digests
from vkd_dist.evaluate import evaluate, load_teacher
from vkd_dist.metrics import format_table
from vkd_dist.models.build import build_model
from vkd_dist.objectives import Objective
from vkd_dist.prepare import ensure_dataset, record_run_labels, resolve_tokenizer, token_table, warn_unscorable
from vkd_dist.tracking import RunLogger, Throughput


@dataclass
class TrainResult:
    step: int
    preempted: bool = False
    val: Optional[dict] = None
    test: Optional[dict] = None
    run_dir: str = ""
    checkpoints: list = field(default_factory=list)


class StopRequest:
    """Set by SIGTERM/SIGUSR1/SIGUSR2 (SLURM's preemption and time-limit signals); agreed on by all ranks at
    a step boundary so that they checkpoint together."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self, install: bool = True):
        self.requested = False
        self._group = None  # the CPU process group the ranks agree over (multi-process only)
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
        flag = torch.tensor([1.0 if self.requested else 0.0])
        dist.all_reduce(flag, group=self._group)
        return bool(flag.item() > 0)

    def restore(self) -> None:
        """Reinstall the handlers that were in place when this object was created; let go of the CPU group."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._group = None


def adamw_implementation(device: torch.device | str) -> str:
    """Which AdamW kernel to use on `device`: "fused" (one pass over each tensor) where torch has the fused
    kernel for it (CUDA; the CPU since torch 2.4), else "foreach" (multi-tensor kernels). On the CPU fused was
    the fastest by far (benchmarks/throughput.py --only profile, optimizer_impl_ms, 1 thread, fused / foreach
    / per-tensor ms per step): 2.5 / 6.8 / 7.2 with the default config's model (1.2M parameters), 286 / 2010
    / 1080 with the MIMIC recipe's ViT-B/16 + BERT-base-sized encoder (175M)."""
    kind = torch.device(device).type
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        fused = _get_fused_kernels_supported_devices()
    except ImportError:  # a torch that does not say: CUDA has had the fused kernel longest
        fused = ["cuda"]
    return "fused" if kind in ("cuda", "cpu") and kind in fused else "foreach"


def _optimizer(model: torch.nn.Module, cfg: Config, device: torch.device | str | None = None,
               implementation: str | None = None) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters, no weight decay on biases, norms, position embeddings and the
    class token. `device`: where the parameters will live when it steps (default: where they are now);
    `implementation`: "fused" | "foreach" | "single_tensor" (default: adamw_implementation(device)).

    The state_dict format is the same for every implementation (the flags only are recorded in its
    param_groups), so checkpoints resume across them; a loaded state_dict's flags are replaced by this
    optimizer's own, so a run resumed from an older (or another machine's) checkpoint keeps its kernel."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "pos_embed" in name or "cls_token" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if device is None:
        device = next((p.device for p in decay + no_decay), torch.device("cpu"))
    implementation = implementation or adamw_implementation(device)
    flags = {"fused": implementation == "fused" or None, "foreach": implementation == "foreach" or None}
    if implementation == "single_tensor":
        flags["foreach"] = False
    elif implementation not in ("fused", "foreach"):
        raise ValueError(f"AdamW implementation {implementation!r} (allowed: fused, foreach, single_tensor)")
    optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), **flags)

    def keep_implementation(opt, state_dict):  # torch would take "fused"/"foreach" from the saved groups
        groups = [{**g, **flags} for g in state_dict["param_groups"]]
        return {**state_dict, "param_groups": groups}

    optimizer.register_load_state_dict_pre_hook(keep_implementation)
    return optimizer


def lr_lambda(warmup: int, total: int, min_ratio: float):
    """Linear warm-up then cosine decay to min_ratio of the peak."""

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


def _batches(stream, epoch: int, skip: int):
    """(epoch, index-in-epoch, batch) forever, starting `skip` batches into `epoch`."""
    while True:
        index = skip
        for batch in stream.epoch(epoch, skip):
            index += 1
            yield epoch, index, batch
        epoch, skip = epoch + 1, 0


def train(cfg: Config, stop: Optional[StopRequest] = None) -> TrainResult:
    """Run (or resume) training as configured. SIGTERM/SIGUSR1/SIGUSR2 stop it at the next step boundary with
    a checkpoint (result.preempted); pass `stop` to control that from outside."""
    stop = stop or StopRequest(install=True)
    try:
        return _train(cfg, stop)
    finally:
        stop.restore()


def _train(cfg: Config, stop: StopRequest) -> TrainResult:
    accelerator = build_accelerator(cfg)
    if cfg.train.compile:
        check_compile_toolchain(accelerator.device)
    run_dir = Path(cfg.run_dir)
    set_seed(cfg.train.seed, device_specific=False, deterministic=cfg.train.deterministic)

    # -- data, tokenizer, model -------------------------------------------------------------------------
    info = ensure_dataset(cfg, accelerator)
    record_run_labels(cfg, info, accelerator)  # before config.yaml: a refused resume leaves the run as it was
    if accelerator.is_main_process:
        save_config(cfg, run_dir / "config.yaml")
    tokenizer = resolve_tokenizer(cfg, info, accelerator)
    model = build_model(cfg, len(tokenizer), num_labels=len(info.labels))
    teacher = load_teacher(cfg, accelerator.device) if cfg.objective.name == "kd" else None
    objective = Objective(cfg.objective, cfg.model.num_samples, teacher)
    optimizer = _optimizer(model, cfg, accelerator.device)  # the model is still on the CPU here
    if cfg.train.compile:
        # In place: the module and its state-dict keys stay as they are, so checkpoints and the image-only
        # export are the same with and without compile (torch.compile's wrapper would prefix "_orig_mod.").
        model.compile()
    model, optimizer = accelerator.prepare(model, optimizer)
    schedule = lr_lambda(cfg.optim.warmup_steps, cfg.train.max_steps, cfg.optim.min_lr_ratio)
    stream = train_loader(info, cfg.data.train_split, cfg.data, tokenizer, accelerator.process_index,
                          accelerator.num_processes, cfg.train.seed, token_table(cfg, info, tokenizer, accelerator))
    augment = BatchAugment(cfg.data, cfg.train.seed, accelerator.process_index)

    # -- resume ------------------------------------------------------------------------------------------
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best_macro_auroc": None, "samples": 0}
    val_labels = info.scorable_labels(cfg.data.val_split)  # best/ compares macro AUROCs over this set only
    ckpt = checkpoint.resolve(cfg.run_dir, cfg.resume)
    if ckpt is not None:
        state.update(checkpoint.load(accelerator, ckpt))
    step = state["step"]
    log = RunLogger(cfg, accelerator.is_main_process, cfg.train.max_steps, step)
    if ckpt is not None:
        log.info(f"resumed from {ckpt} at step {step} (epoch {state['epoch']}, batch {state['batch_in_epoch']})")
    log.info(f"run {run_dir} | objective {cfg.objective.name} | {accelerator.num_processes} process(es) on "
             f"{accelerator.device} | {stream.batches_per_epoch} batches/epoch/rank | "
             f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters | {len(info.labels)} labels")
    warn_unscorable(info, cfg.data.val_split, log.info)
    batches = _batches(stream, state["epoch"], state["batch_in_epoch"])
    meter, skipped_by_worker, result = Throughput(), {}, TrainResult(step=step, run_dir=str(run_dir))
    model.train()
    nonfinite = torch.zeros((), dtype=torch.bool, device=accelerator.device)  # since the last check
    checked_step = step

    def save_checkpoint() -> None:
        path = checkpoint.save(accelerator, run_dir, step, state, cfg.train.keep_last)
        result.checkpoints.append(str(path))

    while step < cfg.train.max_steps:
        for group in optimizer.param_groups:  # the schedule is a function of the step: nothing to resume
            group["lr"] = cfg.optim.lr * schedule(step)
        terms_sum: dict[str, torch.Tensor] = {}
        grad_norm = None
        for micro in range(cfg.optim.grad_accum):
            t0 = time.perf_counter()
            state["epoch"], state["batch_in_epoch"], batch = next(batches)
            meter.wait += time.perf_counter() - t0
            skipped_by_worker[batch.worker] = batch.skipped
            batch = augment(batch.to(accelerator.device), step * cfg.optim.grad_accum + micro)
            if cfg.train.compile:
                mark_text_length_dynamic(batch)
            with accelerator.accumulate(model):
                terms = objective(model, batch, step)
                accelerator.backward(terms["loss"])
                if accelerator.sync_gradients and cfg.optim.grad_clip > 0:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            for k, v in terms.items():
                terms_sum[k] = terms_sum.get(k, 0.0) + v.detach().float() / cfg.optim.grad_accum
            meter.samples += len(batch) * accelerator.num_processes
        step += 1
        state["step"], state["samples"] = step, state["samples"] + cfg.data.batch_size * cfg.optim.grad_accum * accelerator.num_processes
        nonfinite |= ~torch.isfinite(terms_sum["loss"])
        log.advance(1)

        stop_now = stop.agreed(accelerator)
        log_now = step % cfg.logging.log_every == 0 or step == cfg.train.max_steps
        eval_now = step % cfg.train.eval_every == 0 or step == cfg.train.max_steps
        save_now = step % cfg.train.ckpt_every == 0 or step == cfg.train.max_steps or stop_now
        # Reading device values makes the host wait for the device, so losses are read only here: in between,
        # the host queues the next steps while the device works. Nothing non-finite is logged or saved.
        if log_now or eval_now or save_now:
            if nonfinite.item():
                raise FloatingPointError(f"non-finite loss between steps {checked_step + 1} and {step}; lower "
                                         "optim.lr or check the data")
            checked_step = step
        if log_now:
            terms_sum = {k: float(v) for k, v in terms_sum.items()}
            log.advance(0, loss=terms_sum["loss"])
            scalars = {**terms_sum, "lr": optimizer.param_groups[0]["lr"], **meter.summary(),
                       "skipped_samples": sum(skipped_by_worker.values())}
            if grad_norm is not None:
                scalars["grad_norm"] = float(grad_norm)
            log.scalars(step, scalars, "train/")
            log.info(f"step {step:>6} " + " ".join(f"{k} {v:.4g}" for k, v in scalars.items()))
        if eval_now:
            preds: list = []
            report = evaluate(model, cfg, info, cfg.data.val_split, tokenizer, accelerator, cfg.train.eval_max_batches,
                              checkpoint_name=f"step-{step:08d}", predictions=preds)
            model.train()
            result.val = report
            log.evaluation(step, report, preds[0], "val")
            log.info(f"step {step:>6} val macro AUROC {report['macro_auroc']} over {len(report['macro_labels'])} labels")
            best = state["best_macro_auroc"]
            comparable = report["macro_labels"] == val_labels  # like with like: the same label set every time
            if comparable and report["macro_auroc"] is not None and (best is None or report["macro_auroc"] > best):
                state["best_macro_auroc"] = report["macro_auroc"]
                checkpoint.export_image_model(accelerator, model, run_dir / "best",
                                              {"step": step, "val": report, "objective": cfg.objective.name,
                                               "labels": list(info.labels)})
        if save_now:
            save_checkpoint()
        if stop_now:
            log.info(f"stop requested: checkpointed at step {step}; resume with resume=latest")
            result.preempted = True
            break

    result.step = step
    if not result.preempted:
        digests = param_digests(accelerator, model)  # every rank must end with the same model
        checkpoint.export_image_model(accelerator, model, run_dir / "final",
                                      {"step": step, "objective": cfg.objective.name, "param_digests": digests,
                                       "labels": list(info.labels)})
        if len(set(digests)) > 1:
            raise RuntimeError(f"ranks ended training with different parameters (digests {digests}); see final/meta.json")
        if cfg.train.test_at_end:
            result.test = evaluate(model, cfg, info, cfg.data.test_split, tokenizer, accelerator,
                                   checkpoint_name="final")
            log.scalars(step, {"macro_auroc": result.test["macro_auroc"]}, "test/")
            log.hparams({"objective": cfg.objective.name, "lr": cfg.optim.lr, "beta": cfg.objective.beta,
                         "latent_dim": cfg.model.latent_dim, "seed": cfg.train.seed, "max_steps": cfg.train.max_steps},
                        {"hparam/test_macro_auroc": result.test["macro_auroc"],
                         "hparam/val_macro_auroc": (result.val or {}).get("macro_auroc")})
            if accelerator.is_main_process:
                (run_dir / "test_metrics.json").write_text(json.dumps(result.test, indent=2))
                log.info(f"test split ({cfg.data.test_split}), image-only inference:\n" + format_table(result.test))
    log.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def parse_args(argv: Optional[list[str]] = None) -> tuple[Optional[str], list[str]]:
    parser = argparse.ArgumentParser(prog="vkd-train", description=__doc__, formatter_class=RawDefaultsHelpFormatter)
    parser.add_argument("--config", help="YAML config (default: configs/default.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=100 objective=image_only")
    args = parser.parse_args(argv)
    return args.config, args.overrides


def main(argv: Optional[list[str]] = None) -> int:
    config_path, overrides = parse_args(argv)
    try:
        cfg = load_config(config_path, overrides)
        result = train(cfg)
    except ConfigError as exc:  # also what only the data can tell: e.g. a resume onto other labels
        print(f"vkd-train: config error: {exc}", file=sys.stderr)
        return 2
    return 0 if result.step >= cfg.train.max_steps or result.preempted else 1


if __name__ == "__main__":
    sys.exit(main())
