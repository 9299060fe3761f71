"""Readers for the interaction file formats sequential-recommendation code meets in practice.

Every reader returns an :class:`Interactions` (three parallel arrays: user, item, timestamp)
with the raw user and item tokens as strings; ids are assigned later, after filtering.
When a format carries no timestamp (the "user item" per line format of the SASRec code),
the line number stands in for it, because those files are already in chronological order.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .errors import DataError

FORMATS = ("auto", "inter", "udata", "dat", "mlcsv", "pairs", "csv")


@dataclass
class Interactions:
    """Raw interactions: user and item tokens (str arrays) and float64 timestamps."""
    user: np.ndarray
    item: np.ndarray
    time: np.ndarray

    def __len__(self) -> int:
        return len(self.user)


def _build(rows_user, rows_item, rows_time, path: str) -> Interactions:
    if not rows_user:
        raise DataError(f"{path}: no interactions found")
    return Interactions(np.asarray(rows_user, dtype=object).astype(str),
                        np.asarray(rows_item, dtype=object).astype(str),
                        np.asarray(rows_time, dtype=np.float64))


def _float(value: str, path: str, lineno: int, what: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise DataError(f"{path}:{lineno}: {what} {value!r} is not a number") from None


def read_inter(path: str) -> Interactions:
    """RecBole atomic file: tab-separated, header of ``name:type`` fields
    (``user_id:token  item_id:token  rating:float  timestamp:float``)."""
    users, items, times = [], [], []
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        names = [h.split(":")[0] for h in header]
        try:
            ui, ii = names.index("user_id"), names.index("item_id")
        except ValueError:
            raise DataError(f"{path}: a RecBole .inter header needs user_id and item_id fields, "
                            f"got {header}") from None
        ti = names.index("timestamp") if "timestamp" in names else None
        for lineno, line in enumerate(f, start=2):
            line = line.rstrip("\n")
            if not line:
                continue
            parts = line.split("\t")
            if len(parts) < len(names):
                raise DataError(f"{path}:{lineno}: expected {len(names)} tab-separated fields, "
                                f"got {len(parts)}")
            users.append(parts[ui])
            items.append(parts[ii])
            times.append(_float(parts[ti], path, lineno, "timestamp") if ti is not None
                         else float(lineno))
    return _build(users, items, times, path)


def _read_delimited(path: str, sep: Optional[str], skip_header: bool) -> Interactions:
    """user, item, rating, timestamp per line (GroupLens layouts)."""
    users, items, times = [], [], []
    with open(path, encoding="latin-1") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.strip()
            if not line or (skip_header and lineno == 1):
                continue
            parts = line.split(sep)
            if len(parts) < 4:
                raise DataError(f"{path}:{lineno}: expected user, item, rating, timestamp; "
                                f"got {line!r}")
            users.append(parts[0])
            items.append(parts[1])
            times.append(_float(parts[3], path, lineno, "timestamp"))
    return _build(users, items, times, path)


def read_udata(path: str) -> Interactions:
    """MovieLens-100k ``u.data``: tab-separated user, item, rating, timestamp."""
    return _read_delimited(path, "\t", skip_header=False)


def read_dat(path: str) -> Interactions:
    """MovieLens-1M/10M ``ratings.dat``: ``user::item::rating::timestamp``."""
    return _read_delimited(path, "::", skip_header=False)


def read_mlcsv(path: str) -> Interactions:
    """MovieLens 20M/25M/latest ``ratings.csv``: header ``userId,movieId,rating,timestamp``."""
    return read_csv(path, user_col="userId", item_col="movieId", time_col="timestamp")


def read_pairs(path: str) -> Interactions:
    """"user item" per line, whitespace separated, in chronological order per user
    (the format of the original SASRec code). Extra columns are ignored."""
    users, items, times = [], [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 2:
                raise DataError(f"{path}:{lineno}: expected 'user item', got {line.strip()!r}")
            users.append(parts[0])
            items.append(parts[1])
            times.append(float(lineno))
    return _build(users, items, times, path)


def read_csv(path: str, *, user_col: str = "user", item_col: str = "item",
             time_col: Optional[str] = "timestamp", sep: str = ",") -> Interactions:
    """Any delimited file with a header naming the user, item and (optional) time columns."""
    users, items, times = [], [], []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter=sep)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise DataError(f"{path}: empty file") from None
        missing = [c for c in (user_col, item_col) if c not in header]
        if time_col is not None and time_col not in header:
            missing.append(time_col)
        if missing:
            raise DataError(f"{path}: column(s) {missing} not in header {header}; "
                            f"name them with --user-col/--item-col/--time-col")
        ui, ii = header.index(user_col), header.index(item_col)
        ti = header.index(time_col) if time_col is not None else None
        for lineno, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) < len(header):
                raise DataError(f"{path}:{lineno}: expected {len(header)} fields, got {len(row)}")
            users.append(row[ui].strip())
            items.append(row[ii].strip())
            times.append(_float(row[ti], path, lineno, "timestamp") if ti is not None
                         else float(lineno))
    return _build(users, items, times, path)


def detect_format(path: str) -> str:
    """Guess the format from the file name, then from the first line."""
    name = os.path.basename(path).lower()
    if name.endswith(".inter"):
        return "inter"
    if name == "u.data":
        return "udata"
    if name.endswith(".dat"):
        return "dat"
    with open(path, encoding="latin-1") as f:
        first = f.readline()
    if name == "ratings.csv" or first.startswith("userId,movieId"):
        return "mlcsv"
    if name.endswith(".csv"):
        return "csv"
    if "::" in first:
        return "dat"
    if len(first.split()) == 2:
        return "pairs"
    if len(first.split("\t")) == 4:
        return "udata"
    raise DataError(f"{path}: cannot tell its format; pass --format one of {FORMATS[1:]}")


def read_interactions(path: str, fmt: str = "auto", *, user_col: str = "user",
                      item_col: str = "item", time_col: Optional[str] = "timestamp",
                      sep: str = ",") -> Interactions:
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}; choose one of {FORMATS}")
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt == "csv":
        return read_csv(path, user_col=user_col, item_col=item_col, time_col=time_col, sep=sep)
    return {"inter": read_inter, "udata": read_udata, "dat": read_dat, "mlcsv": read_mlcsv,
            "pairs": read_pairs}[fmt](path)
