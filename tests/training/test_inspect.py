"""GateRecorder (msrec_dist/training/inspect.py) on the hand-made 4-row Batch (tests/model/conftest.py):
gate weights sum to 1 over experts, masked experts get 0, the per-scenario means equal a hand
computation (the field stack built, not folded), the recomputed weights reproduce each level's
output, scenario gates and mixing weights, accumulation, hooks removed on exit, no PLE → no gates."""
from __future__ import annotations

import json
import os

import pytest
import torch

from msrec_dist.config import load_experiment
from msrec_dist.distributed.context import init_distributed
from msrec_dist.model.fields import FieldParts
from msrec_dist.model.ple import level_inputs
from msrec_dist.model.zoo import MultiTaskTrainModule, build_model
from msrec_dist.training.inspect import GateRecorder, gate_weights
from tests.model.conftest import SCENARIO, make_batch, make_data_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCENARIOS, TASKS = ["home", "search", "cart"], ["click", "convert"]


@pytest.fixture
def model_data():
    """tests/model/conftest.py's FeatureSpec (its fixtures are that package's own)."""
    return make_data_config()


@pytest.fixture
def batch4():
    return make_batch()


def train_module(name: str, data, *overrides: str, seed: int = 0) -> MultiTaskTrainModule:
    cfg = load_experiment(os.path.join(ROOT, "configs", f"{name}.yaml"), data="unused-data.yaml",
                          overrides=overrides)
    torch.manual_seed(seed)
    return MultiTaskTrainModule(build_model(cfg.model, data), cfg.train.task_weights)


def capture_levels(module: MultiTaskTrainModule, batch) -> list[tuple]:
    """(x, onehot, output) of each CGC level in one forward."""
    seen: list[tuple] = []
    handles = [level.register_forward_hook(lambda m, args, out: seen.append((args[0], args[1], out.detach())))
               for level in module.model.experts.levels]
    with torch.no_grad():
        module(batch)
    for h in handles:
        h.remove()
    return seen


def hand_logits(level, x, onehot) -> torch.Tensor:
    """[G, B, E] gate logits + bias + mask, from the built field stack (not the folded GEMM)."""
    w, b = level.gates.weight, level.gates.bias  # [G, in, E], [G, 1, E]
    if isinstance(x, FieldParts):
        x = x.stack().flatten(1)  # [B, F·D]
    gate_in = x.unsqueeze(0).expand(w.size(0), -1, -1) if x.dim() == 2 else x[:w.size(0)]  # [G, B, in]
    logits = torch.bmm(gate_in, w) + b  # [G, B, E]
    if level.scenario_gate_bias is not None:
        logits = logits + torch.einsum("bs,gse->gbe", onehot, level.scenario_gate_bias)
    return logits + level.mask


def per_scenario_means(weights: torch.Tensor, scenario: list[int], num_scenarios: int) -> list:
    """[G, B, E] → [S][G][E] by hand: the mean over the rows of each scenario (None: no rows)."""
    out = []
    for s in range(num_scenarios):
        rows = [b for b, sc in enumerate(scenario) if sc == s]
        out.append(weights[:, rows].mean(1).tolist() if rows else None)
    return out


def record(module, *batches) -> dict:
    with GateRecorder(module, SCENARIOS, TASKS) as rec, torch.no_grad():
        for batch in batches:
            module(batch)
    return rec.summary(1)


@pytest.mark.parametrize("name,overrides", [("ple", ()), ("msrec_full", ()),
                                            ("ple", ("model.experts.scenario_gates=true",))],
                         ids=["ple", "msrec_full", "ple_scenario_gates"])
def test_gate_means_match_a_hand_computation(name, overrides, model_data, batch4):
    module = train_module(name, model_data, *overrides).eval()
    levels = module.model.experts.levels
    for level in levels:  # a bias that differs by scenario, so that picking the row's one matters
        if level.scenario_gate_bias is not None:
            with torch.no_grad():
                level.scenario_gate_bias.normal_(0.0, 2.0)
    summary = record(module, batch4)
    json.dumps(summary, allow_nan=False)  # strict JSON
    assert list(summary["gates"]) == [f"level_{i}" for i in range(len(levels))]
    captured = capture_levels(module, batch4)
    for i, (level, (x, onehot, _)) in enumerate(zip(levels, captured)):
        got = summary["gates"][f"level_{i}"]
        last = i == len(levels) - 1
        assert got["gate_names"] == TASKS + ([] if last else ["shared"])
        assert got["expert_names"] == ["click_0", "convert_0", "shared_0", "shared_1"]
        assert got["rows"] == [2, 1, 1]
        weights = torch.tensor(got["weights"], dtype=torch.float64)  # [S, G, E]
        torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:2], dtype=torch.float64))
        masked = (level.mask.squeeze(1) == float("-inf")).expand_as(weights)  # [S, G, E]
        assert masked.any() and (weights[masked] == 0).all()
        expected = per_scenario_means(torch.softmax(hand_logits(level, x, onehot), -1), SCENARIO, 3)
        torch.testing.assert_close(weights, torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    if "model.experts.scenario_gates=true" in overrides:  # the bias moved scenario 1's mean off scenario 2's
        w = torch.tensor(summary["gates"]["level_0"]["weights"])
        assert (w[1] - w[2]).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["ple", "msrec_full"])
def test_recomputed_weights_reproduce_each_level_output(name, model_data, batch4):
    """Σ_e w[g, b, e] · ReLU(expert_e(x))[b] is the level's output: the recorder's softmax is the forward's."""
    module = train_module(name, model_data).eval()
    for level, (x, onehot, out) in zip(module.model.experts.levels, capture_levels(module, batch4)):
        with torch.no_grad():
            w = gate_weights(level, x, onehot)  # [G, B, E]
            expert_in = x if isinstance(x, FieldParts) else level_inputs(x, level.expert_group, level.mask.size(0))[0]
            experts = level.experts.layers[0](expert_in).relu()  # [E, B, h]
        torch.testing.assert_close(torch.einsum("gbe,ebh->gbh", w, experts), out, rtol=1e-5, atol=1e-5)


def test_means_accumulate_over_batches_and_ranks(model_data):
    module = train_module("ple", model_data).eval()
    a, b = make_batch(seed=1), make_batch(scenario=[2, 2, 1, 0], seed=2)
    both = record(module, a, b)
    assert both["gates"]["level_0"]["rows"] == [3, 2, 3]
    w = [torch.softmax(hand_logits(lv, x, oh), -1) for lv, (x, oh, _) in zip(module.model.experts.levels[:1],
                                                                             capture_levels(module, a))]
    w += [torch.softmax(hand_logits(lv, x, oh), -1) for lv, (x, oh, _) in zip(module.model.experts.levels[:1],
                                                                              capture_levels(module, b))]
    expected = per_scenario_means(torch.cat(w, dim=1), SCENARIO + [2, 2, 1, 0], 3)
    torch.testing.assert_close(torch.tensor(both["gates"]["level_0"]["weights"]), torch.tensor(expected),
                               rtol=1e-5, atol=1e-6)
    # a world of one through the all-reduce path: the sums are unchanged
    init_distributed()
    with GateRecorder(module, SCENARIOS, TASKS) as rec, torch.no_grad():
        module(a)
        module(b)
    assert rec.summary(world_size=2)["gates"] == both["gates"]


def test_a_scenario_without_rows_has_no_weights(model_data):
    module = train_module("ple", model_data).eval()
    summary = record(module, make_batch(scenario=[0, 0, 2, 2]))
    level = summary["gates"]["level_1"]
    assert level["rows"] == [2, 0, 2] and level["weights"][1] is None


def test_mixing_weights_are_the_parameters(model_data, batch4):
    module = train_module("msrec_full", model_data).eval()
    mixing = module.model.mixing
    with torch.no_grad():
        mixing.scenario_theta.copy_(torch.tensor([0.0, 1.0, -2.0]))
        mixing.task_scale.copy_(torch.tensor([0.25, 0.75]).view(2, 1, 1))
    got = record(module, batch4)["mixing"]
    assert got["scenario_own_weight"] == pytest.approx(torch.sigmoid(torch.tensor([0.0, 1.0, -2.0])).tolist())
    assert got["task_own_weight"] == pytest.approx([0.9, 0.9])  # msrec.yaml's own_weight_init
    assert got["task_scale"] == pytest.approx([0.25, 0.75])
    assert got["scenario_scale"] == pytest.approx([0.5, 0.5])  # scale_init


def test_a_model_without_ple_has_no_gates(model_data, batch4):
    for name in ("star", "shared_bottom"):
        summary = record(train_module(name, model_data).eval(), batch4)
        assert summary["gates"] == {} and "mixing" not in summary


def test_recording_a_training_forward_leaves_the_gradients_alone(model_data, batch4):
    """The hook runs after the forward has filled FieldParts' caches, so the gradients (first CGC
    level on folded fields) are those of an unrecorded step; hooks are gone after exit."""
    grads = []
    for recorded in (False, True):
        module = train_module("ple", model_data).train()
        rec = GateRecorder(module, SCENARIOS, TASKS)
        if recorded:
            with rec:
                loss, _ = module(batch4)
        else:
            loss, _ = module(batch4)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in module.named_parameters()})
        if recorded:
            with torch.no_grad():
                module(batch4)  # after exit: not recorded
            assert rec.summary(1)["gates"]["level_0"]["rows"] == [2, 1, 1]
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=0, atol=0, msg=n)


def _rank_worker(rank: int, init_file: str, out_dir: str) -> None:
    """Rank r records batch r of BATCHES; summary(2) writes the all-reduced means."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        module = train_module("ple", make_data_config()).eval()
        with GateRecorder(module, SCENARIOS, TASKS) as rec, torch.no_grad():
            module(make_batch(**BATCHES[rank]))
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(rec.summary(world_size=2), f)
    finally:
        dist.destroy_process_group()


BATCHES = [dict(seed=1), dict(scenario=[2, 2, 1, 0], seed=2)]


@pytest.mark.dist
def test_summary_sums_over_ranks(tmp_path, model_data):
    """2 gloo ranks, one batch each: every rank's summary is one process's over both batches."""
    import torch.multiprocessing as mp
    mp.spawn(_rank_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    expected = record(train_module("ple", model_data).eval(), *(make_batch(**b) for b in BATCHES))
    for rank in range(2):
        with open(tmp_path / f"rank{rank}.json") as f:
            got = json.load(f)
        assert got["gates"].keys() == expected["gates"].keys()
        for level, entry in expected["gates"].items():
            assert got["gates"][level]["rows"] == entry["rows"]
            torch.testing.assert_close(torch.tensor(got["gates"][level]["weights"]), torch.tensor(entry["weights"]),
                                       rtol=1e-6, atol=1e-7)
