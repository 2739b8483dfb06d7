"""What a trained VKD model's two paths do, on a split: is the report used, and does the image path follow it?

    python -m benchmarks.vkd_diagnostics RUN [RUN ...] [--split val] [--checkpoint latest] [--out diag.json]

For each run whose objective trains both paths (vkd), from its newest verified checkpoint (the full model: the
exports keep only the image path) on every sample of the split, under the data set's evaluation policy:

  image AUROC     macro AUROC of the image path's classifier on the prior mean mu_p(x) (with model.image_head=
                  separate, its own classifier on [mu_p, image features]): the deployed, image-only path
  report AUROC    the report path's classifier on the posterior mean mu_q(t) (or mu_q(x, t)): the teacher inside
                  the model
  KL              KL(q || p) in nats per sample, summed over latent dimensions (the objective's term)
  active dims     latent dimensions whose mean KL exceeds 0.05 nats: how much of the code carries report
                  information the prior does not already have (0: the posterior collapsed onto the prior)
  sigma_q/sigma_p the posterior's and the prior's mean standard deviation
  R2(mu_p->mu_q)  1 - E|mu_q - mu_p|^2 / E|mu_q - E mu_q|^2: how much of the teacher's code the image path
                  reproduces (1: all of it; 0: no better than the teacher's average code)
  SNR(p)          per latent dimension, Var_x(mu_p) / E_x sigma_p^2: how far the prior's means move between
                  images against its own noise, averaged over dimensions; "dims SNR>1" counts those above 1 (a
                  prior whose sigma_p grew to ~1 while its means barely move trains its image path on noise)
  R2(feats->mu_q) a linear probe: ridge regression from the pooled image features to mu_q, predicted out of
                  fold (5 folds, grouped by patient), 1 - SSE / SST over all dimensions: how much of the
                  teacher's code the image features hold linearly, whatever the prior head learnt

A report AUROC far above the image AUROC with a low R2 means the teacher knows more than the image path learns
from it; a report AUROC near the image AUROC with a KL near 0 means the posterior collapsed onto the prior.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import torch

ACTIVE_NATS = 0.05
PROBE_FOLDS = 5
PROBE_ALPHAS = tuple(10.0 ** k for k in range(-2, 5))  # ridge strengths, chosen inside each training fold


def probe_r2(features: torch.Tensor, target: torch.Tensor, groups: list) -> Optional[float]:
    """1 - SSE / SST of ridge predictions of `target` from `features`, each made by a model fitted without the
    sample's patient (GroupKFold); None with fewer than 2 patients."""
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import GroupKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    folds = min(PROBE_FOLDS, len(set(groups)))
    if folds < 2:
        return None
    x, y = features.double().numpy(), target.double().numpy()
    probe = make_pipeline(StandardScaler(), RidgeCV(alphas=PROBE_ALPHAS))
    pred = cross_val_predict(probe, x, y, groups=groups, cv=GroupKFold(n_splits=folds))
    sst = float(((y - y.mean(0)) ** 2).sum())
    return 1 - float(((y - pred) ** 2).sum()) / sst if sst > 0 else None


def _checkpoint(run_dir: Path, which: str) -> Path:
    from vkd_dist import checkpoint

    path = checkpoint.resolve(run_dir, which)
    if path is None:
        raise FileNotFoundError(f"{run_dir}: no checkpoint to read (the full model lives in checkpoints/step-*)")
    return path


@torch.no_grad()
def diagnose(run_dir: str | Path, split: str = "val", which: str = "latest") -> dict:
    from vkd_dist.build import build_model
    from vkd_dist.data.pipeline import eval_loader
    from vkd_dist.data.schema import read_dataset
    from vkd_dist.data.tokens import load_tokenizer
    from vkd_dist.metrics import Predictions, report
    from vkd_dist.models.vkd import kl_per_dim
    from vkd_dist.objectives import BOTH, get_objective
    from vkd_dist.prepare import tokenizer_dir
    from vkd_dist.run_dir import RunDir
    from vkd_dist.weights import load_weights

    run_dir = Path(run_dir)
    cfg = RunDir(run_dir).config()
    if get_objective(cfg.objective.name).model_mode != BOTH:
        raise ValueError(f"{run_dir}: objective {cfg.objective.name} trains one path; nothing to diagnose")
    ckpt = _checkpoint(run_dir, which)
    info = read_dataset(cfg.data.path)
    tokenizer = load_tokenizer(tokenizer_dir(cfg, run_dir))
    model = build_model(cfg, len(tokenizer), num_labels=len(RunDir(run_dir).labels()))
    model.load_state_dict(load_weights(ckpt / "model.safetensors"))
    model.eval()
    image_parts, report_parts, kl_dims, mu_p, mu_q, var_p, sd_q, img_feats = [], [], [], [], [], [], [], []
    patients: list = []
    for batch in eval_loader(info, split, cfg.data, tokenizer):
        p, feats = model.prior(batch.image)
        q = model.posterior(batch.input_ids, batch.attention_mask, feats, batch.text_features)
        kl_dims.append(kl_per_dim(q, p))
        mu_p.append(p.mu), mu_q.append(q.mu), img_feats.append(feats), patients.extend(batch.patient_ids)
        var_p.append(p.logvar.exp()), sd_q.append((0.5 * q.logvar).exp().mean(-1))
        for parts, logits in ((image_parts, model.classify_image(p.mu, feats)), (report_parts, model.classify(q.mu))):
            parts.append(Predictions(torch.sigmoid(logits).numpy(), batch.targets.numpy(),
                                     batch.target_mask.numpy(), list(batch.keys), list(batch.patient_ids)))
    labels, scorable = RunDir(run_dir).labels(), info.scorable_labels(split)

    def macro(parts: list) -> Optional[float]:
        return report(Predictions.concat(parts, len(labels)), labels, scorable, n_boot=0)["macro_auroc"]

    kl = torch.cat(kl_dims)
    mp, mq, vp = torch.cat(mu_p), torch.cat(mu_q), torch.cat(var_p)
    spread = ((mq - mq.mean(0)) ** 2).sum(-1).mean()
    snr = mp.var(0) / vp.mean(0)  # per latent dimension
    return {"run": str(run_dir), "checkpoint": ckpt.name, "split": split, "objective": cfg.objective.name,
            "beta": cfg.objective.beta, "prior_bce_weight": cfg.objective.prior_bce_weight,
            "posterior": cfg.model.posterior, "image_macro_auroc": macro(image_parts),
            "report_macro_auroc": macro(report_parts), "kl_nats": float(kl.sum(-1).mean()),
            "active_dims": int((kl.mean(0) > ACTIVE_NATS).sum()), "latent_dim": int(kl.shape[1]),
            "sigma_q": float(torch.cat(sd_q).mean()), "sigma_p": float(vp.sqrt().mean()),
            "r2_prior_to_posterior": float(1 - ((mq - mp) ** 2).sum(-1).mean() / spread),
            "prior_snr": float(snr.mean()), "snr_dims": int((snr > 1).sum()), "image_head": cfg.model.image_head,
            "probe_r2_features_to_posterior": probe_r2(torch.cat(img_feats), mq, patients)}


COLUMNS = [("image_macro_auroc", "image AUROC", "{:.3f}"), ("report_macro_auroc", "report AUROC", "{:.3f}"),
           ("kl_nats", "KL (nats)", "{:.2f}"), ("active_dims", "active dims", "{}"), ("sigma_q", "sigma_q", "{:.3f}"),
           ("sigma_p", "sigma_p", "{:.3f}"), ("r2_prior_to_posterior", "R2(mu_p->mu_q)", "{:.2f}"),
           ("prior_snr", "SNR(p)", "{:.2f}"), ("snr_dims", "dims SNR>1", "{}"),
           ("probe_r2_features_to_posterior", "R2(feats->mu_q)", "{:.2f}")]


def table(rows: list[dict]) -> str:
    head = "| run | " + " | ".join(c[1] for c in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 1)]
    for r in rows:
        lines.append(f"| {r['run']} | " + " | ".join(fmt.format(r[k]) if r[k] is not None else "n/a"
                                                      for k, _, fmt in COLUMNS) + " |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run directories of vkd runs")
    ap.add_argument("--split", default="val", help="the split to read (pick settings on val, never on test)")
    ap.add_argument("--checkpoint", default="latest", help="latest, or a step directory name")
    ap.add_argument("--out", help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    try:
        rows = [diagnose(run, args.split, args.checkpoint) for run in args.runs]
    except (FileNotFoundError, ValueError) as exc:
        print(f"vkd_diagnostics: {exc}", file=sys.stderr)
        return 2
    print(table(rows))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
