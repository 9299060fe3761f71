"""The adapter registry covers every adapter in integrations/ and dispatches by model type."""
import importlib
import pkgutil

import pytest
import torch
from torch import nn

import blossom_ops.integrations as integrations
from blossom_ops.integrations import registry


def adapter_modules():
    return sorted(m.name for m in pkgutil.iter_modules(integrations.__path__)
                  if not m.name.startswith("_") and m.name != "registry")


def test_every_adapter_is_registered():
    assert adapter_modules() == sorted(a.name for a in registry.ADAPTERS)


@pytest.mark.parametrize("adapter", registry.ADAPTERS, ids=lambda a: a.name)
def test_registered_functions_exist(adapter):
    # Reading the module's source does not need the optional library installed.
    mod = importlib.import_module(f"blossom_ops.integrations.{adapter.name}")
    assert callable(getattr(mod, adapter.patch)) and callable(getattr(mod, adapter.unpatch))
    assert adapter.patch.startswith("patch_") and adapter.unpatch.startswith("unpatch_")
    assert adapter.model_types


def test_dispatch_to_torch_adapter():
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, batch_first=True), 1,
                                enable_nested_tensor=False)
    assert registry.adapter_for(enc).name == "torch_mha"
    assert registry.adapter_for(nn.MultiheadAttention).name == "torch_mha"

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

    model = Holder()
    registry.patch(model, window=4, backend="reference")
    assert type(model.attn).__name__ == "BlossomMultiheadAttention"
    registry.unpatch(model)
    assert type(model.attn) is nn.MultiheadAttention


def test_unknown_model_is_refused():
    with pytest.raises(TypeError, match="no BlossomRec adapter"):
        registry.adapter_for(nn.Linear(2, 2))


def test_dispatch_to_hf_adapter():
    pytest.importorskip("transformers", reason="transformers is not installed here")
    from transformers import BertConfig, BertModel
    cfg = BertConfig(vocab_size=10, hidden_size=16, num_hidden_layers=1,
                     num_attention_heads=2, intermediate_size=16)
    assert registry.adapter_for(BertModel(cfg)).name == "hf"
    assert registry.adapter_for(BertModel).name == "hf"


def test_dispatch_to_recbole_adapter():
    pytest.importorskip("recbole", reason="RecBole is not installed here (needs numpy<2)")
    from recbole.model.layers import TransformerEncoder
    torch.autograd.set_detect_anomaly(False)  # see test_integration_recbole.py
    enc = TransformerEncoder(n_layers=1, n_heads=2, hidden_size=16)
    assert registry.adapter_for(enc).name == "recbole"
