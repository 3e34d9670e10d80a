"""The product's launch line works from the repo root: torchx local_cwd, dist.ddp, 1x2."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from msrec_dist.distributed import collectives
from tests.distributed.launch import REPO, TINY_MODEL

pytestmark = pytest.mark.dist


def test_torchx_local_cwd_two_ranks(synth_data, tmp_path):
    torchx = shutil.which("torchx", path=os.path.dirname(sys.executable))
    assert torchx, "torchx is installed with the project's requirements"
    run_dir = tmp_path / "run"
    cmd = [torchx, "run", "-s", "local_cwd", "dist.ddp", "-j", "1x2", "--script", "msrec_dist/train.py", "--",
           "--config", "configs/msrec.yaml", "--data", synth_data,
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
