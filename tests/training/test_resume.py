"""Resuming with another global batch (batch size or world size): progress is counted in rows, so
the epochs are trained to their end, train_samples counts every sample once and
train_samples_per_s covers this process only."""
import pytest

from tests.training.test_run_dir import data, run  # noqa: F401  (the module's data fixture)


@pytest.mark.parametrize("first,then", [(64, 128), (128, 64)])
def test_resume_on_another_global_batch_trains_every_epoch_to_its_end(data, tmp_path, first, then):  # noqa: F811
    run_dir = tmp_path / "r"
    # 2000 rows: epoch 0 whole, then 512 rows of epoch 1 (stopped by max_steps, as a kill would)
    steps = 2000 // first + 1 + 512 // first
    run(data, run_dir, f"reader.batch_size={first}", "train.epochs=2", f"train.max_steps={steps}")
    result = run(data, run_dir, f"reader.batch_size={then}", "train.epochs=2", resume=True)
    left = -(-(2000 - 512) // then)  # epoch 1's other rows, in batches of `then`
    assert result["steps"] == steps + left
    assert result["train_samples"] == 2 * 2000
    assert result["train_samples_per_s"] == pytest.approx((2000 - 512) / result["wall_s"])
