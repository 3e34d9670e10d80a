"""Synthetic multi-scenario multi-task data with planted structure, written as Parquet.

Flow: seed → `_World` (latent tables shared by train and eval: id popularity, segments,
categories, affinities, item factors, coefficients) → `_sample` rows (vectorised numpy) →
Parquet shards `DIR/train/part-*.parquet`, `DIR/val/...`, `DIR/eval/...` → `DIR/data.yaml`.

Click logit = scenario bias + shared part (dense d0, d1; segment×category affinity; user and
item id bias; history match = <item factor, mean history item factor>) + m_s * (d2 coef *
d2 + category effect c_s), where m_s scales c_s/d2 per scenario and is -1 in the last
(smallest) scenario, so a model ignoring the scenario loses there. The scenario-specific part
is low-cardinality (50 categories, one dense feature) so that the smallest scenario's ~8% of
rows suffice to learn it.
convert = click * Bernoulli(sigmoid(conv bias + conv_shared * shared + d3 coef * d3 +
scenario effect)); val and eval files carry the true p_click, p_convert (`oracle_auc` scores them).

CLI: python -m msrec_dist.data.synth --out DIR --rows N --shards K --seed S [--scenarios 3]
     [--eval-rows M] [--val-rows V (default M; 0: no val split)] [--users U] [--items I]
     [--small-scenario-share P (the last scenario's share of the train rows; val/eval keep theirs)]
"""
from __future__ import annotations

import argparse
import glob
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml


@dataclass
class SynthSpec:
    """Generation knobs (scales of the planted effects)."""

    zipf_exponent: float = 1.1
    num_categories: int = 50
    num_segments: int = 20
    scenario_props: list[float] | None = None  # None: 0.60/0.30/0.10 for 3, a similar profile otherwise
    # the train split's share of the last scenario (the others keep their proportions), val and eval
    # keep scenario_props': a scenario with very few training rows whose users (drawn from the one
    # user population) also appear in the large scenarios, still measured on enough eval rows
    small_scenario_share: float | None = None
    factor_dim: int = 4  # rank of the item factors behind the history match
    hist_max_len: int = 20  # history lengths uniform in 0..hist_max_len
    hist_pref_prob: float = 0.7  # share of history items from the user's preferred category
    click_bias: float = -2.3
    scenario_bias_scale: float = 0.3
    dense_coef: float = 0.5  # d0, d1 (shared)
    affinity_scale: float = 0.4  # shared segment×category affinity
    id_bias_scale: float = 0.1
    hist_match_scale: float = 1.0
    scen_d2_coef: float = 0.6
    scen_category_scale: float = 0.8  # scenario-specific category effect (learnable from a small scenario)
    last_scenario_mult: float = -1.0  # sign flip in the smallest scenario
    conv_bias: float = -1.6
    conv_shared: float = 0.5
    conv_d3_coef: float = 0.7
    conv_scenario_scale: float = 0.3
    row_group_size: int = 16384
    embedding_dim: int = 16


def scenario_names(scenarios: int) -> list[str]:
    return ["home", "search", "cart"] if scenarios == 3 else [f"s{i}" for i in range(scenarios)]


def scenario_props(scenarios: int, spec: SynthSpec) -> np.ndarray:
    """Decreasing scenario shares [S]; the last (smallest) is <= 10% when S >= 2."""
    if spec.scenario_props is not None:
        p = np.asarray(spec.scenario_props, np.float64)
    elif scenarios == 3:
        p = np.array([0.60, 0.30, 0.10])
    elif scenarios == 1:
        p = np.ones(1)
    else:
        head = 0.7 ** np.arange(scenarios - 1)
        head = 0.92 * head / head.sum()
        p = np.append(head, min(0.08, 0.9 * head[-1]))
    if len(p) != scenarios:
        raise ValueError(f"scenario_props has {len(p)} entries for {scenarios} scenarios")
    return p / p.sum()


def num_categories(items: int, spec: SynthSpec) -> int:
    """Item categories actually used: every category holds at least one item."""
    return min(spec.num_categories, items)


def _zipf_probs(n: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """Zipf popularity over ids 0..n-1, shuffled so id order is not popularity order."""
    p = 1.0 / np.arange(1, n + 1) ** exponent
    return (p / p.sum())[rng.permutation(n)]


class _World:
    """Latent tables shared by train and eval rows."""

    def __init__(self, rng: np.random.Generator, scenarios: int, users: int, items: int, spec: SynthSpec):
        nc, ns, r = num_categories(items, spec), spec.num_segments, spec.factor_dim
        self.nc, self.spec, self.S, self.users, self.items = nc, spec, scenarios, users, items
        self.p_scen = scenario_props(scenarios, spec)
        self.p_user = _zipf_probs(users, spec.zipf_exponent, rng)
        self.p_item = _zipf_probs(items, spec.zipf_exponent, rng)
        self.user_seg = rng.integers(0, ns, users)  # [U]
        self.user_pref = rng.integers(0, nc, users)  # [U] preferred category
        self.item_cat = rng.permutation(np.arange(items) % nc)  # [I], every category non-empty
        self.cat_items = np.argsort(self.item_cat, kind="stable")  # items grouped by category
        self.cat_start = np.searchsorted(self.item_cat[self.cat_items], np.arange(nc))  # [C]
        self.cat_count = np.bincount(self.item_cat, minlength=nc)  # [C]
        cat_f = rng.normal(size=(nc, r))
        self.item_f = (cat_f[self.item_cat] + 0.5 * rng.normal(size=(items, r))) / np.sqrt(r)  # [I, r]
        self.aff = spec.affinity_scale * rng.normal(size=(ns, nc))  # shared [Sg, C]
        self.cat_s = spec.scen_category_scale * rng.normal(size=nc)  # scenario-specific [C]
        self.user_bias = spec.id_bias_scale * rng.normal(size=users)
        self.item_bias = spec.id_bias_scale * rng.normal(size=items)
        self.scen_bias = spec.click_bias + spec.scenario_bias_scale * rng.normal(size=scenarios)
        mult = np.linspace(1.0, 0.5, max(scenarios - 1, 1))[: scenarios - 1]
        self.scen_mult = np.append(mult, spec.last_scenario_mult) if scenarios > 1 else np.ones(1)
        self.conv_scen = spec.conv_scenario_scale * rng.normal(size=scenarios)

    def train_props(self) -> np.ndarray:
        """Scenario shares of the train split: p_scen, or with the last scenario's share set to
        spec.small_scenario_share."""
        share = self.spec.small_scenario_share
        if share is None or self.S < 2:
            return self.p_scen
        if not 0 < share < 1:
            raise ValueError(f"small_scenario_share must be in (0, 1), got {share}")
        head = self.p_scen[:-1] / self.p_scen[:-1].sum() * (1 - share)
        return np.append(head, share)

    def sample(self, rng: np.random.Generator, n: int, with_probs: bool,
               props: np.ndarray | None = None) -> dict[str, np.ndarray | pa.Array]:
        s = self.spec
        scen = rng.choice(self.S, size=n, p=self.p_scen if props is None else props)
        user = rng.choice(self.users, size=n, p=self.p_user)
        item = rng.choice(self.items, size=n, p=self.p_item)
        seg, cat = self.user_seg[user], self.item_cat[item]
        dense = rng.normal(size=(4, n)).astype(np.float32)  # d0..d3
        # history: lengths 0..max, items mostly from the user's preferred category
        hlen = rng.integers(0, s.hist_max_len + 1, n)
        owner = np.repeat(np.arange(n), hlen)  # [nnz] row of each history item
        hcat = np.where(rng.random(owner.size) < s.hist_pref_prob, self.user_pref[user][owner],
                        rng.integers(0, self.nc, owner.size))
        hist = self.cat_items[self.cat_start[hcat] + (rng.random(owner.size) * self.cat_count[hcat]).astype(np.int64)]
        hsum = np.stack([np.bincount(owner, self.item_f[hist, d], minlength=n) for d in range(s.factor_dim)], 1)
        hmean = hsum / np.maximum(hlen, 1)[:, None]  # [n, r], zero for an empty history
        match = (self.item_f[item] * hmean).sum(1)
        shared = (s.dense_coef * (dense[0] + dense[1]) + self.aff[seg, cat] + self.user_bias[user]
                  + self.item_bias[item] + s.hist_match_scale * match)
        specific = self.scen_mult[scen] * (s.scen_d2_coef * dense[2] + self.cat_s[cat])
        p_click = 1 / (1 + np.exp(-(self.scen_bias[scen] + shared + specific)))
        conv_logit = s.conv_bias + s.conv_shared * shared + s.conv_d3_coef * dense[3] + self.conv_scen[scen]
        p_conv_given_click = 1 / (1 + np.exp(-conv_logit))
        click = (rng.random(n) < p_click).astype(np.int64)
        convert = click * (rng.random(n) < p_conv_given_click).astype(np.int64)
        offsets = np.concatenate([[0], np.cumsum(hlen)]).astype(np.int32)
        cols: dict[str, np.ndarray | pa.Array] = {
            "scenario": scen.astype(np.int64), "click": click, "convert": convert,
            "user_id": user.astype(np.int64), "item_id": item.astype(np.int64),
            "item_category": cat.astype(np.int64), "user_segment": seg.astype(np.int64),
            "hist_item_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(hist.astype(np.int64))),
            **{f"d{i}": dense[i] for i in range(4)},
        }
        if with_probs:
            cols["p_click"] = p_click
            cols["p_convert"] = p_click * p_conv_given_click
        return cols


def _write_shards(cols: dict, out_dir: str, shards: int, row_group_size: int) -> None:
    os.makedirs(out_dir, exist_ok=True)
    for old in glob.glob(os.path.join(out_dir, "part-*.parquet")):
        os.remove(old)
    table = pa.table(cols)
    bounds = np.linspace(0, table.num_rows, shards + 1).astype(np.int64)
    for k in range(shards):
        part = table.slice(int(bounds[k]), int(bounds[k + 1] - bounds[k]))
        pq.write_table(part, os.path.join(out_dir, f"part-{k:05d}.parquet"), row_group_size=row_group_size)


def data_yaml(scenarios: int, users: int, items: int, spec: SynthSpec, val: bool = True) -> dict:
    """The data config (as a dict) describing the generated files."""
    d = spec.embedding_dim
    return {
        "train": "train/*.parquet",
        **({"val": "val/*.parquet"} if val else {}),
        "eval": "eval/*.parquet",
        "scenario": {"column": "scenario", "names": scenario_names(scenarios)},
        "tasks": [{"name": "click", "column": "click"}, {"name": "convert", "column": "convert"}],
        "sparse": [
            {"name": "user_id", "table": "user", "num_embeddings": users, "dim": d},
            {"name": "item_id", "table": "item", "num_embeddings": items, "dim": d},
            {"name": "item_category", "table": "category", "num_embeddings": num_categories(items, spec),
             "dim": d},
            {"name": "user_segment", "table": "segment", "num_embeddings": spec.num_segments, "dim": d},
            {"name": "hist_item_ids", "table": "item", "num_embeddings": items, "dim": d, "pooling": "mean"},
        ],
        "dense": [{"name": f"d{i}"} for i in range(4)],
    }


def generate(out_dir: str, rows: int, shards: int, seed: int, scenarios: int = 3, eval_rows: int | None = None,
             users: int = 10_000, items: int = 5_000, spec: SynthSpec = SynthSpec(), val_rows: int | None = None) -> str:
    """Write train/val/eval shards and data.yaml under `out_dir`; return the data.yaml path.
    val_rows: None = as many as eval, 0 = no val split. The train and eval rows of a seed do not
    depend on val_rows (each split draws from its own child of the seed)."""
    if rows < shards or shards < 1:
        raise ValueError(f"need rows >= shards >= 1, got rows={rows} shards={shards}")
    eval_rows = max(rows // 10, 1) if eval_rows is None else eval_rows
    val_rows = eval_rows if val_rows is None else val_rows
    world_rng, train_rng, eval_rng, val_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4))
    world = _World(world_rng, scenarios, users, items, spec)
    _write_shards(world.sample(train_rng, rows, False, world.train_props()), os.path.join(out_dir, "train"), shards,
                  spec.row_group_size)
    for name, rng, n in (("eval", eval_rng, eval_rows), ("val", val_rng, val_rows)):
        if n > 0:  # the true probabilities too: oracle_auc scores either split
            _write_shards(world.sample(rng, n, True), os.path.join(out_dir, name), max(1, min(shards, n // 50_000 + 1)),
                          spec.row_group_size)
    path = os.path.join(out_dir, "data.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(data_yaml(scenarios, users, items, spec, val=val_rows > 0), f, sort_keys=False)
    return path


def oracle_auc(eval_files: list[str], task: str, scenario: int | None = None) -> float:
    """AUC of the true probability p_<task> against the <task> label (optionally one scenario)."""
    from torchmetrics.functional.classification import binary_auroc
    import torch

    t = pa.concat_tables(pq.read_table(f, columns=[f"p_{task}", task, "scenario"]) for f in eval_files)
    p, y = t.column(f"p_{task}").to_numpy(), t.column(task).to_numpy()
    if scenario is not None:
        keep = t.column("scenario").to_numpy() == scenario
        p, y = p[keep], y[keep]
    return float(binary_auroc(torch.from_numpy(p), torch.from_numpy(y)))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--rows", type=int, required=True)
    ap.add_argument("--shards", type=int, required=True)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--scenarios", type=int, default=3)
    ap.add_argument("--eval-rows", type=int, default=None)
    ap.add_argument("--val-rows", type=int, default=None, help="rows of the val split (default: as many as eval; 0: none)")
    ap.add_argument("--users", type=int, default=10_000)
    ap.add_argument("--items", type=int, default=5_000)
    ap.add_argument("--small-scenario-share", type=float, default=None,
                    help="the last scenario's share of the train rows (e.g. 0.01); val and eval keep the default shares")
    a = ap.parse_args(argv)
    path = generate(a.out, a.rows, a.shards, a.seed, a.scenarios, a.eval_rows, a.users, a.items,
                    SynthSpec(small_scenario_share=a.small_scenario_share), val_rows=a.val_rows)
    print(path)


if __name__ == "__main__":
    main()
