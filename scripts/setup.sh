#!/usr/bin/env bash
# Idempotent set-up: a project-local virtual environment at .venv with pinned torch/torchvision.
# Re-running is a no-op (seconds) unless pyproject.toml or constraints.txt changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VKD_VENV:-.venv}
EXTRAS=${VKD_EXTRAS:-dev,bench,fast,pretrained}
stamp="$VENV/.vkd-setup-stamp"
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)-$EXTRAS
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VENV/bin/python" -c "import vkd_dist" 2>/dev/null; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade "pip>=24" setuptools wheel
"$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[$EXTRAS]"
echo "$want" > "$stamp"
echo "vkd_dist set up in $VENV"
