"""Replays the index math of the block-chunk staged kernels (attn_fwd_kernel_tc_blk /
attn_dq_kernel_tc_blk in csrc/cuda/attn_staged_tc.cuh, with BlockSparsePolicy's hooks from
csrc/cuda/block_sparse_attention.cu) on the CPU, lane by lane, and checks it against a direct
computation (no GPU, no torch needed):

  * TcDiv (multiply-high division) against n // d, and stage_coords_fast against the
    division-based stage_coords (warp -> b, i, g, h0);
  * list_blocks (slot_block per lane, __match_any_sync repeat removal, ballot / popc
    compaction) + the chunk cursor (block, 16-key segment) + issue()'s key mask (key_end,
    validity ballot) against the DESIGN mask of block_sparse_attention: every (query, key)
    pair attends exactly once, nothing else does;
  * without key padding (or with right padding) the chunk sequence and the position of every
    key inside its chunk equal the per-slot kernel's (fwd_key + ballot compaction) at
    KC = 16, so D >= 64 keeps the generic kernel's summation order;
  * the copy geometry of issue(): every (row, K/V, 16-byte piece) of a chunk is written exactly
    once, by the lane whose mask bit (mr & 1 << KPP k) is the row's key bit, reading the row's
    own address when it attends and an address inside [key0, len) when it is zero-filled;
  * the lane's key bits in the chunk body ((mask >> gid) & 1, >> 8) select keys gid, gid + 8;
  * a float64 replay of the forward chunk loop (chunk max, alpha, msub, skipped chunks) against
    a dense softmax of the same scores;
  * the LEAN per-slot copy loop (TcWarp<..., true>::issue, the window's and compressed branch's
    default): rows < cnt read their key's row, rows >= cnt are zero-filled from a valid address.

Query groups (QPW = 8 / HPW, its half, or 1 consecutive queries per warp; column n of the
products is query i0 + n / HPW, head h0 + n % HPW):

  * block_group_size / with_group_size / block_groups_ok: for HPW = 8, 4, 2, 1 and n = 1 .. 31
    the QPW picked (8 / HPW, its half when 8 / HPW >= 4, else 1), the kernel instance launched
    is that QPW, and the n + 1 slots always fit 32 / QPW lanes; blocks >= 2^23 and
    BLOSSOM_OPS_CUDA_QUERY_GROUPS=0 / fwd give 1;
  * TcGrid::make(s, hpw, qpw) + stage_coords_fast, through the epilogues' loops: every
    (b, i, head) gets its output pieces, its lse and its dQ delta exactly once, from a warp of
    its own KV group, rows i0 + q >= L skipped (odd L, L not a multiple of QPW);
  * list_blocks with QPW > 1 (lane q * 32 / QPW + s: slot s of query i0 + q, queries in qbits
    only; repeats across queries by __match_any_sync; ballot / popc compaction): the blocks
    are distinct, in (query, slot) first-appearance order, and each entry's query set (bits
    23+) is exactly the queries whose slots hold the block (= their DESIGN blocks);
  * for_each_chunk (issue-ahead cursor, rows staged up to key_end(i0 + QPW - 1) and the
    validity ballot) + ColumnMasks::bits on every lane (fast branch when key0 + 16 <=
    key_end(i0), where the per-column edge provably cuts nothing; the per-column edge
    otherwise): for every column, each DESIGN (query, key) pair exactly once, nothing else;
    padding columns and queries not in qbits (zero Q rows in load_group_frags) see nothing;
    a query's non-empty chunks equal one query per warp's (the first query's in the same
    order);
  * a float64 replay of the group forward per column (column max, msub, alpha, p) against a
    dense softmax per query: a chunk with no key of the column leaves m, l and o exactly as
    they were (alpha = 1, or the -inf start), and the first query's result equals one query
    per warp's bit for bit;
  * the dQ rowsums with QPW > 1 (lanes 4 r .. 4 r + 3: row r < NR = HPW * QPW, pieces pc,
    pc + 4, ... of D / 8; xor-1, xor-2 butterfly; lane hl reads lane 4 hl), symbolically and
    in float64: each element of each row summed exactly once, every lane ends with its own
    row (hl < NR) or row 0, rows of queries outside rbits are 0.

Edge cases: L not a multiple of 16 (and of the block size), causal / not, -1, repeated,
out-of-range (>= C, < -1) and own-block entries, blocks after i (causal), left / right / random
padding, block sizes 16, 32, 64, n = 1 .. 31, queries near the causal edge; for query groups
also n on both sides of every QPW threshold (1, 3, 4, 7, 8, 15, 16, 31), blocks shared across
the group's queries, padded queries inside a group, the last group of an odd L.

    python3 scripts/emulate_staged_blk.py
"""
import itertools
import os
import random
import re

import numpy as np

KC = 16


# ---- TcDiv / stage_coords ---------------------------------------------------------------
def tcdiv_make(d):
    m, s = 0, 0
    if d > 1:
        l = 0
        while (1 << l) < d:
            l += 1
        m = ((1 << (31 + l)) + d - 1) // d
        assert m < (1 << 32)
        s = l - 1
    return d, m, s


def tcdiv(dv, n):
    d, m, s = dv
    assert 0 <= n < (1 << 31)
    return n if m == 0 else ((n * m) >> 32) >> s


def check_tcdiv(rng):
    ds = set(range(1, 300)) | {(1 << k) + e for k in range(1, 31) for e in (-1, 0, 1)}
    ds |= {rng.randrange(1, 1 << 31) for _ in range(300)} | {(1 << 31) - 1}
    ds = sorted(d for d in ds if 1 <= d < (1 << 31))
    count = 0
    for d in ds:
        dv = tcdiv_make(d)
        ns = {0, 1, d - 1, d, d + 1, 2 * d - 1, 2 * d, (1 << 31) - 1, (1 << 31) - d}
        ns |= {q * d + r for q in ((1 << 31) // d - 1, (1 << 31) // d) for r in (0, d - 1)}
        ns |= {rng.randrange(0, 1 << 31) for _ in range(50)}
        for n in ns:
            if 0 <= n < (1 << 31):
                assert tcdiv(dv, n) == n // d, (n, d)
                count += 1
    return count


def stage_coords(B, Hq, Hk, L, HPW, warp):
    G = Hq // Hk
    chunks = G // HPW
    hcs = Hk * chunks
    if warp >= B * hcs * L:
        return None
    rest = warp // L
    hc = rest % hcs
    g = hc // chunks
    return rest // hcs, warp - rest * L, g, g * G + (hc - g * chunks) * HPW


def stage_coords_fast(B, Hq, Hk, L, HPW, warp):
    G = Hq // Hk
    chunks = G // HPW
    by_len, by_hcs, by_chunks = tcdiv_make(L), tcdiv_make(Hk * chunks), tcdiv_make(chunks)
    warps = B * Hk * chunks * L
    if warp >= warps:
        return None
    rest = tcdiv(by_len, warp)
    bb = tcdiv(by_hcs, rest)
    hc = rest - bb * by_hcs[0]
    gg = tcdiv(by_chunks, hc)
    return bb, warp - rest * by_len[0], gg, gg * G + (hc - gg * by_chunks[0]) * HPW


def check_coords(rng):
    count = 0
    for B, Hq, Hk, L in [(1, 1, 1, 1), (3, 8, 2, 17), (2, 16, 2, 4096), (5, 12, 3, 97),
                         (1, 8, 8, 1000), (64, 8, 2, 4096), (2, 32, 1, 33)]:
        G = Hq // Hk
        for HPW in (8, 4, 2, 1):
            if G % HPW:
                continue
            total = B * Hk * (G // HPW) * L
            warps = set(range(min(total + 3, 3000))) | {total - 1, total, total + 1}
            warps |= {rng.randrange(0, total + 2) for _ in range(2000)}
            for w in warps:
                assert stage_coords(B, Hq, Hk, L, HPW, w) == stage_coords_fast(B, Hq, Hk, L, HPW, w)
                count += 1
    return count


# ---- the mask and the two enumerations ----------------------------------------------------
def direct_keys(row, i, L, bs, causal, valid):
    """DESIGN: keys j with valid(i), valid(j), (not causal or j <= i), block(j) == own or in row."""
    C = -(-L // bs)
    if not valid[i]:
        return set()
    blocks = {i // bs} | {c for c in row if 0 <= c < C}
    return {j for j in range(L) if valid[j] and (not causal or j <= i) and j // bs in blocks}


def selected_block(row, s, own, i, C, bs, causal):
    c = row[s]
    if c < 0 or c >= C or c == own or (causal and c * bs > i):
        return -1
    if any(row[k] == c for k in range(s)):
        return -1
    return c


def fwd_key(row, n, i, L, bs, causal, valid):
    """BlockSparsePolicy::fwd_key (the per-slot kernel's enumeration)."""
    C = -(-L // bs)
    slot, own = n // bs, i // bs
    c = own if slot == 0 else selected_block(row, slot - 1, own, i, C, bs, causal)
    if c < 0:
        return -1
    j = c * bs + (n - slot * bs)
    if j >= L or (causal and j > i) or not valid[j]:
        return -1
    return j


def generic_chunks(row, i, L, bs, causal, valid):
    """attn_fwd_kernel_tc at KC = 16: per chunk, the compacted keys (position = list index)."""
    n_slots = (1 + len(row)) * bs
    out = []
    for n0 in range(0, n_slots, KC):
        keys = [fwd_key(row, n, i, L, bs, causal, valid) for n in range(n0, min(n0 + KC, n_slots))]
        keys = [j for j in keys if j >= 0]  # ballot + popc: order kept
        if keys:
            out.append({p: j for p, j in enumerate(keys)})
    return out


def slot_block(row, s, i, L, bs, causal):
    """BlockSparsePolicy::slot_block (no repeat test)."""
    C = -(-L // bs)
    own = i >> (bs.bit_length() - 1)
    if s == 0:
        return own
    c = row[s - 1]
    return -1 if (c < 0 or c >= C or c == own or (causal and c * bs > i)) else c


FULL = (1 << 32) - 1


def match_any(values, mask, participants):
    """__match_any_sync(mask, value) as the hardware needs it: every lane named in mask
    executes it (else undefined: on the H100 the warp deadlocked). Returns each participant's
    mask of lanes with the same value."""
    part = sum(1 << lane for lane in participants)
    if part != mask:
        raise AssertionError(f"__match_any_sync({mask:#x}) reached by lanes {part:#x} only: "
                             "the missing lanes never arrive (warp deadlock)")
    return {lane: sum(1 << l2 for l2 in participants if values[l2] == values[lane])
            for lane in participants}


def list_blocks(row, i, L, bs, causal, short_circuit=False):
    """TcBlkWarp::list_blocks, lane by lane. short_circuit=True replays the code as it was
    before 2026-11-27 (`keep = c >= 0 && (__match_any_sync(...) & lt) == 0`): C++ evaluates
    the match only on the lanes with c >= 0, which match_any rejects."""
    ns = len(row) + 1
    assert ns <= 32
    c = [slot_block(row, lane, i, L, bs, causal) if lane < ns else -1 for lane in range(32)]
    callers = [lane for lane in range(32) if c[lane] >= 0] if short_circuit else range(32)
    peers = match_any(c, FULL, callers)
    keep = [c[lane] >= 0 and (peers[lane] & ((1 << lane) - 1)) == 0 for lane in range(32)]
    km = sum(1 << lane for lane in range(32) if keep[lane])
    blist = [None] * 32
    for lane in range(32):
        if keep[lane]:
            blist[bin(km & ((1 << lane) - 1)).count("1")] = c[lane]
    n = bin(km).count("1")
    assert all(x is not None for x in blist[:n])
    return blist[:n]


def key_end(i, L, causal):
    return min(i + 1, L) if causal else L


def issue_mask(key0, kend, valid, all_valid):
    nk = kend - key0
    mask = 0xFFFF if nk >= KC else ((1 << nk) - 1 if nk > 0 else 0)
    if not all_valid:
        ball = 0
        for lane in range(32):
            if lane < nk and lane < KC and valid[key0 + lane]:
                ball |= 1 << lane
        mask &= ball
    return mask


def block_chunks(row, i, L, bs, causal, valid, all_valid):
    """for_each_chunk: (key0, mask) per chunk, in issue order."""
    blist = list_blocks(row, i, L, bs, causal)
    spb = bs >> 4
    out, nxt, seg = [], 0, 0
    for _ in range(len(blist) * spb):
        key0 = blist[nxt] * bs + seg * KC
        seg += 1
        if seg == spb:
            seg, nxt = 0, nxt + 1
        out.append((key0, issue_mask(key0, key_end(i, L, causal), valid, all_valid)))
    return out


# ---- copy geometry ------------------------------------------------------------------------
def check_copies(D, key0, mask, L):
    """issue(): every (row, K|V, piece) written once, right address, right zero-fill bit."""
    CPR = D // 8
    PPK = 2 * CPR
    KPP = 32 // PPK
    RPL = KC // KPP
    seen = {}
    nl = L - key0
    assert nl >= 1
    for lane in range(32):
        w, r0 = lane % PPK, lane // PPK
        is_v = w >= CPR
        c = w - CPR if is_v else w
        mr = mask >> r0
        last = nl - 1 - r0
        for k in range(RPL):
            row = r0 + KPP * k
            src_row = row if nl >= KC else r0 + min(KPP * k, last)
            full = (mr & (1 << (KPP * k))) != 0
            assert full == bool(mask >> row & 1)
            assert key0 <= key0 + src_row < L  # address inside the tensor
            if full:
                assert src_row == row
            key = (row, is_v, c)
            assert key not in seen
            seen[key] = full
    assert len(seen) == KC * 2 * CPR


def check_lean_copies(D, KC_, cnt, ki):
    """TcWarp<LEAN>::issue: rows < cnt copy key ki[r], rows >= cnt are zero-filled and read the
    address of ki[cnt - 1] (a valid key); every (row, K|V, piece) once."""
    CPR = D // 8
    PPK = 2 * CPR
    KPP = 32 // PPK
    seen = {}
    for lane in range(32):
        w, r0 = lane % PPK, lane // PPK
        is_v = w >= CPR
        c = w - CPR if is_v else w
        for k in range(KC_ // KPP):
            r = r0 + KPP * k
            j = ki[r if r < cnt else cnt - 1]
            full = r < cnt
            assert j == (ki[r] if full else ki[cnt - 1])
            key = (r, is_v, c)
            assert key not in seen
            seen[key] = (full, j)
    assert len(seen) == KC_ * 2 * CPR
    return sum(1 for f, _ in seen.values() if f) == cnt * 2 * CPR


def check_lean(rng):
    n = 0
    for D in (16, 32, 64, 128):
        KC_ = 32 if D <= 32 else 16
        for cnt in range(1, KC_ + 1):
            ki = [rng.randrange(0, 1 << 20) for _ in range(cnt)] + [None] * (KC_ - cnt)
            assert check_lean_copies(D, KC_, cnt, ki)
            n += 1
    return n


# ---- chunk body: lane keys, and the online softmax in float64 -------------------------------
def check_lane_bits(mask):
    for lane in range(32):
        gid = lane >> 2
        mk = mask >> gid
        for e in range(4):
            key = gid + (e >> 1) * 8
            assert bool((mk >> ((e >> 1) * 8)) & 1) == bool(mask >> key & 1)


def softmax_replay(chunks, scores):
    """Forward chunk loop for one head: chunk max, alpha, msub; body skipped for mask 0."""
    m, l, o = -np.inf, 0.0, 0.0
    for key0, mask in chunks:
        if mask == 0:
            continue
        x = [scores[key0 + r] if mask >> r & 1 else -np.inf for r in range(KC)]
        mn = max(m, max(x))
        msub = 0.0 if mn == -np.inf else mn
        alpha = np.exp2(m - msub)
        m = mn
        p = [np.exp2(v - msub) for v in x]
        l = l * alpha + sum(p)
        o = o * alpha + sum(pi * (key0 + r) for r, pi in enumerate(p))  # v_j = j
    return (o / l if l > 0 else 0.0), ((m + np.log2(l)) if l > 0 else -np.inf)


def check_dense_softmax(o, lse, keys, scores):
    """(o, lse) of a replayed chunk loop == the dense base-2 softmax over `keys` (v_j = j);
    no key: o = 0, lse = -inf."""
    if keys:
        ks = np.array(sorted(keys))
        e = np.exp2(scores[ks] - scores[ks].max())
        o_ref = float((e * ks).sum() / e.sum())
        lse_ref = float(np.log2(e.sum()) + scores[ks].max())
        assert abs(o - o_ref) <= 1e-9 * max(1.0, abs(o_ref)) and abs(lse - lse_ref) <= 1e-9
    else:
        assert o == 0.0 and lse == -np.inf


def padding_validity(rng, L, pad):
    """valid[j] for a padding kind: none, right (lengths), left, or random (70% valid)."""
    if pad == "right":
        end = rng.randrange(1, L + 1)
        return [j < end for j in range(L)]
    if pad == "left":
        start = rng.randrange(0, L)
        return [j >= start for j in range(L)]
    if pad == "random":
        return [rng.random() < 0.7 for _ in range(L)]
    return [True] * L


def run_case(rng, L, bs, n, causal, pad, n_queries):
    C = -(-L // bs)
    valid = padding_validity(rng, L, pad)
    all_valid = pad == "none"
    qs = set(rng.sample(range(L), min(n_queries, L))) | {0, L - 1, min(bs - 1, L - 1)}
    qs |= {i for i in (bs, bs + 1, L - 2) if 0 <= i < L}
    checked = 0
    scores = np.array([rng.uniform(-8, 8) for _ in range(L)])
    for i in sorted(qs):
        own = i // bs
        pool = [-1, -2, own, C, C + 5, *range(C)]
        row = [rng.choice(pool) for _ in range(n)]
        if n >= 2 and rng.random() < 0.5:
            row[-1] = row[0]  # a repeat
        want = direct_keys(row, i, L, bs, causal, valid)
        if not valid[i]:
            continue  # the kernels skip padded queries before any enumeration
        got, chunks = [], block_chunks(row, i, L, bs, causal, valid, all_valid)
        for key0, mask in chunks:
            check_lane_bits(mask)
            if mask:
                check_copies(64, key0, mask, L)
                check_copies(16, key0, mask, L)
                check_copies(32, key0, mask, L)
                check_copies(128, key0, mask, L)
            got += [key0 + r for r in range(KC) if mask >> r & 1]
        assert len(got) == len(set(got)), "a key attends twice"
        assert set(got) == want, (i, row, sorted(set(got) ^ want))
        # Same chunks and positions as the per-slot kernel when every chunk's keys are a
        # prefix of it (no padding, right padding).
        if bs == KC and pad in ("none", "right"):
            gen = generic_chunks(row, i, L, bs, causal, valid)
            blk = [{r: key0 + r for r in range(KC) if mask >> r & 1} for key0, mask in chunks]
            blk = [c for c in blk if c]
            assert gen == blk, (i, row, gen, blk)
        # Online softmax over the chunks == dense softmax over the same keys.
        o, lse = softmax_replay(chunks, scores)
        check_dense_softmax(o, lse, want, scores)
        checked += 1
    return checked


# ---- query groups (QPW > 1) ----------------------------------------------------------------
# TcBlkWarp<QPW> / ColumnMasks / load_group_frags / the blk kernels' epilogues and dQ rowsums,
# block_group_size / with_group_size / TcGrid::make(s, hpw, qpw) of the launchers, and
# BlockSparsePolicy::block_groups_ok. Column n of a group warp: query i0 + n / HPW, head
# h0 + n % HPW.
Q_SHIFT = 23      # TcBlkWarp::kQShift
STAGE_WARPS = 2   # kStageWarps
N_GROUP = (1, 3, 4, 7, 8, 15, 16, 31)  # n on both sides of every QPW threshold


def hpw_of(G):
    """dispatch_stage_config's heads per warp."""
    return 8 if G % 8 == 0 else (4 if G % 4 == 0 else (2 if G % 2 == 0 else 1))


def block_groups_ok(n, C, qpw):
    """BlockSparsePolicy::block_groups_ok (slots = n + 1)."""
    return n + 1 <= 32 // qpw and C < (1 << Q_SHIFT)


def block_group_size(hpw, n, C, env="", dq=False):
    """block_group_size<HPW>(pol, dq); env: BLOSSOM_OPS_CUDA_QUERY_GROUPS."""
    q = 8 // hpw
    if q == 1 or env == "0" or (dq and env == "fwd"):
        return 1
    if block_groups_ok(n, C, q):
        return q
    if q >= 4 and block_groups_ok(n, C, q // 2):
        return q // 2
    return 1


def with_group_size(hpw, qpw):
    """The QPW of the kernel instance with_group_size<HPW>(qpw, ...) launches."""
    q = 8 // hpw
    if q > 1 and qpw == q:
        return q
    if q >= 4 and qpw == q // 2:
        return q // 2
    return 1


def check_group_size():
    """Returns {hpw: [(qpw, n_lo, n_hi), ...]}: the QPW picked for each range of n."""
    for G in range(1, 129):
        hpw = hpw_of(G)
        assert hpw == max(h for h in (1, 2, 4, 8) if G % h == 0), G
    table = {}
    for hpw in (8, 4, 2, 1):
        runs, prev = [], None
        for n in range(1, 32):
            qpw = block_group_size(hpw, n, 100)
            assert qpw in (1, 2, 4, 8) and hpw * qpw <= 8, (hpw, n, qpw)
            assert n + 1 <= 32 // qpw, (hpw, n, qpw)  # every slot of a query has its lane
            assert with_group_size(hpw, qpw) == qpw, (hpw, n, qpw)
            assert prev is None or qpw <= prev  # more slots never give more queries
            # The first of 8 / HPW, its half (tried only when 8 / HPW >= 4) and 1 whose 32 / QPW
            # lanes hold the slots.
            cands = [8 // hpw] + ([8 // hpw // 2] if 8 // hpw >= 4 else []) + [1]
            assert qpw == next(c for c in cands if n + 1 <= 32 // c), (hpw, n, qpw)
            # Block indices must fit the entry's 23 bits.
            assert block_group_size(hpw, n, (1 << Q_SHIFT) - 1) == qpw
            assert block_group_size(hpw, n, 1 << Q_SHIFT) == 1
            # BLOSSOM_OPS_CUDA_QUERY_GROUPS=0: one query per warp; =fwd: only in dQ.
            assert block_group_size(hpw, n, 100, "0") == 1
            assert block_group_size(hpw, n, 100, "0", True) == 1
            assert block_group_size(hpw, n, 100, "fwd") == qpw
            assert block_group_size(hpw, n, 100, "fwd", True) == 1
            if runs and runs[-1][0] == qpw:
                runs[-1][2] = n
            else:
                runs.append([qpw, n, n])
            prev = qpw
        table[hpw] = runs
    return table


def grid_make(B, Hq, Hk, L, hpw, qpw):
    """TcGrid::make(s, hpw, qpw)."""
    chunks = (Hq // Hk) // hpw
    groups = (L + qpw - 1) // qpw
    assert B * Hk * chunks * groups < (1 << 31)
    return dict(by_len=tcdiv_make(groups), by_hcs=tcdiv_make(Hk * chunks),
                by_chunks=tcdiv_make(chunks), group=Hq // Hk, warps=B * Hk * chunks * groups)


def coords_grid(gr, hpw, warp):
    """stage_coords_fast<HPW>(grid, ...): warp -> (b, group index, g, h0), None past the end."""
    if warp >= gr["warps"]:
        return None
    by_len, by_hcs, by_chunks = gr["by_len"], gr["by_hcs"], gr["by_chunks"]
    rest = tcdiv(by_len, warp)
    bb = tcdiv(by_hcs, rest)
    hc = rest - bb * by_hcs[0]
    gg = tcdiv(by_chunks, hc)
    return bb, warp - rest * by_len[0], gg, gg * gr["group"] + (hc - gg * by_chunks[0]) * hpw


def check_group_coords(rng):
    """Every (b, i, head) gets its output pieces, its lse and its delta exactly once, from a
    warp of its own KV group, through the epilogues' loops (rows of i0 + q >= L skipped)."""
    CPR = 2  # D = 16: pieces per row in the output loop
    warps_seen = 0
    for B, Hq, Hk, L in [(1, 1, 1, 1), (3, 8, 2, 17), (2, 4, 1, 33), (5, 12, 3, 97), (2, 32, 1, 33),
                         (1, 2, 2, 9), (2, 6, 3, 11), (1, 8, 8, 203), (1, 8, 2, 1023),
                         (2, 16, 2, 7), (3, 4, 4, 5)]:
        G = Hq // Hk
        for hpw in (8, 4, 2, 1):
            if G % hpw:
                continue
            for qpw in (1, 2, 4, 8):
                if hpw * qpw > 8:
                    continue
                NR = hpw * qpw
                gr = grid_make(B, Hq, Hk, L, hpw, qpw)
                gw = B * Hk * (G // hpw) * ((L + qpw - 1) // qpw)  # the launcher's count
                assert gw == gr["warps"]
                out = np.zeros((B, L, Hq), dtype=np.int64)
                lse = np.zeros((B, L, Hq), dtype=np.int64)
                dlt = np.zeros((B, L, Hq), dtype=np.int64)
                n_blocks = -(-gw // STAGE_WARPS)  # stage_grid
                for warp in range(n_blocks * STAGE_WARPS):
                    co = coords_grid(gr, hpw, warp)
                    if co is None:
                        assert warp >= gw
                        continue
                    b, grp, g, h0 = co
                    assert 0 <= b < B and 0 <= grp < -(-L // qpw) and 0 <= g < Hk
                    assert g * G <= h0 and h0 + hpw <= (g + 1) * G and (h0 - g * G) % hpw == 0
                    if qpw == 1:
                        assert co == stage_coords_fast(B, Hq, Hk, L, hpw, warp)
                    i0 = grp * qpw
                    for lane in range(32):
                        for t in range(lane, NR * CPR, 32):  # output rows
                            n = t // CPR
                            q = n // hpw
                            if qpw > 1 and i0 + q >= L:
                                continue
                            assert i0 + q < L  # a store inside the tensor
                            out[b, i0 + q, h0 + n % hpw] += 1
                        gid, tig = lane >> 2, lane & 3
                        if gid == 0:  # lse
                            for j in range(2):
                                n = 2 * tig + j
                                q = n // hpw
                                if n < NR and (qpw == 1 or i0 + q < L):
                                    lse[b, i0 + q, h0 + n % hpw] += 1
                        hl = lane if lane < NR else 0  # dQ: delta of lane n < NR's row
                        ql = hl // hpw
                        if lane < NR and i0 + ql < L:
                            dlt[b, i0 + ql, h0 + hl % hpw] += 1
                    warps_seen += 1
                assert (out == CPR).all() and (lse == 1).all() and (dlt == 1).all(), \
                    (B, Hq, Hk, L, hpw, qpw)
    return warps_seen


def group_query_bits(i0, qpw, L, valid):
    return sum(1 << q for q in range(qpw) if i0 + q < L and valid[i0 + q])


def list_blocks_group(rows, i0, qbits, qpw, L, bs, causal):
    """TcBlkWarp<QPW>::list_blocks, lane by lane; rows[q]: the block_idx row of query i0 + q.
    Returns the entries (block | query set << 23 when QPW > 1)."""
    spq = 32 // qpw
    ns = len(rows[0]) + 1
    c = []
    for lane in range(32):
        q, sl = (0, lane) if qpw == 1 else (lane // spq, lane % spq)
        act = sl < ns and (qbits >> q) & 1
        c.append(slot_block(rows[q], sl, i0 + q, L, bs, causal) if act else -1)
    same = match_any(c, FULL, range(32))  # every lane executes it
    keep = [c[ln] >= 0 and (same[ln] & ((1 << ln) - 1)) == 0 for ln in range(32)]
    km = sum(1 << ln for ln in range(32) if keep[ln])
    blist = [None] * 32
    for lane in range(32):
        if keep[lane]:
            qm = 1
            if qpw > 1:
                qm = 0
                for qq in range(qpw):
                    if (same[lane] >> (qq * spq)) & ((1 << spq) - 1):
                        qm |= 1 << qq
            blist[bin(km & ((1 << lane) - 1)).count("1")] = c[lane] if qpw == 1 else (
                c[lane] | qm << Q_SHIFT)
    n = bin(km).count("1")
    assert all(x is not None for x in blist[:n]) and all(x is None for x in blist[n:])
    return blist[:n]


def frag_on(n, hpw, qpw, qbits):
    """load_group_frags: whether row n (= column n) of the Q / dO fragments is loaded (else 0)."""
    return n < hpw * qpw and bool(qbits >> (n // hpw) & 1)


def decode_entry(e, qpw):
    return (e, 1) if qpw == 1 else (e & ((1 << Q_SHIFT) - 1), e >> Q_SHIFT)


def group_chunks(blist, i0, qpw, L, bs, causal, valid, all_valid):
    """TcBlkWarp::for_each_chunk, with its issue-ahead cursor: (key0, staged mask, qm) of the
    chunks whose body runs (mask != 0), in order; and the number of chunks issued."""
    kend0 = key_end(i0 + qpw - 1, L, causal)  # the group's last query
    spb = bs >> 4
    n_chunks = len(blist) * spb
    cur = dict(next=0, seg=0, key0_next=0, qm_next=1)

    def issue_next():
        blk, cur["qm_next"] = decode_entry(blist[cur["next"]], qpw)
        cur["key0_next"] = blk * bs + cur["seg"] * KC
        cur["seg"] += 1
        if cur["seg"] == spb:
            cur["seg"] = 0
            cur["next"] += 1
        return issue_mask(cur["key0_next"], kend0, valid, all_valid)

    out = []
    mask = issue_next() if n_chunks > 0 else 0
    key0, qm = cur["key0_next"], cur["qm_next"]
    for ch in range(n_chunks):
        mask_next = issue_next() if ch + 1 < n_chunks else 0
        if mask:
            out.append((key0, mask, qm))
        mask, key0, qm = mask_next, cur["key0_next"], cur["qm_next"]
    return out, n_chunks


# (column n, key r) -> (lane, j, half): each pair owned by exactly one lane's accumulator.
def check_column_ownership():
    owner = {}
    for lane in range(32):
        gid, tig = lane >> 2, lane & 3
        for e in range(4):
            key = (2 * tig + (e & 1), gid + (e >> 1) * 8)
            assert key not in owner
            owner[key] = (lane, e)
    assert len(owner) == 8 * KC


def column_masks(mask, key0, qm, i0, qpw, hpw, L, causal):
    """ColumnMasks<HPW, QPW>::bits on every lane; returns the 16-bit chunk mask of each column
    n (bit r: key key0 + r, from bit 0 / 8 of the lane's mk[j]) and whether the fast
    (warp-uniform) branch ran."""
    kend_first = key_end(i0, L, causal)
    fast = key0 + 16 <= kend_first
    col = [0] * 8
    for lane in range(32):
        gid, tig = lane >> 2, lane & 3
        m = mask >> gid
        for j in range(2):
            n = 2 * tig + j
            if qpw == 1:
                mk = m
            else:
                q = n // hpw  # ColumnMasks::init
                qbit, kend = 1 << q, key_end(i0 + q, L, causal)
                kg = key0 + gid
                edge = (m & ((1 if kg < kend else 0) | (0x100 if kg + 8 < kend else 0))
                        if qm & qbit else 0)
                if fast:
                    mk = m if qm & qbit else 0
                    assert (mk ^ edge) & 0x101 == 0  # its test implies the edge cuts nothing
                else:
                    mk = edge
            col[n] |= (mk & 1) << gid | ((mk >> 8) & 1) << (gid + 8)
    return col, fast


def group_softmax(chunks, cols, scores):
    """Forward chunk loop for one column (float64): per chunk the column's max, msub, alpha
    and p. A chunk with no key of the column must leave m, l and o exactly as they were."""
    m, lsum, o = -np.inf, 0.0, 0.0
    for (key0, _, _), cm in zip(chunks, cols):
        x = [scores[key0 + r] if cm >> r & 1 else -np.inf for r in range(KC)]
        mn = max(m, max(x))
        msub = 0.0 if mn == -np.inf else mn
        alpha = np.exp2(m - msub)
        before = (m, lsum, o)
        m = mn
        p = [np.exp2(v - msub) for v in x]
        lsum = lsum * alpha + sum(p)
        o = o * alpha + sum(pi * (key0 + r) for r, pi in enumerate(p))
        if cm == 0:
            assert alpha == 1.0 or (before[0] == -np.inf and before[1] == 0.0)
            assert (m, lsum, o) == before or (m == -np.inf and lsum == 0.0 and o == 0.0)
    return (o / lsum if lsum > 0 else 0.0), ((m + np.log2(lsum)) if lsum > 0 else -np.inf)


def group_rows(rng, i0, qpw, L, bs, n):
    """block_idx rows of the group's queries: random entries (-1, < -1, own block, >= C, any
    block) with repeats, and often a neighbour's row reshuffled (blocks shared across
    queries: multi-query sets)."""
    C = -(-L // bs)
    rows = []
    for q in range(qpw):
        own = min(i0 + q, L - 1) // bs
        pool = [-1, -2, own, C, C + 5, *range(max(0, own - 3), min(C, own + 4)),
                *rng.sample(range(C), min(C, 6))]
        row = [rng.choice(pool) for _ in range(n)]
        if rows and rng.random() < 0.5:
            row = rows[-1][:]
            rng.shuffle(row)
            row[rng.randrange(n)] = rng.choice(pool)
        if n >= 2 and rng.random() < 0.5:
            row[-1] = row[0]  # a repeat
        rows.append(row)
    return rows


def run_group_case(rng, L, bs, n, causal, pad, hpw, n_groups, stats):
    C = -(-L // bs)
    qpw = block_group_size(hpw, n, C)
    stats["qpw"].add((hpw, qpw))
    valid = padding_validity(rng, L, pad)
    all_valid = pad == "none"
    n_grp = -(-L // qpw)
    grps = {0, n_grp - 1, (bs - 1) // qpw, bs // qpw, (L - 2) // qpw}
    grps |= set(rng.sample(range(n_grp), min(n_groups, n_grp)))
    for grp in sorted(x for x in grps if 0 <= x < n_grp):
        i0 = grp * qpw
        rows = group_rows(rng, i0, qpw, L, bs, n)
        qbits = group_query_bits(i0, qpw, L, valid)
        wants = [direct_keys(rows[q], i0 + q, L, bs, causal, valid) if i0 + q < L else set()
                 for q in range(qpw)]
        if qbits == 0:  # the kernels write zeros / -inf and list nothing
            assert not any(wants)
            continue
        if qbits != (1 << min(qpw, L - i0)) - 1:
            stats["partial"] += 1
        # (3) the block list.
        blist = list_blocks_group(rows, i0, qbits, qpw, L, bs, causal)
        assert all(0 <= e < (1 << 31) for e in blist)  # a non-negative int: >> 23 gives qm
        blocks = [decode_entry(e, qpw)[0] for e in blist]
        assert len(blocks) == len(set(blocks)), "a block listed twice"
        order, sets = [], {}
        for q in range(qpw):
            if not qbits >> q & 1:
                continue
            i = i0 + q
            design = {i // bs} | {c for c in rows[q] if 0 <= c < C and (not causal or c * bs <= i)}
            for s in range(n + 1):
                c = slot_block(rows[q], s, i, L, bs, causal)
                if c >= 0:
                    assert c in design
                    if c not in order:
                        order.append(c)
                    sets.setdefault(c, 0)
                    sets[c] |= 1 << q
            assert design == {c for c in sets if sets[c] >> q & 1}
        assert blocks == order, (blocks, order)
        for e in blist:
            blk, qm = decode_entry(e, qpw)
            assert qm == (sets[blk] if qpw > 1 else 1), (blk, qm, sets[blk])
        stats["multi"] += sum(1 for e in blist if bin(decode_entry(e, qpw)[1]).count("1") > 1)
        # (4) the chunk loop and the column masks.
        chunks, issued = group_chunks(blist, i0, qpw, L, bs, causal, valid, all_valid)
        stats["chunks"] += issued
        cols = []
        for key0, mask, qm in chunks:
            check_copies(64, key0, mask, L)
            col, fast = column_masks(mask, key0, qm, i0, qpw, hpw, L, causal)
            stats["fast" if fast else "edge"] += 1
            if not fast and qpw > 1 and any(col[nn] != (mask if qm >> (nn // hpw) & 1 else 0)
                                            for nn in range(hpw * qpw)):
                stats["edge_cut"] += 1
            cols.append(col)
        for nn in range(8):
            got = [key0 + r for (key0, _, _), col in zip(chunks, cols) for r in range(KC)
                   if col[nn] >> r & 1]
            assert len(got) == len(set(got)), "a key attends twice"
            # A key of a column with zero Q would score 0, not -inf (QPW = 1: unstored padding).
            assert not got or frag_on(nn, hpw, qpw, qbits) or (qpw == 1 and nn >= hpw)
            q = nn // hpw
            if nn >= hpw * qpw:
                assert qpw == 1 or not got  # QPW = 1: padding columns copy column 0, unstored
                continue
            assert set(got) == wants[q], (i0, q, rows[q], sorted(set(got) ^ wants[q]))
        # (5) per query (its first head's column): float64 online softmax, and the chunk
        # sequence of one query per warp: the first query's equal in order and bits, the
        # others' equal as a set.
        for q in range(qpw):
            if not qbits >> q & 1:
                continue
            i, nn = i0 + q, q * hpw
            single = [(k0, mk) for k0, mk in block_chunks(rows[q], i, L, bs, causal, valid,
                                                          all_valid) if mk]
            mine = [(key0, col[nn]) for (key0, _, _), col in zip(chunks, cols) if col[nn]]
            if q == 0:
                assert mine == single, (i, mine, single)
            else:
                assert sorted(mine) == sorted(single), (i, mine, single)
            scores = np.array([rng.uniform(-8, 8) for _ in range(L)])
            o, lse = group_softmax(chunks, [col[nn] for col in cols], scores)
            stats["zero"] += sum(1 for col in cols if col[nn] == 0)
            check_dense_softmax(o, lse, wants[q], scores)
            if q == 0:  # same operations in the same order as one query per warp
                assert (o, lse) == softmax_replay(single, scores)
            stats["queries"] += 1
        stats["groups"] += 1


def check_group_rowsums(rng):
    """dQ rowsums with QPW > 1: lanes 4 r .. 4 r + 3 take row r < NR (pieces pc, pc + 4, ...
    of D / 8), xor-1 and xor-2 butterfly, lane hl reads lane 4 hl. Symbolic (which (row,
    element) products each lane's sum holds) and in float64."""
    layouts = 0
    for D in (16, 32, 64, 128):
        for hpw in (4, 2, 1):
            for qpw in (2, 4, 8):
                if hpw * qpw > 8:
                    continue
                NR = hpw * qpw
                dO = rng_arr(rng, (NR, D))
                out = rng_arr(rng, (NR, D))
                for rbits in range(1, 1 << qpw):
                    terms, xs = [], []
                    for lane in range(32):
                        r, pc = lane >> 2, lane & 3
                        t, x = {}, 0.0
                        if r < NR and rbits >> (r // hpw) & 1:
                            for c in range(pc, D // 8, 4):
                                for e in range(8):
                                    t[(r, c * 8 + e)] = t.get((r, c * 8 + e), 0) + 1
                                    x = dO[r, c * 8 + e] * out[r, c * 8 + e] + x
                        terms.append(t)
                        xs.append(x)
                    for o2 in (1, 2):
                        terms = [merge(terms[ln], terms[ln ^ o2]) for ln in range(32)]
                        xs = [xs[ln] + xs[ln ^ o2] for ln in range(32)]
                    for lane in range(32):
                        hl = lane if lane < NR else 0
                        got, xl = terms[4 * hl], xs[4 * hl]
                        want = ({(hl, d): 1 for d in range(D)}
                                if rbits >> (hl // hpw) & 1 else {})
                        assert got == want, (D, hpw, qpw, rbits, lane)
                        ref = float(np.dot(dO[hl], out[hl])) if want else 0.0
                        tol = 1e-12 * max(1.0, float(np.abs(dO[hl] * out[hl]).sum()))
                        assert abs(xl - ref) <= tol
                    layouts += 1
    return layouts


def rng_arr(rng, shape):
    return np.array([rng.uniform(-2, 2) for _ in range(int(np.prod(shape)))]).reshape(shape)


def merge(a, b):
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0) + v
    return out


def check_groups(rng, small=False):
    stats = dict(qpw=set(), multi=0, chunks=0, fast=0, edge=0, edge_cut=0, groups=0,
                 queries=0, cases=0, partial=0, zero=0)
    check_column_ownership()
    Ls = (1, 15, 17, 97, 200, 4095) if not small else (17, 97, 200)
    for k, (L, bs, causal, pad) in enumerate(itertools.product(
            Ls, (16, 32, 64), (True, False), ("none", "right", "left", "random"))):
        for hpw in (8, 4, 2, 1):
            for n in (N_GROUP[(2 * k + hpw) % 8], N_GROUP[(2 * k + hpw + 3) % 8]):
                run_group_case(rng, L, bs, n, causal, pad, hpw, 2, stats)
                stats["cases"] += 1
    return stats


# ---- warp collectives in short-circuit operands ------------------------------------------
# A full-mask collective (__match_any_sync, __ballot_sync, __shfl*_sync, __syncwarp, ...) that
# is an operand of &&, || or ?: after the operator runs only on the lanes where the left side
# lets it: the 2026-11-27 H100 hang (list_blocks). The replay above cannot see C++ evaluation
# order, so the sources are linted: for each collective call, the operators of the statement
# that enclose it (groups still open at the call) must contain no &&, || or ?.
COLLECTIVE = re.compile(r"\b(__(?:match_any|match_all|ballot|any|all|uni|shfl|shfl_up|shfl_down|"
                        r"shfl_xor|reduce_add|reduce_min|reduce_max|reduce_and|reduce_or|"
                        r"reduce_xor)_sync|__syncwarp)\s*\(")


def strip_comments(src):
    src = re.sub(r"/\*.*?\*/", lambda m: " " * len(m.group(0)), src, flags=re.S)
    src = re.sub(r"//[^\n]*", lambda m: " " * len(m.group(0)), src)
    return re.sub(r'"(?:\\.|[^"\\])*"', lambda m: " " * len(m.group(0)), src)


def short_circuit_collectives(src):
    """(line, text) of every collective call in a short-circuit / conditional operand."""
    code = strip_comments(src)
    bad = []
    for m in COLLECTIVE.finditer(code):
        start = max(code.rfind(ch, 0, m.start()) for ch in ";{}") + 1
        prefix = code[start:m.start()]
        stack = [[]]
        k = 0
        while k < len(prefix):
            two = prefix[k:k + 2]
            if prefix[k] == "(":
                stack.append([])
            elif prefix[k] == ")":
                if len(stack) > 1:
                    stack.pop()
            elif two in ("&&", "||"):
                stack[-1].append(two)
                k += 1
            elif prefix[k] == "?":
                stack[-1].append("?")
            k += 1
        if any(stack):
            line = code.count("\n", 0, m.start()) + 1
            bad.append((line, " ".join(code[start:code.find(";", m.start()) + 1].split())))
    return bad


def check_collectives_source():
    planted = [  # must be caught
        "const bool keep = c >= 0 && (__match_any_sync(kFullMask, c) & lt) == 0u;",
        "if (ok || __any_sync(0xffffffffu, v)) x = 1;",
        "const float y = lane < 8 ? __shfl_sync(kFullMask, x, 0) : 0.f;",
    ]
    fine = [  # must pass
        "const unsigned same = __match_any_sync(kFullMask, c); const bool k = c >= 0 && same;",
        "mask &= __ballot_sync(kFullMask, lane < nk && ok);",
        "const float y = __shfl_sync(kFullMask, a > 0 ? a : b, 0);",
        "if (__any_sync(kFullMask, v) && w) x = 1;",
    ]
    for t in planted:
        assert short_circuit_collectives(t), t
    for t in fine:
        assert not short_circuit_collectives(t), t
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "csrc", "cuda")
    files = sorted(f for f in os.listdir(root) if f.endswith((".cu", ".cuh", ".h")))
    found = []
    for f in files:
        with open(os.path.join(root, f)) as fh:
            found += [(f, ln, txt) for ln, txt in short_circuit_collectives(fh.read())]
    assert not found, "warp collectives in short-circuit operands:\n" + "\n".join(
        f"  csrc/cuda/{f}:{ln}: {txt}" for f, ln, txt in found)
    return len(files)


def check_short_circuit_replay(rng):
    """The pre-fix list_blocks must be rejected for the rows the GPU check runs (some lane
    has c < 0: -1 entries, own-block entries, lanes past n + 1), the fixed one accepted."""
    rejected = 0
    for t in range(200):
        L, bs = rng.choice([(203, 16), (150, 32), (257, 64), (33, 32), (1100, 16)])
        n = rng.randint(1, 31)
        C = -(-L // bs)
        i = rng.randrange(L)
        row = [rng.randrange(-1, C) for _ in range(n)]
        if t == 0:  # n = 31 with every slot usable: all 32 lanes reach the match either way
            L, bs, n, i, row = 1100, 16, 31, 1099, list(range(31))
        list_blocks(row, i, L, bs, True)
        some_idle = n + 1 < 32 or any(slot_block(row, s, i, L, bs, True) < 0 for s in range(32))
        try:
            list_blocks(row, i, L, bs, True, short_circuit=True)
            assert not some_idle, "short-circuited match accepted"
        except AssertionError as e:
            assert some_idle and "deadlock" in str(e), e
            rejected += 1
    assert rejected == 199, rejected
    return rejected


def main() -> int:
    rng = random.Random(20261127)
    n_files = check_collectives_source()
    n_sc = check_short_circuit_replay(random.Random(7))
    print(f"warp collectives: none in a short-circuit operand ({n_files} files of csrc/cuda); "
          f"pre-fix list_blocks rejected for {n_sc} of 200 rows "
          "(the other: n = 31, all 32 lanes busy)")
    n_lean = check_lean(rng)
    n_div = check_tcdiv(rng)
    n_coord = check_coords(rng)
    cases = 0
    queries = 0
    for L, bs, n, causal, pad in itertools.product(
            (1, 15, 16, 17, 97, 200, 4096), (16, 32, 64), (1, 4, 7, 31), (True, False),
            ("none", "right", "left", "random")):
        queries += run_case(rng, L, bs, n, causal, pad, 40)
        cases += 1
    print(f"TcDiv: {n_div} divisions equal n // d; stage_coords_fast: {n_coord} warps equal;"
          f" LEAN per-slot copies: {n_lean} (D, cnt) cases")
    print(f"block chunks: {cases} cases, {queries} queries: keys == DESIGN mask, copies, lane bits,"
          " per-slot order where prefix, float64 softmax ok")
    table = check_group_size()
    picks = "; ".join(f"HPW={h}: " + ", ".join(f"{q} (n {a}-{b})" for q, a, b in runs)
                      for h, runs in table.items())
    n_gw = check_group_coords(random.Random(11))
    print(f"query groups: QPW picked {picks}; slots <= 32 / QPW always")
    print(f"query groups: TcGrid + stage_coords_fast: {n_gw} warps, every (b, i, head) stored "
          "once (out, lse, delta)")
    st = check_groups(random.Random(12))
    hq = " ".join(f"{h}/{q}" for h, q in sorted(st["qpw"]))
    print(f"query groups: {st['cases']} cases, {st['groups']} groups ({st['partial']} with padded "
          f"or missing queries; HPW/QPW {hq}): block lists distinct, in order, query sets exact "
          f"({st['multi']} blocks shared by several queries)")
    print(f"query groups: {st['chunks']} chunks ({st['fast']} fast branch, {st['edge']} per-column "
          f"edge, {st['edge_cut']} cut by it): per-column keys == DESIGN mask; {st['queries']} "
          f"queries: float64 softmax ok, {st['zero']} other-query chunks add exactly 0, first "
          "query == one per warp")
    n_rs = check_group_rowsums(random.Random(13))
    print(f"query groups: dQ rowsums: {n_rs} (D, HPW, QPW, rbits) layouts, every element once, "
          "each lane its own row or row 0")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
