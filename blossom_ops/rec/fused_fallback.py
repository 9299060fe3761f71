"""Run BlossomAttention from the single operators where the fused op has no kernel yet.

``blossom_ops.nn`` sends the mean-compressor path to the fused ``blossom_attention`` op. Until
that op has a kernel for a device, the same computation is available from the single ops
(block_compress -> select_blocks -> block_sparse_attention + sliding_window_attention ->
gate_fusion), which is what nn.sparse_attention already does when it is handed ``k_cmp``.
This shim mean-compresses k (and v for the compressed branch) with ``block_compress`` and
hands them over, only for devices whose fused kernel is missing; once the fused kernel is
registered it steps aside on its own. Same semantics (DESIGN.md op 6 is defined as exactly
this composition).
"""
from __future__ import annotations

import torch

from .. import nn as _bnn

_original = _bnn.sparse_attention


def fused_kernel_available(device: torch.device) -> bool:
    key = "CUDA" if device.type == "cuda" else "CPU"
    return torch._C._dispatch_has_kernel_for_dispatch_key("blossom_ops::blossom_attention", key)


def _sparse_attention(q, k, v, gate_logits, *, causal, lengths=None, valid=None, block_len=32,
                      stride=16, block_size=16, top_n=4, window=8, dilated=True, scale=None,
                      backend="ops", k_cmp=None, v_cmp=None):
    if backend == "ops" and k_cmp is None and not fused_kernel_available(q.device):
        from .. import ops
        k_cmp = ops.block_compress(k, block_len, stride, lengths=lengths, valid=valid)
        if gate_logits.shape[-1] == 3:
            v_cmp = ops.block_compress(v, block_len, stride, lengths=lengths, valid=valid)
    return _original(q, k, v, gate_logits, causal=causal, lengths=lengths, valid=valid,
                     block_len=block_len, stride=stride, block_size=block_size, top_n=top_n,
                     window=window, dilated=dilated, scale=scale, backend=backend,
                     k_cmp=k_cmp, v_cmp=v_cmp)


def install() -> None:
    """Idempotent: route nn.sparse_attention through the fallback."""
    if _bnn.sparse_attention is not _sparse_attention:
        _bnn.sparse_attention = _sparse_attention
