"""Training throughput stage by stage, against ceilings and a peer, on the same shards in one run.

    python benchmarks/throughput.py --json bench.json                       # default config, synthetic corpus
    python benchmarks/throughput.py --config F --data DIR --device cuda --json bench.json
    python benchmarks/throughput.py --quick --json q.json                   # tiny sizes (the smoke test)
    python benchmarks/throughput.py --only decode,pipeline,open_clip        # a subset
    python -m benchmarks --quick                                            # the same, as a module

Parts (`--only` names), each a function returning a dict, assembled into one JSON object:
  decode      the raw ceiling: read the shard tars + decode JPEG to uint8 grayscale, one core
  pipeline    our training stream (decode, tokenise, batch; the augmentation runs batch-wise on the device,
              in the step): in-process (one worker, one thread) and with data.num_workers worker processes;
              plus a per-sample cost breakdown, including the device augmentation
  open_clip   the peer: open_clip_train.data.get_wds_dataset on the same shards, with the same tokenizer
              (padding to max_text_len) and equivalent transforms in its workers, as open_clip is used
              (affine + brightness/contrast, grayscale uint8); and without the augmentation (the same work
              as our workers)
  model_step  device augmentation + forward + backward + clip + AdamW on batches already in memory: a bare
              PyTorch loop with the configured model, objective and optimizer, nothing of the trainer (also
              "the bare loop")
  trainer     the real trainer (vkd_dist.train.train) fed the same in-memory batches: its step against the
              bare loop; samples/s read from its TensorBoard, warm-up window excluded
  end_to_end  the real trainer with its real loader: samples/s and data-wait fraction
  mfu         FLOPs per sample (torch.utils.flop_counter, one fwd+bwd) x samples/s / dense matmul rate
              measured on the same device in this run
  frozen_text the model step with a BERT-base-sized live text encoder (random init, seq max_text_len) against
              the same step given precomputed text features (VKDModel.posterior(text_features=...))
  profile     torch.profiler over the benchmark's own step split into components (image/text encoder fwd/bwd,
              heads+loss, clip, optimizer): wall / busy / host ms, FLOPs and MFU per component, the Chrome
              trace next to --json
  scaling     1 vs 2 processes (OMP_NUM_THREADS=1 each, torchrun, in-memory batches): weak-scaling
              efficiency; DDP vs DeepSpeed ZeRO-2 vs ZeRO-3 step time and peak memory per rank
Where each part lives: benchmarks/data.py (decode, pipeline, open_clip), model.py (model_step, trainer,
end_to_end, mfu), text.py (frozen_text), step_profile.py (profile), scaling.py; report.py: ratios and table.
--quick runs configs/tiny.yaml, the tests' tiny model (tests/conftest.py), on a tiny synthetic corpus.

Every figure is a rate measured in this run; ratios are taken between figures of the same run, so that a
shared, noisy machine still gives comparable numbers. Timing parts run `--repeat` times, interleaved, best
kept. On CUDA (`--device cuda`) the model parts use bf16 autocast, channels_last and torch.compile
(`--no-compile` to skip).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a file: import the package from the repository, not this folder
    sys.path[0] = str(Path(__file__).resolve().parents[1])

PARTS = ("decode", "pipeline", "open_clip", "model_step", "trainer", "end_to_end", "mfu", "frozen_text", "profile",
         "scaling")


def measures() -> dict:
    """Part name -> measure(b) -> dict (imported after CUDA_VISIBLE_DEVICES is set)."""
    from benchmarks import data, model, scaling, step_profile, text

    return {"decode": data.measure_decode, "pipeline": data.measure_pipeline, "open_clip": data.measure_open_clip,
            "model_step": model.measure_model_step, "trainer": model.measure_trainer,
            "end_to_end": model.measure_end_to_end, "mfu": model.measure_mfu,
            "frozen_text": text.measure_frozen_text, "profile": step_profile.measure_profile,
            "scaling": scaling.measure_scaling}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--config", help="trainer YAML (default: configs/default.yaml)")
    ap.add_argument("--data", help="shard directory with dataset.json (default: the config's synthetic corpus)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--json", help="write the result here")
    ap.add_argument("--only", help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--quick", action="store_true", help="tiny corpus and model (seconds; the smoke test)")
    ap.add_argument("--repeat", type=int, default=None, help="best of this many interleaved runs (default 2; quick 1)")
    ap.add_argument("--no-compile", action="store_true", help="CUDA: skip torch.compile")
    ap.add_argument("--peak-tflops", type=float, help="CUDA: dense bf16 peak TFLOP/s for MFU (default: the "
                    "datasheet figure of the device, benchmarks/profile_tools.py PEAK_BF16)")
    ap.add_argument("--profile-compile-split", action="store_true", help="profile part, CUDA: compile the image "
                    "and text encoders of the split step too (default: the split step is eager)")
    ap.add_argument("--scaling-timeout", type=int, default=400, help="seconds per scaling launch")
    ap.add_argument("--threads", type=int, help="torch intra-op threads of this process (default: torch's)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (runs, tokenizer)")
    ap.add_argument("overrides", nargs="*", help="config key=value overrides (after --quick's)")
    args = ap.parse_args(argv)
    args.parts = PARTS if not args.only else tuple(p.strip() for p in args.only.split(",") if p.strip())
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        ap.error(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
    args.repeat = args.repeat or (1 if args.quick else 2)
    return args


def run_parts(b, res: dict, json_path: str | None) -> None:
    """Each part in turn into `res`; a failing part is recorded in res["errors"] and the others still run."""
    from benchmarks.report import write_json

    table = measures()
    for part in b.args.parts:
        t0 = time.perf_counter()
        try:
            res.update(table[part](b))
        except Exception as exc:  # one failure must not lose a whole run
            traceback.print_exc()
            res.setdefault("errors", {})[part] = f"{type(exc).__name__}: {exc}"[:2000]
        res["seconds"][part] = round(time.perf_counter() - t0, 1)
        print(f"[throughput] {part}: {res['seconds'][part]} s", file=sys.stderr, flush=True)
        if json_path:  # what is done so far survives a run that is killed later
            write_json(json_path, res)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch  # (after CUDA_VISIBLE_DEVICES)

    from benchmarks.bench import setup
    from benchmarks.profile_tools import datasheet_peak
    from benchmarks.report import clean, machine, ratios, table, write_json

    if args.threads:
        torch.set_num_threads(args.threads)
    workdir = Path(tempfile.mkdtemp(prefix="vkd-bench-throughput-"))
    t_start = time.perf_counter()
    overrides = list(args.overrides)
    try:
        b = setup(args, workdir)
        cfg = b.cfg
        res: dict = {"machine": machine(), "device": args.device, "compile": b.compile, "quick": args.quick,
                     "repeat": args.repeat, "config": args.config_source, "overrides": overrides,
                     "model": {"image_encoder": cfg.model.image_encoder, "text_encoder": cfg.model.text_encoder,
                               "text_config": cfg.model.text_config},
                     "data": str(b.info.root), "batch_size": cfg.data.batch_size, "image_size": cfg.data.image_size,
                     "max_text_len": cfg.data.max_text_len, "parts": list(args.parts), "seconds": {}}
        if b.cuda:  # MFU against the datasheet peak too (ratios: *_vs_datasheet_peak)
            res["peak_flop_s"], res["peak_source"] = datasheet_peak(torch.cuda.get_device_name(), args.peak_tflops)
        run_parts(b, res, args.json)
        res["ratios"] = ratios(res)
        res["seconds"]["total"] = round(time.perf_counter() - t_start, 1)
    finally:
        if args.keep:
            print(f"[throughput] work directory kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    res = clean(res)
    print(json.dumps(res, indent=2))
    print()
    print(table(res))
    if args.json:
        write_json(args.json, res)
    if res.get("errors"):
        print(f"[throughput] failed parts: {', '.join(res['errors'])}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
