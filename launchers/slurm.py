#!/usr/bin/env python
"""Launch VKD training on SLURM (or locally) through submitit; preempted jobs checkpoint, requeue and resume.

    python launchers/slurm.py --nodes 4 --gpus-per-node 8 --partition gpu --time 24:00:00 \\
        --strategy deepspeed_zero2 --config configs/recipes/X.yaml run_dir=runs/big --wait

See `--help` and docs/scaling-and-slurm.md (Running on SLURM); the logic lives in vkd_dist/slurm.py.
"""

import sys
from pathlib import Path

try:
    import vkd_dist  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vkd_dist.slurm import main

if __name__ == "__main__":
    sys.exit(main())
