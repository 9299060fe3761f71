"""Replays bs_dkdv_mma_kernel (csrc/cuda/block_sparse_dkdv_mma.cuh) on the CPU with numpy, lane by
lane, together with the inverse index it reads (block_index_kernel in
csrc/cuda/block_sparse_attention.cu: the selected_block rule, the order warp / 32-query group /
slot / lane, the counting-sort offsets). Modelled: the CTA -> (b, g, block, key tile) split, the
K/V copy over the CTA's threads, the slot list (own-block queries from 16 kt when causal,
clipped to L, then the bucket), the chunk walk u = w, w + W, ... with the (group, head) carry,
the one-ahead position prefetch, the cp.async row copies (lane -> row / piece, shuffled
positions, 32-bit offsets, zero fill), lse / delta staging, ldmatrix addresses, mma.sync
m16n8k16 fragment layouts, the causal triangle of group 0, the P^T / dS^T A fragments, the
warp-order reduction through shared memory and the output stores (scale, padded keys,
accumulate). Compares grad_k / grad_v with a dense float64 reference of the block-sparse mask
(DESIGN.md op 4; -1, duplicate, own-block and out-of-range entries ignored, as on the GPU).

Inputs live in flat buffers with explicit strides (head strides larger than D: NaN gaps) and
every element the kernel must never read (gaps, padded positions, lse / delta of padded rows,
the unused tail of the index entries) holds NaN or garbage: a wrong offset or a read of an
invalid row shows up as NaN or a mismatch. Rows whose lse is -inf (no key) or +inf (a gate
that underflowed: lse' = +inf, attn_gate_fold.cuh) must contribute nothing. No timing and no
16-bit rounding is modelled (products are exact), so agreement is ~1e-15.

`--mutate` re-runs the cases with deliberate bugs planted in the replay (one at a time) and
checks that each is caught: evidence that the comparison can see such errors.

Usage: python3 scripts/emulate_bs_dkdv_mma.py [--quick] [--mutate] [--sweep N] [--warps W]
"""
from __future__ import annotations

import argparse
import math
import sys
import warnings

import numpy as np

from emulate_window_dkdv_mma import ldmatrix_x4, padded_inputs, tile_col_offset, tile_row_offset
from mma_emu import mma

warnings.simplefilter("ignore", RuntimeWarning)  # mutations produce inf / NaN on purpose

LOG2E = 1.4426950408889634
WARPS, INDEX_WARPS = 2, 8  # WARPS: the kernel's kBsWarps (--warps 4: kBsWarpsOld)
GARBAGE = 1 << 20  # unused index entries: a position far outside every buffer
MUT: set[str] = set()

MUTATIONS = {
    "tri_off": "no causal triangle in group 0",
    "tri_all": "causal triangle applied to every group",
    "tri_diag": "triangle excludes the diagonal (x > 0 instead of x >= 0)",
    "s0_noncausal": "own queries before the tile skipped also when not causal",
    "own_clip": "own slots not clipped to L (n_own = bs - s0)",
    "bucket_short": "last bucket slot dropped",
    "own_valid": "own slots taken without their validity check",
    "head_carry": "head carry without moving to the next group",
    "prefetch_stale": "issue uses the positions of the previous chunk",
    "shfl_row": "row positions shuffled from lane r0 instead of the piece's row",
    "meta_swap": "lse and delta lanes swapped",
    "zfill_off": "rows of non-participating slots copied instead of zero-filled",
    "lse_inf": "lse = -inf rows not turned into bias -inf",
    "kv_swap": "V fragments loaded from the K rows",
    "row_col_swap": "Q B fragments through the row offset instead of the column offset",
    "trans_wrong": "dV/dK B fragments without .trans",
    "a_frag_order": "P^T A fragment registers 1 and 2 swapped",
    "buf_order": "compute reads the buffer issued last instead of chunk k's",
    "kmask": "padded keys written with their sums instead of zeros",
    "red_warp": "reduction reads warp 0's partial sums twice instead of warp 1's",
    "index_causal": "index keeps selected blocks after the query (causal)",
}


# ----------------------------------------------------------------------------- inverse index
def selected_block(row, s, own, i, C, bs, causal):
    c = int(row[s])
    if c < 0 or c >= C or c == own or (causal and c * bs > i and "index_causal" not in MUT):
        return -1
    for k in range(s):
        if row[k] == c:
            return -1
    return c


def build_index(idx, valid, L, bs, causal):
    """block_index_kernel: off [B*Hk, C+1], entries [B*Hk, L*n] (unused tail: GARBAGE)."""
    B, _, Hk, n = idx.shape
    C = -(-L // bs)
    per = -(-L // INDEX_WARPS)
    off = np.zeros((B * Hk, C + 1), dtype=np.int64)
    ent = np.full((B * Hk, max(L * n, 1)), GARBAGE, dtype=np.int64)
    for b in range(B):
        for g in range(Hk):
            buckets = [[] for _ in range(C)]
            for w in range(INDEX_WARPS):
                lo, hi = w * per, min((w + 1) * per, L)
                for i0 in range(lo, hi, 32):
                    for s in range(n):
                        for lane in range(32):
                            i = i0 + lane
                            if i < hi and valid[b, i]:
                                c = selected_block(idx[b, i, g], s, i // bs, i, C, bs, causal)
                                if c >= 0:
                                    buckets[c].append(i)
            bg = b * Hk + g
            pos = 0
            for c in range(C):
                off[bg, c] = pos
                ent[bg, pos:pos + len(buckets[c])] = buckets[c]
                pos += len(buckets[c])
            off[bg, C] = pos
    return off, ent.reshape(-1)


# ----------------------------------------------------------------------------- the kernel
class Tensors:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def run_kernel(T, off, ent, B, L, Hq, Hk, D, bs, n, causal, scale, accumulate):
    G = Hq // Hk
    C = -(-L // bs)
    tpb = bs // 16
    CPR, RS, NF = D // 8, D + 8, D // 16
    RPS, OS = 32 // CPR, D + 4
    STAGES = 3 if D <= 64 else 2  # BsCfg::STAGES
    dgrp, dhh = WARPS // G, WARPS % G
    gk, gv = T.gk.copy(), T.gv.copy()
    sl2 = scale * LOG2E
    lanes = range(32)

    def valid(b, i):
        assert 0 <= i < L, "validity read outside the row"
        return bool(T.valid[b * L + i])

    for cta in range(B * Hk * C * tpb):
        u = cta
        kt = u % tpb
        u //= tpb
        c = u % C
        bg = u // C
        b, g = bg // Hk, bg % Hk
        cb = c * bs
        j0 = cb + 16 * kt
        kmask = sum(1 << l for l in range(16) if j0 + l < L and valid(b, j0 + l))  # jl < L first
        acc = []  # per warp: (dk, dv) as [lane][n][4]
        staged = []  # per warp: output staging (rows)
        kv_s = np.full(32 * RS, np.nan)
        if kmask:
            kb, vb = b * T.ksb + g * T.ksh, b * T.vsb_ + g * T.vsh
            for x in range(32 * CPR):  # any thread order: each piece is written once
                r, pc = x // CPR, x % CPR
                kk = r & 15
                ok = (kmask >> kk) & 1
                isk = r < 16
                sl = T.ksl if isk else T.vsl
                o = (j0 + kk) * sl + pc * 8 if ok else 0
                assert 0 <= o < 2 ** 31
                buf, base = (T.k, kb) if isk else (T.v, vb)
                d = r * RS + pc * 8
                kv_s[d:d + 8] = buf[base + o:base + o + 8] if ok else 0.0
            s0 = 16 * kt if (causal or "s0_noncausal" in MUT) else 0
            own0 = cb + s0
            n_own = (bs - s0) if "own_clip" in MUT else min(bs, L - cb) - s0
            o0 = int(off[bg, c])
            n_slots = n_own + int(off[bg, c + 1]) - o0 - (1 if "bucket_short" in MUT else 0)
            lbase = bg * L * n + o0
            n_chunks = -(-n_slots // 16) * G
        for w in range(WARPS):
            dk = [[[0.0] * 4 for _ in range(2 * NF)] for _ in lanes]
            dv = [[[0.0] * 4 for _ in range(2 * NF)] for _ in lanes]
            if kmask:
                my = (n_chunks - 1 - w) // WARPS + 1 if w < n_chunks else 0
                rows = [np.full(32 * RS, np.nan) for _ in range(STAGES)]
                meta = [np.full(32, np.nan) for _ in range(STAGES)]

                def slot_pos(grp):
                    pi, pok = [0] * 32, [False] * 32
                    for lane in lanes:
                        slot = 16 * grp + (lane & 15)
                        if slot < n_own:
                            i = own0 + slot
                            pi[lane] = i
                            pok[lane] = True if "own_valid" in MUT else valid(b, i)
                        elif slot < n_slots:
                            pi[lane] = int(ent[lbase + slot - n_own])
                            pok[lane] = True
                    return pi, pok

                qb = b * T.qsb + g * G * T.qsh
                obb = b * T.osb + g * G * T.osh
                mb = b * L * Hq + g * G

                def issue(hh, buf, pi, pok):
                    vm = sum(1 << l for l in range(16) if pok[l])
                    for lane in lanes:
                        i, ok = pi[lane], pok[lane]
                        lo = (lane >= 16) if "meta_swap" in MUT else (lane < 16)
                        if ok:
                            o = i * Hq + hh
                            assert 0 <= o < 2 ** 32
                            src = T.lse if lo else T.delta
                            meta[buf][lane] = src[mb + o] if mb + o < len(src) else np.nan
                        else:
                            meta[buf][lane] = -np.inf if lane < 16 else 0.0
                        r0, pc = lane // CPR, lane % CPR
                        dst = r0 * RS + pc * 8
                        for k in range(CPR // 2):
                            r = r0 + k * RPS
                            ir = pi[r0 if "shfl_row" in MUT else r]
                            okr = (vm >> r) & 1
                            cp = okr or "zfill_off" in MUT
                            oq = ir * T.qsl + hh * T.qsh + pc * 8 if cp else 0
                            oo = ir * T.osl + hh * T.osh + pc * 8 if cp else 0
                            for (fb, base, o, d) in ((T.q, qb, oq, dst + k * RPS * RS),
                                                     (T.dO, obb, oo, dst + (16 + k * RPS) * RS)):
                                if cp:
                                    assert 0 <= o < 2 ** 32, "offset outside the unsigned range"
                                    s = base + o
                                    rows[buf][d:d + 8] = fb[s:s + 8] if s + 8 <= len(fb) else np.nan
                                else:
                                    rows[buf][d:d + 8] = 0.0

                st = dict(grp=w // G, hh=w % G, buf=0)
                st["pi"], st["pok"] = slot_pos(st["grp"])
                prev = [None]

                def issue_next():
                    pi, pok = st["pi"], st["pok"]
                    if "prefetch_stale" in MUT and prev[0] is not None:
                        pi, pok = prev[0]
                    issue(st["hh"], st["buf"], pi, pok)
                    prev[0] = (st["pi"], st["pok"])
                    st["hh"] += dhh
                    st["grp"] += dgrp
                    if st["hh"] >= G:
                        st["hh"] -= G
                        if "head_carry" not in MUT:
                            st["grp"] += 1
                    st["buf"] = (st["buf"] + 1) % STAGES
                    st["pi"], st["pok"] = slot_pos(st["grp"])

                for s in range(STAGES - 1):
                    if s < my:
                        issue_next()
                ro = [tile_row_offset(l, RS) for l in lanes]
                ka = [ldmatrix_x4(kv_s, [16 * f + ro[l] for l in lanes]) for f in range(NF)]
                vsrc = 0 if "kv_swap" in MUT else 16 * RS
                va = [ldmatrix_x4(kv_s, [vsrc + 16 * f + ro[l] for l in lanes]) for f in range(NF)]
                u_c, buf_c = w, 0
                for k in range(my):
                    if k + STAGES - 1 < my:
                        issue_next()
                    bc = (st["buf"] + STAGES - 1) % STAGES if "buf_order" in MUT else buf_c
                    tri = causal and u_c < G
                    if "tri_off" in MUT:
                        tri = False
                    if "tri_all" in MUT:
                        tri = causal
                    compute_chunk(rows[bc], meta[bc], tri, ka, va, dk, dv, sl2, RS, NF)
                    u_c += WARPS
                    buf_c = (buf_c + 1) % STAGES
            acc.append((dk, dv))
            # this warp's partial sums -> rows of its (now free) buffers
            stk, stv = np.full(16 * OS, np.nan), np.full(16 * OS, np.nan)
            for lane in lanes:
                gid, tig = lane >> 2, lane & 3
                for nn in range(2 * NF):
                    o0_ = gid * OS + 8 * nn + 2 * tig
                    o1_ = o0_ + 8 * OS
                    stk[o0_:o0_ + 2], stk[o1_:o1_ + 2] = dk[lane][nn][0:2], dk[lane][nn][2:4]
                    stv[o0_:o0_ + 2], stv[o1_:o1_ + 2] = dv[lane][nn][0:2], dv[lane][nn][2:4]
            staged.append((stk, stv))
        # CTA: sum the warps in order, write every key < L
        for x in range(16 * CPR):
            r, pc = x // CPR, x % CPR
            j = j0 + r
            if j >= L:
                continue
            fk, fv = np.zeros(8), np.zeros(8)
            for w in range(WARPS):
                wr = 0 if ("red_warp" in MUT and w == 1) else w
                stk, stv = staged[wr]
                fk = fk + stk[r * OS + pc * 8:r * OS + pc * 8 + 8]
                fv = fv + stv[r * OS + pc * 8:r * OS + pc * 8 + 8]
            ok = (kmask >> r) & 1 or "kmask" in MUT
            fk = fk * scale if ok else np.zeros(8)
            fv = fv if ok else np.zeros(8)
            ko = b * T.gksb + j * T.gksl + g * T.gksh + pc * 8
            vo = b * T.gvsb + j * T.gvsl + g * T.gvsh + pc * 8
            gk[ko:ko + 8] = (gk[ko:ko + 8] if accumulate else 0) + fk
            gv[vo:vo + 8] = (gv[vo:vo + 8] if accumulate else 0) + fv
    return gk, gv


def compute_chunk(rq_all, meta, tri, ka, va, dk, dv, sl2, RS, NF):
    lanes = range(32)
    q_col = [tile_row_offset(l, RS) if "row_col_swap" in MUT else tile_col_offset(l, RS)
             for l in lanes]
    q_row = [tile_row_offset(l, RS) for l in lanes]
    sc = [[[0.0] * 4 for _ in range(2)] for _ in lanes]
    dp = [[[0.0] * 4 for _ in range(2)] for _ in lanes]
    for f in range(NF):
        bq = ldmatrix_x4(rq_all, [16 * f + q_col[l] for l in lanes])
        mma([sc[t][0] for t in lanes], ka[f], [bq[t][0] for t in lanes], [bq[t][1] for t in lanes])
        mma([sc[t][1] for t in lanes], ka[f], [bq[t][2] for t in lanes], [bq[t][3] for t in lanes])
        bo = ldmatrix_x4(rq_all, [16 * RS + 16 * f + q_col[l] for l in lanes])
        mma([dp[t][0] for t in lanes], va[f], [bo[t][0] for t in lanes], [bo[t][1] for t in lanes])
        mma([dp[t][1] for t in lanes], va[f], [bo[t][2] for t in lanes], [bo[t][3] for t in lanes])
    pa_all, da_all = [], []
    for lane in lanes:
        gid, tig = lane >> 2, lane & 3
        bias = [[0.0, 0.0], [0.0, 0.0]]
        dlt = [[0.0, 0.0], [0.0, 0.0]]
        for t in range(2):
            for uu in range(2):
                l2 = meta[8 * t + 2 * tig + uu]
                bias[t][uu] = -l2 * LOG2E if ("lse_inf" in MUT or l2 != -np.inf) else -np.inf
                dlt[t][uu] = meta[16 + 8 * t + 2 * tig + uu]
        x0 = 2 * tig - gid
        pa, da = [None] * 4, [None] * 4
        for t in range(2):
            for hr in range(2):
                pv, sv = [0.0, 0.0], [0.0, 0.0]
                for uu in range(2):
                    x = x0 + 8 * (t - hr) + uu
                    allowed = (not tri) or (x > 0 if "tri_diag" in MUT else x >= 0)
                    e = 2 * hr + uu
                    with np.errstate(over="ignore"):
                        pr = 2.0 ** (sc[lane][t][e] * sl2 + bias[t][uu])
                    pv[uu] = pr if allowed else 0.0
                    sv[uu] = pv[uu] * (dp[lane][t][e] - dlt[t][uu])
                pa[2 * t + hr] = tuple(pv)
                da[2 * t + hr] = tuple(sv)
        if "a_frag_order" in MUT:
            pa[1], pa[2] = pa[2], pa[1]
        pa_all.append(pa)
        da_all.append(da)
    for f in range(NF):
        for src, acc, frag in ((16 * RS, dv, pa_all), (0, dk, da_all)):
            bt = ldmatrix_x4(rq_all, [src + 16 * f + q_row[l] for l in lanes],
                             trans="trans_wrong" not in MUT)
            for half in range(2):
                mma([acc[t][2 * f + half] for t in lanes], frag,
                    [bt[t][2 * half] for t in lanes], [bt[t][2 * half + 1] for t in lanes])


# ----------------------------------------------------------------------------- reference
def dense_mask(idx, valid, L, bs, causal):
    """[B, Hk, L, L] per DESIGN.md op 4 (entries outside [0, C) ignored, as the GPU does)."""
    B, _, Hk, n = idx.shape
    C = -(-L // bs)
    blk = np.arange(L) // bs
    M = np.zeros((B, Hk, L, L), dtype=bool)
    for b in range(B):
        for g in range(Hk):
            for i in range(L):
                chosen = {int(c) for c in idx[b, i, g] if 0 <= c < C}
                chosen.add(int(blk[i]))
                M[b, g, i] = np.isin(blk, list(chosen))
    if causal:
        M &= np.arange(L)[None, :] <= np.arange(L)[:, None]
    M &= valid[:, None, :, None] & valid[:, None, None, :]
    return M


def reference(q, k, v, dO, lse, delta, M, scale, G):
    B, L, Hq, D = q.shape
    Hk = k.shape[2]
    dk = np.zeros((B, L, Hk, D))
    dv = np.zeros((B, L, Hk, D))
    for b in range(B):
        for h in range(Hq):
            g = h // G
            live = (lse[b, :, h] > -np.inf)[:, None] & M[b, g]
            S = q[b, :, h] @ k[b, :, g].T * scale
            with np.errstate(invalid="ignore"):
                arg = np.where(live, S - np.where(live, lse[b, :, h][:, None], 0.0), -np.inf)
            P = np.where(live, np.exp(arg), 0.0)
            dP = dO[b, :, h] @ v[b, :, g].T
            dS = P * (dP - delta[b, :, h][:, None])
            dv[b, :, g] += P.T @ dO[b, :, h]
            dk[b, :, g] += scale * dS.T @ q[b, :, h]
    return dk, dv


# ----------------------------------------------------------------------------- cases
def run_case(B, L, Hq, Hk, D, bs, n, causal, pad, accumulate, seed, inf_rows=False,
             popular=False):
    rng = np.random.default_rng(seed)
    G = Hq // Hk
    C = -(-L // bs)
    scale = 1.0 / math.sqrt(D)
    valid, (q, qf, (qsb, qsl, qsh)), (dO, of, (osb, osl, osh)), (k, kf, (ksb, ksl, ksh)), \
        (v, vf, (vsb, vsl, vsh)) = padded_inputs(rng, B, L, Hq, Hk, D, pad)
    # block_idx: -1, duplicates, the own block, future blocks, out-of-range values
    idx = rng.integers(-1, C + 1, size=(B, L, Hk, n))
    if n >= 2:
        idx[:, ::3, :, 1] = idx[:, ::3, :, 0]  # duplicates
    if n >= 1:
        idx[:, 1::7, :, 0] = (np.arange(L)[1::7] // bs)[None, :, None]  # own block
        idx[:, 2::9, :, -1] = C + 3  # out of range: ignored by the GPU path
        if popular:
            idx[:, :, 0, 0] = 0
    M = dense_mask(idx, valid, L, bs, causal)
    lse = np.full((B, L, Hq), -np.inf)
    for b in range(B):
        for h in range(Hq):
            S = q[b, :, h] @ k[b, :, h // G].T * scale
            S = np.where(M[b, h // G], S, -np.inf)
            mx = S.max(1)
            fin = np.isfinite(mx)
            lse[b, fin, h] = mx[fin] + np.log(np.exp(S[fin] - mx[fin, None]).sum(1))
    if inf_rows:  # rows with no key (-inf) and a gate that underflowed (+inf)
        lse[:, 1::5, :] = -np.inf
        lse[:, 3::7, ::2] = np.inf
    delta = rng.standard_normal((B, L, Hq))
    delta = np.where(valid[:, :, None], delta, np.nan)  # padded rows: never read
    lse_flat = np.where(valid[:, :, None], lse, np.nan).reshape(-1)
    off, ent = build_index(idx, valid, L, bs, causal)
    gk0 = rng.standard_normal(B * L * Hk * D)
    gv0 = rng.standard_normal(B * L * Hk * D)
    T = Tensors(q=qf, qsb=qsb, qsl=qsl, qsh=qsh, dO=of, osb=osb, osl=osl, osh=osh,
                k=kf, ksb=ksb, ksl=ksl, ksh=ksh, v=vf, vsb_=vsb, vsl=vsl, vsh=vsh,
                lse=lse_flat, delta=delta.reshape(-1), valid=valid.reshape(-1),
                gk=gk0, gv=gv0, gksb=L * Hk * D, gksl=Hk * D, gksh=D,
                gvsb=L * Hk * D, gvsl=Hk * D, gvsh=D)
    gk, gv = run_kernel(T, off, ent, B, L, Hq, Hk, D, bs, n, causal, scale, accumulate)
    rdk, rdv = reference(q, k, v, dO, lse, np.nan_to_num(delta), M, scale, G)
    gk = gk.reshape(B, L, Hk, D) - (gk0.reshape(B, L, Hk, D) if accumulate else 0)
    gv = gv.reshape(B, L, Hk, D) - (gv0.reshape(B, L, Hk, D) if accumulate else 0)
    if not (np.isfinite(gk).all() and np.isfinite(gv).all()):
        return math.inf
    return max(np.abs(gk - rdk).max() / max(1.0, np.abs(rdk).max()),
               np.abs(gv - rdv).max() / max(1.0, np.abs(rdv).max()))


CASES = [
    # B, L, Hq, Hk, D, bs, n, causal, pad, accumulate, inf_rows, popular
    (2, 70, 8, 2, 16, 16, 4, True, None, False, False, True),     # defaults (G = 4), tail 6
    (1, 64, 2, 2, 16, 16, 2, False, "random", True, False, False),  # G = 1, non-causal, padding
    (1, 83, 4, 2, 32, 32, 3, True, "lengths", False, True, False),  # bs 32 (2 tiles), +-inf lse
    (1, 50, 8, 1, 16, 16, 3, True, "random", True, True, True),   # G = 8, padding, popular
    (1, 97, 6, 2, 16, 48, 2, False, None, False, False, False),   # G = 3, bs 48, non-causal
    (1, 40, 4, 2, 64, 16, 4, True, "lengths", False, False, False),  # D = 64
    (1, 9, 4, 1, 16, 16, 2, True, None, False, False, False),     # L < 16: one partial tile
    (1, 33, 2, 1, 32, 16, 0, True, "random", False, False, False),  # top-n 0: own block only
    (1, 45, 4, 2, 128, 32, 3, True, "random", False, True, True),   # D = 128 (2 stages)
    (1, 38, 2, 1, 128, 16, 2, False, None, True, False, False),     # D = 128 non-causal
]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="first three cases only")
    ap.add_argument("--mutate", action="store_true", help="check that planted bugs are caught")
    ap.add_argument("--sweep", type=int, default=0, help="also N random shapes and masks")
    ap.add_argument("--warps", type=int, default=2, choices=(2, 4),
                    help="warps per key tile (the kernel's W; 4: BLOSSOM_OPS_CUDA_BS_WARPS=4)")
    args = ap.parse_args()
    global WARPS
    WARPS = args.warps
    cases = CASES[:3] if args.quick else CASES
    worst = 0.0
    for nc, c in enumerate(cases):
        *shape, inf_rows, popular = c
        err = run_case(*shape, seed=nc, inf_rows=inf_rows, popular=popular)
        print(f"case {c}: max rel err {err:.2e}", flush=True)
        worst = max(worst, err)
    rng = np.random.default_rng(4321)
    for ns in range(args.sweep):
        Hk = int(rng.choice([1, 2]))
        G = int(rng.choice([1, 2, 3, 4, 8]))
        bs = int(rng.choice([16, 16, 32, 48]))
        c = (int(rng.integers(1, 3)), int(rng.integers(1, 100)), Hk * G, Hk,
             int(rng.choice([16, 16, 32, 64, 128])), bs, int(rng.integers(0, 5)),
             bool(rng.integers(2)), [None, "lengths", "random"][int(rng.integers(3))],
             bool(rng.integers(2)), bool(rng.integers(2)), bool(rng.integers(2)))
        *shape, inf_rows, popular = c
        err = run_case(*shape, seed=100 + ns, inf_rows=inf_rows, popular=popular)
        print(f"sweep {c}: max rel err {err:.2e}", flush=True)
        worst = max(worst, err)
    ok = worst < 1e-9
    print(f"worst {worst:.2e}: " + ("ok" if ok else "MISMATCH"))
    if args.mutate:
        missed = []
        for name, what in MUTATIONS.items():
            MUT.clear()
            MUT.add(name)
            caught = False
            for nc, c in enumerate(cases):
                *shape, inf_rows, popular = c
                try:
                    err = run_case(*shape, seed=nc, inf_rows=inf_rows, popular=popular)
                except (AssertionError, IndexError, ValueError):
                    err = math.inf
                if not err < 1e-9:
                    caught = True
                    break
            print(f"mutation {name:15s} ({what}): {'caught' if caught else 'NOT CAUGHT'}",
                  flush=True)
            if not caught:
                missed.append(name)
        MUT.clear()
        ok = ok and not missed
        print("mutations: all caught" if not missed else f"mutations missed: {missed}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
