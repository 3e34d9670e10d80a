"""Pretrained tables (data.yaml `init: {path, freeze}`, msrec_dist/distributed/pretrained.py): vectors
from .npy and .parquet land in the tables exactly (replicated and table_wise, and any shard offsets),
bad files fail naming the file and row, a frozen table stays bitwise as loaded with no gradient and
no optimizer state (checkpoint included) while a loaded trainable one trains, and 2 ranks with a
table_wise frozen table and a replicated one (grad_sync ddp) load and keep the same vectors."""
from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed.checkpoint as dcp
import yaml
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from msrec_dist.config import load_experiment
from msrec_dist.data.reader import make_dataloader
from msrec_dist.data.schema import DataError, load_data_config
from msrec_dist.data.synth import generate
from msrec_dist.distributed.checkpoint import Progress, load_checkpoint, save_checkpoint
from msrec_dist.distributed.context import init_distributed
from msrec_dist.distributed.model_parallel import build_train_state, fill_table_shard
from msrec_dist.distributed.pretrained import copy_into_shards_, freeze_kernels, read_vectors
from msrec_dist.training.step import DenseStep, train_step
from tests.distributed.launch import REPO, TINY_MODEL, errors, train

USERS, ITEMS, DIM = 200, 100, 16  # the synthetic data's user and item tables (dim: SynthSpec.embedding_dim)
PREFIX = "model.embedding.ebc.embedding_bags."
LAYOUTS = {"replicated": (), "table_wise": ("sharding.replicate_max_mb=0",)}


def _vectors(rows: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((rows, DIM)) * 0.1).astype(np.float32)  # [rows, D]


def _write_parquet(path, vectors: np.ndarray, index=None, fixed: bool = True) -> None:
    flat = pa.array(vectors.reshape(-1))
    col = pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1]) if fixed else pa.array(vectors.tolist())
    cols = {"vector": col} if index is None else {"index": pa.array(index, pa.int64()), "vector": col}
    pq.write_table(pa.table(cols), path)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    """Synthetic data, the user and item vectors (.npy, .parquet) under vectors/."""
    out = str(tmp_path_factory.mktemp("pretrained"))
    generate(out, rows=2_000, shards=2, seed=3, eval_rows=300, val_rows=0, users=USERS, items=ITEMS)
    os.makedirs(os.path.join(out, "vectors"))
    np.save(os.path.join(out, "vectors", "user.npy"), _vectors(USERS, 1))
    np.save(os.path.join(out, "vectors", "item.npy"), _vectors(ITEMS, 2))
    # the item vectors again as Parquet, rows shuffled and placed by the index column
    perm = np.random.default_rng(0).permutation(ITEMS)
    _write_parquet(os.path.join(out, "vectors", "item.parquet"), _vectors(ITEMS, 2)[perm], index=perm)
    _write_parquet(os.path.join(out, "vectors", "user.parquet"), _vectors(USERS, 1), fixed=False)
    return out


def data_yaml(data_dir: str, name: str, inits: dict[str, dict]) -> str:
    """A copy of the synthetic data.yaml with `init` on the first feature of each table in `inits`
    (paths relative to the yaml, as a user would write them)."""
    with open(os.path.join(data_dir, "data.yaml")) as f:
        cfg = yaml.safe_load(f)
    for table, init in inits.items():
        next(f for f in cfg["sparse"] if f["table"] == table)["init"] = init
    path = os.path.join(data_dir, f"{name}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path


def build(yaml_path: str, run_dir, *sets):
    cfg = load_experiment(os.path.join(REPO, "configs/msrec_full.yaml"), yaml_path,
                          tuple(TINY_MODEL) + (f"run.dir={run_dir}", "reader.batch_size=64") + sets)
    data = load_data_config(cfg.data)
    return cfg, data, build_train_state(cfg, data, init_distributed(), total_steps=100)


def weights(state) -> dict[str, torch.Tensor]:
    """{table: a copy of its weights} (one rank: a ShardedTensor's one local shard is the table)."""
    out = {}
    for key, value in state.model.state_dict().items():
        if key.startswith(PREFIX):
            local = value.local_shards()[0].tensor if hasattr(value, "local_shards") else value
            out[key[len(PREFIX):].rsplit(".", 1)[0]] = local.detach().clone()
    return out


def train_steps(cfg, data, state, n: int) -> None:
    step = DenseStep(state, cfg.train.grad_clip)
    for i, batch in enumerate(make_dataloader(data, data.train, cfg.reader)):
        if i == n:
            return
        train_step(state, batch, cfg.reader.batch_size, 1, step)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_vectors_load_exactly_from_npy_and_parquet(data_dir, tmp_path, layout):
    yaml_path = data_yaml(data_dir, f"load_{layout}", {"user": {"path": "vectors/user.parquet"},
                                                       "item": {"path": "vectors/item.npy"}})
    cfg, data, state = build(yaml_path, tmp_path, *LAYOUTS[layout])
    got = weights(state)
    assert torch.equal(got["user"], torch.from_numpy(_vectors(USERS, 1)))
    assert torch.equal(got["item"], torch.from_numpy(_vectors(ITEMS, 2)))
    for index, table in enumerate(data.tables()):  # the others keep the seeded init
        if table.init is None:
            init = torch.empty(table.num_embeddings, table.dim)
            fill_table_shard(init, 0, 0, table.num_embeddings, table.dim, cfg.run.seed, index)
            assert torch.equal(got[table.name], init), table.name
    # nothing frozen: one batched kernel, so a world of one keeps its local lookup
    assert state.local_lookup and not state.frozen_tables
    # the item table shares its kernel with trained tables: it cannot be frozen after the fact
    with pytest.raises(RuntimeError, match="cannot be frozen apart"):
        freeze_kernels(state.model, {"item"})


def test_index_column_places_rows(data_dir):
    got = read_vectors(os.path.join(data_dir, "vectors", "item.parquet"), ITEMS, DIM, "item")
    np.testing.assert_array_equal(got, _vectors(ITEMS, 2))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_frozen_table_stays_bitwise_and_has_no_gradient_nor_optimizer_state(data_dir, tmp_path, layout):
    yaml_path = data_yaml(data_dir, f"frozen_{layout}", {"item": {"path": "vectors/item.npy", "freeze": True},
                                                         "user": {"path": "vectors/user.npy"}})
    cfg, data, state = build(yaml_path, tmp_path / "run", *LAYOUTS[layout])
    assert state.frozen_tables == {"item"}
    # the frozen table's kernel is a second batched kernel: the one-kernel local lookup steps
    # aside and the embedding runs through DMP's path
    assert not state.local_lookup
    before = weights(state)
    assert torch.equal(before["item"], torch.from_numpy(_vectors(ITEMS, 2)))
    train_steps(cfg, data, state, 6)
    after = weights(state)
    assert torch.equal(after["item"], before["item"])  # bitwise
    for table in ("user", "category", "segment"):
        assert not torch.equal(after[table], before[table]), table  # loaded or not, these train
    for key, p in state.model.named_parameters():
        if ".item." in key:
            assert not p.requires_grad and p.grad is None, key
    assert all(".item." not in k for k in state.optimizer.state_dict()["state"])
    assert all(".item." not in k for k in state.optimizer.params)
    # the checkpoint: the frozen weights saved with the model, no optimizer state for them
    ckpt = save_checkpoint(str(tmp_path / "ckpt"), state, Progress(step=6), init_distributed(), keep=1)
    saved = dcp.FileSystemReader(ckpt).read_metadata().state_dict_metadata
    assert f"model.{PREFIX}item.weight" in saved
    assert [k for k in saved if k.startswith("optim") and ".item." in k] == []
    assert any(k.startswith("optim") and ".user." in k for k in saved)  # the trained table's state is there
    # and it loads back into a fresh build (resume), frozen table included
    _, _, resumed = build(yaml_path, tmp_path / "resumed", *LAYOUTS[layout])
    load_checkpoint(ckpt, resumed, init_distributed())
    again = weights(resumed)
    for table in after:
        assert torch.equal(again[table], after[table]), table


# --- bad files: the error names the file and, where it is one row, the row ---------------------


@pytest.mark.parametrize("suffix", [".npy", ".parquet"])
def test_wrong_row_count_or_dim_names_the_file(tmp_path, suffix):
    for rows, dim in ((ITEMS + 1, DIM), (ITEMS, DIM - 1)):
        path = str(tmp_path / f"v{rows}x{dim}{suffix}")
        vectors = np.zeros((rows, dim), np.float32)
        np.save(path, vectors) if suffix == ".npy" else _write_parquet(path, vectors)
        expected = f"{rows} rows" if rows != ITEMS else (f"dim {dim}" if suffix == ".npy" else f"has {dim} values")
        with pytest.raises(DataError, match=f"{path}.*{expected}"):
            read_vectors(path, ITEMS, DIM, "item")


def test_missing_file_through_the_build_names_the_file(data_dir, tmp_path):
    yaml_path = data_yaml(data_dir, "missing", {"item": {"path": "vectors/nowhere.npy", "freeze": True}})
    with pytest.raises(DataError, match=f"{os.path.join(data_dir, 'vectors', 'nowhere.npy')}: vectors file of "
                                        "table 'item' not found"):
        build(yaml_path, tmp_path)


def test_wrong_dim_through_the_build_names_the_file(data_dir, tmp_path):
    path = os.path.join(data_dir, "vectors", "item_dim8.npy")
    np.save(path, np.zeros((ITEMS, 8), np.float32))
    yaml_path = data_yaml(data_dir, "dim8", {"item": {"path": "vectors/item_dim8.npy"}})
    with pytest.raises(DataError, match=f"{path}: table 'item' expects {ITEMS} rows x dim {DIM}, got {ITEMS} rows x "
                                        "dim 8"):
        build(yaml_path, tmp_path)


def test_bad_contents_name_the_row(tmp_path):
    def parquet(name, **cols):
        path = str(tmp_path / name)
        pq.write_table(pa.table(cols), path)
        return path

    good = [[0.0] * DIM] * 4
    cases = [
        (parquet("nan.parquet", vector=good[:2] + [[float("nan")] * DIM] + good[:1]), "row 2 is not finite"),
        (parquet("null.parquet", vector=pa.array(good[:1] + [None] + good[:2], pa.list_(pa.float32()))),
         "'vector' row 1 is null"),
        (parquet("short.parquet", vector=good[:3] + [[0.0] * 3]), "row 3 has 3 values, table 't' expects dim 16"),
        (parquet("hole.parquet", vector=pa.array(good[:1] + [[0.0] * (DIM - 1) + [None]] + good[:2],
                                                 pa.list_(pa.float32()))), "row 1 has a null value"),
        (parquet("novec.parquet", emb=good), "column 'vector' .* is missing"),
        (parquet("ints.parquet", vector=[[0] * DIM] * 4), "has type list<element: int64>, expected list<float>"),
        (parquet("range.parquet", index=[0, 1, 4, 2], vector=good), "'index' row 2: 4 outside 0..3"),
        (parquet("dup.parquet", index=[0, 1, 1, 2], vector=good), "rows 1 and 2 both give table row 1"),
    ]
    npy = str(tmp_path / "inf.npy")
    np.save(npy, np.concatenate([np.zeros((3, DIM)), np.full((1, DIM), np.inf)]).astype(np.float32))
    cases.append((npy, "vector row 3 is not finite"))
    text = str(tmp_path / "text.npy")
    with open(text, "w") as f:
        f.write("not an array")
    cases.append((text, "cannot read the vectors of table 't' as .npy"))
    for path, message in cases:
        with pytest.raises(DataError, match=f"{path}: .*{message}"):
            read_vectors(path, 4, DIM, "t")


# --- any shard layout: rows and columns of the vectors by shard offsets --------------------------


def _shard(rows: int, cols: int, row0: int, col0: int):
    return SimpleNamespace(tensor=torch.full((rows, cols), -1.0),
                           metadata=SimpleNamespace(shard_offsets=[row0, col0], shard_sizes=[rows, cols]))


def test_copy_into_any_shard_offsets():
    """Row-wise (uneven last shard), column-wise and table-row-wise pieces, as the local shards of
    ShardedTensors on several ranks: each gets exactly its rows x cols; together they are the table."""
    vectors = np.random.default_rng(0).standard_normal((10, 8)).astype(np.float32)  # [rows, D]
    layouts = {
        "row_wise": [(4, 8, 0, 0), (4, 8, 4, 0), (2, 8, 8, 0)],
        "column_wise": [(10, 4, 0, 0), (10, 4, 0, 4)],
        "table_row_wise_grid": [(5, 4, 0, 0), (5, 4, 0, 4), (5, 4, 5, 0), (5, 4, 5, 4)],
    }
    for name, pieces in layouts.items():
        table = torch.zeros(10, 8)
        for rank_pieces in (pieces[:1], pieces[1:]):  # two "ranks", each with its local shards
            shards = [_shard(*p) for p in rank_pieces]
            copy_into_shards_(SimpleNamespace(local_shards=lambda s=shards: s), vectors)
            for s, (rows, cols, r0, c0) in zip(shards, rank_pieces):
                assert torch.equal(s.tensor, torch.from_numpy(vectors[r0:r0 + rows, c0:c0 + cols])), name
                table[r0:r0 + rows, c0:c0 + cols] = s.tensor
        assert torch.equal(table, torch.from_numpy(vectors)), name
    whole = torch.zeros(10, 8)  # a replicated table: the whole tensor
    copy_into_shards_(whole, vectors)
    assert torch.equal(whole, torch.from_numpy(vectors))
    with pytest.raises(ValueError, match=r"offsets \[8, 0\] of size \[4, 8\] lies outside"):
        copy_into_shards_(SimpleNamespace(local_shards=lambda: [_shard(4, 8, 8, 0)]), vectors)


# --- two ranks -------------------------------------------------------------------------------------


@pytest.mark.dist
@pytest.mark.parametrize("grad_sync", ["ddp", "flat"])
def test_two_ranks_table_wise_frozen_and_replicated_frozen(data_dir, tmp_path, grad_sync):
    """torchrun, 2 gloo ranks: item frozen and table_wise (one rank holds it: the backward
    all-to-all must still run on both), category frozen and replicated (ddp: torchrec's DDP around
    the replicated lookup is wrapped again over the tables that train; flat: left out of the
    all-reduce), user loaded and trained. The last checkpoint holds the frozen tables bitwise as
    the files, and no optimizer state for them."""
    cat_rows = load_data_config(os.path.join(data_dir, "data.yaml")).tables()[2].num_embeddings
    np.save(os.path.join(data_dir, "vectors", "category.npy"), _vectors(cat_rows, 4))
    yaml_path = data_yaml(data_dir, f"two_rank_{grad_sync}", {"user": {"path": "vectors/user.npy"},
                                                 "item": {"path": "vectors/item.parquet", "freeze": True},
                                                 "category": {"path": "vectors/category.npy", "freeze": True}})
    run_dir = str(tmp_path / "run")
    proc = train(2, yaml_path, run_dir, ["train.max_steps=6", "train.epochs=1", "reader.batch_size=64",
                                         "train.checkpoint_every=6", f"train.grad_sync={grad_sync}",
                                         "sharding.constraints.item.sharding_types=[table_wise]"])
    assert proc.returncode == 0, errors(proc)
    with open(os.path.join(run_dir, "plan.json")) as f:
        plan = yaml.safe_load(f)["model.embedding.ebc"]
    assert plan["item"]["sharding_type"] == "table_wise" and plan["category"]["sharding_type"] == "data_parallel"
    dcp_to_torch_save(os.path.join(run_dir, "checkpoints", "step_6"), str(tmp_path / "saved.pt"))
    saved = torch.load(str(tmp_path / "saved.pt"), weights_only=False)
    assert torch.equal(saved["model"][f"{PREFIX}item.weight"], torch.from_numpy(_vectors(ITEMS, 2)))
    assert torch.equal(saved["model"][f"{PREFIX}category.weight"], torch.from_numpy(_vectors(cat_rows, 4)))
    assert not torch.equal(saved["model"][f"{PREFIX}user.weight"], torch.from_numpy(_vectors(USERS, 1)))
    optim = saved["optim"]["state"]
    assert f"sparse.{PREFIX}user.weight" in optim
    assert [k for k in optim if ".item." in k or ".category." in k] == []
