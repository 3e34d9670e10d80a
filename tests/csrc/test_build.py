"""C++ extensions (csrc/): setup.py builds them, the op is right, and the reader's helper agrees
with its numpy fallback.

test_setup_builds_extension / test_built_op (slow): `MSREC_BUILD_CSRC=1 python setup.py build_ext` on a
copy of setup.py + csrc/ in a tmp dir (about a minute on 2 cores; nothing is written to the
repo), then a fresh subprocess loads the built .so as `msrec_dist._C` (its module init runs the
op registrations) and checks torch.ops.msrec.check_ids next to the Python-registered msrec ops.
`make test` runs the same check on the venv's extension (test_installed_op): `make setup` has just
built it with the same setup.py, so a second build there only cost CI a minute.
test_first_bad_id_parity / test_gather_parity: data/native's C++ paths vs their numpy
fallbacks; need the extension built into the venv (`make setup` does it), skipped otherwise.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CHECK_SCRIPT = r"""
import importlib.machinery, importlib.util, sys
import numpy as np
import torch

path = sys.argv[1]
loader = importlib.machinery.ExtensionFileLoader("msrec_dist._C", path)
spec = importlib.util.spec_from_file_location("msrec_dist._C", path, loader=loader)
mod = importlib.util.module_from_spec(spec)  # runs PyInit__C: `import msrec_dist._C` works
loader.exec_module(mod)
import msrec_dist.kernels  # noqa: F401  Python custom ops in the same `msrec` namespace

op = torch.ops.msrec.check_ids
assert str(op.default._schema) == "msrec::check_ids(Tensor values, int num_embeddings) -> int", op.default._schema
assert hasattr(torch.ops.msrec, "gate_combine") and hasattr(torch.ops.msrec, "field_attention")


def ref(v, n):
    bad = (v < 0) | (v >= n)
    return int(bad.argmax()) if bad.any() else -1


cases = 0
for dt in (torch.int32, torch.int64):
    info = torch.iinfo(dt)
    N = 1000
    assert op(torch.empty(0, dtype=dt), N) == -1
    assert op(torch.empty(0, dtype=dt), 0) == -1
    n = 5000  # several 1024-id blocks and a tail
    good = torch.arange(n, dtype=dt) % N
    assert op(good, N) == -1
    assert op(good, 0) == 0 and op(good, -3) == 0  # nothing is in range
    for pos in (0, 1, 1023, 1024, 1025, 2500, 4095, 4096, n - 1):  # start, block edges, middle, end
        for bad in (N, N + 7, info.max, -1, -N, info.min):
            v = good.clone()
            v[pos] = bad
            got = op(v, N)
            assert got == pos, (dt, pos, bad, got)
            v[min(pos + 3, n - 1)] = -5  # a later bad id does not matter
            assert op(v, N) == pos, (dt, pos, bad)
            cases += 2
    v = torch.tensor([N - 1, 0, N - 1], dtype=dt)
    assert op(v, N) == -1 and op(v, N - 1) == 0 and op(v, 1) == 0
    assert op(torch.tensor([0, 0, 1], dtype=dt), 1) == 2
    # huge num_embeddings: beyond int32's range only negative ids are bad; int64 max itself is not < int64 max
    big = 2**40 if dt == torch.int32 else info.max
    top = info.max if dt == torch.int32 else info.max - 1
    assert op(torch.tensor([top, 0, top], dtype=dt), big) == -1
    assert op(torch.tensor([top, -1], dtype=dt), big) == 1
    i64max = torch.iinfo(torch.int64).max
    assert op(torch.tensor([0, i64max], dtype=torch.int64), i64max) == 1
    # non-contiguous input (stride 2), also across blocks
    w = good.clone()
    w[2 * 1500] = -2
    assert op(w[::2], N) == 1500 and op(w[1::2], N) == -1
    # random data vs numpy
    g = np.random.default_rng(0)
    for size in (1, 7, 1024, 3000):
        for _ in range(20):
            a = g.integers(-3, N + 3 if g.random() < 0.7 else N, size).astype(np.int64)
            a[g.random(size) < 0.99] %= N
            t = torch.from_numpy(a).to(dt)
            assert op(t, N) == ref(a, N), (dt, size)
            cases += 1

for bad_dtype in (torch.float32, torch.int16, torch.uint8, torch.bool):
    try:
        op(torch.zeros(4, dtype=bad_dtype), 10)
    except RuntimeError as e:
        assert "must be int32 or int64" in str(e), e
    else:
        raise AssertionError(f"no error for {bad_dtype}")
for shape in ((2, 3), ()):
    try:
        op(torch.zeros(shape, dtype=torch.int64), 10)
    except RuntimeError as e:
        assert "must be 1-D" in str(e), e
    else:
        raise AssertionError(f"no error for shape {shape}")
print("OK", cases)
"""


@pytest.fixture(scope="module")
def built_so(tmp_path_factory) -> str:
    """Build csrc/ with setup.py from a copy in a tmp dir; return the path of msrec_dist/_C*.so."""
    src = tmp_path_factory.mktemp("csrc_src")
    shutil.copy(os.path.join(ROOT, "setup.py"), src)
    shutil.copytree(os.path.join(ROOT, "csrc"), src / "csrc")
    lib, tmp = src / "lib", src / "tmp"
    env = {**os.environ, "MSREC_BUILD_CSRC": "1"}
    proc = subprocess.run([sys.executable, "setup.py", "build_ext", "--build-lib", str(lib), "--build-temp", str(tmp)],
                          cwd=src, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"setup.py build_ext failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    found = glob.glob(str(lib / "msrec_dist" / "_C*.so"))
    assert len(found) == 1, f"expected one msrec_dist/_C*.so under {lib}, got {found}\n{proc.stdout[-2000:]}"
    return found[0]


@pytest.mark.slow
def test_setup_builds_extension(built_so):
    assert os.path.basename(built_so).startswith("_C.") and os.path.getsize(built_so) > 0


def check_op_in_fresh_process(so: str) -> None:
    proc = subprocess.run([sys.executable, "-c", CHECK_SCRIPT, so], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "OK" in proc.stdout, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"


@pytest.mark.slow
def test_built_op(built_so):
    check_op_in_fresh_process(built_so)


def test_installed_op():
    _need_csrc()
    from msrec_dist.kernels.native import extension_path

    check_op_in_fresh_process(extension_path())


def _need_csrc():
    from msrec_dist.kernels.native import CSRC_ERROR, HAVE_CSRC

    if not HAVE_CSRC:
        pytest.skip("msrec_dist._C is not built in this environment (`MSREC_BUILD_CSRC=1 pip install "
                    f"--no-build-isolation -e .` or `make setup` builds it): {CSRC_ERROR}")


def test_first_bad_id_parity():
    from msrec_dist.data import native

    _need_csrc()
    g = np.random.default_rng(1)
    checked = 0
    for dtype in (np.int32, np.int64):
        for size in (0, 1, 5, 1023, 1024, 1025, 4096, 10_000):
            for trial in range(25):
                n_emb = int(g.integers(1, 2000))
                a = g.integers(-5, n_emb + 5, size).astype(dtype)
                keep = g.random(size) < (0.9999 if trial % 2 else 0.99)
                a[keep] = np.abs(a[keep]) % n_emb
                for v in (a, a[::3], a[::-1]):  # contiguous, strided, reversed (negative stride)
                    assert native.first_bad_id(v, n_emb) == native.first_bad_id_numpy(v, n_emb), (dtype, size)
                    checked += 1
                ro = a.copy()
                ro.flags.writeable = False  # arrow's zero-copy arrays are read-only
                assert native.first_bad_id(ro, n_emb) == native.first_bad_id_numpy(ro, n_emb)
    # dtypes the op does not take fall back to numpy, same answers
    assert native.first_bad_id(np.array([1, 2, 300], np.uint16), 300) == 2
    assert native.first_bad_id(np.array([0, 1, 2], ">i8"), 3) == -1
    assert native.first_bad_id(np.array([1, -2, 3], ">i8"), 3) == 1
    assert checked > 1000


def _parts(g, n_parts, max_rows, max_len):
    """Jagged int64 parts as a reader's row-group pieces: each part's values with some ids before
    and after its rows, and its offsets [rows + 1] absolute into them."""
    values, offsets = [], []
    for _ in range(n_parts):
        rows = int(g.integers(0, max_rows + 1))
        lengths = g.integers(0, max_len + 1, rows)
        pad = int(g.integers(0, 3))
        off = np.full(rows + 1, pad, np.int64)
        off[1:] += np.cumsum(lengths)
        v = g.integers(0, 10**9, int(off[-1]) + pad)
        v.flags.writeable = False  # arrow's zero-copy arrays are read-only
        values.append(v)
        offsets.append(off)
    return values, offsets


def test_gather_parity():
    import torch

    from msrec_dist.data import native

    _need_csrc()
    g = np.random.default_rng(2)
    for trial in range(60):
        n_parts, max_len = int(g.integers(1, 6)), [0, 1, 3, 20][trial % 4]
        values, offsets = _parts(g, n_parts, [0, 1, 50, 3000][trial % 4 if trial < 40 else 2], max_len)
        n = sum(len(o) - 1 for o in offsets)
        for idx in (g.permutation(n), g.integers(0, max(n, 1), 2 * n) if n else np.zeros(0, np.int64)):
            idx = idx.astype(np.int64)
            got, want = native.gather_jagged_rows(values, offsets, idx), native.gather_jagged_rows_numpy(values, offsets, idx)
            assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1]), trial
            rows = [v[o[r]:o[r + 1]] for v, o in zip(values, offsets) for r in range(len(o) - 1)]  # the definition
            assert np.array_equal(got[0], np.concatenate([rows[i] for i in idx] or [np.zeros(0, np.int64)]))
    with pytest.raises(RuntimeError, match="outside 0..2"):
        torch.ops.msrec.gather_jagged_rows([torch.arange(3)], [torch.arange(4)], torch.tensor([0, 3]))
