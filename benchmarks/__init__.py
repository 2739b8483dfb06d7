"""Training and conversion benchmarks. `python benchmarks/throughput.py` (or `python -m benchmarks`) runs the
training throughput parts; benchmarks/convert.py the conversion one; gpu_check.sh every GPU figure in one call."""
