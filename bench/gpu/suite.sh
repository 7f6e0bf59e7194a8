#!/usr/bin/env bash
# bash bench/gpu/suite.sh STAGE...        (on a GPU host, from the repository root; results under $OUT)
#
# Everything measured on the GPU host, as stages run in the order given:
#   stash       copy the carried pieces (.gguf1/, .gguf2/, .adapter/) to /tmp/carried: a folder that is not
#               carried again is gone from the next call's checkout, /tmp stays while the host is held
#   setup       install the carried wheels ($WHEELS, default .wheels/) into /tmp/site, print versions and devices
#   tests       the GPU tests (tests/gpu)
#   step        bench/gpu/train_step.py, every case, with a profile   (step-quick: fewer cases and steps)
#   tiny-sweep  python -m sweeps.run on a 2-layer random Llama (the whole GPU path in a minute)
#   gguf        reassemble the embedded model's GGUF file from the stashed pieces (.gguf1/, .gguf2/)
#   smollm2     one trial of the default model under Ray Tune, one GPU         (issue 2)
#   smollm2-report  the same trial with the report on (issue 3 on a GPU: generation on CUDA; needs
#               sacrebleu and its dependencies, WHEELS=.wheels-report setup)
#   llama7b     one trial of a Llama-2-7B-shaped model under Ray Tune, one GPU (issue 2)
#   setup-time  bench/gpu/trial_setup.py: process start to first optimizer step, quantized cache on/off
#   two-gpu     four trials two at a time (one per GPU), then one at a time
#   generation  bench/gpu/generation.py: the report's batched generation vs one prompt at a time, with the
#               stashed .adapter/ if there is one, else the adapter of the smollm2 stage
# Output: log.txt, train_step.jsonl, profile.txt, setup.jsonl, sweeps.jsonl, generation.jsonl.
set -uo pipefail
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
# Never NVLink multicast (it can take a shared host's GPUs down).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
export RAY_USAGE_STATS_ENABLED=0 RAY_DEDUP_LOGS=1
TOK=/tmp/smollm2-tokenizer
CARRIED=/tmp/carried
GGUF=/tmp/smollm2.gguf
[ -f "$GGUF" ] && export QLORA_SWEEPS_GGUF=$GGUF

log() { echo "=== $(date -u +%H:%M:%S) $*" | tee -a "$OUT/log.txt"; }
run() { "$@" 2>&1 | tee -a "$OUT/log.txt"; return "${PIPESTATUS[0]}"; }

tokenizer() {
  [ -f $TOK/tokenizer.json ] || { mkdir -p $TOK && tar -xzf .gpu_assets/smollm2-tokenizer.tgz -C $TOK; }
}

sweep() {  # sweep LABEL CONFIG [overrides...]: run the driver, time it, summarize the experiment
  local label=$1 config=$2
  shift 2
  local start end
  start=$(date +%s.%N)
  run python3 -m sweeps.run --config "$config" "experiment=$label" "$@"
  end=$(date +%s.%N)
  run python3 bench/gpu/sweep_summary.py "experiments/$label" --label "$label" \
    --wall-s "$(python3 -c "print(round($end - $start, 1))")" --out "$OUT"
}

for stage in "$@"; do
  log "stage $stage"
  case $stage in
    stash)
      mkdir -p $CARRIED
      for piece in .gguf1 .gguf2 .adapter; do [ -d $piece ] && cp -r $piece $CARRIED/ && log "stashed $piece"; done
      ;;
    setup)
      run python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "${WHEELS:-.wheels}"/*.whl
      run python3 - <<'EOF'
import importlib, inspect, os, torch
for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "trl", "datasets", "ray", "optuna",
             "liger_kernel", "triton", "pydantic"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"))
    except Exception as err:
        print(name, "MISSING", err)
print("cuda", torch.version.cuda, [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
from torch.nn.attention import varlen
print("varlen_attn", inspect.signature(varlen.varlen_attn))
EOF
      ;;
    tests)
      run env CUDA_VISIBLE_DEVICES=0 python3 -m pytest -q -s -p no:cacheprovider tests/gpu
      ;;
    step)
      run env CUDA_VISIBLE_DEVICES=0 python3 bench/gpu/train_step.py --out "$OUT" --steps 5 --warmup 2 --profile
      ;;
    step-quick)
      run env CUDA_VISIBLE_DEVICES=0 python3 bench/gpu/train_step.py --out "$OUT" --cases ladder,realistic --steps 5 --warmup 2 --profile
      ;;
    tiny-sweep)
      tokenizer
      run python3 bench/gpu/make_model.py --shape tiny --tokenizer $TOK --out /tmp/tiny-llama
      sweep tiny bench/gpu/tiny.yaml model.name_or_path=/tmp/tiny-llama
      ;;
    gguf)
      # The 94 MiB file travels in two pieces, in two calls: .gguf1/part-aa, .gguf2/part-ab and SHA256.
      cat $CARRIED/.gguf1/part-* $CARRIED/.gguf2/part-* > $GGUF
      if [ "$(sha256sum $GGUF | cut -d' ' -f1)" = "$(cat $CARRIED/.gguf2/SHA256)" ]; then log "gguf ok"; else log "gguf BAD"; fi
      export QLORA_SWEEPS_GGUF=$GGUF
      ;;
    smollm2)
      sweep smollm2 bench/gpu/smollm2.yaml
      ;;
    smollm2-report)
      sweep smollm2-report bench/gpu/smollm2.yaml report.enabled=true
      run python3 -c "import pandas as pd; print(pd.read_parquet('experiments/smollm2-report/leaderboard.parquet').to_string())"
      ;;
    llama7b)
      tokenizer
      run python3 bench/gpu/make_model.py --shape 7b --tokenizer $TOK --out /tmp/llama7b-shape
      sweep llama7b bench/gpu/llama7b-shape.yaml model.name_or_path=/tmp/llama7b-shape
      ;;
    setup-time)
      tokenizer
      run python3 bench/gpu/make_model.py --shape 7b --tokenizer $TOK --out /tmp/llama7b-shape
      run env CUDA_VISIBLE_DEVICES=0 python3 bench/gpu/trial_setup.py --model /tmp/llama7b-shape --out "$OUT" --cold
      ;;
    two-gpu)
      sweep two-at-a-time bench/gpu/two-gpu.yaml
      sweep one-at-a-time bench/gpu/two-gpu.yaml search.max_concurrent_trials=1
      ;;
    generation)
      adapter=$CARRIED/.adapter
      [ -d "$adapter" ] || adapter=$(python3 -c "import pandas as pd; print(pd.read_parquet('experiments/smollm2/results.parquet').adapter_path[0])" 2>/dev/null)
      run env CUDA_VISIBLE_DEVICES=0 python3 bench/gpu/generation.py ${adapter:+--adapter "$adapter"} --out "$OUT"
      ;;
    *)
      log "unknown stage $stage"
      ;;
  esac
done
log "done"
