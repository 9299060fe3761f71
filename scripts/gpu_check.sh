#!/usr/bin/env bash
# Build, check, sanitize and benchmark blossom_ops on a CUDA machine, in one go.
#
#   OUT=/some/dir scripts/gpu_check.sh            # all steps
#   STEPS="build check" scripts/gpu_check.sh      # a subset (build must run once per machine)
#
# Steps: build  pip install -e . with the CUDA extension (TORCH_CUDA_ARCH_LIST, default 9.0)
#        check  scripts/sanitize_ops.py --check: every op fwd+bwd vs the float64 reference,
#               bit-identical backward, CUDA-graph capture; then benchmarks/check_select_gpu.py
#               benchmarks/check_short_gpu.py, check_short_select_gpu.py, check_bs_dkdv.py
#               and check_gate_fold_gpu.py (the fast paths' sweeps)
#        tests  pytest -q -k cuda on each tests/test_*.py in its own process
#        sanitize  compute-sanitizer memcheck and racecheck over scripts/sanitize_ops.py and
#               benchmarks/memcheck_fused.py (the fused two-branch kernels)
#        bench  benchmarks/bench_gpu.py (BENCH_ARGS passes extra arguments), then the
#               per-kernel profile (benchmarks/profile_gpu.py) appended to bench.log
# Logs (at most 8 files, the device tool's limit) go to $OUT: summary.txt, build.log,
# check.log, pytest.log, sanitizer.log, bench.log, bench_gpu.json, bench_gpu.csv.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/.gpu_out}
mkdir -p "$OUT"
STEPS=${STEPS:-"build check tests sanitize bench"}
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
SUMMARY="$OUT/summary.txt"
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv || true
  nvcc --version | tail -1 || true
  python3 -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'
} > "$SUMMARY" 2>&1

# Every step runs under a time limit (STEP_TIMEOUT seconds, default 300; the build gets
# BUILD_TIMEOUT, default 500, the whole tests step TESTS_TIMEOUT, default 1500): a kernel that hangs must cost one step, not the device call
# (a suspected hang on 2026-11-27 ate a whole 600 s call and the session's device time).
run_step() {  # name, logfile, command...
  local name=$1 log=$2; shift 2
  local limit=${STEP_TIMEOUT:-300}
  [ "$name" = build ] && limit=${BUILD_TIMEOUT:-500}
  [ "$name" = tests ] && limit=${TESTS_TIMEOUT:-1500}
  local t0=$(date +%s)
  timeout "$limit" "$@" > >(tee -a "$log") 2>&1
  local rc=$?
  local note=""
  [ $rc -eq 124 ] && note=" TIMED OUT after $limit s"
  echo "step $name: rc=$rc$note ($(( $(date +%s) - t0 )) s), log $(basename "$log")" | tee -a "$SUMMARY"
  return $rc
}

for step in $STEPS; do
  case $step in
    build)
      run_step build "$OUT/build.log" env MAX_JOBS=${MAX_JOBS:-16} \
        TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" BLOSSOM_OPS_CUDA=1 \
        python3 -m pip install --no-build-isolation --no-deps -v -e . || { echo "build failed"; exit 1; }
      ;;
    check)
      run_step check "$OUT/check.log" python3 scripts/sanitize_ops.py --check
      # The fast paths' own sweeps: tensor-core selection (1568 cases) and the fused
      # short-sequence path (82 cases, then again with the dK/dV cluster split at 2).
      run_step check_select "$OUT/check.log" python3 benchmarks/check_select_gpu.py check
      run_step check_short "$OUT/check.log" python3 benchmarks/check_short_gpu.py --quick --no-time
      run_step check_short_split2 "$OUT/check.log" env BLOSSOM_OPS_CUDA_SHORT_SPLIT=2 \
        python3 benchmarks/check_short_gpu.py --quick --no-time
      # the short path's fused compression + selection against the two ops it replaces
      run_step check_short_select "$OUT/check.log" python3 benchmarks/check_short_select_gpu.py check
      # block-sparse dK/dV (mma.sync kernel, and the wmma one behind the switch) and the
      # gate fold's three backward routes, against float64
      run_step check_bs_dkdv "$OUT/check.log" python3 benchmarks/check_bs_dkdv.py check
      run_step check_bs_dkdv_old "$OUT/check.log" env BLOSSOM_OPS_CUDA_BS_DKDV=old \
        python3 benchmarks/check_bs_dkdv.py check
      run_step check_gate_fold "$OUT/check.log" python3 benchmarks/check_gate_fold_gpu.py --quick

      ;;
    tests)
      if [ -d tests ]; then
        # One process per file: a crash in one file must not hide the results of the
        # others (a host crash in error formatting did, before BLOSSOM_CHECK).
        run_step tests "$OUT/pytest.log" bash -c '
          rc=0
          for f in tests/test_*.py; do
            out=$(CI=true timeout 900 python3 -m pytest -q -k cuda -p no:cacheprovider "$f" 2>&1)
            r=$?
            [ $r -eq 5 ] && r=0  # no CUDA case in this file
            echo "$f: rc=$r $(echo "$out" | tail -1)"
            [ $r -ne 0 ] && { echo "$out" | tail -30; rc=1; }
          done
          # blossom_attention again with the fused short-sequence path off, so the
          # composed path (the one every L > 256 takes) is tested at these short lengths too.
          out=$(BLOSSOM_OPS_CUDA_SHORT_MAX_LEN=0 CI=true timeout 900 python3 -m pytest -q -k cuda \
                -p no:cacheprovider tests/test_blossom_attention.py 2>&1)
          r=$?
          echo "test_blossom_attention.py (short path off): rc=$r $(echo "$out" | tail -1)"
          [ $r -ne 0 ] && { echo "$out" | tail -30; rc=1; }
          exit $rc'
      else
        echo "step tests: skipped (no tests/ directory)" | tee -a "$SUMMARY"
      fi
      ;;
    sanitize)
      # No caching allocator: every tensor is its own allocation, so memcheck sees
      # out-of-bounds accesses that would otherwise land inside a pooled block.
      run_step memcheck "$OUT/sanitizer.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
        compute-sanitizer --tool memcheck --error-exitcode 3 --print-limit 20 \
        python3 scripts/sanitize_ops.py
      run_step racecheck "$OUT/sanitizer.log" compute-sanitizer --tool racecheck \
        --racecheck-report analysis --error-exitcode 3 --print-limit 20 \
        python3 scripts/sanitize_ops.py
      # sanitize_ops stays on the short path (L <= 70); the fused two-branch kernels run here
      run_step memcheck_fused "$OUT/sanitizer.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
        compute-sanitizer --tool memcheck --error-exitcode 3 --print-limit 20 \
        python3 benchmarks/memcheck_fused.py
      run_step racecheck_fused "$OUT/sanitizer.log" compute-sanitizer --tool racecheck \
        --racecheck-report analysis --error-exitcode 3 --print-limit 20 \
        python3 benchmarks/memcheck_fused.py
      ;;
    bench)
      run_step bench "$OUT/bench.log" python3 benchmarks/bench_gpu.py --out "$OUT" ${BENCH_ARGS:-}
      # per-kernel times into the same log (the device tool returns at most 8 files)
      run_step profile "$OUT/bench.log" python3 benchmarks/profile_gpu.py
      ;;
    *) echo "unknown step $step" | tee -a "$SUMMARY" ;;
  esac
done
cat "$SUMMARY"
