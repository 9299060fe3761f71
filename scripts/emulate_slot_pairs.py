"""Replays the query pairs of the LEAN per-slot staged kernels (attn_fwd_kernel_tc /
attn_dq_kernel_tc with QPW = 2, TcWarp<..., LEAN = true, QPW = 2> in
csrc/cuda/attn_staged_tc.cuh) lane by lane on the CPU, with the sliding-window and
compressed-branch policies re-implemented as csrc/cuda/sliding_window_attention.cu and
csrc/cuda/compressed_attention.cu write them, and checks them against the DESIGN masks
(sliding_window_attention: window / dilated / causal; the compressed branch of
blossom_attention), built here directly from their formulas. No GPU, no torch. Helpers for
TcGrid / stage_coords_fast come from emulate_staged_blk.py (which also checks group_rowsum
symbolically for QPW = 2).

  (1) the launchers' choice: pairs only for policies without block chunks, on the LEAN path,
      HPW <= 4 (G % 8 != 0), BLOSSOM_OPS_CUDA_SLOT_PAIRS != 0, BLOSSOM_OPS_CUDA_QUERY_GROUPS
      not 0 (not fwd for dQ), STAGED != old, SIMPLE != 1, |row stride| < 2^26, warps < 2^31;
      anchored to the source by exact lines (a change of a modelled line fails the run);
      TcGrid::make(s, HPW, 2) + stage_coords_fast + i *= 2 through the epilogue loops: out
      pieces, lse, grad_q pieces and delta (gated: grad_gate and lse') of every (b, i, head)
      written exactly once, rows i + 1 >= L skipped, delta 0 exactly for padded queries;
  (2) issue() with QPW = 2 (lane: slot n = n0 + lane of query i below ns0, else slot n - ns0
      of query i + 1; ballot / popc compaction; c0 = popc(mask & lanes below ns0 - n0)) and
      for_each_chunk (double buffer, (cnt, c0) of chunk ch + 1 issued before chunk ch's body);
  (3) the LEAN copy loop on the concatenated lists: rows < cnt hold kidx[r] of this chunk,
      rows past cnt are zero-filled from the address of kidx[cnt - 1] (a key of this chunk),
      every row an executed 16-key tile reads was written by this chunk's issue;
  (4) per column (fwd: cq = n / HPW; dQ: cq = QPW past NR), lane by lane through the C
      layout (keys gid, gid + 8 of each executed tile): every DESIGN (query, key) pair exactly
      once and nothing else; padding columns nothing;
  (5) a float64 replay of the forward per-column online softmax against a dense softmax; the
      pair's queries against one query per warp: the first query's keys are in the same
      chunks at the same positions, always (its slots are the prefix [0, ns0) of the list and
      compaction keeps order: its keys are positions [0, c0)); the chunks the pair adds for
      it (the tail of its last chunk, query i + 1's chunks) hold none of its keys, so a
      float32 replay (tile sums in key order, per-lane partial sums of l, P and dS rounded
      to bf16) gives the same bits, fwd and dQ, provided fast_exp2(0) = 1 and
      fast_exp2(-inf) = 0 exactly and zero products leave an mma sum unchanged; the second
      query's positions equal one query per warp's only when ns0 % KC == 0 (counted
      otherwise); delta's rowsum: group_rowsum against the QPW = 1 order in float32 (the
      bits differ for part of the rows, so dQ / dK / dV of pairs are not bit-identical to
      one query per warp);
  (6) planted bugs: on the replay (c0 off by one, lane bound off by one, ns0 from the wrong
      query, lanes < ns0 instead of ns0 - n0, slot n instead of n - ns0, c0 not pipelined,
      padding columns with keys, missing i + q < L skips, stale kidx for the zero fill,
      missing delta = 0 branch, the buffer being computed overwritten, fast_exp2(0) != 1)
      and on in-memory copies of the source (the anchors): each must be caught.

  (7) dedupe (TcWarp DD, the default where the policy's pair_dedupe_ok()): the launchers'
      choice (BLOSSOM_OPS_CUDA_SLOT_DEDUPE != 0), the window's find_pair_tail (every window
      1..40 / 100 / 1000, dilated, causal, 11 L: the tail has the {a} + run form), issue()
      with query i + 1's tail (pair_tail) and the membership bits (pair_attends, the warp OR
      into m2 by compacted position), the bit-set column masks: every column == DESIGN as in
      (4), each key staged once (the union of both queries' keys), no more chunks than
      without dedupe, query i bit for bit as one query per warp; chunk counts of the default
      window at L = 4096 / 16384 (3 -> 2 chunks of 16); planted bugs and source / policy
      mutations as in (6).

Cases: window 1..40, dilated on / off, causal on / off, no / right / left / random padding,
each with one short (1, 2, 3, 4, 5, 16, 17) and one long L (33, 40, 41, 97, 200; odd L: the
last pair has one query), KC = 32 (D = 16, 32) and 16 (D = 64, 128), columns for HPW = 1, 2,
4; compressed branch with stride 1, 2, 3, 4, 16, causal on / off, L up to 200, compressed
validity from the padding (block_len = stride, 2 stride) or random.

    python3 scripts/emulate_slot_pairs.py
"""
import functools
import itertools
import os
import random
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from emulate_staged_blk import (STAGE_WARPS, coords_grid, grid_make,  # noqa: E402
                                hpw_of)

FULL = (1 << 32) - 1
QPW = 2
BUG = set()  # planted bugs (section 6); empty for the real replay
HERE = os.path.dirname(os.path.abspath(__file__))
CUH = os.path.join(HERE, "..", "csrc", "cuda", "attn_staged_tc.cuh")
GATE_CUH = os.path.join(HERE, "..", "csrc", "cuda", "attn_gate_epilogue.cuh")


def popc(x):
    return bin(x).count("1")


def kc_of(D):
    return 32 if D <= 32 else 16  # TcCfg<D>::KC


# ---- (1) the launchers -------------------------------------------------------------------
def launch_choice(dq, D, G, vec=True, env=None, stride=64, warps=1000, is16=True, blk=False,
                  dd_ok=True):
    """launch_attn_fwd_staged / launch_attn_dq_staged: 'generic' (false: the simple kernel),
    or (kind, HPW, QPW) of the staged kernel launched. blk: a policy with block chunks
    (block-sparse), whose fallback is the per-slot kernel without LEAN or pairs. dd_ok: the
    policy's pair_dedupe_ok() (kind 'pairs-dd': TcWarp DD, shared keys staged once)."""
    env = env or {}
    if not is16:  # stage_type_ok
        return "generic"
    if not vec or env.get("BLOSSOM_OPS_CUDA_SIMPLE") == "1" or G < 1 or D not in (16, 32, 64, 128):
        return "generic"  # dispatch_stage_config
    hpw = hpw_of(G)
    lim = 1 << 26
    lean = env.get("BLOSSOM_OPS_CUDA_STAGED") != "old" and -lim < stride < lim
    if blk:
        return ("blk-or-old", hpw, 1)  # block chunks, or the non-LEAN per-slot fallback
    if lean and warps < (1 << 31):
        qg = env.get("BLOSSOM_OPS_CUDA_QUERY_GROUPS")
        qg_off = qg == "0" or (dq and qg == "fwd")  # query_groups_off(dq)
        pairs_on = env.get("BLOSSOM_OPS_CUDA_SLOT_PAIRS") != "0" and not qg_off  # slot_pairs_on
        if hpw <= 4 and pairs_on:
            if env.get("BLOSSOM_OPS_CUDA_SLOT_DEDUPE") != "0" and dd_ok:  # slot_dedupe_on
                return ("pairs-dd", hpw, 2 if hpw <= 4 else 1)
            return ("pairs", hpw, 2 if hpw <= 4 else 1)
        return ("lean", hpw, 1)
    return ("old", hpw, 1)


SOURCE_ANCHORS = [  # (text, count): the source lines the replay models
    ("if constexpr (!has_block_chunks<Policy>::value) {", 2),
    ("if (lean && warps < (int64_t(1) << 31)) {", 2),
    ("if (HPW <= 4 && slot_pairs_on(false)) {", 1),
    ("if (HPW <= 4 && slot_pairs_on(true)) {", 1),
    ("const int64_t pw = s.batch * s.kv_heads * (s.group() / HPW) * ((s.q_len + 1) / 2);", 2),
    ("TcGrid::make(s, HPW, 2)", 4),
    ("auto kernel = attn_fwd_kernel_tc<T, D, HPW, Policy, true, HPW <= 4 ? 2 : 1>;", 1),
    ("auto kernel = attn_dq_kernel_tc<T, D, HPW, Policy, true, HPW <= 4 ? 2 : 1>;", 1),
    ("return !off && !query_groups_off(dq);", 1),
    ('static const bool off = env_equals("BLOSSOM_OPS_CUDA_SLOT_PAIRS", "0");', 1),
    ("const int hpw = G % 8 == 0 ? 8 : (G % 4 == 0 ? 4 : (G % 2 == 0 ? 2 : 1));", 1),
    ("i *= QPW;  // QPW = 2: the first query of the pair", 2),
    ("const bool second = n >= ns0;", 2),
    ("j = (lane < C::KC && n < n_slots) ? pol.fwd_key(b, i + (second ? 1 : 0), g,", 2),
    ("second ? n - ns0 : n)", 1),
    ("const int64_t ub = ns0 - n0;", 1),
    ("const unsigned first = ub >= 32 ? kFullMask : (ub <= 0 ? 0u : (1u << ub) - 1u);", 1),
    ("*c0_out = __popc(mask & first);", 1),
    ("const int last = ki[cnt - 1];  // rows past cnt read a valid row's address", 1),
    ("jr[k] = r0 + KPP * k < cnt ? j : last;", 1),
    ("cnt_next = issue(pol, (ch + 1) * C::KC, buf ^ 1, &c0_next, &m2_next);", 1),
    ("if (cnt > 0) body(buf, cnt, QPW == 1 ? cnt : c0, m2);", 1),
    ("c0 = c0_next;", 1),
    ("m2 = m2_next;", 1),
    ("int cnt = n_chunks > 0 ? issue(pol, 0, 0, &c0, &m2) : 0;", 1),
    # DD (dedupe): the launchers, issue(), pair_slots_dedupe, the column bit masks
    ("if (slot_dedupe_on(pol)) {", 2),
    ('static const bool off = env_equals("BLOSSOM_OPS_CUDA_SLOT_DEDUPE", "0");', 1),
    ("return !off && pol.pair_dedupe_ok();", 1),
    ("auto kernel = attn_fwd_kernel_tc<T, D, HPW, Policy, true, HPW <= 4 ? 2 : 1,", 1),
    ("auto kernel = attn_dq_kernel_tc<T, D, HPW, Policy, true, HPW <= 4 ? 2 : 1,", 1),
    ("HPW <= 4>;", 2),
    ("const int t = static_cast<int>(n - ns0);  // tail index of query i + 1", 1),
    ("const int64_t slot = second ? (t == 0 ? ta : tb + t) : n;", 1),
    ("j = (lane < C::KC && n < n_slots) ? pol.fwd_key(b, i + (second ? 1 : 0), g, slot) : -1;", 1),
    ("const bool att = pol.pair_attends(b, i + 1, j);", 1),
    ("in2 = (j >= 0) & (second | (both & att));", 1),
    ("const int pos = __popc(mask & ((1u << lane) - 1u));", 1),
    ("if (j >= 0) ki[pos] = static_cast<int>(j);", 1),
    ("const unsigned bit2 = in2 ? 1u << pos : 0u;", 1),
    ("*m2_out = __reduce_or_sync(kFullMask, bit2);", 1),
    ("ns0 = (qbits & 1u) != 0u ? pol.fwd_slots(b, i, g) : 0;", 3),
    ("both = qbits == 3u;", 1),
    ("int64_t nt = 0, a = -1, first = 0;", 1),
    ("pol.pair_tail(b, i, g, a, first, nt);", 1),
    ("tb = static_cast<int>(a >= 0 ? first - 1 : first);", 1),
    ("ta = a >= 0 ? static_cast<int>(a) : tb;", 1),
    ("} else if ((qbits & 2u) != 0u) {", 1),
    ("nt = pol.fwd_slots(b, i + 1, g);", 1),
    ("n_slots = ns0 + nt;", 1),
    ("w.pair_slots_dedupe(pol, qbits);", 2),
    ("cm[j] = (cq[j] == 0 ? (c0 >= 32 ? kFullMask : (1u << c0) - 1u)", 2),
    ("(cq[j] == 1 ? m2 : 0u)", 2),
    ("(cq[j] == 1 ? m2 : 0u)) >> gid;", 1),
    ("(cq[j] == 1 ? m2 : 0u))\n                >> gid;", 1),
    ("const bool in = DD ? ((cm[e & 1] >> (t * 16 + (e >> 1) * 8)) & 1u) != 0u", 1),
    ("const bool in = DD ? ((cm[j] >> (t * 16 + (e >> 1) * 8)) & 1u) != 0u", 1),
    ("w.ns0 = (qbits & 1u) != 0u ? pol.fwd_slots(b, i, g) : 0;", 2),
    ("w.n_slots = w.ns0 + ((qbits & 2u) != 0u ? pol.fwd_slots(b, i + 1, g) : 0);", 2),
    ("const int cq[2] = {(2 * tig) / HPW, (2 * tig + 1) / HPW};", 1),
    ("lo[j] = QPW == 1 ? 0 : (cq[j] == 1 ? c0 : 0);", 1),
    ("hi[j] = QPW == 1 ? cnt : (cq[j] == 0 ? c0 : (cq[j] == 1 ? cnt : 0));", 1),
    ("cq[j] = 2 * tig + j < NR ? (2 * tig + j) / HPW : QPW;", 1),
    ("lo[j] = cq[j] == 0 ? 0 : c0;", 1),
    ("hi[j] = cq[j] == 0 ? c0 : cnt;", 1),
    # the epilogues (finish_fwd_warp, store_dq_warp, both through for_each_staged_piece),
    # shared with the block-chunk kernels: the pair kernels pass their first query i as i0
    ("if (QPW > 1 && i0 + q >= L) continue;", 1),
    ("for_each_staged_piece<C, HPW, QPW>(ost, i0, L, lane,", 2),
    ("if (n < HPW * QPW && (QPW == 1 || i0 + q < L))", 1),
    ("finish_fwd_warp<C, HPW, QPW, T, GATE>(p, base, o, m, lp, b, i, h0, lane);", 1),
    # the gated forward's piece offset (own output contiguous: the flat row * D + c * 8 of
    # gate.out and the other branches) and its weights in finish_fwd_warp's piece loop
    ("store8_gated(p.gate, dst - p.out.ptr, v8, dst, gw + q * HPW + hh);", 1),
    ("store_dq_warp<C, HPW, QPW>(p, base, dq, b, i, h0, lane);", 1),
]


POLICY_ANCHORS = {  # the policies' pair-dedupe lines the replay models (WindowPolicy etc. below)
    "sliding_window_attention.cu": [
        ("if (causal ? d < 0 : false) return false;", 1),
        ("const int64_t a = d < 0 ? -d : d;", 1),
        ("return a < band || (n_pow > 0 && a >= (int64_t(1) << p0) && (a & (a - 1)) == 0);", 1),
        ("if (near(causal ? o - 1 : -(o + 1))) continue;  // shared with query i", 1),
        ("} else if (first + count == ns) {  // one run to the end", 1),
        ("} else if (count == 1 || second + (count - 1) == ns) {", 1),
        ("pair_b = count == 1 ? ns : second;", 1),
        ("n = (pair_a >= 0 ? 1 : 0) + slots() - pair_b;", 1),
        ("const int d = static_cast<int>(q - j), a = d < 0 ? -d : d;", 1),
        ("const bool side = causal ? d >= 0 : true;", 1),
        ("return side & ((a < band32) | ((a >= pow_lo32) & ((a & (a - 1)) == 0)));", 1),
        ("pol.band32 = static_cast<int>(pol.band < 0x7fffffff ? pol.band : 0x7fffffff);", 1),
        ("pol.pow_lo32 = pol.n_pow > 0 && pol.p0 < 31 ? (1 << pol.p0) : 0x7fffffff;", 1),
        ("pol.find_pair_tail();", 1),
    ],
    "compressed_attention.cu": [
        ("first = fwd_slots(b, i, g);", 1),
        ("n = fwd_slots(b, i + 1, g) - first;", 1),
        ("bool pair_attends(int64_t, int64_t, int64_t) const {\n    return true;", 1),
        ("bool pair_dedupe_ok() const { return true; }", 1),
    ],
}


GATE_ANCHORS = [  # attn_gate_epilogue.cuh: stage_gate_weights and store8_gated's weight reads
    ("const int n = lane & 7, r = lane >> 3;", 1),
    ("const int q = n / HPW, hh = n % HPW;", 1),
    ("if (n < HPW * QPW && r < g.branches && i0 + q < L) {", 1),
    ("const int64_t row = (b * L + i0 + q) * Hq + h0 + hh;", 1),
    ("w[r * 8 + n] = gate_sigmoid_ieee(to_float(g.logits[row * g.branches + r]));", 1),
    ("const float w0 = w[0], w1 = w[8];", 1),
    ("const float w2 = w[16];", 1),
    ("load8_aligned(g.branch[0] + off, f);", 1),
    ("load8_aligned(g.branch[2] + off, f);", 1),
    ("g.self != 1", 1),
    ("return s.head_dim % kFrag == 0 && p.out.stride_h == s.head_dim &&", 1),
    ("p.out.stride_l == s.q_heads * s.head_dim &&", 1),
    ("p.out.stride_b == s.q_len * s.q_heads * s.head_dim;", 1),
]


def check_anchors(name, text, anchors):
    """Every (line, count) of anchors occurs count times in text (the source `name`)."""
    for line, count in anchors:
        got = text.count(line)
        assert got == count, f"{name}: {line!r} found {got} times, the replay expects {count}"
    return len(anchors)


def check_source_anchors(src=None, policy_src=None):
    if src is None:
        with open(CUH) as fh:
            src = fh.read()
    n = check_anchors("attn_staged_tc.cuh", src, SOURCE_ANCHORS)
    for f, anchors in POLICY_ANCHORS.items():
        if policy_src is not None and f in policy_src:
            psrc = policy_src[f]
        else:
            with open(os.path.join(os.path.dirname(CUH), f)) as fh:
                psrc = fh.read()
        n += check_anchors(f, psrc, anchors)
    with open(GATE_CUH) as fh:
        return n + check_anchors("attn_gate_epilogue.cuh", fh.read(), GATE_ANCHORS)


def check_launcher():
    """Pairs exactly when: 16-bit, vec, D in {16, 32, 64, 128}, not SIMPLE=1, not STAGED=old,
    |row stride| < 2^26, warps < 2^31, G % 8 != 0 (HPW <= 4), SLOT_PAIRS != 0, QUERY_GROUPS
    not 0 (and not fwd for dQ); then the QPW = 2 instance."""
    envs = [{}, {"BLOSSOM_OPS_CUDA_SLOT_PAIRS": "0"}, {"BLOSSOM_OPS_CUDA_SLOT_PAIRS": "1"},
            {"BLOSSOM_OPS_CUDA_QUERY_GROUPS": "0"}, {"BLOSSOM_OPS_CUDA_QUERY_GROUPS": "fwd"},
            {"BLOSSOM_OPS_CUDA_QUERY_GROUPS": "1"}, {"BLOSSOM_OPS_CUDA_STAGED": "old"},
            {"BLOSSOM_OPS_CUDA_SIMPLE": "1"},
            {"BLOSSOM_OPS_CUDA_QUERY_GROUPS": "fwd", "BLOSSOM_OPS_CUDA_SLOT_PAIRS": "0"},
            {"BLOSSOM_OPS_CUDA_SLOT_DEDUPE": "0"}, {"BLOSSOM_OPS_CUDA_SLOT_DEDUPE": "1"},
            {"BLOSSOM_OPS_CUDA_SLOT_DEDUPE": "0", "BLOSSOM_OPS_CUDA_SLOT_PAIRS": "0"},
            {"BLOSSOM_OPS_CUDA_SLOT_DEDUPE": "1", "BLOSSOM_OPS_CUDA_QUERY_GROUPS": "fwd"}]
    n = 0
    table = {}
    for dq, D, G, vec, env, stride, warps, is16, blk, dd_ok in itertools.product(
            (False, True), (8, 16, 32, 48, 64, 128, 256), range(1, 17), (True, False), envs,
            (64, (1 << 26) - 1, 1 << 26, -(1 << 26)), (1000, (1 << 31) - 1, 1 << 31),
            (True, False), (False, True), (True, False)):
        got = launch_choice(dq, D, G, vec, env, stride, warps, is16, blk, dd_ok)
        qg = env.get("BLOSSOM_OPS_CUDA_QUERY_GROUPS")
        want_pairs = (not blk and is16 and vec and D in (16, 32, 64, 128)
                      and env.get("BLOSSOM_OPS_CUDA_SIMPLE") != "1"
                      and env.get("BLOSSOM_OPS_CUDA_STAGED") != "old"
                      and abs(stride) < (1 << 26) and warps < (1 << 31) and G % 8 != 0
                      and env.get("BLOSSOM_OPS_CUDA_SLOT_PAIRS") != "0"
                      and qg != "0" and not (dq and qg == "fwd"))
        assert (got != "generic" and got[0] in ("pairs", "pairs-dd")) == want_pairs, \
            (dq, D, G, env, got)
        want_dd = want_pairs and env.get("BLOSSOM_OPS_CUDA_SLOT_DEDUPE") != "0" and dd_ok
        assert (got != "generic" and got[0] == "pairs-dd") == want_dd, (dq, D, G, env, got)
        if want_pairs:
            assert got[1] in (1, 2, 4) and got[2] == 2 and got[1] * got[2] <= 8
        n += 1
        if blk or not vec or not is16 or D != 64 or stride != 64 or warps != 1000 \
                or G not in (4, 8) or not dd_ok:
            continue
        key = (G, "dq" if dq else "fwd", "+".join(f"{k[16:]}={v}" for k, v in env.items()) or "-")
        table[key] = got if got == "generic" else got[0]
    return n, table


R_GATE = 3  # the gated forward's weights are checked for the largest R (R = 2 reads a prefix)


def check_pair_epilogues(rng):
    """TcGrid::make(s, HPW, 2) + stage_coords_fast + i *= 2, then the epilogue loops of both
    kernels and the dQ kernel's delta / gate rows, for every warp."""
    warps_seen = 0
    shapes = [(1, 1, 1, 1), (1, 1, 1, 2), (1, 2, 1, 3), (3, 8, 2, 17), (2, 4, 1, 33),
              (5, 12, 3, 97), (2, 6, 3, 11), (1, 8, 2, 1023), (2, 16, 4, 7), (3, 4, 4, 5),
              (2, 3, 1, 9), (1, 12, 2, 40)]
    for B, Hq, Hk, L in shapes:
        G = Hq // Hk
        for hpw in (4, 2, 1):
            if G % hpw:
                continue
            NR = hpw * QPW
            for D in (16, 128):
                CPR = D // 8
                gr = grid_make(B, Hq, Hk, L, hpw, QPW)
                pw = B * Hk * (G // hpw) * ((L + 1) // 2)  # the launcher's count
                assert pw == gr["warps"]
                valid = [[rng.random() < 0.7 for _ in range(L)] for _ in range(B)]
                for gated in (False, True):
                    out = np.zeros((B, L + 2, Hq), dtype=np.int64)  # + 2: stores past L show
                    lse = np.zeros_like(out)
                    dq = np.zeros_like(out)
                    dlt = np.zeros_like(out)
                    dlt_val = np.full(out.shape, -1, dtype=np.int64)  # 0: zero, 1: the row's
                    gg_w = np.zeros_like(out)
                    lsep = np.zeros_like(out)
                    gout = np.zeros((B * L * Hq, CPR), dtype=np.int64)  # gated fwd: gate.out
                    for warp in range(-(-pw // STAGE_WARPS) * STAGE_WARPS):
                        co = coords_grid(gr, hpw, warp)
                        if co is None:
                            assert warp >= pw
                            continue
                        b, pair, g, h0 = co
                        assert 0 <= pair < (L + 1) // 2 and g * G <= h0 and h0 + hpw <= (g + 1) * G
                        i = pair * QPW
                        qbits = 0
                        for q in range(QPW):
                            if ("qbits_no_L" in BUG or i + q < L) and valid[b][i + q]:
                                qbits |= 1 << q
                        rbits = qbits
                        if gated:
                            for q in range(QPW):
                                if i + q < L:
                                    rbits |= 1 << q
                        gw_rows = {}  # stage_gate_weights: w[r * 8 + n] -> its logits row
                        if gated:
                            for lane in range(32):
                                n, r = lane & 7, lane >> 3
                                if "gate_w_n4" in BUG:
                                    n, r = lane & 3, lane >> 2
                                q, hh = n // hpw, n % hpw
                                if n < NR and r < R_GATE and i + q < L:
                                    assert r * 8 + n not in gw_rows
                                    gw_rows[r * 8 + n] = (b * L + i + q) * Hq + h0 + hh
                        for lane in range(32):
                            gid, tig = lane >> 2, lane & 3
                            for t in range(lane, NR * CPR, 32):  # out / grad_q loops
                                n = t // CPR
                                q = n // hpw
                                if "no_L_skip" not in BUG and i + q >= L:
                                    continue
                                assert i + q < L, "store past the last row"
                                out[b, i + q, h0 + n % hpw] += 1
                                dq[b, i + q, h0 + n % hpw] += 1
                                if gated:  # store8_gated: offset in the contiguous own output
                                    # (stride_b = L Hq D, stride_l = Hq D, stride_h = D) / D
                                    off = b * L * Hq * D + (i + q) * Hq * D + (h0 + n % hpw) * D
                                    frow = off // D
                                    if "gate_row_L1" in BUG:
                                        frow = (b * (L + 1) + i + q) * Hq + h0 + n % hpw
                                    assert 0 <= frow < B * L * Hq, "gated row out of range"
                                    gout[frow, t % CPR] += 1
                                    for r in range(R_GATE):  # w[r * 8] at gw + q * HPW + hh
                                        assert gw_rows.get(r * 8 + q * hpw + n % hpw) == frow, \
                                            "gate weight of another row"
                            if gid == 0:  # lse
                                for j in range(2):
                                    n = 2 * tig + j
                                    q = n // hpw
                                    if n < NR and i + q < L:
                                        lse[b, i + q, h0 + n % hpw] += 1
                            hl = lane if lane < NR else 0
                            ql = hl // hpw
                            my_row = (b * L + i + ql) * Hq + h0 + hl % hpw
                            if rbits != 0:
                                if rbits >> ql & 1:  # dq_row_terms: reads lse[my_row]
                                    assert i + ql < L
                                    writer = lane < NR
                                    qv = bool(qbits >> ql & 1)
                                    if writer:
                                        bb, rem = divmod(my_row, L * Hq)
                                        ii, hh = divmod(rem, Hq)
                                        assert (bb, ii, hh) == (b, i + ql, h0 + hl % hpw)
                                        dlt[b, ii, hh] += 1
                                        dlt_val[b, ii, hh] = 1 if qv else 0
                                        if gated:
                                            gg_w[b, ii, hh] += 1
                                            lsep[b, ii, hh] += 1
                                elif lane < NR and i + ql < L and "no_delta_zero" not in BUG:
                                    dlt[b, i + ql, h0 + hl % hpw] += 1
                                    dlt_val[b, i + ql, h0 + hl % hpw] = 0
                            elif lane < NR and i + ql < L:
                                dlt[b, i + ql, h0 + hl % hpw] += 1
                                dlt_val[b, i + ql, h0 + hl % hpw] = 0
                        warps_seen += 1
                    want_val = np.array([[1 if valid[b][i] else 0 for i in range(L)]
                                         for b in range(B)])[:, :, None]
                    for arr, per in ((out, CPR), (dq, CPR), (lse, 1), (dlt, 1)):
                        assert (arr[:, :L] == per).all() and (arr[:, L:] == 0).all(), \
                            (B, Hq, Hk, L, hpw, D, gated)
                    assert (dlt_val[:, :L] == want_val).all(), "delta: 0 for padded rows only"
                    want_g = 1 if gated else 0
                    assert (gg_w[:, :L] == want_g).all() and (lsep[:, :L] == want_g).all()
                    assert (gout == (1 if gated else 0)).all(), \
                        "gated forward: every piece of every row of gate.out once"
    return warps_seen


# ---- the policies --------------------------------------------------------------------------
class Valid:
    """valid(b, j) of one sequence; a read outside [0, n) is a bug of the replayed code."""

    def __init__(self, bits):
        self.bits = list(bits)

    def __call__(self, j):
        assert 0 <= j < len(self.bits), f"validity read at {j} outside [0, {len(self.bits)})"
        return self.bits[j]


class WindowPolicy:
    """SlidingPolicy (sliding_window_attention.cu)."""

    def __init__(self, L, window, dilated, causal, valid):
        self.L, self.window, self.dilated, self.causal = L, window, dilated, causal
        self.valid = valid
        self.kv_len = L
        self.band = (window if window < L else L) if window >= 1 else 0
        self.p0 = self.n_pow = 0
        if dilated:
            lo = window if window > 1 else 1
            p = 0
            while p < 62 and (1 << p) < lo:
                p += 1
            self.p0 = p
            while p < 62 and (1 << p) <= L - 1:
                self.n_pow += 1
                p += 1
        self.n_slots = (self.band + self.n_pow if causal else
                        (2 * self.band - 1 if self.band > 0 else 0) + 2 * self.n_pow)
        self.find_pair_tail()

    # ---- query pairs without repeated keys (TcWarp DD) ----
    def near(self, d):
        """SlidingPolicy::near: a query attends the key at signed distance d = i - j."""
        if self.causal and d < 0 and "dd_near_no_causal" not in BUG:
            return False
        a = -d if d < 0 else d
        return a < self.band or (self.n_pow > 0 and a >= (1 << self.p0) and a & (a - 1) == 0)

    def find_pair_tail(self):
        ns = self.n_slots
        un = []
        for n in range(ns):
            o = self.offset(n)
            if self.near(o - 1 if self.causal else -(o + 1)):
                continue
            un.append(n)
        self.pair_ok = True
        count = len(un)
        if count == 0:
            self.pair_a, self.pair_b = -1, ns
        elif un[0] + count == ns:
            self.pair_a, self.pair_b = -1, un[0]
        elif count == 1 or un[1] + (count - 1) == ns:
            self.pair_a, self.pair_b = un[0], (ns if count == 1 else un[1])
        else:
            self.pair_ok = False
        self.unshared = un  # for the checks

    def pair_tail(self, i):
        n = (1 if self.pair_a >= 0 else 0) + self.n_slots - self.pair_b
        return self.pair_a, self.pair_b, n

    def pair_attends(self, q, j):
        """The kernel's 32-bit form (band32, pow_lo32) of near(q - j)."""
        d = q - j
        assert -(1 << 31) < d < (1 << 31)
        band32 = min(self.band, (1 << 31) - 1)
        pow_lo32 = (1 << self.p0) if self.n_pow > 0 and self.p0 < 31 else (1 << 31) - 1
        if "dd_pow_lo_x2" in BUG:
            pow_lo32 *= 2
        a = -d if d < 0 else d
        side = d >= 0 if self.causal and "dd_near_no_causal" not in BUG else True
        got = side and (a < band32 or (a >= pow_lo32 and a & (a - 1) == 0))
        if not BUG:
            assert got == self.near(d)
        return got

    def offset(self, n):
        if self.causal:
            return n if n < self.band else 1 << (self.p0 + (n - self.band))
        nb = 2 * self.band - 1 if self.band > 0 else 0
        if n < nb:
            return n - (self.band - 1)
        k = n - nb
        d = 1 << (self.p0 + k // 2)
        return d if k & 1 else -d

    def query_valid(self, i):
        return self.valid(i)

    def fwd_slots(self, i):
        return self.n_slots

    def fwd_key(self, i, n):
        assert 0 <= n < self.n_slots, f"window slot {n} outside [0, {self.n_slots})"
        j = i - self.offset(n) if self.causal else i + self.offset(n)
        return j if (0 <= j < self.L and self.valid(j)) else -1

    def design(self, i):
        """DESIGN: valid(i), valid(j), vis, |i - j| < window or (dilated, a power of two)."""
        if not 0 <= i < self.L or not self.valid(i):
            return set()
        out = set()
        for j in range(self.L):
            d = abs(i - j)
            near = d < self.window or (self.dilated and d > 0 and d & (d - 1) == 0)
            if self.valid(j) and (not self.causal or j <= i) and near:
                out.add(j)
        return out


class CompressedPolicy:
    """CompressedPolicy (compressed_attention.cu); keys are compressed tokens t < T."""

    def __init__(self, L, T, stride, causal, valid, valid_cmp):
        self.L, self.T, self.stride, self.causal = L, T, stride, causal
        self.valid, self.valid_cmp = valid, valid_cmp
        self.kv_len = T

    def query_valid(self, i):
        return self.valid(i)

    def fwd_slots(self, i):
        if not self.causal:
            return self.T
        seen = (i + 1) // self.stride
        return seen if seen < self.T else self.T

    def fwd_key(self, i, n):
        assert 0 <= n < self.T, f"compressed slot {n} outside [0, {self.T})"
        return n if self.valid_cmp(n) else -1

    pair_ok = True

    def pair_tail(self, i):
        first = self.fwd_slots(i + 1 if "dd_cmp_tail_from_i1" in BUG else i)
        return -1, first, self.fwd_slots(i + 1) - first

    def pair_attends(self, q, t):
        """Always true: t is a token of query q - 1, so (t + 1) stride - 1 <= q - 1 (causal)."""
        assert not self.causal or (t + 1) * self.stride - 1 <= q - 1
        return "dd_cmp_attends_false" not in BUG

    def design(self, i):
        """DESIGN: valid(i), valid compressed t, (t + 1) * stride - 1 <= i when causal."""
        if not 0 <= i < self.L or not self.valid(i):
            return set()
        return {t for t in range(self.T) if self.valid_cmp(t)
                and (not self.causal or (t + 1) * self.stride - 1 <= i)}


# ---- (2), (3) issue, the LEAN copies, for_each_chunk ---------------------------------------
GARBAGE = "garbage"


@functools.lru_cache(maxsize=None)
def lean_copy_geometry(D, KC, cnt):
    """TcWarp<LEAN>::issue's copy loop, lane by lane: for each staged row r, the kidx slots its
    pieces read their address from (r below cnt, cnt - 1 past it) and whether they copy or
    zero-fill; every (row, K|V, piece) written once. Also the kidx slots read (kl[KPP k])."""
    CPR = D // 8
    PPK = 2 * CPR
    KPP = 32 // PPK
    seen = {}
    reads = set()
    for lane in range(32):
        w, r0 = lane % PPK, lane // PPK
        is_v = w >= CPR
        c = w - CPR if is_v else w
        for k in range(KC // KPP):
            r = r0 + KPP * k
            assert r < KC
            reads.add(r)  # kl[KPP * k]: inside ki[0, KC)
            full = r < cnt
            src = r if full else ("stale" if "zero_fill_stale" in BUG else cnt - 1)
            key = (r, is_v, c)
            assert key not in seen, "a staged piece written twice"
            seen[key] = (src, full)
    assert len(seen) == KC * 2 * CPR, "a staged piece never written"
    rows = []
    for r in range(KC):
        srcs = {seen[(r, v, c)] for v in (False, True) for c in range(CPR)}
        assert len(srcs) == 1
        rows.append(srcs.pop())
    return tuple(rows), frozenset(reads)


class PairWarp:
    """One warp of attn_*_kernel_tc<..., LEAN = true, QPW> (QPW = 2: queries i, i + 1)."""

    def __init__(self, pol, i, L, D, qpw, dd=False):
        self.pol, self.i, self.L, self.D, self.qpw, self.dd = pol, i, L, D, qpw, dd
        self.KC = kc_of(D)
        self.kidx = [[GARBAGE] * self.KC for _ in range(2)]
        self.rows = [[None] * self.KC for _ in range(2)]  # (kind, key, generation)
        self.qbits = 0
        for q in range(qpw):
            if ("qbits_no_L" in BUG or i + q < L) and pol.query_valid(i + q):
                self.qbits |= 1 << q
        if qpw == 1:
            self.ns0 = 0
            self.n_slots = pol.fwd_slots(i) if self.qbits else 0
        elif dd:  # pair_slots_dedupe
            self.ns0 = pol.fwd_slots(i) if self.qbits & 1 else 0
            self.both = self.qbits == 3
            nt, a, first = 0, -1, 0
            if self.both:
                a, first, nt = pol.pair_tail(i)
            elif self.qbits & 2:
                nt = pol.fwd_slots(i + 1)
            self.tb = first - 1 if a >= 0 and "dd_tb_no_dec" not in BUG else first
            self.ta = a if a >= 0 and "dd_ta_ignored" not in BUG else self.tb
            assert -(1 << 31) <= self.tb and self.ta < (1 << 31)  # int in the kernel
            self.n_slots = self.ns0 + nt
        else:
            qa, qb = (i + 1, i) if "ns0_wrong_query" in BUG else (i, i + 1)
            self.ns0 = pol.fwd_slots(qa) if self.qbits & 1 else 0
            self.n_slots = self.ns0 + (pol.fwd_slots(qb) if self.qbits & 2 else 0)
        self.issued = 0

    def issue(self, n0, buf):
        KC, ns0 = self.KC, self.ns0
        js = []
        in2 = [False] * 32
        for lane in range(32):
            n = n0 + lane
            j = -1
            if lane < KC and n < self.n_slots:
                if self.qpw == 1:
                    j = self.pol.fwd_key(self.i, n)
                elif self.dd:
                    second = n >= ns0
                    t = n - ns0
                    slot = (self.ta if t == 0 else self.tb + t) if second else n
                    j = self.pol.fwd_key(self.i + (1 if second else 0), slot)
                    if j >= 0:
                        qa = self.i if "dd_attends_i" in BUG else self.i + 1
                        both = True if "dd_no_both" in BUG else self.both
                        in2[lane] = second or (both and self.pol.pair_attends(qa, j))
                else:
                    second = n >= ns0
                    slot = n if "second_slot_n" in BUG else n - ns0
                    j = self.pol.fwd_key(self.i + (1 if second else 0), slot if second else n)
            js.append(j)
        mask = sum(1 << lane for lane in range(32) if js[lane] >= 0)  # __ballot_sync
        c0 = None
        if self.qpw == 2:
            ub = ns0 if "ns0_lanes" in BUG else ns0 - n0
            if "ub_plus_1" in BUG:
                ub += 1
            first = FULL if ub >= 32 else (0 if ub <= 0 else (1 << ub) - 1)
            c0 = popc(mask & first) + (1 if "c0_plus_1" in BUG else 0)
        ki = self.kidx[buf]
        m2 = 0
        for lane in range(32):
            pos = popc(mask & ((1 << lane) - 1))
            if js[lane] >= 0:
                ki[pos] = (js[lane], n0)  # (key, chunk tag)
            if in2[lane]:  # __reduce_or_sync of in2 ? 1 << pos : 0
                m2 |= 1 << (lane if "dd_m2_lanes" in BUG else pos)
        if self.dd:
            c0 = (c0, m2)
        cnt = popc(mask)
        gen = n0 // KC
        if cnt > 0:  # LEAN copy loop
            geo, reads = lean_copy_geometry(self.D, KC, cnt)
            for r in reads:
                _ = ki[r]  # read, used only below cnt
            dst = self.rows[buf ^ 1 if "same_buffer" in BUG and gen > 0 else buf]
            for r, (src, full) in enumerate(geo):
                if src == "stale":
                    entry = ki[cnt] if cnt < KC else GARBAGE
                else:
                    entry = ki[src]
                assert entry != GARBAGE, "a row's address from an unwritten kidx entry"
                key, tag = entry
                assert tag == n0, "a row's address from a stale kidx entry"
                assert 0 <= key < self.pol.kv_len, "row address outside the K / V tensors"
                if full:
                    assert src == r
                    dst[r] = ("key", key, gen)
                else:
                    dst[r] = ("zero", key, gen)
        self.issued += 1
        return cnt, c0

    def chunks(self):
        """for_each_chunk: (ch, cnt, c0, staged rows) of each body that runs, in order."""
        KC = self.KC
        out = []
        if self.qbits == 0:
            return out
        n_chunks = (self.n_slots + KC - 1) // KC
        c0 = c0_next = 0
        cnt = 0
        if n_chunks > 0:
            cnt, c0 = self.issue(0, 0)
        for ch in range(n_chunks):
            buf = ch & 1
            cnt_next = 0
            if ch + 1 < n_chunks:
                cnt_next, c0_next = self.issue((ch + 1) * KC, buf ^ 1)
            if cnt > 0:
                cz = cnt if self.qpw == 1 else (c0_next if "c0_not_pipelined" in BUG else c0)
                if self.dd and "dd_m2_not_pipelined" in BUG and ch + 1 < n_chunks:
                    cz = (cz[0], c0_next[1])
                staged = list(self.rows[buf])
                # Every row of an executed tile (t * 16 < cnt) was written by this chunk.
                for r in range(16 * ((cnt + 15) // 16)):
                    assert staged[r] is not None and staged[r][2] == ch, \
                        f"chunk {ch}: tile row {r} not staged by this chunk (stale or in flight)"
                out.append((ch, cnt, cz, staged))
            cnt = cnt_next
            c0 = c0_next
        return out


# ---- (4) column masks, lane by lane ---------------------------------------------------------
@functools.lru_cache(maxsize=None)
def column_positions(kind, hpw, qpw, KC, cnt, c0):
    """The chunk positions each column n < 8 takes, from every lane's (gid, tig) accumulator
    elements of the executed tiles: fwd (score mask and p) or dQ (dS mask)."""
    NR = hpw * qpw
    KT = KC // 16
    dd = isinstance(c0, tuple)  # TcWarp DD: (c0, m2), column masks are bit sets
    if dd:
        c0, m2 = c0
        c0m = (1 << min(c0 + (1 if "dd_c0mask_plus1" in BUG else 0), 32)) - 1
    cols = [[] for _ in range(8)]
    owner = {}
    for lane in range(32):
        gid, tig = lane >> 2, lane & 3
        for j in range(2):
            n = 2 * tig + j
            if kind == "fwd":
                cq = n // hpw
                if "pad_col_keys" in BUG:
                    cq = min(cq, 1)
                lo = 0 if qpw == 1 else (c0 if cq == 1 else 0)
                hi = cnt if qpw == 1 else (c0 if cq == 0 else (cnt if cq == 1 else 0))
            else:
                cq = n // hpw if n < NR else qpw
                if cq >= qpw:
                    lo = hi = 0
                elif qpw == 1:
                    lo, hi = 0, cnt
                else:
                    lo = 0 if cq == 0 else c0
                    hi = c0 if cq == 0 else cnt
            for t in range(KT):
                for e in range(4):
                    if e & 1 != j:
                        continue
                    key = t * 16 + gid + (e >> 1) * 8
                    assert (n, key) not in owner
                    owner[(n, key)] = lane
                    if dd:
                        cq_ = cq if kind == "fwd" else (n // hpw if n < NR else qpw)
                        cm = (c0m if cq_ == 0 else (m2 if cq_ == 1 else 0)) >> gid
                        inside = (cm >> (t * 16 + (e >> 1) * 8)) & 1 == 1
                    else:
                        inside = lo <= key < hi
                    if inside:
                        # fwd: an in-range score in a skipped tile would enter the chunk max
                        # as 0 (sc left 0) without a p: must not happen.
                        assert t * 16 < cnt, "in-range position in a skipped tile"
                        cols[n].append(key)
    assert len(owner) == 8 * KC
    return tuple(tuple(sorted(c)) for c in cols)


def column_keys(bodies, kind, hpw, qpw, KC):
    """Per column: [(chunk, position, key)] over the bodies."""
    cols = [[] for _ in range(8)]
    for ch, cnt, c0, staged in bodies:
        pos = column_positions(kind, hpw, qpw, KC, cnt, c0)
        for n in range(8):
            for p in pos[n]:
                kind_, key, gen = staged[p]
                assert kind_ == "key" and gen == ch, "a column takes a zero-filled row"
                cols[n].append((ch, p, key))
    return cols


# ---- (5) softmax replays ------------------------------------------------------------------
def softmax64(bodies, pos_of, score, value, KC):
    """The forward's per-column chunk step in float64 (cmax over the column's positions,
    msub, alpha, p of the executed tiles); zero-filled rows have value 0."""
    KT = KC // 16
    m, lsum, o = -np.inf, 0.0, 0.0
    for (ch, cnt, c0, staged), pos in zip(bodies, pos_of):
        ps = set(pos)
        x = [score[staged[r][1]] if r in ps else -np.inf for r in range(KT * 16)]
        mn = max(m, max(x))
        msub = 0.0 if mn == -np.inf else mn
        alpha = np.exp2(m - msub)
        before = (m, lsum, o)
        m = mn
        lsum *= alpha
        o *= alpha
        for r in range(16 * ((cnt + 15) // 16)):
            p = np.exp2(x[r] - msub)
            lsum += p
            o += p * (value[staged[r][1]] if staged[r][0] == "key" else 0.0)
        if not ps:  # a chunk without a key of this column changes nothing
            assert (m, lsum, o) == before or (m == -np.inf and lsum == 0.0 and o == 0.0)
    return (o / lsum if lsum > 0 else 0.0), (m + np.log2(lsum) if lsum > 0 else -np.inf)


F32 = np.float32


def bf16(x):
    """Round a float32 to bfloat16 (nearest even), returned as float32 (pack2 of P / dS)."""
    u = int(np.array(x, dtype=np.float32).view(np.uint32))
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return np.array(u, dtype=np.uint32).view(np.float32)[()]


def ex2(x):
    """fast_exp2 (ex2.approx.ftz.f32) as the replay assumes it: exp2(0) = 1 and exp2(-inf) = 0
    exactly (the planted bug ex2_zero_inexact breaks the first)."""
    if "ex2_zero_inexact" in BUG and x == 0:
        return np.nextafter(F32(1.0), F32(0.0))
    return np.exp2(x)


def fwd32(bodies, pos_of, score, value, KC, qsc):
    """The forward of one column in float32 as the kernel orders it: x = s * qsc, chunk max,
    msub, alpha = exp2(m - msub), lp per lane gid (keys gid, gid + 8 of each executed tile),
    o += tile sum of bf16(p) v (sequential, keys 0..15), l = xor-4/8/16 butterfly."""
    KT = KC // 16
    m = F32(-np.inf)
    lp = [F32(0.0)] * 8
    o = F32(0.0)
    for (ch, cnt, c0, staged), pos in zip(bodies, pos_of):
        ps = set(pos)
        x = [F32(score[staged[r][1]]) * qsc if r in ps else F32(-np.inf) for r in range(KT * 16)]
        cmax = max(x)
        mn = max(m, cmax)
        msub = F32(0.0) if mn == -np.inf else mn
        alpha = ex2(F32(m - msub))
        m = mn
        lp = [v * alpha for v in lp]
        o = o * alpha
        for t in range(KT):
            if t * 16 >= cnt:
                continue
            p = [ex2(F32(x[t * 16 + r] - msub)) for r in range(16)]
            for e in range(4):
                if e & 1 == 0:  # this column's accumulator elements: keys gid, gid + 8
                    for gid in range(8):
                        lp[gid] = lp[gid] + p[gid + (e >> 1) * 8]
            acc = F32(0.0)
            for r in range(16):
                row = staged[t * 16 + r]
                v = F32(value[row[1]]) if row[0] == "key" else F32(0.0)
                acc = acc + bf16(p[r]) * v
            o = o + acc
    for o2 in (1, 2, 4):  # lanes xor 4, 8, 16 = gid xor 1, 2, 4
        lp = [lp[g] + lp[g ^ o2] for g in range(8)]
    ll = lp[0]
    inv = F32(1.0) / ll if ll > 0 else F32(0.0)
    return o * inv, (m + np.log2(ll) if ll > 0 else F32(-np.inf))


def fma32(a, b, c):
    """fmaf for these operands: the product exact in float64, one rounding to float32 (a
    double rounding in float64 first is ignored)."""
    return F32(float(a) * float(b) + float(c))


def dq32(bodies, pos_of, score, dpv, krow, KC, qsc, lse2, dlt):
    """dQ of one column in float32: dS = exp2(fma(s, qsc, -lse2)) (dp - dlt) on the column's
    positions, 0 elsewhere; dq += tile sum of bf16(dS) k (sequential)."""
    KT = KC // 16
    dq = F32(0.0)
    for (ch, cnt, c0, staged), pos in zip(bodies, pos_of):
        ps = set(pos)
        for t in range(KT):
            if t * 16 >= cnt:
                continue
            acc = F32(0.0)
            for r in range(16):
                p = t * 16 + r
                row = staged[p]
                if p in ps:
                    ds = np.exp2(fma32(score[row[1]], qsc, -lse2)) * (F32(dpv[row[1]]) - dlt)
                else:
                    ds = F32(0.0)
                k = F32(krow[row[1]]) if row[0] == "key" else F32(0.0)
                acc = acc + bf16(ds) * k
            dq = dq + acc
    return dq


def same_bits(a, b):
    bits = [np.array(x, dtype=np.float32).view(np.uint32) for x in (a, b)]
    return bits[0] == bits[1]


def rowsum_orders(rng, n_rows=400):
    """delta's rowsum(dO * O) in float32: the QPW = 1 order (lane d sums d, d + 32, ..., then
    xor 16, 8, 4, 2, 1) against group_rowsum (lane pc sums 8-element pieces pc, pc + 4, ...,
    then xor 1, 2). Returns {D: rows whose bits differ}."""
    diff = {}
    for D in (16, 32, 64, 128):
        n = 0
        for _ in range(n_rows):
            do = [bf16(F32(rng.gauss(0, 1))) for _ in range(D)]
            oo = [bf16(F32(rng.gauss(0, 1))) for _ in range(D)]
            xs = []
            for lane in range(32):
                s = F32(0.0)
                for d in range(lane, D, 32):
                    s = fma32(do[d], oo[d], s)
                xs.append(s)
            for o2 in (16, 8, 4, 2, 1):
                xs = [xs[ln] + xs[ln ^ o2] for ln in range(32)]
            a = xs[0]
            ys = []
            for pc in range(4):
                s = F32(0.0)
                for c in range(pc, D // 8, 4):
                    for e in range(8):
                        s = fma32(do[c * 8 + e], oo[c * 8 + e], s)
                ys.append(s)
            for o2 in (1, 2):
                ys = [ys[ln] + ys[ln ^ o2] for ln in range(4)]
            ref = float(np.dot(np.array(do, dtype=np.float64), np.array(oo, dtype=np.float64)))
            assert abs(float(a) - ref) <= 1e-5 * max(1.0, abs(ref)) * D
            assert abs(float(ys[0]) - ref) <= 1e-5 * max(1.0, abs(ref)) * D
            n += 0 if same_bits(a, ys[0]) else 1
        diff[D] = n
    return diff


# ---- one pair ------------------------------------------------------------------------------
def run_pair(pol, i, L, D, rng, stats, f32=False, dd=False):
    KC = kc_of(D)
    w = PairWarp(pol, i, L, D, QPW, dd)
    bodies = w.chunks()
    wants = [pol.design(i + q) if i + q < L else set() for q in range(QPW)]
    if w.qbits == 0:
        assert not any(wants)
        stats["empty_pairs"] += 1
        return
    if dd:
        # Dedupe: every staged key once (the union of the two queries' keys), no more chunks
        # than the pairs without dedupe; query i's part as before.
        staged = [st[r][1] for _, cnt, _, st in bodies for r in range(cnt)]
        assert len(staged) == len(set(staged)), ("dedupe: a key staged twice", i)
        assert set(staged) == wants[0] | wants[1], ("dedupe: staged != union", i)
        plain = PairWarp(pol, i, L, D, QPW).chunks()
        assert len(bodies) <= len(plain), ("dedupe: more chunks", i, len(bodies), len(plain))
        assert w.ns0 == (pol.fwd_slots(i) if w.qbits & 1 else 0)
        stats["dd_chunks"] += len(bodies)
        stats["plain_chunks"] += len(plain)
        stats["dd_rows"] += len(staged)
        stats["plain_rows"] += sum(cnt for _, cnt, _, _ in plain)
    if w.qbits != 3:
        stats["one_query"] += 1
    for hpw in (4, 2, 1):
        NR = hpw * QPW
        for kind in ("fwd", "dq"):
            cols = column_keys(bodies, kind, hpw, QPW, KC)
            for n in range(8):
                keys = [k for _, _, k in cols[n]]
                assert len(keys) == len(set(keys)), f"{kind} column {n}: a key twice"
                if n >= NR:
                    assert not keys, f"{kind} padding column {n} has keys"
                    continue
                q = n // hpw
                assert set(keys) == wants[q], (kind, hpw, n, i + q, sorted(set(keys) ^ wants[q]))
                assert not keys or w.qbits >> q & 1  # a zero Q row would score 0, not -inf
            stats["columns"] += 8
    cols = column_keys(bodies, "fwd", 1, QPW, KC)  # HPW = 1: column q is query i + q
    for q in range(QPW):
        if not w.qbits >> q & 1:
            continue
        # One query per warp (QPW = 1) for the same query.
        alone = PairWarp(pol, i + q, L, D, 1)
        ab = alone.chunks()
        a_cols = column_keys(ab, "fwd", 1, 1, KC)[0]
        mine = [(ch, p, k) for ch, p, k in cols[q]]
        if q == 0:
            assert mine == a_cols, ("first query: chunks / positions differ from QPW = 1", i)
        elif not dd:
            shift = w.ns0 // KC
            same = mine == [(ch + shift, p, k) for ch, p, k in a_cols]
            if w.ns0 % KC == 0:
                assert same, ("second query, ns0 % KC == 0: positions differ", i, w.ns0)
                stats["second_aligned"] += 1
            else:
                stats["second_shifted"] += 1
                stats["second_shifted_same"] += 1 if same else 0
        # float64 online softmax against a dense softmax over the DESIGN keys.
        score = {k: rng.uniform(-8, 8) for k in range(pol.kv_len)}
        value = {k: rng.uniform(-1, 1) for k in range(pol.kv_len)}
        pos_of = [column_positions("fwd", 1, QPW, KC, cnt, c0)[q] for _, cnt, c0, _ in bodies]
        o, lse = softmax64(bodies, pos_of, score, value, KC)
        ks = sorted(wants[q])
        if ks:
            s = np.array([score[k] for k in ks])
            e = np.exp2(s - s.max())
            o_ref = float((e * np.array([value[k] for k in ks])).sum() / e.sum())
            lse_ref = float(np.log2(e.sum()) + s.max())
            assert abs(o - o_ref) <= 1e-9 and abs(lse - lse_ref) <= 1e-9, (o, o_ref, lse, lse_ref)
        else:
            assert o == 0.0 and lse == -np.inf
        stats["softmax"] += 1
        stats["extra_chunks"] += sum(1 for p in pos_of if not p)
        if f32 and q == 0:
            # The first query, float32: pair == one query per warp, forward and dQ (same
            # lse2 / delta), bit for bit.
            qsc = F32(0.125 * 1.4426950408889634)
            a_pos = [column_positions("fwd", 1, 1, KC, cnt, c0)[0] for _, cnt, c0, _ in ab]
            po, pl = fwd32(bodies, pos_of, score, value, KC, qsc)
            ao, al = fwd32(ab, a_pos, score, value, KC, qsc)
            assert same_bits(po, ao) and same_bits(pl, al), ("fwd32", i, po, ao, pl, al)
            lse2 = F32(pl) if np.isfinite(pl) else F32(-np.inf)
            dlt = F32(rng.uniform(-1, 1))
            dpv = {k: rng.uniform(-2, 2) for k in range(pol.kv_len)}
            krow = {k: rng.uniform(-1, 1) for k in range(pol.kv_len)}
            pd = [column_positions("dq", 1, QPW, KC, cnt, c0)[0] for _, cnt, c0, _ in bodies]
            ad = [column_positions("dq", 1, 1, KC, cnt, c0)[0] for _, cnt, c0, _ in ab]
            assert same_bits(dq32(bodies, pd, score, dpv, krow, KC, qsc, lse2, dlt),
                             dq32(ab, ad, score, dpv, krow, KC, qsc, lse2, dlt)), ("dq32", i)
            stats["f32"] += 1
    stats["pairs"] += 1
    stats["chunks"] += len(bodies)


def padding(rng, L, pad):
    if pad == "right":
        end = rng.randrange(1, L + 1)
        return [j < end for j in range(L)]
    if pad == "left":
        start = rng.randrange(0, L)
        return [j >= start for j in range(L)]
    if pad == "random":
        return [rng.random() < 0.7 for _ in range(L)]
    return [True] * L


def pair_starts(rng, L, n_sample):
    n_pairs = (L + 1) // 2
    if n_pairs <= n_sample + 2:
        return range(0, L, 2)
    picks = {0, 2 * (n_pairs - 1), 2 * (n_pairs // 2)}
    picks |= {2 * p for p in rng.sample(range(n_pairs), n_sample)}
    return sorted(picks)


WIN_LS = ((1, 2, 3, 4, 5, 16, 17), (33, 40, 41, 97, 200))  # one of each per case
PADS = ("none", "right", "left", "random")


def new_stats():
    return dict(pairs=0, chunks=0, columns=0, softmax=0, f32=0, empty_pairs=0, one_query=0,
                second_aligned=0, second_shifted=0, second_shifted_same=0, extra_chunks=0,
                cases=0, dd_chunks=0, plain_chunks=0, dd_rows=0, plain_rows=0, dd_pairs=0,
                dd_off_cases=0)


def run_window(rng, stats, windows=range(1, 41), n_sample=6, f32_every=3, Ls=WIN_LS):
    k = 0
    for window, dilated, causal in itertools.product(windows, (False, True), (False, True)):
        for pi, pad in enumerate(PADS):
            for li, ls in enumerate(Ls):
                L = ls[(k + pi) % len(ls)]
                D = (16, 64, 32, 128)[(k + pi + li) % 4]
                valid = Valid(padding(rng, L, pad))
                pol = WindowPolicy(L, window, dilated, causal, valid)
                for n, i in enumerate(pair_starts(rng, L, n_sample)):
                    run_pair(pol, i, L, D, rng, stats, f32=(n % f32_every == 0))
                    if pol.pair_ok:
                        run_pair(pol, i, L, D, rng, stats, f32=(n % f32_every == 0), dd=True)
                        stats["dd_pairs"] += 1
                stats["dd_off_cases"] += 0 if pol.pair_ok else 1
                stats["cases"] += 1
        k += 1


def compressed_validity(valid, L, block_len, stride):
    T = -(-L // stride)
    out = []
    for t in range(T):
        s, e = max(0, (t + 1) * stride - block_len), min(L, (t + 1) * stride)
        out.append(any(valid[s:e]))
    return out


def run_compressed(rng, stats, Ls=(1, 2, 3, 5, 16, 17, 33, 97, 200), strides=(1, 2, 3, 4, 16),
                   n_sample=5, f32_every=3):
    k = 0
    for L, stride, causal in itertools.product(Ls, strides, (False, True)):
        for pi, pad in enumerate(PADS):
            T = -(-L // stride)
            if stride == 1 and L > 100:
                continue  # 400 slots per pair: slow in Python, nothing new
            vb = padding(rng, L, pad)
            mode = (k + pi) % 3
            if mode == 2:
                vc = [rng.random() < 0.7 for _ in range(T)]
            else:
                vc = compressed_validity(vb, L, stride * (1 + mode), stride)
            pol = CompressedPolicy(L, T, stride, causal, Valid(vb), Valid(vc))
            D = (64, 16, 128, 32)[(k + pi) % 4]
            for n, i in enumerate(pair_starts(rng, L, n_sample)):
                run_pair(pol, i, L, D, rng, stats, f32=(n % f32_every == 0))
                run_pair(pol, i, L, D, rng, stats, f32=(n % f32_every == 0), dd=True)
                stats["dd_pairs"] += 1
            stats["cases"] += 1
        k += 1


# ---- (6) planted bugs ----------------------------------------------------------------------
# Source mutations (on an in-memory copy of attn_staged_tc.cuh): each must break an anchor, so
# that a change of the modelled lines cannot pass unnoticed by this replay.
SOURCE_PLANTS = [
    ("*c0_out = __popc(mask & first);", "*c0_out = __popc(mask & first) + 1;"),
    ("const int64_t ub = ns0 - n0;", "const int64_t ub = ns0;"),
    ("if (QPW > 1 && i0 + q >= L) continue;", ""),
    ("pol.fwd_slots(b, i + 1, g) : 0);", "pol.fwd_slots(b, i, g) : 0);"),
    ("(cq[j] == 1 ? cnt : 0));", "cnt);"),
    ("c0 = c0_next;", ""),
    ("gw + q * HPW + hh);", "gw + hh);"),
    ("second ? n - ns0 : n)", "n)"),
    ("if (HPW <= 4 && slot_pairs_on(true)) {", "if (HPW <= 8 && slot_pairs_on(true)) {"),
    ("tb = static_cast<int>(a >= 0 ? first - 1 : first);", "tb = static_cast<int>(first);"),
    ("in2 = (j >= 0) & (second | (both & att));", "in2 = (j >= 0) & (second | att);"),
    ("const unsigned bit2 = in2 ? 1u << pos : 0u;", "const unsigned bit2 = in2 ? 1u << lane : 0u;"),
    ("m2 = m2_next;", ""),
    ("(cq[j] == 1 ? m2 : 0u)", "(cq[j] == 1 ? m2 : 1u)"),
]
POLICY_PLANTS = [
    ("sliding_window_attention.cu", "if (causal ? d < 0 : false) return false;", ""),
    ("sliding_window_attention.cu", "const bool side = causal ? d >= 0 : true;",
     "const bool side = true;"),
    ("sliding_window_attention.cu", "(1 << pol.p0) : 0x7fffffff;", "(2 << pol.p0) : 0x7fffffff;"),
    ("sliding_window_attention.cu", "if (near(causal ? o - 1 : -(o + 1))) continue;",
     "if (near(causal ? o + 1 : -(o + 1))) continue;"),
    ("compressed_attention.cu", "first = fwd_slots(b, i, g);", "first = fwd_slots(b, i + 1, g);"),
    ("compressed_attention.cu", "return true;", "return !causal;"),
]


GATE_PLANTS = [
    ("const int n = lane & 7, r = lane >> 3;", "const int n = lane & 3, r = lane >> 2;"),
    ("w[r * 8 + n] =", "w[r * 4 + n] ="),
    ("&& i0 + q < L) {", ") {"),
]


def check_source_plants():
    with open(CUH) as fh:
        src = fh.read()
    with open(GATE_CUH) as fh:
        gsrc = fh.read()
    for old, new in GATE_PLANTS:  # the anchors of attn_gate_epilogue.cuh, on a patched copy
        assert old in gsrc, old
        patched = gsrc.replace(old, new, 1)
        try:
            check_anchors("attn_gate_epilogue.cuh", patched, GATE_ANCHORS)
        except AssertionError:
            continue
        raise AssertionError(f"source mutation not caught: {old!r} -> {new!r}")
    for old, new in SOURCE_PLANTS:
        assert old in src, old
        try:
            check_source_anchors(src.replace(old, new, 1))
        except AssertionError:
            continue
        raise AssertionError(f"source mutation not caught: {old!r} -> {new!r}")
    for f, old, new in POLICY_PLANTS:
        with open(os.path.join(os.path.dirname(CUH), f)) as fh:
            psrc = fh.read()
        assert old in psrc, old
        try:
            check_source_anchors(policy_src={f: psrc.replace(old, new, 1)})
        except AssertionError:
            continue
        raise AssertionError(f"policy mutation not caught: {f}: {old!r} -> {new!r}")
    return len(SOURCE_PLANTS) + len(POLICY_PLANTS) + len(GATE_PLANTS)


PLANTED = {
    "c0_plus_1": "c0 = popc(mask & first) + 1",
    "ub_plus_1": "lane bound ns0 - n0 + 1 (one lane of query i + 1 counted for query i)",
    "ns0_wrong_query": "ns0 = fwd_slots(i + 1), then fwd_slots(i)",
    "ns0_lanes": "first = lanes below ns0 instead of ns0 - n0",
    "second_slot_n": "query i + 1 enumerated at slot n instead of n - ns0",
    "c0_not_pipelined": "body gets the c0 of the chunk issued ahead",
    "pad_col_keys": "forward padding columns take query i + 1's positions",
    "no_L_skip": "epilogues without the i + q >= L skip",
    "qbits_no_L": "group_query_bits without i + q < L",
    "zero_fill_stale": "rows past cnt read kidx[cnt] (stale) instead of kidx[cnt - 1]",
    "no_delta_zero": "dQ without delta = 0 for the padded row of an active pair",
    "same_buffer": "issue ahead writes the buffer being computed",
    "ex2_zero_inexact": "fast_exp2(0) one ulp below 1 (alpha of a chunk without the column's keys)",
    "dd_tb_no_dec": "dedupe: tb = first also with a single slot a (tail slots shifted by one)",
    "dd_ta_ignored": "dedupe: the tail's single slot a dropped (ta = tb)",
    "dd_attends_i": "dedupe: query i's entries tested with pair_attends(i) instead of i + 1",
    "dd_no_both": "dedupe: query i's entries marked for i + 1 also when i + 1 does not attend",
    "dd_m2_lanes": "dedupe: m2 from lane bits instead of compacted positions",
    "dd_m2_not_pipelined": "dedupe: body gets the m2 of the chunk issued ahead",
    "dd_c0mask_plus1": "dedupe: query i's column mask (1 << (c0 + 1)) - 1",
    "dd_near_no_causal": "dedupe: near() without the causal sign test (distance -1 shared)",
    "dd_cmp_tail_from_i1": "dedupe: compressed tail starts at fwd_slots(i + 1) (no extra token)",
    "dd_pow_lo_x2": "dedupe: pow_lo32 = 2^(p0 + 1) (the first dilation distance not shared)",
    "dd_cmp_attends_false": "dedupe: compressed pair_attends false (query i + 1 loses i's tokens)",
    "gate_row_L1": "gated forward's flat row with a stride of L + 1 queries per batch entry",
    "gate_w_n4": "gate weights staged by lane & 3 / lane >> 2 (rows 4 - 7 never staged)",
}


def planted_suite(rng):
    stats = new_stats()
    check_pair_epilogues(rng)
    run_window(rng, stats, windows=(1, 3, 8, 17), n_sample=3, f32_every=2, Ls=((3, 17), (40, 41)))
    run_compressed(rng, stats, Ls=(5, 17, 33), strides=(2, 3), n_sample=3, f32_every=2)


def check_planted():
    caught = {}
    for bug in PLANTED:
        BUG.clear()
        BUG.add(bug)
        column_positions.cache_clear()
        lean_copy_geometry.cache_clear()
        try:
            planted_suite(random.Random(5))
        except (AssertionError, IndexError, TypeError, KeyError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            caught[bug] = msg[:90]
        finally:
            BUG.clear()
            column_positions.cache_clear()
            lean_copy_geometry.cache_clear()
        assert bug in caught, f"planted bug not caught: {bug} ({PLANTED[bug]})"
    return caught


def brief_chunk_counts():
    """Chunks per pair for the default window (8, dilated, causal), no padding, a pair in the
    middle: (L, KC) -> (plain pairs, dedupe, slots plain, slots dedupe)."""
    out = {}
    for L, D in ((4096, 64), (16384, 64), (4096, 16), (16384, 16)):
        pol = WindowPolicy(L, 8, True, True, Valid([True] * L))
        assert pol.pair_ok
        i = L // 2
        pl = PairWarp(pol, i, L, D, QPW)
        dd = PairWarp(pol, i, L, D, QPW, dd=True)
        out[(L, kc_of(D))] = (len(pl.chunks()), len(dd.chunks()), pl.n_slots, dd.n_slots)
    for L in (4096, 16384):
        pol = CompressedPolicy(L, L // 16, 16, True, Valid([True] * L), Valid([True] * (L // 16)))
        i = L // 2 + 4
        pl = PairWarp(pol, i, L, 64, QPW)
        dd = PairWarp(pol, i, L, 64, QPW, dd=True)
        out[("cmp", L, 16)] = (len(pl.chunks()), len(dd.chunks()), pl.n_slots, dd.n_slots)
    return out


def window_tail_table():
    """pair_ok and the tail's form for window 1..40 / 100 / 1000, dilated or not, causal or not,
    over several L: dedupe is off only where the tail has another form (none expected)."""
    off = []
    n = 0
    for window in list(range(1, 41)) + [100, 1000]:
        for dilated, causal in itertools.product((False, True), (False, True)):
            for L in (1, 2, 3, 7, 8, 9, 16, 17, 64, 200, 4096):
                pol = WindowPolicy(L, window if window <= L else L, dilated, causal,
                                   Valid([True] * L))
                n += 1
                if not pol.pair_ok:
                    off.append((window, dilated, causal, L, pol.unshared))
    return n, off


def main() -> int:
    from emulate_staged_blk import check_collectives_source
    n_files = check_collectives_source()
    print(f"lint: no warp collective in a short-circuit operand ({n_files} csrc/cuda files)")
    cc = brief_chunk_counts()
    for k, (a, b, sa, sb) in cc.items():
        print(f"  chunks per pair {k}: plain {a} ({sa} slots) -> dedupe {b} ({sb} slots)")
    assert cc[(4096, 16)][:2] == (3, 2) and cc[(16384, 16)][:2] == (3, 2)
    n_t, off = window_tail_table()
    print(f"window tails: {n_t} (window, dilated, causal, L): dedupe off for {len(off)} {off[:4]}")
    n_anchor = check_source_anchors()
    n_launch, table = check_launcher()
    print(f"launcher: {n_launch} (dq, D, G, vec, env, stride, warps, dtype, block chunks) cases: "
          f"pairs exactly on the LEAN path with HPW <= 4 and the switches on; {n_anchor} source "
          "anchors found")
    for G in (4, 8):
        row = "; ".join(f"{k[1]} {k[2]}: {v}" for k, v in sorted(table.items()) if k[0] == G)
        print(f"  D=64 G={G}: {row}")
    n_w = check_pair_epilogues(random.Random(1))
    print(f"TcGrid::make(s, HPW, 2) + stage_coords_fast: {n_w} warps (HPW 4/2/1, D 16/128, gated "
          "or not): out, lse, grad_q, delta (0 for padded rows) [+ grad_gate, lse', the "
          "forward's gate.out by its flat row] of every "
          "(b, i, head) once, rows i + 1 >= L skipped")
    rng = random.Random(20261128)
    st = new_stats()
    run_window(rng, st)
    Ls = WIN_LS[0] + WIN_LS[1]
    print(f"window: {st['cases']} cases (window 1..40, dilated, causal, 4 paddings, L in {Ls}), "
          f"{st['pairs']} pairs ({st['one_query']} with one query, {st['empty_pairs']} empty), "
          f"{st['chunks']} chunks (plain + dedupe): every column (fwd, dQ; HPW 4/2/1) == DESIGN, padding columns "
          f"empty; {st['softmax']} float64 softmax ok; {st['f32']} float32 first queries "
          "pair == alone bit for bit (fwd, dQ)")
    print(f"window: second query at the same chunk positions as alone: {st['second_aligned']} with "
          f"ns0 % KC == 0 (all); {st['second_shifted_same']} of {st['second_shifted']} otherwise; "
          f"{st['extra_chunks']} chunks without a key of the column leave it unchanged")
    print(f"window dedupe: {st['dd_pairs']} pairs ({st['dd_off_cases']} cases with pair_ok false): "
          f"each key staged once, the union of both queries; chunks {st['plain_chunks']} -> "
          f"{st['dd_chunks']}, staged rows {st['plain_rows']} -> {st['dd_rows']}")
    sc = new_stats()
    run_compressed(rng, sc)
    print(f"compressed: {sc['cases']} cases (stride 1/2/3/4/16, causal, 4 paddings, derived or "
          f"random token validity), {sc['pairs']} pairs ({sc['one_query']} with one query, "
          f"{sc['empty_pairs']} empty), {sc['chunks']} chunks: columns == DESIGN; "
          f"{sc['softmax']} float64 softmax ok; {sc['f32']} float32 first queries bit for bit")
    print(f"compressed dedupe: {sc['dd_pairs']} pairs: each key once; chunks {sc['plain_chunks']} "
          f"-> {sc['dd_chunks']}, staged rows {sc['plain_rows']} -> {sc['dd_rows']}")
    print(f"compressed: second query at the same positions as alone: {sc['second_aligned']} with "
          f"ns0 % KC == 0 (all); {sc['second_shifted_same']} of {sc['second_shifted']} otherwise")
    diff = rowsum_orders(random.Random(3))
    print("delta rowsum (float32), group_rowsum vs the QPW = 1 butterfly, rows of 400 whose bits "
          "differ: " + ", ".join(f"D={d}: {n}" for d, n in diff.items()))
    n_sp = check_source_plants()
    caught = check_planted()
    print(f"planted bugs: {len(caught)} of {len(PLANTED)} caught by the replay; {n_sp} of "
          f"{len(SOURCE_PLANTS) + len(POLICY_PLANTS) + len(GATE_PLANTS)} source mutations caught by the anchors")
    for bug, msg in caught.items():
        print(f"  {bug} ({PLANTED[bug]}): {msg}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
