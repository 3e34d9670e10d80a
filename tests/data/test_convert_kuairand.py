"""KuaiRand converter (msrec_dist/data/convert/kuairand.py) on tiny KuaiRand-Pure-style CSVs written
here: standard logs only, tab scenarios, time-order 8:1:1 split, user/video feature joins, the tag
list, OOV row, README, malformed lines."""
from __future__ import annotations

import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from msrec_dist.data.convert import kuairand
from msrec_dist.data.convert.__main__ import main as cli
from msrec_dist.data.convert.common import ConvertError
from tests.data.convert_errors import convert_error

LOG_HEADER = ("user_id,video_id,date,hourmin,time_ms,is_click,is_like,is_follow,is_comment,is_forward,is_hate,"
              "long_view,play_time_ms,duration_ms,profile_stay_time,comment_stay_time,is_profile_enter,is_rand,tab")
USER_HEADER = ("user_id,user_active_degree,is_lowactive_period,is_live_streamer,is_video_author,follow_user_num,"
               "follow_user_num_range,fans_user_num_range,register_days_range,onehot_feat0,onehot_feat1")
VIDEO_HEADER = ("video_id,author_id,video_type,upload_dt,upload_type,visible_status,video_duration,server_width,"
                "server_height,music_id,music_type,tag")


def log_row(i: int) -> str:
    user = i % 5 if i < 36 else 77  # user 77: only in the eval rows, absent from user_features
    tab = 4 if i == 39 else i % 3  # tab 4: only in eval → that row is dropped
    click, long_view = int(i % 2 == 0), int(i % 4 == 0)
    return (f"{user},{10 + i % 6},20220408,1200,{1000 + i},{click},0,0,0,0,0,{long_view},500,9000,0,0,0,0,{tab}")


def write(src, bad: dict[str, tuple[int, str]] | None = None) -> str:
    """Log A: rows 0..29, log B: rows 30..39 (time_ms 1000 + i); 5 users, 6 videos.
    bad: file name → (line number, line text) inserted there."""
    os.makedirs(src, exist_ok=True)
    users = [f"{u},{['high_active', 'full_active'][u % 2]},0,0,{u % 2},{u * 3},\"(0,10]\",[0;10),\"31-60\",{u % 3},1"
             for u in range(5)]
    videos = [f"{v},{200 + v % 3},NORMAL,2022-03-01,ShortImport,public,{(v - 9) * 10000.0},720,1280,{300 + v % 2},"
              f"1,\"{v % 3},{v % 3 + 5}\"" for v in range(10, 15)]
    videos.append("15,202,AD,2022-03-01,ShortImport,public,,720,1280,301,1,")  # no duration, no tag
    files = {
        "log_standard_4_08_to_4_21_pure.csv": [LOG_HEADER] + [log_row(i) for i in range(30)],
        "log_standard_4_22_to_5_08_pure.csv": [LOG_HEADER] + [log_row(i) for i in range(30, 40)],
        "log_random_4_22_to_5_08_pure.csv": ["not,a,log"],  # random exposure: never read
        "user_features_pure.csv": [USER_HEADER] + users,
        "video_features_basic_pure.csv": [VIDEO_HEADER] + videos,
    }
    for name, lines in files.items():
        if bad and name in bad:
            at, text = bad[name]
            lines.insert(at - 1, text)
        (src / name).write_text("\n".join(lines) + "\n")
    return str(src)


def read(out, split):
    return pq.read_table(os.path.join(out, split)).to_pydict()


def test_tabs_time_split_joins_oov(tmp_path):
    src, out = write(tmp_path / "raw"), str(tmp_path / "out")
    path = kuairand.convert(src, out)
    cfg = yaml.safe_load(open(path))
    assert cfg["scenario"]["names"] == ["tab0", "tab1", "tab2"]
    assert [t["name"] for t in cfg["tasks"]] == ["is_click", "long_view"]
    names = [f["name"] for f in cfg["sparse"]]
    assert names == ["user_id", "video_id", "author_id", "music_id", "video_type", "upload_type", "tag",
                     "user_active_degree", "is_lowactive_period", "is_live_streamer", "is_video_author",
                     "follow_user_num_range", "fans_user_num_range", "register_days_range",
                     "onehot_feat0", "onehot_feat1"]
    assert [d["name"] for d in cfg["dense"]] == ["video_duration"]
    tr, va, ev = (read(out, s) for s in ("train", "val", "eval"))
    # 40 rows in time order: train 0..31, val 32..35, eval 36..39 (39 is tab 4, unseen in train: dropped)
    assert np.bincount(tr["scenario"], minlength=3).tolist() == [11, 11, 10]
    assert np.bincount(va["scenario"], minlength=3).tolist() == [1, 1, 2]
    assert np.bincount(ev["scenario"], minlength=3).tolist() == [1, 1, 1]
    assert tr["is_click"][:4] == [1, 0, 1, 0] and tr["long_view"][:5] == [1, 0, 0, 0, 1]
    # user 77 (eval only, no user_features row) → OOV row 0 for the id and its profile features
    assert ev["user_id"] == [0, 0, 0] and ev["user_active_degree"] == [0, 0, 0]
    vu = pq.read_table(os.path.join(out, "vocab", "user_id.parquet")).to_pydict()
    assert vu == {"raw": [0, 1, 2, 3, 4], "index": [1, 2, 3, 4, 5]}
    assert tr["user_id"][:6] == [1, 2, 3, 4, 5, 1]
    # tag list: video 10 → tags "1,6", video 15 → no tag (empty list); duration log1p(s), missing → 0
    vt = pq.read_table(os.path.join(out, "vocab", "tag.parquet")).to_pydict()
    assert vt["raw"] == ["0", "1", "2", "5", "6", "7"]
    tag_index = dict(zip(vt["raw"], vt["index"]))
    assert tr["tag"][0] == [tag_index["1"], tag_index["6"]] and tr["tag"][5] == []
    assert tr["video_duration"][0] == pytest.approx(np.log1p(10.0)) and tr["video_duration"][5] == 0.0
    readme = open(os.path.join(out, "README.md")).read()
    assert "kuairand.com" in readme and "log_standard_4_22_to_5_08_pure.csv" in readme
    assert "log_random" in readme and "eval 1" in readme  # says the random logs are unused; 1 eval row dropped
    for split, c in (("train", [11, 11, 10]), ("val", [1, 1, 2]), ("eval", [1, 1, 1])):
        assert f"| {split} | {c[0]} | {c[1]} | {c[2]} | {sum(c)} |" in readme


def test_tabs_subset_and_random_split_cli(tmp_path):
    src, out = write(tmp_path / "raw"), str(tmp_path / "out")
    assert cli(["kuairand", "--src", src, "--out", out, "--tabs", "0", "2", "--split", "random", "--seed", "3"]) == 0
    cfg = yaml.safe_load(open(os.path.join(out, "data.yaml")))
    assert cfg["scenario"]["names"] == ["tab0", "tab2"]
    total = sum(len(read(out, s)["scenario"]) for s in ("train", "val", "eval"))
    assert total == 26  # rows of tab 0 (13) and tab 2 (13); the rest, tab 4 included, filtered out
    assert "random (seed 3)" in open(os.path.join(out, "README.md")).read()


@pytest.mark.parametrize("name,bad,line,what", [
    ("log_standard_4_22_to_5_08_pure.csv", (3, "1,2,3"), 3, "fields"),
    ("log_standard_4_08_to_4_21_pure.csv", (4, log_row(2).replace("1200,1002,1,", "1200,1002,x,")),
     4, "'is_click' is not an integer"),
    ("log_standard_4_08_to_4_21_pure.csv", (2, log_row(0).replace("1200,1000,1,", "1200,1000,2,")),
     2, "label 'is_click' is 2"),
    ("user_features_pure.csv", (3, "x,high_active,0,0,0,1,a,b,c,0,1"), 3, "'user_id' is not an integer"),
])
def test_malformed_line_names_file_and_line(tmp_path, name, bad, line, what):
    src = write(tmp_path / "raw", {name: bad})
    msg = convert_error(kuairand.convert, src, str(tmp_path / "out"))
    assert f"{name}: line {line}:" in msg and what in msg


def test_missing_logs_say_where_to_get_them(tmp_path):
    with pytest.raises(ConvertError, match="kuairand.com"):
        kuairand.convert(str(tmp_path), str(tmp_path / "out"))


def test_converted_set_trains(tmp_path):
    """3 steps through msrec_dist.training.runner.run on a world of one."""
    from tests.data.test_convert_trains import train_3_steps

    train_3_steps(kuairand.convert(write(tmp_path / "raw"), str(tmp_path / "data"), dim=4), tmp_path)
