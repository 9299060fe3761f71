"""HuggingFace transformers 5.x adapter: attn_implementation="blossom" on tiny random models
(BERT bidirectional, BERT is_decoder=True, GPT-2). No downloads."""
import copy
import math

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="transformers 5.x is not installed in this interpreter "
    "(CI: /work/venvs/hf, see docs/integrations.md)")
if int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip(f"needs transformers 5.x, found {transformers.__version__}",
                allow_module_level=True)

from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, GPT2Model  # noqa: E402

from blossom_ops import reference  # noqa: E402
from blossom_ops.integrations.hf import (blossom_attention_forward, patch_hf,  # noqa: E402
                                         register_blossom, unpatch_hf)
from blossom_ops.nn import ops_available  # noqa: E402

BACKEND = "ops" if ops_available() else "reference"
DT = torch.float64
B, L = 3, 21
LENGTHS = torch.tensor([L, 14, 5])
VALID = torch.arange(L)[None] < LENGTHS[:, None]
FULL = dict(block_len=8, stride=4, block_size=8, top_n=math.ceil(L / 8), window=L,
            backend=BACKEND)
SMALL = dict(block_len=8, stride=4, block_size=8, top_n=1, window=3, backend=BACKEND)


def close(a, b, tol=1e-9):
    err = (a - b).abs().max().item()
    assert err <= tol, f"max abs error {err} > {tol}"


def bert(decoder=False, impl="sdpa"):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=48, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, is_decoder=decoder,
                     attn_implementation=impl)
    return BertModel(cfg, add_pooling_layer=False).to(DT).eval()


def gpt2(impl="sdpa", lm=False, vocab=40):
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=vocab, bos_token_id=0, eos_token_id=0, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation=impl)
    return (GPT2LMHeadModel if lm else GPT2Model)(cfg).to(DT).eval()


MODELS = {"bert": lambda: bert(False), "bert_decoder": lambda: bert(True), "gpt2": gpt2}


def run(model, padded=True):
    ids = torch.randint(1, 40, (B, L), generator=torch.Generator().manual_seed(3))
    mask = VALID.long() if padded else None
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).last_hidden_state


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("padded", [True, False])
def test_dense_pattern_equals_unpatched(name, padded):
    host = MODELS[name]()
    patched = patch_hf(copy.deepcopy(host), pattern="dense")
    assert patched.config._attn_implementation == "blossom"
    want, got = run(host, padded), run(patched, padded)
    rows = VALID if padded else torch.ones_like(VALID)
    close(got[rows], want[rows])


@pytest.mark.parametrize("name", list(MODELS))
def test_sparse_full_coverage_equals_unpatched(name):
    host = MODELS[name]()
    patched = patch_hf(copy.deepcopy(host), **FULL)
    close(run(patched)[VALID], run(host)[VALID])


def test_built_with_attn_implementation_blossom():
    register_blossom()
    host = bert(True)
    direct = bert(True, impl="blossom")
    direct.config.blossom = dict(FULL)
    close(run(direct)[VALID], run(host)[VALID])


class _Module(torch.nn.Module):
    def __init__(self, causal, **cfg):
        super().__init__()
        self.is_causal = causal
        from blossom_ops.integrations._common import BlossomConfig
        self.blossom = BlossomConfig(**cfg)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("with_mask", [True, False])
def test_attention_function_equals_reference(causal, with_mask):
    """The registered function with a window covering the sequence equals the dense-mask
    reference of the mechanism; with no mask, causality comes from module.is_causal."""
    g = torch.Generator().manual_seed(4)
    H, D = 4, 8
    q, k, v = (torch.randn(B, H, L, D, generator=g, dtype=DT) for _ in range(3))
    valid = VALID if with_mask else torch.ones(B, L, dtype=torch.bool)
    mask = None
    if with_mask:
        allowed = valid[:, None, None, :].expand(B, 1, L, L)
        if causal:
            allowed = allowed & torch.ones(L, L, dtype=torch.bool).tril()
        mask = allowed
    module = _Module(causal, **dict(SMALL, window=L))
    out, weights = blossom_attention_forward(module, q, k, v, mask, scaling=0.3)
    assert weights is None
    want = reference.blossom_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        torch.zeros(B, L, H, 2, dtype=DT), block_len=8, stride=4, block_size=8, top_n=1,
        window=L, causal=causal, valid=valid, scale=0.3)
    close(out[valid], want[valid])


def test_print_idempotence_unpatch_and_state_dict_round_trip():
    model = bert(True)
    keys = set(model.state_dict())
    before = repr(model)
    patch_hf(model, **SMALL)
    patch_hf(model, **dict(SMALL, window=5))
    text = repr(model)
    assert "BlossomBertSelfAttention" in text and "window=5" in text
    assert "BlossomBlossom" not in text
    assert model.config.blossom["window"] == 5
    sd = copy.deepcopy(model.state_dict())
    assert set(sd) == keys
    unpatch_hf(model)
    assert model.config._attn_implementation == "sdpa"
    assert repr(model) == before
    res = model.load_state_dict(sd, strict=True)
    assert not res.missing_keys and not res.unexpected_keys


def test_class_patching():
    patch_hf(GPT2Model, **SMALL)
    try:
        model = gpt2()
        assert model.config._attn_implementation == "blossom"
        assert "BlossomGPT2Attention" in repr(model)
    finally:
        unpatch_hf(GPT2Model)
    assert gpt2().config._attn_implementation == "sdpa"


def test_sparse_refuses_kv_cache_decoding():
    model = patch_hf(gpt2(), **SMALL)
    ids = torch.randint(1, 40, (1, 6))
    with torch.no_grad(), pytest.raises(ValueError, match="one length"):
        out = model(input_ids=ids, use_cache=True)
        model(input_ids=ids[:, :1], past_key_values=out.past_key_values, use_cache=True)


def train(model, steps=40):
    g = torch.Generator().manual_seed(7)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    model.train()
    for _ in range(steps):
        tok = torch.randint(0, 12, (8, 16), generator=g)
        # label[i] = token[i - 1]: the previous token, inside the sliding window
        logits = model(input_ids=tok).logits[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 tok[:, :-1].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_convergence_patched_vs_unpatched():
    host = gpt2(lm=True, vocab=12).float()
    patched = patch_hf(copy.deepcopy(host), **SMALL)
    a, b = train(host), train(patched)
    a_end, b_end = sum(a[-5:]) / 5, sum(b[-5:]) / 5
    assert a_end < 0.6 * a[0] and b_end < 0.6 * b[0], (a[0], a_end, b[0], b_end)
    # close: the patched model trains no worse than the host (better is allowed: a local
    # window suits this task)
    assert b_end < a_end + 0.1 * a[0], (a_end, b_end)
