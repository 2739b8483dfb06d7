"""The optimizer (AdamW with the fastest kernel the device has) and the learning-rate schedule."""

from __future__ import annotations

import math
from typing import Optional

import torch

from vkd_dist.config import Config


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


def build_optimizer(model: torch.nn.Module, cfg: Config, device: torch.device | str | None = None,
               implementation: str | None = None) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters, no weight decay on biases, norms, position embeddings and the
    class token. `device`: where the parameters will live when it steps (default: where they are now);
    `implementation`: "fused" | "foreach" | "single_tensor" (default: adamw_implementation(device)).

    The state_dict format is the same for every implementation (the flags only are recorded in its
    param_groups), so checkpoints resume across them; a loaded state_dict's flags are replaced by this
    optimizer's own, so a run resumed from an older (or another machine's) checkpoint keeps its kernel."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "pos_embed" in name or "cls_token" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if device is None:
        device = next((p.device for p in decay + no_decay), torch.device("cpu"))
    implementation = implementation or adamw_implementation(device)
    flags: dict[str, Optional[bool]] = {"fused": implementation == "fused" or None,
                                        "foreach": implementation == "foreach" or None}
    if implementation == "single_tensor":
        flags["foreach"] = False
    elif implementation not in ("fused", "foreach"):
        raise ValueError(f"AdamW implementation {implementation!r} (allowed: fused, foreach, single_tensor)")
    betas = (cfg.optim.betas[0], cfg.optim.betas[1])
    optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=betas, fused=flags["fused"],
                                  foreach=flags["foreach"])

    def keep_implementation(opt, state_dict):  # torch would take "fused"/"foreach" from the saved groups
        groups = [{**g, **flags} for g in state_dict["param_groups"]]
        return {**state_dict, "param_groups": groups}

    optimizer.register_load_state_dict_pre_hook(keep_implementation)
    return optimizer


def build_optimization(model: torch.nn.Module, cfg: Config, device: torch.device | str | None = None):
    """The training run's optimizer (`build_optimizer`) and its learning-rate schedule (a function of the step:
    the multiplier of optim.lr)."""
    schedule = lr_lambda(cfg.optim.warmup_steps, cfg.train.max_steps, cfg.optim.min_lr_ratio)
    return build_optimizer(model, cfg, device), schedule


def lr_lambda(warmup: int, total: int, min_ratio: float):
    """Linear warm-up then cosine decay to min_ratio of the peak."""

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn
