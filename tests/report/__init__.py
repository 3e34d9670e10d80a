"""Tests of msrec_dist/report: the run report (plots and report.html from run directories)."""
