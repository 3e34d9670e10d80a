"""The run directory's contract (msrec_dist/training/run_dir.py, README "What is kept and when"),
in-process on a world of one: a model at the end, a fresh run never writes into another run's
directory, --resume / --overwrite, config.json only after a successful load, the data a checkpoint
was trained on, train_log.jsonl cut back on resume, fsync before publishing, a failed run's log."""
import json
import os
import shutil

import pytest

from msrec_dist.config import load_experiment
from msrec_dist.data.synth import generate
from msrec_dist.distributed.context import init_distributed
from msrec_dist.training import runner
from tests.distributed.launch import REPO, TINY_MODEL


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return generate(str(tmp_path_factory.mktemp("rd_data")), rows=2_000, shards=2, seed=4, eval_rows=400,
                    users=300, items=200)


def cfg_for(data: str, run_dir, *sets: str):
    return load_experiment(os.path.join(REPO, "configs/msrec_full.yaml"), data,
                           tuple(TINY_MODEL) + ("reader.batch_size=128", f"run.dir={run_dir}") + sets)


def run(data, run_dir, *sets, **kw):
    return runner.run(cfg_for(data, run_dir, *sets), init_distributed(), **kw)


def log_entries(run_dir) -> list[dict]:
    """The loss lines and events (the val evaluations' lines left out)."""
    with open(os.path.join(run_dir, "train_log.jsonl")) as f:
        return [e for e in map(json.loads, f) if "val" not in e]


def snapshot(run_dir) -> dict:
    out = {}
    for here, _, files in os.walk(run_dir):
        for name in files:
            path = os.path.join(here, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, run_dir)] = f.read()
    return out


def test_a_model_at_the_end_by_default(data, tmp_path):
    """train.checkpoint_every=0 is 'only at the end': the last step is saved."""
    run(data, tmp_path / "r", "train.max_steps=3")
    assert os.path.exists(tmp_path / "r" / "checkpoints" / "step_3" / ".metadata")


def test_fresh_run_refuses_a_used_run_dir_and_writes_nothing(data, tmp_path):
    run_dir = tmp_path / "r"
    run(data, run_dir, "train.max_steps=3")
    before = snapshot(run_dir)
    with pytest.raises(Exception) as err:
        run(data, run_dir, "train.max_steps=4")
    msg = str(err.value)
    assert str(run_dir) in msg and "--resume" in msg and "--overwrite" in msg and "run.dir" in msg
    assert snapshot(run_dir) == before


def test_overwrite_moves_the_old_run_aside(data, tmp_path):
    run_dir = tmp_path / "r"
    run(data, run_dir, "train.max_steps=3")
    run(data, run_dir, "train.max_steps=4", overwrite=True)
    aside = [p for p in os.listdir(tmp_path) if p.startswith("r.replaced-")]
    assert len(aside) == 1
    assert [e["step"] for e in log_entries(run_dir)] == [1, 2, 3, 4]
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["best", "step_4"]  # best: the val evaluation at the end
    assert [e["step"] for e in log_entries(tmp_path / aside[0])] == [1, 2, 3]


def test_resume_without_a_checkpoint_says_so_and_starts_at_zero(data, tmp_path, capsys):
    run(data, tmp_path / "r", "train.max_steps=2", resume=True)
    assert "no complete checkpoint" in capsys.readouterr().err
    assert [e["step"] for e in log_entries(tmp_path / "r")] == [1, 2]


def test_resume_refuses_a_finished_run_without_checkpoints(data, tmp_path):
    run_dir = tmp_path / "r"
    run(data, run_dir, "train.max_steps=2")
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    with pytest.raises(Exception, match="no complete checkpoint"):
        run(data, run_dir, "train.max_steps=2", resume=True)


def test_relative_run_dir_is_made_absolute_once(data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run(os.path.relpath(data, tmp_path), "rel", "train.max_steps=2")
    assert result["steps"] == 2
    with open(tmp_path / "rel" / "config.json") as f:
        saved = json.load(f)
    assert saved["run"]["dir"] == str(tmp_path / "rel")
    assert saved["data"] == os.path.abspath(data)


def test_rejected_resume_leaves_config_and_plan_alone(data, tmp_path):
    run_dir = tmp_path / "r"
    run(data, run_dir, "train.max_steps=2", "train.checkpoint_every=2")
    before = snapshot(run_dir)
    with pytest.raises(BaseException):  # another tower width: DCP cannot load it (CheckpointException)
        run(data, run_dir, "train.max_steps=4", "model.tower.hidden=[4]", resume=True)
    after = snapshot(run_dir)
    assert after["config.json"] == before["config.json"]
    assert after["plan.json"] == before["plan.json"]


def test_resume_on_other_data_is_refused_unless_asked(data, tmp_path):
    run_dir = tmp_path / "r"
    run(data, run_dir, "train.max_steps=2")
    other = generate(str(tmp_path / "other"), rows=2_400, shards=2, seed=5, eval_rows=400, users=300, items=200)
    with pytest.raises(Exception) as err:
        run(other, run_dir, "train.max_steps=4", resume=True)
    msg = str(err.value)
    assert "differ" in msg and "is gone" in msg and "is new" in msg and "--resume-on-changed-data" in msg
    result = run(other, run_dir, "train.max_steps=4", resume=True, resume_on_changed_data=True)
    assert result["steps"] == 4


def test_resume_cuts_the_log_back_to_the_checkpoint(data, tmp_path):
    """What a kill after step 12 (last checkpoint: step 5) leaves; the resumed log has each step once."""
    run_dir = tmp_path / "r"
    run(data, run_dir, "train.max_steps=12", "train.checkpoint_every=5", "train.keep_checkpoints=10")
    for step in (10, 12):
        shutil.rmtree(run_dir / "checkpoints" / f"step_{step}")
    os.remove(run_dir / "final_metrics.json")
    with open(run_dir / "train_log.jsonl", "a") as f:
        f.write('{"step": 13, "lo')  # a line the kill cut
    run(data, run_dir, "train.max_steps=12", "train.checkpoint_every=5", "train.keep_checkpoints=10", resume=True)
    assert [e["step"] for e in log_entries(run_dir)] == list(range(1, 13))


def test_checkpoint_is_fsynced_before_it_is_published(data, tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    run_dir = tmp_path / "r"
    run(data, run_dir, "train.max_steps=2", "train.checkpoint_every=2")
    root = str(run_dir / "checkpoints")
    final = os.path.join(root, "step_2")
    at = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == final)
    tmp = events[at][1]
    synced_before = {e[1] for e in events[:at] if e[0] == "fsync"}
    files = {os.path.join(tmp, os.path.relpath(os.path.join(h, n), final))
             for h, _, names in os.walk(final) for n in names}
    assert files and files <= synced_before
    assert tmp in synced_before
    assert ("fsync", root) in events[at:]


def test_a_late_error_keeps_the_checkpoint_and_says_where_it_stopped(data, tmp_path, monkeypatch, capsys):
    real_build = runner.build_trainer

    def build(*args, **kw):
        trainer = real_build(*args, **kw)
        real_epoch = trainer.train_epoch
        done = [0]

        def train_epoch(loader, on_step):
            def step(i, loss, batch):
                more = on_step(i, loss, batch)
                done[0] += 1
                if done[0] == 7:
                    raise RuntimeError("bad row group at step 7")
                return more
            return real_epoch(loader, step)

        trainer.train_epoch = train_epoch
        return trainer

    monkeypatch.setattr(runner, "build_trainer", build)
    run_dir = tmp_path / "r"
    with pytest.raises(RuntimeError, match="bad row group"):
        run(data, run_dir, "train.max_steps=12", "train.checkpoint_every=5")
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["step_5"]
    last = log_entries(run_dir)[-1]
    assert last["event"] == "stopped" and last["step"] == 7 and "bad row group" in last["error"]
    assert last["checkpoint"] == str(run_dir / "checkpoints" / "step_5")
    assert "stopped at step 7" in capsys.readouterr().err
    assert not os.path.exists(run_dir / "final_metrics.json")
