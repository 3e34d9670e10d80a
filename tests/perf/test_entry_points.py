"""The benchmarks' process settings: each entry point (`python -m benchmarks.X`) calls
msrec_dist.runtime.prepare_process before torch loads, and importing a benchmarks module calls
nothing (tests/perf measures in a fresh `python -m benchmarks.update_baselines --check` process
set up exactly as the baselines were measured)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from benchmarks import perf_common as P

ENTRY_POINTS = ["update_baselines", "train_throughput", "reader_throughput", "collectives", "peer", "compare", "scale"]

# Runs each entry point as __main__ with prepare_process replaced by a probe that records the
# state it is called in, then stops the module (so torch is never loaded before the probe of the
# next one; a module that never calls it stops at its --help); then imports every module as a library and records any call.
PROBE = """
import json, os, runpy, sys
import msrec_dist.runtime as R

class Stop(Exception):
    pass

calls = []

def probe(reader_workers):
    calls.append({"torch_loaded": "torch" in sys.modules, "reader_workers": reader_workers,
                  "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")})
    raise Stop

R.prepare_process = probe
out = {}
for name in NAMES:
    calls.clear()
    os.environ.pop("OMP_WAIT_POLICY", None)
    sys.argv = ["benchmarks." + name, "--help"]  # an entry point without the probe stops at its help
    try:
        runpy.run_module("benchmarks." + name, run_name="__main__", alter_sys=True)
    except (Stop, SystemExit):
        pass
    out[name] = list(calls)
calls.clear()
import importlib
for name in NAMES:
    importlib.import_module("benchmarks." + name)
out["imported"] = {"calls": list(calls), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
print(json.dumps(out))
"""


def test_entry_points_prepare_the_process_before_torch_and_imports_do_not():
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    proc = subprocess.run([sys.executable, "-c", f"NAMES = {ENTRY_POINTS!r}\n" + PROBE], cwd=P.REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in ENTRY_POINTS:
        policy = "PASSIVE" if name == "update_baselines" else None  # update_baselines measures with PASSIVE
        assert out[name] == [{"torch_loaded": False, "reader_workers": 0, "omp_wait_policy": policy}], name
    assert out["imported"] == {"calls": [], "omp_wait_policy": None}
