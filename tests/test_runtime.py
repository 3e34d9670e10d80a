"""msrec_dist/runtime.py: the OpenMP wait policy follows the reader's workers, configs load
without torch (so train.py can choose it before torch loads), and the malloc thresholds do what
they are there for. Each case runs in a fresh interpreter."""
import subprocess
import sys

import pytest


def run_py(code: str, env_extra: dict | None = None) -> str:
    import os
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_WAIT_POLICY", "MSREC_MALLOC_TUNE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MSREC_BIND_CORES")}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                          env=env).stdout.strip()


def test_config_loads_without_torch():
    code = ("import sys; from msrec_dist.config import load_experiment; "
            "cfg = load_experiment('configs/msrec_full.yaml', None, ()); "
            "print(cfg.reader.num_workers, 'torch' in sys.modules)")
    workers, torch_loaded = run_py(code).split()
    assert torch_loaded == "False"


@pytest.mark.parametrize("workers,policy", [(0, "unset"), (2, "PASSIVE")])
def test_wait_policy_follows_reader_workers(workers, policy):
    code = f"import os; from msrec_dist.runtime import prepare_process; prepare_process({workers}); " \
           "print(os.environ.get('OMP_WAIT_POLICY', 'unset'))"
    assert run_py(code) == policy
    assert run_py(code, {"OMP_WAIT_POLICY": "ACTIVE"}) == "ACTIVE"  # a user's setting wins


HEAP = """
import ctypes, ctypes.util
from msrec_dist.runtime import prepare_process
prepare_process(0)
import torch

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallinfo2.restype = MallInfo2
x = torch.ones(2 << 20)  # 8 MiB of activations
mmapped = libc.mallinfo2().hblkhd  # bytes in mmapped blocks
del x
kept = libc.mallinfo2().fordblks  # free bytes the heap keeps for the next allocation
print(int(mmapped >= 8 << 20), int(kept >= 8 << 20))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_malloc_thresholds_keep_freed_blocks():
    """What the setting is for: a block of a step's size comes from the heap and stays there once
    freed (no fresh mmap and page faults next step); glibc's default maps it and unmaps it on free.
    (Page-fault counts themselves depend on transparent huge pages, so the test reads malloc's
    own accounting, mallinfo2.)"""
    assert run_py(HEAP) == "0 1"
    assert run_py(HEAP, {"MSREC_MALLOC_TUNE": "0"}) == "1 0"


def test_rank_cores_split_the_machine_between_local_ranks():
    from msrec_dist.runtime import rank_cores

    assert [rank_cores(list(range(16)), 16, r, 4) for r in range(4)] == [
        [0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    assert [rank_cores([0, 1], 2, r, 2) for r in range(2)] == [[0], [1]]
    assert rank_cores([0, 1], 2, 0, 1) is None  # one rank: the whole machine
    assert rank_cores([1], 2, 0, 2) is None  # already bound by someone (taskset, numactl, a scheduler)
    assert rank_cores([0, 1], 2, 0, 4) is None  # more ranks than cores


@pytest.mark.skipif(not hasattr(__import__("os"), "sched_setaffinity"), reason="no sched_setaffinity")
def test_prepare_process_binds_each_local_rank():
    import os

    code = "import os; from msrec_dist.runtime import prepare_process; prepare_process(0); " \
           "print(sorted(os.sched_getaffinity(0)))"
    cores = sorted(os.sched_getaffinity(0))
    unbound = str(cores)
    assert run_py(code) == unbound  # no launcher env
    if len(cores) != os.cpu_count() or len(cores) < 2:
        pytest.skip("this process is already bound or has one core")
    half = len(cores) // 2
    ranks = [run_py(code, {"LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": "2"}) for r in range(2)]
    assert ranks == [str(cores[:half]), str(cores[half:2 * half])]
    assert run_py(code, {"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MSREC_BIND_CORES": "0"}) == unbound
