#!/usr/bin/env bash
# Static checks, as CI runs them (after scripts/setup.sh): ruff's lint rules, then mypy, both configured in
# pyproject.toml. `ruff format --check` is not run yet: the tree has not had its one formatting pass.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
.venv/bin/mypy
