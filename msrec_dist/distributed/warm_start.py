"""Start a run from another run's checkpoint: fine-tuning and warm-started periodic retraining.

    RUN_DIR[:best|latest|step_N] ──resolve_source──► Source (checkpoint dir, its DCP metadata)
    TrainState (built as for a fresh run: seeded dense init, deterministic tables)
      ──init_from──► every entry of {"model": DMP state dict, "optim": optimizer state (keep)}
        same shape in the source                 → loaded (dcp.load: reshards 2 ranks ↔ 1 rank,
                                                   table_wise ↔ replicated ↔ row_wise)
        a table (or its row-wise optimizer state) with more rows now, the rest equal
                                                 → grown: rows [0, N_old) loaded, the rest keep
                                                   their fresh init (zero optimizer state)
        absent from the source                   → fresh (this run's init)
        another shape (shrunk table, other dim, other width), or a hashed table whose bucket
        count changed (every id's row moved)     → mismatched, fresh
      ──► report dict (format_report: the table the runner prints and writes to init_from.json)

Optimizer state: "keep" loads the source's sparse (row-wise) and dense (Adam moments, step)
state where it matches, and gives every other entry the state a new optimizer starts with (zeros:
Adam, Adagrad and row-wise Adagrad all start there); "reset" leaves this run's fresh optimizers;
"auto" keeps where the checkpoint holds optimizer state (step_N) and resets otherwise (best holds
weights only). The LR schedule and the step count are this run's own (from step 0); RNG state is
not taken.

A grown table is loaded without reading more than needed: a holder of the saved shape is made of
the parts of this rank's shards below row N_old (a ShardedTensor whose global metadata is the
target's cut at that row, the same on every rank without a collective; a plain tensor for a
replicated table, which every rank holds whole anyway), DCP fills it, and its rows are copied into
the shards. Use from code: `init_from(state, "runs/pretrain:best", ctx, optimizer="reset")` right
after build_train_state, before the first step (training/runner.py does this for --init-from).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, replace
from typing import Literal, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, ShardMetadata
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from msrec_dist.distributed.checkpoint import BEST_DIR, BEST_FILE, best_checkpoint, checkpoint_dirs
from msrec_dist.distributed.context import DistContext
from msrec_dist.distributed.model_parallel import TrainState
from msrec_dist.features import FeatureSpec

OptimizerMode = Literal["auto", "keep", "reset"]
STATUSES = ("loaded", "grown", "fresh", "mismatched")
_WHICH = re.compile(r"^(best|latest|step_\d+)$")
# a table's weight, or its optimizer state ("sparse.model.embedding.ebc.embedding_bags.<t>.weight.<t>.momentum1")
_TABLE = re.compile(r"\.embedding_bags\.([^.]+)\.weight(?:\.|$)")


class InitFromError(ValueError):
    """--init-from names no usable checkpoint, or asks for what it does not hold."""


@dataclass
class Source:
    spec: str  # as given: RUN_DIR[:which]
    run_dir: str  # absolute
    path: str  # the checkpoint directory (DCP)
    which: str  # best | latest | step_N (the one chosen where the spec named none)
    step: Optional[int]  # the source run's optimizer step of these weights
    metadata: dict  # DCP state_dict_metadata: fqn → TensorStorageMetadata | BytesStorageMetadata

    @property
    def has_optimizer(self) -> bool:
        return any(k.startswith("optim.") for k in self.metadata)


def resolve_source(spec: str) -> Source:
    """RUN_DIR[:best|latest|step_N] → the checkpoint to start from (no collective).

    Without a suffix: checkpoints/best where the run has one (the weights chosen on val), else the
    newest step_N. RUN_DIR may also be a checkpoint directory itself (one holding DCP's .metadata).
    """
    run_dir, which = spec, None
    head, sep, tail = spec.rpartition(":")
    if sep and _WHICH.match(tail):
        run_dir, which = head, tail
    run_dir = os.path.abspath(os.path.expanduser(run_dir))
    if os.path.exists(os.path.join(run_dir, ".metadata")):  # a checkpoint directory, given directly
        if which is not None:
            raise InitFromError(f"--init-from {spec}: {run_dir} is a checkpoint itself; give it without ':{which}'")
        path, which = run_dir, os.path.basename(run_dir)
        run_dir = os.path.dirname(os.path.dirname(run_dir))
        m = re.match(r"^step_(\d+)$", which)
        step = int(m.group(1)) if m else _best_step(path)
        return Source(spec, run_dir, path, which, step, _metadata(path))
    if not os.path.isdir(run_dir):
        raise InitFromError(f"--init-from {spec}: no such directory {run_dir}")
    root = os.path.join(run_dir, "checkpoints")
    steps = checkpoint_dirs(root)
    best = best_checkpoint(root)
    if which is None:
        which = "best" if best is not None else "latest"
    if which == "best":
        if best is None:
            raise InitFromError(f"--init-from {spec}: {run_dir} has no best checkpoint (written where the run has a "
                                "val split and train.keep_best); use :latest or :step_N")
        path, step = best[0], int(best[1]["step"])
    elif which == "latest":
        if not steps:
            raise InitFromError(f"--init-from {spec}: no complete checkpoint under {root}")
        step, path = steps[-1]
    else:
        found = dict(steps).get(int(which.split("_")[1]))
        if found is None:
            raise InitFromError(f"--init-from {spec}: no complete checkpoint {which} under {root} "
                                f"(have: {[f'step_{s}' for s, _ in steps] or 'none'})")
        path, step = found, int(which.split("_")[1])
    return Source(spec, run_dir, path, which, step, _metadata(path))


def _best_step(path: str) -> Optional[int]:
    file = os.path.join(path, BEST_FILE)
    if os.path.basename(path) != BEST_DIR or not os.path.exists(file):
        return None
    with open(file) as f:
        return int(json.load(f)["step"])


def _metadata(path: str) -> dict:
    return dict(dcp.FileSystemReader(path).read_metadata().state_dict_metadata)


def _leaves(prefix: str, value, out: dict) -> dict:
    """Nested dicts → {dotted key: tensor}, the names DCP gives the same entries when it saves."""
    if isinstance(value, dict):
        for k, v in value.items():
            _leaves(f"{prefix}.{k}", v, out)
    elif isinstance(value, (torch.Tensor, ShardedTensor)):
        out[prefix] = value
    return out


def _hashed_tables(features: Optional[FeatureSpec]) -> set[str]:
    return {f.table for f in features.sparse if f.hash_buckets is not None} if features is not None else set()


def classify(target: tuple[int, ...], source, key: str, hashed: set[str]) -> tuple[str, str]:
    """(status, reason) of one entry: its shape here against the source's metadata entry (or None)."""
    if source is None:
        return "fresh", "not in the source"
    if not isinstance(source, TensorStorageMetadata):
        return "mismatched", "not a tensor in the source"
    saved = tuple(source.size)
    if saved == target:
        return "loaded", ""
    table = _TABLE.search(key)
    if (table and len(saved) == len(target) >= 1 and target[0] > saved[0] and saved[1:] == target[1:]):
        if table.group(1) in hashed:  # hash(id) % N moves with N: the old rows belong to other ids now
            return "mismatched", f"hashed table, buckets {saved[0]} -> {target[0]}: every id's row moved"
        return "grown", f"rows [0, {saved[0]}) loaded, [{saved[0]}, {target[0]}) fresh"
    return "mismatched", f"shape {list(saved)} in the source"


def _old_rows_holder(value, rows: int):
    """A tensor of the saved shape (`rows` rows, the other dims as `value`) holding what this rank
    has of rows [0, rows): for a ShardedTensor, its shards cut at that row (the global metadata
    cut the same way on every rank, so no collective: the ranks need not even hold the same
    optimizer keys); for a plain tensor (a replicated table), a plain tensor."""
    if not isinstance(value, ShardedTensor):
        return torch.empty((rows, *value.shape[1:]), dtype=value.dtype, device=value.device)

    def cut(md: ShardMetadata) -> Optional[ShardMetadata]:
        take = min(rows, md.shard_offsets[0] + md.shard_sizes[0]) - md.shard_offsets[0]
        return ShardMetadata(list(md.shard_offsets), [take, *md.shard_sizes[1:]], md.placement) if take > 0 else None

    local = []
    for shard in value.local_shards():
        if (md := cut(shard.metadata)) is not None:
            local.append(Shard(torch.empty(md.shard_sizes, dtype=shard.tensor.dtype, device=shard.tensor.device), md))
    glob = value.metadata()
    glob = replace(glob, shards_metadata=[m for m in map(cut, glob.shards_metadata) if m is not None],
                   size=torch.Size([rows, *glob.size[1:]]))
    return ShardedTensor._init_from_local_shards_and_global_metadata(local, glob)


@torch.no_grad()
def _copy_old_rows(holder, value) -> None:
    """Rows of `holder` ([N_old, ...]) into the same rows of `value` ([N_new, ...], N_new > N_old)."""
    if not isinstance(value, ShardedTensor):
        value[: holder.size(0)].copy_(holder)
        return
    mine = {tuple(s.metadata.shard_offsets): s.tensor for s in value.local_shards()}
    for part in holder.local_shards():
        mine[tuple(part.metadata.shard_offsets)][: part.tensor.size(0)].copy_(part.tensor)


def resolve_optimizer(mode: OptimizerMode, source: Source) -> str:
    """keep | reset for `mode` (auto: keep where the checkpoint holds optimizer state)."""
    if mode == "auto":
        return "keep" if source.has_optimizer else "reset"
    if mode == "keep" and not source.has_optimizer:
        raise InitFromError(f"--init-optimizer keep: {source.path} holds no optimizer state ({source.which} "
                            "checkpoints hold the weights only); start from a step_N checkpoint (:latest) or "
                            "use --init-optimizer reset")
    if mode not in ("keep", "reset"):
        raise InitFromError(f"--init-optimizer must be auto, keep or reset, got {mode!r}")
    return mode


def check_source(spec: str, optimizer: OptimizerMode, run_dir: str, resume: bool) -> Source:
    """The runner's checks of --init-from before anything is written: a fresh run only, another
    run directory than this run's own, a checkpoint that holds what `optimizer` asks for."""
    if resume:
        raise InitFromError("--init-from starts a new run from another run's checkpoint; --resume continues this "
                            "run from its own (which holds what --init-from loaded): give one of them")
    src = resolve_source(spec)
    here = os.path.abspath(run_dir)
    if src.run_dir == here or src.path.startswith(here + os.sep):
        raise InitFromError(f"--init-from {spec}: that is this run's own directory ({here}); continue it with "
                            "--resume, or give the new run another run.dir")
    resolve_optimizer(optimizer, src)
    return src


def init_from(state: TrainState, source: str | Source, ctx: DistContext, optimizer: OptimizerMode = "auto",
              features: Optional[FeatureSpec] = None) -> dict:
    """Load into `state` (fresh from build_train_state) what matches of `source`'s checkpoint:
    weights, and with optimizer keep the optimizer state. Collective: every rank calls it.

    features: the run's FeatureSpec, to tell hashed tables (their growth is a mismatch); None: no
    table is taken for hashed. Returns the report (format_report prints it): per entry its status
    (loaded / grown / fresh / mismatched) and shapes, and the source's entries this model lacks.
    """
    src = source if isinstance(source, Source) else resolve_source(source)
    mode = resolve_optimizer(optimizer, src)
    hashed = _hashed_tables(features)
    model_sd = state.model.state_dict()
    full = {"model": model_sd}
    if mode == "keep":
        # Adam creates its moments at its first step: a step on zero gradients creates them, in
        # place for DCP to fill. With weight decay that step moves the weights: put them back.
        before = [p.detach().clone() for p in state.dense_params]
        state.dense_optimizer.init_state()
        with torch.no_grad():
            for p, w in zip(state.dense_params, before):
                p.copy_(w)
        full["optim"] = state.optimizer.state_dict()
    # entry → (status, reason): the weights first, each against the source's metadata
    weights = {k: classify(tuple(v.size()), src.metadata.get(f"model.{k}"), k, hashed) for k, v in model_sd.items()}
    entries = {f"model.{k}": (v, *weights[k]) for k, v in model_sd.items()}
    for param, param_state in full.get("optim", {}).get("state", {}).items():
        # param: "sparse.<model key>" / "dense.<model key>"; its state {name: tensor} loads whole
        # or not at all (moments without their step count, or of other weights, mean nothing)
        flat = {f"optim.state.{param}{k}": v for k, v in _leaves("", param_state, {}).items()}
        status = {k: classify(tuple(v.size()), src.metadata.get(k), k, hashed) for k, v in flat.items()}
        weight = weights.get(param.split(".", 1)[1], ("loaded", ""))[0]
        whole = weight in ("loaded", "grown") and all(st in ("loaded", "grown") for st, _ in status.values())
        for k, v in flat.items():
            if not whole and status[k][0] in ("loaded", "grown"):
                status[k] = ("fresh", f"the weight is {weight}" if weight not in ("loaded", "grown")
                             else "another state entry of this parameter did not match")
            entries[k] = (v, *status[k])
    report: dict = {"source": src.spec, "run_dir": src.run_dir, "checkpoint": src.path, "which": src.which,
                    "step": src.step, "optimizer": mode, "world_size": ctx.world_size,
                    "model": {s: {} for s in STATUSES}, "optimizer_state": {s: {} for s in STATUSES}}
    to_load, holders = {}, {}
    for key in sorted(entries):
        value, status, reason = entries[key]
        section, name = ("model", key[len("model."):]) if key.startswith("model.") else (
            "optimizer_state", key[len("optim.state."):])
        saved = src.metadata.get(key)
        report[section][status][name] = {"shape": list(value.size()), "source_shape": list(saved.size)
                                         if isinstance(saved, TensorStorageMetadata) else None, "reason": reason}
        if section == "optimizer_state" and status != "loaded":
            with torch.no_grad():  # the state a new optimizer starts from (Adam's step 0 included)
                for t in ([s.tensor for s in value.local_shards()] if isinstance(value, ShardedTensor) else [value]):
                    t.zero_()
        if status == "loaded":
            to_load[key] = value
        elif status == "grown":
            holders[key] = _old_rows_holder(value, saved.size[0])
    dcp.load({**to_load, **holders}, checkpoint_id=src.path)
    for key, holder in holders.items():
        _copy_old_rows(holder, entries[key][0])
    state.model.load_state_dict(model_sd)
    if mode == "keep":
        state.optimizer.load_state_dict(full["optim"])  # param groups as they are; state copied in place
    if ctx.world_size > 1:  # the fused optimizer's state names only this rank's tables: report every rank's
        parts: list = [None] * ctx.world_size
        dist.all_gather_object(parts, report["optimizer_state"])
        report["optimizer_state"] = {s: dict(sorted((k, v) for part in parts for k, v in part[s].items()))
                                     for s in STATUSES}
    used = set(entries)
    report["unused"] = sorted(k[len("model."):] for k in src.metadata
                              if k.startswith("model.") and k not in used)
    return report


def counts(section: dict) -> dict[str, int]:
    return {s: len(section[s]) for s in STATUSES}


def format_report(report: dict) -> str:
    """The report as the log's table: every model entry (mismatched, grown and fresh first) with
    its shape here and in the source; the optimizer state and the unused source entries as counts."""
    step = f", step {report['step']}" if report["step"] is not None else ""
    lines = [f"init from {report['checkpoint']} ({report['which']}{step}); optimizer state: {report['optimizer']}",
             "| parameter | status | shape | source shape | note |", "|---|---|---|---|---|"]
    for status in ("mismatched", "grown", "fresh", "loaded"):
        for name, e in report["model"][status].items():
            src = e["source_shape"] if e["source_shape"] is not None else "-"
            lines.append(f"| {name} | {status} | {e['shape']} | {src} | {e['reason']} |")
    m = counts(report["model"])
    lines.append("model: " + ", ".join(f"{n} {s}" for s, n in m.items()))
    if report["optimizer"] == "keep":
        o = counts(report["optimizer_state"])
        lines.append("optimizer state: " + ", ".join(f"{n} {s}" for s, n in o.items())
                     + " (fresh and mismatched entries start as a new optimizer's)")
    else:
        lines.append("optimizer state: reset (this run's new optimizers)")
    if report["unused"]:
        lines.append(f"in the source but not in this model ({len(report['unused'])}): {', '.join(report['unused'])}")
    return "\n".join(lines)
