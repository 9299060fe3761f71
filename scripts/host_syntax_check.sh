#!/usr/bin/env bash
# Syntax-check C++ bindings with BLOSSOM_WITH_CUDA defined, on a machine whose torch is the
# CPU build (its include tree still has ATen/cuda, but the CUDA math libraries' headers are
# missing): tiny stand-ins for those headers are written to a temporary folder. Catches
# errors in the #ifdef BLOSSOM_WITH_CUDA branches before a GPU run; it links nothing.
#   scripts/host_syntax_check.sh                       # every csrc/ops/*.cpp
#   scripts/host_syntax_check.sh csrc/ops/blossom_attention.cpp
set -euo pipefail
cd "$(dirname "$0")/.."
STUB=$(mktemp -d)
trap 'rm -rf "$STUB"' EXIT
mkdir -p "$STUB/c10/cuda/impl"
echo '#pragma once' > "$STUB/c10/cuda/impl/cuda_cmake_macros.h"
printf '#pragma once\ntypedef struct cusparseContext* cusparseHandle_t;\ntypedef enum { CUSPARSE_STATUS_SUCCESS = 0 } cusparseStatus_t;\n' > "$STUB/cusparse.h"
printf '#pragma once\n#include <cuda_runtime_api.h>\ntypedef struct cublasContext* cublasHandle_t;\ntypedef enum { CUBLAS_STATUS_SUCCESS = 0 } cublasStatus_t;\n' > "$STUB/cublas_v2.h"
printf '#pragma once\ntypedef struct cublasLtContext* cublasLtHandle_t;\n' > "$STUB/cublasLt.h"
printf '#pragma once\ntypedef struct cusolverDnContext* cusolverDnHandle_t;\n' > "$STUB/cusolverDn.h"
printf '#pragma once\ntypedef enum { CUSOLVER_STATUS_SUCCESS = 0 } cusolverStatus_t;\n' > "$STUB/cusolver_common.h"
INC=$(python3 -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'include'))")
PYINC=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['include'])")
CUDA_INC=$(dirname "$(readlink -f "$(command -v nvcc)" 2>/dev/null || echo /usr/local/cuda/bin/nvcc)")/../include
[ -f "$CUDA_INC/cuda_runtime_api.h" ] || CUDA_INC=$(ls -d /usr/local/cuda*/include | head -1)
FILES=("$@")
[ ${#FILES[@]} -eq 0 ] && FILES=(csrc/ops/*.cpp)
for f in "${FILES[@]}"; do
  echo "g++ -fsyntax-only -DBLOSSOM_WITH_CUDA $f"
  g++ -std=c++20 -fsyntax-only -w -DBLOSSOM_WITH_CUDA -I csrc -I "$INC" \
    -I "$INC/torch/csrc/api/include" -I "$CUDA_INC" -I "$STUB" -I "$PYINC" "$f"
done
