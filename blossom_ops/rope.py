"""Rotary position embedding (RoPE) for [batch, seq, heads, dim] tensors.

Half-split convention: the first D/2 channels pair with the last D/2 channels, channel pair
``m`` rotates by ``pos * base ** (-2m / D)``. Because the rotation is relative, the dot
product of a rotated query and key depends only on ``i - j``: left padding (which shifts
absolute positions) does not change what valid tokens see.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["rope_cos_sin", "apply_rope"]


def rope_cos_sin(seq_len: int, head_dim: int, base: float = 10000.0, *,
                 device=None, dtype=torch.float32,
                 positions: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotation angles, each [L, D/2] (or positions.shape + [D/2])."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float64)
                        / head_dim)
    if positions is None:
        positions = torch.arange(seq_len, device=device)
    # Angles in float64 then cast: long sequences keep their low-order bits.
    angles = positions.to(torch.float64)[..., None] * inv_freq
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: Tensor, base: float = 10000.0, *,
               positions: Optional[Tensor] = None) -> Tensor:
    """Rotate x [B, L, H, D] by position (0..L-1 unless ``positions`` [L] or [B, L])."""
    B, L, H, D = x.shape
    cos, sin = rope_cos_sin(L, D, base, device=x.device, dtype=x.dtype, positions=positions)
    if cos.dim() == 2:  # [L, D/2] -> broadcast over batch and heads
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    else:  # [B, L, D/2]
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
