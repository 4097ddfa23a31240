"""``torchslim compress``: prune, share, Huffman-code, write DIR/model.tsc that load_compressed reads
back bit-exactly; the report matches the file; bad flags are one-line errors, nothing written."""
from __future__ import annotations

import json
import textwrap

import pytest

from torchslim.cli import COMMANDS, main
from torchslim.compress import load_compressed, sharing_of


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def files(tmp_path):
    path = tmp_path / "nets.py"
    path.write_text(textwrap.dedent("""
        import torch
        from torch import nn

        from pathlib import Path

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                torch.manual_seed(0)
                self.conv = nn.Conv2d(1, 16, 3)
                self.fc1 = nn.Linear(16 * 6 * 6, 64)
                self.fc2 = nn.Linear(64, 10)

            def forward(self, x):
                return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1))))

        def tune(model, stage):
            with open(Path(__file__).parent / "calls.txt", "a") as log:
                log.write(f"{stage}\\n")
            opt = torch.optim.SGD(model.parameters(), lr=0.01)
            for _ in range(2):
                model(torch.randn(4, 1, 8, 8)).square().mean().backward()
                opt.step()
                opt.zero_grad()

        def broken(model, stage):
            raise RuntimeError("no data here")
    """))
    return path


def test_compress_command_writes_a_file_that_loads_bit_exactly(tmp_path, files, capsys):
    assert COMMANDS["compress"] == "torchslim.cli.compress"
    out = tmp_path / "out"
    code = main(["compress", f"{files}:Net", "--input", "1,1,8,8", "--prune", "0.8", "--bits", "conv=3,linear=4",
                 "--finetune", f"{files}:tune", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "compression:" in printed and "reload: bit-exact" in printed and "fc1.weight" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["reload_exact"] is True
    assert report["file_bytes"] == (out / "model.tsc").stat().st_size
    assert report["ratio"] > 3
    assert (tmp_path / "calls.txt").read_text().split() == ["pruned", "shared"]
    from torchslim.cli._model_spec import load_model

    fresh = load_compressed(out, load_model(f"{files}:Net"), shared=True)
    layers = {layer["name"]: layer for layer in report["layers"]}
    for name, (codebook, index) in sharing_of(fresh).items():
        assert codebook.numel() == 2 ** layers[name]["bits"]
        assert int((index < codebook.numel()).sum()) == layers[name]["kept"]
        weight = fresh.get_submodule(name.rpartition(".")[0]).weight
        assert int((weight == 0).sum()) >= int(0.8 * weight.numel())  # pruned weights stayed zero through fine-tuning


@pytest.mark.parametrize("flags, message", [
    (["--bits", "linear=17"], r"bits for 'linear' must be an integer in \[1, 16\]"),
    (["--bits", "conv8"], "expected N or KEY=N"),
    (["--prune", "1.5"], r"--prune must be in \[0, 1\)"),
    (["--prune", "0.99", "--bits", "conv=6"], "fewer than the 64 clusters"),
    (["--bits", "conv=4,linear=4", "--finetune", "FILE:broken"], "failed at stage 'shared'"),
])
def test_bad_flags_are_one_line_errors_and_nothing_is_written(tmp_path, files, capsys, flags, message):
    flags = [f.replace("FILE", str(files)) for f in flags]
    out = tmp_path / "out"
    code = main(["compress", f"{files}:Net", "--input", "1,1,8,8", *flags, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("torchslim: error: ")
    import re

    assert re.search(message, lines[0]), lines[0]
    assert not out.exists()
