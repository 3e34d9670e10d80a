"""field_attention at B = 16k on the GPU: the wrapper (Triton through ops.TritonFieldAttention)
vs the custom op msrec::field_attention vs the eager reference, in ONE process (one autotune
cache), with gradients off and on: run 6's forward-only cell (under no_grad) was slower than run 2's.

    device run:   OUT=DIR python3 benchmarks/kernel_dispatch_nograd.py   -> DIR/nograd.txt
Result (H200): benchmarks/results/gpu/nograd_run7.txt.
"""
import importlib
import os
import sys

import torch
from triton.testing import do_bench

sys.path.insert(0, os.getcwd())
import msrec_dist.kernels as K  # noqa: E402
from msrec_dist.kernels import ops  # noqa: E402

out = open(os.path.join(os.environ["OUT"], "nograd.txt"), "w")


def log(*a):
    print(*a, flush=True)
    print(*a, file=out, flush=True)


for B, H, F, dh in [(16384, 2, 16, 16), (16384, 2, 32, 16)]:
    q, k, v = (torch.randn(B, H, F, dh, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    K.field_attention(q, k, v, kernel="triton").sum().backward()
    cfg = importlib.import_module("msrec_dist.kernels.triton_field_attention")._field_attention_fwd.best_config
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            f = do_bench(lambda: K.field_attention(q, k, v, kernel="triton"))
            c = do_bench(lambda: ops.field_attention(q, k, v, None, "triton"))
            ref = do_bench(lambda: K.field_attention(q, k, v, kernel="reference"))
        log(f"B={B} H={H} F={F} dh={dh} grad={grad} wrapper(Function) {f:.4f} ms  custom_op {c:.4f} ms  eager {ref:.4f} ms  cfg {cfg}")
