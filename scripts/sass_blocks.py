"""Where a kernel's executed instructions go, basic block by basic block.

Input: the (optionally gzipped) CSV of `ncu -i report.ncu-rep --page source --print-source sass
--csv` for a report taken with the SourceCounters section (scripts/ncu_blossom.sh NCU_SOURCE=1
writes one as src_<kernel>.csv.gz). Consecutive SASS lines with the same execution count form a
block; each block prints its offset range, how often it ran, its share of all executed
warp-instructions and its most common opcodes. Blocks that run once per warp against blocks
that run once per chunk say how much of a kernel is fixed per-warp work (prologues,
epilogues, index setup) and how much is its loops.

    python3 scripts/sass_blocks.py src.csv.gz [--top 25] [--warps N]
"""
from __future__ import annotations

import argparse
import collections
import csv
import gzip
import sys


def opcode(sass: str) -> str:
    parts = sass.split()
    if parts and parts[0].startswith("@"):  # predicate guard
        parts = parts[1:]
    return parts[0] if parts else "?"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--warps", type=int, default=0,
                    help="warps launched: also print executed instructions per warp")
    args = ap.parse_args()
    opener = gzip.open if args.csv.endswith(".gz") else open
    with opener(args.csv, "rt", newline="") as f:
        rows = list(csv.reader(f))
    # ncu's CSV: a kernel-name line, then the header, then one line per SASS instruction.
    hdr_at = next(i for i, r in enumerate(rows) if "Address" in r and "Source" in r)
    hdr = rows[hdr_at]
    ia, isrc = hdr.index("Address"), hdr.index("Source")
    iex = hdr.index("Instructions Executed")
    lines = []
    for r in rows[hdr_at + 1:]:
        if len(r) <= iex:
            continue
        lines.append((int(r[ia], 16), r[isrc].strip(), int(r[iex].replace(",", "") or 0)))
    if not lines:
        print("no instructions in", args.csv, file=sys.stderr)
        return 1
    total = sum(e for _, _, e in lines)
    base = lines[0][0]
    blocks = []  # [first address, last address, executions, [sass]]
    for a, s, e in lines:
        if blocks and blocks[-1][2] == e:
            blocks[-1][1] = a
            blocks[-1][3].append(s)
        else:
            blocks.append([a, a, e, [s]])
    print(f"{len(lines)} instructions, {total} executed warp-instructions"
          + (f", {total / args.warps:.0f} per warp" if args.warps else ""))
    if args.warps:
        once = sum(e * len(sass) for _, _, e, sass in blocks if e <= args.warps)
        print(f"blocks that ran at most once per warp (fixed per-warp work): "
              f"{100 * once / total:.1f}% of the executed instructions, "
              f"{once / args.warps:.0f} per warp")
    blocks.sort(key=lambda b: -b[2] * len(b[3]))
    for first, last, e, sass in blocks[:args.top]:
        ops = collections.Counter(opcode(s) for s in sass).most_common(6)
        per = f" ({e / args.warps:5.2f} per warp)" if args.warps else ""
        print(f"  {first - base:#07x}-{last - base:#07x} ran {e:9d}{per} x {len(sass):3d} = "
              f"{100 * e * len(sass) / total:5.1f}%  " + " ".join(f"{o}:{n}" for o, n in ops))
    return 0


if __name__ == "__main__":
    sys.exit(main())
