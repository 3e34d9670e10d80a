"""Benchmarks for the hot ops: gate_combine and field_attention, forward and forward+backward.

    python -m benchmarks.kernels                 # CUDA if present (full table), else CPU reference paths
    python -m benchmarks.kernels --quick         # one shape per op
    python -m benchmarks.kernels --out DIR --budget-s 300   # results elsewhere; stop adding shapes after 300 s
    python -m benchmarks.kernels --ops gate_combine_relu     # only these ops (default: all three)

Per shape and path: median time, GB/s from the ideal byte count (each input read once, each
output written once), % of the device's copy bandwidth measured in the same run, and speedup
vs the eager reference (and, for attention, vs SDPA). Ideal bytes, with s the element size and
mask bytes ignored:
    gate_combine     fwd  s*(B*E*D + T*B*E + T*B*D)           fwd+bwd  fwd + s*(2*B*E*D + 2*T*B*E + T*B*D)
    field_attention  fwd  s*4*B*H*F*dh + 4*B*H*F (q, k, v read; out and the fp32 row lse written)
                     fwd+bwd  fwd + s*8*B*H*F*dh + 4*B*H*F (q, k, v, out, dout, lse read; dq, dk, dv)
gate_combine_relu is PLE's call, gate_combine(pre-activations, logits, relu=True): the same bytes
as gate_combine; its eager path is the reference over torch.relu, and "unfused" runs torch.relu
and then the kernel without relu (what the model ran before the ReLU moved into the kernel).
Paths: triton (CUDA only), cpp (the C++ CPU kernels, csrc/gate_combine.cpp and
csrc/field_attention.cpp, where the extension is built; through msrec_dist.kernels as the model
calls them), eager reference, torch.compile(reference), SDPA (attention).
Every non-eager path's forward output and first input gradient are checked against the eager
reference on the same inputs (rel_err = ||x - eager|| / ||eager||), so a fast wrong kernel shows.
A path that runs out of device memory or fails (cuDNN's SDPA backward refuses B = 1M on an
H200) is recorded with its error, and the run goes on. The report (JSON + markdown, with
the issue's GPU targets evaluated from the rows) is rewritten after every shape, so a run cut
short keeps what it measured: benchmarks/results/kernels_<cuda|cpu>.json and .md by default.
"""
import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import msrec_dist.kernels as K
from msrec_dist.kernels.ref_field_attention import field_attention_ref
from msrec_dist.kernels.ref_gate_combine import gate_combine_ref

RESULTS = Path(__file__).resolve().parent / "results"
# The issue's ranges (B 16k..1M; E 4..16, T 2..4, D 64..256; H 2..8, F 16..64, dh 16..64), sized
# so the eager reference's intermediates (fp32 [T, B, E, D] products; [B, H, F, F] scores and
# their gradients) fit in an 80 GB H100: B = 1M x H = 8 x F = dh = 64 would be 68 GB per input.
GPU_GATE = [(16384, 4, 2, 64), (1048576, 4, 2, 64), (262144, 8, 3, 128), (1048576, 8, 3, 128),
            (262144, 16, 4, 256)]
GPU_ATTN = [(16384, 2, 16, 16), (1048576, 2, 16, 16), (262144, 4, 32, 32), (16384, 8, 64, 64),
            (65536, 8, 64, 64)]
CPU_GATE = [(4096, 4, 2, 64), (16384, 8, 3, 128)]
CPU_ATTN = [(4096, 2, 10, 8), (1024, 2, 16, 16), (2048, 4, 32, 32)]  # the first: msrec's shape


def bench(fn, device, reps=10):
    """Median seconds of fn(); on CUDA triton.testing.do_bench (it syncs), on CPU wall time."""
    if device == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    fn()  # warm-up (and torch.compile's first build)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth(device):
    """Bytes read + written per second by a device-to-device copy of 1 GiB (256 MiB on CPU)."""
    n = (1 << 30 if device == "cuda" else 1 << 28) // 4
    src, dst = torch.empty(n, device=device), torch.empty(n, device=device)
    return 2 * n * 4 / bench(lambda: dst.copy_(src), device)


def _fwd_bwd(fn, inputs, grad):
    def run():
        for x in inputs:
            x.grad = None
        fn(*inputs).backward(grad)
    return run


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref||, in float64."""
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300)).item()


def _outputs(fn, inputs, grad):
    """(forward output, first input's gradient) of fn: what the accuracy check compares."""
    _fwd_bwd(fn, inputs, grad)()
    with torch.no_grad():
        out = fn(*inputs)
    return out.detach().clone(), inputs[0].grad.detach().clone()


def measure(op, shape, fns, inputs, grad, fwd_bytes, bwd_bytes, device, paths):
    """Rows for each path: fwd and fwd+bwd times, accuracy against eager, or the OOM it hit."""
    rows, eager = [], None
    for path in [p for p in paths if p in fns]:
        fn = fns[path]
        base = dict(op=op, shape=shape, path=path)
        try:
            out, grad0 = _outputs(fn, inputs, grad)
            if path == "eager":
                eager = (out, grad0)
            err = None if eager is None or path == "eager" else max(rel_err(out, eager[0]), rel_err(grad0, eager[1]))
            del out, grad0
            with torch.no_grad():
                rows.append(dict(base, mode="fwd", bytes=fwd_bytes, rel_err=err,
                                 seconds=bench(lambda: fn(*inputs), device)))
            rows.append(dict(base, mode="fwd+bwd", bytes=bwd_bytes, rel_err=err,
                             seconds=bench(_fwd_bwd(fn, inputs, grad), device)))
        except RuntimeError as exc:  # out of memory, or a library kernel refusing the shape
            error = "out of memory" if isinstance(exc, torch.OutOfMemoryError) else \
                f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            rows += [dict(base, mode=m, bytes=b, rel_err=None, seconds=None, error=error)
                     for m, b in (("fwd", fwd_bytes), ("fwd+bwd", bwd_bytes))
                     if not any(r["mode"] == m for r in rows if r["path"] == path)]
        for x in inputs:
            x.grad = None
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def _gate_rows(op, fns, shape, device, dtype, paths):
    """Rows of a gate_combine-shaped op: inputs y [B, E, D], logits [T, B, E], upstream [T, B, D]."""
    B, E, T, D = shape
    s = torch.finfo(dtype).bits // 8
    fwd_bytes = s * (B * E * D + T * B * E + T * B * D)
    bwd_bytes = fwd_bytes + s * (2 * B * E * D + 2 * T * B * E + T * B * D)
    y = torch.randn(B, E, D, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(T, B, E, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(T, B, D, device=device, dtype=dtype)
    return measure(op, dict(B=B, E=E, T=T, D=D), fns, [y, g], grad, fwd_bytes, bwd_bytes, device, paths)


def gate_rows(shape, device, dtype, paths):
    fns = {"eager": gate_combine_ref, "compiled": torch.compile(gate_combine_ref),
           "triton": lambda y, g: K.gate_combine(y, g, kernel="triton"),
           "cpp": lambda y, g: K.gate_combine(y, g, kernel="cpp")}
    return _gate_rows("gate_combine", fns, shape, device, dtype, paths)


def gate_relu_rows(shape, device, dtype, paths):
    """gate_combine with the experts' ReLU inside (relu=True) against eager relu + reference, and
    against relu + the kernel without it ("unfused": the cpp or triton kernel of this device)."""
    fused = "triton" if device == "cuda" else "cpp"
    fns = {"eager": lambda y, g: gate_combine_ref(y, g, relu=True),
           "compiled": torch.compile(lambda y, g: gate_combine_ref(y, g, relu=True)),
           "unfused": lambda y, g: K.gate_combine(torch.relu(y), g, kernel=fused),
           "triton": lambda y, g: K.gate_combine(y, g, kernel="triton", relu=True),
           "cpp": lambda y, g: K.gate_combine(y, g, kernel="cpp", relu=True)}
    return _gate_rows("gate_combine_relu", fns, shape, device, dtype, paths)


def attn_rows(shape, device, dtype, paths):
    B, H, F, dh = shape
    s = torch.finfo(dtype).bits // 8
    n = B * H * F * dh
    qkv = [torch.randn(B, H, F, dh, device=device, dtype=dtype, requires_grad=True) for _ in range(3)]
    mask = torch.rand(B, F, device=device) < 0.2
    mask[:, 0] = False  # no fully padded sample: SDPA returns NaN there
    grad = torch.randn(B, H, F, dh, device=device, dtype=dtype)
    fns = {"eager": lambda q, k, v: field_attention_ref(q, k, v, mask),
           "compiled": torch.compile(lambda q, k, v: field_attention_ref(q, k, v, mask)),
           "sdpa": lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
               q, k, v, attn_mask=~mask[:, None, None, :]),
           "triton": lambda q, k, v: K.field_attention(q, k, v, mask, kernel="triton"),
           "cpp": lambda q, k, v: K.field_attention(q, k, v, mask, kernel="cpp")}
    return measure("field_attention", dict(B=B, H=H, F=F, dh=dh), fns, qkv, grad,
                   s * 4 * n + 4 * n // dh, s * 12 * n + 8 * n // dh, device, paths)


def add_ratios(rows, copy_bw):
    """GB/s, % of copy bandwidth, and speedups vs eager and (attention) vs SDPA, per row."""
    def key(r, path):
        return (r["op"], r["mode"], json.dumps(r["shape"]), path)
    secs = {key(r, r["path"]): r["seconds"] for r in rows}
    for r in rows:
        if r["seconds"] is None:
            continue
        r["GB/s"] = r["bytes"] / r["seconds"] / 1e9
        r["%copy_bw"] = 100 * r["bytes"] / r["seconds"] / copy_bw
        for ref in ("eager", "sdpa"):
            if secs.get(key(r, ref)):
                r[f"x_vs_{ref}"] = secs[key(r, ref)] / r["seconds"]
    return rows


def targets(rows):
    """The issue's H100 targets, each over the Triton rows it names that have the figure (a row
    whose comparison path failed, e.g. SDPA at B = 1M, drops out): (target, worst, holds)."""
    def worst(op, mode, field, pred=lambda shape: True):
        vals = [r[field] for r in rows if r["path"] == "triton" and r["op"] == op and r["mode"] == mode
                and pred(r["shape"]) and r.get(field) is not None]
        return min(vals) if vals else None
    checks = [("gate_combine fwd >= 80% of copy bandwidth", worst("gate_combine", "fwd", "%copy_bw"), 80),
              ("gate_combine fwd >= 2x eager", worst("gate_combine", "fwd", "x_vs_eager"), 2),
              ("field_attention fwd >= 75% of copy bandwidth",
               worst("field_attention", "fwd", "%copy_bw", lambda s: s["F"] <= 64), 75),
              ("field_attention fwd >= 3x SDPA at F <= 64",
               worst("field_attention", "fwd", "x_vs_sdpa", lambda s: s["F"] <= 64), 3),
              ("gate_combine fwd+bwd >= 2x eager", worst("gate_combine", "fwd+bwd", "x_vs_eager"), 2),
              ("field_attention fwd+bwd >= 2x eager", worst("field_attention", "fwd+bwd", "x_vs_eager"), 2)]
    return [dict(target=name, worst=w, holds=None if w is None else w >= bar) for name, w, bar in checks]


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def markdown(report):
    lines = [f"# Kernel benchmarks: {report['device']}", "", report["note"], "",
             f"Copy bandwidth (read + write): {report['copy_GBps']:.1f} GB/s; dtype {report['dtype']}; "
             f"torch {report['torch']}, triton {report.get('triton', '-')}.", ""]
    if report.get("targets"):
        lines += ["| target (worst shape) | worst | holds |", "|---|---:|---|"]
        lines += [f"| {t['target']} | {_fmt(t['worst'], '.2f')} | "
                  f"{ {True: 'yes', False: 'NO', None: 'not measured'}[t['holds']] } |" for t in report["targets"]]
        lines.append("")
    lines += ["| op | mode | shape | path | median ms | GB/s | % copy bw | x vs eager | x vs SDPA | rel err vs eager |",
              "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        shape = " ".join(f"{k}={v}" for k, v in r["shape"].items())
        if r["seconds"] is None:
            lines.append(f"| {r['op']} | {r['mode']} | {shape} | {r['path']} | {r['error']} | | | | | |")
            continue
        lines.append(f"| {r['op']} | {r['mode']} | {shape} | {r['path']} | {r['seconds'] * 1e3:.3f} | "
                     f"{r['GB/s']:.1f} | {r['%copy_bw']:.1f} | {_fmt(r.get('x_vs_eager'), '.2f')} | "
                     f"{_fmt(r.get('x_vs_sdpa'), '.2f')} | {_fmt(r['rel_err'], '.1e')} |")
    if report.get("skipped"):
        lines += ["", "Not measured (time budget): " + "; ".join(report["skipped"])]
    return "\n".join(lines) + "\n"


OPS = ("gate_combine", "field_attention", "gate_combine_relu")


def main(quick: bool = False, out: str = str(RESULTS), budget_s: float = 0.0, ops=OPS):
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    gate_shapes, attn_shapes = (GPU_GATE, GPU_ATTN) if cuda else (CPU_GATE, CPU_ATTN)
    if quick:
        gate_shapes, attn_shapes = gate_shapes[:1], attn_shapes[:1]
    paths = ["eager", "compiled"] + (["triton"] if cuda else [])
    def cpp(op):  # the C++ CPU kernel's path, where it is built
        return [] if cuda or op not in K.ops.cpp_kernels() else ["cpp"]
    start, copy_bw = time.monotonic(), copy_bandwidth(device)
    name = (torch.cuda.get_device_name() if cuda else
            f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    note = ("Full table: Triton vs eager reference, torch.compile(reference) and SDPA. Targets are the "
            "issue's (stated for an H100), evaluated over every shape measured." if cuda else
            "CPU run: the reference paths (eager, torch.compile of the reference, SDPA) and the C++ kernels "
            "(cpp) at small shapes. The Triton kernels' GPU figures are in kernels_cuda.md.")
    triton_version = None
    if cuda:
        import triton
        triton_version = triton.__version__
    report = dict(device=name, torch=torch.__version__, triton=triton_version, dtype=str(dtype), note=note,
                  copy_GBps=copy_bw / 1e9, rows=[], skipped=[])
    stem = Path(out) / f"kernels_{device}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    work = [(gate_rows, shape, paths + cpp("gate_combine")) for shape in gate_shapes
            if "gate_combine" in ops] + \
           [(attn_rows, shape, paths + cpp("field_attention") + ["sdpa"]) for shape in attn_shapes
            if "field_attention" in ops] + \
           [(gate_relu_rows, shape, paths + cpp("gate_combine") + ["unfused"]) for shape in gate_shapes
            if "gate_combine_relu" in ops]
    for rows_of, shape, shape_paths in work:
        if budget_s and time.monotonic() - start > budget_s:
            report["skipped"].append(f"{rows_of.__name__[:-5]} {shape}")
            continue
        report["rows"] += rows_of(shape, device, dtype, shape_paths)
        report["rows"] = add_ratios(report["rows"], copy_bw)
        report["targets"] = targets(report["rows"]) if cuda else []
        report["seconds_so_far"] = time.monotonic() - start
        stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
        stem.with_suffix(".md").write_text(markdown(report))
        print(f"[{report['seconds_so_far']:.0f} s] {rows_of.__name__} {shape} done", flush=True)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
    stem.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one shape per op")
    parser.add_argument("--out", default=str(RESULTS), help="folder for kernels_<device>.json/.md")
    parser.add_argument("--budget-s", type=float, default=0.0,
                        help="start no new shape after this many seconds (0: no limit)")
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS), help="which ops to measure")
    main(**vars(parser.parse_args()))
