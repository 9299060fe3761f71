"""TEMPORARY stand-in for blossom_ops.nn.BlossomAttention (branch `nn`), same interface,
dense masks in plain torch. Used only until the real layer is merged; delete then."""
from __future__ import annotations

import math

import torch
from torch import nn


def _rope(x, base):
    B, L, H, D = x.shape
    half = D // 2
    inv = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    ang = torch.arange(L, device=x.device, dtype=torch.float32)[:, None] * inv[None]
    cos, sin = ang.cos()[None, :, None].to(x.dtype), ang.sin()[None, :, None].to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:2 * half]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos, x[..., 2 * half:]], dim=-1)


def _attend(q, k, v, mask):
    # q [B,L,H,D] k,v [B,T,H,D] mask [B,H|1,L,T]
    s = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return torch.einsum("bhij,bjhd->bihd", p, v)


class BlossomAttention(nn.Module):
    def __init__(self, hidden_size, num_heads, *, num_kv_heads=None, head_dim=None, causal=True,
                 pattern="blossom", block_len=32, stride=16, block_size=16, top_n=4, window=8,
                 dilated=True, compressor="mean", compressed_branch=False, rope=True,
                 rope_base=10000.0, dropout=0.0, bias=True):
        super().__init__()
        self.h, self.hk = num_heads, num_kv_heads or num_heads
        self.d = head_dim or hidden_size // num_heads
        self.causal, self.pattern, self.rope, self.rope_base = causal, pattern, rope, rope_base
        self.block_len, self.stride, self.block_size = block_len, stride, block_size
        self.top_n, self.window, self.dilated = top_n, window, dilated
        self.q_proj = nn.Linear(hidden_size, self.h * self.d, bias=bias)
        self.k_proj = nn.Linear(hidden_size, self.hk * self.d, bias=bias)
        self.v_proj = nn.Linear(hidden_size, self.hk * self.d, bias=bias)
        self.o_proj = nn.Linear(self.h * self.d, hidden_size, bias=bias)
        if pattern == "blossom":
            self.gate = nn.Linear(hidden_size, self.h * 2, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, *, lengths=None, valid=None):
        B, L, _ = x.shape
        idx = torch.arange(L, device=x.device)
        if valid is None:
            valid = (idx[None] < lengths[:, None]) if lengths is not None else \
                torch.ones(B, L, dtype=torch.bool, device=x.device)
        q = self.q_proj(x).view(B, L, self.h, self.d)
        k = self.k_proj(x).view(B, L, self.hk, self.d)
        v = self.v_proj(x).view(B, L, self.hk, self.d)
        if self.rope:
            q, k = _rope(q, self.rope_base), _rope(k, self.rope_base)
        G = self.h // self.hk
        k, v = k.repeat_interleave(G, 2), v.repeat_interleave(G, 2)
        pair = (valid[:, :, None] & valid[:, None, :])[:, None]
        vis = (idx[None] <= idx[:, None]) if self.causal else torch.ones(L, L, dtype=torch.bool,
                                                                          device=x.device)
        if self.pattern == "dense":
            out = _attend(q, k, v, pair & vis)
        else:
            dist = (idx[:, None] - idx[None]).abs()
            near = dist < self.window
            if self.dilated:
                near = near | ((dist > 0) & ((dist & (dist - 1)) == 0))
            o_win = _attend(q, k, v, pair & vis & near)
            # compressed keys: mean over windows ending at (t+1)*stride
            T = -(-L // self.stride)
            t_end = (torch.arange(T, device=x.device) + 1) * self.stride
            inwin = (idx[None] < t_end[:, None]) & (idx[None] >= t_end[:, None] - self.block_len)
            w = (inwin[None] & valid[:, None]).to(k.dtype)  # [B,T,L]
            k_cmp = torch.einsum("btl,blhd->bthd", w, k) / w.sum(-1).clamp(min=1)[..., None, None]
            C = -(-L // self.block_size)
            own = idx // self.block_size
            cs = torch.arange(C, device=x.device)
            bvalid = torch.stack([valid[:, c * self.block_size:(c + 1) * self.block_size].any(1)
                                  for c in range(C)], 1)
            rel = (cs[None] < own[:, None]) if self.causal else (cs[None] != own[:, None])
            cand = bvalid[:, None] & rel[None]  # [B,L,C]
            chunk_block = (torch.arange(T, device=x.device) * self.stride) // self.block_size
            scored = cand[:, :, chunk_block] & (w.sum(-1) > 0)[:, None]  # [B,L,T]
            s = torch.einsum("bihd,bthd->bhit", q, k_cmp) / math.sqrt(self.d)
            p = torch.softmax(s.masked_fill(~scored[:, None], float("-inf")), -1).nan_to_num(0.0)
            imp = torch.zeros(B, self.h, L, C, device=x.device, dtype=p.dtype)
            imp.index_add_(3, chunk_block, p)
            imp = imp.view(B, self.hk, G, L, C).sum(2).masked_fill(~cand[:, None], -1.0)
            n = min(self.top_n, C)
            top = imp.topk(n, -1).indices if n > 0 else imp[..., :0].long()
            ok = imp.gather(-1, top) >= 0
            chosen = torch.zeros(B, self.hk, L, C + 1, dtype=torch.bool, device=x.device)
            chosen.scatter_(3, torch.where(ok, top, C), True)
            chosen = chosen[..., :C] | (cs[None, None, None] == own[None, None, :, None])
            m = chosen[..., own].repeat_interleave(G, 1)  # [B,H,L,L]
            o_sel = _attend(q, k, v, m & pair & vis)
            g = torch.sigmoid(self.gate(x).view(B, L, self.h, 2))
            out = g[..., 0:1] * o_sel + g[..., 1:2] * o_win
        out = out * valid[:, :, None, None]
        return self.drop(self.o_proj(out.reshape(B, L, self.h * self.d)))
