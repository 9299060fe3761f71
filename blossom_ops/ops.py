"""Python side of the operators: thin wrappers and fake kernels.

The schemas live in csrc/schema.cpp, the kernels in csrc/cpu and csrc/cuda. This module
adds, for every operator ``blossom_ops::<op>``:
  * a wrapper ``<op>(...)`` with keyword arguments and DESIGN.md defaults,
  * a fake kernel (shapes only) so torch.compile / FakeTensor can trace it.
The autograd of each op is in C++ (csrc/autograd/<op>_autograd.cpp); its backward is itself
a registered op, ``<op>_backward``.
Shapes: q [B, L, Hq, D], k/v [B, L, Hk, D], lse [B, L, Hq].
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from . import _C  # noqa: F401  (loads the library: registers the schemas and kernels)

ops = torch.ops.blossom_ops
_blossom_op = ops.blossom_attention.default

__all__ = [
    "sliding_window_attention",
    "block_compress",
    "select_blocks",
    "block_sparse_attention",
    "compressed_attention",
    "gate_fusion",
    "blossom_attention",
]


def _scale(q: Tensor, scale: Optional[float]) -> float:
    # max(.., 1): a head_dim of 0 must reach the C++ check (a clear message), not divide by 0
    return 1.0 / math.sqrt(max(q.shape[-1], 1)) if scale is None else float(scale)


def _lse_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _num_compressed(seq_len: int, stride: int) -> int:
    return -(-seq_len // stride)


# =========================================================================== wrappers
def sliding_window_attention(q: Tensor, k: Tensor, v: Tensor, window: int = 8, *,
                             dilated: bool = True, causal: bool = True,
                             lengths: Optional[Tensor] = None, valid: Optional[Tensor] = None,
                             scale: Optional[float] = None, return_lse: bool = False):
    """STIS: each query attends to keys with ``|i - j| < window`` or, when ``dilated``,
    ``|i - j|`` a power of two (``j <= i`` when causal).

    q [B, L, Hq, D], k/v [B, L, Hk, D] -> out [B, L, Hq, D] (and lse [B, L, Hq]).
    """
    out, lse = ops.sliding_window_attention(q, k, v, lengths, valid, window, dilated, causal,
                                            _scale(q, scale))
    return (out, lse) if return_lse else out


def block_compress(x: Tensor, block_len: int = 32, stride: int = 16, *,
                   pos: Optional[Tensor] = None, lengths: Optional[Tensor] = None,
                   valid: Optional[Tensor] = None, return_valid: bool = False):
    """Mean of ``x_j (+ pos)`` over each window ``[(t+1)*stride - block_len, (t+1)*stride)``.

    x [B, L, H, D], pos [H, block_len, D] -> [B, ceil(L / stride), H, D]
    (and bool [B, T] validity of the compressed tokens when ``return_valid``).
    """
    out, valid_cmp = ops.block_compress(x, pos, lengths, valid, block_len, stride)
    return (out, valid_cmp) if return_valid else out


def select_blocks(q: Tensor, k_cmp: Tensor, top_n: int = 4, *, block_size: int = 16,
                  stride: int = 16, block_len: int = 32, causal: bool = True,
                  lengths: Optional[Tensor] = None, valid: Optional[Tensor] = None,
                  scale: Optional[float] = None) -> Tensor:
    """LTIS scoring: the ``top_n`` most important earlier (causal) or other blocks per
    query and KV head, by compressed-attention mass summed over the head group.

    q [B, L, Hq, D], k_cmp [B, T, Hk, D] -> int32 [B, L, Hk, top_n], ascending, -1 padded.
    Not differentiable.
    """
    return ops.select_blocks(q, k_cmp, lengths, valid, top_n, block_size, stride, block_len,
                             causal, _scale(q, scale))


def block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, block_idx: Tensor, *,
                           block_size: int = 16, causal: bool = True,
                           lengths: Optional[Tensor] = None, valid: Optional[Tensor] = None,
                           scale: Optional[float] = None, return_lse: bool = False):
    """LTIS attention: each query attends exactly to its own block plus the blocks in
    ``block_idx[b, i, h // G]`` (int32 [B, L, Hk, n]; -1 and duplicates ignored), with one
    softmax over the union.
    """
    out, lse = ops.block_sparse_attention(q, k, v, block_idx, lengths, valid, block_size,
                                          causal, _scale(q, scale))
    return (out, lse) if return_lse else out


def compressed_attention(q: Tensor, k_cmp: Tensor, v_cmp: Tensor, *, block_len: int = 32,
                         stride: int = 16, causal: bool = True,
                         lengths: Optional[Tensor] = None, valid: Optional[Tensor] = None,
                         scale: Optional[float] = None, return_lse: bool = False):
    """NSA's compressed branch: attention over compressed tokens [B, T, Hk, D]; causal
    queries see token t once its window has ended, ``(t+1)*stride - 1 <= i``."""
    out, lse = ops.compressed_attention(q, k_cmp, v_cmp, lengths, valid, block_len, stride,
                                        causal, _scale(q, scale))
    return (out, lse) if return_lse else out


def gate_fusion(branches: Union[Tensor, Sequence[Tensor]], gate_logits: Tensor) -> Tensor:
    """``sum_r sigmoid(gate_logits[..., r]) * branches[r]``.

    branches [R, B, L, Hq, D] or a list of R tensors [B, L, Hq, D]; gate_logits [B, L, Hq, R].
    """
    if not isinstance(branches, Tensor):
        branches = torch.stack(list(branches))
    return ops.gate_fusion(branches, gate_logits)


def blossom_attention(q: Tensor, k: Tensor, v: Tensor, gate_logits: Tensor, *,
                      block_len: int = 32, stride: int = 16, block_size: int = 16,
                      top_n: int = 4, window: int = 8, dilated: bool = True,
                      causal: bool = True, k_pos: Optional[Tensor] = None,
                      v_pos: Optional[Tensor] = None, lengths: Optional[Tensor] = None,
                      valid: Optional[Tensor] = None, scale: Optional[float] = None,
                      return_parts: bool = False):
    """The whole BlossomRec mechanism (mean compressor) in one op: compress k (and v),
    select blocks, selected attention, sliding-window attention, optional compressed
    branch, sigmoid gate. gate_logits [B, L, Hq, R], R = 2 or 3 (3 adds the compressed
    branch). Returns out [B, L, Hq, D]; with ``return_parts`` also a dict holding
    ``block_idx`` and the per-branch outputs and lse.
    """
    # Hot path of every training step: the default scale inline and the overload bound once
    # at import save two Python calls per step.
    scale = 1.0 / math.sqrt(max(q.shape[-1], 1)) if scale is None else float(scale)  # _scale
    res = _blossom_op(q, k, v, gate_logits, k_pos, v_pos, lengths, valid, block_len, stride,
                      block_size, top_n, window, dilated, causal, scale)
    if not return_parts:
        return res[0]
    out, o_sel, lse_sel, o_win, lse_win, o_cmp, lse_cmp, idx = res
    parts = {"block_idx": idx, "o_sel": o_sel, "lse_sel": lse_sel, "o_win": o_win,
             "lse_win": lse_win}
    if gate_logits.shape[-1] == 3:
        parts.update(o_cmp=o_cmp, lse_cmp=lse_cmp)
    return out, parts


# =========================================================================== fake kernels
def _attn_fake(q: Tensor) -> tuple[Tensor, Tensor]:
    B, L, Hq, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), \
        q.new_empty((B, L, Hq), dtype=_lse_dtype(q))


def _grads_like(*ts: Tensor):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in ts)


@torch.library.register_fake("blossom_ops::sliding_window_attention")
def _(q, k, v, lengths, valid, window, dilated, causal, scale):
    return _attn_fake(q)


@torch.library.register_fake("blossom_ops::sliding_window_attention_backward")
def _(grad_out, grad_lse, q, k, v, out, lse, lengths, valid, window, dilated, causal, scale):
    return _grads_like(q, k, v)


@torch.library.register_fake("blossom_ops::block_compress")
def _(x, pos, lengths, valid, block_len, stride):
    B, L, H, D = x.shape
    T = _num_compressed(L, stride)
    return x.new_empty((B, T, H, D)), x.new_empty((B, T), dtype=torch.bool)


@torch.library.register_fake("blossom_ops::block_compress_backward")
def _(grad_out, x, pos, lengths, valid, block_len, stride):
    grad_pos = torch.empty_like(pos) if pos is not None else x.new_empty((0,))
    return torch.empty_like(x, memory_format=torch.contiguous_format), grad_pos


@torch.library.register_fake("blossom_ops::select_blocks")
def _(q, k_cmp, lengths, valid, top_n, block_size, stride, block_len, causal, scale):
    B, L = q.shape[:2]
    return q.new_empty((B, L, k_cmp.shape[2], top_n), dtype=torch.int32)


@torch.library.register_fake("blossom_ops::block_sparse_attention")
def _(q, k, v, block_idx, lengths, valid, block_size, causal, scale):
    return _attn_fake(q)


@torch.library.register_fake("blossom_ops::block_sparse_attention_backward")
def _(grad_out, grad_lse, q, k, v, out, lse, block_idx, lengths, valid, block_size, causal,
      scale):
    return _grads_like(q, k, v)


@torch.library.register_fake("blossom_ops::compressed_attention")
def _(q, k_cmp, v_cmp, lengths, valid, block_len, stride, causal, scale):
    return _attn_fake(q)


@torch.library.register_fake("blossom_ops::compressed_attention_backward")
def _(grad_out, grad_lse, q, k_cmp, v_cmp, out, lse, lengths, valid, block_len, stride, causal,
      scale):
    return _grads_like(q, k_cmp, v_cmp)


@torch.library.register_fake("blossom_ops::gate_fusion")
def _(branches, gate_logits):
    return branches.new_empty(branches.shape[1:])


@torch.library.register_fake("blossom_ops::gate_fusion_backward")
def _(grad_out, branches, gate_logits):
    return _grads_like(branches, gate_logits)


@torch.library.register_fake("blossom_ops::blossom_attention")
def _(q, k, v, gate_logits, k_pos, v_pos, lengths, valid, block_len, stride, block_size,
      top_n, window, dilated, causal, scale):
    B, L, Hq, _ = q.shape
    o_sel, lse_sel = _attn_fake(q)
    o_win, lse_win = _attn_fake(q)
    if gate_logits.shape[-1] == 3:
        o_cmp, lse_cmp = _attn_fake(q)
    else:
        o_cmp, lse_cmp = q.new_empty((0,)), q.new_empty((0,), dtype=_lse_dtype(q))
    idx = q.new_empty((B, L, k.shape[2], top_n), dtype=torch.int32)
    return torch.empty_like(o_sel), o_sel, lse_sel, o_win, lse_win, o_cmp, lse_cmp, idx


@torch.library.register_fake("blossom_ops::blossom_attention_backward")
def _(grad_out, q, k, v, gate_logits, k_pos, v_pos, lengths, valid, o_sel, lse_sel, o_win,
      lse_win, o_cmp, lse_cmp, block_idx, block_len, stride, block_size, top_n, window, dilated,
      causal, scale):
    gq, gk, gv, gg = _grads_like(q, k, v, gate_logits)
    gkp = torch.empty_like(k_pos) if k_pos is not None else q.new_empty((0,))
    gvp = torch.empty_like(v_pos) if v_pos is not None else q.new_empty((0,))
    return gq, gk, gv, gg, gkp, gvp


# =========================================================================== autograd
# Every op's autograd is in C++, one file per op in csrc/autograd/ (<op>_autograd.cpp): a
# torch::autograd::Function on the Autograd key whose backward calls the registered
# <op>_backward. Python's torch.library.register_autograd cost more host time per step than
# the kernels of a short sequence (benchmarks/README.md). A library built before those files
# existed would silently lose the gradients, hence the check.
_AUTOGRAD_OPS = ("sliding_window_attention", "block_sparse_attention", "compressed_attention",
                 "block_compress", "gate_fusion", "blossom_attention")
_missing = [op for op in _AUTOGRAD_OPS
            if not torch._C._dispatch_has_kernel_for_dispatch_key(f"blossom_ops::{op}",
                                                                  "Autograd")]
if _missing:
    raise ImportError(f"blossom_ops._C has no autograd kernel for {', '.join(_missing)}: it was "
                      "built from older sources; rebuild it (setup.py build_ext)")
