#!/usr/bin/env bash
# The one test command (CI runs it through .ci/run): set up .venv, run the Python test
# suite, then the C++ tests when scripts/cpp_tests.sh exists. Exits non-zero when any part
# fails, and treats "no tests collected" as a failure.
#
# Extra arguments go to pytest (e.g. scripts/test.sh -k sliding -x).
# HYPOTHESIS_PROFILE=thorough for many more property-test examples (default: ci).
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)

bash scripts/setup.sh || { echo "[test] setup failed"; exit 1; }
PY=.venv/bin/python
export HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-ci}

status=0
"$PY" -m pytest -q tests/ "$@"
rc=$?
if [ $rc -eq 5 ]; then
  echo "[test] pytest collected no tests: counted as a failure"
  status=1
elif [ $rc -ne 0 ]; then
  echo "[test] pytest failed (exit $rc)"
  status=1
fi

if [ -f scripts/cpp_tests.sh ]; then
  echo "[test] C++ tests (scripts/cpp_tests.sh)"
  if ! PATH="$PWD/.venv/bin:$PATH" bash scripts/cpp_tests.sh; then
    echo "[test] C++ tests failed"
    status=1
  fi
fi

echo "[test] total $(( $(date +%s) - start )) s, $([ $status -eq 0 ] && echo OK || echo FAILED)"
exit $status
