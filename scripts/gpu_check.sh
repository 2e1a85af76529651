#!/usr/bin/env bash
# On a machine with a CUDA GPU: build the extension with its CUDA kernels in place, run the test
# grid on the GPU backends (tests/test_gpu.py and the cuda cases of tests/test_<op>.py), then the GPU
# benchmarks (bench_objectives.py --device cuda, bench_gpu.py). Logs, CSV and plot go to OUT (default
# gpu-check/). Every stage has a time limit, so the whole check ends within 8 minutes.
#     scripts/gpu_check.sh [OUT]      # PYTHON=... to pick the interpreter, ARCH=9.0 for H100 only
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${1:-gpu-check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi -L
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
t0=$SECONDS
MMVAE_FAST_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=${ARCH:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
  timeout ${BUILD_TIMEOUT:-150} $PY setup.py build_ext --inplace >"$OUT/build.log" 2>&1 \
  || { tail -40 "$OUT/build.log"; echo "BUILD FAILED (or over ${BUILD_TIMEOUT:-150} s)"; }
echo "build: $((SECONDS - t0)) s"
$PY -c "from mmvae_fast import ops; print('cuda backends:', ops.available_backends('cuda'), '; moe_estimator:', [b for b in ('cuda', 'triton') if ops._dispatch.available('moe_estimator', b, 'cuda')])"
t0=$SECONDS
timeout ${TEST_TIMEOUT:-150} $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_importance_weights.py tests/test_mixture_log_density.py tests/test_importance_ratios.py tests/test_likelihood_sum.py tests/test_moe_estimator.py -k "gpu or cuda" 2>&1 | tee "$OUT/tests.log" | tail -40
echo "tests: $((SECONDS - t0)) s"
t0=$SECONDS
timeout ${OBJ_BENCH_TIMEOUT:-90} $PY benchmarks/bench_objectives.py --device cuda --no-compile --repeats 5 2>&1 | tee "$OUT/bench_objectives.log"
echo "bench_objectives: $((SECONDS - t0)) s"
t0=$SECONDS
timeout ${BENCH_TIMEOUT:-60} $PY benchmarks/bench_gpu.py --quick --out "$OUT" 2>&1 | tee "$OUT/bench.log"
echo "bench_gpu: $((SECONDS - t0)) s"
