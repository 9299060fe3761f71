"""Training loop: AdamW, early stopping on validation NDCG@10, per-epoch checkpoints, resume,
bf16 autocast on CUDA, DistributedDataParallel under torchrun.

Reproducibility: the data order and cloze masks of epoch e come from a generator seeded with
(seed, e), and the global RNG (dropout, sampled-softmax negatives) is reseeded from
(seed, e, rank) at the start of each epoch. An epoch therefore replays identically whether
the run was interrupted before it or not, and a resumed run ends with the same weights as an
uninterrupted one.
"""
from __future__ import annotations

import copy
import json
import math
import os
import platform
import sys
import time
from typing import Any, Callable, Dict, Optional

import torch

from . import checkpoint as ckpt
from .batches import bert4rec_samples, num_batches, sasrec_samples, train_batches
from .config import ModelConfig, TrainConfig, to_dict
from .distributed import DistInfo, all_sum, barrier
from .distributed import wrap as wrap_ddp
from .errors import RecError
from .evaluate import evaluate, sample_negatives
from .memory import PeakMemory
from .models import build_model
from .prepare import Split

KEY_METRIC = "NDCG@10"


def resolve_device(name: str, info: Optional[DistInfo] = None) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RecError("--device cuda asked for, but this torch build sees no GPU")
        if dev.index is None:
            dev = torch.device("cuda", info.local_rank if info else 0)
    return dev


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    return (seed * 1_000_003 + epoch * 1009 + rank) % (2 ** 63)


def machine_info(device: torch.device) -> Dict[str, Any]:
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "device": str(device),
            "cpu_threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _log(msg: str, info: DistInfo) -> None:
    if info.is_main:
        print(msg, file=sys.stderr, flush=True)


def batch_loss(model, batch: Dict[str, torch.Tensor], info: DistInfo, amp_dtype=None):
    """The loss to backpropagate for this process's share of a global batch.

    DDP averages gradients over processes, so scaling by the world size makes every step the
    gradient of (sum of all processes' losses / global target count): exactly the step of
    one process on the combined batch. Returns (loss, summed loss, local target count).
    """
    device_type = batch["items"].device.type
    with torch.autocast(device_type=device_type, dtype=amp_dtype, enabled=amp_dtype is not None):
        loss_sum, n = model(batch)
    n_global = all_sum(n.detach().to(torch.float32), info)
    return loss_sum * info.world / n_global.clamp(min=1), loss_sum, n


def train_model(split: Split, mcfg: ModelConfig, tcfg: TrainConfig, *,
                out_dir: Optional[str] = None, resume: bool = False,
                info: Optional[DistInfo] = None,
                after_epoch: Optional[Callable[[int], None]] = None) -> Dict[str, Any]:
    """Train, early-stop, test the best weights; returns the result record (also written to
    ``out_dir/result.json``). ``after_epoch(e)`` runs after epoch e is checkpointed (tests use
    it to simulate an interruption)."""
    info = info or DistInfo()
    mcfg.check()
    if tcfg.threads > 0:
        torch.set_num_threads(tcfg.threads)
    device = resolve_device(tcfg.device, info)
    amp_dtype = torch.bfloat16 if (tcfg.amp and device.type == "cuda") else None

    torch.manual_seed(tcfg.seed)
    model = build_model(split.num_items, mcfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    state = {"epoch": 0, "best": -math.inf, "best_epoch": -1, "bad_epochs": 0, "history": [],
             "best_state": None, "done": False}
    last_path = os.path.join(out_dir, ckpt.LAST) if out_dir else None
    if resume:
        saved = ckpt.load(last_path) if last_path else None
        if saved is None:
            _log(f"--resume: no checkpoint in {out_dir}, starting fresh", info)
        else:
            if saved["model_config"] != to_dict(mcfg):
                raise RecError(f"--resume: {last_path} was trained with a different model "
                               "configuration; use another --out or the same options")
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["optimizer"])
            ckpt.set_rng_state(saved["rng"])
            state = saved["state"]
            _log(f"resumed from {last_path} after epoch {state['epoch']}", info)
    ddp = wrap_ddp(model, device, info)

    samples = (bert4rec_samples if mcfg.model == "bert4rec" else sasrec_samples)(
        split.train, mcfg.max_len)
    if not samples:
        raise RecError("no training sequences: every user history is too short")
    mask_id = split.num_items + 1
    negatives = sample_negatives(split) if tcfg.sampled_eval else None
    eval_kw = dict(device=device, batch_size=tcfg.eval_batch_size, exclude_seen=tcfg.exclude_seen,
                   rank=info.rank, world=info.world, amp_dtype=amp_dtype)
    n_batches = num_batches(len(samples), tcfg.batch_size)

    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency, but a bar is never worth a crash
        def tqdm(it, **_):
            return it

    with PeakMemory(device) as mem:
        while not state["done"] and state["epoch"] < tcfg.epochs:
            epoch = state["epoch"]
            torch.manual_seed(epoch_seed(tcfg.seed, epoch, info.rank))
            gen = torch.Generator().manual_seed(epoch_seed(tcfg.seed, epoch))
            model.train()
            total, count = 0.0, 0
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            bar = tqdm(train_batches(samples, mcfg.model, tcfg.batch_size, gen, rank=info.rank,
                                     world=info.world, mask_id=mask_id,
                                     mask_prob=mcfg.mask_prob),
                       total=n_batches, desc=f"epoch {epoch + 1}", leave=False,
                       disable=not (tcfg.progress and info.is_main), file=sys.stderr)
            for batch in bar:
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                loss, loss_sum, n = batch_loss(ddp, batch, info, amp_dtype)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss_sum.detach())
                count += int(n)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            train_time = time.perf_counter() - t0
            totals = all_sum(torch.tensor([total, count], dtype=torch.float64, device=device),
                             info)
            train_loss = float(totals[0] / totals[1].clamp(min=1))
            valid = evaluate(model, split, "valid", **eval_kw)
            state["epoch"] = epoch + 1
            rec = {"epoch": epoch + 1, "train_loss": train_loss, "train_time_s": train_time,
                   "valid": valid}
            state["history"].append(rec)
            if valid[KEY_METRIC] > state["best"]:
                state.update(best=valid[KEY_METRIC], best_epoch=epoch + 1, bad_epochs=0,
                             best_state=copy.deepcopy({k: v.detach().cpu()
                                                       for k, v in model.state_dict().items()}))
            else:
                state["bad_epochs"] += 1
                if state["bad_epochs"] >= tcfg.patience:
                    state["done"] = True
            _log(f"epoch {epoch + 1:3d}  loss {train_loss:.4f}  valid HR@10 {valid['HR@10']:.4f} "
                 f"NDCG@10 {valid['NDCG@10']:.4f}  ({train_time:.1f}s)"
                 + ("  [best]" if state["best_epoch"] == epoch + 1 else ""), info)
            if last_path and info.is_main:
                ckpt.save(last_path, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                      "rng": ckpt.rng_state(), "state": state,
                                      "model_config": to_dict(mcfg),
                                      "train_config": to_dict(tcfg)})
            barrier(info)
            if after_epoch is not None:
                after_epoch(epoch + 1)

    if state["best_state"] is not None:
        model.load_state_dict(state["best_state"])
    test = evaluate(model, split, "test", negatives=negatives, **eval_kw)
    best_valid = evaluate(model, split, "valid", negatives=negatives, **eval_kw)
    times = [h["train_time_s"] for h in state["history"]]
    result = {
        "model_config": to_dict(mcfg), "train_config": to_dict(tcfg),
        "params": sum(p.numel() for p in model.parameters()),
        "epochs_run": state["epoch"], "best_epoch": state["best_epoch"],
        "valid": best_valid, "test": test, "history": state["history"],
        "time_per_epoch_s": sum(times) / max(1, len(times)),
        "peak_memory_bytes": mem.peak_bytes,
        "memory_kind": "cuda max_memory_allocated" if device.type == "cuda"
        else "CPU RSS peak above start (sampled)",
        "world_size": info.world, "machine": machine_info(device),
        "data": {"users": split.num_users, "items": split.num_items,
                 "train_samples": len(samples)},
    }
    if out_dir and info.is_main:
        if state["best_state"] is not None:
            ckpt.save(os.path.join(out_dir, ckpt.BEST), {"model": state["best_state"],
                                                        "model_config": to_dict(mcfg),
                                                        "num_items": split.num_items})
        with open(os.path.join(out_dir, "result.json"), "w") as f:
            json.dump(result, f, indent=2)
    return result
