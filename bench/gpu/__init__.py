"""Benchmarks run on a GPU host; `bash bench/gpu/suite.sh --help` runs them in stages."""
