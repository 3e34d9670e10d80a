"""The product's launch line works from the repo root: torchx local_cwd, dist.ddp, 1x2. Ranks
started by hand (no launcher to stop the others) when one stops: the other fails within
train.collective_timeout_s, naming it."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from msrec_dist.distributed import collectives
from msrec_dist.distributed.context import free_port
from tests.distributed.launch import REPO, TINY_MODEL

pytestmark = pytest.mark.dist


def test_torchx_local_cwd_two_ranks(synth_data, tmp_path):
    torchx = shutil.which("torchx", path=os.path.dirname(sys.executable))
    assert torchx, "torchx is installed with the project's requirements"
    run_dir = tmp_path / "run"
    cmd = [torchx, "run", "-s", "local_cwd", "dist.ddp", "-j", "1x2", "--script", "msrec_dist/train.py", "--",
           "--config", "configs/msrec_full.yaml", "--data", synth_data,
           "--set", f"run.dir={run_dir}", "train.max_steps=5", *TINY_MODEL]
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((run_dir / "final_metrics.json").read_text())
    assert result["world_size"] == 2 and result["steps"] == 5
    # one host, all tables replicated: sums through shared memory (where the C++ op is built) and
    # the embedding through the replicated tables' kernel
    assert result["host_reduce"] == (collectives.shm_op_missing() is None)
    assert result["local_lookup"] is True
    assert "sums over ranks: " in proc.stdout + proc.stderr
    plan = json.loads((run_dir / "plan.json").read_text())["model.embedding.ebc"]
    # the synthetic tables are all under sharding.replicate_max_mb (1 MB): replicated on both ranks
    assert {t["sharding_type"] for t in plan.values()} == {"data_parallel"}


@pytest.mark.parametrize("host_reduce", [
    pytest.param("shm", marks=pytest.mark.skipif(collectives.shm_op_missing() is not None,
                                                 reason="the shared-memory sums need msrec_dist._C")),
    "gloo"])
def test_ranks_without_launcher_one_stops_the_other_fails_in_time(synth_data, tmp_path, host_reduce):
    """Two ranks of train.py started by hand (as without torchrun: nothing ends the others when
    one dies); rank 1 is stopped mid-training (SIGSTOP: it holds its sockets, so only the timeout
    can tell). Rank 0, waiting in a sum, fails after train.collective_timeout_s (not the default
    300 s): through shared memory naming rank 1, through gloo (which cannot tell which rank is
    late) saying that it waited for another rank and which setting bounds that."""
    timeout_s = 2
    run_dir = tmp_path / "run"
    port = str(free_port())
    args = ["--config", "configs/msrec_full.yaml", "--data", synth_data, "--set", f"run.dir={run_dir}",
            f"train.collective_timeout_s={timeout_s}", f"train.host_reduce={host_reduce}", "train.epochs=1000",
            "reader.batch_size=64", *TINY_MODEL]
    procs, logs = [], []
    try:
        for rank in range(2):
            env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                   "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                   "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}  # this tree's package
            logs.append(open(tmp_path / f"rank{rank}.log", "w+"))
            procs.append(subprocess.Popen([sys.executable, "msrec_dist/train.py", *args], cwd=REPO, env=env,
                                          stdout=logs[-1], stderr=subprocess.STDOUT, start_new_session=True))
        log = run_dir / "train_log.jsonl"
        deadline = time.monotonic() + 240
        while not (log.exists() and len(log.read_text().splitlines()) >= 3):  # training, on both ranks
            assert procs[0].poll() is None and procs[1].poll() is None, (tmp_path / "rank0.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no training steps in 240 s"
            time.sleep(0.05)
        os.kill(procs[1].pid, signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            rc = procs[0].wait(timeout=timeout_s + 60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"rank 0 still running {timeout_s + 60} s after rank 1 stopped")
        took = time.monotonic() - stopped
        out = (tmp_path / "rank0.log").read_text()
        assert rc != 0
        said = {"shm": f"rank 0 waited more than {timeout_s} s for rank 1",
                "gloo": f"rank 0 waited more than {timeout_s} s for another rank (train.collective_timeout_s)"}
        assert said[host_reduce] in out, out[-3000:]
        assert took < timeout_s + 30, took  # the timeout plus the exit (imports torn down, 2 busy cores)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()  # SIGKILL ends a stopped process too
                p.wait()
        for f in logs:
            f.close()
