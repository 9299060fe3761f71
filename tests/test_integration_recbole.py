"""RecBole 1.2.1 adapter on real SASRec (causal) and BERT4Rec (bidirectional) models, built
from a plain config dict and a stub dataset (no data files)."""
import copy
import math

import pytest
import torch

pytest.importorskip(
    "recbole", reason="RecBole is not installed in this interpreter (it needs numpy<2; "
    "CI: /work/venvs/recbole, see docs/integrations.md)")

from recbole.model.layers import MultiHeadAttention  # noqa: E402
from recbole.model.sequential_recommender import BERT4Rec, SASRec  # noqa: E402

# RecBole 1.2.1's sine.py calls torch.autograd.set_detect_anomaly(True) at import time, for
# every model: that slows every backward several times and turns benign NaNs inside masked
# reductions into errors. Switch it back off, as RecBole users should.
torch.autograd.set_detect_anomaly(False)

from blossom_ops import reference  # noqa: E402
from blossom_ops.integrations.recbole import patch_recbole, unpatch_recbole  # noqa: E402
from blossom_ops.nn import ops_available  # noqa: E402

BACKEND = "ops" if ops_available() else "reference"
DT = torch.float64
N_ITEMS, B, L = 30, 3, 21
LENGTHS = torch.tensor([L, 14, 5])
VALID = torch.arange(L)[None] < LENGTHS[:, None]
FULL = dict(block_len=8, stride=4, block_size=8, top_n=math.ceil(L / 8), window=L,
            backend=BACKEND)
SMALL = dict(block_len=8, stride=4, block_size=8, top_n=1, window=3, backend=BACKEND)


class _Dataset:
    def num(self, field):
        return N_ITEMS


def config(max_len=L):
    return {"USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id", "LIST_SUFFIX": "_list",
            "ITEM_LIST_LENGTH_FIELD": "item_length", "NEG_PREFIX": "neg_",
            "MAX_ITEM_LIST_LENGTH": max_len, "device": torch.device("cpu"), "n_layers": 2,
            "n_heads": 4, "hidden_size": 32, "inner_size": 48, "hidden_dropout_prob": 0.0,
            "attn_dropout_prob": 0.0, "hidden_act": "gelu", "layer_norm_eps": 1e-12,
            "initializer_range": 0.02, "loss_type": "CE", "mask_ratio": 0.2,
            "MASK_ITEM_SEQ": "Mask_item_id_list", "POS_ITEMS": "Pos_item_id",
            "NEG_ITEMS": "Neg_item_id", "MASK_INDEX": "MASK_INDEX"}


def build(name, dtype=DT):
    torch.manual_seed(0)
    cls = {"sasrec": SASRec, "bert4rec": BERT4Rec}[name]
    return cls(config(), _Dataset()).to(dtype).eval()


def items():
    seq = torch.randint(1, N_ITEMS, (B, L), generator=torch.Generator().manual_seed(3))
    return seq.masked_fill(~VALID, 0)  # RecBole pads with item id 0 on the right


def outputs(model):
    """Per-position encoder output [B, L, H] of the model's own forward path."""
    seq = items()
    with torch.no_grad():
        if isinstance(model, SASRec):
            emb = model.LayerNorm(model.item_embedding(seq)
                                  + model.position_embedding(torch.arange(L))[None])
            return model.trm_encoder(emb, model.get_attention_mask(seq))[-1]
        return model(seq)


def close(a, b, tol=1e-9):
    err = (a - b).abs().max().item()
    assert err <= tol, f"max abs error {err} > {tol}"


@pytest.mark.parametrize("name", ["sasrec", "bert4rec"])
def test_dense_pattern_equals_unpatched(name):
    host = build(name)
    patched = patch_recbole(copy.deepcopy(host), pattern="dense")
    close(outputs(patched)[VALID], outputs(host)[VALID])
    if name == "sasrec":  # the model's own forward (gathers the last valid position)
        seq = items()
        with torch.no_grad():
            close(patched(seq, LENGTHS), host(seq, LENGTHS))


@pytest.mark.parametrize("name", ["sasrec", "bert4rec"])
def test_sparse_full_coverage_equals_unpatched(name):
    host = build(name)
    patched = patch_recbole(copy.deepcopy(host), **FULL)
    close(outputs(patched)[VALID], outputs(host)[VALID])


@pytest.mark.parametrize("name", ["sasrec", "bert4rec"])
def test_sparse_layer_equals_reference_mechanism(name):
    """One patched attention layer with a window covering the sequence equals the dense-mask
    reference of the mechanism, followed by RecBole's own output projection, residual and
    LayerNorm."""
    model = patch_recbole(build(name), **dict(SMALL, window=L))
    layer = model.trm_encoder.layer[0].multi_head_attention
    x = torch.randn(B, L, 32, generator=torch.Generator().manual_seed(5), dtype=DT)
    causal = name == "sasrec"
    mask = model.get_attention_mask(items(), bidirectional=not causal).to(DT)
    with torch.no_grad():
        got = layer(x, mask)
        q, k, v = (f(x).view(B, L, 4, 8) for f in (layer.query, layer.key, layer.value))
        o = reference.blossom_attention(q, k, v, torch.zeros(B, L, 4, 2, dtype=DT),
                                        block_len=8, stride=4, block_size=8, top_n=1,
                                        window=L, causal=causal, valid=VALID)
        want = layer.LayerNorm(layer.dense(o.reshape(B, L, 32)) + x)
    close(got[VALID], want[VALID])


def test_print_idempotence_unpatch_and_state_dict_round_trip():
    model = build("sasrec")
    keys = set(model.state_dict())
    before = repr(model)
    patch_recbole(model, **SMALL)
    patch_recbole(model, **dict(SMALL, window=5))
    text = repr(model)
    assert "BlossomMultiHeadAttention" in text and "window=5" in text
    assert sum(type(m).__name__ == "BlossomMultiHeadAttention" for m in model.modules()) == 2
    assert "BlossomBlossom" not in text
    sd = copy.deepcopy(model.state_dict())
    assert set(sd) == keys
    unpatch_recbole(model)
    assert repr(model) == before
    assert all(type(m) is MultiHeadAttention for m in model.modules()
               if isinstance(m, MultiHeadAttention))
    res = model.load_state_dict(sd, strict=True)
    assert not res.missing_keys and not res.unexpected_keys


def test_class_patching_and_learned_gate():
    patch_recbole(BERT4Rec, **dict(SMALL, learned_gate=True))
    try:
        model = BERT4Rec(config(), _Dataset())
        assert "BlossomMultiHeadAttention" in repr(model)
        assert sum("blossom_gate" in k for k in model.state_dict()) == 4
    finally:
        unpatch_recbole(BERT4Rec)
    assert "Blossom" not in repr(BERT4Rec(config(), _Dataset()))
    model.train()
    model(items()).sum().backward()
    gate = model.trm_encoder.layer[0].multi_head_attention.blossom_gate
    assert gate.weight.grad.abs().sum() > 0


def train(model, steps=40):
    """SASRec's own CE loss on a toy task: the next item repeats the last one."""
    g = torch.Generator().manual_seed(7)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    model.train()
    for _ in range(steps):
        seq = torch.randint(1, N_ITEMS, (16, 12), generator=g)
        lengths = torch.randint(4, 13, (16,), generator=g)
        seq = seq.masked_fill(torch.arange(12)[None] >= lengths[:, None], 0)
        target = seq.gather(1, (lengths - 1)[:, None])[:, 0]
        loss = model.calculate_loss({"item_id_list": seq, "item_length": lengths,
                                     "item_id": target})
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_convergence_patched_vs_unpatched():
    torch.manual_seed(0)
    host = SASRec(config(12), _Dataset())
    patched = patch_recbole(copy.deepcopy(host), **SMALL)
    a, b = train(host), train(patched)
    a_end, b_end = sum(a[-5:]) / 5, sum(b[-5:]) / 5
    assert a_end < 0.6 * a[0] and b_end < 0.6 * b[0], (a[0], a_end, b[0], b_end)
    # close: the patched model trains no worse than the host
    assert b_end < a_end + 0.1 * a[0], (a_end, b_end)
