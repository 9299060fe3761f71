"""Ranking metrics for one held-out item per user.

The rank of the target is the number of candidates scored at least as high as it, other than
itself (0 = top). Ties therefore count against the target: a model that scores everything
equally gets rank N-1, not a perfect score.

    HR@k   = [rank < k]
    NDCG@k = [rank < k] / log2(rank + 2)     (one relevant item: IDCG = 1)
    MRR@k  = [rank < k] / (rank + 1);  MRR without a cut-off uses every rank.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional

import torch
from torch import Tensor

KS = (5, 10, 20)


def target_rank(scores: Tensor, target: Tensor, candidates: Optional[Tensor] = None) -> Tensor:
    """scores [B, N], target int64 [B] (column index) -> int64 rank [B].

    ``candidates`` (bool [B, N]) restricts the ranking to those columns (the target's column
    always competes); excluded columns, like -inf scores, never outrank the target unless the
    target itself is -inf.
    """
    t = scores.gather(1, target[:, None])
    beats = scores >= t
    if candidates is not None:
        beats &= candidates
    beats[torch.arange(len(target), device=scores.device), target] = False
    return beats.sum(1)


def metrics_from_ranks(rank: Tensor, ks: Iterable[int] = KS) -> Dict[str, Tensor]:
    """Per-user metric values (float64 [B]) keyed 'HR@k', 'NDCG@k', 'MRR@k' and 'MRR'."""
    r = rank.to(torch.float64)
    out = {}
    for k in ks:
        hit = r < k
        out[f"HR@{k}"] = hit.to(torch.float64)
        out[f"NDCG@{k}"] = torch.where(hit, 1.0 / torch.log2(r + 2.0), torch.zeros_like(r))
        out[f"MRR@{k}"] = torch.where(hit, 1.0 / (r + 1.0), torch.zeros_like(r))
    out["MRR"] = 1.0 / (r + 1.0)
    return out


class MetricSum:
    """Accumulates per-user metric sums; ``mean()`` after all users (or after an all-reduce
    of ``as_tensor()`` across processes)."""

    def __init__(self, ks: Iterable[int] = KS):
        self.ks = tuple(ks)
        self.sums: Dict[str, float] = {}
        self.count = 0

    def add(self, rank: Tensor) -> None:
        for name, values in metrics_from_ranks(rank, self.ks).items():
            self.sums[name] = self.sums.get(name, 0.0) + float(values.sum())
        self.count += len(rank)

    def names(self):
        return list(metrics_from_ranks(torch.zeros(1, dtype=torch.long), self.ks).keys())

    def as_tensor(self) -> Tensor:
        return torch.tensor([self.sums.get(n, 0.0) for n in self.names()] + [self.count],
                            dtype=torch.float64)

    def load_tensor(self, t: Tensor) -> None:
        names = self.names()
        self.sums = {n: float(t[i]) for i, n in enumerate(names)}
        self.count = int(t[-1])

    def mean(self) -> Dict[str, float]:
        return {n: self.sums.get(n, 0.0) / max(1, self.count) for n in self.names()}
