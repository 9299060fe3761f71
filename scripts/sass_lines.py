"""Executed instructions and stall samples of one kernel per CUDA source line and function.

scripts/sass_blocks.py splits a kernel into SASS basic blocks; this says which source lines
(and which functions of csrc/cuda) those instructions come from, so that a "diet" can aim at
code instead of addresses. Inputs, both from scripts/ncu_blossom.sh with NCU_SOURCE=1:
  * src_<kernel>.csv.gz: `ncu --page source --print-source sass --csv` of a report with the
    SourceCounters section (executed instructions and stall samples per SASS instruction);
  * sass_<kernel>.txt.gz: `nvdisasm -g -c` of the extension's cubins (the build carries
    -lineinfo, setup.py), which tags each instruction with its innermost source line.
The kernel's function in the disassembly is the one whose opcode sequence equals the CSV's
(several instantiations share a name prefix), so no mangled name is needed. Inlined code is
charged to its innermost line; the "function" view charges each line to the closest function,
struct or lambda defined above it in its file (a member as Struct::name).

    python3 scripts/sass_lines.py src.csv.gz sass.txt.gz [--warps N] [--top 40] [--lines]
                                  [--src DIR]   (the csrc tree of the profiled build)
"""
from __future__ import annotations

import argparse
import collections
import csv
import gzip
import os
import re
import sys

from sass_blocks import opcode  # scripts/, this script's directory, is on sys.path
from stall_lines import number

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def read_text(path: str) -> str:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", newline="") as f:
        return f.read()


def split_functions(sass_text: str) -> list[str]:
    """The disassembly cut at each function's `.section .text.<name>` line (the text before
    the first one comes first)."""
    return re.split(r"(?m)^(?=\s*\.section\s+\.text\.)", sass_text)


def functions(sass_text: str) -> list[list[tuple[str, tuple[str, int] | None]]]:
    """Per function of the disassembly: [(opcode, (file, line) or None)] in address order."""
    out = []
    for part in split_functions(sass_text):
        where, code = None, []
        for line in part.split("\n"):
            m = re.search(r'//## File "([^"]+)", line (\d+)', line)
            if m:
                where = (os.path.basename(m.group(1)), int(m.group(2)))
                continue
            m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;", line)
            if m:
                code.append((opcode(m.group(1)), where))
        if code:
            out.append(code)
    return out


def enclosing(file: str, cache: dict, src: str) -> list[tuple[int, str]]:
    """(line, name) of every function, struct or lambda defined in src/{cuda,common,.}/file."""
    if file not in cache:
        found = []
        for sub in ("cuda", "common", "."):
            path = os.path.join(src, sub, file)
            if os.path.exists(path):
                owner = ""  # the struct a top-level "struct X {" ... "};" encloses
                with open(path) as f:
                    for n, text in enumerate(f, 1):
                        if text.lstrip().startswith("//"):
                            continue
                        if text.startswith("};"):
                            owner = ""
                        m = re.match(r"(?:struct|class)\s+(\w+)", text)
                        if m and not text.rstrip().endswith(";"):
                            owner = m.group(1) + "::"
                            found.append((n, "struct " + m.group(1)))
                            continue
                        for pat, tag in ((r"(?:__device__|__global__)[^(]*?\b(\w+)\s*\(", owner),
                                         (r"auto\s+(\w+)\s*=\s*\[", "lambda " + owner)):
                            m = re.search(pat, text)
                            if m:
                                found.append((n, tag + m.group(1)))
                break
        cache[file] = found
    return cache[file]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("sass")
    ap.add_argument("--warps", type=float, default=0, help="warps launched: per-warp counts")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--lines", action="store_true", help="also list the top source lines")
    ap.add_argument("--src", default=os.path.join(ROOT, "csrc"),
                    help="source tree the line numbers refer to (default: this checkout's csrc)")
    args = ap.parse_args()

    rows = list(csv.reader(read_text(args.csv).splitlines()))
    head_at = next(i for i, r in enumerate(rows) if "Address" in r and "Source" in r)
    head = rows[head_at]
    body = [r for r in rows[head_at + 1:] if len(r) == len(head)]
    c_src, c_ex = head.index("Source"), head.index("Instructions Executed")
    c_smp = next((i for i, h in enumerate(head) if "Sampling (All" in h), None)
    ops = [opcode(r[c_src]) for r in body]
    match = [f for f in functions(read_text(args.sass)) if [o for o, _ in f] == ops]
    if not match:
        print("no function of the disassembly has the CSV's opcode sequence "
              "(a different build?)")
        return 1
    where = [w for _, w in match[0]]

    per_line: collections.Counter = collections.Counter()
    smp_line: collections.Counter = collections.Counter()
    total = samples = 0.0
    for r, w in zip(body, where):
        n = number(r[c_ex])
        s = number(r[c_smp]) if c_smp is not None else 0.0
        per_line[w] += n
        smp_line[w] += s
        total += n
        samples += s
    scale = 1.0 / args.warps if args.warps else 1.0
    unit = "per warp" if args.warps else "executed"
    print(f"{rows[0][1] if len(rows[0]) > 1 else rows[0][0]}")
    print(f"{len(body)} SASS instructions, {total * scale:.0f} executed warp-instructions "
          f"({unit}), {samples:.0f} stall samples")

    cache: dict = {}
    per_fn: collections.Counter = collections.Counter()
    smp_fn: collections.Counter = collections.Counter()
    for w, n in per_line.items():
        if w is None:
            key = "(no line)"
        else:
            name = "?"
            for at, nm in enclosing(w[0], cache, args.src):
                if at <= w[1]:
                    name = nm
            key = f"{w[0]}: {name}"
        per_fn[key] += n
        smp_fn[key] += smp_line[w]
    print(f"\nby function ({unit}, % of instructions, % of stall samples):")
    for key, n in per_fn.most_common(args.top):
        print(f"  {n * scale:9.1f} {100 * n / total:5.1f}% {100 * smp_fn[key] / max(samples, 1):5.1f}%"
              f"  {key}")
    if args.lines:
        print(f"\nby source line ({unit}, % of instructions, % of stall samples):")
        for w, n in per_line.most_common(args.top):
            print(f"  {n * scale:9.1f} {100 * n / total:5.1f}% "
                  f"{100 * smp_line[w] / max(samples, 1):5.1f}%  {w[0] if w else '-'}:"
                  f"{w[1] if w else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
