#!/usr/bin/env bash
# Sets up a development environment in .venv: torch (pinned), the build tools, and
# blossom_ops installed editable with its test and plot extras. Idempotent: a second run
# reuses the venv and skips the (slow) C++ build when no source file changed.
#
# Environment: PYTHON (default python3), MAX_JOBS (default 2: the machine has 2 cores),
# BLOSSOM_OPS_CUDA (see setup.py), FORCE_REBUILD=1 to rebuild anyway.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_VERSION=2.13.0
export MAX_JOBS=${MAX_JOBS:-2}

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PYTHON" -m venv .venv
fi
PY=.venv/bin/python

# torch pinned: an unpinned `pip install torch` resolves to a multi-GB CUDA build. On a
# CPU machine whose pip is pointed at a local CPU wheel, this pin picks that wheel.
if ! "$PY" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" \
    2>/dev/null; then
  echo "[setup] installing torch==$TORCH_VERSION"
  "$PY" -m pip install "torch==$TORCH_VERSION"
fi

# --no-build-isolation builds against the torch above, so the build tools must be here.
"$PY" -m pip install -q "setuptools>=64" wheel ninja

# Rebuild only when a build input changed (the stamp is a hash of them).
stamp=.venv/.blossom_ops_build_stamp
hash=$( (find csrc -type f \( -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' \) \
          -print0 | sort -z | xargs -0 cat; cat setup.py pyproject.toml;
         echo "${BLOSSOM_OPS_CUDA-}") | sha256sum | cut -d' ' -f1)
if [ "${FORCE_REBUILD:-0}" != 1 ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$hash" ] \
    && "$PY" -c "import blossom_ops" 2>/dev/null; then
  echo "[setup] blossom_ops is up to date"
else
  echo "[setup] building and installing blossom_ops (MAX_JOBS=$MAX_JOBS)"
  "$PY" -m pip install --no-build-isolation -e ".[test,plots,hf]"
  echo "$hash" > "$stamp"
fi
"$PY" -c "import torch, blossom_ops; print('[setup] torch', torch.__version__, '| blossom_ops', blossom_ops.__version__, '| cuda', torch.cuda.is_available())"
