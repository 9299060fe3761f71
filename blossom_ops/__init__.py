"""blossom_ops: BlossomRec sparse attention operators for sequential recommenders.

Operators (see DESIGN.md for exact semantics; all take [batch, seq, heads, dim] tensors):
    sliding_window_attention, block_compress, select_blocks, block_sparse_attention,
    compressed_attention, gate_fusion, blossom_attention
Dense-mask oracles with the same signatures live in ``blossom_ops.reference``.
"""
from .ops import (  # noqa: F401  (importing ops loads the compiled library first)
    block_compress,
    block_sparse_attention,
    blossom_attention,
    compressed_attention,
    gate_fusion,
    select_blocks,
    sliding_window_attention,
)
from . import reference  # noqa: F401

__version__ = "0.1.0"

