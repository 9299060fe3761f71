"""Adapter for RecBole 1.2.1: SASRec, BERT4Rec and the other models built on
``recbole.model.layers.TransformerEncoder`` (FDSA, GCSAN, S3Rec, CORE, SASRecF, ...).

    from blossom_ops.integrations.recbole import patch_recbole, unpatch_recbole
    model = SASRec(config, dataset)
    patch_recbole(model, window=8, top_n=4)   # or patch_recbole(SASRec) before building

Each ``recbole.model.layers.MultiHeadAttention`` becomes ``BlossomMultiHeadAttention``: the
same ``query``/``key``/``value`` projections, output projection ``dense``, ``out_dropout``,
residual and ``LayerNorm`` (so state dicts load both ways); only the attention between the
projections changes. RecBole passes an additive mask (0 = attend, -10000 = blocked) of shape
[B, 1, 1, L] (bidirectional, BERT4Rec) or [B, 1, L, L] (causal, SASRec); causality and item
padding are read from it. ``pattern="dense"`` feeds that very mask to SDPA and reproduces
RecBole's attention on every valid row; padded rows (item id 0) differ, as RecBole never reads
them. Attention dropout: dense on probabilities (``attn_dropout.p``), sparse on the mixed
output. RecBole itself is imported lazily (it needs numpy<2; see docs/integrations.md).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ._common import (BlossomConfig, BlossomMixin, attend, is_patched, make_config,
                      mask_structure, patch_class_init, swap_in, swap_out, unpatch_class_init)

__all__ = ["patch_recbole", "unpatch_recbole", "BlossomConfig"]


def _attention_class():
    from recbole.model.layers import MultiHeadAttention
    return MultiHeadAttention


class _RecBoleMixin(BlossomMixin):
    def forward(self, input_tensor: Tensor, attention_mask: Tensor) -> Tensor:
        x = input_tensor
        B, L, _ = x.shape
        H, D = self.num_attention_heads, self.attention_head_size
        q = self.query(x).view(B, L, H, D)
        k = self.key(x).view(B, L, H, D)
        v = self.value(x).view(B, L, H, D)
        mask = attention_mask
        if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[-1] != L:
            raise ValueError("expected RecBole's additive attention mask of shape "
                             f"[B, 1, 1 or L, L], got {tuple(mask.shape)}")
        # RecBole blocks with -10000 (not -inf); anything at or below that is "blocked", and
        # any value other than 0 or blocked is a bias only the dense pattern reproduces.
        blocked = mask <= -1e4
        causal, valid = mask_structure(~blocked[:, 0], L)
        if causal is not None and bool((mask[~blocked] != 0).any()):
            causal = None
        p = self.attn_dropout.p if self.training else 0.0
        o = attend(self, q, k, v, causal=causal, valid=valid, attn_bias=mask, gate_input=x,
                   dropout_p=p)
        hidden = self.out_dropout(self.dense(o.reshape(B, L, H * D)))
        return self.LayerNorm(hidden + input_tensor)


def _patch_instance(model: nn.Module, config: BlossomConfig) -> nn.Module:
    cls = _attention_class()
    for module in model.modules():
        if isinstance(module, cls):
            swap_in(module, _RecBoleMixin, config, gate_in=module.query.in_features,
                    num_heads=module.num_attention_heads)
    return model


def patch_recbole(target, config: Optional[BlossomConfig] = None, **overrides):
    """Patch a RecBole model instance (walks its modules) or a model class (wraps its
    __init__, so models built later are patched). Idempotent. Returns the target."""
    cfg = make_config(config, overrides)
    if isinstance(target, type):
        patch_class_init(target, _patch_instance, cfg)
        return target
    if not isinstance(target, nn.Module):
        raise TypeError(f"patch_recbole takes an nn.Module or a class, got {type(target)}")
    return _patch_instance(target, cfg)


def unpatch_recbole(target):
    """Undo patch_recbole on an instance, or stop patching a class's future instances."""
    if isinstance(target, type):
        unpatch_class_init(target)
        return target
    for module in target.modules():
        if is_patched(module) and isinstance(module, _RecBoleMixin):
            swap_out(module)
    return target
