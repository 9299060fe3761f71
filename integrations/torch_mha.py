"""Adapter for torch.nn.MultiheadAttention and nn.TransformerEncoderLayer / TransformerEncoder.

    from blossom_ops.integrations.torch_mha import patch_torch_mha, unpatch_torch_mha
    patch_torch_mha(model, window=8, top_n=4)      # an instance: walks its modules
    patch_torch_mha(MyModel)                       # a class: models built later are patched

Each ``nn.MultiheadAttention`` becomes ``BlossomMultiheadAttention`` (same parameters:
``in_proj_weight`` or ``q/k/v_proj_weight``, ``in_proj_bias``, ``out_proj``). Supported: both
``batch_first`` settings, unbatched input, bool or float ``attn_mask`` ([L, L] or
[B*heads, L, L]), bool or float ``key_padding_mask``, ``is_causal``, packed or separate
projection weights, kdim/vdim. Self-attention only (query, key and value of one length);
``add_bias_kv`` and ``add_zero_attn`` are refused. Attention weights are never materialised:
the second output is always None.

With the sparse pattern, the mask must be "causal and/or key padding" (read from its values:
a host sync); any other mask works with ``pattern="dense"`` only.

``nn.TransformerEncoderLayer`` has an inference fast path that calls a fused kernel with the
attention's weights and never calls the attention module; each encoder layer is therefore
swapped to ``BlossomTransformerEncoderLayer``, whose forward always takes the module path, and
each ``nn.TransformerEncoder`` gets ``use_nested_tensor = False`` (its nested-tensor path
feeds the layers tensors the sparse ops cannot read). Unpatching restores all three.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
import torch.nn.functional as F

from ._common import (BlossomConfig, BlossomMixin, attend, is_patched, make_config,
                      mask_structure, patch_class_init, swap_in, swap_out, unpatch_class_init)

__all__ = ["patch_torch_mha", "unpatch_torch_mha", "BlossomConfig"]


def _causal_flag(attn_mask: Tensor, L: int) -> bool:
    """True when attn_mask ([L, L] or [N, L, L], bool True = blocked, or float -inf/0) is
    exactly the causal mask."""
    blocked = attn_mask if attn_mask.dtype == torch.bool else torch.isneginf(attn_mask)
    if attn_mask.dtype != torch.bool and bool((attn_mask[~blocked] != 0).any()):
        return False
    upper = torch.ones(L, L, dtype=torch.bool, device=attn_mask.device).triu(1)
    return bool((blocked == upper).all())


class _MHAMixin(BlossomMixin):
    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Optional[Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False):
        if self.bias_k is not None or self.add_zero_attn:
            raise ValueError("BlossomRec attention does not support add_bias_kv or "
                             "add_zero_attn")
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query[None], key[None], value[None]
            key_padding_mask = None if key_padding_mask is None else key_padding_mask[None]
        elif not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        B, L, E = query.shape
        if key.shape[1] != L or value.shape[1] != L:
            raise ValueError("BlossomRec attention is self-attention: query, key and value "
                             f"must have the same length, got {L}, {key.shape[1]}, "
                             f"{value.shape[1]}")
        H, D = self.num_heads, self.head_dim
        if self._qkv_same_embed_dim:
            wq, wk, wv = self.in_proj_weight.chunk(3)
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        bq = bk = bv = None
        if self.in_proj_bias is not None:
            bq, bk, bv = self.in_proj_bias.chunk(3)
        q = F.linear(query, wq, bq).view(B, L, H, D)
        k = F.linear(key, wk, bk).view(B, L, H, D)
        v = F.linear(value, wv, bv).view(B, L, H, D)

        # Host masks -> the additive bias the dense pattern reproduces exactly, and the
        # (causal, key validity) structure the sparse pattern needs.
        valid, bias, structured = None, None, True
        if key_padding_mask is not None:
            if key_padding_mask.dtype == torch.bool:
                valid = ~key_padding_mask
            else:
                valid = ~torch.isneginf(key_padding_mask)
                bias = key_padding_mask.to(q.dtype)[:, None, None, :]
                # float values other than 0 / -inf are a bias, not padding
                structured = not bool((key_padding_mask[valid] != 0).any())
        causal = bool(is_causal)
        if attn_mask is not None:
            m = attn_mask.view(B, H, L, L) if attn_mask.dim() == 3 else attn_mask[None, None]
            m = (~m).to(q.dtype).log() if m.dtype == torch.bool else m.to(q.dtype)  # 0 / -inf
            bias = m if bias is None else bias + m
            if not is_causal:  # is_causal=True is torch's promise that attn_mask is causal
                causal = _causal_flag(attn_mask, L)
                structured = structured and (causal or not bool((m != 0).any()))
        p = self.dropout if self.training else 0.0
        o = attend(self, q, k, v, causal=causal if structured else None, valid=valid,
                   attn_bias=bias, gate_input=query, dropout_p=p)
        out = self.out_proj(o.reshape(B, L, H * D))
        if unbatched:
            out = out[0]
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, None


class _EncoderLayerMixin(BlossomMixin):
    """Always the module path: the fused inference kernel would bypass the attention."""

    def forward(self, src: Tensor, src_mask: Optional[Tensor] = None,
                src_key_padding_mask: Optional[Tensor] = None, is_causal: bool = False):
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask,
                                   is_causal=is_causal)
            x = x + self._ff_block(self.norm2(x))
        else:
            x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask,
                                              is_causal=is_causal))
            x = self.norm2(x + self._ff_block(x))
        return x


def _patch_instance(model: nn.Module, config: BlossomConfig) -> nn.Module:
    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention):
            swap_in(module, _MHAMixin, config, gate_in=module.embed_dim,
                    num_heads=module.num_heads)
        elif isinstance(module, nn.TransformerEncoderLayer):
            swap_in(module, _EncoderLayerMixin, config)
        elif isinstance(module, nn.TransformerEncoder):
            if "_blossom_nested" not in module.__dict__:
                module._blossom_nested = getattr(module, "use_nested_tensor", False)
            module.use_nested_tensor = False
    return model


def patch_torch_mha(target, config: Optional[BlossomConfig] = None, **overrides):
    """Patch a model instance (walks its modules) or a class (wraps its __init__).

    Patching ``nn.MultiheadAttention`` itself patches every attention built later, and
    then also ``nn.TransformerEncoderLayer`` and ``nn.TransformerEncoder`` (whose fast
    paths would bypass it). Returns the target. Keyword overrides fill a BlossomConfig.
    """
    cfg = make_config(config, overrides)
    if isinstance(target, type):
        classes = [target]
        if target is nn.MultiheadAttention:
            classes += [nn.TransformerEncoderLayer, nn.TransformerEncoder]
        for cls in classes:
            patch_class_init(cls, _patch_instance, cfg)
        return target
    if not isinstance(target, nn.Module):
        raise TypeError(f"patch_torch_mha takes an nn.Module or a class, got {type(target)}")
    return _patch_instance(target, cfg)


def unpatch_torch_mha(target):
    """Undo patch_torch_mha on an instance (restores every module) or a class (later
    models are built unpatched; existing instances stay as they are)."""
    if isinstance(target, type):
        classes = [target]
        if target is nn.MultiheadAttention:
            classes += [nn.TransformerEncoderLayer, nn.TransformerEncoder]
        for cls in classes:
            unpatch_class_init(cls)
        return target
    for module in target.modules():
        if is_patched(module) and isinstance(module, (nn.MultiheadAttention,
                                                      nn.TransformerEncoderLayer)):
            swap_out(module)
        elif isinstance(module, nn.TransformerEncoder) and "_blossom_nested" in module.__dict__:
            module.use_nested_tensor = module.__dict__.pop("_blossom_nested")
    return target
