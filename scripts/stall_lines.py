"""Summarise Nsight Compute's per-instruction stall sampling of one kernel.

Input: the CSV of `ncu -i report.ncu-rep --page source --print-source sass --csv` for a report
taken with the SourceCounters section. Output: the sampled stalls summed per SASS opcode, and
the instructions with the most samples (address, sampled stalls, the per-reason columns that
are non-zero). Where a kernel spends its warps' time, instruction by instruction, is what
says which dependency chain to break; the per-kernel stall totals do not.

    python3 scripts/stall_lines.py src.csv [--top 40]
"""
from __future__ import annotations

import argparse
import csv
import collections
import sys


def number(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=40)
    args = ap.parse_args()
    with open(args.csv, newline="") as f:
        rows = [r for r in csv.reader(f)]
    # The header is the first row that names the source column.
    head_at = next((n for n, r in enumerate(rows) if "Source" in r), None)
    if head_at is None:
        print("no header with a 'Source' column; first lines:", rows[:3])
        return 1
    head = rows[head_at]
    body = [r for r in rows[head_at + 1:] if len(r) == len(head)]
    col = {name: n for n, name in enumerate(head)}
    samples = next((n for name, n in col.items() if "Sampling (All" in name), None)
    if samples is None:
        print("no 'Warp Stall Sampling (All Samples)' column; columns:", head)
        return 1
    reasons = [(name, n) for name, n in col.items()
               if n != samples and ("stall" in name.lower() or "Samples" in name)]
    total = sum(number(r[samples]) for r in body) or 1.0
    print(f"{len(body)} instructions, {total:.0f} stall samples")
    by_op: collections.Counter = collections.Counter()
    for r in body:
        parts = r[col["Source"]].split()
        op = parts[0] if parts else "?"
        if op.startswith("@") and len(parts) > 1:  # predicate guard
            op = parts[1]
        by_op[op.split(".")[0]] += number(r[samples])
    print("\nsamples per opcode (% of all):")
    for op, v in by_op.most_common(25):
        print(f"  {op:12s} {100 * v / total:5.1f}")
    print(f"\ntop {args.top} instructions by samples:")
    addr = col.get("Address", 0)
    ranked = sorted(body, key=lambda r: -number(r[samples]))[:args.top]
    for r in ranked:
        extra = ", ".join(f"{name}={r[n]}" for name, n in reasons if number(r[n]) > 0)
        print(f"  {r[addr]:>8s} {100 * number(r[samples]) / total:5.2f}%  "
              f"{r[col['Source']].strip()[:60]:60s} {extra[:200]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
