"""MovieLens ML-100K / ML-1M → three age-group scenarios, tasks click and like.

Obtain the raw files from https://grouplens.org/datasets/movielens/ (ml-100k.zip, ml-1m.zip) and
unzip them; nothing is downloaded here. `--src` is the unzipped directory; the format is detected
from the files present:
  ML-100K  u.data (tab: user item rating timestamp), u.user (id|age|gender|occupation|zip),
           u.item (id|title|release|video release|IMDb URL|19 genre flags), latin-1
  ML-1M    ratings.dat (user::movie::rating::timestamp), users.dat (user::gender::age::occupation::zip),
           movies.dat (movie::title::Genre1|Genre2), latin-1

Scenarios: user age groups  0 "age<25", 1 "age25-34", 2 "age>=35". The cuts fall on edges of
ML-1M's age-code bins (1 "<18", 18 "18-24", 25 "25-34", 35 "35-44", 45, 50, 56), so ML-100K (raw
ages) and ML-1M get the same groups; 25-34 is the largest single band in both, and the cuts pool
the younger and the older bands into two more groups of usable size (three scenarios of
different sizes and tastes, the age-group split used for MovieLens in multi-scenario work).
Tasks (the M3oE / Scenario-Wise-Rec protocol): click = rating > 3, like = rating > 4
(`--click-threshold`, `--like-threshold`).
Features (sparse; raw ids → train vocabulary, OOV row 0): user, movie, gender, age (the raw age,
or ML-1M's age code), occupation, zip, genres (list: the movie's genres, pooling mean).
Split: 8:1:1 train/val/eval in timestamp order over all ratings (ties keep file order), or
`--split random --seed S`.
"""
from __future__ import annotations

import os

import numpy as np
import pyarrow as pa

from msrec_dist.data.convert.common import ConvertError, DatasetSpec, Sparse, parse_int, read_csv, read_lines, \
    split_indices, write_dataset

SCENARIOS = ["age<25", "age25-34", "age>=35"]
AGE_CUTS = (25, 35)  # age < 25 → 0, 25 <= age < 35 → 1, age >= 35 → 2
SOURCE = ("MovieLens, GroupLens Research: https://grouplens.org/datasets/movielens/ (ml-100k.zip or ml-1m.zip, "
          "unzipped). F. Maxwell Harper and Joseph A. Konstan. 2015. The MovieLens Datasets: History and "
          "Context. ACM TiiS 5, 4.")
ML100K_GENRES = 19


def detect(src: str) -> str:
    """'ml-100k' or 'ml-1m' from the files in `src`."""
    if all(os.path.isfile(os.path.join(src, f)) for f in ("u.data", "u.user", "u.item")):
        return "ml-100k"
    if all(os.path.isfile(os.path.join(src, f)) for f in ("ratings.dat", "users.dat", "movies.dat")):
        return "ml-1m"
    raise ConvertError(f"{src}: no MovieLens files found: need u.data, u.user, u.item (ML-100K) or "
                       f"ratings.dat, users.dat, movies.dat (ML-1M); get them from https://grouplens.org/datasets/movielens/")


def _lookup(keys: np.ndarray, table_ids: np.ndarray, path: str, what: str, line_of) -> np.ndarray:
    """Row in the side table of each key; a key absent from it is an error naming the line."""
    order = np.argsort(table_ids, kind="stable")
    pos = np.searchsorted(table_ids[order], keys)
    pos = np.minimum(pos, len(order) - 1)
    found = table_ids[order][pos] == keys
    if not found.all():
        i = int(np.flatnonzero(~found)[0])
        raise ConvertError(f"{path}: line {line_of(i)}: {what} {int(keys[i])} is not in the {what} file")
    return order[pos]


def _ratings_100k(src: str):
    path = os.path.join(src, "u.data")
    t = read_csv(path, "\t", ["user", "movie", "rating", "ts"], quoting=False,
                 string_columns=["user", "movie", "rating", "ts"])
    cols = {c: parse_int(t.column(c).to_pylist(), path, c) for c in t.column_names}
    return path, cols, lambda i: i + 1


def _ratings_1m(src: str):
    path = os.path.join(src, "ratings.dat")
    raw = read_lines(path, "::", 4)
    cols = {c: parse_int(v, path, c) for c, v in zip(["user", "movie", "rating", "ts"], raw)}
    return path, cols, lambda i: i + 1


def _users(src: str, fmt: str):
    """user id → (age (raw), age group, gender, occupation, zip) arrays."""
    if fmt == "ml-100k":
        path = os.path.join(src, "u.user")
        t = read_csv(path, "|", ["user", "age", "gender", "occupation", "zip"], encoding="latin-1", quoting=False,
                     string_columns=["user", "age", "gender", "occupation", "zip"])
        get = {c: t.column(c).to_pylist() for c in t.column_names}
    else:
        path = os.path.join(src, "users.dat")
        raw = read_lines(path, "::", 5)
        get = dict(zip(["user", "gender", "age", "occupation", "zip"], raw))
    uid = parse_int(get["user"], path, "user")
    age = parse_int(get["age"], path, "age")
    group = np.digitize(age, AGE_CUTS).astype(np.int64)
    return path, uid, {"age": age, "gender": pa.array(get["gender"], pa.string()),
                       "occupation": pa.array(get["occupation"], pa.string()),
                       "zip": pa.array(get["zip"], pa.string())}, group


def _movies(src: str, fmt: str):
    """movie id → genres (list<string>)."""
    if fmt == "ml-100k":
        path = os.path.join(src, "u.item")
        raw = read_lines(path, "|", 5 + ML100K_GENRES)
        mid = parse_int(raw[0], path, "movie")
        flags = np.stack([parse_int(raw[5 + g], path, f"genre flag {g}") for g in range(ML100K_GENRES)], 1)
        genres = [[str(g) for g in np.flatnonzero(row)] for row in flags]
    else:
        path = os.path.join(src, "movies.dat")
        raw = read_lines(path, "::", 3)
        mid = parse_int(raw[0], path, "movie")
        genres = [g.split("|") if g else [] for g in raw[2]]
    return path, mid, pa.array(genres, pa.list_(pa.string()))


def convert(src: str, out: str, split: str = "time", seed: int = 0, click_threshold: int = 3,
            like_threshold: int = 4, dim: int = 16, shards: int = 1, command: str = "") -> str:
    """Write the converted set under `out`; return its data.yaml path."""
    fmt = detect(src)
    rpath, r, line_of = _ratings_100k(src) if fmt == "ml-100k" else _ratings_1m(src)
    bad = np.flatnonzero((r["rating"] < 1) | (r["rating"] > 5))
    if bad.size:
        i = int(bad[0])
        raise ConvertError(f"{rpath}: line {line_of(i)}: rating {int(r['rating'][i])} is outside 1..5")
    upath, uid, ucols, ugroup = _users(src, fmt)
    mpath, mid, genres = _movies(src, fmt)
    urow = _lookup(r["user"], uid, rpath, "user", line_of)
    mrow = _lookup(r["movie"], mid, rpath, "movie", line_of)
    rows = {
        "scenario": ugroup[urow],
        "click": (r["rating"] > click_threshold).astype(np.int64),
        "like": (r["rating"] > like_threshold).astype(np.int64),
        "user": r["user"], "movie": r["movie"],
        "gender": ucols["gender"].take(pa.array(urow)), "age": ucols["age"][urow],
        "occupation": ucols["occupation"].take(pa.array(urow)), "zip": ucols["zip"].take(pa.array(urow)),
        "genres": genres.take(pa.array(mrow)),
    }
    table = pa.table(rows)
    parts = split_indices(table.num_rows, (0.8, 0.1, 0.1), order=r["ts"] if split == "time" else None, seed=seed)
    splits = {name: table.take(pa.array(idx)) for name, idx in zip(("train", "val", "eval"), parts)}
    split_text = ("8:1:1 in timestamp order over all ratings (earliest 80% train, next 10% val, latest 10% "
                  "eval; ties keep file order)" if split == "time" else f"8:1:1 random (seed {seed})")
    protocol = f"""\
Format: {fmt}.
- Scenarios: user age group: 0 `age<25`, 1 `age25-34`, 2 `age>=35` (cuts at 25 and 35 fall on edges
  of ML-1M's age-code bins 1/18/25/35/45/50/56, so ML-100K's raw ages and ML-1M's codes give the same groups).
- Tasks: `click` = rating > {click_threshold}, `like` = rating > {like_threshold} (M3oE / Scenario-Wise-Rec protocol).
- Features: user, movie, gender, age ({'raw age' if fmt == 'ml-100k' else 'age code'}), occupation, zip,
  genres (list of the movie's genres, mean-pooled).
- Split: {split_text}."""
    spec = DatasetSpec(
        name=f"MovieLens {fmt}", scenario_names=SCENARIOS, tasks=["click", "like"],
        sparse=[Sparse("user"), Sparse("movie"), Sparse("gender"), Sparse("age"), Sparse("occupation"),
                Sparse("zip"), Sparse("genres", pooling="mean")],
        dim=dim, source=SOURCE, protocol=protocol, source_files=[rpath, upath, mpath], command=command,
        shards=shards)
    return write_dataset(splits, spec, out)


def add_arguments(ap) -> None:
    ap.add_argument("--split", choices=["time", "random"], default="time")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--click-threshold", type=int, default=3, help="click = rating > this (default 3)")
    ap.add_argument("--like-threshold", type=int, default=4, help="like = rating > this (default 4)")


def run(a, command: str) -> str:
    return convert(a.src, a.out, a.split, a.seed, a.click_threshold, a.like_threshold, a.dim, a.shards, command)
