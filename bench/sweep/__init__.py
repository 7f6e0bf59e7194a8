"""Whole sweeps through the driver, timed: a fresh clone's `make sweep`, and the GPU host's sweeps."""
