"""Evaluation: image-only inference over a split, every sample exactly once across ranks, metrics with
patient-bootstrap CIs on the gathered predictions, under the data set's evaluation policy.

`vkd-eval --run RUN [--checkpoint best|final|last] [--data DIR] [--split test] [--out M.json]
[--predictions P.csv] [--plots DIR]` for a finished run."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from vkd_dist import RawDefaultsHelpFormatter
from vkd_dist.run_dir import RunDir

if TYPE_CHECKING:  # the rest is imported where used: `vkd-eval --help` answers before torch loads
    import torch

    from vkd_dist.config import Config
    from vkd_dist.data.schema import DatasetInfo
    from vkd_dist.metrics import Predictions

CHECKPOINTS = ("best", "last", "final")


class Interrupted(Exception):
    """An evaluation stopped part-way because every rank agreed to stop (a preemption notice)."""


def predict_split(model, cfg: Config, info: DatasetInfo, split: str, tokenizer, accelerator,
                  max_batches: Optional[int] = None, interrupt: Optional[Callable[[], bool]] = None) -> Predictions:
    """The predictions of every sample of `split` (each rank predicts its share; gathered on all ranks).
    `interrupt` (collective, asked before each batch) ends it early with `Interrupted`."""
    import torch

    with torch.no_grad():
        return _predictions(model, cfg, info, split, tokenizer, accelerator, max_batches, interrupt)


def _predictions(model, cfg: Config, info: DatasetInfo, split: str, tokenizer, accelerator,
                 max_batches: Optional[int], interrupt: Optional[Callable[[], bool]]) -> Predictions:
    import torch

    from vkd_dist.data.pipeline import eval_loader
    from vkd_dist.metrics import Predictions

    net = accelerator.unwrap_model(model) if accelerator is not None else model
    device = accelerator.device if accelerator is not None else torch.device("cpu")
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    was_training = model.training
    model.eval()
    parts: list[Predictions] = []
    batches = iter(eval_loader(info, split, cfg.data, tokenizer, rank, world, max_batches))
    while True:
        if interrupt is not None and interrupt():
            model.train(was_training)
            raise Interrupted(f"evaluation of {split} interrupted after {len(parts)} batch(es)")
        batch = next(batches, None)
        if world > 1:
            # Ranks may hold different numbers of batches. Under ZeRO-3 every forward gathers weights from all
            # ranks, so a rank that is done keeps stepping with an empty batch until every rank is done.
            pending = torch.tensor([0.0 if batch is None else 1.0], device=device)
            if accelerator.reduce(pending, reduction="sum").item() == 0:
                break
            if batch is None:
                _predict(net, cfg, _empty_batch(cfg, tokenizer, device, len(info.labels)))
                continue
        elif batch is None:
            break
        batch = batch.to(device)
        probs, std = _predict(net, cfg, batch)
        parts.append(Predictions(probs.float().cpu().numpy(), batch.targets.cpu().numpy(),
                                 batch.target_mask.cpu().numpy(), list(batch.keys), list(batch.patient_ids),
                                 std.float().cpu().numpy() if std is not None else None))
    model.train(was_training)
    return Predictions.concat(parts, len(info.labels)).gathered()


def _predict(net, cfg: Config, batch) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    if net.image_encoder is None:  # text_only: the teacher reads the report
        return net.predict_text(batch.input_ids, batch.attention_mask, batch.text_features)
    return net.predict(batch.image, cfg.model.inference, cfg.model.num_samples)  # the deployed path: images only


def _empty_batch(cfg: Config, tokenizer, device, num_labels: int):
    import torch

    from vkd_dist.data.pipeline import Batch

    size = cfg.data.image_size
    ids = torch.tensor([[tokenizer.cls_token_id, tokenizer.sep_token_id]], device=device)
    features = None
    if cfg.data.text_features:
        from vkd_dist.data.text_features import feature_dim

        features = torch.zeros(1, feature_dim(cfg.data.text_features), device=device)
    return Batch(image=torch.zeros(1, 1, size, size, dtype=torch.uint8, device=device), input_ids=ids,
                 attention_mask=torch.ones_like(ids), targets=torch.zeros(1, num_labels, device=device),
                 target_mask=torch.zeros(1, num_labels, dtype=torch.bool, device=device), text_features=features)


def evaluate(model, cfg: Config, info: DatasetInfo, split: str, tokenizer, accelerator=None,
             max_batches: Optional[int] = None, checkpoint_name: str = "current",
             predictions: Optional[list] = None, interrupt: Optional[Callable[[], bool]] = None) -> dict:
    """Metrics of `split` under the data set's evaluation policy, naming the checkpoint they describe. Pass a
    list as `predictions` to receive the Predictions too."""
    from vkd_dist.metrics import report

    pred = predict_split(model, cfg, info, split, tokenizer, accelerator, max_batches, interrupt)
    if predictions is not None:
        predictions.append(pred)
    rep = report(pred, info.labels, info.scorable_labels(split), cfg.train.bootstrap_resamples, cfg.train.seed)
    rep.update(split=split, checkpoint=checkpoint_name, eval_policy=info.eval_policy.to_dict(),
               truncated=max_batches is not None)
    return rep


def load_exported(run_dir: str | Path, which: str = "best", objective: Optional[str] = None, device="cpu"):
    """(model, cfg, tokenizer) from a run's exported weights; image-only unless the run was text_only."""
    from vkd_dist import weights
    from vkd_dist.build import build_model
    from vkd_dist.data.tokens import load_tokenizer
    from vkd_dist.objectives import TEXT, get_objective
    from vkd_dist.prepare import tokenizer_dir

    cfg = RunDir(run_dir).config()
    objective = objective or cfg.objective.name
    tokenizer = load_tokenizer(tokenizer_dir(cfg, run_dir))
    model = build_model(cfg, len(tokenizer), objective=objective, with_text=get_objective(objective).inference == TEXT,
                        num_labels=len(RunDir(run_dir).labels()))
    state = weights.load_weights(weights.find_weights(run_dir, which))
    wanted = model.deploy_state_dict()
    missing = [k for k in wanted if k not in state]
    if missing:
        raise KeyError(f"{run_dir}: exported weights lack {len(missing)} tensors, e.g. {missing[0]}")
    model.load_state_dict({k: state[k] for k in wanted}, strict=False)
    return model.to(device).eval(), cfg, tokenizer


def load_teacher(cfg: Config, device):
    """The frozen teacher of an objective that needs one (kd): a run whose inference reads the report."""
    from vkd_dist.objectives import TEXT, get_objective, objective_names
    from vkd_dist.prepare import teacher_run_dir

    teacher = teacher_run_dir(cfg)
    teacher_objective = teacher.config().objective.name
    if get_objective(teacher_objective).inference != TEXT:
        readers = [n for n in objective_names() if get_objective(n).inference == TEXT]
        raise ValueError(f"objective.kd_teacher={cfg.objective.kd_teacher}: a run that reads reports "
                         f"({', '.join(readers)}) is needed, got objective {teacher_objective}")
    model, _, _ = load_exported(teacher.path, "best" if teacher.export_dir("best").is_dir() else "final",
                                device=device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def check_run_dir(run: str, given: str) -> Path:
    """A training run directory named on the command line (`given`: how, e.g. '--run'), checked first."""
    path = Path(run)
    if not path.is_dir():
        raise FileNotFoundError(f"{given} {run}: no such directory")
    if not RunDir(path).is_run():
        raise FileNotFoundError(f"{given} {run}: not a training run directory (no {RunDir.CONFIG})")
    return path


def check_checkpoint(run_dir: Path, which: str) -> Path:
    """--checkpoint of vkd-eval and vkd-export (best | last | final | PATH) -> its weights file, before anything
    is loaded; naming the checkpoints the run has when the one asked for is not there."""
    from vkd_dist import weights
    from vkd_dist.config import did_you_mean

    if which not in CHECKPOINTS and not Path(which).exists():
        raise ValueError(f"--checkpoint {which!r} is not allowed (allowed: {', '.join(CHECKPOINTS)} or an existing "
                         f"path{did_you_mean(which, CHECKPOINTS)})")
    try:
        return weights.find_weights(run_dir, which)
    except FileNotFoundError as exc:
        has = [name for name in CHECKPOINTS if _has_weights(run_dir, name)]
        raise FileNotFoundError(f"--checkpoint {which}: {exc}; the run has: {', '.join(has) or 'none'}") from None


def run_dataset(run: Path, data: Optional[str] = None, flag: str = "--data") -> DatasetInfo:
    """The data set `flag` names, else the one the run was trained on (its config.yaml's data.path); a missing one
    is said with what was looked for and how to point elsewhere."""
    from vkd_dist.data.schema import read_dataset

    path = Path(data or RunDir(run).config().data.path)
    if not (path / "dataset.json").is_file():
        given = f"{flag} {data}" if data else f"data.path={path} from {RunDir(run).config_file}"
        where = "" if path.is_absolute() else f", relative to the current directory {Path.cwd()}"
        raise FileNotFoundError(f"no data set at {path.expanduser().resolve() / 'dataset.json'} ({given}{where}); "
                                f"pass {flag} DIR with the converted shards (a directory holding dataset.json)")
    return read_dataset(path)


def _has_weights(run_dir: Path, which: str) -> bool:
    from vkd_dist import weights

    try:
        weights.find_weights(run_dir, which)
    except FileNotFoundError:
        return False
    return True


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="vkd-eval", description=__doc__,
                                     formatter_class=RawDefaultsHelpFormatter)
    parser.add_argument("--run", required=True, help="run directory of a training run")
    parser.add_argument("--checkpoint", default="best", help="best | last | final | PATH")
    parser.add_argument("--data", help="shard directory (default: the run's data.path)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--out", help="write the metrics JSON here")
    parser.add_argument("--predictions", help="write one CSV row per sample here: key, patient_id, a probability "
                                              "per label (and <label>_std with model.inference=mc)")
    parser.add_argument("--plots", help="write ROC and reliability-diagram PNGs into this folder")
    parser.add_argument("--bootstrap", type=int, default=None,
                        help="patient-bootstrap resamples for the CIs (default: the run's train.bootstrap_resamples)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--inference", choices=("prior_mean", "mc"), help="override the run's model.inference")
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except (FileNotFoundError, KeyError, ValueError) as exc:  # a bad path, split or label set: one line
        print(f"vkd-eval: error: {exc.args[0] if isinstance(exc, KeyError) and exc.args else exc}", file=sys.stderr)
        return 2


def _run(args) -> int:
    import torch
    from accelerate import Accelerator

    from vkd_dist import weights
    from vkd_dist.metrics import format_table
    from vkd_dist.prepare import check_split_name

    run = check_run_dir(args.run, "--run")  # each argument is checked before any model is built
    weights_path = check_checkpoint(run, args.checkpoint)
    info = run_dataset(run, args.data)
    RunDir(run).check_labels(info.labels, info.root)
    check_split_name(f"--split {args.split!r}", args.split, info)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model, cfg, tokenizer = load_exported(args.run, args.checkpoint, device=accelerator.device)
    if args.batch_size:
        cfg.data.eval_batch_size = args.batch_size
    if args.bootstrap is not None:
        cfg.train.bootstrap_resamples = args.bootstrap
    if args.inference:
        cfg.model.inference = args.inference
    preds: list[Predictions] = []
    rep = evaluate(model, cfg, info, args.split, tokenizer, accelerator, checkpoint_name=args.checkpoint,
                   predictions=preds)
    rep.update(run=str(args.run), data=str(info.root), step=weights.weights_step(weights_path),
               weights_digest=weights.digest(model.deploy_state_dict()))  # as test_metrics.json: vkd-export matches
    if accelerator.is_main_process:
        print(format_table(rep))
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(rep, indent=2))
        if args.predictions:
            preds[0].write_csv(args.predictions, info.labels)
        if args.plots:
            from vkd_dist.plots import save_plots

            title = f"{args.run}: checkpoint {args.checkpoint} (step {rep['step']}), split {args.split}"
            for path in save_plots(preds[0], info.labels, args.plots, title):
                print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
