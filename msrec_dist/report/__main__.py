"""python -m msrec_dist.report RUN_DIR [RUN_DIR ...] [--out DIR]: writes DIR/report.html and
DIR/report/*.png (DIR: the first RUN_DIR unless --out) and prints the page's path."""
from __future__ import annotations

import argparse
import sys

from msrec_dist.report.build import build_report
from msrec_dist.report.load import NotARunDir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m msrec_dist.report", description=(
        "Plots and an HTML page from training run directories: loss and val AUC curves, eval AUC "
        "compared across the runs, ROC and best-F1 thresholds, gate and mixing weights, samples/s."))
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="a run directory (run.dir of a training run)")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="where report.html and report/*.png go (default: the first RUN_DIR)")
    args = parser.parse_args(argv)
    try:
        path = build_report(args.run_dirs, args.out)
    except NotARunDir as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
