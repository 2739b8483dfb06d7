#!/usr/bin/env bash
# Idempotent set-up: a project-local virtual environment at .venv with pinned torch/torchvision.
# Re-running is a no-op (seconds) unless pyproject.toml or constraints.txt changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VKD_VENV:-.venv}
EXTRAS=${VKD_EXTRAS:-dev,bench,fast,pretrained,labeller}
stamp="$VENV/.vkd-setup-stamp"
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)-$EXTRAS
# The console scripts live in $VENV/bin, which is not on PATH until the environment is activated: say so, last.
tools() {
  echo "The tools (vkd-train, vkd-data, vkd-eval, vkd-export, vkd-predict, vkd-compare, vkd-slurm, accelerate) are in $VENV/bin:"
  echo "  source $VENV/bin/activate    # puts them on PATH in this shell: vkd-export runs/default --out model"
  echo "  or call them by path:        $VENV/bin/vkd-export runs/default --out model"
}
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VENV/bin/python" -c "import vkd_dist" 2>/dev/null; then
  tools
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade "pip>=24" setuptools wheel
"$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[$EXTRAS]"
# The labeller extra on Python < 3.12: medspacy and PyRuSH declare spacy<3.8 there, which cannot share numpy 2 with
# the pinned torch stack; they run on spaCy 3.8, so they go in without their declared requirements (pyproject.toml)
if [[ ",$EXTRAS," == *,labeller,* ]] && "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info >= (3, 12))'; then
  "$VENV/bin/python" -m pip install -q -c constraints.txt --no-deps medspacy PyRuSH
fi
# A plain `accelerate launch` (the Quick start) opens with a six-line warning about the defaults it chose, unless
# Accelerate has a default config. Write one once, when there is none (never over one), with Accelerate's own
# writer (what `accelerate config default` runs: this machine's GPUs, no mixed precision), keeping use_cpu off
# as a launch without a config has it: the device is then chosen at run time and the trainer sets the CPU threads
# itself (train.cpu_threads), so the launch behaves exactly as it did, without the warning.
"$VENV/bin/python" - <<'PY'
import json
from pathlib import Path

from accelerate.commands.config import default_config_file
from accelerate.utils import write_basic_config

path = Path(default_config_file)
if not path.exists():
    write_basic_config(mixed_precision="no", save_location=str(path))
    config = json.loads(path.read_text())
    config["use_cpu"] = False
    path.write_text(json.dumps(config, indent=2))
    print(f"wrote Accelerate's default launch config to {path}; 'accelerate config' changes it")
PY
echo "$want" > "$stamp"
echo "vkd_dist set up in $VENV"
tools
