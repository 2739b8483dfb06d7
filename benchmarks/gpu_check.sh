#!/usr/bin/env bash
# Every GPU figure of issue 15 in one call, in under 8 minutes of wall time (the step timeouts share a
# deadline, --budget-s, default 460 s), on a machine with the image's own python3 (torch, transformers, timm,
# accelerate there) and no network:
#
#   bash benchmarks/gpu_check.sh --prepare      # here, with network: fill benchmarks/wheels/ (git-ignored)
#   bash benchmarks/gpu_check.sh [--out DIR]    # on the GPU machine (carry benchmarks/wheels); DIR: $OUT, else gpu_check_out/
#   bash benchmarks/gpu_check.sh --dry-run      # on a CPU: every step at tiny sizes, no GPU-only flag (the test)
# Options: --budget-s S (default 460: the steps' shared deadline), --only eager,compiled,scaling (a rerun of
# some; setup and corpus always run), --scaling (run it on fewer than 2 GPUs too).
#
# Steps (each one's failure is reported and the later ones still run):
#   setup     install the carried wheels (benchmarks/wheels/*.whl: what the GPU image lacks, see WHEELS below)
#             into a private --target folder put first on PYTHONPATH; record versions, GPU, fused attention
#   corpus    the 224-px synthetic corpus (vkd-data synthetic; 2000 train samples in 8 shards)
#   eager     benchmarks/throughput.py --no-compile: model_step, mfu, profile, trainer, end_to_end  -> eager.json
#   compiled  mfu, trainer, end_to_end, profile with torch.compile (mfu's model step stands in for model_step;
#             the profile's split components stay eager, its plain step is compiled)         -> compiled.json
#   scaling   only with more than one GPU: 1 vs 2 processes, DDP / ZeRO-2 / ZeRO-3               -> scaling.json
#   summary   benchmarks/gpu_summary.py: one table, before (eager) / after (compiled), against the targets
# The model: configs/recipes/mimic_vitb16_clinicalbert.yaml with a random ViT-B/16 and a random BERT-base-sized
# tiny-bert (the GPU table of docs/performance.md), batch 32, bf16. Output under DIR (at most 8 files, for the device tool):
# gpu_check.log, summary.json, eager.json, eager.trace.json.gz, compiled.json, compiled.trace.json.gz,
# scaling.json.
set -uo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
WHEEL_DIR="$REPO/benchmarks/wheels"
# What the GPU machine's image (python3 3.12 with torch 2.11, transformers 5.17, timm, accelerate, tokenizers,
# tensorboard, numpy, pyyaml, ...; no network) lacks. webdataset (+ braceexpand): the data pipeline. deepspeed
# (+ hjson, pydantic and its dependencies): the ZeRO runs of the scaling step. Versions as constraints.txt / the
# project venv. deepspeed has no wheel on PyPI: --prepare builds its pure-python wheel from the sdist.
WHEELS=(webdataset==1.0.2 braceexpand==0.1.7 hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5
        annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0)
SDIST_WHEELS=(deepspeed==0.19.8)
TEXT_CONFIG='{hidden_size: 768, num_hidden_layers: 12, num_attention_heads: 12, intermediate_size: 3072}'

MODE=gpu OUT_DIR=${OUT:-} BUDGET=460 FORCE_SCALING=0 ONLY=eager,compiled,scaling
while [ $# -gt 0 ]; do
  case "$1" in
    --prepare) MODE=prepare ;;
    --dry-run) MODE=dry ;;
    --out) OUT_DIR=$2; shift ;;
    --budget-s) BUDGET=$2; shift ;;
    --scaling) FORCE_SCALING=1 ;;
    --only) ONLY=$2; shift ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x "$REPO/.venv/bin/python" ]; then PY="$REPO/.venv/bin/python"
else PY=python3; fi

if [ "$MODE" = prepare ]; then
  mkdir -p "$WHEEL_DIR"
  rm -f "$WHEEL_DIR"/*.whl
  # Python 3.12, x86-64 manylinux: the GPU image's interpreter, whatever this machine runs.
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$WHEEL_DIR" "${WHEELS[@]}" || { echo "gpu_check.sh --prepare: pip download failed" >&2; exit 1; }
  "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$WHEEL_DIR" "${SDIST_WHEELS[@]}" \
    || { echo "gpu_check.sh --prepare: building the ${SDIST_WHEELS[*]} wheel failed" >&2; exit 1; }
  size=$(du -sb "$WHEEL_DIR" | cut -f1)
  ls -1 "$WHEEL_DIR"
  echo "benchmarks/wheels: $(ls "$WHEEL_DIR"/*.whl | wc -l) wheels, $((size / 1024)) KiB (the device tool carries 64 MiB in all)"
  [ "$size" -lt $((48 * 1024 * 1024)) ] || { echo "gpu_check.sh --prepare: wheels too large to carry" >&2; exit 1; }
  exit 0
fi

OUT_DIR=${OUT_DIR:-$REPO/gpu_check_out}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/vkd-gpu-check.XXXXXX")
LOG="$OUT_DIR/gpu_check.log"
STEPS="$WORK/steps.tsv"
: > "$LOG"; : > "$STEPS"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)
SUMMARY_RESERVE=20

# step NAME CAP_S CMD...: run CMD (output to the log and the console's tail) under a timeout of
# min(CAP_S, what the deadline leaves); record ok / failed (rc) / timed out / skipped; never stop the script.
step() {
  local name=$1 cap=$2; shift 2
  local left=$((BUDGET - SUMMARY_RESERVE - ($(date +%s) - START)))
  local limit=$(( cap < left ? cap : left ))
  if [ "$limit" -lt 5 ]; then
    echo "[gpu_check] $name: skipped (the ${BUDGET}-s budget is spent)" | tee -a "$LOG"
    printf '%s\tskipped (budget)\t0\n' "$name" >> "$STEPS"; return 0
  fi
  echo "[gpu_check] $name: start (limit ${limit} s) $(date -u +%H:%M:%S)" | tee -a "$LOG"
  if [ "${GPU_CHECK_FAIL_STEP:-}" = "$name" ]; then set -- false; fi  # tests: a failing step, the rest go on
  local t0=$(date +%s) rc
  timeout --kill-after=10 "$limit" bash -c '"$@"' _ "$@" >> "$LOG" 2>&1
  rc=$?
  local dt=$(($(date +%s) - t0)) status=ok
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status="timed out after ${limit} s"
  elif [ $rc -ne 0 ]; then status="failed (rc $rc)"; fi
  echo "[gpu_check] $name: $status in ${dt} s" | tee -a "$LOG"
  if [ "$status" != ok ]; then grep -v "USDT\|gpuGetDeviceCount" "$LOG" | tail -n 15 | sed 's/^/    /'; fi
  printf '%s\t%s\t%s\n' "$name" "$status" "$dt" >> "$STEPS"
}

setup() {
  local whl=("$WHEEL_DIR"/*.whl)
  if [ ! -e "${whl[0]}" ]; then
    echo "no carried wheels in $WHEEL_DIR (run 'bash benchmarks/gpu_check.sh --prepare' where pip works)"
  elif [ "$MODE" = dry ]; then  # the GPU image's set, checked to install for its Python (3.12); not used here
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" --only-binary=:all: \
      --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 "${whl[@]}" || return 1
    echo "dry run: the ${#whl[@]} carried wheels install for CPython 3.12 (not put on PYTHONPATH here)"
  else
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
      "${whl[@]}" || return 1
    export PYTHONPATH="$WORK/site:$PYTHONPATH"
    echo "installed ${#whl[@]} carried wheels into $WORK/site"
  fi
  "$PY" - "$WORK/env.json" <<'EOF'
import json, platform, subprocess, sys
from importlib.metadata import PackageNotFoundError, version
out = {"python": platform.python_version(), "executable": sys.executable}
for dist in ("torch", "transformers", "timm", "accelerate", "tokenizers", "triton", "webdataset", "deepspeed",
             "pydantic", "tensorboard", "numpy"):
    try:
        out[dist] = version(dist)
    except PackageNotFoundError:
        out[dist] = None
import torch, timm.layers
out["cuda_available"], out["gpus"] = torch.cuda.is_available(), torch.cuda.device_count()
if out["gpus"]:
    out["gpu"] = torch.cuda.get_device_name()
    out["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.sm,"
                                        "clocks.max.sm,power.limit", "--format=csv"], capture_output=True,
                                       text=True).stdout.strip()
out["timm_use_fused_attn"] = timm.layers.use_fused_attn()
for mod in ("webdataset",):
    __import__(mod)  # the pipeline cannot run without it
json.dump(out, open(sys.argv[1], "w"), indent=2)
print(json.dumps(out, indent=2))
EOF
}

corpus() {
  if [ "$MODE" = dry ]; then
    "$PY" -m vkd_dist.data_cli synthetic --out "$WORK/corpus" --num-train 96 --num-val 8 --num-test 8 \
      --image-size 64 --samples-per-shard 32 --workers 1
  else
    "$PY" -m vkd_dist.data_cli synthetic --out "$WORK/corpus" --num-train 2000 --num-val 64 --num-test 64 \
      --image-size 224 --samples-per-shard 250 --workers "$(nproc)"
  fi
}

bench() {  # bench NAME PARTS [flags...]
  local name=$1 parts=$2; shift 2
  if [ "$MODE" = dry ]; then
    "$PY" "$REPO/benchmarks/throughput.py" --quick --threads 1 --repeat 1 --only "$parts" \
      --data "$WORK/corpus" --json "$OUT_DIR/$name.json" "$@" "data.path=$WORK/corpus"
  else
    "$PY" "$REPO/benchmarks/throughput.py" --device cuda --repeat 1 --only "$parts" \
      --config "$REPO/configs/recipes/mimic_vitb16_clinicalbert.yaml" --data "$WORK/corpus" \
      --json "$OUT_DIR/$name.json" "$@" \
      "data.path=$WORK/corpus" data.build_synthetic=false model.image_weights=null model.text_encoder=tiny-bert \
      "model.text_config=$TEXT_CONFIG"
  fi
}

gpus() {
  "$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0
}

export MODE REPO WHEEL_DIR OUT_DIR WORK PY TEXT_CONFIG
export -f setup corpus bench
echo "[gpu_check] mode $MODE, out $OUT_DIR, work $WORK, python $PY, budget ${BUDGET} s" | tee -a "$LOG"
if [ "$MODE" = gpu ]; then
  step setup 60 setup
  [ -d "$WORK/site" ] && export PYTHONPATH="$WORK/site:$PYTHONPATH"
  NGPU=$(gpus)
  if [ "$NGPU" -lt 1 ]; then
    echo "[gpu_check] no CUDA device visible to $PY: use --dry-run on a CPU" | tee -a "$LOG"
  fi
else
  step setup 60 setup
  NGPU=0
fi
step corpus 90 corpus
# eager first: the "before"; its profile is the per-component breakdown
wanted() { case ",$ONLY," in *",$1,"*) return 0 ;; *) printf '%s\tskipped (--only)\t0\n' "$1" >> "$STEPS"; return 1 ;; esac; }
wanted eager && step eager 150 bench eager model_step,mfu,profile,trainer,end_to_end $([ "$MODE" = gpu ] && echo --no-compile)
# compiled: the "after"; model_step is left out (mfu measures the same step), profile last (the most optional)
wanted compiled && step compiled 300 bench compiled mfu,trainer,end_to_end,profile
if ! wanted scaling; then :
elif [ "$NGPU" -gt 1 ] || [ "$FORCE_SCALING" = 1 ]; then
  step scaling 150 bench scaling scaling
else
  echo "[gpu_check] scaling: skipped ($NGPU GPU(s); it needs 2, or --scaling)" | tee -a "$LOG"
  printf 'scaling\tskipped (%s GPUs)\t0\n' "$NGPU" >> "$STEPS"
fi
echo "[gpu_check] total $(($(date +%s) - START)) s" | tee -a "$LOG"
"$PY" "$REPO/benchmarks/gpu_summary.py" "$OUT_DIR" --steps "$STEPS" --env "$WORK/env.json" 2>&1 | tee -a "$LOG"
rc=0
awk -F'\t' '$2 != "ok" && $2 !~ /^skipped/ {bad = 1} END {exit !bad}' "$STEPS" && rc=1
rm -rf "$WORK"
exit $rc
