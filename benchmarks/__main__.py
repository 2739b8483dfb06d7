"""`python -m benchmarks [flags]`: the same as `python benchmarks/throughput.py [flags]`."""

import sys

from benchmarks.throughput import main

sys.exit(main())
