#!/usr/bin/env bash
# A/B of two builds on one GPU machine: a base ref against the working tree, per-kernel times
# alternated (machines differ by a few percent, so only same-machine pairs compare).
#
#   scripts/gpu_ab.sh prepare [REF]   # here, before the device call: base_src/ = REF (HEAD)
#   OUT=dir scripts/gpu_ab.sh run     # on the GPU machine: builds both, then alternates
#                                     # base / new profile_gpu.py runs (REPS times, default 2)
#   rm -rf base_src                   # afterwards (base_src/ must not be committed)
#
# base_src/ is left untracked and not ignored on purpose: the device tool copies such files.
# The two builds run in parallel (MAX_JOBS each, default 8: ~5 minutes on 16 cores); the base
# build is in place (setup.py build_ext --inplace), so base runs use PYTHONPATH=base_src.
# CASES (default 64x4096,64x16384: D x L at B=64 Hq=8 Hk=2 bf16) and STEPS pass through to
# benchmarks/profile_gpu.py. Environment switches read once per process (BLOSSOM_OPS_CUDA_*)
# need no second build: benchmarks/step_ab_gpu.py alternates them in fresh processes.
set -u -o pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  prepare)
    ref=${2:-HEAD}
    rm -rf base_src && mkdir base_src
    git archive "$ref" csrc setup.py pyproject.toml blossom_ops integrations benchmarks \
      | tar -x -C base_src
    echo "base_src/ = $(git rev-parse --short "$ref")"
    ;;
  run)
    [ -d base_src ] || { echo "no base_src/: run 'scripts/gpu_ab.sh prepare' first"; exit 2; }
    OUT=${OUT:-$PWD/.gpu_out}
    mkdir -p "$OUT"
    export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} BLOSSOM_OPS_CUDA=1
    jobs=${MAX_JOBS:-8}
    nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader | tee "$OUT/ab.txt"
    (cd base_src && MAX_JOBS=$jobs timeout -k 5 "${BUILD_TIMEOUT:-420}" \
       python3 setup.py build_ext --inplace > "$OUT/build_base.log" 2>&1
     echo "base build rc $?") &
    (MAX_JOBS=$jobs timeout -k 5 "${BUILD_TIMEOUT:-420}" \
       python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build_new.log" 2>&1
     echo "new build rc $?") &
    wait
    prof=(benchmarks/profile_gpu.py --cases "${CASES:-64x4096,64x16384}" --steps "${STEPS:-5}")
    for rep in $(seq "${REPS:-2}"); do
      echo "== base $rep"
      (cd base_src && PYTHONPATH=$PWD timeout -k 5 120 python3 "${prof[@]}")
      echo "== new $rep"
      timeout -k 5 120 python3 "${prof[@]}"
    done 2>&1 | grep -v "UserWarning\|_warn_once" | tee -a "$OUT/ab.txt"
    ;;
  *)
    sed -n '2,15p' "$0"
    exit 2
    ;;
esac
