"""Evaluation: image-only inference over a split, every sample exactly once across ranks, AUROC on the
gathered predictions. `vkd-eval --run RUN --data DIR --split test --out FILE.json` for a finished run."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import yaml

from vkd_dist import checkpoint
from vkd_dist.config import config_from_dict
from vkd_dist.data.pipeline import eval_loader
from vkd_dist.metrics import auroc_report, format_table, gather_predictions
from vkd_dist.prepare import teacher_run_dir, tokenizer_dir


@torch.no_grad()
def predict_split(model, cfg, info, split: str, tokenizer, accelerator, max_batches: Optional[int] = None):
    """(probs, targets, mask, keys) of this rank's share of `split`, gathered from all ranks."""
    net = accelerator.unwrap_model(model) if accelerator is not None else model
    device = accelerator.device if accelerator is not None else torch.device("cpu")
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    was_training = model.training
    model.eval()
    probs, targets, masks, keys = [], [], [], []
    batches = iter(eval_loader(info, split, cfg.data, tokenizer, rank, world, max_batches))
    while True:
        batch = next(batches, None)
        if world > 1:
            # Ranks may hold different numbers of batches. Under ZeRO-3 every forward gathers weights from all
            # ranks, so a rank that is done keeps stepping with an empty batch until every rank is done.
            pending = torch.tensor([0.0 if batch is None else 1.0], device=device)
            if accelerator.reduce(pending, reduction="sum").item() == 0:
                break
            if batch is None:
                _predict(net, cfg, _empty_batch(cfg, tokenizer, device))
                continue
        elif batch is None:
            break
        batch = batch.to(device)
        p = _predict(net, cfg, batch)
        probs.append(p.float().cpu().numpy())
        targets.append(batch.targets.cpu().numpy())
        masks.append(batch.target_mask.cpu().numpy())
        keys.extend(batch.keys)
    model.train(was_training)
    empty = lambda dt: np.zeros((0, 14), dtype=dt)  # noqa: E731
    return gather_predictions(np.concatenate(probs) if probs else empty(np.float32),
                              np.concatenate(targets) if targets else empty(np.float32),
                              np.concatenate(masks) if masks else empty(bool), keys)


def _predict(net, cfg, batch) -> torch.Tensor:
    if net.image_encoder is None:  # text_only: the teacher reads the report
        return net.predict_text(batch.input_ids, batch.attention_mask, batch.text_features)[0]
    return net.predict(batch.image, cfg.model.inference, cfg.model.num_samples)[0]  # the deployed path: images only


def _empty_batch(cfg, tokenizer, device):
    from vkd_dist.data.pipeline import Batch

    size = cfg.data.image_size
    ids = torch.tensor([[tokenizer.cls_token_id, tokenizer.sep_token_id]], device=device)
    features = None
    if cfg.data.text_features:
        from vkd_dist.data.text_features import feature_dim

        features = torch.zeros(1, feature_dim(cfg.data.text_features), device=device)
    return Batch(image=torch.zeros(1, 1, size, size, dtype=torch.uint8, device=device), input_ids=ids,
                 attention_mask=torch.ones_like(ids), targets=torch.zeros(1, 14, device=device),
                 target_mask=torch.zeros(1, 14, dtype=torch.bool, device=device), text_features=features)


def evaluate(model, cfg, info, split: str, tokenizer, accelerator=None, max_batches: Optional[int] = None) -> dict:
    probs, targets, mask, keys = predict_split(model, cfg, info, split, tokenizer, accelerator, max_batches)
    report = auroc_report(probs, targets, mask)
    report["split"] = split
    return report


def load_run_config(run_dir: str | Path):
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; is {run_dir} a vkd_dist run directory?")
    return config_from_dict(yaml.safe_load(path.read_text()))


def load_exported(run_dir: str | Path, which: str = "best", objective: Optional[str] = None, device="cpu"):
    """(model, cfg, tokenizer) from a run's exported weights; image-only unless the run was text_only."""
    from vkd_dist.models.build import build_model
    from vkd_dist.models.encoders import load_tokenizer

    cfg = load_run_config(run_dir)
    objective = objective or cfg.objective.name
    tokenizer = load_tokenizer(tokenizer_dir(cfg, run_dir))
    model = build_model(cfg, len(tokenizer), objective=objective, with_text=objective == "text_only")
    state = checkpoint.load_weights(checkpoint.find_weights(run_dir, which))
    wanted = model.deploy_state_dict()
    missing = [k for k in wanted if k not in state]
    if missing:
        raise KeyError(f"{run_dir}: exported weights lack {len(missing)} tensors, e.g. {missing[0]}")
    model.load_state_dict({k: state[k] for k in wanted}, strict=False)
    return model.to(device).eval(), cfg, tokenizer


def load_teacher(cfg, device):
    """The frozen text_only teacher for objective=kd."""
    run_dir = teacher_run_dir(cfg)
    model, tcfg, _ = load_exported(run_dir, "best" if (run_dir / "best").is_dir() else "final", "text_only", device)
    if tcfg.objective.name != "text_only":
        raise ValueError(f"objective.kd_teacher={cfg.objective.kd_teacher}: a text_only run is needed, "
                         f"got objective {tcfg.objective.name}")
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="vkd-eval", description=__doc__)
    parser.add_argument("--run", required=True, help="run directory of a training run")
    parser.add_argument("--checkpoint", default="best", help="best | last | final | PATH")
    parser.add_argument("--data", help="shard directory (default: the run's data.path)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--out", help="write the metrics JSON here")
    parser.add_argument("--batch-size", type=int, default=None)
    args = parser.parse_args(argv)

    from accelerate import Accelerator

    from vkd_dist.data.schema import read_dataset

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model, cfg, tokenizer = load_exported(args.run, args.checkpoint, device=accelerator.device)
    if args.batch_size:
        cfg.data.eval_batch_size = args.batch_size
    info = read_dataset(args.data or cfg.data.path)
    report = evaluate(model, cfg, info, args.split, tokenizer, accelerator)
    report.update(run=str(args.run), checkpoint=args.checkpoint, data=str(info.root))
    if accelerator.is_main_process:
        print(format_table(report))
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
