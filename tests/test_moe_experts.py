"""Whole-expert removal (``prune_experts_``): planted dead experts and hidden units, exactness
under renormalised routing, the inexactness of unrenormalised routing, checkpoints, bad input."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import torchslim
from archs import MOE_CONFIGS, ModuleListMoE, tiny_moe_causal_lm, tiny_moe_config, zero_expert_units_
from torchslim import pruning_history
from torchslim.pruning import InexactPruningWarning, moe_layers, prune_experts_, routing_frequency

transformers = pytest.importorskip("transformers")

DEAD_EXPERT = {"model.layers.0.mlp": [1], "model.layers.1.mlp": [3]}
DEAD_UNITS = [3, 17, 40, 41]


def _ids(seed: int) -> dict:
    return {"input_ids": torch.randint(1, 100, (2, 8), generator=torch.Generator().manual_seed(seed)), "use_cache": False}


BATCHES = [_ids(1), _ids(2)]  # calibration data: 32 tokens, fewer than the 64 router inputs' dims
INPUTS = ((), BATCHES[0])


def _router_inputs(model, layer) -> tuple[torch.Tensor, torch.Tensor]:
    """The router's inputs and logits over every calibration token."""
    seen = []
    handle = layer.mlp.gate.register_forward_hook(lambda m, args, out: seen.append(args[0].reshape(-1, 64)))
    with torch.no_grad():
        for batch in BATCHES:
            model(**batch)
    handle.remove()
    x = torch.cat(seen)
    return x, x @ layer.mlp.gate.weight.T


def _plant_dead_expert(model, dead: dict[str, list[int]] = DEAD_EXPERT) -> None:
    """Give each layer's dead expert a router row scoring it just under every other expert on
    every calibration token: never in the top-2, yet with a sizeable share of the softmax."""
    for i, layer in enumerate(model.model.layers):
        expert = dead[f"model.layers.{i}.mlp"][0]
        x, logits = _router_inputs(model, layer)  # after the layers before were planted
        others = torch.cat([logits[:, :expert], logits[:, expert + 1:]], 1)
        target = others.min(1).values - 0.5
        with torch.no_grad():
            layer.mlp.gate.weight[expert] = torch.linalg.lstsq(x, target[:, None]).solution[:, 0]
        assert (_router_inputs(model, layer)[1].argsort(1)[:, 0] == expert).all()  # always ranked last


def _logits(model, batch=BATCHES[0]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def _planted_mixtral(implementation: str = "grouped_mm"):
    model = tiny_moe_causal_lm(tiny_moe_config("mixtral"), implementation)
    zero_expert_units_(model, DEAD_UNITS)
    _plant_dead_expert(model)
    return model


@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm", "eager"])
def test_planted_dead_expert_and_units_are_exactly_the_ones_removed(implementation):
    model = _planted_mixtral(implementation)
    original = copy.deepcopy(model)
    assert [(layer.path, layer.num_experts, layer.top_k, layer.fused) for layer in moe_layers(model, INPUTS)] == [
        ("model.layers.0.mlp", 4, 2, True), ("model.layers.1.mlp", 4, 2, True)]
    units = torchslim.prune_(model, INPUTS, torchslim.PruneConfig(ratio=len(DEAD_UNITS) / 128, exact_only=True,
                                                                  op_names=["*experts*"]))
    result = prune_experts_(model, INPUTS, data=BATCHES, ratio=0.25)
    assert result.experts_removed == DEAD_EXPERT
    assert all(scores[DEAD_EXPERT[path][0]] == 0 for path, scores in result.expert_scores.items())
    kept_units = [u for u in range(128) if u not in DEAD_UNITS]
    for i, (layer, before) in enumerate(zip(model.model.layers, original.model.layers)):
        kept = [e for e in range(4) if e not in DEAD_EXPERT[f"model.layers.{i}.mlp"]]
        assert torch.equal(layer.mlp.gate.weight, before.mlp.gate.weight[kept])
        assert torch.equal(layer.mlp.experts.down_proj, before.mlp.experts.down_proj[kept][:, :, kept_units])
        assert layer.mlp.gate.num_experts == layer.mlp.experts.num_experts == 3
    for batch in BATCHES:  # the same routing: the dead expert and units never contributed
        difference = (_logits(model, batch) - _logits(original, batch)).abs().max()
        assert difference < 1e-5, difference
    assert result.max_abs_error is not None and result.max_abs_error < 1e-5 and result.inexact_deviation is None
    assert result.params_after == units.params_after - 2 * (3 * 64 * 124 + 64)  # one expert and one router row per layer
    assert result.macs_after < result.macs_before  # the router's product is narrower; the top-2 work stays
    assert result.hf_config is not None and result.hf_config["num_local_experts"] == 3
    assert model.config.num_local_experts == 3 and model.num_experts == 3


def test_checkpoint_and_save_pretrained_round_trips(tmp_path):
    model = _planted_mixtral()
    torchslim.prune_(model, INPUTS, torchslim.PruneConfig(ratio=len(DEAD_UNITS) / 128, exact_only=True,
                                                          op_names=["*experts*"]))
    prune_experts_(model, INPUTS, data=BATCHES, num_experts=3)
    history = pruning_history(model)
    assert len(history.steps) == 2 and history.steps[1].experts == DEAD_EXPERT
    torchslim.save(model, tmp_path / "ckpt")
    plan = json.loads((tmp_path / "ckpt" / "plan.json").read_text())
    assert plan["format"] == "torchslim.plan/3" and plan["steps"][1]["experts"] == DEAD_EXPERT
    assert plan["steps"][1]["removed"]["model.layers.1.mlp.gate.weight"] == {"0": [3]}
    fresh = torchslim.load(tmp_path / "ckpt", tiny_moe_causal_lm(tiny_moe_config("mixtral")))
    assert torch.equal(_logits(fresh), _logits(model))
    assert fresh.config.num_local_experts == 3 and fresh.model.layers[0].mlp.experts.num_experts == 3

    model.save_pretrained(tmp_path / "hf")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert back.config.num_local_experts == 3 and back.config.intermediate_size == 124
    assert torch.equal(_logits(back), _logits(model))
    out = model.generate(BATCHES[0]["input_ids"][:1], max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (1, 11)


@pytest.mark.parametrize("renormalised", [False, True])
def test_qwen2_moe_without_renormalised_top_k_is_reported_inexact(renormalised):
    model = tiny_moe_causal_lm(tiny_moe_config("qwen2_moe", norm_topk_prob=renormalised))
    _plant_dead_expert(model)
    original = copy.deepcopy(model)
    if renormalised:
        result = prune_experts_(model, INPUTS, data=BATCHES, ratio=0.25)
    else:
        with pytest.warns(InexactPruningWarning, match="does not renormalise its top-k weights"):
            result = prune_experts_(model, INPUTS, data=BATCHES, ratio=0.25)
    assert result.experts_removed == DEAD_EXPERT  # never routed to, in both cases
    difference = float((_logits(model) - _logits(original)).abs().max())
    if renormalised:
        assert difference < 1e-5 and result.inexact_deviation is None
    else:  # the softmax over all experts weighs each chosen one: removing any expert moves them all
        assert difference > 1e-3 and result.inexact_deviation is not None and result.inexact_deviation > 1e-4
        assert result.max_abs_error == pytest.approx(difference, rel=1e-6)
    assert model.config.num_experts == 3


def test_removing_routed_experts_reports_their_share_and_max_deviation_rolls_back():
    model = tiny_moe_causal_lm(tiny_moe_config("mixtral"))
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(torchslim.PruningError, match=r"took .*% of its routing slots"):
        prune_experts_(model, INPUTS, experts={"model.layers.0.mlp": [0]}, max_deviation=1e-6)
    _assert_untouched(model, state, experts=4)
    with pytest.warns(InexactPruningWarning, match="took"):
        result = prune_experts_(model, INPUTS, experts={"model.layers.0.mlp": [0]})
    assert result.inexact_deviation is not None and result.inexact_deviation > 0


def test_non_uniform_expert_counts_leave_the_config_and_still_round_trip(tmp_path):
    model = _planted_mixtral()
    original = copy.deepcopy(model)
    result = prune_experts_(model, INPUTS, experts={"model.layers.0.mlp": [1]})
    assert result.hf_config is None and model.config.num_local_experts == 4 and model.num_experts == 4
    assert model.model.layers[0].mlp.experts.num_experts == 3 and model.model.layers[1].mlp.experts.num_experts == 4
    assert (_logits(model) - _logits(original)).abs().max() < 1e-5
    torchslim.save(model, tmp_path)
    fresh = torchslim.load(tmp_path, tiny_moe_causal_lm(tiny_moe_config("mixtral")))
    assert torch.equal(_logits(fresh), _logits(model))


def _assert_untouched(model, state: dict, experts: int) -> None:
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    assert model.config.num_local_experts == experts and model.model.layers[0].mlp.experts.num_experts == experts
    assert not pruning_history(model).steps


@pytest.mark.parametrize("kwargs, message", [
    (dict(experts={"model.layers.0.mlp": [0, 1, 2, 3]}), "would leave 0, fewer than the 2"),
    (dict(experts={"model.layers.0.mlp": [0, 1, 2]}), "would leave 1, fewer than the 2 its router picks"),
    (dict(num_experts=1), "would leave 1, fewer than the 2"),
    (dict(experts={"model.layers.9.mlp": [0]}), "'model.layers.9.mlp' is not a mixture-of-experts layer"),
    (dict(experts={"model.layers.0.mlp": [4]}), r"must be distinct indices in \[0, 4\)"),
    (dict(ratio=0.25, layers=["model.decoder.*"]), "'model.decoder.\\*' names no mixture-of-experts layer"),
    (dict(ratio=0.25, num_experts=3), "exactly one of ratio=, num_experts= and experts="),
    (dict(ratio=0.25, importance="magnitude"), "importance 'magnitude' is unknown"),
])
def test_bad_input_names_the_problem_and_leaves_the_model_untouched(kwargs, message):
    model = tiny_moe_causal_lm(tiny_moe_config("mixtral"))
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=message):
        prune_experts_(model, INPUTS, **kwargs)
    _assert_untouched(model, state, experts=4)


def test_a_model_without_experts_is_refused():
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="has no mixture-of-experts layer"):
        prune_experts_(model, torch.randn(3, 8), ratio=0.5)


def test_weighted_frequency_and_routing_frequency():
    model = _planted_mixtral()
    layers = moe_layers(model, INPUTS)
    frequency = routing_frequency(model, layers, BATCHES)
    weighted = routing_frequency(model, layers, BATCHES, weighted=True)
    for path, dead in DEAD_EXPERT.items():
        assert frequency[path].sum() == pytest.approx(2.0) and frequency[path][dead[0]] == 0  # top-2: 2 per token
        assert 0 < weighted[path].sum() < 1 and weighted[path][dead[0]] == 0
    result = prune_experts_(model, INPUTS, data=BATCHES, ratio=0.25, importance="weighted_frequency")
    assert result.experts_removed == DEAD_EXPERT


# per-expert modules -----------------------------------------------------------------------
def _planted_module_list_moe() -> ModuleListMoE:
    torch.manual_seed(0)
    model = ModuleListMoE(head=3).eval()
    with torch.no_grad():
        model.router.bias[2] = -100.0  # expert 2 is never the argmax
        model.experts[0].up.weight[5] = 0  # and expert 0's unit 5 never contributes
        model.experts[0].up.bias[5] = 0
        model.experts[0].down.weight[:, 5] = 0
    return model


def test_module_list_experts_lose_the_dead_expert_and_round_trip(tmp_path):
    model = _planted_module_list_moe()
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(3))
    assert [(layer.path, layer.router, layer.experts, layer.top_k, layer.fused) for layer in moe_layers(model, x)] == [
        ("", "router", "experts", 1, False)]
    optimizer = torch.optim.Adam(model.parameters())
    model(x).sum().backward()
    optimizer.step()  # state to slice; zero gradients leave the dead unit at zero
    original = copy.deepcopy(model)
    torchslim.prune_(model, x, torchslim.PruneConfig(ratios={"experts.0.up": 1 / 32}, ratio=0.0, exact_only=True),
                     optimizer=optimizer)
    assert model.experts[0].up.out_features == 31
    kept_expert_1 = model.experts[1]
    result = prune_experts_(model, x, ratio=0.25, optimizer=optimizer)
    assert result.experts_removed == {"": [2]} and len(model.experts) == 3 and model.experts[1] is kept_expert_1
    assert model.router.out_features == 3 and model.router.weight.shape == (3, 16)
    assert torch.equal(model.experts[2].up.weight, original.experts[3].up.weight)
    with torch.no_grad():  # expert 2 never ran and unit 5 never contributed: the same outputs, rounding aside
        torch.testing.assert_close(model(x), original(x), rtol=0, atol=1e-6)
    assert pruning_history(model).steps[-1].dropped == ["experts.2"]
    model(x).sum().backward()
    optimizer.step()  # the optimizer holds the kept parameters only, its state sliced
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    torchslim.save(model, tmp_path)
    fresh = torchslim.load(tmp_path, ModuleListMoE(head=3))
    assert len(fresh.experts) == 3 and fresh.experts[0].up.out_features == 31
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


class _CountsItsExperts(ModuleListMoE):
    def forward(self, x):
        if len(self.experts) != 4:
            raise RuntimeError("this block was written for exactly 4 experts")
        return super().forward(x)


def test_a_removal_the_model_rejects_is_rolled_back():
    torch.manual_seed(0)
    model = _CountsItsExperts(head=3).eval()
    x = torch.randn(32, 16)
    state, experts = copy.deepcopy(model.state_dict()), list(model.experts)
    with pytest.raises(torchslim.PruningError, match="exactly 4 experts"):
        prune_experts_(model, x, experts={"": [1]})
    assert list(model.experts) == experts and model.router.out_features == 4
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert not pruning_history(model).steps


def test_verify_refuses_a_plan_that_removes_experts():
    model = _planted_module_list_moe()
    x = torch.randn(16, 16)
    original = copy.deepcopy(model)
    result = prune_experts_(model, x, ratio=0.25)
    with pytest.raises(ValueError, match="removes whole experts"):
        torchslim.verify(original, model, x, result.plan)


# command line -----------------------------------------------------------------------------
def test_cli_prune_expert_ratio_writes_a_loadable_checkpoint(tmp_path, capsys):
    from torchslim.cli import main

    calibration = tmp_path / "calib.py"
    calibration.write_text("import torch\n\ndef batches():\n"
                           "    return [torch.randint(1, 100, (2, 8), generator=torch.Generator().manual_seed(s))"
                           " for s in (1, 2)]\n")
    kwargs = json.dumps(MOE_CONFIGS["mixtral"])
    out = tmp_path / "moe"
    assert main(["prune", "hf:mixtral", "--input", "2,8", "--model-kwargs", kwargs, "--expert-ratio", "0.25",
                 "--data", f"{calibration}:batches", "--repeats", "1", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["compared_with"] == "original" and report["params"][1] < report["params"][0]
    assert {path: len(gone) for path, gone in report["experts_removed"].items()} == {"layers.0.mlp": 1, "layers.1.mlp": 1}
    text = capsys.readouterr().out
    assert "2 expert(s) removed" in text and f"max |difference| {report['max_abs_error']:.3g}" in text
    fresh = torchslim.load(out, transformers.AutoModel.from_config(tiny_moe_config("mixtral")))
    assert fresh.config.num_local_experts == 3 and fresh.layers[1].mlp.gate.weight.shape == (3, 64)


@pytest.mark.parametrize("extra, message", [
    (["--expert-ratio", "0.75"], "would leave 1, fewer than the 2 its router picks"),
    (["--expert-ratio", "0.25", "--criterion", "fisher"], "--criterion and --loss apply to channels"),
])
def test_cli_expert_ratio_errors_are_one_line(tmp_path, capsys, extra, message):
    from torchslim.cli import main

    assert main(["prune", "hf:mixtral", "--input", "2,8", "--model-kwargs", json.dumps(MOE_CONFIGS["mixtral"]), *extra,
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
