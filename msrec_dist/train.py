"""Train and evaluate one msrec_dist model.

    msrec-train --config configs/msrec.yaml [--data DATA.yaml] [--set key.sub=value ...]
                [--resume [--resume-on-changed-data] | --overwrite]
                [--init-from RUN_DIR[:best|latest|step_N] [--init-optimizer auto|keep|reset]]
    python msrec_dist/train.py --config configs/msrec.yaml ...   (the same, as a file)
    torchrun --nproc-per-node 2 msrec_dist/train.py --config configs/msrec.yaml
    torchx run -s local_cwd dist.ddp -j 1x2 --script msrec_dist/train.py -- --config configs/msrec.yaml

Parses the config, starts the process group (world of one without a launcher), calls
`msrec_dist.training.runner.run`; writes <run.dir>/final_metrics.json, plan.json, tensorboard/
(and init_from.json with --init-from: docs/transfer.md).
"""
from __future__ import annotations

import argparse
import os
import sys

# Run as a script, Python puts msrec_dist/ itself first on sys.path; drop it so that its
# sub-packages (data, model, dist, metrics) cannot shadow top-level modules of that name.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)
from msrec_dist.config import load_experiment  # noqa: E402  (torch-free)
from msrec_dist.runtime import prepare_process  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="experiment YAML, e.g. configs/msrec.yaml")
    p.add_argument("--data", help="data config YAML (overrides the experiment's `data:`)")
    # nargs="+" as well as repeatable: torchx refuses a script argument given twice
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override config values, e.g. --set train.epochs=2 reader.batch_size=512")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint in <run.dir>/checkpoints (from step 0, "
                        "said on stderr, where there is none and no finished run)")
    p.add_argument("--resume-on-changed-data", action="store_true",
                   help="with --resume: continue at the saved row position although the data files (paths, "
                        "sizes, row counts) differ from the checkpoint's")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in a run.dir that holds one: its contents are first moved aside to "
                        "<run.dir>.replaced-<time> (a fresh run refuses a non-empty run.dir without this)")
    p.add_argument("--init-from", metavar="RUN_DIR[:best|latest|step_N]",
                   help="start this new run from another run's checkpoint (fine-tuning, or warm-starting "
                        "retraining on new data): every table and module of the same shape is loaded, at any "
                        "world size; a table with more rows keeps its old rows; the rest starts fresh. "
                        "Without a suffix: checkpoints/best where the run has one, else the newest step_N. "
                        "Training then starts at step 0 with this run's own LR schedule; the loaded, fresh and "
                        "mismatched parameters are printed and written to <run.dir>/init_from.json")
    p.add_argument("--init-optimizer", choices=("auto", "keep", "reset"),
                   help="with --init-from: keep the source's optimizer state (row-wise Adagrad sums, Adam moments) "
                        "or reset it; auto (default): keep where the checkpoint holds it (step_N), reset for best")
    args = p.parse_args(argv)
    if args.init_from and args.resume:
        p.error("--init-from starts a new run from another run's checkpoint; --resume continues this run from its "
                "own (which holds what --init-from loaded): give one of them")
    if args.init_optimizer and not args.init_from:
        p.error("--init-optimizer goes with --init-from")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_experiment(args.config, args.data, tuple(args.overrides))
    prepare_process(cfg.reader.num_workers)  # OpenMP wait policy, malloc thresholds: before torch loads
    from msrec_dist.distributed.context import init_distributed, shutdown, timed_out_waiting
    from msrec_dist.distributed.warm_start import InitFromError
    from msrec_dist.training.run_dir import RunDirError
    from msrec_dist.training.runner import run

    ctx = init_distributed(timeout_s=cfg.train.collective_timeout_s)  # gloo's timeout too
    try:
        run(cfg, ctx, resume=args.resume, overwrite=args.overwrite,
            resume_on_changed_data=args.resume_on_changed_data, init_from=args.init_from,
            init_optimizer=args.init_optimizer or "auto")
    except (RunDirError, InitFromError) as e:
        if ctx.is_main:
            print(f"msrec-train: error: {e}", file=sys.stderr, flush=True)
        return 2
    except RuntimeError as e:
        if not timed_out_waiting(e):
            raise
        # gloo's own words name neither the setting nor the likely cause
        gloo = next((line for line in str(e).splitlines() if "Timed out waiting" in line), "")
        print(f"msrec-train: error: rank {ctx.rank} waited more than {ctx.timeout_s:g} s for another rank "
              f"(train.collective_timeout_s): a rank has stopped, hung or fallen behind "
              f"(the other ranks' logs may say why)\n  gloo: {gloo.strip()}", file=sys.stderr, flush=True)
        return 1
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
