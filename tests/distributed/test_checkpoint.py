"""Checkpoint directory rules: only complete step_N directories (with DCP's .metadata) are
ever resumed from; a save cut short by a kill leaves .tmp_step_N, which is ignored."""
import os

import pytest

from msrec_dist.distributed.checkpoint import Progress, checkpoint_dirs, latest_checkpoint, read_progress


def _mk(root, name, complete=True):
    os.makedirs(os.path.join(root, name))
    if complete:
        open(os.path.join(root, name, ".metadata"), "w").close()


def test_latest_ignores_partial_and_temporary(tmp_path):
    root = str(tmp_path)
    assert latest_checkpoint(root) is None
    _mk(root, "step_8")
    _mk(root, "step_16")
    _mk(root, ".tmp_step_24")  # a save the kill interrupted
    _mk(root, "step_32", complete=False)  # no .metadata: never finished
    _mk(root, "step_x")
    assert [s for s, _ in checkpoint_dirs(root)] == [8, 16]
    assert latest_checkpoint(root) == os.path.join(root, "step_16")


def test_progress_in_rows_restarts_at_the_same_rows_for_any_global_batch():
    p = Progress(step=10, rows_in_epoch=6 * 512)
    assert p.start_batch(256) == 12  # 2 ranks x 256 -> 1 rank x 256: same rows
    assert p.start_batch(1024) == 3
    assert p.start_batch(512) == 6
    assert Progress(rows_in_epoch=5 * 512).start_batch(1024) == 2  # rounded down: a batch's rows again


def test_read_progress_refuses_a_checkpoint_without_progress_json(tmp_path):
    _mk(str(tmp_path), "step_8")
    with pytest.raises(RuntimeError, match="progress.json"):
        read_progress(os.path.join(str(tmp_path), "step_8"))
