"""A model that leaves its run: `vkd-export RUN [--checkpoint best|final|last|PATH] --out DIR` writes the run's
image path as a self-contained model directory (vkd_dist/model_dir.py says what it holds), loaded by
`vkd_dist.classifier.VKDImageClassifier.from_pretrained(DIR)`. The model card carries the test metrics measured
for the exported weights (matched by their digest), and says how to get them where there are none.
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from vkd_dist import RawDefaultsHelpFormatter
from vkd_dist.model_dir import CARD_FILE, CONFIG_FILE, FORMAT, FORMAT_VERSION, WEIGHTS_FILE

if TYPE_CHECKING:  # the model stack is imported where used: `vkd-export --help` answers before torch loads
    from vkd_dist.config import Config


# -- export from a run -------------------------------------------------------------------------------------
def classifier_config(cfg: Config, labels: Sequence[str], dataset_meta: Optional[dict], provenance: dict) -> dict:
    """config.json for a run's image path. `dataset_meta` (its dataset.json) gives the converters' image size and
    resize mode; without it the model's input size and `crop` are assumed, and the file says so."""
    m = cfg.model
    from vkd_dist.models.encoders import ImageEncoder

    probe = ImageEncoder(m.image_encoder, cfg.data.image_size, m.in_chans, None, m.image_encoder_kwargs)
    params = (dataset_meta or {}).get("params", {})
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "labels": list(labels),
        "architecture": {"image_encoder": m.image_encoder, "image_encoder_kwargs": dict(m.image_encoder_kwargs),
                         "in_chans": m.in_chans, "latent_dim": m.latent_dim, "hidden_dim": m.hidden_dim,
                         "dropout": m.dropout, "image_head": m.image_head},
        "preprocessing": {
            "source_size": int(params.get("image_size", cfg.data.image_size)),
            "resize": params.get("resize", "crop"),
            "image_size": cfg.data.image_size,
            "channels": m.in_chans,
            "normalisation": {"mean": float(probe.mean.item()), "std": float(probe.std.item()),
                              "scale": "pixel values 0..255"},
            "from_dataset_json": dataset_meta is not None,
            "steps": "load_image(source_size, resize) [16-bit/DICOM windowed to 8 bits] -> bilinear to image_size "
                     "-> (x - mean) / std; grayscale",
        },
        "inference": {"mode": m.inference, "num_samples": m.num_samples if m.inference == "mc" else 16},
        "provenance": provenance,
    }


def export_run(run_dir: str | Path, out_dir: str | Path, which: str = "best",
               metrics_path: Optional[str | Path] = None) -> Path:
    """Write RUN's image model (checkpoint `which`) as a self-contained directory; returns it."""
    from vkd_dist import weights
    from vkd_dist.classifier import VKDImageClassifier, load_exactly
    from vkd_dist.objectives import TEXT, get_objective
    from vkd_dist.run_dir import RunDir

    run_dir = Path(run_dir)
    run = RunDir(run_dir)
    cfg = run.config()
    if get_objective(cfg.objective.name).inference == TEXT:
        raise ValueError(f"{run_dir} is a {cfg.objective.name} run: it reads reports and has no image model to deploy")
    labels = run.labels()
    weights_path = weights.find_weights(run_dir, which)
    dataset_json = Path(cfg.data.path) / "dataset.json"
    dataset_meta = json.loads(dataset_json.read_text()) if dataset_json.is_file() else None
    provenance = {"run": str(run_dir.resolve()), "checkpoint": which, "weights": str(weights_path),
                  "step": weights.weights_step(weights_path), "objective": cfg.objective.name, "data": cfg.data.path,
                  "source": (dataset_meta or {}).get("source"), "eval_policy": (dataset_meta or {}).get("eval_policy")}
    config = classifier_config(cfg, labels, dataset_meta, provenance)
    config["ood"] = _ood_reference(cfg) if dataset_meta is not None else None
    model = VKDImageClassifier(config)
    state = weights.load_weights(weights_path)
    deploy = {k: v for k, v in state.items() if k in model.state_dict()}
    load_exactly(model, deploy, weights_path)
    digest = weights.digest(deploy)
    metrics = _metrics_for(run_dir, which, digest, metrics_path)
    provenance.update(weights_digest=digest, test_metrics=_metrics_summary(metrics))
    card = model_card(config, dataset_meta, metrics, "" if metrics else _unscored_advice(run_dir, which))
    return model.save_pretrained(out_dir, card)


def _ood_reference(cfg: Config) -> Optional[dict]:
    """The image statistics of the run's validation images, which vkd-predict compares its inputs with
    (vkd_dist/ood.py); None when the shards cannot be read."""
    from vkd_dist import ood
    from vkd_dist.data.schema import read_dataset

    try:
        info = read_dataset(cfg.data.path)
        images = ood.split_images(info.shards(cfg.data.val_split), cfg.data.image_size)
        return ood.reference(images, f"{cfg.data.val_split} split of {info.root}")
    except (OSError, ValueError, KeyError, tarfile.TarError):
        return None


def default_checkpoint(run_dir: str | Path) -> tuple[str, str]:
    """vkd-export's checkpoint when none is named, and why: the export RUN/test_metrics.json scored (best/ when
    it holds the same weights as final/), else best/."""
    from vkd_dist.weights import scored_export

    scored = scored_export(run_dir)
    if scored is not None:
        return scored, f"{scored}/: the weights RUN/test_metrics.json scored"
    return "best", "best/: RUN/test_metrics.json scored neither best/ nor final/ (or is absent)"


def _unscored_advice(run_dir: Path, which: str) -> str:
    """What to run to get metrics for an export that has none: score it with vkd-eval, or export the scored one."""
    from vkd_dist.commands import command, shown_path
    from vkd_dist.weights import scored_export

    run, scored = shown_path(run_dir), scored_export(run_dir)
    metrics = f"{run}/{which}-test-metrics.json" if "/" not in which else "metrics.json"
    score = command("vkd-eval", "--run", run, "--checkpoint", which, "--out", metrics)
    export = command("vkd-export", run, "--checkpoint", which, "--metrics", metrics, "--out", "DIR")
    lines = [f"Score these weights: `{score}`, then export with `{export}`."]
    if scored is not None and scored != which:
        lines.append(f"RUN/test_metrics.json scored {scored}/: "
                     f"`{command('vkd-export', run, '--checkpoint', scored, '--out', 'DIR')}` exports that model with "
                     "its metrics.")
    return " ".join(lines)


def _metrics_for(run_dir: Path, which: str, digest: str, metrics_path) -> Optional[dict]:
    """The metrics that describe the exported weights (`digest`): --metrics FILE (refused when it records other
    weights), or RUN/test_metrics.json when it scored these weights (by its digest; by the checkpoint's name for
    a file written before metrics recorded one)."""
    if metrics_path:
        metrics = json.loads(Path(metrics_path).read_text())
        if "per_label" not in metrics:
            raise ValueError(f"--metrics {metrics_path}: not a vkd-eval metrics JSON (no 'per_label')")
        if metrics.get("weights_digest") not in (None, digest):
            raise ValueError(f"--metrics {metrics_path}: scored other weights (checkpoint {metrics.get('checkpoint')}, "
                             f"step {metrics.get('step')}) than the exported {which} ({digest[:19]}...)")
        return metrics
    from vkd_dist.run_dir import RunDir

    metrics = RunDir(run_dir).test_metrics()
    if not metrics or "per_label" not in metrics:  # files from before metrics had CIs are not used for the card
        return None
    recorded = metrics.get("weights_digest")
    return metrics if (recorded == digest if recorded else metrics.get("checkpoint") == which) else None


def _metrics_summary(metrics: Optional[dict]) -> Optional[dict]:
    if not metrics:
        return None
    keys = ("split", "checkpoint", "step", "weights_digest", "macro_auroc", "macro_auroc_ci", "macro_labels",
            "macro_auprc", "macro_ece", "num_samples", "num_patients", "eval_policy")
    return {k: metrics.get(k) for k in keys}


def model_card(config: dict, dataset_meta: Optional[dict], metrics: Optional[dict], unscored: str = "") -> str:
    from vkd_dist.metrics import format_table

    prov, pre, arch = config["provenance"], config["preprocessing"], config["architecture"]
    splits = (dataset_meta or {}).get("splits", {})
    split_line = ", ".join(f"{k} {v['num_samples']}" for k, v in splits.items()) or "unknown (dataset.json not found)"
    lines = [
        f"# VKD image classifier ({', '.join(config['labels'][:3])}{', ...' if len(config['labels']) > 3 else ''})",
        "",
        "Chest X-ray multi-label classifier trained with vkd_dist (variational knowledge distillation, van Sonsbeek "
        "et al., IPMI 2021, or one of its baselines). It reads the image only; the report was used in training.",
        "",
        "## Model",
        f"- objective: `{prov['objective']}`; checkpoint `{prov['checkpoint']}` (step {prov['step']})",
        f"- image encoder: timm `{arch['image_encoder']}`"
        + (f" {arch['image_encoder_kwargs']}" if arch["image_encoder_kwargs"] else "")
        + f", latent {arch['latent_dim']}, image head {arch.get('image_head', 'shared')}",
        f"- labels ({len(config['labels'])}): {', '.join(config['labels'])}",
        f"- inference: `{config['inference']['mode']}`",
        "",
        "## Data",
        f"- source: {prov['source']} at `{prov['data']}`; splits: {split_line}",
        f"- evaluation policy: {prov['eval_policy']}",
        "",
        "## Preprocessing",
        f"- {pre['steps']}",
        f"- source size {pre['source_size']} px ({pre['resize']}), model input {pre['image_size']} px, "
        f"mean {pre['normalisation']['mean']:.2f}, std {pre['normalisation']['std']:.2f} on 0..255",
        "",
        "## Metrics",
    ]
    if metrics:
        lines += ["", f"Measured for these weights: {metrics.get('checkpoint')} at step {metrics.get('step', '?')}"
                  + (f", weights digest `{metrics['weights_digest']}`." if metrics.get("weights_digest") else "."),
                  "", "```", format_table(metrics), "```", "",
                  "95 % CIs: percentile bootstrap over patients. Macro figures average the labels listed in "
                  "`macro_labels` (those with both classes on the split)."]
    else:
        lines += [f"Not evaluated for these weights. {unscored}".rstrip()]
    lines += [
        "",
        "## Intended use and limits",
        "- Research on chest radiograph classification. Not a medical device; not for diagnosis or triage.",
        "- Valid only for images like its training data (views, population, scanner, preprocessing); performance "
        "on other sites is unknown until measured there.",
        "- Labels mined from reports are noisy; metrics inherit that noise.",
        "- Probabilities may be miscalibrated on new data (see ECE); recalibrate before using thresholds.",
        "",
        "Load: `from vkd_dist.classifier import VKDImageClassifier; VKDImageClassifier.from_pretrained(DIR)`; "
        "predict files: `vkd-predict --model DIR PATH...`.",
        "",
    ]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="vkd-export", description=__doc__,
                                     formatter_class=RawDefaultsHelpFormatter)
    parser.add_argument("run", help="run directory of a training run")
    parser.add_argument("--checkpoint", default=None,
                        help="best | last | final | PATH (as vkd-eval); default: the export RUN/test_metrics.json "
                             "scored (best when it equals final), else best")
    parser.add_argument("--out", required=True, help="model directory to write")
    parser.add_argument("--metrics", help="a vkd-eval JSON for the model card (default: RUN/test_metrics.json "
                                          "when it was computed from this checkpoint)")
    args = parser.parse_args(argv)
    from vkd_dist.evaluate import check_checkpoint, check_run_dir

    try:
        which, why = (args.checkpoint, "") if args.checkpoint else default_checkpoint(check_run_dir(args.run, "RUN"))
        check_checkpoint(check_run_dir(args.run, "RUN"), which)  # vkd-eval's checks and messages
        out = export_run(args.run, args.out, which, args.metrics)
    except (FileNotFoundError, ValueError) as exc:
        print(f"vkd-export: error: {exc}", file=sys.stderr)
        return 2
    metrics = json.loads((out / CONFIG_FILE).read_text())["provenance"]["test_metrics"]
    print(f"wrote {out} ({CONFIG_FILE}, {WEIGHTS_FILE}, {CARD_FILE}) from {which}" + (f" ({why})" if why else "")
          + (f"; model card: macro AUROC {metrics['macro_auroc']:.4f} on {metrics['split']}" if metrics
             else f"; no metrics for these weights: see {out / CARD_FILE}, Metrics"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
