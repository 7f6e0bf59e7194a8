#!/usr/bin/env bash
# Time the README's run command on a fresh clone, as a new user would run it, and print the sweep's figures.
#   bash bench/sweep/fresh_clone.sh [WORKDIR]
# Needs nothing set up beforehand: the clone gets its own .venv. The model cache (~/.cache/qlora-sweeps)
# is moved aside for the run, so the GGUF conversion is timed too.
set -euo pipefail
repo=$(git -C "$(dirname "$0")/../.." rev-parse --show-toplevel)
work=${1:-$(mktemp -d)}
rm -rf "$work/clone"
git clone -q "$repo" "$work/clone"
cache=${QLORA_SWEEPS_CACHE:-$HOME/.cache/qlora-sweeps}
export QLORA_SWEEPS_CACHE="$work/cache"  # an empty model cache: the first run converts the GGUF file
cd "$work/clone"
start=$(date +%s)
make sweep 2>&1 | tee "$work/sweep.log"
end=$(date +%s)
results=$(grep -o '^results: .*' "$work/sweep.log" | tail -1 | cut -d' ' -f2)
echo "wall time of 'make sweep' from a fresh clone: $((end - start)) s (setup, model conversion, sweep, report)"
.venv/bin/python - "$results" <<'PY'
import sys
import pandas as pd
row = pd.read_parquet(sys.argv[1]).iloc[0]
print(f"status {row.status}, steps {row.step}, base eval loss {row.base_eval_loss:.3f}, "
      f"best eval loss {row.best_eval_loss:.3f} (margin {row.base_eval_loss - row.best_eval_loss:.3f}), "
      f"train tokens/s {row.tokens_per_s:.0f}, peak memory {row.peak_memory_gib:.2f} GiB, "
      f"trial wall time {row.wall_time_s:.0f} s")
PY
