"""The loop's periodic work. Each action decides for itself when it runs (every N steps, at the last step, on
an agreed stop); the loop only asks `due` and calls it. Then `finish` exports and tests the trained model.

LogTerms     train/ scalars and a console line          every logging.log_every steps
Validate     the validation split; best/ by train.select_metric   every train.eval_every steps
Save         a resumable checkpoint (and on a stop)     every train.ckpt_every steps
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

from accelerate.utils import gather_object

from vkd_dist import checkpoint, rank_buffers, weights
from vkd_dist.commands import command, shown_path
from vkd_dist.data.tokens import remove_token_tables
from vkd_dist.distributed import param_digests
from vkd_dist.evaluate import Interrupted, evaluate
from vkd_dist.metrics import format_table, is_better
from vkd_dist.run import Run, TrainResult
from vkd_dist.stop import StopRequest


@dataclass
class Tick:
    """What the actions see after a step."""

    step: int
    final: bool  # the run's last step
    stopping: bool  # every rank agreed to stop (preemption): checkpoint now


class Periodic:
    every: int
    on_stop = True  # runs when a stop lands on its step; False: deferred to the resumed attempt (after the save)

    def __init__(self, run: Run, result: TrainResult):
        self.run, self.result = run, result

    def due(self, tick: Tick) -> bool:
        return tick.step % self.every == 0 or tick.final

    def __call__(self, tick: Tick) -> None:
        raise NotImplementedError


class LogTerms(Periodic):
    """A train line: each loss term's mean over the steps since the last line (run.window), the same values to
    TensorBoard. Says once, at the start, what the figures are."""

    def __init__(self, run: Run, result: TrainResult):
        super().__init__(run, result)
        self.every = run.cfg.logging.log_every
        run.log.info(f"train lines every {self.every} steps: loss terms and grad_norm are means over those steps; "
                     f"bce and prior_bce are summed over a study's {len(run.info.labels)} labels and averaged over "
                     "studies (nats per study); samples_per_s and data_wait_frac over the same steps")

    def __call__(self, tick: Tick) -> None:
        run = self.run
        terms = run.window.means()
        if not terms:  # no step since the last line (a deferred action's tick)
            return
        run.log.advance(0, loss=terms["loss"])
        scalars = {**terms, "lr": run.optimizer.param_groups[0]["lr"], **run.meter.summary(),
                   "skipped_samples": sum(run.skipped_by_worker.values())}
        run.log.scalars(tick.step, scalars, "train/")
        run.log.info(f"step {tick.step:>6}/{run.cfg.train.max_steps} "
                     + " ".join(f"{k} {v:.4g}" for k, v in scalars.items()))


class Validate(Periodic):
    """Evaluates the validation split; exports best/ when train.select_metric improves over the same label set.
    A stop on its step checkpoints first and leaves it to the resumed attempt (TrainState.deferred)."""

    on_stop = False

    def __init__(self, run: Run, result: TrainResult):
        super().__init__(run, result)
        self.every = run.cfg.train.eval_every
        self.metric = run.cfg.train.select_metric
        self.labels = run.info.scorable_labels(run.cfg.data.val_split)  # like with like: the same label set

    def __call__(self, tick: Tick) -> None:
        run, cfg = self.run, self.run.cfg
        preds: list = []
        run.sync_buffers()  # one model on every rank: what is scored is what is exported
        report = evaluate(run.model, cfg, run.info, cfg.data.val_split, run.tokenizer, run.accelerator,
                          cfg.train.eval_max_batches, checkpoint_name=f"step-{tick.step:08d}", predictions=preds)
        run.model.train()
        self.result.val = report
        run.log.evaluation(tick.step, report, preds[0], "val")
        value, state = report.get(self.metric), run.state
        shown = f"{value:.4f}" if isinstance(value, float) else value  # TensorBoard and best/meta.json keep every digit
        run.log.info(f"step {tick.step:>6} val {self.metric} {shown} over {len(report['macro_labels'])} labels")
        if report["macro_labels"] == self.labels and is_better(self.metric, value, state.best_value):
            state.best_value = value
            weights.export_image_model(run.accelerator, run.model, run.dir.export_dir("best"),
                                          {"step": tick.step, "val": report, "objective": cfg.objective.name,
                                           "select_metric": self.metric, "labels": list(run.info.labels)})


class Save(Periodic):
    def __init__(self, run: Run, result: TrainResult):
        super().__init__(run, result)
        self.every = run.cfg.train.ckpt_every

    def due(self, tick: Tick) -> bool:
        return super().due(tick) or tick.stopping

    def __call__(self, tick: Tick) -> None:
        run = self.run
        # A stop where an uninterrupted run syncs no buffers (no validation, no regular checkpoint at this step):
        # the checkpoint holds the synced model and each rank's own buffers, which the rank keeps.
        own = (rank_buffers.own(run.accelerator, run.model)
               if tick.stopping and not super().due(tick) and "Validate" not in run.state.deferred
               and run.accelerator.num_processes > 1 and run.synced_step != tick.step else None)
        synced_before = run.synced_step
        run.sync_buffers()
        run.state.data_offsets = gather_object([getattr(run.stream, "offsets", None)])  # collective: every rank's
        run.state.data_reads = gather_object([getattr(run.stream, "reads", None)])
        layout = getattr(run.stream, "layout", None)
        run.state.data_layout = layout(run.state.epoch).to_dict() if layout is not None else None
        if run.ledger is not None:
            run.ledger.flush()  # the rows of every step the checkpoint holds are on disk before it is
        rank = run.accelerator.process_index
        path = checkpoint.save(run.accelerator, run.run_dir, tick.step, vars(run.state), run.cfg.train.keep_last,
                               also=(lambda ckpt: rank_buffers.write(ckpt, rank, own)) if own is not None else None)
        if own is not None:  # training goes on (or resumes) from each rank's own buffers, as without the stop
            rank_buffers.put_back(run.accelerator, run.model, own)
            run.synced_step = synced_before
        self.result.checkpoints.append(str(path))


def periodic_actions(run: Run, result: TrainResult) -> list[Periodic]:
    return [LogTerms(run, result), Validate(run, result), Save(run, result)]


def run_deferred(run: Run, actions: list[Periodic]) -> None:
    """What a stop deferred past its checkpoint (a validation), run first by the resumed attempt."""
    for action in actions:
        if type(action).__name__ in run.state.deferred:
            action(Tick(run.state.step, final=False, stopping=False))
    run.state.deferred = []


def finish(run: Run, result: TrainResult, stop: Optional[StopRequest] = None) -> None:
    """After the last step: export final/ (refusing ranks that disagree) and evaluate it on the test split. A stop
    agreed on during it (the last step's checkpoint is on disk) ends it with result.preempted: the requeued attempt
    resumes at the last step and finishes."""
    cfg, step = run.cfg, run.state.step
    stopping = (lambda: stop.agreed(run.accelerator)) if stop is not None else None
    run.sync_buffers()
    digests = param_digests(run.accelerator, run.model)  # every rank must end with the same model
    weights.export_image_model(run.accelerator, run.model, run.dir.export_dir("final"),
                                  {"step": step, "objective": cfg.objective.name, "param_digests": digests,
                                   "labels": list(run.info.labels)})
    if len(set(digests)) > 1:
        raise RuntimeError(f"ranks ended training with different parameters or buffers (digests {digests}); "
                           "see final/meta.json")
    if not cfg.data.keep_token_table and run.accelerator.is_main_process:  # finished: no resume will need it
        remove_token_tables(run.dir.tokens_dir, run.log.info)
    if not cfg.train.test_at_end:
        return
    preds: list = []
    try:
        if stopping is not None and stopping():
            raise Interrupted("before the test split")
        result.test = evaluate(run.model, cfg, run.info, cfg.data.test_split, run.tokenizer, run.accelerator,
                               checkpoint_name="final", predictions=preds, interrupt=stopping)
    except Interrupted as exc:
        result.preempted = True
        run.log.info(f"stop requested during finish ({exc}): final/ is exported; the requeued attempt resumes at "
                     f"step {step} and runs the test")
        return
    run.log.evaluation(step, result.test, preds[0], "test")
    summary: dict[str, Optional[float]] = {f"hparam/test_{k}": v for k, v in result.test.items()
                                           if isinstance(v, float)}
    if result.val is not None:
        summary[f"hparam/val_{cfg.train.select_metric}"] = result.val.get(cfg.train.select_metric)
    run.log.hparams({"objective": cfg.objective.name, "lr": cfg.optim.lr, "beta": cfg.objective.beta,
                     "latent_dim": cfg.model.latent_dim, "seed": cfg.train.seed, "max_steps": cfg.train.max_steps},
                    summary)
    if run.accelerator.is_main_process:  # which weights the figures describe: vkd-export matches them by digest
        result.test.update(step=step, weights_digest=weights.digest(weights.load_weights(
            run.dir.export_weights("final"))))
        run.dir.test_metrics_file.write_text(json.dumps(result.test, indent=2))
        run.log.info(f"test split ({cfg.data.test_split}), image-only inference:\n" + format_table(result.test))


def closing_summary(run: Run, result: TrainResult) -> str:
    """The run's last lines: what it wrote where, and the commands to run next (spelled to run as printed)."""
    cfg, run_dir = run.cfg, run.dir
    shown = shown_path(run_dir.path)
    best_meta = run_dir.export_meta("best")
    best_step = json.loads(best_meta.read_text()).get("step") if best_meta.is_file() else None
    best = (f"the best val {cfg.train.select_metric} ({run.state.best_value:.4f}) at step {best_step}"
            if best_step is not None and isinstance(run.state.best_value, float) else "not written (no validation)")
    test = result.test
    scored = (f"test split of final/ (step {result.step}): macro AUROC {test['macro_auroc']:.4f} "
              f"[{test['macro_auroc_ci'][0]:.3f}, {test['macro_auroc_ci'][1]:.3f}]"
              if test and test.get("macro_auroc_ci") else "not written (train.test_at_end=false)" if not test
              else f"test split of final/ (step {result.step})")
    model = f"{shown}-model"
    return "\n".join([
        f"finished: step {result.step} of {cfg.train.max_steps}; run directory {shown}",
        f"  best/               image-only model, {best}",
        f"  final/              image-only model at step {result.step}",
        f"  test_metrics.json   {scored}",
        *([f"  tensorboard/        {command('tensorboard', '--logdir', f'{shown}/tensorboard')}"]
          if cfg.logging.tensorboard else []),
        "next:",
        f"  {command('vkd-export', shown, '--out', model)}",
        "      (exports the checkpoint test_metrics.json scored, with its metrics in the model card)",
        f"  {command('vkd-predict', '--model', model, '--out', 'predictions.csv')} YOUR_IMAGES_OR_FOLDERS",
        f"  {command('vkd-eval', '--run', shown, '--checkpoint', 'best', '--plots', f'{shown}/plots')}",
    ])
