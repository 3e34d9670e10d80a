"""benchmarks/kernels.py on CPU: each measured path is checked against the eager reference on the
same inputs (so a fast wrong kernel shows in the table), and --ops picks the ops measured."""
import torch

import benchmarks.kernels as KB
from tests.kernels.utils import cpp_kernel_mark

needs_cpp = cpp_kernel_mark("gate_combine")


@needs_cpp
def test_gate_combine_relu_rows_agree_with_eager():
    rows = KB.gate_relu_rows((64, 4, 3, 16), "cpu", torch.float32, ["eager", "cpp", "unfused"])
    assert {(r["path"], r["mode"]) for r in rows} == {(p, m) for p in ("eager", "cpp", "unfused")
                                                      for m in ("fwd", "fwd+bwd")}
    for r in rows:
        assert r["seconds"] > 0 and r["op"] == "gate_combine_relu"
        assert r["rel_err"] is None if r["path"] == "eager" else r["rel_err"] < 1e-6


def test_a_wrong_path_shows_its_error():
    """The check is real: a path computing something else (no ReLU) reads a large rel_err."""
    y = torch.randn(32, 3, 8, requires_grad=True)
    g = torch.randn(2, 32, 3, requires_grad=True)
    fns = {"eager": lambda y, g: KB.gate_combine_ref(y, g, relu=True), "cpp": KB.gate_combine_ref}
    rows = KB.measure("gate_combine_relu", {}, fns, [y, g], torch.randn(2, 32, 8), 1, 1, "cpu", ["eager", "cpp"])
    assert min(r["rel_err"] for r in rows if r["path"] == "cpp") > 0.1


def test_ops_picks_what_is_measured(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(KB, "gate_rows", lambda shape, *a: seen.append(("gate", shape)) or [])
    monkeypatch.setattr(KB, "attn_rows", lambda shape, *a: seen.append(("attn", shape)) or [])
    monkeypatch.setattr(KB, "gate_relu_rows", lambda shape, *a: seen.append(("relu", shape)) or [])
    monkeypatch.setattr(KB, "copy_bandwidth", lambda device: 1e9)
    KB.main(quick=True, out=str(tmp_path), ops=("gate_combine_relu",))
    assert seen == [("relu", KB.CPU_GATE[0])]
    assert (tmp_path / "kernels_cpu.md").exists()
