#!/usr/bin/env bash
# Builds libblossom_ops and the C++ tests with CMake (CMakeLists.txt) in build/cmake and runs
# them with ctest. Exits non-zero when configuring, building or any test fails.
#   BLOSSOM_CMAKE_JOBS   parallel compile jobs (default 2: the CI machine has 2 cores)
#   BLOSSOM_CMAKE_ARGS   extra cmake arguments, e.g. "-DBLOSSOM_OPS_WITH_CUDA=OFF"
#   PYTHON               the Python whose torch is linked (default: python3 on PATH)
set -euo pipefail
cd "$(dirname "$0")/.."

build_dir=build/cmake
jobs="${BLOSSOM_CMAKE_JOBS:-2}"
generator=()
if command -v ninja >/dev/null 2>&1; then generator=(-G Ninja); fi
# A cache made with another generator cannot be reused; start that build dir afresh.
if [[ -f "$build_dir/CMakeCache.txt" ]] && ! grep -q "CMAKE_GENERATOR:INTERNAL=${generator[1]:-Unix Makefiles}\$" "$build_dir/CMakeCache.txt"; then
  rm -rf "$build_dir"
fi

echo "== cmake configure ($build_dir)"
# shellcheck disable=SC2086  # BLOSSOM_CMAKE_ARGS is a list of arguments
python="$(command -v "${PYTHON:-python3}")"
cmake -S . -B "$build_dir" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DPython3_EXECUTABLE="$python" ${BLOSSOM_CMAKE_ARGS:-}
echo "== cmake build (-j$jobs)"
cmake --build "$build_dir" -j "$jobs"
echo "== ctest"
# --no-tests=error: a build that registered no test must not pass as green
ctest --test-dir "$build_dir" --output-on-failure --no-tests=error -j 1
