"""The report from hand-made run directories (tests/report/fake_run.py, the training side's
contract): every section's plot, several runs compared, "not available" for missing artifacts,
a clear error for a path that is no run directory, the CLI."""
from __future__ import annotations

import os
import re

import pytest

from msrec_dist.report.__main__ import main
from msrec_dist.report.build import build_report
from msrec_dist.report.load import NotARunDir, load_run
from tests.report.checks import check_report
from tests.report.fake_run import write_run


def sections(page: str) -> dict[str, str]:
    """h3 title → its HTML, per run in order (titles repeat across runs: the last one wins)."""
    parts = re.split(r"<h3>([^<]+)</h3>", page)
    return dict(zip(parts[1::2], parts[2::2]))


def test_a_full_run_has_every_plot(tmp_path):
    run = write_run(tmp_path / "msrec")
    path = build_report([run])
    assert path == os.path.join(run, "report.html")  # default --out: the run directory
    pngs = check_report(run)
    assert pngs == sorted(["eval_auc.png", "msrec-loss.png", "msrec-val_auc.png", "msrec-roc.png",
                           "msrec-gates-level_0.png", "msrec-gates-level_1.png", "msrec-mixing.png",
                           "msrec-samples_per_s.png"])
    with open(path) as f:
        page = f.read()
    assert "not available" not in page
    roc = sections(page)["ROC and best-F1 threshold (eval split)"]
    for cell in ("<td>home</td><td>click</td>", "<td>cart</td><td>convert</td>", "<td>overall</td><td>click</td>"):
        assert cell in roc
    assert "<th>F1</th><th>precision</th><th>recall</th>" in roc


def test_several_runs_plot_per_run_and_compare_in_one_bar_chart(tmp_path):
    a = write_run(tmp_path / "x" / "run", seed=0)
    b = write_run(tmp_path / "y" / "run", model="ple", weights="ple", seed=1)  # same name: labels x/run, y/run
    out = tmp_path / "out"
    build_report([a, b], str(out))
    pngs = check_report(str(out))
    assert not os.path.exists(os.path.join(a, "report.html"))
    assert "eval_auc.png" in pngs
    assert {p.split("-")[0] for p in pngs if p != "eval_auc.png"} == {"x_run", "y_run"}
    with open(out / "report.html") as f:
        page = f.read()
    assert "<h2>Run x/run</h2>" in page and "<h2>Run y/run</h2>" in page
    table = page.split("Eval AUC per scenario × task across runs</h2>")[1].split("</table>")[0]
    assert "<td>x/run</td>" in table and "<td>y/run</td>" in table
    assert "not available: the model (ple) has no balanced mixing" in page


def test_missing_artifacts_say_not_available(tmp_path):
    """An old run: loss lines only (no samples/s, no val lines), no predictions, no weights file."""
    old = write_run(tmp_path / "old", val=False, samples_per_s=False, predictions=False, weights=None)
    build_report([old])
    assert check_report(old) == ["eval_auc.png", "old-loss.png"]
    with open(os.path.join(old, "report.html")) as f:
        by_title = sections(f.read())
    assert "no val evaluations" in by_title["Validation AUC over training"]
    assert "not available: eval_predictions.npz not found" in by_title["ROC and best-F1 threshold (eval split)"]
    assert "not available: model_weights.json not found" in by_title["Gate weights of the CGC levels (eval split)"]
    assert "not available: no samples_per_s" in by_title["Samples/s over the run"]


def test_a_model_without_gates_and_a_run_without_final_metrics(tmp_path):
    star = write_run(tmp_path / "star", model="star", weights="none")
    unfinished = write_run(tmp_path / "unfinished", final=False, predictions=False, weights=None)
    build_report([star, unfinished])
    check_report(star)
    with open(os.path.join(star, "report.html")) as f:
        page = f.read()
    assert "not available: the model (star) has no CGC gates" in page
    assert "not available for unfinished (no final_metrics.json)" in page


def test_unreadable_artifacts_are_reported_not_raised(tmp_path):
    run = write_run(tmp_path / "r")
    with open(os.path.join(run, "model_weights.json"), "w") as f:
        f.write("{not json")
    with open(os.path.join(run, "eval_predictions.npz"), "wb") as f:
        f.write(b"truncated")
    with open(os.path.join(run, "train_log.jsonl"), "a") as f:
        f.write('{"step": 45, "lo')  # a run killed mid-line
    loaded = load_run(run)
    assert "unreadable" in loaded.notes["model_weights.json"]
    assert "1 line(s)" in loaded.notes["train_log.jsonl"]
    build_report([run])
    with open(os.path.join(run, "report.html")) as f:
        page = f.read()
    assert "not available: model_weights.json unreadable" in page
    assert "not available: eval_predictions.npz unreadable" in page


def test_a_second_report_replaces_the_first_ones_plots(tmp_path):
    run = write_run(tmp_path / "r")
    build_report([run])
    os.remove(os.path.join(run, "eval_predictions.npz"))
    build_report([run])
    assert "r-roc.png" not in check_report(run)


def test_not_a_run_directory_is_named(tmp_path, capsys):
    good = write_run(tmp_path / "good")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NotARunDir, match=re.escape(str(empty))):
        build_report([good, str(empty)])
    assert main([good, str(tmp_path / "nowhere")]) == 2
    assert f"{tmp_path / 'nowhere'}: no such directory" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(good, "report.html"))  # nothing written


def test_cli_prints_the_report_path(tmp_path, capsys):
    run = write_run(tmp_path / "r")
    assert main([run, "--out", str(tmp_path / "o")]) == 0
    assert capsys.readouterr().out.strip() == f"report: {tmp_path / 'o' / 'report.html'}"
    check_report(str(tmp_path / "o"))
