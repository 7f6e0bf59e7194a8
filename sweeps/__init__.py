"""The sweep driver (`python -m sweeps.run`)."""

import os
import time

# When the driver's code began to load: its start clock (sweeps.console.StartClock) counts the imports from here.
IMPORTED_AT = time.perf_counter()

# Ray folds log lines that differ only in their numbers ("[repeated 3x across cluster]"), which would hide
# all but one of the trials' evaluation lines. It reads this setting once, when `ray` is first imported,
# so it is set here, before any module of the driver imports ray.
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
