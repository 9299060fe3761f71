"""Instruction count of one blossom_attention training step on the CPU, for callgrind.

The shared machine's wall clock drifts by up to 2x within minutes; instructions do not. Run
twice with different step counts and divide the difference (import and warm-up cancel):
  valgrind --tool=callgrind --callgrind-out-file=a.out $(python3 -c 'import sys; print(sys.executable)') \
      benchmarks/host_instructions_cpu.py 50
  (same with 150 and b.out)   ->   instructions per step = (Ir(150) - Ir(50)) / 100
(valgrind must run the real interpreter, not a pyenv shim.) Shape B=1 L=16 Hq=2 Hk=1 D=16
float32, 1 thread, forward + torch.autograd.grad of q, k, v, gate_logits.
"""
import sys
import torch
import blossom_ops
torch.set_num_threads(1)
N = int(sys.argv[1])
g = torch.Generator().manual_seed(0)
mk = lambda *s: torch.randn(*s, generator=g).requires_grad_()
B, L, Hq, Hk, D = 1, 16, 2, 1, 16
q, k, v, gl = mk(B, L, Hq, D), mk(B, L, Hk, D), mk(B, L, Hk, D), mk(B, L, Hq, 2)
go = torch.randn(B, L, Hq, D, generator=g)
inputs = (q, k, v, gl)
def step():
    o = blossom_ops.blossom_attention(q, k, v, gl)
    return torch.autograd.grad(o, inputs, go)
for _ in range(20):
    step()
for _ in range(N):
    step()
