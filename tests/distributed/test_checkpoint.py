"""Checkpoint directory rules: only complete step_N directories (with DCP's .metadata) are
ever resumed from; a save cut short by a kill leaves .tmp_step_N, which is ignored."""
import os

from msrec_dist.distributed.checkpoint import Progress, checkpoint_dirs, latest_checkpoint


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


def test_progress_rebatch_keeps_the_global_row_position():
    p = Progress(step=10, batch_in_epoch=6, global_batch=512)
    assert p.rebatch(256).batch_in_epoch == 12  # 2 ranks x 256 -> 1 rank x 256: same rows
    assert Progress(batch_in_epoch=6, global_batch=512).rebatch(1024).batch_in_epoch == 3
    assert Progress(batch_in_epoch=5, global_batch=512).rebatch(512).batch_in_epoch == 5
