"""Standalone attempt at the CUDA input-check crash (docs/operators.md, "Known bug").

Raises the wrong-rank and wrong-shape errors of sliding_window_attention on the given device
(default cuda) outside pytest. It does NOT crash (H200, 2026-11-26): the crash needs the
sequence of tests/test_input_checks.py in one process. Usage: python3 scripts/crash_repro.py [cpu|cuda]
"""
import faulthandler, sys, torch
faulthandler.enable()
import blossom_ops
dev = sys.argv[1] if len(sys.argv) > 1 else "cuda"
q = torch.randn(2, 8, 4, 16, device=dev); k = torch.randn(2, 8, 2, 16, device=dev); v = torch.randn_like(k)
for name, fn in [("q rank3", lambda: blossom_ops.sliding_window_attention(q[0], k, v, 4)),
                 ("k rank5", lambda: blossom_ops.sliding_window_attention(q, k[..., None], v, 4)),
                 ("k batch", lambda: blossom_ops.sliding_window_attention(q, k[:1], v[:1], 4)),
                 ("k rank5 direct", lambda: torch.ops.blossom_ops.sliding_window_attention(q, k[..., None], v, None, None, 4, True, True, 0.25)),
                 ]:
    print("trying", name, flush=True)
    try:
        fn(); print("  no error!?", flush=True)
    except Exception as e:
        print("  ", type(e).__name__, str(e).splitlines()[0][:200], flush=True)
