"""scripts/sass_lines.py: executed instructions charged to source lines and functions.

The script joins Nsight Compute's per-SASS counters with `nvdisasm -g` output. Both are
synthesised here (the formats the GPU runs produce), so the join, the choice of the kernel's
function by opcode sequence and the per-function totals are checked without a GPU, against
a small source tree whose functions sit at known lines.
"""
from __future__ import annotations

import csv
import gzip
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SCRIPT = os.path.join(ROOT, "scripts", "sass_lines.py")

# Two functions; the kernel profiled is the second (its opcodes: MOV, IMAD, HMMA, EXIT).
SASS = """\
\t.section\t.text._Z5otherv,"ax",@progbits
\t//## File "/x/csrc/cuda/common.cuh", line 5
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   EXIT ;
\t.section\t.text._Z6kernelv,"ax",@progbits
\t//## File "/x/csrc/cuda/common.cuh", line 3
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   IMAD R2, R3, R4, R5 ;
\t//## File "/x/csrc/cuda/staged.cuh", line 5
        /*0020*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
\t//## File "/x/csrc/cuda/common.cuh", line 3
        /*0030*/                   EXIT ;
"""

HEADER = ["Address", "Source", "Warp Stall Sampling (All Samples)", "Instructions Executed"]
ROWS = [  # address, source, stall samples, executed warp-instructions
    ("0x7f0000000000", "MOV R1, c[0x0][0x28]", "1", "10"),
    ("0x7f0000000010", "IMAD R2, R3, R4, R5", "3", "10"),
    ("0x7f0000000020", "HMMA.16816.F32.BF16 R4, R8, R12, R4", "6", "60"),
    ("0x7f0000000030", "EXIT", "0", "10"),
]


# The source tree the line numbers refer to: fast_exp2's body holds line 3 of common.cuh,
# TcWarp::issue line 4 of staged.cuh (a member, named with its struct).
COMMON = """// a comment naming __device__ int not_a_function(
__device__ __forceinline__ float fast_exp2(float x) {
  return x;
}
"""
STAGED = """template <int N>
struct TcWarp {
  int n;
  __device__ __forceinline__ int issue(int k) const {
    return k;
  }
};
__device__ __forceinline__ void free_function() {
}
"""


def write_inputs(tmp_path, rows=ROWS):
    (tmp_path / "csrc" / "cuda").mkdir(parents=True)
    (tmp_path / "csrc" / "cuda" / "common.cuh").write_text(COMMON)
    (tmp_path / "csrc" / "cuda" / "staged.cuh").write_text(STAGED)
    src = tmp_path / "src.csv.gz"
    with gzip.open(src, "wt", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Kernel Name", "void kernel()"])
        w.writerow(HEADER)
        w.writerows(rows)
    sass = tmp_path / "sass.txt.gz"
    with gzip.open(sass, "wt") as f:
        f.write(SASS)
    return str(src), str(sass)


def run(tmp_path, *args):
    return subprocess.run([sys.executable, SCRIPT, *args, "--src", str(tmp_path / "csrc")],
                          capture_output=True, text=True)


def test_lines_and_functions_are_summed_per_warp(tmp_path):
    src, sass = write_inputs(tmp_path)
    r = run(tmp_path, src, sass, "--warps", "10", "--lines")
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    # 90 executed warp-instructions over 10 warps; 10 stall samples.
    assert "4 SASS instructions, 9 executed warp-instructions (per warp), 10 stall samples" in out
    fn = out.split("by function")[1].split("by source line")[0]
    # staged.cuh line 5 lies in TcWarp::issue: 6 of 9 per warp, 66.7% of the instructions
    # and 60% of the samples.
    assert "6.0  66.7%  60.0%  staged.cuh: TcWarp::issue" in fn
    # common.cuh line 3 is fast_exp2's body (the comment above it names no function): MOV +
    # IMAD + EXIT = 3 per warp, 4 samples.
    assert "3.0  33.3%  40.0%  common.cuh: fast_exp2" in fn
    lines = out.split("by source line")[1]
    assert "6.0  66.7%  60.0%  staged.cuh:5" in lines
    assert "3.0  33.3%  40.0%  common.cuh:3" in lines


def test_refuses_a_disassembly_of_another_build(tmp_path):
    rows = list(ROWS)
    rows[1] = ("0x7f0000000010", "IADD3 R2, R3, R4, R5", "3", "10")  # not in any function
    src, sass = write_inputs(tmp_path, rows)
    r = run(tmp_path, src, sass)
    assert r.returncode == 1
    assert "no function of the disassembly has the CSV's opcode sequence" in r.stdout
