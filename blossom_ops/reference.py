"""Dense-mask reference implementations: the oracle of every test.

Each sparse operator of blossom_ops is *defined* as dense masked attention with a
mask that its own arguments determine (see ../shared/DESIGN.md). This module
builds those masks explicitly and runs plain dense attention over them. It is
meant to be obviously correct, not fast: it materialises L x L masks, loops in
Python where that reads more clearly, and runs in whatever dtype it is given
(float64 in the tests).

Shapes (canonical layout ``[batch, seq, heads, dim]``):
    q: [B, L, Hq, D]    k, v: [B, L, Hk, D]    Hq % Hk == 0, G = Hq // Hk
    lengths: int [B] (right padding)  or  valid: bool [B, L] (any padding)
    lse: [B, L, Hq]
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

__all__ = [
    "validity",
    "compressed_validity",
    "dense_masked_attention",
    "sliding_window_attention",
    "sliding_window_attention_mask",
    "block_compress",
    "select_blocks",
    "select_blocks_scores",
    "block_sparse_attention",
    "block_sparse_attention_mask",
    "compressed_attention",
    "compressed_attention_mask",
    "gate_fusion",
    "blossom_attention",
]


# --------------------------------------------------------------------------- helpers
def validity(batch: int, seq_len: int, lengths: Optional[Tensor] = None,
             valid: Optional[Tensor] = None, device=None) -> Tensor:
    """Bool [B, L]: True where position j of sequence b is a real item."""
    if lengths is not None and valid is not None:
        raise ValueError("pass either lengths or valid, not both")
    if valid is not None:
        return valid.to(torch.bool)
    if lengths is not None:
        pos = torch.arange(seq_len, device=lengths.device)
        return pos[None, :] < lengths.to(torch.long)[:, None]
    return torch.ones(batch, seq_len, dtype=torch.bool, device=device)


def _window_bounds(t: int, block_len: int, stride: int, seq_len: int) -> tuple[int, int]:
    """[start, end) of compression window W_t, clipped to [0, L)."""
    end = (t + 1) * stride
    return max(end - block_len, 0), min(end, seq_len)


def num_compressed(seq_len: int, stride: int) -> int:
    return -(-seq_len // stride)


def compressed_validity(valid: Tensor, block_len: int, stride: int) -> Tensor:
    """Bool [B, T]: compressed token t is valid when W_t holds a valid position."""
    B, L = valid.shape
    T = num_compressed(L, stride)
    out = torch.zeros(B, T, dtype=torch.bool, device=valid.device)
    for t in range(T):
        s, e = _window_bounds(t, block_len, stride, L)
        if e > s:
            out[:, t] = valid[:, s:e].any(dim=1)
    return out


def default_scale(head_dim: int, scale: Optional[float]) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def dense_masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor,
                           scale: Optional[float] = None) -> tuple[Tensor, Tensor]:
    """Plain attention restricted to ``mask``.

    q: [B, Lq, Hq, D], k, v: [B, Lk, Hk, D], mask: bool broadcastable to [B, Hq, Lq, Lk].
    Returns out [B, Lq, Hq, D] and lse [B, Lq, Hq]. A query row with no allowed key
    gives out = 0 and lse = -inf (never NaN).
    """
    B, Lq, Hq, D = q.shape
    Hk = k.shape[2]
    G = Hq // Hk
    scale = default_scale(D, scale)
    kq = k.repeat_interleave(G, dim=2)  # query head h reads kv head h // G
    vq = v.repeat_interleave(G, dim=2)
    logits = torch.einsum("bihd,bjhd->bhij", q, kq) * scale
    mask = mask.expand(B, Hq, Lq, kq.shape[1])
    logits = logits.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)  # [B, Hq, Lq]
    empty = ~mask.any(dim=-1)
    probs = torch.exp(logits - lse.masked_fill(empty, 0.0)[..., None])
    probs = probs.masked_fill(~mask, 0.0)
    out = torch.einsum("bhij,bjhd->bihd", probs, vq)
    return out, lse.transpose(1, 2)


def _pair_validity(valid: Tensor) -> Tensor:
    """[B, 1, L, L]: valid(i) and valid(j)."""
    return (valid[:, :, None] & valid[:, None, :])[:, None]


# --------------------------------------------------------------------------- STIS
def sliding_window_attention_mask(seq_len: int, window: int, dilated: bool, causal: bool,
                                  valid: Tensor) -> Tensor:
    """Bool [B, 1, L, L] (same for every head)."""
    idx = torch.arange(seq_len, device=valid.device)
    dist = (idx[:, None] - idx[None, :]).abs()
    near = dist < window
    if dilated:
        near = near | ((dist > 0) & ((dist & (dist - 1)) == 0))
    if causal:
        near = near & (idx[None, :] <= idx[:, None])
    return near[None, None] & _pair_validity(valid)


def sliding_window_attention(q: Tensor, k: Tensor, v: Tensor, window: int = 8, *,
                             dilated: bool = True, causal: bool = True,
                             lengths: Optional[Tensor] = None, valid: Optional[Tensor] = None,
                             scale: Optional[float] = None, return_lse: bool = False):
    B, L = q.shape[:2]
    ok = validity(B, L, lengths, valid, q.device)
    mask = sliding_window_attention_mask(L, window, dilated, causal, ok)
    out, lse = dense_masked_attention(q, k, v, mask, scale)
    return (out, lse) if return_lse else out


# --------------------------------------------------------------------------- compression
def block_compress(x: Tensor, block_len: int = 32, stride: int = 16, *,
                   pos: Optional[Tensor] = None, lengths: Optional[Tensor] = None,
                   valid: Optional[Tensor] = None, return_valid: bool = False):
    """Mean pooling over each compression window.

    x: [B, L, H, D], pos: [H, block_len, D] or None. Returns [B, T, H, D],
    T = ceil(L / stride) (and the bool [B, T] validity when return_valid).
    """
    B, L, H, D = x.shape
    ok = validity(B, L, lengths, valid, x.device)
    T = num_compressed(L, stride)
    out = x.new_zeros(B, T, H, D)
    for t in range(T):
        start = (t + 1) * stride - block_len  # may be negative: pos is indexed from here
        s, e = _window_bounds(t, block_len, stride, L)
        if e <= s:
            continue
        xs = x[:, s:e]  # [B, n, H, D]
        if pos is not None:
            xs = xs + pos[:, s - start:e - start].transpose(0, 1)[None]
        w = ok[:, s:e].to(x.dtype)  # [B, n]
        count = w.sum(dim=1)  # [B]
        summed = (xs * w[:, :, None, None]).sum(dim=1)
        out[:, t] = summed / count.clamp(min=1)[:, None, None]
    cvalid = compressed_validity(ok, block_len, stride)
    return (out, cvalid) if return_valid else out


# --------------------------------------------------------------------------- LTIS selection
def _candidate_blocks(valid: Tensor, seq_len: int, block_size: int, causal: bool) -> Tensor:
    """Bool [B, L(query), C]: block c is a candidate for query i."""
    C = -(-seq_len // block_size)
    block_has_valid = torch.zeros(valid.shape[0], C, dtype=torch.bool, device=valid.device)
    for c in range(C):
        block_has_valid[:, c] = valid[:, c * block_size:(c + 1) * block_size].any(dim=1)
    own = torch.arange(seq_len, device=valid.device) // block_size  # [L]
    cs = torch.arange(C, device=valid.device)
    rel = cs[None, :] < own[:, None] if causal else cs[None, :] != own[:, None]
    return block_has_valid[:, None, :] & rel[None] & valid[:, :, None]


def select_blocks_scores(q: Tensor, k_cmp: Tensor, *, block_size: int = 16, stride: int = 16,
                         block_len: int = 32, causal: bool = True,
                         lengths: Optional[Tensor] = None, valid: Optional[Tensor] = None,
                         scale: Optional[float] = None) -> tuple[Tensor, Tensor]:
    """Block importance [B, L, Hk, C] (float64) and candidate mask [B, L, C]."""
    B, L, Hq, D = q.shape
    T, Hk = k_cmp.shape[1], k_cmp.shape[2]
    G = Hq // Hk
    scale = default_scale(D, scale)
    ok = validity(B, L, lengths, valid, q.device)
    cvalid = compressed_validity(ok, block_len, stride)  # [B, T]
    cand = _candidate_blocks(ok, L, block_size, causal)  # [B, L, C]
    C = cand.shape[-1]
    chunk_block = (torch.arange(T, device=q.device) * stride) // block_size  # [T]
    # token t is scored by query i when valid and its chunk lies in a candidate block
    scored = cand[:, :, chunk_block] & cvalid[:, None, :]  # [B, L, T]
    kq = k_cmp.to(torch.float64).repeat_interleave(G, dim=2)
    logits = torch.einsum("bihd,bthd->bith", q.to(torch.float64), kq) * scale  # [B, L, T, Hq]
    logits = logits.masked_fill(~scored[..., None], float("-inf"))
    any_scored = scored.any(dim=2, keepdim=True)[..., None]
    p = torch.softmax(logits.masked_fill(~any_scored, 0.0), dim=2).masked_fill(~scored[..., None], 0.0)
    p = p.reshape(B, L, T, Hk, G).sum(dim=-1)  # sum over the G query heads of each group
    importance = torch.zeros(B, L, Hk, C, dtype=torch.float64, device=q.device)
    importance.index_add_(3, chunk_block, p.permute(0, 1, 3, 2))
    return importance, cand


def select_blocks(q: Tensor, k_cmp: Tensor, top_n: int = 4, *, block_size: int = 16,
                  stride: int = 16, block_len: int = 32, causal: bool = True,
                  lengths: Optional[Tensor] = None, valid: Optional[Tensor] = None,
                  scale: Optional[float] = None) -> Tensor:
    """int32 [B, L, Hk, top_n]: top-n candidate blocks by importance, ties to the lower
    block index, sorted ascending, padded with -1."""
    importance, cand = select_blocks_scores(q, k_cmp, block_size=block_size, stride=stride,
                                            block_len=block_len, causal=causal,
                                            lengths=lengths, valid=valid, scale=scale)
    B, L, Hk, C = importance.shape
    out = torch.full((B, L, Hk, top_n), -1, dtype=torch.int32, device=q.device)
    for b in range(B):
        for i in range(L):
            cands = [c for c in range(C) if cand[b, i, c]]
            for g in range(Hk):
                # sort by importance descending, then block index ascending
                ranked = sorted(cands, key=lambda c: (-importance[b, i, g, c].item(), c))
                chosen = sorted(ranked[:top_n])
                out[b, i, g, :len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
    return out


# --------------------------------------------------------------------------- LTIS attention
def block_sparse_attention_mask(block_idx: Tensor, seq_len: int, block_size: int, causal: bool,
                                valid: Tensor, num_q_heads: int) -> Tensor:
    """Bool [B, Hq, L, L]."""
    B, L, Hk, n = block_idx.shape
    G = num_q_heads // Hk
    C = -(-seq_len // block_size)
    idx = torch.arange(seq_len, device=valid.device)
    key_block = idx // block_size  # [L]
    # chosen[b, i, g, c]: block c is selected (entries of -1 are ignored)
    chosen = torch.zeros(B, L, Hk, C + 1, dtype=torch.bool, device=valid.device)
    chosen.scatter_(3, torch.where(block_idx < 0, C, block_idx).long(), True)
    chosen = chosen[..., :C]
    own = key_block[:, None] == key_block[None, :]  # [L, L]
    allowed = chosen[..., key_block]  # [B, L(i), Hk, L(j)]
    allowed = allowed | own[None, :, None, :]
    allowed = allowed.repeat_interleave(G, dim=2).permute(0, 2, 1, 3)  # [B, Hq, L, L]
    if causal:
        allowed = allowed & (idx[None, :] <= idx[:, None])
    return allowed & _pair_validity(valid)


def block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, block_idx: Tensor, *,
                           block_size: int = 16, causal: bool = True,
                           lengths: Optional[Tensor] = None, valid: Optional[Tensor] = None,
                           scale: Optional[float] = None, return_lse: bool = False):
    B, L, Hq, _ = q.shape
    C = -(-L // block_size)
    if block_idx.numel() and (block_idx.min() < -1 or block_idx.max() >= C):
        raise ValueError(f"block_idx entries must lie in [-1, {C})")
    ok = validity(B, L, lengths, valid, q.device)
    mask = block_sparse_attention_mask(block_idx, L, block_size, causal, ok, Hq)
    out, lse = dense_masked_attention(q, k, v, mask, scale)
    return (out, lse) if return_lse else out


# --------------------------------------------------------------------------- compressed branch
def compressed_attention_mask(seq_len: int, block_len: int, stride: int, causal: bool,
                              valid: Tensor) -> Tensor:
    """Bool [B, 1, L, T]: query i sees valid compressed token t (causal: once W_t has ended)."""
    T = num_compressed(seq_len, stride)
    cvalid = compressed_validity(valid, block_len, stride)
    i = torch.arange(seq_len, device=valid.device)
    t = torch.arange(T, device=valid.device)
    vis = ((t[None, :] + 1) * stride - 1 <= i[:, None]) if causal else torch.ones(
        seq_len, T, dtype=torch.bool, device=valid.device)
    return (vis[None] & cvalid[:, None, :] & valid[:, :, None])[:, None]


def compressed_attention(q: Tensor, k_cmp: Tensor, v_cmp: Tensor, *, block_len: int = 32,
                         stride: int = 16, causal: bool = True,
                         lengths: Optional[Tensor] = None, valid: Optional[Tensor] = None,
                         scale: Optional[float] = None, return_lse: bool = False):
    B, L = q.shape[:2]
    ok = validity(B, L, lengths, valid, q.device)
    mask = compressed_attention_mask(L, block_len, stride, causal, ok)
    out, lse = dense_masked_attention(q, k_cmp, v_cmp, mask, scale)
    return (out, lse) if return_lse else out


# --------------------------------------------------------------------------- gate
def gate_fusion(branches: Union[Tensor, Sequence[Tensor]], gate_logits: Tensor) -> Tensor:
    """out = sum_r sigmoid(gate_logits[..., r]) * branches[r].

    branches: [R, B, L, Hq, D] (or a list of R tensors [B, L, Hq, D]),
    gate_logits: [B, L, Hq, R].
    """
    if not isinstance(branches, Tensor):
        branches = torch.stack(list(branches))
    gates = torch.sigmoid(gate_logits).permute(3, 0, 1, 2)[..., None]  # [R, B, L, Hq, 1]
    return (gates * branches).sum(dim=0)


# --------------------------------------------------------------------------- the whole
def blossom_attention(q: Tensor, k: Tensor, v: Tensor, gate_logits: Tensor, *,
                      block_len: int = 32, stride: int = 16, block_size: int = 16,
                      top_n: int = 4, window: int = 8, dilated: bool = True,
                      causal: bool = True, k_pos: Optional[Tensor] = None,
                      v_pos: Optional[Tensor] = None, lengths: Optional[Tensor] = None,
                      valid: Optional[Tensor] = None, scale: Optional[float] = None,
                      return_parts: bool = False):
    """The whole mechanism with a mean compressor.

    gate_logits: [B, L, Hq, R]; R = 2 mixes (selected, window), R = 3 adds the
    compressed branch (attention over the compressed keys and values).
    """
    B, L = q.shape[:2]
    ok = validity(B, L, lengths, valid, q.device)
    k_cmp = block_compress(k, block_len, stride, pos=k_pos, valid=ok)
    idx = select_blocks(q, k_cmp, top_n, block_size=block_size, stride=stride,
                        block_len=block_len, causal=causal, valid=ok, scale=scale)
    o_sel = block_sparse_attention(q, k, v, idx, block_size=block_size, causal=causal,
                                   valid=ok, scale=scale)
    o_win = sliding_window_attention(q, k, v, window, dilated=dilated, causal=causal,
                                     valid=ok, scale=scale)
    branches = [o_sel, o_win]
    if gate_logits.shape[-1] == 3:
        v_cmp = block_compress(v, block_len, stride, pos=v_pos, valid=ok)
        branches.append(compressed_attention(q, k_cmp, v_cmp, block_len=block_len,
                                             stride=stride, causal=causal, valid=ok,
                                             scale=scale))
    elif gate_logits.shape[-1] != 2:
        raise ValueError("gate_logits must have 2 or 3 branches in its last dimension")
    out = gate_fusion(branches, gate_logits)
    return (out, {"block_idx": idx, "branches": branches}) if return_parts else out
