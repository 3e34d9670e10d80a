"""Ali-CCP (Alibaba Click and Conversion Prediction) → one scenario per value of field 301, tasks click
and conversion.

Obtain the raw files from Tianchi, dataset 408 (https://tianchi.aliyun.com/dataset/408):
sample_train.tar.gz and sample_test.tar.gz, unpacked into one directory (`--src`) holding
  sample_skeleton_train.csv, common_features_train.csv, sample_skeleton_test.csv, common_features_test.csv
nothing is downloaded here. Format (one record a line, no header):
  sample_skeleton_*  sample_id,click,conversion,common_feature_index,feature_num,feature_list
  common_features_*  common_feature_index,feature_num,feature_list
  feature_list       entries `field_id\\x01feature_id\\x03value` joined by `\\x02`; feature_num = the
                     number of entries. field_id is text (e.g. 205, 109_14), feature_id an integer
                     (the raw id), value a weight (ignored: every kept field is an id feature).
A sample's features = its own entries + the entries of the common_features line (user-side
features shared by samples) named by its common_feature_index, in the common file of the same
split (train with train, test with test).

Scenarios: field 301 (the scenario / position context field): its feature id on each sample is the
scenario; the distinct ids in the train split, sorted numerically, map to 0..S-1 (names
"f301_<id>"). A sample without exactly one 301 entry is an error naming file and line; a val/eval
sample whose 301 id never occurs in train is dropped (counted in the README).
Tasks: click, conversion (0/1; anything else is an error naming file and line).
Features (sparse, one table each; raw feature ids → train vocabulary, OOV row 0):
  single-valued (`--fields`, default): 101 user id; 121, 122, 124, 125, 126, 127, 128, 129 user
      profile; 205 item id; 206 category; 207 shop; 216 brand; 508, 509, 702 combination features.
      A field absent on a sample gets the missing-value id: raw id -1 (a vocabulary row of its own
      when some train sample lacks the field, else OOV row 0). More than one entry of such a field
      on a sample is an error naming file and line (move the field to `--list-fields`).
  lists (`--list-fields`, default): 210 intention node, 853 combination; a bag of every entry of
      the field on the sample (sum pooling); absent → an empty list.
  Feature columns are named f<field> (e.g. f205). Other fields (e.g. the 109_14 ... behaviour
  lists) are not kept.
Splits: eval = the test files; val = the last 10% of sample_skeleton_train.csv (file order,
`--val-fraction`), or a random 10% with `--split random --seed S`; train = the rest.
Malformed lines (wrong field count or separators, a feature_num that does not match the entries,
a non-integer label or feature id) raise ConvertError naming file and line; a sample whose
common_feature_index is absent from the common file names both files and the line.
Parsing is plain Python over lines (the full train skeleton, ~42M lines, takes a long while).
"""
from __future__ import annotations

import os
from array import array
from typing import Iterator

import numpy as np
import pyarrow as pa

from msrec_dist.data.convert.common import ConvertError, DatasetSpec, Sparse, split_indices, write_dataset

SOURCE = ("Ali-CCP: Alibaba Click and Conversion Prediction, Tianchi dataset 408: "
          "https://tianchi.aliyun.com/dataset/408 (sample_skeleton_{train,test}.csv, "
          "common_features_{train,test}.csv). Xiao Ma et al. 2018. Entire Space Multi-Task Model: An Effective "
          "Approach for Estimating Post-Click Conversion Rate. SIGIR.")
LABELS = ("click", "conversion")
SCENARIO_FIELD = "301"
FIELDS = ["101", "121", "122", "124", "125", "126", "127", "128", "129", "205", "206", "207", "216", "508", "509",
          "702"]
LIST_FIELDS = ["210", "853"]
MISSING = -1  # raw id of a single-valued field absent on a sample


def parse_features(text: str, declared: str, path: str, lineno: int, keep: set[str]) -> dict[str, list[int]]:
    """`field\\x01id\\x03value` entries joined by \\x02 → {field: [ids]} for fields in `keep`; checks
    the entry count against `declared` (feature_num) and the separators."""
    try:
        num = int(declared)
    except ValueError:
        raise ConvertError(f"{path}: line {lineno}: feature_num is not an integer: {declared!r}") from None
    entries = text.split("\x02") if text else []
    if len(entries) != num:
        raise ConvertError(f"{path}: line {lineno}: feature_num is {num} but feature_list has {len(entries)} "
                           f"entries (separated by \\x02)")
    out: dict[str, list[int]] = {}
    for k, e in enumerate(entries):
        field, sep1, rest = e.partition("\x01")
        fid, sep2, _value = rest.partition("\x03")
        if not sep1 or not sep2 or "\x01" in rest or "\x03" in _value:
            raise ConvertError(f"{path}: line {lineno}: feature entry {k + 1} {e[:80]!r} is not "
                               f"field\\x01feature_id\\x03value")
        if field in keep:
            try:
                out.setdefault(field, []).append(int(fid))
            except ValueError:
                raise ConvertError(f"{path}: line {lineno}: feature entry {k + 1}: feature id {fid!r} of field "
                                   f"{field} is not an integer") from None
    return out


def read_common(path: str, keep: set[str]) -> dict[str, dict[str, list[int]]]:
    """common_feature_index → {field: [ids]} (kept fields only)."""
    table: dict[str, dict[str, list[int]]] = {}
    for lineno, parts in _rows(path, "common_feature_index,feature_num,feature_list"):
        if parts[0] in table:
            raise ConvertError(f"{path}: line {lineno}: common_feature_index {parts[0]!r} appears twice")
        table[parts[0]] = parse_features(parts[2], parts[1], path, lineno, keep)
    return table


def _rows(path: str, header: str) -> Iterator[tuple[int, list[str]]]:
    """(line number, its ','-separated fields) of each non-empty line; the field count is the one
    `header` names, else a ConvertError naming the file and line."""
    if not os.path.isfile(path):
        raise ConvertError(f"{path}: file not found (get Ali-CCP from https://tianchi.aliyun.com/dataset/408)")
    ncols = header.count(",") + 1
    with open(path, encoding="utf8", newline="") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line:
                continue
            parts = line.split(",")
            if len(parts) != ncols:
                raise ConvertError(f"{path}: line {lineno}: expected {ncols} fields separated by ',' ({header}), "
                                   f"got {len(parts)}")
            yield lineno, parts


class _Columns:
    """Growing int64 columns of one skeleton file."""

    def __init__(self, fields: list[str], list_fields: list[str]):
        self.labels = {t: array("q") for t in LABELS}
        self.scenario = array("q")
        self.scalar = {f: array("q") for f in fields}
        self.lists = {f: (array("q"), array("q", [0])) for f in list_fields}

    def __len__(self) -> int:
        return len(self.scenario)

    def arrays(self) -> dict[str, pa.Array]:
        out = {t: pa.array(np.frombuffer(a, np.int64) if len(a) else np.zeros(0, np.int64)) for t, a in
               self.labels.items()}
        for f, a in self.scalar.items():
            out[f"f{f}"] = pa.array(np.frombuffer(a, np.int64) if len(a) else np.zeros(0, np.int64))
        for f, (vals, offs) in self.lists.items():
            v = np.frombuffer(vals, np.int64) if len(vals) else np.zeros(0, np.int64)
            out[f"f{f}"] = pa.ListArray.from_arrays(pa.array(np.frombuffer(offs, np.int64).astype(np.int32)),
                                                    pa.array(v, pa.int64()))
        return out


def read_skeleton(path: str, common_path: str, fields: list[str], list_fields: list[str]) -> _Columns:
    keep = set(fields) | set(list_fields) | {SCENARIO_FIELD}
    common = read_common(common_path, keep)
    cols = _Columns(fields, list_fields)
    for lineno, parts in _rows(path, "sample_id,click,conversion,common_feature_index,feature_num,feature_list"):
        labels = []
        for t, v in zip(LABELS, parts[1:3]):
            if v.strip() not in ("0", "1"):
                raise ConvertError(f"{path}: line {lineno}: label '{t}' is {v!r}, expected 0 or 1")
            labels.append(int(v))
        own = parse_features(parts[5], parts[4], path, lineno, keep)
        shared = common.get(parts[3])
        if shared is None:
            raise ConvertError(f"{path}: line {lineno}: common_feature_index {parts[3]!r} is not in "
                               f"{common_path}")
        feats = {k: shared.get(k, []) + own.get(k, []) for k in keep}
        scen = feats[SCENARIO_FIELD]
        if len(scen) != 1:
            raise ConvertError(f"{path}: line {lineno}: expected one entry of the scenario field "
                               f"{SCENARIO_FIELD}, got {len(scen)}")
        for fld in fields:
            ids = feats[fld]
            if len(ids) > 1:
                raise ConvertError(f"{path}: line {lineno}: field {fld} has {len(ids)} entries but is read as "
                                   f"single-valued (give it in --list-fields)")
            cols.scalar[fld].append(ids[0] if ids else MISSING)
        for fld in list_fields:
            vals, offs = cols.lists[fld]
            vals.extend(feats[fld])
            offs.append(len(vals))
        for t, v in zip(LABELS, labels):
            cols.labels[t].append(v)
        cols.scenario.append(scen[0])
    return cols


def convert(src: str, out: str, fields: list[str] | None = None, list_fields: list[str] | None = None,
            split: str = "last", seed: int = 0, val_fraction: float = 0.1, dim: int = 16, shards: int = 1,
            command: str = "") -> str:
    """Write the converted set under `out`; return its data.yaml path."""
    fields = list(FIELDS if fields is None else fields)
    list_fields = list(LIST_FIELDS if list_fields is None else list_fields)
    both = (set(fields) & set(list_fields)) | ({SCENARIO_FIELD} & (set(fields) | set(list_fields)))
    if both:
        raise ConvertError(f"fields {sorted(both)}: in both --fields and --list-fields, or the scenario field")
    paths = {s: (os.path.join(src, f"sample_skeleton_{s}.csv"), os.path.join(src, f"common_features_{s}.csv"))
             for s in ("train", "test")}
    tr = read_skeleton(*paths["train"], fields, list_fields)
    te = read_skeleton(*paths["test"], fields, list_fields)
    n = len(tr)
    if split == "last":
        cut = n - int(round(n * val_fraction))
        tr_idx, va_idx = np.arange(cut), np.arange(cut, n)
    else:
        tr_idx, va_idx = (np.sort(p) for p in split_indices(n, (1 - val_fraction, val_fraction), seed=seed))
    tr_scen = np.frombuffer(tr.scenario, np.int64) if n else np.zeros(0, np.int64)
    te_scen = np.frombuffer(te.scenario, np.int64) if len(te) else np.zeros(0, np.int64)
    values = np.unique(tr_scen[tr_idx])
    names = [f"f{SCENARIO_FIELD}_{int(v)}" for v in values]
    tr_cols, te_cols = tr.arrays(), te.arrays()
    splits, dropped = {}, {}
    for name, cols, scen, idx in (("train", tr_cols, tr_scen, tr_idx), ("val", tr_cols, tr_scen, va_idx),
                                  ("eval", te_cols, te_scen, np.arange(len(te)))):
        kept = idx[np.isin(scen[idx], values)]
        dropped[name] = len(idx) - len(kept)
        take = pa.array(kept, pa.int64())
        t = {"scenario": pa.array(np.searchsorted(values, scen[kept]).astype(np.int64))}
        t.update({c: a.take(take) for c, a in cols.items()})
        splits[name] = t
    split_text = (f"the last {val_fraction:.0%} of sample_skeleton_train.csv (file order)" if split == "last"
                  else f"a random {val_fraction:.0%} of sample_skeleton_train.csv (seed {seed})")
    sparse = [f"f{x}" for x in fields + list_fields]
    protocol = f"""\
- Scenarios: field {SCENARIO_FIELD}: its feature ids in train, sorted, as scenarios
  {', '.join(f'{i} `{s}`' for i, s in enumerate(names))}. Val/eval samples of a 301 id absent from train
  dropped: val {dropped['val']}, eval {dropped['eval']}.
- Tasks: `click`, `conversion`.
- Features: a sample's own entries + its common_features line's (user side); columns f<field>, one table
  each. Single-valued: {', '.join(f'f{x}' for x in fields)} (absent → raw id {MISSING}, the missing-value id).
  Lists (sum pooling): {', '.join(f'f{x}' for x in list_fields) or '(none)'} (absent → empty list).
  Entry values (after \\x03) ignored. Other fields not kept.
- Split: eval = sample_skeleton_test.csv (+ common_features_test.csv); val = {split_text}; train = the rest."""
    spec = DatasetSpec(name="Ali-CCP", scenario_names=names, tasks=list(LABELS),
                       sparse=[Sparse(c) for c in sparse], dim=dim, source=SOURCE, protocol=protocol,
                       source_files=[*paths["train"], *paths["test"]], command=command, shards=shards)
    return write_dataset(splits, spec, out)


def add_arguments(ap) -> None:
    ap.add_argument("--fields", nargs="+", default=None, help=f"single-valued field ids (default {' '.join(FIELDS)})")
    ap.add_argument("--list-fields", nargs="*", default=None,
                    help=f"multi-valued field ids, kept as lists (default {' '.join(LIST_FIELDS)})")
    ap.add_argument("--split", choices=["last", "random"], default="last", help="how val leaves the train skeleton")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--val-fraction", type=float, default=0.1)


def run(a, command: str) -> str:
    return convert(a.src, a.out, a.fields, a.list_fields, a.split, a.seed, a.val_fraction, a.dim, a.shards, command)
