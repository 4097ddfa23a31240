"""The ``torchslim`` command, in-process through ``main([...])``: model specs from every zoo,
inputs, the tables and the JSON file, and one-line errors with exit code 2."""
from __future__ import annotations

import json
import sys
import textwrap
import types

import pytest
import torch
from torch import nn

import torchslim
from torchslim.cli import COMMANDS, main, register_command
from torchslim.cli._errors import CliError
from torchslim.cli._model_spec import load_model, make_inputs
from torchslim.models import create_model

torchvision = pytest.importorskip("torchvision")

TINY_BERT = {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64,
             "vocab_size": 500}


def _json(path) -> dict:
    return json.loads(path.read_text())


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("torchslim: error: ") and "Traceback" not in err
    return lines[0]


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "nets.py"
    path.write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class Net(nn.Module):
            def __init__(self, width=8):
                super().__init__()
                self.conv = nn.Conv2d(3, width, 3)
                self.fc = nn.Linear(width, 4)

            def forward(self, img, extra=None):
                y = self.fc(self.conv(img).mean((2, 3)))
                return y if extra is None else y + extra

        class TwoInputs(nn.Module):
            def __init__(self):
                super().__init__()
                self.a, self.b = nn.Linear(6, 3), nn.Linear(2, 3)

            def forward(self, x, y):
                return self.a(x) + self.b(y)

        def factory(width=4):
            return Net(width)

        instance = nn.Sequential(nn.Linear(5, 5))
        not_a_model = 42
    """))
    return path


# ----------------------------------------------------------------------------- happy paths


def test_torchvision_analyze_prints_tables_and_writes_json(tmp_path, capsys):
    out = tmp_path / "sub" / "r.json"
    assert main(["analyze", "torchvision:resnet18", "--input", "1,3,32,32", "--no-latency", "--top", "4",
                 "--depth", "2", "--json", str(out)]) == 0
    data = _json(out)
    expected = torchslim.analyze(torchvision.models.resnet18(), torch.randn(1, 3, 32, 32), latency=False)
    assert data["total_macs"] == expected.total_macs and data["total_params"] == expected.total_params
    assert data["input_shapes"] == [[1, 3, 32, 32]] and data["latency_ms"] is None
    text = capsys.readouterr().out
    assert "by module prefix (depth 2)" in text and "top 4 layers by MACs" in text
    assert "layer4.0" in text and f"{expected.total_macs / 1e6:,.2f}" in text
    top_names = [r.name for r in expected.top(4)]
    assert all(name in text for name in top_names)


def test_latency_flags_reach_the_report(tmp_path):
    out = tmp_path / "r.json"
    assert main(["analyze", "torchslim:digits_cnn", "--input", "2,1,8,8", "--warmup", "0", "--repeats", "2",
                 "--threads", "1", "--json", str(out)]) == 0
    data = _json(out)
    assert data["latency_runs"] == 2 and data["threads"] == 1 and data["latency_ms"] > 0
    assert data["layers"][0]["latency_share"] == 1.0


def test_python_file_class_factory_instance_kwargs_and_inputs(model_file, tmp_path):
    out = tmp_path / "r.json"
    assert main(["analyze", f"{model_file}:Net", "--input", "1,3,10,10", "--model-kwargs", '{"width": 6}',
                 "--no-latency", "--json", str(out)]) == 0
    conv, pool, fc = 6 * 8 * 8 * 27, 6 * 64, 6 * 4
    assert _json(out)["total_macs"] == conv + pool + fc
    assert main(["analyze", f"{model_file}:factory", "--input", "1,3,10,10", "--no-latency", "--json", str(out)]) == 0
    assert _json(out)["total_params"] == 4 * 27 + 4 + 4 * 4 + 4
    assert main(["analyze", f"{model_file}:instance", "--input", "2,5", "--no-latency", "--json", str(out)]) == 0
    assert _json(out)["total_macs"] == 2 * 25
    assert main(["analyze", f"{model_file}:TwoInputs", "--input", "3,6", "--input", "3,2", "--no-latency",
                 "--json", str(out)]) == 0
    assert _json(out)["total_macs"] == 3 * 6 * 3 + 3 * 2 * 3 and _json(out)["input_shapes"] == [[3, 6], [3, 2]]


def test_dtype_flag_casts_model_and_inputs(model_file):
    model = load_model(f"{model_file}:Net")
    args, kwargs = make_inputs(model.double(), [(1, 3, 6, 6)], torch.float64)
    assert args[0].dtype == torch.float64 and kwargs == {}
    assert main(["analyze", f"{model_file}:Net", "--input", "1,3,6,6", "--dtype", "float64", "--no-latency"]) == 0


def test_torch_save_file(tmp_path, capsys):
    path = tmp_path / "model.pt"
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    torch.save(model, path)
    out = tmp_path / "r.json"
    assert main(["analyze", str(path), "--input", "1,3,8,8", "--no-latency", "--json", str(out)]) == 0
    assert _json(out)["total_macs"] == 4 * 36 * 27 + 144 * 2
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    assert main(["analyze", str(tmp_path / "weights.pt"), "--input", "1,3,8,8"]) == 2
    assert "holds a state_dict, not a module" in _one_line_error(capsys)


def test_timm_model(tmp_path):
    timm = pytest.importorskip("timm")
    out = tmp_path / "r.json"
    assert main(["analyze", "timm:resnet10t", "--input", "1,3,32,32", "--no-latency", "--json", str(out)]) == 0
    assert _json(out)["total_params"] == sum(p.numel() for p in timm.create_model("resnet10t").parameters())


def test_hf_model_type_and_local_directory_get_token_ids(tmp_path):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "r.json"
    assert main(["analyze", "hf:bert", "--input", "2,16", "--model-kwargs", json.dumps(TINY_BERT), "--no-latency",
                 "--json", str(out)]) == 0
    from_type = _json(out)
    assert from_type["input_shapes"] == [[2, 16]] and from_type["model"] == "BertModel"
    # attention is counted: the encoder's QK^T and AV (2 x tokens^2 x hidden per sequence) are in the total
    assert from_type["macs_by_op"]["aten._scaled_dot_product_flash_attention_for_cpu"] == 2 * 2 * 16 * 16 * 32

    config = transformers.AutoConfig.for_model("bert", **TINY_BERT)
    model = transformers.AutoModel.from_config(config)
    args, kwargs = make_inputs(model, [(2, 16)], torch.float32)
    assert args == () and kwargs["input_ids"].dtype == torch.int64 and int(kwargs["input_ids"].max()) < 500
    model.save_pretrained(tmp_path / "bert")
    assert main(["analyze", str(tmp_path / "bert"), "--input", "2,16", "--no-latency", "--json", str(out)]) == 0
    assert _json(out)["total_macs"] == from_type["total_macs"]
    assert _json(out)["total_params"] == from_type["total_params"] == sum(p.numel() for p in model.parameters())


def test_embedding_models_get_token_ids():
    model = nn.Sequential(nn.Embedding(50, 8), nn.Linear(8, 2))
    (ids,), _ = make_inputs(model, [(3, 7)], torch.float32)
    assert ids.dtype == torch.int64 and ids.shape == (3, 7) and 0 <= int(ids.min()) and int(ids.max()) < 50


def test_help_lists_commands_and_registry_plugs_in(capsys, monkeypatch):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert all(name in text for name in ("analyze", "prune", "demo"))

    plugin = types.ModuleType("torchslim_test_plugin")

    def add_parser(sub):
        p = sub.add_parser("hello", help="say hello")
        p.add_argument("--times", type=int, default=1)

    def run(args):
        if args.times < 0:
            raise CliError("--times must be >= 0")
        print("hello " * args.times)
        return 0

    plugin.add_parser, plugin.run = add_parser, run
    monkeypatch.setitem(sys.modules, "torchslim_test_plugin", plugin)
    monkeypatch.setattr("torchslim.cli.COMMANDS", dict(COMMANDS))
    register_command("hello", "torchslim_test_plugin")
    assert main(["hello", "--times", "2"]) == 0 and "hello hello" in capsys.readouterr().out
    assert main(["hello", "--times", "-1"]) == 2
    assert _one_line_error(capsys) == "torchslim: error: --times must be >= 0"


# ----------------------------------------------------------------------------- errors


def _rejected_message(model, shape) -> str:
    try:
        with torch.no_grad():
            model(torch.randn(shape))
    except Exception as exc:  # noqa: BLE001
        return str(exc).strip().splitlines()[0]
    raise AssertionError("the model accepted the shape")


@pytest.mark.parametrize("argv,needles", [
    (["analyze", "torchvision:resnet19", "--input", "1,3,8,8"], ["unknown torchvision model 'resnet19'", "resnet18"]),
    (["analyze", "torchslim:modnett", "--input", "1,3,8,8"], ["unknown torchslim model 'modnett'", "modnet"]),
    (["analyze", "hf:bertt", "--input", "1,8"], ["unknown Hugging Face model type 'bertt'", "bert"]),
    (["analyze", "timm:resnet10x", "--input", "1,3,8,8"], ["unknown timm model 'resnet10x'"]),
    (["analyze", "zoo:thing", "--input", "1,3,8,8"], ["unknown model spec 'zoo:thing'"]),
    (["analyze", "torchvision:", "--input", "1,3,8,8"], ["names no model"]),
    (["analyze", "missing_dir/net.py:Net", "--input", "1,3,8,8"], ["model file not found: missing_dir/net.py"]),
    (["analyze", "no_such_model.pt", "--input", "1,3,8,8"], ["model file not found", "no_such_model.pt"]),
    (["analyze", "torchvision:resnet18", "--input", "1,3,32,32", "--kwargs", "{bad"],
     ["--kwargs is not valid JSON", "{bad"]),
    (["analyze", "torchvision:resnet18", "--input", "1,3,32,32", "--model-kwargs", "[1, 2]"],
     ["--model-kwargs must be a JSON object"]),
    (["analyze", "torchvision:resnet18", "--input", "1,3,a"], ["--input must be comma-separated integers", "1,3,a"]),
    (["analyze", "torchvision:resnet18", "--input", "1,0,8,8"], ["--input sizes must be positive"]),
    (["analyze", "torchvision:resnet18"], ["--input is required"]),
    (["analyze", "torchvision:resnet18", "--input", "1,3,8,8", "--dtype", "int3"], ["--dtype", "invalid choice"]),
    (["analyze", "torchvision:resnet18", "--input", "1,3,8,8", "--depth", "0"], ["--depth must be >= 1"]),
    (["analyze", "torchslim:modnet", "--input", "1,3,8,8", "--model-kwargs", '{"nope": 1}'],
     ["building torchslim:modnet", "nope"]),
    (["frobnicate"], ["invalid choice: 'frobnicate'"]),
])
def test_bad_input_is_one_line_and_exit_2(argv, needles, capsys):
    assert main(argv) == 2
    line = _one_line_error(capsys)
    for needle in needles:
        assert needle in line, line


def test_missing_attribute_and_broken_file(model_file, tmp_path, capsys):
    assert main(["analyze", f"{model_file}:Nett", "--input", "1,3,8,8"]) == 2
    line = _one_line_error(capsys)
    assert f"{model_file} has no attribute 'Nett'" in line and "did you mean Net" in line
    assert main(["analyze", f"{model_file}:not_a_model", "--input", "1,3,8,8"]) == 2
    assert "not a class or factory" in _one_line_error(capsys)
    broken = tmp_path / "broken.py"
    broken.write_text("import torch\nclass Net(:\n")
    assert main(["analyze", f"{broken}:Net", "--input", "1,3,8,8"]) == 2
    assert "importing" in _one_line_error(capsys)


def test_rejected_shape_shows_the_models_own_message(capsys):
    own = _rejected_message(torchvision.models.resnet18().eval(), (1, 3, 8))
    assert main(["analyze", "torchvision:resnet18", "--input", "1,3,8"]) == 2
    line = _one_line_error(capsys)
    assert "the model rejected input shape(s) 1x3x8" in line and own in line


def test_rejected_shape_names_keyword_inputs(model_file, capsys):
    assert main(["analyze", f"{model_file}:Net", "--input", "1,3,8,8", "--kwargs", '{"extra": "text"}']) == 2
    line = _one_line_error(capsys)
    assert "1x3x8x8, extra='text'" in line


def test_debug_shows_the_traceback(capsys):
    with pytest.raises(CliError, match="unknown torchvision model"):
        main(["analyze", "torchvision:resnet19", "--input", "1,3,8,8", "--debug"])


# ----------------------------------------------------------------------------- latency on a busy machine


class BusyMachine(types.ModuleType):
    """A fake clock for ``torchslim._timing`` and a forward cost model: each forward of a model
    built on :meth:`spend` advances the clock by its parameter count in nanoseconds, 100x slower
    during a burst of other work that starts with the first timed run and lasts ``burst`` calls."""

    def __init__(self, burst: int):
        super().__init__("torchslim_test_busy_machine")
        self.now, self.burst, self.started = 0.0, burst, None
        self.calls = 0

    def perf_counter(self) -> float:
        if self.started is None:
            self.started = self.calls
        return self.now

    def spend(self, params: int) -> None:
        self.calls += 1
        busy = self.started is not None and self.calls - self.started <= self.burst
        self.now += params * 1e-9 * (100 if busy else 1)


COSTLY_NET = """
import torch
from torch import nn
import torchslim_test_busy_machine as machine

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 64, 3), nn.Conv2d(64, 64, 3), nn.Conv2d(64, 8, 1)

    def forward(self, x):
        machine.spend(sum(p.numel() for p in self.parameters()))
        return self.c(self.b(self.a(x).relu()).relu())
"""


def test_prune_latency_ratio_survives_a_burst_of_other_work(tmp_path, monkeypatch, capsys):
    """Before and after used to be timed minutes apart (before in the first analysis, after in
    the second), so a burst of other work landing on one of them made a 100x "speed-up" out of
    nothing. Timed in turn in rounds, the burst spoils one round of one model, the best round
    of each is kept, the ratio stays the true one and the disagreeing rounds are reported."""
    machine = BusyMachine(burst=30)
    monkeypatch.setitem(sys.modules, machine.__name__, machine)
    monkeypatch.setattr("torchslim._timing.time", machine)
    path = tmp_path / "costly.py"
    path.write_text(COSTLY_NET)
    out = tmp_path / "out"
    assert main(["prune", f"{path}:Net", "--input", "1,3,12,12", "--ratio", "0.5", "--out", str(out)]) == 0
    report = _json(out / "report.json")
    before, after = report["latency_ms"]
    true_ratio = report["params"][1] / report["params"][0]  # the fake cost is the parameter count
    assert after / before == pytest.approx(true_ratio, rel=0.01)
    assert before == pytest.approx(report["params"][0] * 1e-6, rel=0.01)  # ns per param -> ms
    rounds = report["latency"]["original"]["round_medians_ms"]
    assert len(rounds) == 3 and rounds[0] > 50 * rounds[1]
    assert len(report["latency_warnings"]) == 1 and "'original' varied" in report["latency_warnings"][0]
    captured = capsys.readouterr()
    assert "torchslim: warning: latency of 'original' varied" in captured.err
    assert "latency ms (p10-p90)" in captured.out and "the rounds disagree" in captured.out


# ----------------------------------------------------------------------------- prune: flags, data, report


def _prune_args(*extra: str):
    from torchslim.cli import build_parser

    return build_parser().parse_args(["prune", "torchslim:digits_cnn", "--input", "1,1,8,8", "--out", "x", *extra])


@pytest.mark.parametrize("extra,latency_aware,round_to", [
    (["--target-macs", "0.5"], True, "latency"),  # the measured table by default with a MACs target
    (["--target-macs", "0.5", "--no-latency-table"], None, None),  # the API's default: shape-based estimate
    (["--target-macs", "0.5", "--round-to", "8"], True, 8),  # an explicit width rule wins
    (["--ratio", "0.3"], None, None),  # no target: nothing to spend where the time is (the API's default)
])
def test_prune_uses_the_latency_table_with_a_macs_target_unless_told(extra, latency_aware, round_to):
    from torchslim.cli._common import config_from_args

    config = config_from_args(_prune_args(*extra), create_model("digits_cnn"))
    assert (config.latency_aware, config.round_to) == (latency_aware, round_to)


def test_recipe_with_a_macs_target_uses_the_latency_table_unless_it_says_otherwise(tmp_path):
    from torchslim.cli._common import config_from_args

    model = create_model("digits_cnn")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("target_macs: 0.5\n")
    config = config_from_args(_prune_args("--recipe", str(recipe)), model)
    assert config.latency_aware and config.round_to == "latency"
    recipe.write_text("target_macs: 0.5\nround_to: 4\n")
    assert config_from_args(_prune_args("--recipe", str(recipe)), model).round_to == 4
    config = config_from_args(_prune_args("--recipe", str(recipe), "--no-latency-table"), model)
    assert not config.latency_aware and config.round_to == 4


DATA_NET = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.bn, self.act1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()
        self.conv2, self.act2, self.fc = nn.Conv2d(16, 12, 3), nn.ReLU(), nn.Linear(12, 4)

    def forward(self, x):
        return self.fc(self.act2(self.conv2(self.act1(self.bn(self.conv1(x))))).mean((2, 3)))

def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, 10, 10, generator=g), torch.randint(0, 4, (4,), generator=g)) for _ in range(3)]

def cross_entropy(output, batch):
    return nn.functional.cross_entropy(output, batch[1])

wrong_shape = [torch.randn(2, 5)]
nothing = []
"""


@pytest.fixture
def data_net(tmp_path):
    path = tmp_path / "data_net.py"
    path.write_text(DATA_NET)
    return path


@pytest.mark.parametrize("criterion,loss", [("apoz", False), ("mean_activation", False), ("fisher", False),
                                            ("fisher", True), ("taylor", True)])
def test_data_driven_criteria_run_from_the_cli(data_net, tmp_path, criterion, loss, capsys):
    """--data FILE.py:NAME feeds the batches to the criterion (the CLI removes exactly what the
    Python API removes with the same batches), --loss gives taylor/fisher their loss, and
    fisher without one uses the label-free random projection, saying so."""
    from torchslim.cli._model_spec import import_attribute

    out = tmp_path / "out"
    argv = ["prune", f"{data_net}:Net", "--input", "1,3,10,10", "--ratio", "0.5", "--criterion", criterion,
            "--data", f"{data_net}:batches", "--repeats", "2", "--out", str(out)]
    assert main(argv + (["--loss", f"{data_net}:cross_entropy"] if loss else [])) == 0
    report = _json(out / "report.json")
    assert report["exact"] is True and report["params"][1] < report["params"][0]
    note = "random_projection_loss" in capsys.readouterr().err
    assert note == (criterion == "fisher" and not loss)

    _, _, Net = import_attribute(f"{data_net}:Net")
    _, _, batches = import_attribute(f"{data_net}:batches")
    _, _, cross_entropy = import_attribute(f"{data_net}:cross_entropy")
    loss_fn = cross_entropy if loss else (torchslim.criteria.random_projection_loss() if criterion == "fisher" else None)
    expected = torchslim.prune_(Net().eval(), torch.randn(1, 3, 10, 10), torchslim.PruneConfig(ratio=0.5, criterion=criterion),
                                data=batches(), loss_fn=loss_fn)
    saved = torchslim.PruningPlan.from_dict(_json(out / "plan.json"))
    assert saved.steps[0].removed == expected.plan.steps[0].removed


@pytest.mark.parametrize("extra,needles", [
    (["--criterion", "taylor", "--data", "d.py:batches"], ["criterion 'taylor'", "--loss", "--criterion fisher"]),
    (["--criterion", "apoz"], ["criterion 'apoz' measures the model on data", "--data FILE.py:NAME"]),
    (["--criterion", "fisher"], ["criterion 'fisher' measures the model on data"]),
    (["--criterion", "l1", "--data", "d.py:batches"], ["criterion 'l1' uses the weights only"]),
    (["--criterion", "apoz", "--data", "d.py:batches", "--loss", "d.py:f"], ["criterion 'apoz' takes no loss"]),
])
def test_data_driven_criteria_without_what_they_need_are_refused_before_loading(tmp_path, extra, needles, capsys):
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('the model file was imported')\nNet = None\n")
    assert main(["prune", f"{broken}:Net", "--input", "1,3,8,8", "--ratio", "0.5", "--out", str(tmp_path / "o"),
                 *extra]) == 2
    line = _one_line_error(capsys)
    assert "was imported" not in line and all(needle in line for needle in needles), line


@pytest.mark.parametrize("spec,needle", [
    ("wrong_shape", "the model rejected the first batch of --data"),
    ("nothing", "gave no batches"),
    ("missing", "has no attribute 'missing'"),
])
def test_bad_data_is_one_line(data_net, tmp_path, spec, needle, capsys):
    assert main(["prune", f"{data_net}:Net", "--input", "1,3,10,10", "--ratio", "0.5", "--criterion", "apoz",
                 "--data", f"{data_net}:{spec}", "--out", str(tmp_path / "o")]) == 2
    assert needle in _one_line_error(capsys)


def test_prune_help_has_examples_and_every_option_of_every_command_has_help(capsys):
    import argparse

    from torchslim.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    undocumented = [f"{name} {'/'.join(action.option_strings) or action.dest}"
                    for name, sub in [("torchslim", parser), *commands.choices.items()]
                    for action in sub._actions
                    if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction))
                    and not (action.help or "").strip()]
    assert not undocumented, undocumented
    assert set(commands.choices) >= {"analyze", "prune", "bench", "demo"}
    assert main(["prune", "--help"]) == 0
    text = capsys.readouterr().out
    assert "examples:" in text and "torchslim prune torchvision:resnet18" in text and "--data" in text


def test_prune_reports_exactness_checkpoint_and_steps(tmp_path, capsys, caplog, monkeypatch):
    import logging

    monkeypatch.setenv("TORCHSLIM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "pruned"
    with caplog.at_level(logging.INFO, logger="torchslim.cli"):
        assert main(["prune", "torchslim:digits_cnn", "--input", "1,1,8,8", "--target-macs", "0.5", "--repeats", "2",
                     "--out", str(out)]) == 0
    text = capsys.readouterr().out
    report = _json(out / "report.json")
    assert report["exact"] is True and report["checkpoint"] == str(out)
    assert "exact: equals the original with the removed channels zeroed" in text
    assert f"max |difference| {report['max_abs_error']:.3g}" in text
    assert f"checkpoint: {out} (model.safetensors" in text
    steps = [r.getMessage() for r in caplog.records if r.name == "torchslim.cli"]
    assert [s.split(":")[0] for s in steps] == [f"step {i}/5" for i in range(1, 6)]
    assert "per-layer latency table measured now, once for this machine" in steps[1]
    assert "timing the original and the pruned model in turn" in steps[3]
    assert report["result"]["latency_candidates"]  # the table was used: candidate removals were timed
    assert list((tmp_path / "cache").glob("latency-torch-*.json"))  # and cached for the next run


@pytest.mark.parametrize("text,needles", [
    ("ratio: '0.3'\n", ["field 'ratio' must be a number, got the string '0.3'"]),
    ("rules:\n  - op_types: [Conv2d]\n    sparsity_per_layer: half\n",
     ["rules[0].sparsity_per_layer must be a number in [0, 1), got the string 'half'"]),
    ("rules:\n  - op_types: [Conv2d]\n    sparsity: 0.5\n  - op_names: Linear\n    exclude: true\n",
     ["rules[1].op_names must be a list of strings", "got the string 'Linear'"]),
    ("rules:\n  - op_names: [features.0]\n    exclude: 'yes'\n", ["rules[0].exclude must be true or false"]),
    ("rules:\n  - total_sparsity: 0.5\n    max_sparsity_per_layer: 2\n",
     ["rules[0].max_sparsity_per_layer must be a number in (0, 1], got 2"]),
    ("rules: {op_types: [Conv2d]}\n", ["'rules' must be a list of rules"]),
    ("rules:\n  - 0.5\n", ["rules[0] must be a mapping"]),
    ("exact_only: 1\n", ["field 'exact_only' must be true or false, got 1"]),
    ("ratios: {features.0: lots}\n", ["field 'ratios' must be a mapping of module globs to numbers"]),
    ("filter_fn: keep\n", ["field 'filter_fn' must be a Python function (not available in a recipe)"]),
    ("rules:\n  - op_types: [Conv2d\n", ["not valid YAML at line"]),
])
def test_every_recipe_error_is_one_line_naming_rule_and_field(tmp_path, text, needles, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    assert main(["prune", "torchslim:digits_cnn", "--input", "1,1,8,8", "--recipe", str(recipe), "--out",
                 str(tmp_path / "o")]) == 2
    line = _one_line_error(capsys)
    assert f"recipe {recipe}: " in line and all(needle in line for needle in needles), line
    assert not (tmp_path / "o").exists()


def _saved_checkpoint(tmp_path):
    from torchslim.cli._model_spec import source_metadata

    directory = tmp_path / "ckpt"
    source = source_metadata("torchslim:digits_cnn", {}, ["1,1,8,8"], {})
    torchslim.save(create_model("digits_cnn"), directory, metadata={"source": source})
    return directory


@pytest.mark.parametrize("break_it,needle", [
    (lambda d: (d / "meta.json").unlink(), "checkpoint {d} has no meta.json"),
    (lambda d: ((d / "meta.json").unlink(), (d / "meta.json").symlink_to("meta.json")),
     "checkpoint {d}: {d}/meta.json is a symbolic link loop"),
    (lambda d: ((d / "meta.json").unlink(), (d / "meta.json").symlink_to(d / "elsewhere.json")),
     "{d}/meta.json is a symbolic link to {d}/elsewhere.json, which does not exist"),
    (lambda d: (d / "plan.json").unlink(), "checkpoint {d} has no plan.json"),
])
def test_broken_checkpoint_directory_names_the_file_and_cause(tmp_path, break_it, needle, capsys):
    """A checkpoint whose meta.json is gone used to say '--input is required'."""
    directory = _saved_checkpoint(tmp_path)
    assert main(["analyze", str(directory), "--no-latency"]) == 0  # intact: the recorded inputs are used
    capsys.readouterr()
    break_it(directory)
    for argv in (["analyze", str(directory)], ["analyze", str(directory), "--input", "1,1,8,8", "--no-latency"]):
        assert main(argv) == 2
        assert needle.format(d=directory) in _one_line_error(capsys)


def test_model_spec_that_is_a_symlink_loop(tmp_path, capsys):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    for extra in ([], ["--input", "1,3,8,8"]):
        assert main(["analyze", str(tmp_path / "loop"), *extra]) == 2
        assert f"{tmp_path / 'loop'} is a symbolic link loop" in _one_line_error(capsys)
