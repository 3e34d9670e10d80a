"""Export a trained run for serving: a torch.export program and its manifest.

    python -m msrec_dist.export RUN_DIR --out DIR [--checkpoint best|latest|step_N] [--quantize int8]
                                [--kernels auto|cpp|reference] [--no-compile] [--overwrite]

Writes DIR/model.pt2 (inputs: per sparse feature its ids and bag lengths, the dense columns, the
scenario ids; output: one probability per task, any batch size), DIR/manifest.json (features,
order, tasks, scenarios, tables and how raw ids become rows, versions, the checkpoint step) and,
where the program calls the C++ kernels, DIR/msrec_ops.so; unless --no-compile, also
DIR/model.aoti.pt2, the same program compiled by AOTInductor for this CPU (predict prefers it).
Logic: msrec_dist/serving/export.py.
"""
from __future__ import annotations

import argparse
import json
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m msrec_dist.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="a training run directory (run.dir)")
    p.add_argument("--out", required=True, help="directory to write model.pt2 and manifest.json into")
    p.add_argument("--checkpoint", default="best",
                   help="best (the weights chosen on val; the default), latest, or step_N")
    p.add_argument("--quantize", choices=["int8"], help="embedding tables row-wise int8 (fbgemm's kernels)")
    p.add_argument("--kernels", choices=["auto", "cpp", "reference"],
                   help="override model.kernels: reference gives a program of torch ops only")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="skip model.aoti.pt2 (AOTInductor, compiled for this CPU: faster, ~15-25 s to build)")
    p.add_argument("--overwrite", action="store_true", help="move a non-empty DIR aside (DIR.replaced-<time>) first")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from msrec_dist.data.schema import DataError
    from msrec_dist.serving.export import export_run
    from msrec_dist.typed_yaml import ConfigError

    try:
        manifest = export_run(args.run_dir, args.out, args.checkpoint, args.quantize, args.kernels, args.overwrite,
                              args.compile)
    except (ConfigError, DataError) as e:
        print(f"msrec-export: error: {e}", file=sys.stderr, flush=True)
        return 2
    sizes = manifest["table_bytes"]
    print(json.dumps({"out": args.out, "checkpoint": manifest["checkpoint"]["step"], "quantize": manifest["quantize"],
                      "table_bytes": sizes, "ops": manifest["ops"]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
