"""benchmarks/union_rows.py: blocks a CTA of query pairs would stage if its warps shared them.

The counts decide how large a CTA the fused kernels' shared staging should use, so the
counting is checked against a hand-made index whose unions are known, and the selection it
runs on is checked for the shape the counting expects.
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
_spec = importlib.util.spec_from_file_location(
    "union_rows", os.path.join(ROOT, "benchmarks", "union_rows.py"))
union_rows = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(union_rows)

# 8 queries, all in own block 0; -1 pads. Pairs: {0}, {0, 3, 5}, {0, 7}, {0, 3, 7, 9}.
IDX = torch.tensor([[-1, -1], [-1, -1],
                    [3, 5], [5, -1],
                    [7, -1], [-1, -1],
                    [3, 7], [9, -1]], dtype=torch.int32)


@pytest.mark.parametrize("pairs_per_cta, staged", [
    (1, 1 + 3 + 2 + 4),  # each warp stages its own pair's union
    (2, 3 + 4),          # {0, 3, 5} and {0, 3, 7, 9}
    (4, 5),              # {0, 3, 5, 7, 9}
])
def test_staged_blocks_are_the_cta_unions(pairs_per_cta, staged):
    got_staged, got_read = union_rows.staged_blocks(IDX, pairs_per_cta)
    assert got_staged == staged
    assert got_read == 10  # every warp still reads its own pair's blocks


def test_own_blocks_count_per_block():
    # 32 queries, nothing selected: pairs in block 0 and block 1 stage their own block only.
    idx = torch.full((32, 4), -1, dtype=torch.int32)
    assert union_rows.staged_blocks(idx, 1) == (16, 16)
    assert union_rows.staged_blocks(idx, 8) == (2, 16)


def test_selections_shape_and_causality():
    idx = union_rows.selections(batch=1, L=128, hq=4, hk=2, d=16, seed=0)
    assert idx.shape == (1, 128, 2, union_rows.TOP_N)
    own = (torch.arange(128) // union_rows.BLOCK).view(1, 128, 1, 1)
    chosen = idx >= 0
    assert chosen.any()
    assert bool((idx[chosen] < own.expand_as(idx)[chosen]).all())  # causal: earlier blocks only
