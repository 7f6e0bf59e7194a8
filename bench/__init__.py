"""Benchmarks, their shared recipes (`bench.recipes`) and recorded results. Not part of the installed
distribution: run from the repository root, e.g. `python -m bench.gpu.train_step --help`."""
