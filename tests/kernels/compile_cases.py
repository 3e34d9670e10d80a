"""Compile-only cases: every kernel x dtype x padded-shape class, built for an sm_90 / sm_80
target with triton.compile(ASTSource, GPUTarget) on a machine with no GPU, with the pipeline
stages of each kernel's first config (the one that always stays after pruning); each case
reports the shared memory the build asks for.

Runs in its own process without TRITON_INTERPRET (the interpreter swaps triton's JIT
objects and the GPU compiler cannot use them):
    python tests/kernels/compile_cases.py CASE_ID [CASE_ID ...]   -> one JSON line per case
"""
import importlib
import json
import sys
import time
import traceback

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
ARCHS = (90, 80)
# padded-shape classes: name -> (T, E, D) for gating, (F, dh) for attention
GATE_CLASSES = {"T1E1D8": (1, 1, 8), "T3E5D24": (3, 5, 24), "T8E32D512": (8, 32, 512)}
ATTN_CLASSES = {"F16dh16": (3, 8), "F64dh32": (39, 24), "F128dh128": (128, 128)}
SLOW_CLASSES = {"F128dh128", "T8E32D512"}  # 5 s to 3 min per build on 2 cores: not in CI
KERNELS = {  # kernel -> (op: kernels/triton_<op>.py, the autotuned kernel, pointer args, shape classes)
    "gate_combine_fwd": ("gate_combine", "_gate_combine_fwd", ["Y", "X", "OUT"], GATE_CLASSES),
    "gate_combine_bwd": ("gate_combine", "_gate_combine_bwd", ["DOUT", "Y", "X", "DY", "DX"], GATE_CLASSES),
    "field_attention_fwd": ("field_attention", "_field_attention_fwd", ["Q", "K", "V", "OUT"], ATTN_CLASSES),
    "field_attention_bwd": ("field_attention", "_field_attention_bwd",
                            ["DOUT", "Q", "K", "V", "OUT", "DQ", "DK", "DV"], ATTN_CLASSES),
}
CASES = [f"{kernel}-{dtype}-{cls}-sm{arch}"
         for kernel, (_, _, _, classes) in KERNELS.items()
         for dtype in DTYPES for cls in classes for arch in ARCHS]


def compile_case(case: str) -> dict:
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel, dtype, cls, arch = case.split("-")
    op, fn_name, pointers, classes = KERNELS[kernel]
    mod = importlib.import_module(f"msrec_dist.kernels.triton_{op}")
    autotuner = getattr(mod, fn_name)
    torch_dtype = getattr(torch, DTYPES[dtype])
    signature = {p: f"*{dtype}" for p in pointers}
    if op == "gate_combine":
        T, E, D = classes[cls]
        signature.update(B="i32", E="i32", T="i32", D="i32")
        constexprs = mod.meta(T, E, D, torch_dtype, backward=kernel.endswith("bwd"))
        keep = mod._keep_bwd if kernel.endswith("bwd") else mod._keep  # largest tile tuning may pick
        constexprs["BLOCK_B"] = max(c.kwargs["BLOCK_B"] for c in keep(autotuner.configs, {}, **constexprs))
    else:
        F, DH = classes[cls]
        # the saved row log-sum-exp is fp32 for every input dtype here (fp64 only for fp64 inputs)
        signature.update(MASK="*u8", LSE="*fp32", B="i32", H="i32", F="i32", DH="i32", scale="fp32")
        if not mod.fits(F, DH, torch_dtype, backward=kernel.endswith("bwd")):
            return dict(case=case, ok=True, seconds=0.0, cubin_bytes=0, shared_bytes=0,
                        note="tiles past shared memory: the reference runs instead (triton_field_attention.fits)")
        constexprs = mod.meta(F, DH, torch_dtype, has_mask=True)
        constexprs["BLOCK_B"] = 2
    unknown = [name for name in autotuner.fn.arg_names if name not in signature and name not in constexprs]
    if unknown:  # would be taken as constexprs below and compile a kernel that was never meant
        return dict(case=case, ok=False, error=f"no signature entry for kernel argument(s) {unknown}")
    signature = {name: signature.get(name, "constexpr") for name in autotuner.fn.arg_names}
    start = time.time()
    try:
        compiled = triton.compile(ASTSource(autotuner.fn, signature, constexprs),
                                  target=GPUTarget("cuda", int(arch[2:]), 32),
                                  options={"num_warps": 4, "num_stages": autotuner.configs[0].num_stages})
        return dict(case=case, ok=True, seconds=round(time.time() - start, 2), cubin_bytes=len(compiled.asm["cubin"]),
                    shared_bytes=compiled.metadata.shared, spilled=getattr(compiled, "n_spills", None))
    except Exception:  # noqa: BLE001 - reported back to the test
        return dict(case=case, ok=False, error=traceback.format_exc(limit=3)[-3000:])


if __name__ == "__main__":
    for case in sys.argv[1:]:
        print(json.dumps(compile_case(case)), flush=True)
