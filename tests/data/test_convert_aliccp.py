"""Ali-CCP converter (msrec_dist/data/convert/aliccp.py) on tiny skeleton + common-features files
written here: field 301 scenarios, common (user-side) features joined, list fields, missing-value
id, val = last 10% of the train skeleton, OOV row, README, malformed lines."""
from __future__ import annotations

import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from msrec_dist.data.convert import aliccp
from msrec_dist.data.convert.__main__ import main as cli
from msrec_dist.data.convert.common import ConvertError
from tests.data.convert_errors import convert_error


def feats(pairs) -> str:
    """[(field, id), ...] → 'feature_num,feature_list'."""
    return f"{len(pairs)}," + "\x02".join(f"{f}\x01{i}\x031.0" for f, i in pairs)


def common_line(idx: str, user: int) -> str:
    return f"{idx}," + feats([("101", user), ("121", 40 + user % 2), ("122", 50), ("109_14", 7), ("109_14", 8)])


def sample_line(i: int, common: str, scen: int, item: int | None = None) -> str:
    click = int(i % 2 == 0)
    pairs = [("301", scen), ("205", item if item is not None else 500 + i % 4), ("206", 600 + i % 2)]
    pairs += [("210", 700 + k) for k in range(i % 3)]  # 0..2 intention nodes
    if i % 5:
        pairs.append(("216", 800 + i % 2))  # brand absent on every 5th sample
    return f"{i},{click},{click * int(i % 4 == 0)},{common}," + feats(pairs)


def write(src, bad: dict[str, tuple[int, str]] | None = None) -> str:
    """Train: 30 samples, scenario 9001 + i % 3, users c0..c2; test: 6 samples of the same
    scenarios (user c3 = user id 999, item 777: both unseen in train) + 1 of scenario 9009.
    bad: file name → (line number, line text) inserted there."""
    os.makedirs(src, exist_ok=True)
    files = {
        "common_features_train.csv": [common_line(f"c{u}", u) for u in range(3)],
        "sample_skeleton_train.csv": [sample_line(i, f"c{i % 3}", 9001 + i % 3) for i in range(30)],
        "common_features_test.csv": [common_line("c0", 0), common_line("c3", 999)],
        "sample_skeleton_test.csv": [sample_line(100 + i, "c3" if i < 2 else "c0", 9001 + i % 3,
                                                 777 if i == 0 else None) for i in range(6)]
        + [sample_line(106, "c0", 9009)],
    }
    for name, lines in files.items():
        if bad and name in bad:
            at, text = bad[name]
            lines.insert(at - 1, text)
        (src / name).write_text("\n".join(lines) + "\n")
    return str(src)


def read(out, split):
    return pq.read_table(os.path.join(out, split)).to_pydict()


def vocab(out, table):
    v = pq.read_table(os.path.join(out, "vocab", f"{table}.parquet")).to_pydict()
    return dict(zip(v["raw"], v["index"]))


def test_scenarios_common_features_lists_val_oov(tmp_path):
    src, out = write(tmp_path / "raw"), str(tmp_path / "out")
    path = aliccp.convert(src, out)
    cfg = yaml.safe_load(open(path))
    assert cfg["scenario"]["names"] == ["f301_9001", "f301_9002", "f301_9003"]
    assert [t["name"] for t in cfg["tasks"]] == ["click", "conversion"]
    assert [f["name"] for f in cfg["sparse"]] == [f"f{x}" for x in aliccp.FIELDS + aliccp.LIST_FIELDS]
    assert cfg["dense"] == []
    tr, va, ev = (read(out, s) for s in ("train", "val", "eval"))
    assert np.bincount(tr["scenario"]).tolist() == [9, 9, 9]
    assert np.bincount(va["scenario"]).tolist() == [1, 1, 1]  # samples 27, 28, 29
    assert np.bincount(ev["scenario"]).tolist() == [2, 2, 2]  # sample of scenario 9009 dropped
    assert tr["click"][:4] == [1, 0, 1, 0] and tr["conversion"][:5] == [1, 0, 0, 0, 1]
    # common (user-side) features joined by common_feature_index: sample i has user i % 3
    users = vocab(out, "f101")
    assert users == {0: 1, 1: 2, 2: 3}
    assert tr["f101"][:4] == [1, 2, 3, 1] and tr["f121"][:3] == [1, 2, 1]
    # unseen in train → OOV row 0: user 999 (common c3, test samples 0 and 1), item 777 (test sample 0)
    assert ev["f101"] == [0, 0, 1, 1, 1, 1] and ev["f205"][0] == 0 and ev["f205"][1] != 0
    # list field 210: 0..2 entries per sample; absent → empty list
    v210 = vocab(out, "f210")
    assert tr["f210"][:3] == [[], [v210[700]], [v210[700], v210[701]]]
    # single-valued 216 absent on every 5th sample → missing-value id -1 (a row of its own); absent fields → -1 too
    assert vocab(out, "f216") == {-1: 1, 800: 2, 801: 3} and tr["f216"][:2] == [1, 3]
    assert vocab(out, "f702") == {-1: 1} and set(tr["f702"]) == {1}
    readme = open(os.path.join(out, "README.md")).read()
    assert "dataset/408" in readme and "common_features_test.csv" in readme and "eval 1" in readme
    for split, c in (("train", [9, 9, 9]), ("val", [1, 1, 1]), ("eval", [2, 2, 2])):
        assert f"| {split} | {c[0]} | {c[1]} | {c[2]} | {sum(c)} |" in readme


def test_random_val_and_list_field_option_cli(tmp_path):
    src, out = write(tmp_path / "raw"), str(tmp_path / "out")
    assert cli(["aliccp", "--src", src, "--out", out, "--split", "random", "--seed", "2",
                "--fields", "101", "205", "--list-fields", "210", "109_14"]) == 0
    cfg = yaml.safe_load(open(os.path.join(out, "data.yaml")))
    assert [f["name"] for f in cfg["sparse"]] == ["f101", "f205", "f210", "f109_14"]
    assert len(read(out, "train")["scenario"]) == 27 and len(read(out, "val")["scenario"]) == 3
    assert read(out, "train")["f109_14"][0] == [1, 2]  # from the common line: ids 7, 8
    assert "random 10%" in open(os.path.join(out, "README.md")).read()


@pytest.mark.parametrize("name,bad,line,what", [
    ("sample_skeleton_train.csv", (3, "x,1,0,c0,1,301\x019001\x031.0,extra"), 3, "expected 6 fields"),
    ("sample_skeleton_train.csv", (4, "x,1,0,c0,2,301\x019001\x031.0"), 4, "feature_num is 2"),
    ("sample_skeleton_train.csv", (5, "x,1,0,c0,1,301\x039001\x011.0"), 5, "not field"),
    ("sample_skeleton_test.csv", (2, "x,yes,0,c0,1,301\x019001\x031.0"), 2, "label 'click'"),
    ("sample_skeleton_test.csv", (3, "x,1,0,c0,1,205\x01500\x031.0"), 3, "scenario field 301"),
    ("sample_skeleton_train.csv", (2, "x,1,0,c0,2,301\x019001\x031.0\x02205\x01abc\x031.0"), 2, "not an integer"),
    ("sample_skeleton_train.csv", (6, "x,1,0,c0,2,301\x019001\x031.0\x02205\x011\x031.0\x02205\x012\x031.0"),
     6, "feature_num is 2"),
    ("sample_skeleton_train.csv", (6, "x,1,0,c0,3,301\x019001\x031.0\x02205\x011\x031.0\x02205\x012\x031.0"),
     6, "--list-fields"),
    ("common_features_train.csv", (2, "c9,1"), 2, "expected 3 fields"),
])
def test_malformed_line_names_file_and_line(tmp_path, name, bad, line, what):
    src = write(tmp_path / "raw", {name: bad})
    msg = convert_error(aliccp.convert, src, str(tmp_path / "out"))
    assert f"{name}: line {line}:" in msg and what in msg


def test_unknown_common_index_names_both_files(tmp_path):
    src = write(tmp_path / "raw", {"sample_skeleton_test.csv": (4, sample_line(1, "c7", 9001))})
    with pytest.raises(ConvertError) as err:
        aliccp.convert(src, str(tmp_path / "out"))
    msg = str(err.value)
    assert "sample_skeleton_test.csv: line 4:" in msg and "'c7'" in msg and "common_features_test.csv" in msg


def test_converted_set_trains(tmp_path):
    from tests.data.test_convert_trains import train_3_steps

    train_3_steps(aliccp.convert(write(tmp_path / "raw"), str(tmp_path / "data"), dim=4), tmp_path)
