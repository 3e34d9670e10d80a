"""Throughput regression tests: each case measures its work and a calibration (a fixed matmul,
or numpy work for the reader) interleaved in this process, and compares the ratio with
benchmarks/baselines/cpu.json (rewrite it with `python -m benchmarks.update_baselines`).

A case fails when its ratio exceeds baseline × (1 + tolerance) on `ATTEMPTS` separate
measurements: noise from other processes has to strike every attempt to fail a test, while a
real slowdown of 25% fails them all. test_injected_slowdown_fails shows the latter.
MSREC_PERF_SLOWDOWN=0.25 injects that slowdown into every case (they must then fail).
"""
from __future__ import annotations

import logging
import os

import pytest

from benchmarks import perf_common as P

pytestmark = pytest.mark.perf
ATTEMPTS = 3
INJECT = float(os.environ.get("MSREC_PERF_SLOWDOWN", "0") or 0)


@pytest.fixture(scope="module")
def baselines(tmp_path_factory):
    if not os.path.exists(P.BASELINES):
        pytest.skip("no baseline file; run python -m benchmarks.update_baselines")
    P.set_test_data_root(str(tmp_path_factory.mktemp("perf_data")))
    logging.disable(logging.WARNING)
    yield P.load_baselines()
    logging.disable(logging.NOTSET)


@pytest.fixture(scope="module")
def threads(baselines):
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(baselines["machine"]["torch_threads"])
    yield
    torch.set_num_threads(old)


def run_check(name: str, baselines: dict, slowdown: float, attempts: int = ATTEMPTS) -> tuple[bool, list[str]]:
    work, calib, _ = P.CASES[name].setup()
    messages = []
    for _ in range(attempts):
        ok, msg = P.check_ratio(name, P.measure_case(work, calib, slowdown=slowdown)["ratio"], baselines)
        messages.append(msg)
        if ok:
            return True, messages
    return False, messages


@pytest.mark.parametrize("name", list(P.CASES))
def test_throughput_ratio(name, baselines, threads):
    if name not in baselines["cases"]:
        pytest.skip(f"{name} not in the baseline file")
    ok, messages = run_check(name, baselines, INJECT)
    print("\n".join(messages))
    assert ok, "slower than the baseline on every attempt:\n" + "\n".join(messages)


def test_injected_slowdown_fails(baselines, threads):
    """A real 25% slowdown (injected into the ple train step) must fail the check."""
    ok, messages = run_check("train_step_ple", baselines, slowdown=0.25)
    print("\n".join(messages))
    assert not ok, "a 25% slowdown passed the check:\n" + "\n".join(messages)
