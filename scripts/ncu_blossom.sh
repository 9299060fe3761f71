#!/usr/bin/env bash
# Hardware counters (Nsight Compute) for each kernel of one blossom_attention forward+backward:
# duration, achieved occupancy, and how close each kernel runs to the SM, L1, L2 and DRAM
# ceilings. Says whether a kernel is bound by memory traffic or by latency. GPU machine only.
#   OUT=dir D=64 L=4096 B=16 scripts/ncu_blossom.sh    -> $OUT/ncu.log
#   NCU_KERNEL=select_mma scripts/ncu_blossom.sh         -> full sections of that kernel
#   NCU_SOURCE=1 NCU_KERNEL=select_mma scripts/ncu_blossom.sh -> stall samples per instruction
#     (scripts/stall_lines.py), and $OUT/src_<kernel>.csv.gz for scripts/sass_blocks.py
#     (executed instructions per basic block: fixed per-warp work against loops), the
#     kernel's SASS with line info ($OUT/sass_<kernel>.txt.gz) and what scripts/sass_lines.py
#     makes of both ($OUT/lines_<kernel>.txt: instructions per source line and function)
# --clock-control none leaves the clocks alone (device README); B is kept small so the
# replayed kernels stay quick (per-kernel behaviour does not depend on B at these sizes).
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/.gpu_out}
mkdir -p "$OUT"
cat > /tmp/ncu_step.py <<PY
import torch, blossom_ops
B, L, D = ${B:-16}, ${L:-4096}, ${D:-64}
g = torch.Generator(device="cuda").manual_seed(0)
mk = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
q, k, v, gl = mk(B, L, 8, D), mk(B, L, 2, D), mk(B, L, 2, D), mk(B, L, 8, 2)
o = blossom_ops.blossom_attention(q, k, v, gl)
torch.autograd.grad(o, (q, k, v, gl), torch.randn_like(o))
torch.cuda.synchronize()
PY
if [ -n "${NCU_KERNEL:-}" ] && [ "${NCU_SOURCE:-0}" = 1 ]; then
  # One kernel, per-instruction stall sampling: which SASS lines the warps wait on, summed per
  # opcode and ranked (scripts/stall_lines.py), plus the compressed CSV for a closer look.
  name=${NCU_KERNEL//[^a-zA-Z0-9_]/}
  timeout ${NCU_TIMEOUT:-300} ncu --clock-control none -k "regex:$NCU_KERNEL" -c 1 \
    --section SourceCounters --section WarpStateStats -o "/tmp/rep_$name" -f \
    python3 /tmp/ncu_step.py > /dev/null 2>&1
  echo "rc=$? kernel $NCU_KERNEL (D=${D:-64} L=${L:-4096} B=${B:-16}), source view"
  ncu -i "/tmp/rep_$name.ncu-rep" --page source --print-source sass --csv > "/tmp/src_$name.csv"
  python3 scripts/stall_lines.py "/tmp/src_$name.csv" > "$OUT/stall_src_$name.txt" 2>&1
  gzip -c "/tmp/src_$name.csv" > "$OUT/src_$name.csv.gz"
  # The kernel's SASS with source lines (nvdisasm -g over the extension's cubins, functions
  # whose mangled name contains $name), then executed instructions per source line and
  # function (scripts/sass_lines.py: which code the instructions come from).
  so=$(python3 -c "import blossom_ops._C as m; print(m.__file__)")
  cub=$(mktemp -d) && (cd "$cub" && cuobjdump -xelf all "$so" > /dev/null 2>&1)
  # Only the cubins whose symbols name the kernel: disassembling all of them takes minutes
  # (session 15: the step ran past its call's time limit).
  for f in "$cub"/*.cubin; do
    grep -q -a "$name" "$f" && nvdisasm -g -c "$f" 2> /dev/null
  done | python3 -c '
import sys
sys.path.insert(0, "scripts")
from sass_lines import split_functions
parts = split_functions(sys.stdin.read())
sys.stdout.write("".join(p for p in parts if sys.argv[1] in p.split("\n", 1)[0]))' "$name" \
    | gzip > "$OUT/sass_$name.txt.gz"
  python3 scripts/sass_lines.py "$OUT/src_$name.csv.gz" "$OUT/sass_$name.txt.gz" --lines \
    --top 50 > "$OUT/lines_$name.txt" 2>&1
  rm -rf "$cub"
  exit 0
fi
if [ -n "${NCU_KERNEL:-}" ]; then
  # One kernel (name regex), full sections: stall reasons, pipes, memory, launch.
  SECTIONS=${NCU_SECTIONS:-"SpeedOfLight Occupancy LaunchStats WarpStateStats SchedulerStats InstructionStats ComputeWorkloadAnalysis MemoryWorkloadAnalysis"}
  ARGS=()
  for x in $SECTIONS; do ARGS+=(--section "$x"); done
  timeout ${NCU_TIMEOUT:-300} ncu --clock-control none -k "regex:$NCU_KERNEL" -c 1 "${ARGS[@]}" \
    python3 /tmp/ncu_step.py > "$OUT/ncu_${NCU_KERNEL//[^a-zA-Z0-9_]/}.log" 2>&1
  echo "rc=$? kernel $NCU_KERNEL (D=${D:-64} L=${L:-4096} B=${B:-16})"
  exit 0
fi
METRICS=gpu__time_duration.sum,sm__warps_active.avg.pct_of_peak_sustained_active,\
sm__throughput.avg.pct_of_peak_sustained_elapsed,l1tex__throughput.avg.pct_of_peak_sustained_elapsed,\
lts__throughput.avg.pct_of_peak_sustained_elapsed,dram__throughput.avg.pct_of_peak_sustained_elapsed,\
lts__t_bytes.sum,dram__bytes.sum,lts__t_sector_hit_rate.pct,\
smsp__inst_executed.sum,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_elapsed
timeout ${NCU_TIMEOUT:-300} ncu --clock-control none --metrics "$METRICS" \
  --kernel-name-base demangled python3 /tmp/ncu_step.py > "$OUT/ncu_raw.log" 2>&1
echo "rc=$? (D=${D:-64} L=${L:-4096} B=${B:-16})" | tee "$OUT/ncu.log"
# Keep the per-kernel blocks short: kernel name line + metric lines.
grep -E "^  [a-zA-Z_].*\(|gpu__time|sm__warps|sm__throughput|l1tex__|lts__|dram__|inst_executed|hmma" \
  "$OUT/ncu_raw.log" | sed -E 's/\(int, int, int\)|<.*>//; s/ +/ /g' | cut -c1-160 >> "$OUT/ncu.log"
rm -f "$OUT/ncu_raw.log"
