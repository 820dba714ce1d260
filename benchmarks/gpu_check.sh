#!/usr/bin/env bash
# One call on a GPU machine: the kernel tests on the GPU (bf16 and fp32), then benchmarks/kernels.py.
#
# The GPU image has torch, triton and transformers but not plotly (imported by `import l4lab`) nor
# liger-kernel (a peer). Fetch their wheels into .whl/ (git-ignored) on a machine with pip access:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#       plotly==7.1.0 liger-kernel==0.8.5
# then run this script with .whl carried. Logs and the result table land in $OUT (or ./gpu-out).
# Device time is scarce (15 minutes a session, start-up included): the tests compile many kernel
# variants, so they run on 8 processes (pytest-xdist, on the image) under a time limit, and the
# benchmark under another; arguments go to benchmarks/kernels.py (e.g. --only attention moe).
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
SITE=/tmp/l4lab-site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target "$SITE" . || exit 1
export PYTHONPATH=$SITE PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
(cd /tmp && timeout "${TEST_SECONDS:-240}" python3 -m pytest -q -n 8 -p no:cacheprovider \
    "$OLDPWD"/tests/test_kernels_*.py "$OLDPWD"/tests/test_fused_model.py 2>&1) | tee "$OUT/gpu-tests.log"
timeout "${BENCH_SECONDS:-330}" python3 benchmarks/kernels.py --write "$@" 2>&1 | tee "$OUT/benchmark.log"
cp benchmarks/results/kernels-*.md "$OUT/" 2>/dev/null
