#!/usr/bin/env bash
# RecBole 1.2.1 needs numpy<2, which the main .venv does not have. It gets its own
# environment, .venv-recbole, that sees .venv's packages (torch, blossom_ops, pytest)
# *behind* its own (numpy<2, recbole and its dependencies), so nothing is built twice.
# Run scripts/setup.sh first. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || { echo "[recbole] run scripts/setup.sh first"; exit 1; }
BASE=$(.venv/bin/python -c "import sys; print(sys._base_executable)")
[ -x .venv-recbole/bin/python ] || "$BASE" -m venv .venv-recbole
main_site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
own_site=$(.venv-recbole/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
# addsitedir (not a plain path line) so .venv's own .pth files, e.g. the editable
# install of blossom_ops, are processed too; appended, so this venv's numpy wins.
echo "import site; site.addsitedir('$main_site')" > "$own_site/zz_blossom_main_env.pth"
if ! .venv-recbole/bin/python -c "import recbole, numpy; assert numpy.__version__ < '2'" 2>/dev/null; then
  echo "[recbole] installing numpy<2 and recbole==1.2.1 into .venv-recbole"
  .venv-recbole/bin/python -m pip install -q "numpy<2" "recbole==1.2.1"
fi
.venv-recbole/bin/python -c "import torch, numpy, recbole, blossom_ops; print('[recbole] torch', torch.__version__, '| numpy', numpy.__version__, '| recbole', recbole.__version__)"
