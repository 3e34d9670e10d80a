"""Score a data split with an exported model (python -m msrec_dist.export).

    python -m msrec_dist.predict --model DIR --data DATA.yaml [--split eval] --out preds.parquet
                                 [--metrics] [--batch-size 4096] [--overwrite]
    torchrun --nproc-per-node 2 -m msrec_dist.predict ...   (each rank its share: preds.parquet/part-r<rank>.parquet)

Writes the input's row ids (`row`: position in the split's sorted files), `scenario` and
`p_<task>` per row; --metrics also writes the per scenario × task table (<out>.metrics.json, or
metrics.json in the directory on several ranks). Logic: msrec_dist/serving/predict.py.
"""
from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m msrec_dist.predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="an export directory (model.pt2, manifest.json)")
    p.add_argument("--data", required=True, help="data config YAML whose split to score")
    p.add_argument("--split", default="eval", choices=["train", "val", "eval"])
    p.add_argument("--out", required=True, help="Parquet file (one rank) or directory of part files (several)")
    p.add_argument("--metrics", action="store_true", help="also the per scenario x task AUC/logloss table")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--program", default="auto", choices=["auto", "aoti", "export"],
                   help="model.aoti.pt2 (compiled; auto: where present and loadable) or model.pt2")
    p.add_argument("--overwrite", action="store_true", help="move an existing --out aside (<out>.replaced-<time>) first")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import os

    from msrec_dist.data.schema import DataError
    from msrec_dist.serving.predict import predict
    from msrec_dist.typed_yaml import ConfigError

    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = 0
    if world_size > 1:
        from msrec_dist.distributed.context import init_distributed

        rank = init_distributed().rank
    try:
        result = predict(args.model, args.data, args.split, args.out, args.metrics, args.batch_size,
                         args.overwrite, rank, world_size, program_kind=args.program)
    except (ConfigError, DataError) as e:
        print(f"msrec-predict: rank {rank}: error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        if world_size > 1:
            from msrec_dist.distributed.context import shutdown

            shutdown()
    if rank == 0:
        print(f"{result['rows']} rows scored into {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
