"""`accelerate launch -m vkd_dist.train [--config F] [key=value ...]` (or `python -m vkd_dist.train`, `vkd-train`).

A sample's way: vkd_dist/run.py builds the run (data, model, objective, optimizer, resume) -> vkd_dist/step.py
takes one optimizer step (batches -> loss terms -> backward -> step) -> vkd_dist/actions.py decide for themselves
whether to log, validate or checkpoint -> after the last step `finish` exports the image-only model and tests it.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Optional

from vkd_dist import RawDefaultsHelpFormatter
from vkd_dist.stop import StopRequest

if TYPE_CHECKING:  # imported where used: `vkd-train --help` answers before torch and accelerate load
    from vkd_dist.config import Config
    from vkd_dist.run import BatchStream, Run, TrainResult

__all__ = ["StopRequest", "main", "train"]


def train(cfg: Config, stop: Optional[StopRequest] = None, stream: Optional[BatchStream] = None) -> TrainResult:
    """Run (or resume) training as configured. SIGTERM/SIGUSR1/SIGUSR2 stop it at the next step boundary with
    a checkpoint (result.preempted); pass `stop` to control that from outside, `stream` to feed other batches
    than the configured split's (see vkd_dist.run.BatchStream)."""
    from vkd_dist.run import build_run

    stop = stop or StopRequest(install=True)
    try:
        return loop(build_run(cfg, stream), stop)
    finally:
        stop.restore()


def loop(run: Run, stop: StopRequest) -> TrainResult:
    from vkd_dist.actions import Tick, closing_summary, finish, periodic_actions, run_deferred
    from vkd_dist.run import TrainResult
    from vkd_dist.step import train_step

    state, max_steps = run.state, run.cfg.train.max_steps
    result = TrainResult(step=state.step, run_dir=run.cfg.run_dir, resumed_from=run.resumed_from)
    actions = periodic_actions(run, result)
    run_deferred(run, actions)  # a validation the last attempt's stop put off
    run.model.train()
    while state.step < max_steps:
        terms, grad_norm = train_step(run)
        run.window.add(terms, grad_norm)
        run.log.advance(1)
        tick = Tick(state.step, final=state.step == max_steps, stopping=stop.agreed(run.accelerator))
        due = [action for action in actions if action.due(tick)]
        if tick.stopping:  # the checkpoint first: what a stop does not need waits for the resumed attempt
            state.deferred = [type(a).__name__ for a in due if not a.on_stop]
            due = [a for a in due if a.on_stop]
        if due:
            run.check_finite()  # nothing non-finite is logged, evaluated or saved
        for action in due:
            action(tick)
        if tick.stopping:
            run.log.info(f"stop requested: checkpointed at step {state.step}; resume with resume=latest")
            result.preempted = True
            break
    result.step = state.step
    if not result.preempted:
        finish(run, result, stop)
    if not result.preempted and run.accelerator.is_main_process:  # finish may itself be stopped
        run.log.info(closing_summary(run, result))
    run.log.close()
    if run.ledger is not None:
        run.ledger.close()
    run.accelerator.wait_for_everyone()
    run.accelerator.end_training()
    return result


def parse_args(argv: Optional[list[str]] = None) -> tuple[Optional[str], list[str]]:
    parser = argparse.ArgumentParser(prog="vkd-train", description=__doc__, formatter_class=RawDefaultsHelpFormatter)
    parser.add_argument("--config", help="YAML config (default: configs/default.yaml)")
    parser.add_argument("overrides", nargs="*",
                        help="key=value overrides, e.g. train.max_steps=100 objective=image_only")
    args = parser.parse_args(argv)
    return args.config, args.overrides


def main(argv: Optional[list[str]] = None) -> int:
    config_path, overrides = parse_args(argv)
    from vkd_dist.config import ConfigError
    from vkd_dist.configure import load_config

    try:
        cfg = load_config(config_path, overrides)
        result = train(cfg)
    except ConfigError as exc:  # also what only the data can tell: e.g. a resume onto other labels
        print(f"vkd-train: config error: {exc}", file=sys.stderr)
        return 2
    return 0 if result.step >= cfg.train.max_steps or result.preempted else 1


if __name__ == "__main__":
    sys.exit(main())
