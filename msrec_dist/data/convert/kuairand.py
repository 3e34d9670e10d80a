"""KuaiRand-Pure / KuaiRand-1K standard logs → one scenario per `tab`, tasks is_click and long_view.

Obtain the raw files from https://kuairand.com/ (KuaiRand-Pure.tar.gz or KuaiRand-1K.tar.gz, the
`data/` directory unpacked); nothing is downloaded here. `--src` is that directory; `--version pure`
(default) or `--version 1k` picks the file suffix. Files read (each CSV has a header row; columns
are found by name):
  log_standard_4_08_to_4_21_<v>.csv, log_standard_4_22_to_5_08_<v>.csv (or its _part1/_part2 pieces)
      user_id, video_id, date, hourmin, time_ms, is_click, is_like, ..., long_view, ..., tab
  user_features_<v>.csv        user_id, user_active_degree, is_lowactive_period, is_live_streamer,
                               is_video_author, *_range columns, onehot_feat0..onehot_feat17
  video_features_basic_<v>.csv video_id, author_id, video_type, upload_type, video_duration,
                               music_id, tag (comma-separated tag ids), ...
Only the STANDARD logs are used; the random-exposure logs (log_random_*) are not read (they are a
different, uniformly random exposure policy, meant for unbiased evaluation, not for this protocol).

Scenarios: the `tab` column (the app page the video was shown on): the distinct tab values in the
train split, sorted, map to 0..S-1 (names "tab<k>"). `--tabs 0 1 2 4` keeps only the rows of those
tabs first (as the Scenario-Wise-Rec benchmark keeps the largest tabs). A val/eval row whose tab
never occurs in train is dropped (counted in the README).
Tasks: is_click, long_view (0/1 columns of the log; any other value is an error naming file and line).
Features (sparse; raw ids → train vocabulary, OOV row 0):
  user_id, video_id, author_id, music_id, video_type, upload_type, tag (a list, the tag column
  split on ','), user_active_degree, is_lowactive_period, is_live_streamer, is_video_author, every
  *_range column and every onehot_feat* column, each categorical with a table of its own.
  A user (video) absent from the feature file, or an empty cell, gives null → OOV row 0 (tag: an
  empty list).
  Dense: video_duration as log1p(seconds) (float32; missing → 0).
Split: 8:1:1 train/val/eval in time_ms order over all kept rows (ties keep file order), or
`--split random --seed S`.
"""
from __future__ import annotations

import glob
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from msrec_dist.data.convert.common import ConvertError, DatasetSpec, Sparse, parse_int, read_csv, \
    split_indices, write_dataset

SOURCE = ("KuaiRand (Kuaishou), https://kuairand.com/ (KuaiRand-Pure or KuaiRand-1K, the data/ directory). "
          "Chongming Gao et al. 2022. KuaiRand: An Unbiased Sequential Recommendation Dataset with Randomly "
          "Exposed Videos. CIKM.")
LABELS = ("is_click", "long_view")
LOG_COLUMNS = ("user_id", "video_id", "time_ms", "tab") + LABELS
VIDEO_CATS = ("author_id", "music_id", "video_type", "upload_type")
USER_FIXED = ("user_active_degree", "is_lowactive_period", "is_live_streamer", "is_video_author")


def _header(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise ConvertError(f"{path}: file not found (get KuaiRand from https://kuairand.com/)")
    with open(path, encoding="utf8", newline="") as f:
        return [c.strip() for c in f.readline().rstrip("\r\n").split(",")]


def _need(path: str, header: list[str], cols) -> None:
    missing = [c for c in cols if c not in header]
    if missing:
        raise ConvertError(f"{path}: line 1: no column(s) {missing} in the header {header}")


def log_files(src: str, version: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(src, f"log_standard_*_{version}.csv")) +
                   glob.glob(os.path.join(src, f"log_standard_*_{version}_part*.csv")))
    if not files:
        raise ConvertError(f"{src}: no log_standard_*_{version}.csv files; get KuaiRand-{version.capitalize()} "
                           f"from https://kuairand.com/ and pass its data/ directory as --src")
    return files


def _read_log(path: str) -> dict[str, np.ndarray]:
    header = _header(path)
    _need(path, header, LOG_COLUMNS)
    t = read_csv(path, ",", string_columns=header)
    cols = {c: parse_int(t.column(c).to_pylist(), path, c, first_line=2) for c in LOG_COLUMNS}
    for lab in LABELS:
        bad = np.flatnonzero((cols[lab] != 0) & (cols[lab] != 1))
        if bad.size:
            i = int(bad[0])
            raise ConvertError(f"{path}: line {i + 2}: label '{lab}' is {int(cols[lab][i])}, expected 0 or 1")
    return cols


def _strings(t: pa.Table, col: str) -> pa.Array:
    """A string column with empty / whitespace cells as null."""
    a = pc.utf8_trim_whitespace(t.column(col).combine_chunks())
    return pc.if_else(pc.equal(a, ""), pa.scalar(None, pa.string()), a)


def _side(path: str, key: str, wanted: list[str], keys: np.ndarray) -> dict[str, pa.Array]:
    """Read a feature file; return its `wanted` columns aligned to `keys` (null where the key is
    absent): strings with empty cells as null; `tag` as list<string>; `video_duration` as float64."""
    header = _header(path)
    _need(path, header, [key] + wanted)
    t = read_csv(path, ",", string_columns=header)
    ids = parse_int(t.column(key).to_pylist(), path, key, first_line=2)
    pos = pc.index_in(pa.array(keys, pa.int64()), value_set=pa.array(ids, pa.int64()))
    out = {}
    for c in wanted:
        if c == "tag":
            tags = [[x.strip() for x in v.split(",") if x.strip()] if v else [] for v in t.column(c).to_pylist()]
            col = pa.array(tags, pa.list_(pa.string()))
        elif c == "video_duration":
            try:
                col = pc.cast(_strings(t, c), pa.float64())
            except pa.ArrowInvalid as e:
                raise ConvertError(f"{path}: column '{c}' is not numeric: {e}") from None
        else:
            col = _strings(t, c)
        out[c] = pc.take(col, pos)
    return out


def convert(src: str, out: str, version: str = "pure", tabs: list[int] | None = None, split: str = "time",
            seed: int = 0, dim: int = 16, shards: int = 1, command: str = "") -> str:
    """Write the converted set under `out`; return its data.yaml path."""
    files = log_files(src, version)
    logs = [_read_log(p) for p in files]
    cols = {c: np.concatenate([g[c] for g in logs]) for c in LOG_COLUMNS}
    n_read = len(cols["tab"])
    if tabs:
        keep = np.isin(cols["tab"], np.asarray(tabs, np.int64))
        cols = {c: v[keep] for c, v in cols.items()}
    n = len(cols["tab"])
    if n == 0:
        raise ConvertError(f"{src}: no log rows left (tabs {tabs})")
    if split == "time":
        parts = split_indices(n, order=cols["time_ms"])
    else:
        parts = [np.sort(p) for p in split_indices(n, seed=seed)]
    scen_values = np.unique(cols["tab"][parts[0]])
    names = [f"tab{int(v)}" for v in scen_values]

    upath = os.path.join(src, f"user_features_{version}.csv")
    vpath = os.path.join(src, f"video_features_basic_{version}.csv")
    uheader = _header(upath)
    user_cats = list(USER_FIXED) + [c for c in uheader if c.endswith("_range")] + \
        [c for c in uheader if c.startswith("onehot_feat")]
    feats = {"user_id": pa.array(cols["user_id"]), "video_id": pa.array(cols["video_id"])}
    feats.update(_side(upath, "user_id", user_cats, cols["user_id"]))
    feats.update(_side(vpath, "video_id", list(VIDEO_CATS) + ["tag", "video_duration"], cols["video_id"]))
    dur = feats.pop("video_duration").to_numpy(zero_copy_only=False)
    dur = np.where(np.isfinite(dur) & (dur > 0), np.log1p(np.nan_to_num(dur, nan=0.0).clip(0) / 1000.0), 0.0)
    feats["video_duration"] = pa.array(dur.astype(np.float32))

    cats = ["user_id", "video_id", *VIDEO_CATS, "tag", *user_cats]
    splits, dropped = {}, {}
    for name, idx in zip(("train", "val", "eval"), parts):
        idx = idx[np.isin(cols["tab"][idx], scen_values)]
        dropped[name] = len(parts[("train", "val", "eval").index(name)]) - len(idx)
        take = pa.array(idx, pa.int64())
        t = {"scenario": pa.array(np.searchsorted(scen_values, cols["tab"][idx]).astype(np.int64))}
        t.update({lab: pa.array(cols[lab][idx]) for lab in LABELS})
        t.update({c: pc.take(feats[c], take) for c in cats})
        t["video_duration"] = pc.take(feats["video_duration"], take)
        splits[name] = t
    split_text = ("8:1:1 in time_ms order over all kept rows (ties keep file order)" if split == "time"
                  else f"8:1:1 random (seed {seed})")
    protocol = f"""\
- Logs: the standard logs only ({', '.join(os.path.basename(p) for p in files)}); the random-exposure
  logs (log_random_*) are not used. {n_read} rows read, {n} kept{f' (tabs {sorted(tabs)})' if tabs else ''}.
- Scenarios: the `tab` column; the distinct tab values in train, sorted:
  {', '.join(f'{i} `{s}`' for i, s in enumerate(names))}. Val/eval rows of a tab absent from train
  dropped: val {dropped['val']}, eval {dropped['eval']}.
- Tasks: `is_click`, `long_view`.
- Features: sparse (one table each) = {', '.join(cats)}; `tag` is a list (the tag column split on ',').
  A user/video missing from its feature file or an empty cell → OOV row 0 (tag: empty list).
  Dense: `video_duration` = log1p(video_duration ms / 1000) (missing → 0).
- Split: {split_text}."""
    spec = DatasetSpec(name=f"KuaiRand-{'Pure' if version == 'pure' else '1K'}", scenario_names=names,
                       tasks=list(LABELS), sparse=[Sparse(c) for c in cats], dense=["video_duration"], dim=dim,
                       source=SOURCE, protocol=protocol, source_files=files + [upath, vpath], command=command,
                       shards=shards)
    return write_dataset(splits, spec, out)


def add_arguments(ap) -> None:
    ap.add_argument("--version", choices=["pure", "1k"], default="pure", help="file suffix: KuaiRand-Pure or -1K")
    ap.add_argument("--tabs", nargs="+", type=int, default=None, help="keep only these tab values, e.g. 0 1 2 4")
    ap.add_argument("--split", choices=["time", "random"], default="time")
    ap.add_argument("--seed", type=int, default=0)


def run(a, command: str) -> str:
    return convert(a.src, a.out, a.version, a.tabs, a.split, a.seed, a.dim, a.shards, command)
