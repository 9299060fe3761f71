"""Adapter for HuggingFace transformers 5.x: ``attn_implementation="blossom"``.

    from blossom_ops.integrations.hf import patch_hf, register_blossom
    register_blossom()                                  # once: makes the name known
    model = BertModel(config, attn_implementation="blossom")   # or:
    patch_hf(model, window=8, top_n=4)                  # an existing model (or a class)

``register_blossom`` registers an attention function with ``AttentionInterface`` and a mask
function with ``AttentionMaskInterface`` (without the mask function, transformers treats an
unknown implementation as needing no mask and silently passes None). The mask function is
transformers' own boolean SDPA mask builder: a [B, 1, L, L] mask (True = may attend), or None
when there is no padding. The attention function reads causality and key validity from that
mask, and from ``module.is_causal`` when the mask is None, then runs BlossomRec attention on
the model's own q, k and v (so the model's projections, RoPE or absolute positions, scaling
and dropout are untouched).

Configuration: ``patch_hf`` stores a ``BlossomConfig`` on each attention module (whose class
becomes ``Blossom<Name>``, so ``print(model)`` shows it) and as a dict in
``model.config.blossom`` (saved with the config); a model built directly with
``attn_implementation="blossom"`` reads ``config.blossom`` or, without one, the defaults. No parameter is
added (the two branches have the fixed weight 0.5 each: the attention function has no access
to the layer input a learned gate would read), so state dicts load both ways.

Limits: self-attention over the current tokens only (no KV-cache decoding: the query and key
lengths must match); the sparse pattern needs a causal or bidirectional mask with padding only
(pattern="dense" reproduces any mask).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor, nn

from blossom_ops.nn import dense_attention, sparse_attention

from ._common import (BlossomConfig, BlossomMixin, is_patched, make_config, mask_structure,
                      patch_class_init, swap_in, swap_out, unpatch_class_init)

__all__ = ["register_blossom", "patch_hf", "unpatch_hf", "blossom_attention_forward",
           "blossom_mask", "BlossomConfig", "NAME"]

NAME = "blossom"


def blossom_mask(*args, **kwargs):
    """Mask function for ``AttentionMaskInterface``: transformers' boolean SDPA mask."""
    from transformers.masking_utils import sdpa_mask
    return sdpa_mask(*args, **kwargs)


def _config_of(module: nn.Module) -> BlossomConfig:
    own = module.__dict__.get("blossom")
    if isinstance(own, BlossomConfig):
        return own
    stored = getattr(getattr(module, "config", None), "blossom", None)
    if isinstance(stored, BlossomConfig):
        return stored
    return BlossomConfig(**stored) if stored else BlossomConfig()


def _read_mask(mask: Tensor, L: int) -> tuple[Optional[bool], Tensor, Tensor]:
    """(causal or None, key validity [B, L], the mask as SDPA takes it)."""
    if mask.dim() != 4 or mask.shape[1] != 1:
        raise ValueError(f"expected a [batch, 1, q_len, kv_len] mask, got {tuple(mask.shape)}")
    if mask.dtype == torch.bool:
        allowed = mask[:, 0]
        causal, valid = mask_structure(allowed, L)
        return causal, valid, mask
    # Additive float mask (0 = attend, dtype minimum or -inf = blocked); other values are a
    # bias that only the dense pattern reproduces.
    blocked = mask <= torch.finfo(mask.dtype).min / 2
    causal, valid = mask_structure(~blocked[:, 0], L)
    if bool((mask[~blocked] != 0).any()):
        causal = None
    return causal, valid, mask


def blossom_attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                              attention_mask: Optional[Tensor], scaling: Optional[float] = None,
                              dropout: float = 0.0, **kwargs):
    """transformers attention function. query [B, H, L, D], key/value [B, Hk, L, D]
    -> (out [B, L, H, D], None)."""
    cfg = _config_of(module)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    B, L, H, _ = q.shape
    if k.shape[1] != L:
        raise ValueError("BlossomRec attention needs query and key of one length (no KV-cache "
                         f"decoding); got {L} queries and {k.shape[1]} keys")
    if attention_mask is None:
        causal, valid, bias = bool(getattr(module, "is_causal", False)), None, None
    else:
        causal, valid, bias = _read_mask(attention_mask, L)
    if cfg.pattern == "dense":
        out = dense_attention(q, k, v, causal=bool(causal) if bias is None else False,
                              valid=valid, attn_bias=bias, scale=scaling, dropout_p=dropout)
        return out, None
    if causal is None:
        raise ValueError("BlossomRec attention supports causal or bidirectional attention "
                         "with padding only; use pattern='dense' for this mask")
    logits = q.new_zeros(B, L, H, cfg.num_branches)
    out = sparse_attention(q, k, v, logits, causal=causal, valid=valid, scale=scaling,
                           **cfg.sparse_kwargs())
    # The kernels never hold probabilities: drop elements of the mixed output instead.
    out = torch.nn.functional.dropout(out, dropout, dropout > 0)
    return out, None


def register_blossom() -> None:
    """Make ``attn_implementation="blossom"`` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface.register(NAME, blossom_attention_forward)
    AttentionMaskInterface.register(NAME, blossom_mask)


class _AttentionReprMixin(BlossomMixin):
    """Changes nothing but the name and repr of a model's attention modules, so that
    ``print(model)`` shows the swap (the computation is switched by attn_implementation)."""


def _attention_modules(model: nn.Module):
    # transformers attention modules carry their config and an is_causal flag, and call
    # ALL_ATTENTION_FUNCTIONS with themselves as ``module``.
    for m in model.modules():
        if m is not model and hasattr(m, "is_causal") and hasattr(m, "config"):
            yield m


def _patch_instance(model: nn.Module, config: BlossomConfig) -> nn.Module:
    register_blossom()
    cfg = model.config
    if "_blossom_previous_impl" not in cfg.__dict__:
        cfg._blossom_previous_impl = cfg._attn_implementation
    cfg.blossom = dataclasses.asdict(config)
    model.set_attn_implementation(NAME)
    for m in _attention_modules(model):
        swap_in(m, _AttentionReprMixin, config)
    return model


def patch_hf(target, config: Optional[BlossomConfig] = None, **overrides):
    """Switch a transformers model (instance) or model class (models built later) to
    BlossomRec attention. Idempotent; a second call only replaces the configuration."""
    cfg = make_config(config, overrides)
    if isinstance(target, type):
        register_blossom()
        patch_class_init(target, _patch_instance, cfg)
        return target
    if not hasattr(target, "set_attn_implementation"):
        raise TypeError(f"patch_hf takes a transformers PreTrainedModel or its class, "
                        f"got {type(target)}")
    return _patch_instance(target, cfg)


def unpatch_hf(target):
    """Restore the attention implementation a model had before patch_hf (or stop
    patching a class's future instances)."""
    if isinstance(target, type):
        unpatch_class_init(target)
        return target
    for m in list(target.modules()):
        if is_patched(m) and isinstance(m, _AttentionReprMixin):
            swap_out(m)
    cfg = target.config
    if "_blossom_previous_impl" in cfg.__dict__:
        previous = cfg.__dict__.pop("_blossom_previous_impl")
        target.set_attn_implementation(previous or "eager")
    if "blossom" in cfg.__dict__:
        del cfg.blossom
    return target
