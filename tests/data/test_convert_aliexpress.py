"""AliExpress converter (msrec_dist/data/convert/aliexpress.py) on tiny per-country CSVs written
here: header rule (categorical*/cate* → sparse, other numeric → dense, search_id dropped),
countries as scenarios, val = last 10% of train.csv, OOV row, README, malformed lines."""
from __future__ import annotations

import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from msrec_dist.data.convert import aliexpress
from msrec_dist.data.convert.__main__ import main as cli
from msrec_dist.data.convert.common import ConvertError
from tests.data.convert_errors import convert_error

HEADER = "search_id,categorical_1,categorical_2,numerical_1,numerical_2,click,conversion"


def rows(cc: str, n: int, base: int, unseen: bool = False) -> list[str]:
    out = []
    for i in range(n):
        cat1 = 100 + (i % 3) if not unseen else 999  # 999 never appears in a train split
        click = int(i % 2 == 0)
        out.append(f"{base + i},{cat1},{cc}{i % 2},{i * 0.5},{i},{click},{click * int(i % 4 == 0)}")
    return out


def write(src, bad: dict[str, tuple[int, str]] | None = None) -> str:
    """NL: 20 train / 4 test rows, ES: 10 train / 2 test; test rows of NL use an unseen id.
    bad: file → (line number, line text) inserted there."""
    files = {("NL", "train"): rows("NL", 20, 0), ("NL", "test"): rows("NL", 4, 100, unseen=True),
             ("ES", "train"): rows("ES", 10, 200), ("ES", "test"): rows("ES", 2, 300)}
    for (cc, split), lines in files.items():
        lines = [HEADER] + lines
        key = f"{cc}/{split}"
        if bad and key in bad:
            at, text = bad[key]
            lines.insert(at - 1, text)
        d = src / f"AliExpress_{cc}"
        os.makedirs(d, exist_ok=True)
        (d / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return str(src)


def read(out, split):
    return pq.read_table(os.path.join(out, split)).to_pydict()


def test_countries_header_rule_val_split_oov(tmp_path):
    src, out = write(tmp_path / "raw"), str(tmp_path / "out")
    path = aliexpress.convert(src, out, countries=["NL", "ES"])
    cfg = yaml.safe_load(open(path))
    assert (cfg["train"], cfg["val"], cfg["eval"]) == ("train/*.parquet", "val/*.parquet", "eval/*.parquet")
    assert cfg["scenario"]["names"] == ["NL", "ES"]
    assert [t["name"] for t in cfg["tasks"]] == ["click", "conversion"]
    assert [f["name"] for f in cfg["sparse"]] == ["categorical_1", "categorical_2"]
    assert [d["name"] for d in cfg["dense"]] == ["numerical_1", "numerical_2"]
    tr, va, ev = (read(out, s) for s in ("train", "val", "eval"))
    assert "search_id" not in tr
    assert np.bincount(tr["scenario"]).tolist() == [18, 9]
    assert np.bincount(va["scenario"]).tolist() == [2, 1]
    assert np.bincount(ev["scenario"]).tolist() == [4, 2]
    # val = the last 10% of each train.csv in file order: NL rows 18, 19 and ES row 9
    assert va["numerical_2"] == [18.0, 19.0, 9.0]
    assert tr["numerical_2"] == [float(i) for i in range(18)] + [float(i) for i in range(9)]
    # vocabularies from train only: categorical_1 raw 100..102 → 1..3; NL's test id 999 → OOV row 0
    v1 = pq.read_table(os.path.join(out, "vocab", "categorical_1.parquet")).to_pydict()
    assert v1 == {"raw": ["100", "101", "102"], "index": [1, 2, 3]}
    assert ev["categorical_1"] == [0, 0, 0, 0, 1, 2]
    sizes = {f["name"]: f["num_embeddings"] for f in cfg["sparse"]}
    assert sizes == {"categorical_1": 4, "categorical_2": 5}  # NL0 NL1 ES0 ES1 + OOV
    assert tr["click"][:4] == [1, 0, 1, 0] and tr["conversion"][:5] == [1, 0, 0, 0, 1]
    readme = open(os.path.join(out, "README.md")).read()
    assert "74690" in readme and "AliExpress_NL/train.csv" in readme and "AliExpress_ES/test.csv" in readme
    for split, c in (("train", [18, 9]), ("val", [2, 1]), ("eval", [4, 2])):
        assert f"| {split} | {c[0]} | {c[1]} | {sum(c)} |" in readme
    from msrec_dist.data.schema import DataConfig, load_data_config
    if "val" in DataConfig.__dataclass_fields__:  # the val: key (another change) accepted: load it too
        assert len(load_data_config(path).val) == 1


def test_random_val_and_default_countries(tmp_path):
    src, out = write(tmp_path / "raw"), str(tmp_path / "out")
    assert cli(["aliexpress", "--src", src, "--out", out, "--split", "random", "--seed", "1"]) == 0
    cfg = yaml.safe_load(open(os.path.join(out, "data.yaml")))
    assert cfg["scenario"]["names"] == ["ES", "NL"]  # every AliExpress_* found, sorted
    va = read(out, "val")
    assert np.bincount(va["scenario"]).tolist() == [1, 2]
    assert "random 10%" in open(os.path.join(out, "README.md")).read()


@pytest.mark.parametrize("where,bad,line,what", [
    ("NL/train", (5, "1,2,3"), 5, "fields"),
    ("ES/test", (3, "7,100,ES0,0.5,1,2,0"), 3, "expected 0 or 1"),
])
def test_malformed_line_names_file_and_line(tmp_path, where, bad, line, what):
    src = write(tmp_path / "raw", {where: bad})
    msg = convert_error(aliexpress.convert, src, str(tmp_path / "out"), countries=["NL", "ES"])
    cc, split = where.split("/")
    assert f"AliExpress_{cc}/{split}.csv: line {line}:" in msg and what in msg


def test_no_country_dirs_says_where_to_get_them(tmp_path):
    with pytest.raises(ConvertError, match="74690"):
        aliexpress.convert(str(tmp_path), str(tmp_path / "out"))
