"""Replays the thread / lane index math of short_select_kernel (csrc/cuda/short_select.cu) on
the CPU and checks its output against blossom_ops.reference (no GPU needed).

Per CTA (b, kv head g, tile of 128 queries), as the kernel does it:
  * t_end / j_end (tokens and k rows the tile needs), the k rows the cp.async loop stages
    (rows j = tid / D8 + n RPP, piece d8 = tid % D8) and the q rows of each head chunk
    (hc * 128 + qi), zero rows past L;
  * validity words by 32-row ballots, block validity (warp 0, count_bits), window counts
    (warp 1), the compression thread map (token x >> 4, piece (x & 15) * PW), the all-valid
    fast path vs the tested loop, k_pos offsets, fp32 sums in row order, 1 / count, rounding
    to the 16-bit type;
  * per warp and head: A fragments by ldmatrix.x4 from the q chunk, B fragments by
    ldmatrix.x4 from the compressed tile, mma.m16n8k16 rebuilt from the lanes' registers
    (PTX fragment layouts), the lane's 0 / -inf column bias from its 32-bit token mask
    (shift by 2 tig, bit nt * 8 + e), quad max / sum by xor 1, 2, masses per lane;
  * the masses stored as [row gid + 8 r][nt * 8 + 2 tig + e], read back by lane (q, half),
    rank keys, the lane-pair rounds (xor 16 shuffles, lower half wins ties), the
    ascending output with -1 fill.
Scores in float64 with exact exp2, so on tie-free data the result must equal the dense
reference (reference.select_blocks on the emulated k_cmp); the compressed keys are checked
against reference.block_compress. Not modelled: timing, bank conflicts, ex2/rcp rounding.

    python3 scripts/emulate_short_select.py
"""
import itertools
import math
import random

import numpy as np
import torch

from blossom_ops import reference as ref
from mma_emu import ldmatrix_lane

K_THREADS, K_WARPS, K_QT, K_MAXLEN = 256, 8, 128, 256


def bit_range(lo, hi):
    hi = min(hi, 32)
    if hi <= lo:
        return 0
    below = 0xFFFFFFFF if hi >= 32 else (1 << hi) - 1
    return below & ~((1 << lo) - 1) & 0xFFFFFFFF


def count_bits(vm, lo, hi):
    n = 0
    for w in range(K_MAXLEN // 32):
        a, z = lo - 32 * w, hi - 32 * w
        if z > 0 and a < 32:
            n += bin(vm[w] & bit_range(max(a, 0), z)).count("1")
    return n


def mma16816(acc, a, b):
    """acc[lane][4] += A B, A (16x16) and B (16x8) rebuilt from the lanes' registers."""
    A = np.zeros((16, 16))
    B = np.zeros((16, 8))
    for lane in range(32):
        gid, tig = lane // 4, lane % 4
        for i in range(8):
            row = gid + (8 if i in (2, 3, 6, 7) else 0)
            col = 2 * tig + (i & 1) + (8 if i >= 4 else 0)
            A[row, col] = a[lane][i // 2][i % 2]
        for i in range(4):
            k = 2 * tig + (i & 1) + (8 if i >= 2 else 0)
            B[k, gid] = b[lane][i // 2][i % 2]
    C = A @ B
    for lane in range(32):
        gid, tig = lane // 4, lane % 4
        for i in range(4):
            acc[lane][i] += C[gid + (8 if i >= 2 else 0), 2 * tig + (i & 1)]


def div_magic(d):
    return 0 if d == 1 else ((1 << 32) + d - 1) // d


def fast_div(x, magic):  # the kernel's umulhi division (host-computed magic)
    assert 0 <= x < 8192
    return x if magic == 0 else (x * magic) >> 32


def rank_key(imp):
    x = int(np.float32(imp + 0.0).view(np.uint32))
    return x + 2 if x <= 0x7F800000 else 1


def emulate(q, k, k_pos, valid, block_len, S, bs, top_n, causal, scale, dtype):
    """The kernel's output int32 [B, L, Hk, top_n] and its compressed keys [B, T, Hk, D]
    (float32 values of the rounded 16-bit numbers; only the tokens some CTA computed)."""
    B, L, Hq, D = q.shape
    Hk = k.shape[2]
    G = Hq // Hk
    D8, PW, DK = D // 8, D // 16, D // 16
    RPP = K_THREADS // D8
    Tn, C, tpb = -(-L // S), -(-L // bs), bs // S
    NT = 2 if Tn <= 16 else 4
    KTOK, K2 = NT * 8, NT * 4
    sc = scale * math.log2(math.e)
    qf = q.float().numpy()
    kf = k.float().numpy()
    pf = None if k_pos is None else k_pos.float().numpy()
    vd = np.ones((B, L), dtype=bool) if valid is None else valid.numpy()
    out = np.full((B, L, Hk, top_n), -7, dtype=np.int64)  # -7: never written
    kcmp = np.full((B, Tn, Hk, D), np.nan, dtype=np.float32)
    tiles = -(-L // K_QT)
    bs_magic, tpb_magic = div_magic(bs), div_magic(tpb)
    per_head = K_QT * (D + 8) * 2
    hc_max = G if G * per_head <= 80 * 1024 else max(1, 80 * 1024 // 2 // per_head)
    for b, g, bx in itertools.product(range(B), range(Hk), range(tiles)):  # grid (x, y, z)
        tile = tiles - 1 - bx if causal else bx
        i0 = tile * K_QT
        own_last = fast_div(min(L, i0 + K_QT) - 1, bs_magic)
        t_end = min(Tn, own_last * tpb) if causal else Tn
        j_end = min(L, t_end * S)
        # staged k rows: the cp.async loop's (row, piece) pairs must cover [0, j_end) x D
        ks = np.full((max(j_end, 1), D), np.nan, dtype=np.float32)
        for tid in range(K_THREADS):
            d8 = (tid % D8) * 8
            for j in range(tid // D8, j_end, RPP):
                ks[j, d8:d8 + 8] = kf[b, j, g, d8:d8 + 8]
        assert not np.isnan(ks[:j_end]).any() or np.isnan(kf[b, :j_end, g]).any()
        # validity words (warp w: rows 32 w + lane), block validity, window counts
        vmask = [sum(1 << ln for ln in range(32) if 32 * w + ln < L and vd[b, 32 * w + ln])
                 for w in range(K_WARPS)]
        bvm = sum(1 << ln for ln in range(32)
                  if ln < C and count_bits(vmask, ln * bs, min(L, (ln + 1) * bs)) > 0)
        tcnt = [count_bits(vmask, max(0, (t + 1) * S - block_len), min(L, (t + 1) * S))
                if t < t_end else 0 for t in range(KTOK)]
        # compression: thread x -> token x >> 4, dims (x & 15) PW .. + PW
        kt = np.zeros((KTOK, D), dtype=np.float32)
        for x in range(KTOK * 16):
            t, d0 = x >> 4, (x & 15) * PW
            acc = np.zeros(PW, dtype=np.float32)
            if t < t_end:
                origin = (t + 1) * S - block_len
                lo, hi = max(origin, 0), min(L, (t + 1) * S)
                for j in range(lo, hi):
                    if not (vmask[j >> 5] >> (j & 31)) & 1:
                        assert tcnt[t] != hi - lo  # the fast path would have added it
                        continue
                    acc = acc + ks[j, d0:d0 + PW]
                    if pf is not None:
                        acc = acc + pf[g, j - origin, d0:d0 + PW]
                acc = acc * np.float32(1.0 / np.float32(max(tcnt[t], 1)))
            kt[t, d0:d0 + PW] = acc
        kt = torch.from_numpy(kt).to(dtype).float().numpy()  # rounded to the 16-bit type
        kcmp[b, :t_end, g] = kt[:t_end]
        tokmask = sum(1 << ln for ln in range(32)
                      if ln < t_end and tcnt[ln] > 0 and (bvm >> fast_div(ln, tpb_magic)) & 1)
        # q chunks: buffer row hc * 128 + qi (zeros past L)
        qs = np.zeros((G, K_QT, D), dtype=np.float32)
        for h in range(G):
            for qi in range(K_QT):
                if i0 + qi < L:
                    qs[h, qi] = qf[b, i0 + qi, g * G + h]
        for warp in range(K_WARPS):
            if i0 + warp * 16 >= L:
                continue
            kb = {}
            for kk in range(DK):
                for np_ in range(NT // 2):
                    kb[kk, np_] = [ldmatrix_lane(
                        kt, lane, lambda t_, kk=kk, np_=np_: (np_ * 16 + ((t_ >> 3) >> 1) * 8 + (t_ & 7),
                                                              kk * 16 + ((t_ >> 3) & 1) * 8))
                        for lane in range(32)]
            bias = np.zeros((32, 2, NT, 2))
            for lane in range(32):
                gid, tig = lane >> 2, lane & 3
                for r in range(2):
                    i = i0 + warp * 16 + gid + 8 * r
                    ok = 0
                    if i < L and (vmask[i >> 5] >> (i & 31)) & 1:
                        lo = fast_div(i, bs_magic) * tpb
                        excl = ((0xFFFFFFFF << lo) & 0xFFFFFFFF) if causal else bit_range(lo, lo + tpb)
                        ok = tokmask & ~excl & 0xFFFFFFFF
                    sh = ok >> (2 * tig)
                    for nt in range(NT):
                        for e in range(2):
                            bias[lane, r, nt, e] = 0.0 if (sh >> (nt * 8 + e)) & 1 else -np.inf
            mass = np.zeros((32, NT, 4))
            for h0 in range(0, G, hc_max):
                for hc in range(min(hc_max, G - h0)):
                    h = h0 + hc
                    qa = {kk: [ldmatrix_lane(
                        qs[h], lane, lambda t_, kk=kk: (warp * 16 + ((t_ >> 3) & 1) * 8 + (t_ & 7),
                                                        kk * 16 + ((t_ >> 3) >> 1) * 8))
                        for lane in range(32)] for kk in range(DK)}
                    acc = [[[0.0] * 4 for _ in range(NT)] for _ in range(32)]
                    for kk in range(DK):
                        for np_ in range(NT // 2):
                            for half in range(2):
                                tile_acc = [acc[ln][2 * np_ + half] for ln in range(32)]
                                regs = [kb[kk, np_][ln][2 * half:2 * half + 2] for ln in range(32)]
                                mma16816(tile_acc, qa[kk], regs)
                    for r in range(2):
                        s_ = np.array([[[acc[ln][nt][2 * r + e] * sc + bias[ln, r, nt, e]
                                         for e in range(2)] for nt in range(NT)]
                                       for ln in range(32)])
                        m = s_.reshape(32, -1).max(axis=1)
                        m = np.maximum(m, m[np.arange(32) ^ 1])  # shfl xor 1
                        m = np.maximum(m, m[np.arange(32) ^ 2])  # shfl xor 2
                        m = np.maximum(m, -1e30)
                        e_ = np.exp2(s_ - m[:, None, None])
                        l_ = e_.reshape(32, -1).sum(axis=1)
                        l_ = l_ + l_[np.arange(32) ^ 1]
                        l_ = l_ + l_[np.arange(32) ^ 2]
                        inv = np.where(l_ > 0, 1.0 / np.where(l_ > 0, l_, 1), 0.0)
                        for nt in range(NT):
                            for e in range(2):
                                mass[:, nt, 2 * r + e] += e_[:, nt, e] * inv
            # masses through shared memory, then the lane-pair top-n
            mw = np.full((16, KTOK + 4), np.nan)
            for lane in range(32):
                gid, tig = lane >> 2, lane & 3
                for r in range(2):
                    for nt in range(NT):
                        mw[gid + 8 * r, nt * 8 + 2 * tig:nt * 8 + 2 * tig + 2] = \
                            mass[lane, nt, 2 * r:2 * r + 2]
            cand, u = [0] * 32, [[0] * K2 for _ in range(32)]
            for lane in range(32):
                qq, hf = lane & 15, lane >> 4
                i = i0 + warp * 16 + qq
                if i < L and (vmask[i >> 5] >> (i & 31)) & 1:
                    own = fast_div(i, bs_magic)
                    allc = 0xFFFFFFFF if C >= 32 else (1 << C) - 1
                    cand[lane] = bvm & allc & (((1 << own) - 1) if causal else ~(1 << own) & 0xFFFFFFFF)
                c0 = hf * K2
                for cc in range(K2):
                    c = c0 + cc
                    if tpb == 1:
                        v = mw[qq, c]
                    else:
                        v = 0.0
                        for t in range(c * tpb, min(c * tpb + tpb, Tn)):
                            v += mw[qq, t]
                    u[lane][cc] = rank_key(v) if (cand[lane] >> c) & 1 else 0
            need = [bin(c).count("1") > top_n for c in cand]
            chosen = list(cand)
            if any(need):
                pick = [0] * 32
                for _ in range(top_n):
                    best = [max(u[ln]) for ln in range(32)]
                    best = [max(best[ln], best[ln ^ 16]) for ln in range(32)]
                    cb = []
                    for ln in range(32):
                        x = K2
                        for cc in range(K2 - 1, -1, -1):
                            x = cc if u[ln][cc] == best[ln] else x
                        cb.append(x)
                    for ln in range(32):
                        hf = ln >> 4
                        other = cb[ln ^ 16]
                        lo_half = cb[ln] if hf == 0 else other
                        c = lo_half if lo_half < K2 else K2 + (other if hf == 0 else cb[ln])
                        pick[ln] |= 1 << c
                        for cc in range(K2):
                            if hf * K2 + cc == c:
                                u[ln][cc] = 0
                chosen = [pick[ln] if need[ln] else cand[ln] for ln in range(32)]
            for lane in range(16):
                i = i0 + warp * 16 + lane
                if i >= L:
                    continue
                bits = chosen[lane]
                for kk in range(top_n):
                    v = -1
                    if bits:
                        v = (bits & -bits).bit_length() - 1
                        bits &= bits - 1
                    out[b, i, g, kk] = v
    return torch.from_numpy(out), kcmp


def one_case(rng, dtype, D, G, L, S, bs, block_len, top_n, causal, padding, with_pos, ties=False):
    B, Hk = 2, 2
    Hq = Hk * G
    gen = torch.Generator().manual_seed(rng.randrange(1 << 30))
    q = torch.randn(B, L, Hq, D, generator=gen).to(dtype)
    if ties:  # every score equal: exact ties everywhere, the lower blocks must win
        q = torch.zeros_like(q)
    k = torch.randn(B, L, Hk, D, generator=gen).to(dtype)
    k_pos = (0.5 * torch.randn(Hk, block_len, D, generator=gen)).to(dtype) if with_pos else None
    valid = None
    if padding == "lengths":
        lens = torch.tensor([L, max(0, L - rng.randrange(1, L + 1))])
        valid = torch.arange(L)[None] < lens[:, None]
    elif padding == "random":
        valid = torch.rand(B, L, generator=gen) > 0.3
    if valid is not None:  # padding holds NaN: it must never be read into a sum
        q = q.masked_fill(~valid[:, :, None, None], float("nan"))
        k = k.masked_fill(~valid[:, :, None, None], float("nan"))
    scale = 1.0 / math.sqrt(D)
    got, kcmp = emulate(q, k, k_pos, valid, block_len, S, bs, top_n, causal, scale, dtype)
    ctx = (f"{dtype} D={D} G={G} L={L} S={S} bs={bs} bl={block_len} top_n={top_n} "
           f"causal={causal} pad={padding} pos={with_pos} ties={ties}")
    assert (got != -7).all(), f"{ctx}: unwritten output"
    # compressed keys (tokens some CTA needed) vs the float64 reference before rounding
    qz = q if valid is None else q.masked_fill(~valid[:, :, None, None], 0.0)
    kz = k if valid is None else k.masked_fill(~valid[:, :, None, None], 0.0)
    want_k = ref.block_compress(kz.double(), block_len, S, pos=None if k_pos is None else k_pos.double(),
                                valid=valid).numpy()
    have = ~np.isnan(kcmp)
    eps = {torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11}[dtype]
    err = np.abs(kcmp[have] - want_k[have]) - eps * np.abs(want_k[have]) - 1e-6
    assert (err <= 0).all(), f"{ctx}: compressed keys off by {err.max()}"
    # selection vs the dense reference on the emulated (rounded) keys; the emulation scores in
    # float64, so any difference is an index-math error (ties aside: random data has none)
    kc = torch.from_numpy(np.nan_to_num(kcmp, nan=0.0)).double()
    want = ref.select_blocks(qz.double(), kc, top_n, block_size=bs, stride=S, block_len=block_len,
                             causal=causal, valid=valid, scale=scale)
    bad = (got != want.long()).any(-1)
    if bad.any():
        b, i, g = [int(x) for x in bad.nonzero()[0]]
        raise AssertionError(f"{ctx}: {int(bad.sum())} rows differ, first (b={b}, i={i}, g={g}): "
                             f"emulated {got[b, i, g].tolist()} reference {want[b, i, g].tolist()}")
    return int((got >= 0).sum())


def main():
    rng = random.Random(7)
    cases = []
    # the benchmark configuration and the check grid's edges
    for D, G, L, causal in itertools.product((16, 64), (1, 4), (1, 7, 50, 200, 256), (True, False)):
        cases.append((torch.bfloat16, D, G, L, 16, 16, 32, 4, causal, "none", False))
    # padding, k_pos, other strides / block sizes / top_n, odd G, T up to 32, two head chunks
    cases += [
        (torch.float16, 32, 2, 200, 16, 16, 32, 4, True, "lengths", True),
        (torch.bfloat16, 64, 4, 200, 16, 16, 32, 4, False, "random", False),
        (torch.bfloat16, 16, 3, 77, 4, 8, 8, 3, True, "random", True),
        (torch.float16, 32, 6, 130, 8, 16, 24, 5, False, "lengths", False),
        (torch.bfloat16, 64, 2, 256, 8, 8, 16, 4, True, "none", True),
        (torch.bfloat16, 16, 1, 250, 8, 24, 40, 2, False, "random", False),
        (torch.float16, 64, 5, 150, 16, 48, 64, 2, True, "none", False),
        (torch.bfloat16, 32, 9, 97, 16, 32, 32, 1, False, "none", False),
        (torch.bfloat16, 64, 1, 100, 4, 4, 4, 40, True, "lengths", False),
        (torch.bfloat16, 16, 4, 200, 16, 16, 32, 4, True, "none", False, True),
        (torch.float16, 32, 2, 256, 8, 16, 16, 3, False, "random", False, True),
    ]
    n_sel = 0
    for case in cases:
        n_sel += one_case(rng, *case)
        print("ok", case[0], *case[1:], flush=True)
    print(f"emulate_short_select: {len(cases)} cases agree with the reference "
          f"({n_sel} selected entries)")


if __name__ == "__main__":
    main()
