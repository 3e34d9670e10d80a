"""Feature specs: what the data holds and the model embeds, shared by msrec_dist.data and msrec_dist.model.

    FeatureSpec
      scenario  ScenarioSpec (column, names)     → S = num_scenarios
      tasks     [TaskSpec (name, label column)]  → T = len(task_names)
      sparse    [SparseFeature (name, table, num_embeddings | hash_buckets, dim, pooling, init)]
                  → tables(): one TableSpec per table, in order of first appearance
                  → kjt_keys: the features grouped by table (the KJT key order = sparse field order)
      dense     [DenseFeature (name, dim)]       scalars (no dim): N_d = len(dense_scalars());
                                                 vectors (dim: K): one field each, projected K → D
                  → the batch's dense tensor [B, dense_width]: the scalars' columns in order,
                    then each vector's K columns in order

Hashed ids (`hash_buckets: N`): the raw column (int64 or string ids, scalar or list) is mapped to
rows 0..N-1 by msrec_dist/data/hashing.py (a fixed seeded 64-bit hash, the same in every
process), so there is no vocabulary to build and no id out of range; num_embeddings = N.

Pretrained tables (`init: {path: vectors.npy | vectors.parquet, freeze: true | false}`): a table
property, given on any one feature of the table (or on several, identically). The table's rows
are loaded from the file at build time, in table row order (msrec_dist/distributed/pretrained.py,
docs/pretrained_vectors.md); a frozen table gets no optimizer and no gradient. A relative path
resolves against the data.yaml's directory (msrec_dist/data/schema.py load_data_config).

msrec_dist/data/schema.py's DataConfig is a FeatureSpec plus the data files (data.yaml); the
reader reads the columns named here, the model (msrec_dist/model) builds its tables and fields
from them. Plain dataclasses: this module imports neither torch nor pyarrow.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from msrec_dist.typed_yaml import ConfigError


def _at(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


VECTOR_SUFFIXES = (".npy", ".parquet")


@dataclass
class TableInit:
    """Pretrained rows for a table: a .npy float array [rows, dim] or a Parquet file (a `vector`
    column, optionally an `index` column), in table row order; see docs/pretrained_vectors.md."""

    path: str  # relative: against the data.yaml's directory (load_data_config makes it absolute)
    freeze: bool = False  # true: no optimizer state, no gradient, the loaded rows stay bitwise as loaded

    def validate(self, where: str) -> None:
        if not self.path:
            raise ConfigError(f"{_at(where, 'path')}: required, the vectors file (.npy or .parquet)")
        if not self.path.endswith(VECTOR_SUFFIXES):
            raise ConfigError(f"{_at(where, 'path')}: {self.path!r} is neither .npy nor .parquet")


@dataclass
class SparseFeature:
    # column name; int64 (one id per row) or list<int64> (a bag of ids); with hash_buckets also
    # string or list<string>
    name: str
    table: str  # features naming the same table share one embedding table
    num_embeddings: int = 0  # rows of the table, ids 0..num_embeddings-1; with hash_buckets: left out (= N)
    dim: int = 0  # required
    pooling: Literal["sum", "mean"] = "sum"
    hash_buckets: Optional[int] = None  # N: hash the raw ids into N rows (data/hashing.py)
    # the row that ids unseen in train map to (the converters write 0); train.oov_dropout trains it
    oov_id: Optional[int] = None
    # pretrained rows of this feature's table (a table property: the table's features that give it agree)
    init: Optional[TableInit] = None

    def validate(self, where: str) -> None:
        if self.hash_buckets is not None:
            if self.hash_buckets <= 0:
                raise ConfigError(f"{_at(where, 'hash_buckets')}: must be > 0, got {self.hash_buckets}")
            if self.num_embeddings not in (0, self.hash_buckets):
                raise ConfigError(f"{_at(where, 'num_embeddings')}: {self.num_embeddings} differs from hash_buckets "
                                  f"{self.hash_buckets} (a hashed feature's table has hash_buckets rows; leave it out)")
            self.num_embeddings = self.hash_buckets
        elif self.num_embeddings <= 0:
            raise ConfigError(f"{_at(where, 'num_embeddings')}: must be > 0 (or give hash_buckets for raw ids), "
                              f"got {self.num_embeddings or 'none'}")
        if self.dim <= 0:
            raise ConfigError(f"{_at(where, 'dim')}: required, must be > 0, got {self.dim}")
        if self.oov_id is not None and not 0 <= self.oov_id < self.num_embeddings:
            raise ConfigError(f"{_at(where, 'oov_id')}: {self.oov_id} outside 0..{self.num_embeddings - 1}")


@dataclass
class DenseFeature:
    name: str  # float (or int) column; with dim: a list<float> or fixed_size_list<float> column of dim values
    dim: Optional[int] = None  # K: a vector feature (e.g. a text-model embedding), one field through a K → D projection

    def validate(self, where: str) -> None:
        if self.dim is not None and self.dim <= 0:
            raise ConfigError(f"{_at(where, 'dim')}: must be > 0, got {self.dim}")


@dataclass
class TaskSpec:
    name: str
    column: str  # binary label column: int, float or bool with values 0/1


@dataclass
class ScenarioSpec:
    column: str  # integer column with values 0..len(names)-1
    names: list[str]

    def validate(self, where: str) -> None:
        if not self.names:
            raise ConfigError(f"{_at(where, 'names')}: needs at least one scenario name")
        if len(set(self.names)) != len(self.names):
            raise ConfigError(f"{_at(where, 'names')}: duplicate scenario names {self.names}")


@dataclass
class TableSpec:
    """One embedding table, shared by `feature_names` (in schema order)."""

    name: str
    num_embeddings: int
    dim: int
    feature_names: list[str] = field(default_factory=list)
    init: Optional[TableInit] = None  # pretrained rows (from whichever of its features gives it)

    @property
    def frozen(self) -> bool:
        return self.init is not None and self.init.freeze


@dataclass
class FeatureSpec:
    scenario: ScenarioSpec
    tasks: list[TaskSpec]
    sparse: list[SparseFeature]
    dense: list[DenseFeature] = field(default_factory=list)

    def validate(self, where: str) -> None:
        if not self.tasks:
            raise ConfigError(f"{_at(where, 'tasks')}: needs at least one task")
        if not self.sparse:
            raise ConfigError(f"{_at(where, 'sparse')}: needs at least one sparse feature")
        for key, names in (("tasks", [t.name for t in self.tasks]), ("sparse", self.sparse_names),
                           ("dense", self.dense_names)):
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ConfigError(f"{_at(where, key)}: duplicate name(s) {dup}")
        first: dict[str, tuple[int, SparseFeature]] = {}
        for i, f in enumerate(self.sparse):
            if f.table not in first:
                first[f.table] = (i, f)
                continue
            j, g = first[f.table]
            if (f.num_embeddings, f.dim) != (g.num_embeddings, g.dim):
                raise ConfigError(
                    f"{_at(where, f'sparse[{i}]')}: features '{g.name}' (sparse[{j}]) and '{f.name}' "
                    f"(sparse[{i}]) share table '{f.table}' but disagree: num_embeddings "
                    f"{g.num_embeddings} vs {f.num_embeddings}, dim {g.dim} vs {f.dim}")
        inits: dict[str, tuple[int, SparseFeature]] = {}
        for i, f in enumerate(self.sparse):
            if f.init is None:
                continue
            j, g = inits.setdefault(f.table, (i, f))
            if g.init != f.init:
                raise ConfigError(
                    f"{_at(where, f'sparse[{i}].init')}: features '{g.name}' (sparse[{j}]) and '{f.name}' "
                    f"(sparse[{i}]) share table '{f.table}' but give different init: {g.init} vs {f.init} "
                    "(init is a table property: give it on one feature of the table)")

    @property
    def num_scenarios(self) -> int:
        return len(self.scenario.names)

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def sparse_names(self) -> list[str]:
        return [f.name for f in self.sparse]

    @property
    def dense_names(self) -> list[str]:
        return [f.name for f in self.dense]

    def dense_scalars(self) -> list[DenseFeature]:
        """Scalar dense features (no dim): the first columns of the batch's dense tensor."""
        return [f for f in self.dense if f.dim is None]

    def dense_vectors(self) -> list[DenseFeature]:
        """Vector dense features (dim: K): their K columns each follow the scalars, in order."""
        return [f for f in self.dense if f.dim is not None]

    @property
    def dense_width(self) -> int:
        """Columns of the batch's dense tensor: one per scalar, K per vector."""
        return sum(1 if f.dim is None else f.dim for f in self.dense)

    def kjt_features(self) -> list[SparseFeature]:
        """Sparse features grouped by table, tables in `tables()` order: the key order of every KJT
        the reader builds, and so the order of the sparse fields. torchrec's batched table kernel
        (fbgemm's TBE) takes its features table by table in this order, so a world of one feeds it
        the reader's KJT as is, with no permute (msrec_dist/distributed/local_lookup.py)."""
        by_name = {f.name: f for f in self.sparse}
        return [by_name[n] for t in self.tables() for n in t.feature_names]

    @property
    def kjt_keys(self) -> list[str]:
        return [f.name for f in self.kjt_features()]

    def columns(self) -> list[str]:
        """Every column the reader needs, without duplicates, in a fixed order."""
        cols = [self.scenario.column, *(t.column for t in self.tasks), *self.sparse_names, *self.dense_names]
        return list(dict.fromkeys(cols))

    def tables(self) -> list[TableSpec]:
        """Embedding tables in order of first appearance in `sparse`."""
        out: dict[str, TableSpec] = {}
        for f in self.sparse:
            spec = out.setdefault(f.table, TableSpec(f.table, f.num_embeddings, f.dim))
            spec.feature_names.append(f.name)
            spec.init = spec.init or f.init
        return list(out.values())

    def frozen_tables(self) -> set[str]:
        """Names of the tables with `init.freeze`: loaded, never trained."""
        return {t.name for t in self.tables() if t.frozen}
