#!/usr/bin/env bash
# GPU check: one script (about 4 minutes on one H200), on an NVIDIA GPU machine where the project is installed
# (`make test` or `make demo` once creates .venv with the CUDA build of torch).
#
#   1. build_overhead.py: build tokens/s over bare forward tokens/s on the same batches, for the
#      embedded tiny target and for a ~1B-parameter random-weight Llama in bf16 on the GPU
#      (hidden 2048, 20 layers, intermediate 5632, 32 heads, 4 KV heads, vocab 32000: 1.01B
#      parameters), seq 2048, the sample chats repeated to 1,200 rows, topk K=64 over a
#      32,000-token draft vocabulary, token budget 32,768;
#   2. switch_interval: the big case again under Python's default 5 ms GIL switch interval (the build
#      sets 0.5 ms while its forward loop runs), to measure what the shorter interval gains;
#      io_throughput.py: shard writer vs plain write, reader vs plain read, on this host's disk;
#   3. with >= 2 GPUs: scaling.py, 1 GPU vs 2 data-parallel processes, and one process whose
#      target spans 2 GPUs (--gpus-per-target 2); with fewer: "skipped: needs 2 GPUs".
#
# Figures go to $GPU_CHECK_OUT/gpu_check.json (default ./gpu_results), one JSON per step beside
# it, and the log to gpu_check.log. Every step has its own timeout; a failed step is recorded and
# the next one still runs; the exit status is 1 if any step failed.
#
# Run (repository root):   bash benchmarks/gpu_check.sh
# Dry run on a CPU machine: GPU_CHECK_ALLOW_CPU=1 GPU_CHECK_SMALL=1 bash benchmarks/gpu_check.sh
#   GPU_CHECK_ALLOW_CPU=1   run without a GPU (otherwise the script stops: nothing to check)
#   GPU_CHECK_SMALL=1       shrink every size (a ~10M-parameter target, few rows) to check the plumbing
#   GPU_CHECK_FAKE_GPUS=N   pretend N GPUs (dry runs of the 2-GPU branch's bookkeeping only)
#   GPU_CHECK_STEPS=a,b     run only these of build_overhead,switch_interval,io_throughput,scaling (default: all)
#   PYTHON=...              the interpreter (default .venv/bin/python, else python3)
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$(pwd)
OUT_DIR=${GPU_CHECK_OUT:-$REPO/gpu_results}
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
if [ -x .venv/bin/python ]; then PY=${PYTHON:-.venv/bin/python}; else PY=${PYTHON:-python3}; fi
SMALL=${GPU_CHECK_SMALL:-0}
START=$(date +%s)
declare -A STEP_RC STEP_S
FAILED=0

log() { echo "[gpu_check $(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
       HF_HUB_DISABLE_PROGRESS_BARS=1 HF_DATASETS_DISABLE_PROGRESS_BARS=1 TRANSFORMERS_VERBOSITY=error PYTHONUNBUFFERED=1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

: >"$LOG"
log "repository $REPO, results in $OUT_DIR, python $($PY -c 'import sys; print(sys.version.split()[0])')"

# ---- GPUs -------------------------------------------------------------------------------------
GPUS=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  GPUS=$(nvidia-smi -L | grep -c '^GPU ' || true)
  nvidia-smi -L | tee -a "$LOG"
fi
GPUS=${GPU_CHECK_FAKE_GPUS:-$GPUS}
if [ "$GPUS" -lt 1 ] && [ "${GPU_CHECK_ALLOW_CPU:-0}" != 1 ]; then
  log "no NVIDIA GPU found (nvidia-smi -L): nothing to check; set GPU_CHECK_ALLOW_CPU=1 for a CPU dry run"
  exit 2
fi

# ---- what is installed --------------------------------------------------------------------------
$PY - <<'EOF' 2>&1 | tee -a "$LOG"
import importlib
for name in ("torch", "transformers", "accelerate", "pyarrow", "huggingface_hub", "datasets", "dill", "multiprocess", "fsspec", "xxhash"):
    m = importlib.import_module(name)
    print(f"  {name} {getattr(m, '__version__', '?')} ({m.__file__})")
import torch
print(f"  cuda available: {torch.cuda.is_available()}, devices: {torch.cuda.device_count()}")
import builder  # noqa: F401  (the project imports with what is installed)
EOF

# ---- steps --------------------------------------------------------------------------------------
STEPS=",${GPU_CHECK_STEPS:-build_overhead,switch_interval,io_throughput,scaling},"
step() {  # step NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2; shift 2
  if [[ "$STEPS" != *",$name,"* ]]; then log "step $name: not selected (GPU_CHECK_STEPS)"; return 0; fi
  local t0=$(date +%s) rc=0
  log "step $name (timeout ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG" || rc=${PIPESTATUS[0]}
  STEP_RC[$name]=$rc
  STEP_S[$name]=$(( $(date +%s) - t0 ))
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then FAILED=1; log "step $name TIMED OUT after ${limit}s"
  elif [ "$rc" != 0 ]; then FAILED=1; log "step $name FAILED (exit status $rc)"; fi
  return 0
}

if [ "$SMALL" = 1 ]; then
  BIG=(--big-shape 256,8,688,4,2,1024 --big-rows 200 --big-samples 0 --big-seq 512 --big-draft-vocab 1024 --big-format topk
       --big-batch-size 16 --big-max-tokens 8192 --repeats 1 --tiny-samples 60)
  IO=(--rows 60 --repeats 1)
  SCALE=(--shape 256,8,688,4,2,1024 --samples 24 --shard-size 6 --repeats 1)
else
  BIG=(--big-shape 2048,20,5632,32,4,32000 --big-rows 1200 --big-samples 0 --big-seq 2048 --big-draft-vocab 32000 --big-format topk
       --big-batch-size 64 --big-max-tokens 32768 --repeats 2 --row-group-bytes 0
       --sort-window-bytes 536870912 --diagnostics tiny,big)
  IO=(--repeats 2)
  SCALE=(--shape 2048,20,5632,32,4,32000 --samples 600 --seq 2048 --shard-size 100 --draft-vocab 32000 --format topk
         --batch-size 64 --max-tokens 32768 --repeats 1)
fi

step build_overhead 240 $PY benchmarks/build_overhead.py --cases tiny,big "${BIG[@]}" --results "$OUT_DIR/build_overhead.json"
# The same big build under Python's default 5 ms GIL switch interval: what the forward loop's
# shorter interval (builder.forward.FORWARD_SWITCH_INTERVAL_S) gains on this machine.
step switch_interval 150 $PY benchmarks/build_overhead.py --cases big "${BIG[@]}" --diagnostics none --switch-interval 0.005 \
  --results "$OUT_DIR/switch_interval.json"
step io_throughput 150 $PY benchmarks/io_throughput.py "${IO[@]}" --results "$OUT_DIR/io_throughput.json"
if [ "$GPUS" -ge 2 ]; then
  step scaling 120 $PY benchmarks/scaling.py --cases one,two,group2 "${SCALE[@]}" --results "$OUT_DIR/scaling.json"
else
  log "scaling (1 vs 2 GPUs, --gpus-per-target 2): skipped: needs 2 GPUs, this machine has $GPUS"
fi

# ---- one summary file ---------------------------------------------------------------------------
steps_json="{"
for name in "${!STEP_RC[@]}"; do steps_json+="\"$name\": {\"exit_status\": ${STEP_RC[$name]}, \"seconds\": ${STEP_S[$name]}},"; done
steps_json="${steps_json%,}}"
GPUS="$GPUS" STEPS="$steps_json" OUT_DIR="$OUT_DIR" SMALL="$SMALL" TOTAL=$(( $(date +%s) - START )) $PY - <<'EOF' 2>&1 | tee -a "$LOG"
import json, os, subprocess, sys
from pathlib import Path

out = Path(os.environ["OUT_DIR"])
summary = {"benchmark": "gpu_check", "gpus": int(os.environ["GPUS"]), "small_dry_run": os.environ["SMALL"] == "1",
           "total_seconds": int(os.environ["TOTAL"]), "steps": json.loads(os.environ["STEPS"])}
try:
    summary["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
except (OSError, subprocess.SubprocessError):
    summary["nvidia_smi"] = []
for name in ("build_overhead", "switch_interval", "io_throughput", "scaling"):
    path = out / f"{name}.json"
    summary[name] = json.loads(path.read_text()) if path.exists() else None
if summary["gpus"] < 2:
    summary["scaling"] = "skipped: needs 2 GPUs"
figures = {}
bo = summary["build_overhead"]
if bo:
    for case in bo["cases"]:
        figures[f"build_over_bare_{case['label']}"] = round(case["ratio_build_over_bare_model"], 3)
        figures[f"build_minus_tail_over_bare_{case['label']}"] = round(case["ratio_build_minus_tail_over_bare_model"], 3)
        figures[f"bare_tokens_per_s_{case['label']}"] = round(case["bare_tokens_per_s"])
        figures[f"written_mb_per_s_{case['label']}"] = round(case["written_mb_per_s"], 1)
        if "peak_gpu_allocated_bytes" in case:
            figures[f"peak_gpu_gib_{case['label']}"] = round(case["peak_gpu_allocated_bytes"] / 2**30, 2)
            figures[f"planned_gpu_gib_{case['label']}"] = round(case["planned_gpu_bytes_in_allocator"] / 2**30, 2)
            figures[f"peak_over_planned_{case['label']}"] = round(case["ratio_peak_allocated_over_planned"], 3)
si = summary["switch_interval"]
if si:
    figures["build_over_bare_big_at_5ms_switch_interval"] = round(si["cases"][0]["ratio_build_over_bare_model"], 3)
io = summary["io_throughput"]
if io:
    figures |= {k: round(v, 3) for k, v in io["ratios"].items() if isinstance(v, float)}
    figures |= {f"mb_per_s_{k}": round(v) for k, v in io["mb_per_s"].items()}
sc = summary["scaling"]
if isinstance(sc, dict):
    figures |= {k: round(v, 3) for k, v in sc["ratios"].items()}
summary["figures"] = figures
(out / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps({"figures": figures, "steps": summary["steps"], "scaling": summary["scaling"] if isinstance(sc, str) else "ran"}, indent=2))
print(f"wrote {out / 'gpu_check.json'}")
EOF
log "done in $(( $(date +%s) - START ))s; failed steps: $FAILED"
exit "$FAILED"
