"""Lane-level models of the warp-wide tensor-core instructions our CUDA kernels use (see
csrc/cuda/mma_frag.cuh for the fragment layouts), shared by the numpy replays
scripts/emulate_short_fwd_mma.py, emulate_window_dkdv_mma.py, emulate_bs_dkdv_mma.py,
emulate_select_mma.py and emulate_short_select.py.

ldmatrix.x4: lane t receives, from each of the 4 loaded 8 x 8 matrices j, the pair of
elements (t // 4, 2 (t % 4)) and (t // 4, 2 (t % 4) + 1) (of the transpose with .trans).
mma.sync m16n8k16: A (16 x 16) from 4 pairs per lane, B (16 x 8) from 2 pairs per lane,
C / D (16 x 8) as 4 floats per lane: rows t // 4 and t // 4 + 8, columns 2 (t % 4) + {0, 1}.
"""
import numpy as np


def ldmatrix_pairs(mats, trans=False):
    """mats: 4 arrays of 8 x 8 (row q of matrix j came from lane 8 j + q's address).
    Returns r[lane][j] = (lo, hi), the pair lane holds of matrix j."""
    out = [[None] * 4 for _ in range(32)]
    for j, mat in enumerate(mats):
        if trans:
            mat = mat.T
        for t in range(32):
            out[t][j] = (mat[t // 4, 2 * (t % 4)], mat[t // 4, 2 * (t % 4) + 1])
    return out


def ldmatrix_lane(src, lane, addr_of):
    """The 4 pairs one lane receives from ldmatrix.x4 (no .trans): matrix j is addressed by
    lanes 8 j .. 8 j + 7, addr_of(t) -> (row, col) of the row lane t gives; lane receives, of
    matrix j, (row lane // 4, cols 2 (lane % 4) + {0, 1}). src: 2-D, indexed src[r][c]."""
    regs = []
    for j in range(4):
        r, c = addr_of(8 * j + lane // 4)
        c += 2 * (lane % 4)
        regs.append((src[r][c], src[r][c + 1]))
    return regs


def mma(d, a, b0, b1):
    """d[lane] (4 floats) += A (a[lane]: 4 pairs) @ B (b0 / b1[lane]: pairs)."""
    A = np.zeros((16, 16))
    B = np.zeros((16, 8))
    for t in range(32):
        g, tg = t // 4, t % 4
        for (r, c), (lo, hi) in zip([(g, 0), (g + 8, 0), (g, 8), (g + 8, 8)], a[t]):
            A[r, c + 2 * tg], A[r, c + 2 * tg + 1] = lo, hi
        B[2 * tg, g], B[2 * tg + 1, g] = b0[t]
        B[2 * tg + 8, g], B[2 * tg + 9, g] = b1[t]
    C = A @ B
    for t in range(32):
        g, tg = t // 4, t % 4
        d[t][0] += C[g, 2 * tg]
        d[t][1] += C[g, 2 * tg + 1]
        d[t][2] += C[g + 8, 2 * tg]
        d[t][3] += C[g + 8, 2 * tg + 1]
