#!/usr/bin/env bash
# Runs, in a fresh clone of this repository's HEAD, every command of the README's Quick start as printed (its
# ```bash block: set-up, the default run, the test suite), then every command of docs/partial-labels.md
# (tests/test_docs_commands.py: the page's commands in order, on made-up studies, training at configs/tiny.yaml's
# size). The Quick start alone takes as long as the default run plus the whole suite (see docs/figures.md).
#   bash scripts/check_docs_commands.sh [--print] [--pages-only] [--keep]
#   --print       print the commands and the clone's path, run nothing
#   --pages-only  skip the Quick start's commands, but still set up (scripts/setup.sh) in the clone
#   --keep        keep the clone (default: removed when every command passed)
set -euo pipefail
cd "$(dirname "$0")/.."
print=0 pages_only=0 keep=0
for arg in "$@"; do
  case "$arg" in
    --print) print=1 ;;
    --pages-only) pages_only=1 ;;
    --keep) keep=1 ;;
    *) echo "check_docs_commands.sh: unknown argument $arg (expected --print, --pages-only, --keep)" >&2; exit 2 ;;
  esac
done

# The Quick start: the lines of the first ```bash block after the "## Quick start" heading, comments dropped.
quick_start=$(awk '/^## Quick start/{q=1} q&&/^```bash/{b=1;next} b&&/^```/{exit} b{sub(/[[:space:]]+#.*$/,""); if (NF) print}' README.md)
if [ -z "$quick_start" ]; then
  echo "check_docs_commands.sh: README.md has no \`\`\`bash block under '## Quick start'" >&2
  exit 1
fi
clone=$(mktemp -d "${TMPDIR:-/tmp}/vkd-docs-check.XXXXXX")
page_command="VKD_DOCS_COMMANDS=1 bash scripts/test.sh tests/test_docs_commands.py"
if [ "$print" = 1 ]; then
  echo "clone: git clone $(pwd) $clone"
  [ "$pages_only" = 1 ] && echo "bash scripts/setup.sh" || echo "$quick_start"
  echo "$page_command"
  rmdir "$clone"
  exit 0
fi
git clone --quiet "$(pwd)" "$clone"
cd "$clone"
echo "== fresh clone of $(git rev-parse --short HEAD) in $clone"
if [ "$pages_only" = 1 ]; then
  bash scripts/setup.sh
else
  while IFS= read -r line; do
    echo "== $line"
    bash -c "$line"
  done <<< "$quick_start"
fi
echo "== $page_command"
VKD_DOCS_COMMANDS=1 bash scripts/test.sh tests/test_docs_commands.py
echo "== every command passed"
[ "$keep" = 1 ] || { cd / && rm -rf "$clone"; }
