"""What every adapter shares: the configuration, class swapping on instances, __init__
wrapping on classes, and reading a host model's additive mask.

Patching an instance swaps the ``__class__`` of each target module to a subclass made of a
mixin (whose ``forward`` calls BlossomRec attention) and the original class. Parameters,
buffers and their names stay where they are, so state dicts load both ways; ``print(model)``
shows the subclass name (``Blossom<Original>``) and the configuration. Unpatching swaps the
class back. Patching a class wraps its ``__init__`` so that every model built afterwards is
patched as soon as it is constructed.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from blossom_ops.nn import dense_attention, sparse_attention

_SUBCLASSES: dict = {}


@dataclasses.dataclass
class BlossomConfig:
    """How a patched attention module computes attention.

    pattern: "blossom" (sparse) or "dense" (plain attention through the same wiring: the
    A/B baseline, and the proof that layout, masks, padding, causality and scaling are
    right). The sparse parameters are those of ``blossom_ops.blossom_attention``.
    learned_gate: add a zero-initialised gate ``blossom_gate`` (hidden -> heads * R) to each
    patched module. Off by default: then every branch has the fixed weight sigmoid(0) = 0.5
    and the patched model has exactly the original parameters (state dicts load both ways).
    With it on, the state dict gains ``<module>.blossom_gate.{weight,bias}``.
    backend: "ops" (compiled operators) or "reference" (the dense-mask oracle).
    """
    pattern: str = "blossom"
    block_len: int = 32
    stride: int = 16
    block_size: int = 16
    top_n: int = 4
    window: int = 8
    dilated: bool = True
    compressed_branch: bool = False
    learned_gate: bool = False
    backend: str = "ops"

    def __post_init__(self):
        if self.pattern not in ("blossom", "dense"):
            raise ValueError(f"pattern must be 'blossom' or 'dense', got {self.pattern!r}")
        if self.backend not in ("ops", "reference"):
            raise ValueError(f"backend must be 'ops' or 'reference', got {self.backend!r}")

    @property
    def num_branches(self) -> int:
        return 3 if self.compressed_branch else 2

    def sparse_kwargs(self) -> dict:
        return dict(block_len=self.block_len, stride=self.stride, block_size=self.block_size,
                    top_n=self.top_n, window=self.window, dilated=self.dilated,
                    backend=self.backend)

    def short(self) -> str:
        if self.pattern == "dense":
            return "blossom: pattern=dense"
        return (f"blossom: block_len={self.block_len}, stride={self.stride}, "
                f"block_size={self.block_size}, top_n={self.top_n}, window={self.window}, "
                f"dilated={self.dilated}, compressed_branch={self.compressed_branch}, "
                f"learned_gate={self.learned_gate}, backend={self.backend}")


def make_config(config: Optional[BlossomConfig], overrides: dict) -> BlossomConfig:
    if config is None:
        return BlossomConfig(**overrides)
    return dataclasses.replace(config, **overrides) if overrides else config


# =========================================================================== class swapping
class BlossomMixin:
    """Base of every patched class: remembers the original class and shows the config."""
    _blossom_original: type = None

    def extra_repr(self) -> str:
        base = super().extra_repr()
        tag = self.blossom.short()
        return f"{base}, {tag}" if base else tag


def blossom_subclass(cls: type, mixin: type) -> type:
    """``Blossom<cls>``, a subclass of (mixin, cls), made once per pair."""
    key = (cls, mixin)
    if key not in _SUBCLASSES:
        _SUBCLASSES[key] = type(f"Blossom{cls.__name__}", (mixin, cls),
                                {"_blossom_original": cls, "__module__": mixin.__module__})
    return _SUBCLASSES[key]


def is_patched(module: nn.Module) -> bool:
    return isinstance(module, BlossomMixin)


def swap_in(module: nn.Module, mixin: type, config: BlossomConfig,
            gate_in: Optional[int] = None, num_heads: Optional[int] = None) -> None:
    """Patch one module in place (idempotent: a patched one only takes the new config)."""
    if not is_patched(module):
        module.__class__ = blossom_subclass(type(module), mixin)
    module.blossom = config
    has_gate = isinstance(getattr(module, "blossom_gate", None), nn.Linear)
    want_gate = config.learned_gate and config.pattern == "blossom" and gate_in is not None
    if want_gate and (not has_gate or module.blossom_gate.out_features
                      != num_heads * config.num_branches):
        ref = next(module.parameters())
        gate = nn.Linear(gate_in, num_heads * config.num_branches, device=ref.device,
                         dtype=ref.dtype)
        nn.init.zeros_(gate.weight)
        nn.init.zeros_(gate.bias)
        module.blossom_gate = gate
    elif not want_gate and has_gate:
        del module.blossom_gate


def swap_out(module: nn.Module) -> None:
    if not is_patched(module):
        return
    module.__class__ = type(module)._blossom_original
    if "blossom_gate" in module._modules:
        del module.blossom_gate
    if "blossom" in module.__dict__:
        del module.blossom


# =========================================================================== class patching
def patch_class_init(cls: type, patch_instance: Callable, config: BlossomConfig) -> None:
    """Wrap ``cls.__init__`` so that each instance built afterwards is patched at once.
    Idempotent: patching again only replaces the config."""
    if "_blossom_orig_init" in cls.__dict__:
        cls._blossom_init_config = config
        return
    original = cls.__init__

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        # Patches what exists when cls.__init__ returns (patching is idempotent, so a
        # subclass that patches again is harmless).
        patch_instance(self, cls._blossom_init_config)

    cls._blossom_orig_init = original
    cls._blossom_init_config = config
    cls.__init__ = __init__


def unpatch_class_init(cls: type) -> None:
    if "_blossom_orig_init" not in cls.__dict__:
        return
    cls.__init__ = cls.__dict__["_blossom_orig_init"]
    del cls._blossom_orig_init
    del cls._blossom_init_config


# =========================================================================== attention core
def mask_structure(allowed: Tensor, seq_len: int) -> tuple[Optional[bool], Tensor]:
    """Read (causal, key validity) from a host's boolean mask ``allowed`` [B, Lq, L]
    (Lq = 1 or L, True = may attend). causal is None when the mask is neither
    "keys valid" nor "causal and keys valid" (then only the dense pattern can reproduce it).
    This reads the mask's values (a host sync): adapters use it, the operators never do."""
    L = seq_len
    # A key is valid when some query row may see it: the last row of a causal mask sees
    # every earlier key, and any row of a bidirectional one sees every valid key.
    valid = allowed.any(dim=1)  # [B, L]
    tril = torch.ones(L, L, dtype=torch.bool, device=allowed.device).tril()
    if allowed.shape[1] == 1 or torch.equal(allowed, valid[:, None, :].expand(-1, L, -1)):
        return False, valid
    if allowed.shape[1] == L:
        # Rows of padded queries may be anything (hosts differ there); compare valid rows.
        causal_mask = tril[None] & valid[:, None, :]
        rows = valid[:, :, None]
        if torch.equal(allowed & rows, causal_mask & rows):
            return True, valid
    return None, valid


def attend(module: nn.Module, q: Tensor, k: Tensor, v: Tensor, *, causal: Optional[bool],
           valid: Optional[Tensor], attn_bias: Optional[Tensor], gate_input: Optional[Tensor],
           dropout_p: float, scale: Optional[float] = None) -> Tensor:
    """q [B, L, H, D], k/v [B, L, Hk, D] -> [B, L, H, D] by the module's config.
    dropout_p: the rate to apply now (callers pass 0 in eval mode).

    dense: masked SDPA with the host's own mask ``attn_bias`` (exact reproduction);
    blossom: sparse attention with (causal, valid) read from that mask, gates from
    ``module.blossom_gate(gate_input)`` or the fixed logit 0.
    """
    cfg: BlossomConfig = module.blossom
    if cfg.pattern == "dense":
        return dense_attention(q, k, v, causal=bool(causal) if attn_bias is None else False,
                               valid=valid, attn_bias=attn_bias, scale=scale,
                               dropout_p=dropout_p)
    if causal is None:
        raise ValueError(
            "BlossomRec attention supports causal or bidirectional attention with key "
            "padding only; this attention mask is something else (use pattern='dense' or "
            "pass a causal / padding-only mask)")
    B, L, H, _ = q.shape
    R = cfg.num_branches
    gate = getattr(module, "blossom_gate", None)
    if isinstance(gate, nn.Linear) and gate_input is not None:
        logits = gate(gate_input).view(B, L, H, R).to(q.dtype)
    else:
        logits = q.new_zeros(B, L, H, R)
    out = sparse_attention(q, k, v, logits, causal=causal, valid=valid, scale=scale,
                           **cfg.sparse_kwargs())
    # The kernels never hold probabilities: drop elements of the mixed output instead.
    return torch.nn.functional.dropout(out, dropout_p, dropout_p > 0)
