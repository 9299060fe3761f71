"""Load a dataset by name or path, filter it and cache the parsed sequences.

``load_sequences(DataSpec(...))`` is the one entry point the trainer and the command line use.
Parsed results are cached as .npz under the cache directory, keyed by the file (path, size,
mtime) and the filtering options, so a second run does not re-parse.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

from .errors import DataError
from .fetch import cache_dir, ml100k_path
from .formats import read_interactions
from .prepare import SequenceData, k_core, to_sequences

BUILTIN = ("ml-100k",)


@dataclass
class DataSpec:
    data: str = "ml-100k"          # a built-in name or a file path
    format: str = "auto"
    user_col: str = "user"
    item_col: str = "item"
    time_col: Optional[str] = "timestamp"
    sep: str = ","
    min_user: int = 5
    min_item: int = 5


def resolve_path(spec: DataSpec, quiet: bool = False) -> str:
    if spec.data in BUILTIN:
        return ml100k_path(quiet=quiet)
    if not os.path.exists(spec.data):
        raise DataError(f"{spec.data}: no such file (built-in datasets: {', '.join(BUILTIN)})")
    return spec.data


def _cache_key(path: str, spec: DataSpec) -> str:
    st = os.stat(path)
    fields = asdict(spec)
    fields.pop("data")
    raw = f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{sorted(fields.items())}"
    return hashlib.sha1(raw.encode()).hexdigest()[:16]


def _save(path: str, seqs: SequenceData) -> None:
    lengths = np.array([len(s) for s in seqs.sequences], dtype=np.int64)
    flat = np.concatenate(seqs.sequences) if seqs.sequences else np.zeros(0, np.int64)
    tmp = path + ".part.npz"
    np.savez_compressed(tmp, flat=flat, lengths=lengths, num_items=seqs.num_items,
                        user_tokens=seqs.user_tokens.astype(str),
                        item_tokens=seqs.item_tokens.astype(str))
    os.replace(tmp, path)


def _load(path: str) -> SequenceData:
    with np.load(path) as z:
        bounds = np.concatenate([[0], np.cumsum(z["lengths"])])
        flat = z["flat"]
        seqs = [flat[bounds[i]:bounds[i + 1]] for i in range(len(bounds) - 1)]
        return SequenceData(seqs, int(z["num_items"]), z["user_tokens"], z["item_tokens"])


def load_sequences(spec: DataSpec, *, use_cache: bool = True, quiet: bool = False) -> SequenceData:
    path = resolve_path(spec, quiet=quiet)
    cached = os.path.join(cache_dir(), "parsed", _cache_key(path, spec) + ".npz")
    if use_cache and os.path.isfile(cached):
        try:
            return _load(cached)
        except Exception:  # noqa: BLE001  (a damaged cache file is simply rebuilt)
            pass
    raw = read_interactions(path, spec.format, user_col=spec.user_col, item_col=spec.item_col,
                            time_col=spec.time_col, sep=spec.sep)
    seqs = to_sequences(k_core(raw, spec.min_user, spec.min_item))
    if use_cache:
        try:
            os.makedirs(os.path.dirname(cached), exist_ok=True)
            _save(cached, seqs)
        except OSError:
            pass  # a read-only cache only costs re-parsing next time
    return seqs
