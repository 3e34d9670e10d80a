"""A torchrun worker for tests: build the train state of a config (its own table layout), load a
checkpoint into it, and save each rank's local embedding tables and their row-wise Adagrad state.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed/layout_worker.py \
        CHECKPOINT OUT_DIR --data DATA.yaml --set key=value ...

writes OUT_DIR/rank<r>.pt = {table: {"weight": [rows, D], "momentum1": [rows]}} for the tables
whose rows live on rank r (table_wise: the tables placed there; replicated: every table).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from msrec_dist.config import load_experiment  # noqa: E402
from msrec_dist.data.schema import load_data_config  # noqa: E402
from msrec_dist.distributed.checkpoint import load_checkpoint  # noqa: E402
from msrec_dist.distributed.context import init_distributed, shutdown  # noqa: E402
from msrec_dist.distributed.model_parallel import build_train_state  # noqa: E402

PREFIX = "model.embedding.ebc.embedding_bags."


def local_rows(value) -> torch.Tensor | None:
    """A table-wise ShardedTensor's whole local table, a replicated tensor as is, None if not here."""
    if hasattr(value, "local_shards"):
        shards = value.local_shards()
        return shards[0].tensor.detach().clone() if shards else None
    return value.detach().clone()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint")
    p.add_argument("out")
    p.add_argument("--config", default="configs/msrec_full.yaml")
    p.add_argument("--data", required=True)
    p.add_argument("--set", dest="overrides", nargs="*", default=[])
    args = p.parse_args()
    cfg = load_experiment(args.config, args.data, tuple(args.overrides))
    ctx = init_distributed()
    try:
        state = build_train_state(cfg, load_data_config(cfg.data), ctx, total_steps=100)
        load_checkpoint(args.checkpoint, state, ctx)
        optim = state.optimizer.state_dict()["state"]
        out = {}
        for key, value in state.model.state_dict().items():
            if key.startswith(PREFIX) and (weight := local_rows(value)) is not None and weight.numel():
                table = key[len(PREFIX):].rsplit(".", 1)[0]
                out[table] = {"weight": weight, "momentum1": local_rows(optim[f"sparse.{key}"][f"{table}.momentum1"])}
        os.makedirs(args.out, exist_ok=True)
        torch.save(out, os.path.join(args.out, f"rank{ctx.rank}.pt"))
    finally:
        shutdown()


if __name__ == "__main__":
    main()
