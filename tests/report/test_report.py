"""The report from a short real run: msrec (2 CGC levels + balanced mixing) trained in-process
for a few steps on small synthetic data with val evaluations, then `python -m msrec_dist.report`
on its run directory: every section has its plot, each PNG is a real non-blank image that
report.html references, and nothing says "not available"."""
from __future__ import annotations

import os

from msrec_dist.config import load_experiment
from msrec_dist.data.synth import generate
from msrec_dist.distributed.context import init_distributed
from msrec_dist.report.__main__ import main
from msrec_dist.training import runner
from tests.distributed.launch import REPO, TINY_MODEL
from tests.report.checks import check_report


def test_report_of_a_short_real_run(tmp_path, capsys):
    data = generate(str(tmp_path / "data"), rows=1_536, shards=2, seed=3, eval_rows=600, users=300, items=200)
    run_dir = tmp_path / "msrec"
    cfg = load_experiment(os.path.join(REPO, "configs/msrec_full.yaml"), data, tuple(TINY_MODEL) + (
        "reader.batch_size=128", "train.max_steps=12", "train.eval_every=4", "train.log_every=2",
        f"run.dir={run_dir}"))
    runner.run(cfg, init_distributed())
    capsys.readouterr()
    assert main([str(run_dir)]) == 0
    assert capsys.readouterr().out.strip() == f"report: {run_dir / 'report.html'}"
    pngs = check_report(str(run_dir))
    assert pngs == sorted(["eval_auc.png", "msrec-loss.png", "msrec-val_auc.png", "msrec-roc.png",
                           "msrec-gates-level_0.png", "msrec-gates-level_1.png", "msrec-mixing.png",
                           "msrec-samples_per_s.png"])
    with open(run_dir / "report.html") as f:
        page = f.read()
    assert "not available" not in page
    for step in (4, 8, 12):  # the val table has a row per evaluation
        assert f"<tr><td>{step}</td>" in page
