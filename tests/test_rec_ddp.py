"""DistributedDataParallel with 2 CPU processes (gloo) takes the step one process takes on the
combined batch: same gradients, and the same weights after whole epochs of training."""
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from blossom_ops.rec.batches import sasrec_samples, bert4rec_samples, train_batches
from blossom_ops.rec.config import ModelConfig, TrainConfig
from blossom_ops.rec.distributed import DistInfo, wrap
from blossom_ops.rec.models import build_model
from blossom_ops.rec.prepare import SequenceData, leave_one_out
from blossom_ops.rec.train import batch_loss, train_model

NUM_ITEMS = 40


def toy_split():
    rng = np.random.default_rng(1)
    seqs = [((rng.integers(0, NUM_ITEMS) + np.arange(rng.integers(8, 30))) % NUM_ITEMS + 1)
            .astype(np.int64) for _ in range(20)]
    return leave_one_out(SequenceData(seqs, NUM_ITEMS))


def cfg(model, attention):
    return ModelConfig(model=model, attention=attention, max_len=16, hidden=16, layers=2,
                       heads=2, dropout=0.0, block_len=8, stride=4, block_size=4, top_n=1,
                       window=2)


def train_cfg():
    # a global batch smaller than the world size is dropped under DDP (every process must
    # step): pick a batch size whose last batch is not a single sample
    n = len(sasrec_samples(toy_split().train, 16))
    bs = next(b for b in (8, 7, 9, 6, 10) if n % b != 1)
    return TrainConfig(epochs=2, batch_size=bs, patience=100, progress=False, device="cpu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_batch(model_kind, rank, world):
    split = toy_split()
    maker = bert4rec_samples if model_kind == "bert4rec" else sasrec_samples
    samples = maker(split.train, 16)
    gen = torch.Generator().manual_seed(7)
    return next(iter(train_batches(samples, model_kind, 12, gen, rank=rank, world=world,
                                   mask_id=NUM_ITEMS + 1, mask_prob=0.3)))


def grads_of(model, model_kind, info):
    torch.manual_seed(0)
    net = build_model(NUM_ITEMS, cfg(model_kind, model))
    wrapped = wrap(net, torch.device("cpu"), info)
    loss, _, _ = batch_loss(wrapped, first_batch(model_kind, info.rank, info.world), info)
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in net.named_parameters() if p.grad is not None}


def _worker(rank, world, port, job, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        info = DistInfo(rank, world, rank)
        if job[0] == "grads":
            result = grads_of(job[1], job[2], info)
        else:
            res = train_model(toy_split(), cfg(job[2], job[1]), train_cfg(),
                              out_dir=os.path.join(out_dir, "run"), info=info)
            state = torch.load(os.path.join(out_dir, "run", "last.pt"), weights_only=False)
            result = {"model": state["model"], "valid": res["valid"], "test": res["test"]}
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_ddp(job, tmp_path, world=2):
    mp.spawn(_worker, args=(world, free_port(), job, str(tmp_path)), nprocs=world, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.mark.parametrize("model_kind,attention", [("sasrec", "blossom"), ("bert4rec", "dense"),
                                                  ("sasrec", "dense")])
def test_ddp_gradients_equal_single_process_on_combined_batch(tmp_path, model_kind, attention):
    ranks = run_ddp(("grads", attention, model_kind), tmp_path)
    single = grads_of(attention, model_kind, DistInfo())
    # the two halves really differ: otherwise the test would prove nothing
    assert not torch.equal(first_batch(model_kind, 0, 2)["items"][:1],
                           first_batch(model_kind, 1, 2)["items"][:1])
    assert set(ranks[0]) == set(single)
    for name, g in single.items():
        for r in ranks:  # DDP leaves the all-reduced gradient on every process
            torch.testing.assert_close(r[name], g, rtol=1e-5, atol=1e-6,
                                       msg=lambda m, n=name: f"{n}: {m}")


def test_ddp_training_matches_single_process(tmp_path):
    ranks = run_ddp(("train", "blossom", "sasrec"), tmp_path)
    single_dir = tmp_path / "single"
    single = train_model(toy_split(), cfg("sasrec", "blossom"), train_cfg(),
                         out_dir=str(single_dir))
    state = torch.load(single_dir / "last.pt", weights_only=False)["model"]
    for name, t in state.items():
        for r in ranks:
            torch.testing.assert_close(r["model"][name], t, rtol=1e-4, atol=1e-5,
                                       msg=lambda m, n=name: f"{n}: {m}")
    # evaluation is sharded over processes and all-reduced: same users, same metrics
    for r in ranks:
        for k, v in single["test"].items():
            assert r["test"][k] == pytest.approx(v, abs=1e-6), k
