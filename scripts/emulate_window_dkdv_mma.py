"""Replays window_dkdv_tc_kernel (csrc/cuda/window_dkdv_tc.cuh) on the CPU with numpy, lane by
lane: the tile plan (make_win_tile_plan), the per-tile segment trimming, the head-major chunk
order through the 3 stage buffers, the cp.async row copies (lane -> row / piece, 32-bit offsets,
zero fill), lse / delta staging, ldmatrix addresses, mma.sync m16n8k16 fragment layouts, the
dense and diagonal masking paths, the P^T / dS^T A fragments, and the output staging; by
default lse / delta are read from the head-major copies [B, Hq, L] that
win_meta_transpose_kernel makes (replayed thread by thread, into a NaN workspace), the
"tc1" variant reads them in place as BLOSSOM_OPS_CUDA_WIN_DKDV=tc1 does. Compares
grad_k / grad_v with a dense float64 reference of the sliding-window mask (DESIGN.md op 1).

Inputs live in flat buffers with explicit strides (a head stride larger than D, so rows have
gaps) and every element the kernel must never read (the gaps, positions outside [0, L), padded
positions) holds NaN: a wrong offset or a read of an invalid row shows up as NaN or a mismatch.
It does not model timing or 16-bit rounding (products are exact), so agreement is ~1e-12.

`--mutate` re-runs every case with deliberate bugs planted in the replay (one at a time) and
checks that each is caught: evidence that the comparison can see such errors.

Usage: python3 scripts/emulate_window_dkdv_mma.py [--quick] [--mutate] [--sweep N]
Fragment semantics (PTX ISA, m16n8k16, 16-bit): see csrc/cuda/mma_frag.cuh.
"""
from __future__ import annotations

import argparse
import math
import sys

import warnings

import numpy as np

from mma_emu import ldmatrix_pairs, mma

warnings.simplefilter("ignore", RuntimeWarning)  # mutations produce inf / NaN on purpose

LOG2E = 1.4426950408889634
WARPS, STAGES = 4, 3
MUT: set[str] = set()  # active mutations (see MUTATIONS)
VARIANT: set[str] = set()  # legitimate alternatives that must agree too ("no_absorb")

MUTATIONS = {
    "plan_bits_band": "dense block absorbs dilated distances but its bits keep only the band",
    "trim_dense_off1": "last dense chunk dropped",
    "trim_neg_off1": "negative diagonals kept only when they end at or after j0 + 16",
    "plan_bits_off1": "dense bit pattern shifted by one distance",
    "trim_diag_off1": "one diagonal too few kept at the end of the sequence",
    "neg_diag_sign": "negative diagonals use +d",
    "row_col_swap": "Q B fragments through the row offset instead of the column offset",
    "trans_wrong": "dV/dK B fragments without .trans",
    "diag_dj": "diagonal path picks the other element of the pair",
    "diag_on": "diagonal path keeps every lane's candidate",
    "a_frag_order": "P^T A fragment registers 1 and 2 swapped",
    "x0_sign": "dense column - key offset uses gid - 2 tig",
    "copy_step": "row copy step of 16 rows instead of 32 / CPR",
    "zfill_off": "invalid rows are copied instead of zero-filled",
    "lse_inf": "lse = -inf rows are not skipped",
    "buf_order": "compute reads the buffer issued last instead of chunk c's",
    "head_order": "issue walks heads in the wrong order (chunk-major instead of head-major)",
    "kmask": "padded keys written with their sums instead of zeros",
    "mt_index": "tile kernel reads the head-major lse / delta at i * Hq + hh (the in-place index)",
    "mt_head": "tile kernel's head-major base misses the group's first head (g * G)",
    "mt_smem": "transpose reads its shared rows as [Hq][32] instead of [32][Hq]",
    "mt_tail": "transpose copies 32 positions of the last tile even when fewer remain",
    "mt_tiles": "transpose grid counts L // 32 tiles (the partial last tile never copied)",
}
META_TP = 32  # kWinMetaTP: positions per CTA of win_meta_transpose_kernel


# ----------------------------------------------------------------------------- host plan
def sliding_policy(L, window, dilated):
    """SlidingPolicy::make: band, p0, n_pow."""
    band = min(window, L) if window >= 1 else 0
    p0 = n_pow = 0
    if dilated:
        lo = max(window, 1)
        p = 0
        while p < 62 and (1 << p) < lo:
            p += 1
        p0 = p
        while p < 62 and (1 << p) <= L - 1:
            n_pow += 1
            p += 1
    return band, p0, n_pow


def make_plan(L, band, p0, n_pow, causal):
    """make_win_tile_plan."""
    def reach(m):
        return band if m == 0 else (1 << (p0 + m - 1)) + 1

    def span(e):
        return 0 if e == 0 else (e if causal else 2 * e - 1)

    def chunks(e):
        return 0 if e == 0 else (15 + span(e) + 15) // 16

    best_m, best_cost = 0, None
    for m in range(0, n_pow + 1):
        if "no_absorb" in VARIANT and m > 0:
            break
        e = reach(m)
        if m > 0 and span(e) > 32:
            break
        cost = chunks(e) + (n_pow - m) * (1 if causal else 2)
        if best_cost is None or cost < best_cost:
            best_cost, best_m = cost, m
    e = reach(best_m)
    pl = dict(L=L, causal=causal, nd=chunks(e), dlo=0 if causal else 1 - e)
    if best_m == 0:
        pl["xlen"], pl["bits"] = span(e), 0xFFFFFFFF
    else:
        bits = 0
        for x in range(32):
            d = pl["dlo"] + x
            ad = abs(d)
            ok = ad < band or ("plan_bits_band" not in MUT and
                                any(ad == (1 << (p0 + k)) for k in range(best_m)))
            if ok and (not causal or d >= 0):
                bits |= 1 << x
        if "plan_bits_off1" in MUT:
            bits = (bits << 1) & 0xFFFFFFFF
        pl["xlen"], pl["bits"] = 32, bits
    pl["q0"], pl["n_pow"] = p0 + best_m, n_pow - best_m
    return pl


# ----------------------------------------------------------------------------- warp primitives
def tile_row_offset(lane, RS):
    return ((lane & 7) + ((lane >> 3) & 1) * 8) * RS + (lane >> 4) * 8


def tile_col_offset(lane, RS):
    return ((lane & 7) + (lane >> 4) * 8) * RS + ((lane >> 3) & 1) * 8


def ldmatrix_x4(sm, addr, trans=False):
    """sm: flat element array; addr[lane] = element offset of row lane % 8 of matrix lane // 8.
    Returns r[lane][j] = (lo, hi) of matrix j (transposed when trans)."""
    return ldmatrix_pairs([np.stack([sm[addr[8 * j + q]:addr[8 * j + q] + 8] for q in range(8)])
                           for j in range(4)], trans)


# ----------------------------------------------------------------------------- the kernel
class Tensors:
    """Flat buffers + element strides, as the kernel sees them (Bshd)."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def meta_transpose(lse, delta, B, L, Hq):
    """win_meta_transpose_kernel, thread by thread: CTA (b, 32 positions), shared rows
    [32][Hq] of lse then delta, head-major outputs [B, Hq, L] in an uninitialised (NaN)
    workspace. Returns (lse_t, delta_t)."""
    lse_t, delta_t = np.full(B * Hq * L, np.nan), np.full(B * Hq * L, np.nan)
    tiles = L // META_TP if "mt_tiles" in MUT else (L + META_TP - 1) // META_TP
    for cta in range(B * tiles):
        b = cta // tiles
        i0 = (cta - b * tiles) * META_TP
        if b >= B or i0 >= L:
            continue
        np_ = META_TP if "mt_tail" in MUT else min(META_TP, L - i0)
        src = (b * L + i0) * Hq
        sm = np.full(2 * META_TP * Hq, np.nan)
        for e in range(np_ * Hq):  # threads e, e + 256, ...: order does not matter
            sm[e] = lse[src + e] if src + e < len(lse) else np.nan
            sm[META_TP * Hq + e] = delta[src + e] if src + e < len(delta) else np.nan
        for e in range(META_TP * Hq):
            h, ii = e // META_TP, e % META_TP
            if ii >= np_:
                continue
            dst = (b * Hq + h) * L + i0 + ii
            si = h * META_TP + ii if "mt_smem" in MUT else ii * Hq + h
            if dst < len(lse_t):
                lse_t[dst] = sm[si]
                delta_t[dst] = sm[META_TP * Hq + si]
    return lse_t, delta_t


def run_kernel(T, pl, B, L, Hq, Hk, D, scale, accumulate):
    G = Hq // Hk
    meta_t = "tc1" not in VARIANT  # the head-major copies (default) or lse / delta in place
    if meta_t:
        lse_t, delta_t = meta_transpose(T.lse, T.delta, B, L, Hq)
    CPR, RS, NF = D // 8, D + 8, D // 16
    RPS = 32 // CPR
    OS = D + 4
    gk, gv = T.gk.copy(), T.gv.copy()
    n_tiles = (L + 15) // 16
    tgroups = (n_tiles + WARPS - 1) // WARPS

    def pos_ok(b, i):
        return 0 <= i < L and T.valid[b * T.vsb + i]

    for cta in range(B * Hk * tgroups):
        bg = cta // tgroups
        for wib in range(WARPS):
            tile = (cta - bg * tgroups) * WARPS + wib
            if tile >= n_tiles:
                continue
            b, g = bg // Hk, bg % Hk
            j0 = tile * 16
            rows = [np.full(32 * RS, np.nan) for _ in range(STAGES)]  # uninitialised smem
            meta = [np.full(32, np.nan) for _ in range(STAGES)]
            kmask = sum(1 << l for l in range(16) if pos_ok(b, j0 + l))
            dk = [[[0.0] * 4 for _ in range(2 * NF)] for _ in range(32)]
            dv = [[[0.0] * 4 for _ in range(2 * NF)] for _ in range(32)]

            def copy_rows(dst, a, a_base, a_sl, bb, b_base, b_sl, a_off, b_off, vm):
                """WinRows::init + copy for all lanes (a_base / b_base: element offset of the
                (b, head) base in the flat buffers)."""
                step = 16 if "copy_step" in MUT else RPS
                for lane in range(32):
                    pc, r0 = lane % CPR, lane // CPR
                    a_lane, b_lane = r0 * a_sl + pc * 8, r0 * b_sl + pc * 8
                    dst_lane = r0 * RS + pc * 8
                    vl = vm >> r0
                    for kk in range(CPR // 2):
                        ok = (vl >> (kk * RPS)) & 1
                        oa = a_off + a_lane + kk * step * a_sl
                        ob = b_off + b_lane + kk * step * b_sl
                        d0 = dst_lane + kk * RPS * RS
                        for (buf, base, off, dd) in ((a, a_base, oa, d0), (bb, b_base, ob, d0 + 16 * RS)):
                            if ok or "zfill_off" in MUT:
                                assert 0 <= off < 2 ** 32, "offset outside the unsigned range"
                                src = base + (off if ok or "zfill_off" in MUT else 0)
                                dst[dd:dd + 8] = buf[src:src + 8] if src + 8 <= len(buf) else np.nan
                            else:
                                dst[dd:dd + 8] = 0.0

            if kmask:
                kb = b * T.ksb + g * T.ksh
                vb = b * T.vsb_ + g * T.vsh
                copy_rows(rows[STAGES - 1], T.k, kb, T.ksl, T.v, vb, T.vsl, j0 * T.ksl, j0 * T.vsl, kmask)
                a0 = j0 + pl["dlo"]
                s_lo = 0 if a0 + 15 >= 0 else (-(a0 + 15) + 15) // 16
                s_hi = min(pl["nd"], (L - 1 - a0) // 16 + 1)
                if "trim_dense_off1" in MUT:
                    s_hi -= 1
                nds = max(s_hi - s_lo, 0)
                np_t = nn_t = 0
                while np_t < pl["n_pow"] and j0 + (1 << (pl["q0"] + np_t)) <= L - 1:
                    np_t += 1
                if "trim_diag_off1" in MUT and np_t > 0 and j0 + (1 << (pl["q0"] + np_t)) > L - 1:
                    np_t -= 1
                if not pl["causal"]:
                    last = j0 if "trim_neg_off1" in MUT else j0 + 15
                    while nn_t < pl["n_pow"] and (1 << (pl["q0"] + nn_t)) <= last:
                        nn_t += 1
                NC = nds + np_t + nn_t
                n_chunks = NC * G

                def seg_rel(u):
                    if u < nds:
                        return pl["dlo"] + 16 * (s_lo + u)
                    kk = u - nds
                    neg = kk >= np_t
                    if neg:
                        kk -= np_t
                    d = 1 << (pl["q0"] + kk)
                    return -d if neg and "neg_diag_sign" not in MUT else d

                qb = b * T.qsb + g * G * T.qsh
                ob = b * T.osb + g * G * T.osh

                def issue(u, hh, buf):
                    i0 = j0 + seg_rel(u)
                    oks = [pos_ok(b, i0 + (lane & 15)) for lane in range(32)]
                    vm = sum(1 << l for l in range(16) if oks[l])
                    for lane in range(32):
                        i = i0 + (lane & 15)
                        if oks[lane] and meta_t:
                            base = (b * Hq + (0 if "mt_head" in MUT else g * G)) * L
                            off = i * Hq + hh if "mt_index" in MUT else hh * L + i
                            meta[buf][lane] = (lse_t if lane < 16 else delta_t)[base + off]
                        elif oks[lane]:
                            idx = (b * L * Hq + g * G) + (i * Hq + hh)
                            meta[buf][lane] = (T.lse if lane < 16 else T.delta)[idx]
                        else:
                            meta[buf][lane] = -np.inf if lane < 16 else 0.0
                    copy_rows(rows[buf], T.q, qb, T.qsl, T.dO, ob, T.osl,
                              i0 * T.qsl + hh * T.qsh, i0 * T.osl + hh * T.osh, vm)

                order = [(u, hh) for hh in range(G) for u in range(NC)]
                if "head_order" in MUT:
                    order = [(u, hh) for u in range(NC) for hh in range(G)]
                    order = [(u, (hh + 1) % G) for u, hh in order]
                it = iter(order)
                buf_i = 0
                for c in range(STAGES - 1):
                    if c < n_chunks:
                        issue(*next(it), buf_i)
                        buf_i = (buf_i + 1) % STAGES
                kv = rows[STAGES - 1]
                ka = ldmatrix_x4_all(kv, [[f * 16 + tile_row_offset(l, RS) for l in range(32)] for f in range(NF)])
                va = ldmatrix_x4_all(kv, [[16 * RS + f * 16 + tile_row_offset(l, RS) for l in range(32)] for f in range(NF)])
                sl2 = scale * LOG2E
                u_c, buf_c = 0, 0
                for c in range(n_chunks):
                    if c + STAGES - 1 < n_chunks:
                        issue(*next(it), buf_i)
                        buf_i = (buf_i + 1) % STAGES
                    bc = (buf_i + STAGES - 1) % STAGES if "buf_order" in MUT else buf_c
                    compute_chunk(rows[bc], meta[bc], u_c >= nds, 16 * (s_lo + u_c), pl, ka, va,
                                  dk, dv, sl2, D, RS, NF)
                    u_c = 0 if u_c + 1 == NC else u_c + 1
                    buf_c = (buf_c + 1) % STAGES
            # output staging and stores
            stk, stv = np.zeros(16 * OS), np.zeros(16 * OS)
            for lane in range(32):
                gid, tig = lane >> 2, lane & 3
                for n in range(2 * NF):
                    o0 = gid * OS + 8 * n + 2 * tig
                    o1 = o0 + 8 * OS
                    stk[o0:o0 + 2], stk[o1:o1 + 2] = dk[lane][n][0:2], dk[lane][n][2:4]
                    stv[o0:o0 + 2], stv[o1:o1 + 2] = dv[lane][n][0:2], dv[lane][n][2:4]
            for lane in range(32):
                for t in range(lane, 16 * CPR, 32):
                    r, pc = t // CPR, t % CPR
                    j = j0 + r
                    if j >= L:
                        continue
                    ok = (kmask >> r) & 1 or "kmask" in MUT
                    fk = stk[r * OS + pc * 8: r * OS + pc * 8 + 8] * scale if ok else np.zeros(8)
                    fv = stv[r * OS + pc * 8: r * OS + pc * 8 + 8] if ok else np.zeros(8)
                    ko = b * T.gksb + j * T.gksl + g * T.gksh + pc * 8
                    vo = b * T.gvsb + j * T.gvsl + g * T.gvsh + pc * 8
                    gk[ko:ko + 8] = (gk[ko:ko + 8] if accumulate else 0) + fk
                    gv[vo:vo + 8] = (gv[vo:vo + 8] if accumulate else 0) + fv
    return gk, gv


def ldmatrix_x4_all(sm, addrs, trans=False):
    return [ldmatrix_x4(sm, a, trans) for a in addrs]


def compute_chunk(rq_all, meta, diag, bx, pl, ka, va, dk, dv, sl2, D, RS, NF):
    q_col = [tile_row_offset(l, RS) if "row_col_swap" in MUT else tile_col_offset(l, RS)
             for l in range(32)]
    q_row = [tile_row_offset(l, RS) for l in range(32)]
    sc = [[[0.0] * 4 for _ in range(2)] for _ in range(32)]
    dp = [[[0.0] * 4 for _ in range(2)] for _ in range(32)]
    for f in range(NF):
        bq = ldmatrix_x4(rq_all, [16 * f + q_col[l] for l in range(32)])
        mma([sc[t][0] for t in range(32)], ka[f], [bq[t][0] for t in range(32)], [bq[t][1] for t in range(32)])
        mma([sc[t][1] for t in range(32)], ka[f], [bq[t][2] for t in range(32)], [bq[t][3] for t in range(32)])
        bo = ldmatrix_x4(rq_all, [16 * RS + 16 * f + q_col[l] for l in range(32)])
        mma([dp[t][0] for t in range(32)], va[f], [bo[t][0] for t in range(32)], [bo[t][1] for t in range(32)])
        mma([dp[t][1] for t in range(32)], va[f], [bo[t][2] for t in range(32)], [bo[t][3] for t in range(32)])
    pa_all, da_all = [], []
    for lane in range(32):
        gid, tig = lane >> 2, lane & 3
        bias = [[0.0, 0.0], [0.0, 0.0]]
        dlt = [[0.0, 0.0], [0.0, 0.0]]
        for t in range(2):
            for uu in range(2):
                l2 = meta[8 * t + 2 * tig + uu]
                bias[t][uu] = -l2 * LOG2E if ("lse_inf" in MUT or l2 != -np.inf) else -np.inf
                dlt[t][uu] = meta[16 + 8 * t + 2 * tig + uu]
        S, P = sc[lane], dp[lane]
        if diag:
            dj = (gid & 1) ^ (1 if "diag_dj" in MUT else 0)
            don = (gid >> 1) == tig or "diag_on" in MUT
            s0, s1 = S[0][dj], S[1][2 + dj]
            q0, q1 = P[0][dj], P[1][2 + dj]
            p0 = 2.0 ** (s0 * sl2 + (bias[0][dj] if don else -np.inf))
            p1 = 2.0 ** (s1 * sl2 + (bias[1][dj] if don else -np.inf))
            e0 = p0 * (q0 - dlt[0][dj])
            e1 = p1 * (q1 - dlt[1][dj])
            z = (0.0, 0.0)
            pa = [(0.0, p0) if dj else (p0, 0.0), z, z, (0.0, p1) if dj else (p1, 0.0)]
            da = [(0.0, e0) if dj else (e0, 0.0), z, z, (0.0, e1) if dj else (e1, 0.0)]
        else:
            x0 = (gid - 2 * tig) if "x0_sign" in MUT else (2 * tig - gid)
            xb = bx + x0
            pa, da = [None] * 4, [None] * 4
            for t in range(2):
                for hr in range(2):
                    pv, sv = [0.0, 0.0], [0.0, 0.0]
                    for uu in range(2):
                        x = xb + 8 * (t - hr) + uu
                        allowed = (0 <= x < pl["xlen"]) and ((pl["bits"] >> (x & 31)) & 1)
                        e = 2 * hr + uu
                        with np.errstate(over="ignore"):
                            pr = 2.0 ** (S[t][e] * sl2 + bias[t][uu])
                        pv[uu] = pr if allowed else 0.0
                        sv[uu] = pv[uu] * (P[t][e] - dlt[t][uu])
                    pa[2 * t + hr] = tuple(pv)
                    da[2 * t + hr] = tuple(sv)
        if "a_frag_order" in MUT:
            pa[1], pa[2] = pa[2], pa[1]
        pa_all.append(pa)
        da_all.append(da)
    for f in range(NF):
        for src, acc, frag in ((16 * RS, dv, pa_all), (0, dk, da_all)):
            bt = ldmatrix_x4(rq_all, [src + 16 * f + q_row[l] for l in range(32)],
                             trans="trans_wrong" not in MUT)
            mma([acc[t][2 * f] for t in range(32)], frag, [bt[t][0] for t in range(32)], [bt[t][1] for t in range(32)])
            mma([acc[t][2 * f + 1] for t in range(32)], frag, [bt[t][2] for t in range(32)], [bt[t][3] for t in range(32)])


# ----------------------------------------------------------------------------- reference
def reference(q, k, v, dO, lse, delta, valid, window, dilated, causal, scale, G):
    B, L, Hq, D = q.shape
    Hk = k.shape[2]
    i = np.arange(L)[:, None]
    j = np.arange(L)[None, :]
    d = np.abs(i - j)
    pow2 = (d > 0) & ((d & (d - 1)) == 0)
    vis = (d < window) | (dilated & pow2)
    if causal:
        vis &= j <= i
    dk = np.zeros((B, L, Hk, D))
    dv = np.zeros((B, L, Hk, D))
    for b in range(B):
        m = vis & valid[b][:, None] & valid[b][None, :]
        for h in range(Hq):
            g = h // G
            live = np.isfinite(lse[b, :, h])[:, None] & m
            S = q[b, :, h] @ k[b, :, g].T * scale
            P = np.where(live, np.exp(np.where(live, S - np.where(np.isfinite(lse[b, :, h]), lse[b, :, h], 0)[:, None], 0)), 0)
            dP = dO[b, :, h] @ v[b, :, g].T
            dS = P * (dP - delta[b, :, h][:, None])
            dv[b, :, g] += P.T @ dO[b, :, h]
            dk[b, :, g] += scale * dS.T @ q[b, :, h]
    return dk, dv


# ----------------------------------------------------------------------------- cases
def strided(rng, B, L, H, D, valid, extra_h=8):
    """[B, L, H, D] values in a flat buffer with head stride D + extra_h (NaN gaps), NaN at
    padded positions; returns (dense array, flat buffer, strides)."""
    dense = rng.standard_normal((B, L, H, D))
    sh = D + extra_h
    sl = H * sh
    sb = L * sl
    flat = np.full(B * sb + 64, np.nan)
    for b in range(B):
        for l in range(L):
            for h in range(H):
                if valid[b, l]:
                    o = b * sb + l * sl + h * sh
                    flat[o:o + D] = dense[b, l, h]
    dense = np.where(valid[:, :, None, None], dense, 0.0)
    return dense, flat, (sb, sl, sh)


def padded_inputs(rng, B, L, Hq, Hk, D, pad):
    """valid [B, L] (pad: None, "lengths" or "random") and strided q, dO, k, v (see strided:
    dense array, flat buffer, strides); shared with emulate_bs_dkdv_mma.py."""
    valid = np.ones((B, L), dtype=bool)
    if pad == "lengths":
        for b in range(B):
            valid[b, rng.integers(1, L + 1):] = False
    elif pad == "random":
        valid = rng.random((B, L)) < 0.7
    return (valid, strided(rng, B, L, Hq, D, valid), strided(rng, B, L, Hq, D, valid, extra_h=0),
            strided(rng, B, L, Hk, D, valid, extra_h=16), strided(rng, B, L, Hk, D, valid))


def run_case(B, L, Hq, Hk, D, window, dilated, causal, pad, accumulate, seed, inf_rows=False):
    rng = np.random.default_rng(seed)
    G = Hq // Hk
    scale = 1.0 / math.sqrt(D)
    valid, (q, qf, (qsb, qsl, qsh)), (dO, of, (osb, osl, osh)), (k, kf, (ksb, ksl, ksh)), \
        (v, vf, (vsb, vsl, vsh)) = padded_inputs(rng, B, L, Hq, Hk, D, pad)
    # lse of the masked rows (consistent with the forward), delta arbitrary.
    band, p0, n_pow = sliding_policy(L, window, dilated)
    i = np.arange(L)[:, None]
    j = np.arange(L)[None, :]
    dd = np.abs(i - j)
    vis = (dd < window) | (dilated & (dd > 0) & ((dd & (dd - 1)) == 0))
    if causal:
        vis &= j <= i
    lse = np.full((B, L, Hq), -np.inf)
    for b in range(B):
        m = vis & valid[b][:, None] & valid[b][None, :]
        for h in range(Hq):
            S = q[b, :, h] @ k[b, :, h // G].T * scale
            S = np.where(m, S, -np.inf)
            mx = S.max(1)
            fin = np.isfinite(mx)
            lse[b, fin, h] = mx[fin] + np.log(np.exp(S[fin] - mx[fin, None]).sum(1))
    if inf_rows:  # rows the kernel must skip although their pairs are allowed
        lse[:, 1::5, :] = -np.inf
    delta = rng.standard_normal((B, L, Hq))
    delta = np.where(valid[:, :, None], delta, np.nan)  # padded rows: never read
    lse_flat = np.where(valid[:, :, None], lse, np.nan).reshape(-1)
    gk0 = rng.standard_normal(B * L * Hk * D)
    gv0 = rng.standard_normal(B * L * Hk * D)
    T = Tensors(q=qf, qsb=qsb, qsl=qsl, qsh=qsh, dO=of, osb=osb, osl=osl, osh=osh,
                k=kf, ksb=ksb, ksl=ksl, ksh=ksh, v=vf, vsb_=vsb, vsl=vsl, vsh=vsh,
                lse=lse_flat, delta=delta.reshape(-1), valid=valid.reshape(-1), vsb=L,
                gk=gk0, gv=gv0, gksb=L * Hk * D, gksl=Hk * D, gksh=D,
                gvsb=L * Hk * D, gvsl=Hk * D, gvsh=D)
    pl = make_plan(L, band, p0, n_pow, causal)
    gk, gv = run_kernel(T, pl, B, L, Hq, Hk, D, scale, accumulate)
    rdk, rdv = reference(q, k, v, dO, lse, np.nan_to_num(delta), valid, window, dilated,
                         causal, scale, G)
    gk = gk.reshape(B, L, Hk, D) - (gk0.reshape(B, L, Hk, D) if accumulate else 0)
    gv = gv.reshape(B, L, Hk, D) - (gv0.reshape(B, L, Hk, D) if accumulate else 0)
    if not (np.isfinite(gk).all() and np.isfinite(gv).all()):
        return math.inf, pl
    err = max(np.abs(gk - rdk).max() / max(1.0, np.abs(rdk).max()),
              np.abs(gv - rdv).max() / max(1.0, np.abs(rdv).max()))
    return err, pl


CASES = [
    # B, L, Hq, Hk, D, window, dilated, causal, pad, accumulate, inf_rows
    (1, 70, 4, 1, 16, 8, True, True, None, False, False),     # the default mask (E = 17)
    (1, 70, 4, 1, 16, 8, True, False, "random", True, False),  # non-causal, padding, accumulate
    (2, 45, 2, 2, 32, 3, True, True, "lengths", False, True),  # window 3 dilated, lse = -inf rows
    (1, 40, 1, 1, 16, 1, True, False, None, False, False),     # window 1: every power of two
    (1, 37, 3, 1, 16, 33, False, True, "random", False, False),  # wide band, no bits, G = 3
    (1, 37, 2, 1, 16, 16, True, False, None, True, False),     # band 16 non-causal, dilated
    (1, 9, 2, 2, 16, 2, False, False, "random", False, False),  # L < 16, non-causal
    (1, 50, 1, 1, 64, 5, True, True, "random", False, False),  # D = 64
    (1, 33, 2, 1, 16, 1000, True, True, None, False, False),   # window >= L: full causal
]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="first three cases only")
    ap.add_argument("--mutate", action="store_true", help="check that planted bugs are caught")
    ap.add_argument("--sweep", type=int, default=0, help="also N random shapes and masks")
    args = ap.parse_args()
    cases = CASES[:3] if args.quick else CASES
    worst = 0.0
    for variant in ((), ("no_absorb",), ("tc1",)):
        VARIANT.clear()
        VARIANT.update(variant)
        for n, c in enumerate(cases):
            *shape, inf_rows = c
            err, pl = run_case(*shape, seed=n, inf_rows=inf_rows)
            print(f"{'/'.join(variant) or 'plan'} case {c}: nd={pl['nd']} dlo={pl['dlo']} "
                  f"xlen={pl['xlen']} bits={pl['bits']:#010x} q0={pl['q0']} "
                  f"n_pow={pl['n_pow']}: max rel err {err:.2e}")
            worst = max(worst, err)
    VARIANT.clear()
    rng = np.random.default_rng(1234)
    for n in range(args.sweep):
        Hk = int(rng.choice([1, 2]))
        c = (int(rng.integers(1, 3)), int(rng.integers(1, 81)), Hk * int(rng.choice([1, 2, 3, 4])),
             Hk, int(rng.choice([16, 16, 32])),
             int(rng.choice([1, 2, 3, 5, 8, 12, 16, 33, 1000])), bool(rng.integers(2)),
             bool(rng.integers(2)), [None, "lengths", "random"][int(rng.integers(3))],
             bool(rng.integers(2)), bool(rng.integers(2)))
        *shape, inf_rows = c
        err, pl = run_case(*shape, seed=100 + n, inf_rows=inf_rows)
        print(f"sweep {c}: nd={pl['nd']} q0={pl['q0']} n_pow={pl['n_pow']}: max rel err {err:.2e}")
        worst = max(worst, err)
    ok = worst < 1e-9
    print("ok" if ok else "MISMATCH")
    if args.mutate:
        missed = []
        for name, what in MUTATIONS.items():
            MUT.clear()
            MUT.add(name)
            caught = False
            for variant in ((), ("no_absorb",)):
                VARIANT.clear()
                VARIANT.update(variant)
                for n, c in enumerate(cases):
                    *shape, inf_rows = c
                    try:
                        err, _ = run_case(*shape, seed=n, inf_rows=inf_rows)
                    except (AssertionError, IndexError, ValueError):
                        err = math.inf
                    if not err < 1e-9:
                        caught = True
                        break
                if caught:
                    break
            VARIANT.clear()
            print(f"mutation {name:16s} ({what}): {'caught' if caught else 'NOT CAUGHT'}")
            if not caught:
                missed.append(name)
        MUT.clear()
        ok = ok and not missed
        print("mutations: all caught" if not missed else f"mutations missed: {missed}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
