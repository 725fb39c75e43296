#!/usr/bin/env bash
# GPU suite: every GPU-only test and benchmark of Tessera in one run, within 9 minutes on one
# H100/H200. WHOEVER ADDS A GPU CHECK (a test marked `gpu`, a benchmark run with --device cuda)
# ADDS IT HERE, as one more `part` with its own time limit, and keeps the total under 9 minutes.
#
# Usage: benchmarks/gpu_suite.sh [OUT_DIR]
#   OUT_DIR: the first argument, else $OUT, else ./gpu_suite_out. It receives one log per part,
#   env.txt (nvidia-smi, torch / CUDA versions, commit), pytest_gpu.xml (JUnit) and summary.txt,
#   and the benchmarks' result files (*.json, with the PNGs beside them): copy those into
#   benchmarks/results/ and run `python benchmarks/report.py --write BENCHMARKS.md`.
# Environment: PYTHON (default: .venv/bin/python if present, else python3); SUITE_BUDGET_S (total
#   seconds for all parts, default 540); TIMEOUT_<PART> overrides one part's limit (seconds);
#   SUITE_PARTS (comma-separated part names, e.g. pytest_gpu,demo_rq_gpu: run only these, to rerun
#   what a fix touched; default: all).
# Exit status: 0 when every part passed, or when there is no CUDA device (then nothing runs and
#   summary.txt says so); 1 when any part failed or ran out of time. A failed part does not stop
#   the parts after it.
set -u -o pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$(pwd)
OUT_DIR=${1:-${OUT:-./gpu_suite_out}}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
BUDGET_S=${SUITE_BUDGET_S:-540}
export PYTHONUNBUFFERED=1              # a part killed by its timeout still leaves its rows in the log
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}  # the tests' float64 CPU references
SUMMARY="$OUT_DIR/summary.txt"
START=$(date +%s)
FAILED=0

elapsed() { echo $(( $(date +%s) - START )); }

note() { echo "$*" | tee -a "$SUMMARY"; }

# part NAME LIMIT_S COMMAND...: run COMMAND with a time limit (capped by what is left of the budget),
# log to OUT_DIR/NAME.log and the terminal, and record its status in summary.txt.
part() {
    local name=$1 limit=$2
    shift 2
    if [ -n "${SUITE_PARTS:-}" ] && [[ ",$SUITE_PARTS," != *",$name,"* ]]; then
        return
    fi
    local override="TIMEOUT_$(echo "$name" | tr '[:lower:]-' '[:upper:]_')"
    limit=${!override:-$limit}
    local left=$(( BUDGET_S - $(elapsed) ))
    if [ "$left" -lt "$limit" ]; then limit=$left; fi
    if [ "$limit" -lt 10 ]; then
        note "$(printf '%-22s %-8s %6s s  %s' "$name" SKIPPED - "no time left in the ${BUDGET_S} s budget")"
        FAILED=1
        return
    fi
    echo "=== $name (limit ${limit} s): $*"
    local t0 rc status
    t0=$(date +%s)
    timeout --kill-after=15 "$limit" "$@" 2>&1 | tee "$OUT_DIR/$name.log"
    rc=${PIPESTATUS[0]}
    case $rc in
        0) status=ok ;;
        124 | 137) status=TIMEOUT; FAILED=1 ;;
        *) status=FAILED; FAILED=1 ;;
    esac
    note "$(printf '%-22s %-8s %6s s  rc=%s  log: %s.log' "$name" "$status" $(( $(date +%s) - t0 )) "$rc" "$name")"
}

: > "$SUMMARY"
note "Tessera GPU suite  $(date -u +%Y-%m-%dT%H:%M:%SZ)  host $(hostname)  budget ${BUDGET_S} s"
{
    echo "commit: $(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)$(git -C "$REPO" diff --quiet 2>/dev/null || echo ' (+ local changes)')"
    echo "python: $PYTHON"
    "$PYTHON" - <<'EOF' 2>&1
import torch
print(f"torch {torch.__version__}  CUDA (torch build) {torch.version.cuda}  cuDNN {torch.backends.cudnn.version()}")
print(f"cuda available: {torch.cuda.is_available()}  devices: {torch.cuda.device_count()}")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"  [{i}] {p.name}  sm_{p.major}{p.minor}  {p.total_memory / 2**30:.0f} GiB")
EOF
    echo "--- nvidia-smi"
    nvidia-smi 2>&1 || echo "(nvidia-smi not available)"
    echo "--- nvcc"
    nvcc --version 2>&1 || echo "(nvcc not on PATH; torch's cpp_extension looks in CUDA_HOME)"
} > "$OUT_DIR/env.txt" 2>&1
cat "$OUT_DIR/env.txt"

if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
    note "NO CUDA DEVICE (torch.cuda.is_available() is False or torch is missing): nothing ran."
    note "Run this script on a machine with a GPU; see BENCHMARKS.md (the pending sections)."
    note "total $(elapsed) s; result: NOT RUN"
    exit 0
fi

# 1. Build the codebook-search extension once (JIT, into the kernel cache the later parts reuse), so
#    its compile time is measured apart and a compiler error is not reported as a test failure.
part build_kernels 180 "$PYTHON" -c "
import time
from kernels import loader
t = time.perf_counter()
module = loader.build(verbose=True)
print(f'built {module.__file__} in {time.perf_counter() - t:.1f} s (cache {loader.cache_dir()})')
"

# 2. Every test marked `gpu` (tests/unit/test_kernels_cuda.py: both CUDA search paths against float64 references;
#    and tests/unit/test_rq_transformer.py: attention backends, bf16 KV cache).
#    A module that fails to import is reported but does not stop the others; a GPU test that is
#    skipped on a GPU machine counts as a failure.
part pytest_gpu 150 "$PYTHON" -m pytest -q -m gpu tests/ -p no:cacheprovider -rs --continue-on-collection-errors \
    --junitxml="$OUT_DIR/pytest_gpu.xml"
if [ -f "$OUT_DIR/pytest_gpu.xml" ]; then
    "$PYTHON" - "$OUT_DIR/pytest_gpu.xml" <<'EOF' | tee -a "$SUMMARY"
import sys
import xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root)
count = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
print("  pytest_gpu: " + ", ".join(f"{v} {k}" for k, v in count.items()))
if count["tests"] == 0 or count["skipped"]:
    print("  pytest_gpu: FAILED (no GPU test ran, or some were skipped on a GPU machine)")
    sys.exit(1)
EOF
    [ "${PIPESTATUS[0]}" -eq 0 ] || FAILED=1
fi

# 3. A real rq-1.4b training step on one GPU (ZeRO-2, bf16, activation checkpointing, micro-batch 32):
#    tokens/s, MFU (target >= 45%), peak memory, forward vs backward + optimizer time, per attention
#    backend (flash-attn if installed, SDPA flash, SDPA math); the top operators of two profiled steps.
part bench_prior_step 90 "$PYTHON" benchmarks/prior_training.py step --device cuda --preset rq-1.4b \
    --micro-batch 32 --steps 4 --warmup 2 --out "$OUT_DIR/prior_training_step_cuda.json" \
    --profile "$OUT_DIR/prior_training_step_profile.txt"

# 4. Codebook-search benchmark at the shapes BENCHMARKS.md lists as pending: N in {65536, 262144,
#    1048576}, C = 256, fp32 and bf16, one part per K so a slow or failing K keeps the other's table.
part bench_search_k1024 80 "$PYTHON" benchmarks/codebook_search.py --device cuda --k 1024 \
    --out "$OUT_DIR/codebook_search_cuda_k1024.json"
part bench_search_k16384 90 "$PYTHON" benchmarks/codebook_search.py --device cuda --k 16384 --repeats 5 --warmup 1 \
    --out "$OUT_DIR/codebook_search_cuda_k16384.json"

# 5. Prior sampling speed: rq-1.4b on 8x8x4 vs a 1.4B raster transformer on 16x16x1 (bf16, KV cache
#    on/off) at the paper's batch sizes; the paper reports 4-7x for RQ.
part bench_sampling 150 "$PYTHON" benchmarks/sampling_speed.py --device cuda --batch-sizes 1 64 256 \
    --uncached-batch-sizes 1 --repeats 2 --out "$OUT_DIR/sampling_speed_cuda.json"

# 6. The demo's six stages end to end on the GPU: wall time per stage, from each stage's done.json, in a
#    scratch run directory (the shards stay out of OUT_DIR). Stopped by its time limit, it still writes
#    the stages that finished.
part demo_rq_gpu 200 "$PYTHON" benchmarks/demo_wall_time.py configs/demo-rq.yaml \
    --out "$OUT_DIR/demo_wall_time_demo-rq_cuda.json"

note "total $(elapsed) s; result: $([ "$FAILED" -eq 0 ] && echo PASSED || echo FAILED)"
exit "$FAILED"
