"""SASS with and without its scenario-contrastive pre-training, at the same total budget.

    python -m benchmarks.pretrain_gain [--sets small ml100k] [--ml100k DATA.yaml] [--seeds 0 1 2]
                                      [--steps 600] [--arms pre50 pre150 ...] [--out benchmarks/results/pretrain_gain]

Per data set and seed, arms of configs/sass.yaml, each run's weights selected on val (train.eval_every):
    scratch     supervised for --steps steps
    pre<K>...   stage 1 (train.stage=pretrain) for K steps, then stage 2 from it (--init-from,
                the optimizer reset) for --steps − K steps: the same optimizer steps in all arms;
                the variants (ARMS) add overrides to one stage
The pretrained arm with the best mean val score over seeds is the one compared (chosen on val,
never on eval). The table: eval AUC per scenario × task, mean ± std over seeds, side by side, and the
difference (chosen − scratch) against the scratch arm's spread; the goal is a gain on the small
scenario beyond the seed spread and no loss elsewhere.

Data sets: `small` = msrec_dist.data.synth with --small-scenario-share 0.01 (the last scenario
keeps 1% of the train rows; its users also appear in the large scenarios), generated under
runs/bench_data; `ml100k` = a converted MovieLens-100K (python -m msrec_dist.data.convert
movielens), whose user feature is `user` and user fields user, gender, age, occupation, zip.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from benchmarks.perf_common import REPO, git_commit, machine, machine_line, table, write_results

SETS = {
    # user id feature, user fields of the set's data config
    "small": ("user_id", ["user_id", "user_segment", "hist_item_ids"]),
    "ml100k": ("user", ["user", "gender", "age", "occupation", "zip"]),
}


# name: (stage-1 steps, stage-1 overrides, stage-2 overrides); {user_id}: the set's user id feature;
# 0 stage-1 steps: a variant of scratch (supervised only, with the overrides)
ARMS = {
    "scratch": (0, [], []),  # always run: the supervised baseline
    "scratch_lowlr": (0, [], ["train.sparse_lr=0.01"]),
    "pre50": (50, [], []),
    "pre150": (150, [], []),
    # the loaded tables fine-tuned at a fifth of the sparse learning rate (0.05 → 0.01)
    "pre50_lowlr": (50, [], ["train.sparse_lr=0.01"]),
    # the user id zeroed in the scenario view: the views of one user then share no id
    "drop50": (50, ["model.sass.view_drop=[{user_id}]"], []),
    "drop150": (150, ["model.sass.view_drop=[{user_id}]"], []),
}


def small_data(root: str, seed: int = 0) -> str:
    from msrec_dist.data.synth import SynthSpec, generate

    out = os.path.join(root, f"small_share0.01_seed{seed}")
    path = os.path.join(out, "data.yaml")
    if not os.path.exists(path):
        generate(out, rows=200_000, shards=4, seed=seed, eval_rows=40_000, users=5_000, items=2_000,
                 spec=SynthSpec(small_scenario_share=0.01))
    return path


def train(data: str, run_dir: str, sets: list[str], init_from: str | None = None) -> dict:
    """final_metrics.json of the run, trained here unless `run_dir` already holds a finished one
    (--root: a stopped benchmark goes on where it was)."""
    done_path = os.path.join(run_dir, "final_metrics.json")
    if os.path.exists(done_path):
        with open(done_path) as f:
            return json.load(f)
    cmd = [sys.executable, os.path.join(REPO, "msrec_dist", "train.py"), "--config",
           os.path.join(REPO, "configs", "sass.yaml"), "--data", data, "--set", f"run.dir={run_dir}",
           "run.progress=false", "run.tensorboard=false", *sets]
    if init_from:
        cmd += ["--init-from", init_from, "--init-optimizer", "reset"]  # the contrastive stage's optimizer state is for another loss
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-4000:]}")
    with open(os.path.join(run_dir, "final_metrics.json")) as f:
        return json.load(f)


def cells(metrics: dict) -> dict[str, float]:
    return {f"{s}/{t}": c["auc"] for s, tasks in metrics["per_scenario"].items() for t, c in tasks.items()}


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", nargs="+", default=["small", "ml100k"], choices=list(SETS))
    ap.add_argument("--ml100k", default="data/ml100k/data.yaml", help="a converted MovieLens-100K data.yaml")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=600, help="optimizer steps of each arm in all")
    ap.add_argument("--arms", nargs="+", default=["pre50", "pre150"], choices=[arm for arm in ARMS if arm != "scratch"],
                    help="pretrained arms (ARMS: stage-1 steps and overrides), the one best on val compared")
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="more config overrides, both arms")
    ap.add_argument("--out", default="pretrain_gain")
    ap.add_argument("--root", help="keep the runs here (default: a temporary folder); finished runs are reused")
    a = ap.parse_args(argv)
    payload = {"machine": machine(), "commit": git_commit(), "seeds": a.seeds, "steps": a.steps,
               "arms": {k: ARMS[k] for k in a.arms}, "overrides": a.overrides, "sets": {}}
    lines = []
    with tempfile.TemporaryDirectory(prefix="pretrain_gain_") as tmp:
        root = a.root or tmp
        for name in a.sets:
            data = small_data(os.path.join(REPO, "runs", "bench_data")) if name == "small" else os.path.abspath(a.ml100k)
            user_id, user_fields = SETS[name]
            common = [f"model.sass.user_id_feature={user_id}", f"model.sass.user_fields=[{','.join(user_fields)}]",
                      f"train.eval_every={a.eval_every}", "train.epochs=100", *a.overrides]
            arms: dict[str, list[dict]] = {"scratch": [], **{k: [] for k in a.arms}}
            for seed in a.seeds:
                seeded = common + [f"run.seed={seed}"]
                for arm in arms:
                    k, pre_sets, fine_sets = ARMS[arm]
                    if k == 0:
                        arms[arm].append(train(data, os.path.join(root, f"{name}_{arm}_{seed}"),
                                               seeded + [f"train.max_steps={a.steps}", *fine_sets]))
                        continue
                    pre = os.path.join(root, f"{name}_{arm}_pre_{seed}")
                    train(data, pre, seeded + ["train.stage=pretrain", f"train.max_steps={k}",
                                               *(o.format(user_id=user_id) for o in pre_sets)])
                    arms[arm].append(train(data, os.path.join(root, f"{name}_{arm}_fine_{seed}"),
                                           seeded + [f"train.max_steps={a.steps - k}", *fine_sets],
                                           init_from=f"{pre}:latest"))
                print(name, seed, {arm: round(statistics.fmean(cells(v[-1]).values()), 4) for arm, v in arms.items()},
                      flush=True)
            val = {arm: mean_std([m["selection"]["score"] for m in runs]) for arm, runs in arms.items()}
            # each side's best on val: the supervised arms (scratch and its variants) against the
            # pretrained ones; without pretrained arms, scratch against its best variant
            supervised = ["scratch"] + [arm for arm in a.arms if ARMS[arm][0] == 0]
            pretrained = [arm for arm in a.arms if ARMS[arm][0] > 0]
            base = max(supervised, key=lambda arm: val[arm][0]) if pretrained else "scratch"
            chosen = max(pretrained or supervised[1:], key=lambda arm: val[arm][0])
            keys = list(cells(arms["scratch"][0]))
            rows = []
            summary = {}
            for key in keys:
                s = mean_std([cells(m)[key] for m in arms[base]])
                p = mean_std([cells(m)[key] for m in arms[chosen]])
                summary[key] = {base: s, chosen: p, "gain": p[0] - s[0]}
                beyond = "gain" if p[0] - s[0] > s[1] else ("loss" if s[0] - p[0] > s[1] else "within")
                others = [f"{statistics.fmean(cells(m)[key] for m in arms[arm]):.4f}" for arm in arms
                          if arm not in (base, chosen)]
                rows.append([key, f"{s[0]:.4f} ± {s[1]:.4f}", f"{p[0]:.4f} ± {p[1]:.4f}", f"{p[0] - s[0]:+.4f}", beyond,
                             *others])
            rows.append(["val mean AUC (selection)", f"{val[base][0]:.4f} ± {val[base][1]:.4f}",
                         f"{val[chosen][0]:.4f} ± {val[chosen][1]:.4f}", f"{val[chosen][0] - val[base][0]:+.4f}", "",
                         *[f"{val[arm][0]:.4f}" for arm in arms if arm not in (base, chosen)]])
            payload["sets"][name] = {"data": data, "summary": summary, "base": base, "chosen": chosen, "val": val,
                                     "runs": {k: [cells(m) for m in v] for k, v in arms.items()},
                                     "selected_steps": {k: [m["selection"]["step"] for m in v] for k, v in arms.items()}}
            others = [arm for arm in arms if arm not in (base, chosen)]
            lines += [f"### {name} (`{data}`): {base} against {chosen}, each chosen on val", "",
                      table(["scenario/task (eval AUC)", base, chosen, "gain", f"vs {base}'s std",
                             *[f"{arm} (mean)" for arm in others]], rows), ""]
    md = "\n".join([f"Machine: {machine_line(payload['machine'])}; commit {payload['commit']}", "",
                    "Command: `python -m benchmarks.pretrain_gain " + " ".join(
                        ["--sets", *a.sets, "--seeds", *map(str, a.seeds), "--steps", str(a.steps),
                         "--arms", *a.arms]) + "`", "",
                    f"configs/sass.yaml, {a.steps} optimizer steps per arm (pretrained arms: K of stage 1, the "
                    "rest fine-tuning from it), each run's weights chosen on val; eval AUC mean ± std over seeds "
                    f"{a.seeds}; compared: the supervised arm (scratch or a variant) and the pretrained arm with the "
                    "best mean val score. Arms "
                    "(stage-1 steps, stage-1 overrides, stage-2 overrides): "
                    + "; ".join(f"{k} {ARMS[k]}" for k in a.arms) + ".", "", *lines])
    js, md_path = write_results(a.out, payload, md)
    print(md)
    print(f"wrote {js} and {md_path}")


if __name__ == "__main__":
    main()
