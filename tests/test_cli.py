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
