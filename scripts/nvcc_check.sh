#!/usr/bin/env bash
# Compile CUDA sources with nvcc on a machine without a GPU or a CUDA build of torch, to
# catch compile errors and read register/shared-memory use (-Xptxas -v) before a GPU run.
#   scripts/nvcc_check.sh                      # every csrc/cuda/*.cu
#   scripts/nvcc_check.sh csrc/cuda/select_blocks.cu
# ARCH (default sm_90) picks the target; PTXAS_VERBOSE=1 prints per-kernel resources.
set -euo pipefail
cd "$(dirname "$0")/.."
INC=$(python3 -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'include'))")
FILES=("$@")
[ ${#FILES[@]} -eq 0 ] && FILES=(csrc/cuda/*.cu)
EXTRA=()
[ "${PTXAS_VERBOSE:-0}" = 1 ] && EXTRA+=(-Xptxas -v)
for f in "${FILES[@]}"; do
  echo "nvcc $f"
  nvcc -std=c++17 -O3 -arch="${ARCH:-sm_90}" --expt-relaxed-constexpr -DBLOSSOM_WITH_CUDA \
    -I csrc -I "$INC" "${EXTRA[@]}" -c "$f" -o /dev/null
done
