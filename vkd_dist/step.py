"""One optimizer step: set the learning rate, run grad_accum micro-batches (augment, loss terms, backward),
clip, step. Returns the step's loss terms (averaged over micro-batches, still on the device) and the
gradient norm when it was clipped."""

from __future__ import annotations

import time
from typing import Optional

import torch

from vkd_dist.distributed import mark_text_length_dynamic
from vkd_dist.run import Run


def train_step(run: Run) -> tuple[dict[str, torch.Tensor], Optional[torch.Tensor]]:
    cfg, accelerator, model, optimizer, state = run.cfg, run.accelerator, run.model, run.optimizer, run.state
    accum = cfg.optim.grad_accum
    for group in optimizer.param_groups:  # the schedule is a function of the step: nothing to resume
        group["lr"] = cfg.optim.lr * run.schedule(state.step)
    terms_sum: dict[str, torch.Tensor] = {}
    grad_norm = None
    for micro in range(accum):
        t0 = time.perf_counter()
        state.epoch, state.batch_in_epoch, batch = next(run.batches)
        run.meter.wait += time.perf_counter() - t0
        if run.ledger is not None:
            run.ledger.record(state.epoch, state.step + 1, batch.keys)
        run.skipped_by_worker[batch.worker] = batch.skipped
        batch = run.augment(batch.to(accelerator.device), state.step * accum + micro)
        if cfg.train.compile:
            mark_text_length_dynamic(batch)
        with accelerator.accumulate(model):
            terms = run.objective(model, batch, state.step)
            accelerator.backward(terms["loss"])
            if accelerator.sync_gradients and cfg.optim.grad_clip > 0:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        for k, v in terms.items():
            terms_sum[k] = terms_sum.get(k, 0.0) + v.detach().float() / accum
        run.meter.samples += len(batch) * accelerator.num_processes
    state.step += 1
    state.samples += cfg.data.batch_size * accum * accelerator.num_processes
    run.nonfinite |= ~torch.isfinite(terms_sum["loss"])
    return terms_sum, grad_norm
