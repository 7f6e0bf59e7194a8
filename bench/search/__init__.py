"""Time to best: replaying search methods against a recorded table (`python -m bench.search.replay`)."""
