"""Training: models learn, a resumed run ends where an uninterrupted one does, checkpoints."""
import numpy as np
import pytest
import torch

from blossom_ops.rec.batches import bert4rec_batch, sasrec_samples, windows
from blossom_ops.rec.config import ModelConfig, TrainConfig
from blossom_ops.rec.models import build_model
from blossom_ops.rec.prepare import SequenceData, leave_one_out
from blossom_ops.rec.train import train_model


def toy_split(users=24, items=40, seed=0):
    """Users walk the item ring i, i+1, i+2, ... from a random start: learnable in a few epochs."""
    rng = np.random.default_rng(seed)
    seqs = []
    for _ in range(users):
        start, n = rng.integers(0, items), rng.integers(10, 40)
        seqs.append(((start + np.arange(n)) % items + 1).astype(np.int64))
    return leave_one_out(SequenceData(seqs, items))


def tiny(attention="dense", model="sasrec", **kw):
    base = dict(model=model, attention=attention, max_len=20, hidden=16, layers=1, heads=2,
                dropout=0.1, block_len=8, stride=4, block_size=4, top_n=2, window=2)
    base.update(kw)
    return ModelConfig(**base)


def test_windows_cover_every_item_once():
    seq = np.arange(1, 24)
    ws = windows(seq, 10)
    assert [len(w) for w in ws] == [3, 10, 10]
    assert np.concatenate(ws).tolist() == seq.tolist()
    samples = sasrec_samples([seq], 9)  # windows of 10: input 9 + next target
    assert sum(len(w) - 1 for w in samples) == len(seq) - len(samples)


def test_cloze_batch_masks_and_targets():
    gen = torch.Generator().manual_seed(0)
    ws = [np.array([3, 4, 5, 6]), np.array([7, 8])]
    b = bert4rec_batch(ws, mask_id=99, mask_prob=0.5, gen=gen)
    masked = b["items"] == 99
    assert (b["target"][masked] > 0).all() and (b["target"][~masked] == 0).all()
    assert masked.any(1).all()  # at least one target per sequence
    assert not masked[1, 2:].any()  # padding is never masked
    orig = torch.tensor([[3, 4, 5, 6], [7, 8, 0, 0]])
    assert torch.equal(torch.where(masked, b["target"], b["items"]), orig)


@pytest.mark.parametrize("attention", ["dense", "blossom"])
def test_sasrec_learns_the_toy_pattern(attention):
    split = toy_split()
    res = train_model(split, tiny(attention, dropout=0.0),
                      TrainConfig(epochs=12, batch_size=8, lr=1e-2, patience=100, progress=False, device="cpu"))
    hist = res["history"]
    assert hist[-1]["train_loss"] < hist[0]["train_loss"] * 0.8
    # a random ranking of 40 items gives HR@10 of about 0.25
    assert res["valid"]["HR@10"] > 0.5, res["valid"]


@pytest.mark.parametrize("attention", ["dense", "blossom"])
def test_bert4rec_learns_the_toy_pattern(attention):
    # cloze training sees ~30% of the positions per epoch: it needs more users and epochs
    split = toy_split(users=64)
    res = train_model(split, tiny(attention, "bert4rec", dropout=0.0, mask_prob=0.3),
                      TrainConfig(epochs=15, batch_size=16, lr=1e-2, patience=100,
                                  progress=False, device="cpu"))
    losses = [h["train_loss"] for h in res["history"]]
    assert min(losses[-3:]) < losses[0] * 0.95, losses
    assert res["valid"]["HR@10"] > 0.3, res["valid"]


@pytest.mark.parametrize("attention", ["dense", "blossom"])
def test_resume_after_interruption_matches_uninterrupted(tmp_path, attention):
    split = toy_split()
    mcfg = tiny(attention)
    tcfg = TrainConfig(epochs=4, batch_size=8, patience=100, progress=False, device="cpu", sampled_eval=False)
    full = train_model(split, mcfg, tcfg, out_dir=str(tmp_path / "full"))

    class Interrupt(Exception):
        pass

    def stop(epoch):
        if epoch == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_model(split, mcfg, tcfg, out_dir=str(tmp_path / "cut"), after_epoch=stop)
    resumed = train_model(split, mcfg, tcfg, out_dir=str(tmp_path / "cut"), resume=True)
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3, 4]
    for a, b in zip(full["history"], resumed["history"]):
        assert a["train_loss"] == b["train_loss"] and a["valid"] == b["valid"]
    last_full = torch.load(tmp_path / "full" / "last.pt", weights_only=False)
    last_cut = torch.load(tmp_path / "cut" / "last.pt", weights_only=False)
    for name, t in last_full["model"].items():
        assert torch.equal(t, last_cut["model"][name]), name
    # the optimizer moments continue too, not only the weights
    sa, sb = last_full["optimizer"]["state"], last_cut["optimizer"]["state"]
    for k in sa:
        assert torch.equal(sa[k]["exp_avg_sq"], sb[k]["exp_avg_sq"])
    assert full["test"] == resumed["test"]


def test_resume_rejects_a_different_configuration(tmp_path):
    from blossom_ops.rec.errors import RecError
    split = toy_split()
    tcfg = TrainConfig(epochs=1, batch_size=8, progress=False, device="cpu")
    train_model(split, tiny("dense"), tcfg, out_dir=str(tmp_path))
    with pytest.raises(RecError, match="different model configuration"):
        train_model(split, tiny("dense", hidden=32), tcfg, out_dir=str(tmp_path), resume=True)


def test_early_stopping_keeps_the_best_weights(tmp_path):
    split = toy_split()
    res = train_model(split, tiny("dense"), TrainConfig(epochs=30, batch_size=8, lr=3e-2,
                                                        patience=2, progress=False, device="cpu"),
                      out_dir=str(tmp_path))
    hist = res["history"]
    best = max(h["valid"]["NDCG@10"] for h in hist)
    assert res["valid"]["NDCG@10"] == pytest.approx(best)
    assert hist[res["best_epoch"] - 1]["valid"]["NDCG@10"] == best
    if res["epochs_run"] < 30:  # stopped early: exactly `patience` epochs without improvement
        assert res["epochs_run"] - res["best_epoch"] == 2


def test_sampled_softmax_and_rope_variants_train():
    split = toy_split(items=150)  # the sampled protocol needs 100 unseen items per user
    for cfg in (tiny("blossom", loss="sampled", num_negatives=8), tiny("dense", positions="rope")):
        res = train_model(split, cfg, TrainConfig(epochs=2, batch_size=8, progress=False, device="cpu",
                                                  sampled_eval=True))
        assert np.isfinite(res["history"][-1]["train_loss"])
        # the sampled protocol ranks among 101 candidates: never worse than full ranking
        assert res["test"]["sampled100/HR@10"] >= res["test"]["HR@10"]


def test_padding_does_not_change_predictions():
    torch.manual_seed(0)
    for att in ("dense", "blossom"):
        m = build_model(40, tiny(att, dropout=0.0)).eval()
        seq = torch.tensor([[5, 6, 7, 8, 9, 10]])
        a = m.predict(seq, torch.tensor([6]))
        padded = torch.cat([seq, torch.zeros(1, 7, dtype=torch.long)], 1)
        b = m.predict(padded, torch.tensor([6]))
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
