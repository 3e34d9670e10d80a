"""AliExpress (AliExpress_NL / _ES / _FR / _US) → one scenario per country, tasks click and conversion.

Obtain the raw files from Tianchi, dataset 74690 (https://tianchi.aliyun.com/dataset/74690):
AliExpress_NL.zip, AliExpress_ES.zip, AliExpress_FR.zip, AliExpress_US.zip, each unzipped to a
directory `AliExpress_<CC>/` holding `train.csv` and `test.csv`; nothing is downloaded here.
`--src` is the directory holding those country directories; `--countries NL ES` picks (and
orders) the scenarios, default every `AliExpress_*` directory found, sorted.

Columns (read from each CSV's header; every file must have the same header):
  search_id                             dropped (a query id, not a feature)
  click, conversion                     the labels (0/1); the tasks are named click and conversion
  categorical: named `categorical*` or `cate*` (case-insensitive)  → sparse, one table each
  numerical: every other column; must be numeric (int or float)    → dense (float32)
  (another non-numeric column is an error naming the file and the column)

Scenarios: the countries, in `--countries` order (scenario i = i-th country).
Splits: eval = test.csv; val = the last 10% of each country's train.csv (`--val-fraction`), or a
random 10% with `--split random --seed S`; train = the rest.
"""
from __future__ import annotations

import glob
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from msrec_dist.data.convert.common import ConvertError, DatasetSpec, Sparse, read_csv, split_indices, write_dataset

SOURCE = ("AliExpress search-log data set (AliExpress_NL, _ES, _FR, _US), Tianchi dataset 74690: "
          "https://tianchi.aliyun.com/dataset/74690 (each country zip unzipped to AliExpress_<CC>/ with "
          "train.csv and test.csv).")
LABELS = ("click", "conversion")
DROPPED = ("search_id",)


def is_categorical(name: str) -> bool:
    return name.lower().startswith(("categorical", "cate"))


def find_countries(src: str) -> list[str]:
    found = sorted(os.path.basename(p)[len("AliExpress_"):] for p in glob.glob(os.path.join(src, "AliExpress_*"))
                   if os.path.isdir(p))
    if not found:
        raise ConvertError(f"{src}: no AliExpress_<CC>/ directories (train.csv, test.csv); get them from "
                           f"Tianchi dataset 74690, https://tianchi.aliyun.com/dataset/74690")
    return found


def _header(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise ConvertError(f"{path}: file not found (each AliExpress_<CC>/ needs train.csv and test.csv)")
    with open(path, encoding="utf8", newline="") as f:
        return [c.strip() for c in f.readline().rstrip("\r\n").split(",")]


def _read(path: str, header: list[str], cats: list[str]) -> pa.Table:
    got = _header(path)
    if got != header:
        raise ConvertError(f"{path}: line 1: header differs from the first file's: {got} vs {header}")
    t = read_csv(path, ",", string_columns=cats)
    for col in t.column_names:
        if col in cats or col in DROPPED:
            continue
        typ = t.schema.field(col).type
        if not (pa.types.is_integer(typ) or pa.types.is_floating(typ) or pa.types.is_null(typ)):
            raise ConvertError(f"{path}: column '{col}' has type {typ}: not numerical, and its name is not "
                               f"categorical*/cate* (the rule: see msrec_dist/data/convert/aliexpress.py)")
    for lab in LABELS:
        col = t.column(lab)
        if pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
            v = col.to_numpy(zero_copy_only=False)
            bad = np.flatnonzero(~np.isin(v, (0, 1)))
        else:  # pyarrow read it as text: some value is not a number
            v = np.array(pc.cast(col, pa.string()).to_pylist(), dtype=object)
            bad = np.flatnonzero(~np.isin(v, ("0", "1")))
        if bad.size:
            i = int(bad[0])
            raise ConvertError(f"{path}: line {i + 2}: label '{lab}' is {v[i]!r}, expected 0 or 1")
    return t


def convert(src: str, out: str, countries: list[str] | None = None, split: str = "last", seed: int = 0,
            val_fraction: float = 0.1, dim: int = 16, shards: int = 1, command: str = "") -> str:
    countries = list(countries) if countries else find_countries(src)
    first = os.path.join(src, f"AliExpress_{countries[0]}", "train.csv")
    header = _header(first)
    missing = [c for c in LABELS if c not in header]
    if missing:
        raise ConvertError(f"{first}: line 1: no label column(s) {missing} in the header {header}")
    cats = [c for c in header if is_categorical(c)]
    dense = [c for c in header if c not in cats and c not in LABELS and c not in DROPPED]
    if not cats:
        raise ConvertError(f"{first}: line 1: no categorical*/cate* column in the header {header}")
    parts: dict[str, list[pa.Table]] = {"train": [], "val": [], "eval": []}
    files = []
    for s, cc in enumerate(countries):
        d = os.path.join(src, f"AliExpress_{cc}")
        tr_path, te_path = os.path.join(d, "train.csv"), os.path.join(d, "test.csv")
        files += [tr_path, te_path]
        tr, te = _read(tr_path, header, cats), _read(te_path, header, cats)
        n = tr.num_rows
        if split == "last":  # file order: the last val_fraction of rows
            cut = n - int(round(n * val_fraction))
            tr_idx, va_idx = np.arange(cut), np.arange(cut, n)
        else:
            tr_idx, va_idx = split_indices(n, (1 - val_fraction, val_fraction), seed=seed + s)
            tr_idx, va_idx = np.sort(tr_idx), np.sort(va_idx)
        for name, t in (("train", tr.take(pa.array(tr_idx))), ("val", tr.take(pa.array(va_idx))), ("eval", te)):
            cols = {"scenario": pa.array(np.full(t.num_rows, s, np.int64))}
            cols.update({c: t.column(c) for c in LABELS})
            cols.update({c: t.column(c) for c in cats})
            cols.update({c: pc.cast(t.column(c), pa.float32()) for c in dense})
            parts[name].append(pa.table(cols))
    splits = {k: pa.concat_tables(v).combine_chunks() for k, v in parts.items()}
    split_text = (f"the last {val_fraction:.0%} of each country's train.csv (file order)" if split == "last"
                  else f"a random {val_fraction:.0%} of each country's train.csv (seed {seed} + country index)")
    protocol = f"""\
- Scenarios: countries {', '.join(f'{i} `{c}`' for i, c in enumerate(countries))}.
- Tasks: `click`, `conversion` (the CSV label columns).
- Features: sparse = columns named categorical*/cate* ({len(cats)}: {', '.join(cats)}), one table each;
  dense = the other numeric columns ({len(dense)}), as float32; `search_id` dropped.
- Split: eval = test.csv; val = {split_text}; train = the rest of train.csv."""
    spec = DatasetSpec(name=f"AliExpress {'+'.join(countries)}", scenario_names=countries, tasks=list(LABELS),
                       sparse=[Sparse(c) for c in cats], dense=dense, dim=dim, source=SOURCE, protocol=protocol,
                       source_files=files, command=command, shards=shards)
    return write_dataset(splits, spec, out)


def add_arguments(ap) -> None:
    ap.add_argument("--countries", nargs="+", default=None, help="e.g. NL ES (default: every AliExpress_* found)")
    ap.add_argument("--split", choices=["last", "random"], default="last", help="how val leaves train.csv")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--val-fraction", type=float, default=0.1)


def run(a, command: str) -> str:
    return convert(a.src, a.out, a.countries, a.split, a.seed, a.val_fraction, a.dim, a.shards, command)
