"""The `scaling` part: 1 vs 2 processes, one thread each (torchrun, in-memory batches): weak-scaling efficiency;
DDP vs DeepSpeed ZeRO-2 vs ZeRO-3 step time and peak memory per rank."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

from benchmarks._trainer_runs import trainer_overrides
from benchmarks.bench import REPO, Bench
from vkd_dist.fileio import free_port


def _launch(b: Bench, name: str, nproc: int, stage: int | None, steps: int, log_every: int) -> dict:
    """One torchrun launch of benchmarks/_trainer_runs.py: its figures, or its error."""
    res_dir = b.workdir / f"scaling-{name}"
    overrides = b.run_overrides() + ["data.num_workers=0", "logging.progress=false"]
    overrides += trainer_overrides(res_dir / "run", steps, log_every, threads=1)  # as OMP_NUM_THREADS below
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"))
    env.pop("ACCELERATE_USE_DEEPSPEED", None)
    if stage is not None:
        env.update(ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_ZERO_STAGE=str(stage))
    script = ["-m", "benchmarks._trainer_runs", "--out", str(res_dir), "--in-memory", "4", "--config", b.args.config]
    start = time.perf_counter()
    for _ in range(2):  # one retry: a gloo/DeepSpeed start-up race on a loaded machine is not a figure
        shutil.rmtree(res_dir / "run", ignore_errors=True)  # a new run each time: a used run_dir is refused
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                    "--master_port", str(free_port())]
        proc = subprocess.run(torchrun + script + overrides, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=b.args.scaling_timeout)
        if proc.returncode == 0:
            break
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        text = proc.stderr or proc.stdout
        errors = [line for line in text.splitlines() if "Error" in line or "error:" in line][-8:]
        return {"error": "\n".join(errors) + "\n...\n" + text[-800:], "wall_s": wall}
    ranks = [json.loads((res_dir / f"rank{r}.json").read_text()) for r in range(nproc)]
    sps = ranks[0]["samples_per_s"]
    out = {"processes": nproc, "zero_stage": stage, "samples_s": sps, "step_ms": 1e3 * b.batch * nproc / sps,
           "data_wait_frac": ranks[0]["data_wait_frac"], "peak_rss_mb_per_rank": [r["peak_rss_mb"] for r in ranks]}
    if "peak_cuda_mb" in ranks[0]:
        out["peak_cuda_mb_per_rank"] = [r["peak_cuda_mb"] for r in ranks]
    return {**out, "wall_s": wall}


def measure_scaling(b: Bench) -> dict:
    steps, log_every = (6, 2) if b.quick else (16, 4)
    runs = [("1proc", 1, None), ("ddp_2proc", 2, None)]
    if not b.quick:
        runs += [("zero2_2proc", 2, 2), ("zero3_2proc", 2, 3)]
    return {"scaling": {name: _launch(b, name, nproc, stage, steps, log_every) for name, nproc, stage in runs}}
