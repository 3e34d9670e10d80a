"""Start msrec_dist/train.py on N gloo ranks (torchrun, standalone rendezvous) for tests."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_MODEL = [
    "model.star.hidden=[32,16]", "model.experts.hidden=16", "model.mixing.hidden=16",
    "model.tower.hidden=[8]", "run.progress=false", "run.tensorboard=false", "train.log_every=1",
]


def command(nproc: int, data: str, run_dir: str, sets: list[str], config: str = "configs/msrec_full.yaml",
            resume: bool = False) -> list[str]:
    args = ["--config", config, "--data", data, "--set", f"run.dir={run_dir}"]
    for s in TINY_MODEL + sets:
        args += ["--set", s]
    if resume:
        args.append("--resume")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "msrec_dist/train.py", *args]


def train(nproc: int, data: str, run_dir: str, sets: list[str] = (), resume: bool = False,
          timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(command(nproc, data, run_dir, list(sets), resume=resume), cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children first found, then theirs), from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a launcher and every process under it. torchrun starts each worker with setsid (in a
    process group of its own), so killing the launcher's process group alone leaves the workers
    training on."""
    for pid in [*descendants(proc.pid), proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def train_and_kill(nproc: int, data: str, run_dir: str, sets: list[str], kill_when, timeout: float = 300,
                   resume: bool = False, delay: float = 0.0) -> bool:
    """Start (or resume) a run; SIGKILL the launcher and all its workers `delay` s after `kill_when`
    holds (a path: once it exists; or a callable); True if killed, False if it finished first."""
    ready = kill_when if callable(kill_when) else (lambda: os.path.exists(kill_when))
    proc = subprocess.Popen(command(nproc, data, run_dir, list(sets), resume=resume), cwd=REPO,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if ready():
            time.sleep(delay)
            if proc.poll() is not None:
                break
            kill_tree(proc)
            return True
        time.sleep(0.01)
    if proc.poll() is None:
        kill_tree(proc)
    return False


def metrics(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "final_metrics.json")) as f:
        return json.load(f)


def losses(run_dir: str) -> list[float]:
    """The loss lines' values (the val evaluations' lines and events left out)."""
    with open(os.path.join(run_dir, "train_log.jsonl")) as f:
        return [e["loss"] for e in map(json.loads, f) if "loss" in e]


def auc_cells(m: dict) -> dict[str, float]:
    """Flat {scenario/task/metric: value} of a final_metrics dict (overall included)."""
    out = {}
    for scen, tasks in [("overall", m["overall"]), *m["per_scenario"].items()]:
        for task, cell in tasks.items():
            for key in ("auc", "logloss", "n"):
                out[f"{scen}/{task}/{key}"] = cell[key]
    return out


def errors(proc: subprocess.CompletedProcess) -> str:
    """The lines of a failed run worth reading (tracebacks' last lines), for assertion messages."""
    lines = (proc.stdout + proc.stderr).splitlines()
    keep = [ln for ln in lines if "Error" in ln or "error" in ln.split(":")[0]]
    return "\n".join(keep[-20:]) or "\n".join(lines[-40:])
