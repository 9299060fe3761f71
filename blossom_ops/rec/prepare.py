"""From raw interactions to per-user chronological item sequences, and the leave-one-out split.

Item ids start at 1: id 0 is the padding token of every model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List

import numpy as np

from .errors import DataError
from .formats import Interactions


@dataclass
class SequenceData:
    """Chronological item sequences, one per user (items are 1..num_items)."""
    sequences: List[np.ndarray]
    num_items: int
    user_tokens: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=str))
    item_tokens: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=str))

    @property
    def num_users(self) -> int:
        return len(self.sequences)

    @property
    def num_interactions(self) -> int:
        return int(sum(len(s) for s in self.sequences))

    def describe(self) -> Dict[str, float]:
        lengths = np.array([len(s) for s in self.sequences]) if self.sequences else np.zeros(1)
        return {
            "users": self.num_users,
            "items": self.num_items,
            "interactions": self.num_interactions,
            "density": self.num_interactions / max(1, self.num_users * self.num_items),
            "length_min": int(lengths.min()),
            "length_median": float(np.median(lengths)),
            "length_mean": float(lengths.mean()),
            "length_p90": float(np.percentile(lengths, 90)),
            "length_max": int(lengths.max()),
        }


def k_core(data: Interactions, min_user: int = 5, min_item: int = 5) -> Interactions:
    """Drop users with fewer than ``min_user`` and items with fewer than ``min_item``
    interactions, repeatedly, until both hold (dropping items can push a user below)."""
    user, item, time = data.user, data.item, data.time
    while True:
        _, uinv, ucount = np.unique(user, return_inverse=True, return_counts=True)
        _, iinv, icount = np.unique(item, return_inverse=True, return_counts=True)
        keep = (ucount[uinv] >= min_user) & (icount[iinv] >= min_item)
        if keep.all():
            break
        user, item, time = user[keep], item[keep], time[keep]
    if len(user) == 0:
        raise DataError(f"nothing is left after {min_user}-core users / {min_item}-core items "
                        "filtering; lower --min-user/--min-item")
    return Interactions(user, item, time)


def to_sequences(data: Interactions) -> SequenceData:
    """Assign item ids 1..N (in order of first appearance in time) and build each user's
    sequence sorted by timestamp; ties keep file order (a stable sort)."""
    order = np.lexsort((np.arange(len(data)), data.time))  # time, then file order
    user, item = data.user[order], data.item[order]
    item_tokens, first = np.unique(item, return_index=True)
    # ids by first appearance: deterministic and independent of how tokens sort as strings
    by_first = np.argsort(first, kind="stable")
    item_tokens = item_tokens[by_first]
    item_id = {tok: i + 1 for i, tok in enumerate(item_tokens)}
    ids = np.fromiter((item_id[t] for t in item), dtype=np.int64, count=len(item))
    user_tokens, uinv = np.unique(user, return_inverse=True)
    by_user = np.argsort(uinv, kind="stable")  # keeps chronological order within a user
    bounds = np.searchsorted(uinv[by_user], np.arange(len(user_tokens) + 1))
    seqs = [ids[by_user[bounds[u]:bounds[u + 1]]] for u in range(len(user_tokens))]
    return SequenceData(seqs, len(item_tokens), user_tokens, item_tokens)


@dataclass
class Split:
    """Chronological leave-one-out: per user, ``train`` is every item but the last two,
    validation predicts the second to last from the items before it, test predicts the last
    from everything before it. Users with fewer than 3 items are dropped."""
    train: List[np.ndarray]      # training sequences
    valid_target: np.ndarray     # [U] second-to-last item
    test_target: np.ndarray      # [U] last item
    full: List[np.ndarray]       # whole sequences (for history exclusion and test inputs)
    num_items: int

    @property
    def num_users(self) -> int:
        return len(self.train)

    def valid_history(self, u: int) -> np.ndarray:
        return self.full[u][:-2]

    def test_history(self, u: int) -> np.ndarray:
        return self.full[u][:-1]


def leave_one_out(data: SequenceData) -> Split:
    seqs = [s for s in data.sequences if len(s) >= 3]
    if not seqs:
        raise DataError("no user has the 3 interactions leave-one-out needs")
    return Split(train=[s[:-2] for s in seqs],
                 valid_target=np.array([s[-2] for s in seqs], dtype=np.int64),
                 test_target=np.array([s[-1] for s in seqs], dtype=np.int64),
                 full=seqs, num_items=data.num_items)
