"""Host cost of each way into the Triton kernels at small batches (GPU only): the eager PyTorch
reference, the custom op msrec::gate_combine / msrec::field_attention (routed to Triton), the
Triton launcher called directly, and the autograd.Function over the launchers that
msrec_dist.kernels' wrappers call in eager mode (kernels/ops.py: TritonGateCombine,
TritonFieldAttention; run 5 used copies of them written into this script, the same calls).
Per path: median ms from triton.testing.do_bench, and host-only microseconds per call
(2000 calls without a sync).

    device run:   OUT=DIR python3 benchmarks/kernel_dispatch.py    -> DIR/host_overhead.json
Result (H200, 2026-11-26): benchmarks/results/gpu/host_overhead_run5.json.
"""
import importlib
import json
import os
import sys
import time

import torch
import triton
from triton.testing import do_bench

sys.path.insert(0, os.getcwd())
from msrec_dist.kernels import ops  # noqa: E402  (needs msrec_dist/kernels: pip install -e . or gpu_check.sh's link)
from msrec_dist.kernels.ref_field_attention import field_attention_ref  # noqa: E402
from msrec_dist.kernels.ref_gate_combine import gate_combine_ref  # noqa: E402

gk = importlib.import_module("msrec_dist.kernels.triton_gate_combine")  # the Triton module (its launcher)


def host_us(fn, n=2000):
    """Host microseconds per call of fn over n calls without a sync (after 20 warm-up calls)."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    h = (time.perf_counter() - t) / n * 1e6
    torch.cuda.synchronize()
    return h


def measure(op, shape, name, f, grads, g, backward=True):
    """One row: f's forward (and forward+backward) device ms and host us; None where it failed."""
    try:
        fwd, hf = do_bench(f), host_us(f)
        fb = hb = None
        if backward:
            def step():
                f().backward(g)
            fb, hb = do_bench(step, grad_to_none=grads), host_us(step)
    except Exception as e:  # record, go on
        print(name, "failed", repr(e)[:300])
        return None
    row = dict(op=op, shape=shape, path=name, fwd_ms=fwd, fwd_host_us=hf, fwdbwd_ms=fb, fwdbwd_host_us=hb)
    print(row, flush=True)
    return row


res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__, "rows": []}
dt = torch.bfloat16
for B, E, T, D in [(16384, 4, 2, 64), (16384, 8, 3, 128), (1048576, 4, 2, 64)]:
    y = torch.randn(B, E, D, device="cuda", dtype=dt, requires_grad=True)
    x = torch.randn(T, B, E, device="cuda", dtype=dt, requires_grad=True)
    g = torch.randn(T, B, D, device="cuda", dtype=dt)
    paths = {"eager": lambda: gate_combine_ref(y, x), "custom_op": lambda: ops.gate_combine(y, x, "triton"),
             "direct": lambda: gk.gate_combine_fwd(y, x), "autograd_fn": lambda: ops.TritonGateCombine.apply(y, x)}
    for name, f in paths.items():
        row = measure("gate_combine", f"B={B} E={E} T={T} D={D}", name, f, [y, x], g, backward=name != "direct")
        if row is not None:
            res["rows"].append(row)
for B, H, F, dh in [(16384, 2, 32, 16), (16384, 4, 64, 32)]:
    q, k, v = (torch.randn(B, H, F, dh, device="cuda", dtype=dt, requires_grad=True) for _ in range(3))
    g = torch.randn(B, H, F, dh, device="cuda", dtype=dt)
    paths = {"eager": lambda: field_attention_ref(q, k, v, None),
             "custom_op": lambda: ops.field_attention(q, k, v, None, "triton")[0],
             "autograd_fn": lambda: ops.TritonFieldAttention.apply(q, k, v, None)}
    for name, f in paths.items():
        row = measure("field_attention", f"B={B} H={H} F={F} dh={dh}", name, f, [q, k, v], g)
        if row is not None:
            res["rows"].append(row)
json.dump(res, open(os.path.join(os.environ.get("OUT", "."), "host_overhead.json"), "w"), indent=1)
