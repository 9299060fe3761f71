#!/usr/bin/env bash
# Host-side AddressSanitizer run of some CUDA tests: builds a copy of the tree with
# BLOSSOM_OPS_ASAN=1 in /tmp (so the normal build is untouched) and runs pytest there with
# libasan preloaded. Finds host heap corruption that only shows up later as a crash.
#   OUT=dir scripts/asan_cuda_tests.sh tests/test_input_checks.py -k cuda
set -u -o pipefail
SRC=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-/tmp}
DST=/tmp/blossom_asan
rm -rf "$DST" && mkdir -p "$DST"
cp -r "$SRC"/{csrc,blossom_ops,integrations,tests,setup.py,pyproject.toml} "$DST"/
cd "$DST"
rm -f blossom_ops/_C*.so
GXX=$(command -v g++ || echo /opt/gcc/bin/g++)
if ! BLOSSOM_OPS_ASAN=1 BLOSSOM_OPS_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} \
    MAX_JOBS=${MAX_JOBS:-8} python3 setup.py build_ext --inplace > "$OUT/asan_build.log" 2>&1; then
  echo "asan build failed"; tail -20 "$OUT/asan_build.log"; exit 1
fi
# libstdc++ preloaded too: python is not C++, so without it ASan cannot find the real
# __cxa_throw at start-up and aborts at the first C++ exception.
LIBASAN="$("$GXX" -print-file-name=libasan.so) $("$GXX" -print-file-name=libstdc++.so)"
echo "libasan: $LIBASAN"
LD_PRELOAD=$LIBASAN ASAN_OPTIONS=protect_shadow_gap=0:detect_leaks=0:halt_on_error=1 \
  PYTHONPATH=$DST CI=true python3 -c "import blossom_ops; print('asan tree:', blossom_ops.__file__)"
LD_PRELOAD=$LIBASAN ASAN_OPTIONS=protect_shadow_gap=0:detect_leaks=0:halt_on_error=1 \
  PYTHONPATH=$DST CI=true python3 -m pytest -q -p no:cacheprovider "$@" 2>&1 | tail -${ASAN_TAIL_LINES:-400}
