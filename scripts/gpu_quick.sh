#!/usr/bin/env bash
# Quick GPU round: incremental build, the device-parametrised tests of the given files
# (each in its own process, so one crash does not hide the rest), the float64 check,
# and a per-kernel profile. Used between kernel changes; scripts/gpu_check.sh is the full run.
#   OUT=dir FILES="test_a.py test_b.py" CASES=64x4096 scripts/gpu_quick.sh
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/.gpu_out}
mkdir -p "$OUT"
OUT=$OUT STEPS=build bash scripts/gpu_check.sh > /dev/null 2>&1
tail -1 "$OUT/summary.txt"
grep -E "error|Error" "$OUT/build.log" | grep -v "^ *#\|Werror\|error_" | head -20
for f in ${FILES:-}; do
  echo "== $f"
  CI=true timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -k cuda -p no:cacheprovider "tests/$f" 2>&1 \
    | grep -E "passed|failed|Error|error|assert|Fatal|Segmentation|FAILED" | head -${TEST_LINES:-12}
done
if [ "${CHECK:-1}" = 1 ]; then
  echo "== sanitize_ops --check"
  timeout 300 python3 scripts/sanitize_ops.py --check 2>&1 | tail -${CHECK_LINES:-12}
fi
if [ -n "${CASES:-}" ]; then
  echo "== profile"
  timeout 300 python3 benchmarks/profile_gpu.py --cases "$CASES" 2>&1 | grep -v Warn | tail -60
fi
