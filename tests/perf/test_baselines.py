"""The baseline file's per-host entries (benchmarks/perf_baselines.py): which baseline a host is
checked against, and how update_baselines writes one host's cases without touching the others."""
from __future__ import annotations

import pytest

from benchmarks import perf_baselines as B
from benchmarks.perf_common import CASES

ZEN1 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 23
model\t\t: 1
model name\t: AMD EPYC
stepping\t: 2

processor\t: 1
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
"""
OLD, NEW = "old host", "AuthenticAMD cpu family 23 model 1 stepping 2, 2 cores"


def two_hosts() -> dict:
    return {"tolerance": 0.15, "fallback_host": OLD,
            "hosts": {OLD: {"cases": {"a": {"ratio": 2.0}, "b": {"ratio": 3.0}}},
                      NEW: {"cases": {"a": {"ratio": 1.5}}}}}


def test_cpu_signature_reads_the_first_processor():
    assert B.cpu_signature(ZEN1, 2) == NEW
    assert B.cpu_signature("", None) != ""  # no /proc/cpuinfo: still a key


def test_a_host_uses_its_own_cases_and_the_fallback_for_the_rest():
    b = B.host_baselines(two_hosts(), NEW)
    assert b["cases"]["a"]["ratio"] == 1.5 and b["cases"]["a"]["own"]
    assert b["cases"]["b"]["ratio"] == 3.0 and not b["cases"]["b"]["own"] and b["cases"]["b"]["host"] == OLD
    unknown = B.host_baselines(two_hosts(), "another host")
    assert {k: v["ratio"] for k, v in unknown["cases"].items()} == {"a": 2.0, "b": 3.0}


@pytest.mark.parametrize("measured, passes", [(1.5 * 1.149, True), (1.5 * 1.151, False), (1.5 * 1.25, False)])
def test_check_against_this_hosts_baseline(measured, passes):
    """A 25% slowdown on the host with its own (lower) baseline fails, though it would pass
    against the fallback host's (2.0 * 1.15 = 2.3 > 1.875)."""
    ok, msg = B.check_ratio("a", measured, B.host_baselines(two_hosts(), NEW))
    assert ok is passes and "no baseline of this host" not in msg
    ok, msg = B.check_ratio("b", 3.0, B.host_baselines(two_hosts(), NEW))
    assert ok and f"that of '{OLD}'" in msg


def test_update_writes_only_this_hosts_cases():
    header = {"machine": {}, "command": "x", "updated": "now"}
    raw = B.with_host_cases(two_hosts(), NEW, {"b": {"ratio": 2.5}}, header, 0.15)
    assert raw["hosts"][NEW]["cases"] == {"a": {"ratio": 1.5}, "b": {"ratio": 2.5}}  # a kept, b added
    assert raw["hosts"][OLD] == two_hosts()["hosts"][OLD] and raw["fallback_host"] == OLD
    first = B.with_host_cases(None, NEW, {"a": {"ratio": 1.0}}, header, 0.15)
    assert first["fallback_host"] == NEW and first["hosts"][NEW]["updated"] == "now"


def test_the_committed_file_has_a_fallback_with_every_case():
    raw = B.read_baseline_file()
    assert set(raw["hosts"][raw["fallback_host"]]["cases"]) == set(CASES)
