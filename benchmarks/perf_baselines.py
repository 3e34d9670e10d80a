"""The perf tests' baseline file, benchmarks/baselines/cpu.json, kept per kind of host.

    host_signature()                  which kind of host this is (CPU vendor, family, model, stepping, cores)
    load_baselines()                  {"tolerance", "cases"} that apply on this host
    check_ratio(name, ratio, base)    a measured work/calibration ratio against its baseline
    with_host_cases(raw, sig, cases)  the file with this host's cases rewritten (update_baselines)

The file keeps one set of cases per host signature, since the ratios depend on the kind of host:
    {"tolerance", "note", "fallback_host": KEY,
     "hosts": {KEY: {"machine", "command", "updated", "cases": {case: {"ratio", "spread", ...}}}}}
A case is checked against this host's own baseline where the file has one, else against the
fallback host's (that of the oldest entry, measured before signatures were recorded).
Torch-free: the measuring lives in perf_common.
"""
from __future__ import annotations

import json
import os
import platform

BASELINES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "baselines", "cpu.json")


def cpu_signature(cpuinfo: str, cores: int | None) -> str:
    """'<vendor> cpu family F model M stepping S, N cores' from /proc/cpuinfo text (its first CPU).

    The kind of host a throughput ratio belongs to. This project's VMs all report the model name
    'AMD EPYC', but at least two kinds of host lie behind it: fp32 matmul at 60-69 GFLOP/s on 2
    threads (family 23 model 1) and at 100-168 GFLOP/s, and the same code's
    work/calibration ratios differed between them by 10-15% (reader, field_attention) and more
    for the train steps, too much for one baseline to catch a 25% slowdown on both."""
    fields = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            break  # the first processor's block is enough
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    parts = [fields.get("vendor_id") or fields.get("CPU implementer") or platform.machine()]
    parts += [f"{k} {fields[k]}" for k in ("cpu family", "model", "stepping") if k in fields]
    if len(parts) == 1 and fields.get("CPU part"):
        parts.append(f"part {fields['CPU part']}")
    return " ".join(parts) + (f", {cores} cores" if cores else "")


def host_signature() -> str:
    """cpu_signature of this machine (platform.machine() and the cores where /proc/cpuinfo is absent)."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        text = ""
    return cpu_signature(text, os.cpu_count())


def read_baseline_file(path: str = BASELINES) -> dict:
    with open(path) as f:
        return json.load(f)


def host_baselines(raw: dict, signature: str) -> dict:
    """{"tolerance", "cases"} for a host: its own cases, the fallback host's for the others; each
    case carries "host" (whose baseline it is) and "own" (True where that is this host)."""
    fallback = raw["hosts"].get(raw.get("fallback_host"), {}).get("cases", {})
    own = raw["hosts"].get(signature, {}).get("cases", {})
    cases = {name: {**entry, "host": raw.get("fallback_host"), "own": False} for name, entry in fallback.items()}
    cases.update({name: {**entry, "host": signature, "own": True} for name, entry in own.items()})
    return {"tolerance": raw["tolerance"], "cases": cases}


def load_baselines(path: str = BASELINES, signature: str | None = None) -> dict:
    """The baselines that apply on this host (host_baselines of the file)."""
    return host_baselines(read_baseline_file(path), signature or host_signature())


def with_host_cases(raw: dict | None, signature: str, measured: dict, header: dict, tolerance: float) -> dict:
    """The baseline file with `measured` cases written into this host's entry (its other cases,
    and every other host, kept); a file's first host becomes its fallback."""
    raw = dict(raw or {"hosts": {}})
    hosts = dict(raw["hosts"])
    entry = hosts.get(signature, {})
    hosts[signature] = {**header, "cases": {**entry.get("cases", {}), **measured}}
    return {"tolerance": tolerance,
            "note": "ratio = work time / calibration time (min over interleaved repeats); a test fails when "
                    "its ratio > ratio * (1 + tolerance) on every attempt; cases per host signature "
                    "(CPU vendor, family, model, stepping, cores), the fallback host's where this host has none",
            "fallback_host": raw.get("fallback_host") or signature, "hosts": hosts}


def check_ratio(name: str, measured: float, baselines: dict) -> tuple[bool, str]:
    """(passed, message): fails when the work/calibration ratio exceeds baseline × (1 + tol)."""
    entry = baselines["cases"][name]
    tol = entry.get("tolerance", baselines["tolerance"])
    limit = entry["ratio"] * (1.0 + tol)
    rel = measured / entry["ratio"] - 1.0
    whose = "" if entry.get("own", True) else f"; no baseline of this host, that of '{entry.get('host')}'"
    msg = (f"{name}: work/calibration ratio {measured:.4f} vs baseline {entry['ratio']:.4f} "
           f"({rel:+.1%}, tolerance +{tol:.0%}{whose})")
    return measured <= limit, msg
