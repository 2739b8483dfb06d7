#!/usr/bin/env bash
# The test suite, as the README's Quick start runs it (after scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"
exec .venv/bin/python -m pytest -q --durations=15 "$@"
