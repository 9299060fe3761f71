"""Training and evaluation batches: right-padded int64 tensors.

Training samples cut each user's training sequence into non-overlapping windows counted
back from its end, so every training item is a target exactly once per epoch (SASRec would
otherwise see only the last ``max_len`` items of long histories).

All randomness (shuffling, cloze masks) comes from a ``torch.Generator`` the caller seeds per
epoch, so an epoch replays identically after a resume and across data-parallel processes.
"""
from __future__ import annotations

from typing import Dict, Iterator, List, Sequence

import numpy as np
import torch
from torch import Tensor


def windows(seq: np.ndarray, size: int) -> List[np.ndarray]:
    """Non-overlapping windows of at most ``size`` items, from the end backwards."""
    out = []
    end = len(seq)
    while end > 0:
        out.append(seq[max(0, end - size):end])
        end -= size
    return out[::-1]


def sasrec_samples(train: Sequence[np.ndarray], max_len: int) -> List[np.ndarray]:
    """Windows of max_len + 1 items (input = w[:-1], target = w[1:]); at least 2 items."""
    return [w for s in train for w in windows(s, max_len + 1) if len(w) >= 2]


def bert4rec_samples(train: Sequence[np.ndarray], max_len: int) -> List[np.ndarray]:
    return [w for s in train for w in windows(s, max_len) if len(w) >= 1]


def pad(rows: Sequence[Sequence[int]], length: int = 0) -> Tensor:
    L = max(length, max(len(r) for r in rows))
    out = torch.zeros(len(rows), L, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.as_tensor(np.asarray(r, dtype=np.int64))
    return out


def sasrec_batch(ws: Sequence[np.ndarray], pad_to: int = 0) -> Dict[str, Tensor]:
    return {"items": pad([w[:-1] for w in ws], pad_to), "target": pad([w[1:] for w in ws], pad_to),
            "lengths": torch.tensor([len(w) - 1 for w in ws], dtype=torch.long)}


def bert4rec_batch(ws: Sequence[np.ndarray], mask_id: int, mask_prob: float,
                   gen: torch.Generator, pad_to: int = 0) -> Dict[str, Tensor]:
    """Cloze: each item is replaced by [MASK] with probability mask_prob (at least one per
    sequence) and becomes a target; other positions have target 0 (ignored)."""
    items = pad(ws, pad_to)
    lengths = torch.tensor([len(w) for w in ws], dtype=torch.long)
    valid = torch.arange(items.shape[1])[None] < lengths[:, None]
    masked = (torch.rand(items.shape, generator=gen) < mask_prob) & valid
    # sequences that drew no mask get their last item masked, the position inference uses
    none = ~masked.any(1)
    masked[none, lengths[none] - 1] = True
    target = torch.where(masked, items, torch.zeros_like(items))
    return {"items": torch.where(masked, torch.full_like(items, mask_id), items),
            "target": target, "lengths": lengths}


def epoch_order(n: int, gen: torch.Generator) -> List[int]:
    return torch.randperm(n, generator=gen).tolist()


def train_batches(samples: Sequence[np.ndarray], model_kind: str, batch_size: int,
                  gen: torch.Generator, *, rank: int = 0, world: int = 1, mask_id: int = 0,
                  mask_prob: float = 0.2, pad_to: int = 0) -> Iterator[Dict[str, Tensor]]:
    """One epoch of global batches of ``batch_size`` samples; process ``rank`` of ``world``
    gets the slice [rank::world] of every global batch, so the union over processes is the
    batch a single process would see."""
    order = epoch_order(len(samples), gen)
    for start in range(0, len(order), batch_size):
        chunk = [samples[i] for i in order[start:start + batch_size]]
        if len(chunk) < world:
            continue  # every process must take part in each step; a tiny tail is dropped
        if model_kind == "bert4rec":
            # masks are drawn for the whole global batch so every process draws the same
            batch = bert4rec_batch(chunk, mask_id, mask_prob, gen, pad_to)
        else:
            batch = sasrec_batch(chunk, pad_to)
        if world > 1:
            batch = {k: v[rank::world] for k, v in batch.items()}
        yield batch


def num_batches(n: int, batch_size: int) -> int:
    return -(-n // batch_size)
