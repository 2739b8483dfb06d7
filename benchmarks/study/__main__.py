"""`python -m benchmarks.study [flags]`: the study's command (cli.py)."""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a folder: import the package from the repository, not this folder
    sys.path[0] = str(Path(__file__).resolve().parents[2])

from benchmarks.study.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
