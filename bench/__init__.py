"""Benchmarks by concern, their shared recipes (`bench.recipes`, `bench.records`) and recorded results.
Not part of the installed distribution: run from the repository root, e.g. `python -m bench.step.train_step
--help`; bench/README.md lists every folder and every recorded result with the command that made it."""
