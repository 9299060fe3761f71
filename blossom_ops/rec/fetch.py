"""Fetch the default dataset, MovieLens-100k, from the recbole wheel on PyPI.

The wheel (recbole 1.2.1, ~2 MB) ships ``recbole/dataset_example/ml-100k/ml-100k.inter``;
we download it once with pip (or, when pip cannot, straight from PyPI's JSON API), extract
that one file into the user's cache directory and never touch the network again.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile

from .errors import DataError

RECBOLE_VERSION = "1.2.1"
ML100K_MEMBER = "recbole/dataset_example/ml-100k/ml-100k.inter"


def cache_dir() -> str:
    """$BLOSSOM_OPS_CACHE, else $XDG_CACHE_HOME/blossom_ops, else ~/.cache/blossom_ops."""
    explicit = os.environ.get("BLOSSOM_OPS_CACHE")
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "blossom_ops")


def _wheel_with_pip(dest: str) -> str:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", dest, f"recbole=={RECBOLE_VERSION}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    wheels = [f for f in os.listdir(dest) if f.endswith(".whl")]
    if proc.returncode != 0 or not wheels:
        raise OSError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip()
                      else "pip download failed")
    return os.path.join(dest, wheels[0])


def _wheel_from_pypi(dest: str) -> str:
    url = f"https://pypi.org/pypi/recbole/{RECBOLE_VERSION}/json"
    with urllib.request.urlopen(url, timeout=60) as r:
        meta = json.load(r)
    wheel = next(u for u in meta["urls"] if u["filename"].endswith(".whl"))
    path = os.path.join(dest, wheel["filename"])
    with urllib.request.urlopen(wheel["url"], timeout=300) as r, open(path, "wb") as f:
        shutil.copyfileobj(r, f)
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != wheel["digests"]["sha256"]:
        raise OSError(f"checksum mismatch for {wheel['filename']}")
    return path


def ml100k_path(quiet: bool = False) -> str:
    """Path of the cached ml-100k.inter, fetching it on first use."""
    target_dir = os.path.join(cache_dir(), "ml-100k")
    target = os.path.join(target_dir, "ml-100k.inter")
    if os.path.isfile(target):
        return target
    if not quiet:
        print(f"fetching MovieLens-100k from the recbole=={RECBOLE_VERSION} wheel on PyPI ...",
              file=sys.stderr)
    errors = []
    with tempfile.TemporaryDirectory() as tmp:
        wheel = None
        for how in (_wheel_with_pip, _wheel_from_pypi):
            try:
                wheel = how(tmp)
                break
            except Exception as e:  # noqa: BLE001  (network failures come in many types)
                errors.append(f"{how.__name__}: {e}")
        if wheel is None:
            raise DataError("could not download MovieLens-100k (recbole wheel) from PyPI: "
                            + "; ".join(errors)
                            + ". Check the network, or pass a local file with --data PATH.")
        try:
            with zipfile.ZipFile(wheel) as z:
                payload = z.read(ML100K_MEMBER)
        except (zipfile.BadZipFile, KeyError) as e:
            raise DataError(f"{os.path.basename(wheel)} does not hold {ML100K_MEMBER}: {e}") \
                from None
    os.makedirs(target_dir, exist_ok=True)
    tmp_target = target + ".part"
    with open(tmp_target, "wb") as f:
        f.write(payload)
    os.replace(tmp_target, target)  # atomic: a crash never leaves half a file in the cache
    return target
