"""Throughput regression tests (part of `make test`): each case measures its work and a
calibration interleaved in one process and compares the ratio with this kind of host's baseline in
benchmarks/baselines/cpu.json (perf_baselines.host_signature; the fallback host's where this host has
none; rewrite this host's entry with `python -m benchmarks.update_baselines`, a reviewed commit of
its own).

Calibrations are fixed workloads of the same kind as the work (benchmarks/perf_common.py): a
plain-PyTorch MLP train loop for the train steps, a pyarrow+numpy decode of one file for the
reader, inline copies of each op's math for the kernels' reference paths; both sides are timed
in CPU seconds of the process, so another process taking the core away does not move the ratio.

The measurements run in a fresh process (`python -m benchmarks.update_baselines --check`),
exactly as the baselines were measured: OMP_WAIT_POLICY=PASSIVE and the malloc thresholds set before torch loads, no
state left by other tests (measured: in the pytest process every ratio came out 40-200% higher).
A case fails when its ratio exceeds baseline × (1 + tolerance) on all of 5 measurements: noise
has to strike every attempt to fail a test, while a real slowdown of 25% fails them all;
test_injected_slowdown_fails shows that. MSREC_PERF_SLOWDOWN=0.25 injects the slowdown into
every case (they must then fail).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from benchmarks import perf_baselines as B
from benchmarks import perf_common as P

pytestmark = pytest.mark.perf
INJECT = os.environ.get("MSREC_PERF_SLOWDOWN", "0") or "0"
# Attempts before a case fails. 5, not 3: gate_combine_reference's own baseline runs spread by
# 17% (1.235..1.442, the baseline being their lowest) and once measured 1.43..1.45 on all of 3
# attempts inside a full `make test`, i.e. noise failed it. More attempts do not let a real 25%
# slowdown through: every attempt of it lands above the threshold (MSREC_PERF_SLOWDOWN=0.25).
ATTEMPTS = 5


def run_checks(tmp_path, cases: list[str], slowdown: str, attempts: int, all_attempts: bool = False) -> dict:
    out = tmp_path / f"check_{slowdown}.json"
    cmd = [sys.executable, "-m", "benchmarks.update_baselines", "--check", str(out), "--slowdown", slowdown,
           "--attempts", str(attempts), "--cases", *cases] + (["--all-attempts"] if all_attempts else [])
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    proc = subprocess.run(cmd, cwd=P.REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def checks(tmp_path_factory):
    if not os.path.exists(B.BASELINES):
        pytest.skip("no baseline file; run python -m benchmarks.update_baselines")
    names = [n for n in P.CASES if n in B.load_baselines()["cases"]]
    return run_checks(tmp_path_factory.mktemp("perf"), names, INJECT, ATTEMPTS)


@pytest.mark.parametrize("name", list(P.CASES))
def test_throughput_ratio(name, checks):
    if name not in checks:
        pytest.skip(f"{name} not in the baseline file")
    r = checks[name]
    assert r["passed"], "slower than the baseline on every attempt:\n" + "\n".join(r["messages"])


def test_injected_slowdown_fails(tmp_path):
    """A real 25% slowdown (injected into the ple train step) must fail the check.

    The reference is the unslowed ratio measured by this same test, with the baseline file's
    tolerance: between runs days apart the ratios themselves drifted by up to ±15% here (measured), so
    comparing an injected slowdown with the committed file would test that drift rather than the
    tolerance. Both sides are the best of the same 3 attempts (a first version took the
    reference from the regular check, which stops at its first passing attempt, against the
    slowed side's best of 3: one draw vs the best of three, and a 25% injection once measured
    only +14.8%).
    """
    name = "train_step_ple"
    if name not in B.load_baselines()["cases"]:
        pytest.skip(f"{name} not in the baseline file")
    plain = run_checks(tmp_path, [name], "0", 3, all_attempts=True)[name]
    slowed = run_checks(tmp_path, [name], "0.25", 3, all_attempts=True)[name]
    reference = {"tolerance": B.load_baselines()["tolerance"], "cases": {name: {"ratio": min(plain["ratios"])}}}
    passed, msg = B.check_ratio(name, min(slowed["ratios"]), reference)
    assert not passed, "a 25% slowdown passed the check:\n" + msg
