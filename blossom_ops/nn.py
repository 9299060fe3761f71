"""BlossomAttention: the BlossomRec attention layer, usable alone in any model.

Shapes: x [B, L, hidden] -> [B, L, hidden]. Inside, q [B, L, Hq, D], k/v [B, L, Hk, D]
(GQA when Hk < Hq), the canonical layout of the operators.

Two patterns share the same q/k/v/out weights:
  * ``pattern="blossom"``: gated sparse attention. With the parameter-free mean compressor it
    is one fused op (``blossom_ops.blossom_attention``); with the learnable MLP compressor it is
    composed from the single ops (select_blocks, block_sparse_attention,
    sliding_window_attention, compressed_attention, gate_fusion).
  * ``pattern="dense"``: plain masked attention (SDPA), for A/B comparisons and equivalence
    tests.
Both give padded query rows 0 before the output projection (so their output there is the
output projection's bias); compare models on valid rows only.

The gate is ``Linear(hidden, num_heads * R)`` (R = 2 branches: selected, window; R = 3 adds the
compressed branch), viewed as logits [B, L, Hq, R]. Its weight and bias start at zero, so every
branch starts at sigmoid(0) = 0.5: with R = 2 the initial layer is the plain average of the two
branches, which is what a model converted from dense attention wants (when both branches cover
every key, the average IS dense attention), and the weight still receives a gradient
(d logits / d W = x), so the gate learns from the first step.

Dropout: the dense path drops attention probabilities (SDPA's dropout_p). The sparse kernels
never materialise probabilities, so the sparse path drops elements of the mixed attention
output (after the gate, before the output projection) with the same rate.

Backends: ``backend="ops"`` (default) runs the compiled operators; ``backend="reference"`` runs
the dense-mask oracle ``blossom_ops.reference`` with the same signatures (float64-capable,
slow; used by the equivalence tests). ``DEFAULT_BACKEND`` sets the default for new layers.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import reference as _reference
from .rope import apply_rope

__all__ = ["BlossomAttention", "MLPCompressor", "dense_attention", "sparse_attention",
           "resolve_valid", "ops_available", "DEFAULT_BACKEND"]

DEFAULT_BACKEND = "ops"
_PATTERNS = ("blossom", "dense")
_COMPRESSORS = ("mean", "mlp")
_BACKENDS = ("ops", "reference")


def ops_available() -> bool:
    """True when the compiled library has a kernel for this machine's CPU build (the tests
    use it to run the same checks on the compiled ops and on the reference)."""
    from . import ops  # noqa: F401  (loads the library)
    return torch._C._dispatch_has_kernel_for_dispatch_key(
        "blossom_ops::blossom_attention", "CPU")


def _backend(name: str):
    if name == "ops":
        from . import ops
        return ops
    if name == "reference":
        return _reference
    raise ValueError(f"backend must be one of {_BACKENDS}, got {name!r}")


# =========================================================================== padding
def resolve_valid(batch: int, seq_len: int, lengths: Optional[Tensor] = None,
                  valid: Optional[Tensor] = None) -> Optional[Tensor]:
    """bool [B, L] validity from ``lengths`` [B] (right padding) or ``valid`` [B, L];
    None when neither is given (no padding)."""
    if lengths is not None and valid is not None:
        raise ValueError("pass either lengths or valid, not both")
    if valid is not None:
        if tuple(valid.shape) != (batch, seq_len):
            raise ValueError(f"valid must have shape (batch, seq) = {(batch, seq_len)}, "
                             f"got {tuple(valid.shape)}")
        return valid.to(torch.bool)
    if lengths is not None:
        if tuple(lengths.shape) != (batch,):
            raise ValueError(f"lengths must have shape (batch,) = {(batch,)}, "
                             f"got {tuple(lengths.shape)}")
        pos = torch.arange(seq_len, device=lengths.device)
        return pos[None, :] < lengths.to(torch.long)[:, None]
    return None


# =========================================================================== functional cores
def dense_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool,
                    valid: Optional[Tensor] = None, attn_bias: Optional[Tensor] = None,
                    scale: Optional[float] = None, dropout_p: float = 0.0) -> Tensor:
    """Plain masked attention. q [B, L, Hq, D], k/v [B, L, Hk, D] -> [B, L, Hq, D].

    ``valid`` [B, L] masks padded keys and zeroes padded query rows. ``attn_bias``
    (bool, True = allowed, or additive float; broadcastable to [B, Hq, L, L]) is an extra mask
    the adapters pass through so the dense pattern reproduces a host model exactly.
    """
    B, L, Hq, D = q.shape
    G = Hq // k.shape[2]
    kq = k.repeat_interleave(G, dim=2) if G > 1 else k  # query head h reads kv head h // G
    vq = v.repeat_interleave(G, dim=2) if G > 1 else v
    allowed = None
    if causal:
        allowed = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()[None, None]
    if valid is not None:
        keys = valid[:, None, None, :]
        allowed = keys if allowed is None else allowed & keys
    if attn_bias is not None and attn_bias.dtype == torch.bool:
        allowed = attn_bias if allowed is None else allowed & attn_bias
        attn_bias = None
    mask = allowed
    if attn_bias is not None:
        mask = attn_bias.to(q.dtype)
        if allowed is not None:
            mask = mask.masked_fill(~allowed, float("-inf"))
    if valid is not None and mask is not None:
        # A padded query row may have no allowed key; let it see everything (its output is
        # zeroed below) so neither the forward nor the backward meets an all -inf row.
        rows = valid[:, None, :, None]
        if mask.dtype == torch.bool:
            mask = mask | ~rows
        else:
            mask = mask.masked_fill(~rows, 0.0)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), kq.transpose(1, 2), vq.transpose(1, 2), attn_mask=mask,
        dropout_p=dropout_p, scale=scale).transpose(1, 2)
    if valid is not None:
        out = out * valid[:, :, None, None].to(out.dtype)
    return out


def sparse_attention(q: Tensor, k: Tensor, v: Tensor, gate_logits: Tensor, *, causal: bool,
                     lengths: Optional[Tensor] = None, valid: Optional[Tensor] = None,
                     block_len: int = 32, stride: int = 16, block_size: int = 16,
                     top_n: int = 4, window: int = 8, dilated: bool = True,
                     scale: Optional[float] = None, backend: str = "ops",
                     k_cmp: Optional[Tensor] = None, v_cmp: Optional[Tensor] = None) -> Tensor:
    """Gated BlossomRec attention. q [B, L, Hq, D], k/v [B, L, Hk, D],
    gate_logits [B, L, Hq, R] (R = 2: selected, window; R = 3: + compressed) -> [B, L, Hq, D].

    Without ``k_cmp`` the keys are mean-compressed inside the fused op. With ``k_cmp``
    [B, T, Hk, D] (a learnable compressor's output; ``v_cmp`` too when R = 3) the branches
    are composed from the single ops.
    """
    ops = _backend(backend)
    R = gate_logits.shape[-1]
    if R not in (2, 3):
        raise ValueError(f"gate_logits must have 2 or 3 branches, got {R}")
    pad = dict(lengths=lengths, valid=valid)
    if k_cmp is None:
        return ops.blossom_attention(q, k, v, gate_logits, block_len=block_len, stride=stride,
                                     block_size=block_size, top_n=top_n, window=window,
                                     dilated=dilated, causal=causal, scale=scale, **pad)
    idx = ops.select_blocks(q, k_cmp, top_n, block_size=block_size, stride=stride,
                            block_len=block_len, causal=causal, scale=scale, **pad)
    branches = [
        ops.block_sparse_attention(q, k, v, idx, block_size=block_size, causal=causal,
                                   scale=scale, **pad),
        ops.sliding_window_attention(q, k, v, window, dilated=dilated, causal=causal,
                                     scale=scale, **pad),
    ]
    if R == 3:
        if v_cmp is None:
            raise ValueError("the compressed branch (R = 3) needs v_cmp")
        branches.append(ops.compressed_attention(q, k_cmp, v_cmp, block_len=block_len,
                                                 stride=stride, causal=causal, scale=scale,
                                                 **pad))
    return ops.gate_fusion(branches, gate_logits)


# =========================================================================== compressor
class MLPCompressor(nn.Module):
    """Learnable compressor (NSA eq. 7): compressed token t = MLP(flatten(x_W_t + pos)).

    Windows are those of ``block_compress``: ``W_t = [(t+1)*stride - block_len, (t+1)*stride)``
    clipped to the sequence; positions outside the sequence or padded are zero before the MLP
    (pos is not added there either), and a token whose window holds no valid position is 0
    (it is never attended nor scored). pos [H, block_len, D] is the intra-block position
    embedding; the MLP (block_len*D -> D -> D, GELU) is shared by the heads.
    x [B, L, H, D] -> [B, T, H, D], T = ceil(L / stride).
    """

    def __init__(self, num_heads: int, head_dim: int, block_len: int, stride: int):
        super().__init__()
        self.block_len, self.stride = block_len, stride
        self.pos = nn.Parameter(torch.zeros(num_heads, block_len, head_dim))
        nn.init.normal_(self.pos, std=0.02)
        self.fc1 = nn.Linear(block_len * head_dim, head_dim)
        self.fc2 = nn.Linear(head_dim, head_dim)

    def forward(self, x: Tensor, valid: Optional[Tensor] = None) -> Tensor:
        B, L, H, D = x.shape
        T = -(-L // self.stride)
        t = torch.arange(T, device=x.device)
        m = torch.arange(self.block_len, device=x.device)
        idx = (t[:, None] + 1) * self.stride - self.block_len + m[None, :]  # [T, block_len]
        inside = (idx >= 0) & (idx < L)
        ok = inside[None].expand(B, T, self.block_len)
        if valid is not None:
            ok = ok & valid[:, idx.clamp(0, L - 1)]
        win = x[:, idx.clamp(0, L - 1)]  # [B, T, block_len, H, D]
        win = (win + self.pos.transpose(0, 1)) * ok[..., None, None].to(x.dtype)
        flat = win.permute(0, 1, 3, 2, 4).reshape(B, T, H, self.block_len * D)
        out = self.fc2(F.gelu(self.fc1(flat)))
        return out * ok.any(dim=2)[:, :, None, None].to(out.dtype)

    def extra_repr(self) -> str:
        return f"block_len={self.block_len}, stride={self.stride}"


# =========================================================================== the layer
class BlossomAttention(nn.Module):
    """BlossomRec attention layer: x [B, L, hidden] -> [B, L, hidden].

    Parameters: ``q_proj`` (hidden -> Hq*D), ``k_proj``/``v_proj`` (hidden -> Hk*D),
    ``out_proj`` (Hq*D -> hidden), ``gate`` (hidden -> Hq*R, zero init), and with
    ``compressor="mlp"`` ``k_compressor`` (+ ``v_compressor`` with the compressed branch).
    The mean compressor is parameter-free. head_dim defaults to hidden // num_heads;
    num_kv_heads to num_heads.

    Note: with ``compressor="mlp"`` and no compressed branch, the compressor only feeds the
    (non-differentiable) block selection and gets no gradient; set
    ``compressed_branch=True`` to train it.
    """

    def __init__(self, hidden_size: int, num_heads: int, *, num_kv_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, causal: bool = True,
                 pattern: str = "blossom",
                 block_len: int = 32, stride: int = 16, block_size: int = 16, top_n: int = 4,
                 window: int = 8, dilated: bool = True,
                 compressor: str = "mean",
                 compressed_branch: bool = False,
                 rope: bool = True, rope_base: float = 10000.0,
                 dropout: float = 0.0, bias: bool = True,
                 backend: Optional[str] = None):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if head_dim is None:
            if hidden_size % num_heads:
                raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_heads "
                                 f"{num_heads}; pass head_dim")
            head_dim = hidden_size // num_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} must be a multiple of num_kv_heads "
                             f"{num_kv_heads}")
        if pattern not in _PATTERNS:
            raise ValueError(f"pattern must be one of {_PATTERNS}, got {pattern!r}")
        if compressor not in _COMPRESSORS:
            raise ValueError(f"compressor must be one of {_COMPRESSORS}, got {compressor!r}")
        if rope and head_dim % 2:
            raise ValueError(f"rope needs an even head_dim, got {head_dim}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        backend = DEFAULT_BACKEND if backend is None else backend
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        self.hidden_size, self.num_heads, self.num_kv_heads = hidden_size, num_heads, num_kv_heads
        self.head_dim, self.causal, self.pattern = head_dim, causal, pattern
        self.block_len, self.stride, self.block_size = block_len, stride, block_size
        self.top_n, self.window, self.dilated = top_n, window, dilated
        self.compressor, self.compressed_branch = compressor, compressed_branch
        self.rope, self.rope_base, self.dropout = rope, rope_base, dropout
        self.backend = backend
        self.num_branches = 3 if compressed_branch else 2

        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.out_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=bias)
        self.gate = nn.Linear(hidden_size, num_heads * self.num_branches)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)
        if compressor == "mlp":
            self.k_compressor = MLPCompressor(num_kv_heads, head_dim, block_len, stride)
            if compressed_branch:
                self.v_compressor = MLPCompressor(num_kv_heads, head_dim, block_len, stride)

    def extra_repr(self) -> str:
        return (f"hidden={self.hidden_size}, heads={self.num_heads}, "
                f"kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"pattern={self.pattern}, causal={self.causal}, block_len={self.block_len}, "
                f"stride={self.stride}, block_size={self.block_size}, top_n={self.top_n}, "
                f"window={self.window}, dilated={self.dilated}, compressor={self.compressor}, "
                f"compressed_branch={self.compressed_branch}, rope={self.rope}, "
                f"dropout={self.dropout}, backend={self.backend}")

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q [B, L, Hq, D], k and v [B, L, Hk, D], RoPE applied to q and k."""
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, L, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, L, self.num_kv_heads, self.head_dim)
        if self.rope:
            q, k = apply_rope(q, self.rope_base), apply_rope(k, self.rope_base)
        return q, k, v

    def gate_logits(self, x: Tensor) -> Tensor:
        """[B, L, Hq, R]: branch order (selected, window[, compressed])."""
        B, L, _ = x.shape
        return self.gate(x).view(B, L, self.num_heads, self.num_branches)

    def forward(self, x: Tensor, *, lengths: Optional[Tensor] = None,
                valid: Optional[Tensor] = None) -> Tensor:
        if x.dim() != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"x must have shape (batch, seq, {self.hidden_size}), "
                             f"got {tuple(x.shape)}")
        B, L, _ = x.shape
        ok = resolve_valid(B, L, lengths, valid)
        q, k, v = self.project(x)
        if self.pattern == "dense":
            o = dense_attention(q, k, v, causal=self.causal, valid=ok,
                                dropout_p=self.dropout if self.training else 0.0)
        else:
            k_cmp = v_cmp = None
            if self.compressor == "mlp":
                k_cmp = self.k_compressor(k, ok)
                if self.compressed_branch:
                    v_cmp = self.v_compressor(v, ok)
            o = sparse_attention(
                q, k, v, self.gate_logits(x).to(q.dtype), causal=self.causal,
                lengths=lengths, valid=valid, block_len=self.block_len, stride=self.stride,
                block_size=self.block_size, top_n=self.top_n, window=self.window,
                dilated=self.dilated, backend=self.backend, k_cmp=k_cmp, v_cmp=v_cmp)
            o = F.dropout(o, self.dropout, self.training)
        return self.out_proj(o.reshape(B, L, self.num_heads * self.head_dim))

