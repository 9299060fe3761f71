"""Leave-one-out evaluation: full ranking over all items, and the sampled protocol.

Full ranking (the default, and what every headline number uses) scores the held-out item
against every item in the catalogue. ``exclude_seen`` removes items of the user's input
history from the competition. The *sampled* protocol of the BlossomRec paper ranks the
target against 100 items drawn uniformly from those the user never interacted with; its
numbers are reported under keys prefixed ``sampled100/`` because they are not comparable with
full-ranking numbers (they are much higher).
"""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from .batches import pad
from .errors import RecError
from .metrics import MetricSum, target_rank
from .prepare import Split

SAMPLED_NEGATIVES = 100
SAMPLED_SEED = 20240601  # fixed: every model is scored against the same negatives


def sample_negatives(split: Split, n: int = SAMPLED_NEGATIVES,
                     seed: int = SAMPLED_SEED) -> np.ndarray:
    """int64 [U, n]: per user, n distinct items the user never interacted with."""
    rng = np.random.default_rng(seed)
    out = np.zeros((split.num_users, n), dtype=np.int64)
    for u, seq in enumerate(split.full):
        seen = set(seq.tolist())
        if split.num_items - len(seen) < n:
            raise RecError(f"the sampled protocol needs {n} unseen items per user; user {u} "
                           f"has seen {len(seen)} of {split.num_items}")
        chosen: List[int] = []
        picked = set()
        while len(chosen) < n:
            for c in rng.integers(1, split.num_items + 1, size=2 * n).tolist():
                if c not in seen and c not in picked:
                    picked.add(c)
                    chosen.append(c)
                    if len(chosen) == n:
                        break
        out[u] = chosen
    return out


@torch.no_grad()
def evaluate(model, split: Split, stage: str = "valid", *, device="cpu", batch_size: int = 256,
             exclude_seen: bool = False, negatives: Optional[np.ndarray] = None,
             rank: int = 0, world: int = 1, amp_dtype=None) -> Dict[str, float]:
    """Mean metrics over users (this process scores users rank::world, then all-reduce).

    ``negatives`` (from :func:`sample_negatives`) adds the sampled-protocol metrics.
    """
    was_training = model.training
    model.eval()
    targets = split.valid_target if stage == "valid" else split.test_target
    history = split.valid_history if stage == "valid" else split.test_history
    users = list(range(rank, split.num_users, world))
    full, sampled = MetricSum(), MetricSum()
    for start in range(0, len(users), batch_size):
        us = users[start:start + batch_size]
        inputs = [model.eval_input(history(u)) for u in us]
        items = pad(inputs).to(device)
        lengths = torch.tensor([len(x) for x in inputs], dtype=torch.long, device=device)
        target = torch.as_tensor(targets[us], device=device)
        with torch.autocast(device_type=torch.device(device).type, dtype=amp_dtype,
                            enabled=amp_dtype is not None):
            scores = model.predict(items, lengths)
        scores = scores.float()
        cand = None
        if exclude_seen:
            cand = torch.ones_like(scores, dtype=torch.bool)
            hist = pad([history(u) for u in us]).to(device)
            cand.scatter_(1, hist, False)  # padding 0 lands on column 0, already -inf
        full.add(target_rank(scores, target, cand).cpu())
        if negatives is not None:
            cols = torch.cat([target[:, None], torch.as_tensor(negatives[us], device=device)], 1)
            sub = scores.gather(1, cols)
            sampled.add(target_rank(sub, torch.zeros_like(target)).cpu())
    if world > 1:
        for acc in (full, sampled) if negatives is not None else (full,):
            t = acc.as_tensor().to(device)  # NCCL reduces device tensors only
            dist.all_reduce(t)
            acc.load_tensor(t.cpu())
    model.train(was_training)
    out = full.mean()
    if negatives is not None:
        out.update({f"sampled100/{k}": v for k, v in sampled.mean().items()})
    return out
