"""Time and memory of one training epoch against the history length (synthetic histories).

Accuracy needs real data; speed and memory only need the shapes. Each point trains one epoch
over ``num_seqs`` random histories of exactly ``max_len + 1`` items (every position valid, the
worst case for dense attention) after one warm-up step, and reports the epoch time and the
peak memory above the start. Dense and BlossomRec run with identical models otherwise.
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Dict

import torch

from .batches import num_batches, train_batches
from .config import ModelConfig
from .memory import PeakMemory
from .models import build_model
from .train import machine_info, resolve_device


def synthetic_histories(num_seqs: int, length: int, num_items: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [row.numpy() for row in torch.randint(1, num_items + 1, (num_seqs, length), generator=g)]


def bench_point(mcfg: ModelConfig, max_len: int, *, num_seqs: int = 64, num_items: int = 2000,
                batch_size: int = 16, device: str = "auto", amp: bool = True,
                seed: int = 0) -> Dict[str, Any]:
    """One (attention, length) point: {'time_per_epoch_s', 'peak_memory_bytes', ...}."""
    dev = resolve_device(device)
    amp_dtype = torch.bfloat16 if (amp and dev.type == "cuda") else None
    cfg = replace(mcfg, max_len=max_len)
    torch.manual_seed(seed)
    model = build_model(num_items, cfg).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    extra = 1 if cfg.model == "sasrec" else 0  # SASRec windows hold input + next target
    samples = synthetic_histories(num_seqs, max_len + extra, num_items, seed)
    mask_id = num_items + 1

    def step(batch):
        batch = {k: v.to(dev) for k, v in batch.items()}
        with torch.autocast(device_type=dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss_sum, n = model(batch)
        opt.zero_grad(set_to_none=True)
        (loss_sum / n.clamp(min=1)).backward()
        opt.step()

    def epoch_iter(s):
        return train_batches(samples, cfg.model, batch_size, torch.Generator().manual_seed(s),
                             mask_id=mask_id, mask_prob=cfg.mask_prob)

    with PeakMemory(dev) as mem:
        step(next(iter(epoch_iter(seed))))  # warm-up: lazy init, allocator growth, autotune
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        for batch in epoch_iter(seed + 1):
            step(batch)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        elapsed = time.perf_counter() - t0
    return {"attention": cfg.attention, "max_len": max_len, "num_seqs": num_seqs,
            "batch_size": batch_size, "batches": num_batches(num_seqs, batch_size),
            "num_items": num_items, "time_per_epoch_s": elapsed,
            "peak_memory_bytes": mem.peak_bytes, "machine": machine_info(dev)}
