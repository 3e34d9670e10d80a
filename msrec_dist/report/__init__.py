"""The run report: plots and one HTML page from run directories (what training wrote there).

    python -m msrec_dist.report RUN_DIR [RUN_DIR ...] [--out DIR]
      → DIR/report.html + DIR/report/*.png   (DIR: the first RUN_DIR unless --out)

    load.py    a run directory → Run (train_log.jsonl, final_metrics.json, config.json,
               eval_predictions.npz, model_weights.json; each may be missing)
    stats.py   ROC curves and the F1-maximising threshold (numpy)
    plots.py   the PNGs (matplotlib, Agg canvas; no pyplot state)
    build.py   which sections each run has, their plots and tables ("not available" where an
               artifact is missing)
    page.py    the sections → report.html

It reads files only: no torch, nothing of the training or distributed layers.
"""
