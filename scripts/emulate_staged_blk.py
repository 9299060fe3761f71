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

Edge cases: L not a multiple of 16 (and of the block size), causal / not, -1, repeated,
out-of-range (>= C, < -1) and own-block entries, blocks after i (causal), left / right / random
padding, block sizes 16, 32, 64, n = 1 .. 31, queries near the causal edge.

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


def run_case(rng, L, bs, n, causal, pad, n_queries):
    C = -(-L // bs)
    valid = [True] * L
    if pad == "right":
        end = rng.randrange(1, L + 1)
        valid = [j < end for j in range(L)]
    elif pad == "left":
        start = rng.randrange(0, L)
        valid = [j >= start for j in range(L)]
    elif pad == "random":
        valid = [rng.random() < 0.7 for _ in range(L)]
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
        if want:
            ks = np.array(sorted(want))
            e = np.exp2(scores[ks] - scores[ks].max())
            o_ref = float((e * ks).sum() / e.sum())
            lse_ref = float(np.log2(e.sum()) + scores[ks].max())
            assert abs(o - o_ref) <= 1e-9 * max(1.0, abs(o_ref)) and abs(lse - lse_ref) <= 1e-9
        else:
            assert o == 0.0 and lse == -np.inf
        checked += 1
    return checked


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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
