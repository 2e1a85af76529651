#!/usr/bin/env bash
# Compiles every CUDA source (csrc/cuda/*.cu) with nvcc for sm_80 and sm_90, object files only,
# against the torch headers of the Python in use and the project's shared headers. Fails if any
# file fails. Used by CI where nvcc is present; needs no GPU and no CUDA build of torch.
#   scripts/check_cuda_compile.sh [FILE.cu ...]   (default: all; PYTHON=... to pick the interpreter, JOBS=N in parallel)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
NVCC=${NVCC:-nvcc}
JOBS=${JOBS:-2}
if ! command -v "$NVCC" >/dev/null 2>&1; then
  echo "check_cuda_compile: nvcc not found; skipping the CUDA compile check"
  exit 0
fi
mapfile -t INC < <("$PYTHON" -c "from torch.utils.cpp_extension import include_paths; print('\n'.join(include_paths()))")
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
# A CPU-only torch wheel ships the c10/cuda headers but not their build-generated config header;
# supply it (its content in every CUDA build of torch) so the sources compile against such a torch.
SHIM=()
if ! ls "${INC[0]}/c10/cuda/impl/cuda_cmake_macros.h" >/dev/null 2>&1; then
  mkdir -p "$OUT/shim/c10/cuda/impl"
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' >"$OUT/shim/c10/cuda/impl/cuda_cmake_macros.h"
  SHIM=(-I"$OUT/shim")
fi
# NVCC_EXTRA_FLAGS: more flags, first on the line (e.g. another -gencode, or -I to override a header)
read -r -a EXTRA <<<"${NVCC_EXTRA_FLAGS:-}"
FLAGS=("${EXTRA[@]}" -c -O3 -std=c++20 --expt-relaxed-constexpr -DMMVAE_FAST_WITH_CUDA=1
       -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
       -D__CUDA_NO_HALF2_OPERATORS__ -DTORCH_EXTENSION_NAME=_C -D_GLIBCXX_USE_CXX11_ABI=1
       -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90
       -Xcompiler -fPIC -Icsrc/include "${SHIM[@]}")
for d in "${INC[@]}"; do FLAGS+=(-I"$d"); done
shopt -s nullglob
SOURCES=(csrc/cuda/*.cu)
[ $# -gt 0 ] && SOURCES=("$@")
if [ ${#SOURCES[@]} -eq 0 ]; then
  echo "check_cuda_compile: no csrc/cuda/*.cu"
  exit 1
fi
echo "check_cuda_compile: $("$NVCC" --version | tail -1); ${#SOURCES[@]} files, sm_80 + sm_90"
compile() {
  local src=$1 log="$OUT/$(basename "$1").log"
  local t0=$SECONDS
  if "$NVCC" "${FLAGS[@]}" "$src" -o "$OUT/$(basename "$src").o" >"$log" 2>&1; then
    echo "  ok    $src ($((SECONDS - t0)) s)"
  else
    echo "  FAIL  $src"; cat "$log"; return 1
  fi
}
FAILED=0
for src in "${SOURCES[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || FAILED=1; done
  compile "$src" &
done
while [ "$(jobs -rp | wc -l)" -gt 0 ]; do wait -n || FAILED=1; done
wait || FAILED=1
# the CUDA registration block of csrc/ops.cpp (host code: the C++ compiler, syntax only)
PYINC=$("$PYTHON" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
CXX_FLAGS=(-fsyntax-only -std=c++20 -DMMVAE_FAST_WITH_CUDA=1 -Icsrc/include -I"$PYINC" "${SHIM[@]}")
for d in "${INC[@]}"; do CXX_FLAGS+=(-I"$d"); done
if "${CXX:-c++}" "${CXX_FLAGS[@]}" csrc/ops.cpp >"$OUT/ops.log" 2>&1; then
  echo "  ok    csrc/ops.cpp (with MMVAE_FAST_WITH_CUDA)"
else
  echo "  FAIL  csrc/ops.cpp (with MMVAE_FAST_WITH_CUDA)"; cat "$OUT/ops.log"; FAILED=1
fi
if [ "$FAILED" -ne 0 ]; then echo "check_cuda_compile: FAILED"; exit 1; fi
echo "check_cuda_compile: all CUDA sources compile"
