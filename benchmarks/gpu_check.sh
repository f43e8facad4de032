#!/usr/bin/env bash
# `make gpu-check`: on a machine with a CUDA GPU, run the tests that exercise the GPU (pytest -m gpu),
# the full benchmark and the static report, and gather every output in one folder named after the
# device, ready to commit: benchmarks/results/<device>/, or $OUT/<device>/ when OUT is set.
# Without a GPU it prints one line saying so and exits with status 0.
#
#   PY=.venv/bin/python [OUT=dir] [BENCH_ARGS=...] [PYTEST_ARGS=...] bash benchmarks/gpu_check.sh
#
# The folder holds: tests.log (pytest), <device>.json/.csv and <device>-<op>.png (sdecor bench),
# bench.txt/bench.log (its table and progress), static-sm80-sm90.json and static.txt (sdecor bench
# --static), nvidia-smi.txt, versions.txt (pip freeze of torch, triton and the CUDA wheels) and
# info.txt (sdecor info). The exit status is 1 when any step failed; every step runs regardless.
set -u

# the same test as tests/conftest.py: CUDA_VISIBLE_DEVICES="" hides every GPU
if [ "${CUDA_VISIBLE_DEVICES-unset}" = "" ] || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "make gpu-check: no CUDA GPU here (nvidia-smi finds none); nothing to run"
    exit 0
fi

PY=${PY:-python3}
BENCH_ARGS=${BENCH_ARGS:-}
PYTEST_ARGS=${PYTEST_ARGS:-}
OUT=${OUT:-}
case "$OUT" in ""|/*) ;; *) OUT="$PWD/$OUT" ;; esac          # relative to where make runs
case "$PY" in /*) ;; */*) PY="$PWD/$PY" ;; esac              # .venv/bin/python; a bare name: PATH
cd "$(dirname "$0")/.." || exit 1
unset TRITON_INTERPRET                  # real kernels on the GPU, never the interpreter

slug=$("$PY" - <<'PYEOF'
import sys

import torch

if not torch.cuda.is_available():
    sys.exit(f"make gpu-check: nvidia-smi sees a GPU but torch {torch.__version__} cannot use it "
             f"(torch.version.cuda = {torch.version.cuda}: a CPU-only torch, or a driver older than its CUDA)")
from sdecor.cli.bench.report import device_slug

print(device_slug(torch.device("cuda")))
PYEOF
) || exit 1
dir="${OUT:-benchmarks/results}/$slug"
mkdir -p "$dir" || exit 1
echo "make gpu-check: $slug; writing $dir/"

failed=()
step() {                                # step NAME LOG COMMAND...: run, log, remember a failure
    local name=$1 log=$2 rc
    shift 2
    echo "make gpu-check: $name ..."
    "$@" >"$log" 2>&1
    rc=$?
    if [ $rc -ne 0 ]; then
        failed+=("$name (exit status $rc, see $log)")
        tail -n 5 "$log"
    fi
}

{ nvidia-smi; echo; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit \
    --format=csv; } >"$dir/nvidia-smi.txt" 2>&1
"$PY" -m pip freeze 2>/dev/null | grep -iE '^(torch|triton|nvidia-)' >"$dir/versions.txt"
"$PY" -m sdecor info >"$dir/info.txt" 2>&1

# pytest's exit status 5 (no test selected) is a failure here, as in `make test`
# shellcheck disable=SC2086
step "GPU tests (pytest -m gpu)" "$dir/tests.log" "$PY" -m pytest -m gpu -rA -p no:cacheprovider $PYTEST_ARGS
# shellcheck disable=SC2086
run_bench() { "$PY" -m sdecor bench --device cuda --out "$dir" $BENCH_ARGS >"$dir/bench.txt"; }
step "benchmark (sdecor bench --device cuda $BENCH_ARGS)" "$dir/bench.log" run_bench
step "static report (sdecor bench --static)" "$dir/static.txt" "$PY" -m sdecor bench --static --out "$dir"

if [ ${#failed[@]} -ne 0 ]; then
    printf 'make gpu-check: FAILED: %s\n' "${failed[@]}"
    echo "make gpu-check: outputs in $dir/"
    exit 1
fi
echo "make gpu-check: all steps passed; outputs in $dir/, ready to commit"
