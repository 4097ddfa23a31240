"""Huffman coding, relative index with filler zeros, and the compressed file: bit-exact reload,
sizes that match the real file, corrupt and truncated files refused before the model is touched."""
from __future__ import annotations

import heapq
import os

import numpy as np
import pytest
import torch
from torch import nn

from torchslim.compress import (CompressedFileError, absolute_positions, compression_report, huffman_decode,
                                huffman_encode, load_compressed, relative_index, save_compressed, share_weights_,
                                sharing_of)
from torchslim.compress.huffman import code_lengths
from torchslim.sparsity import sparsify_


pytestmark = pytest.mark.usefixtures("one_thread")


def optimal_huffman_bits(values: np.ndarray) -> int:
    """Total length of an optimal prefix code (classic heap merge; every Huffman code reaches it)."""
    counts = sorted(np.unique(values, return_counts=True)[1].tolist())
    if len(counts) == 1:
        return counts[0]  # one symbol: one bit each
    heap = list(counts)
    heapq.heapify(heap)
    total = 0
    while len(heap) > 1:
        merged = heapq.heappop(heap) + heapq.heappop(heap)
        total += merged
        heapq.heappush(heap, merged)
    return total


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_huffman_stream_decodes_and_length_is_sum_of_code_lengths(seed):
    rng = np.random.default_rng(seed)
    values = rng.choice(32, size=3000, p=np.arange(1, 33) ** 2 / np.sum(np.arange(1, 33) ** 2))
    stream = huffman_encode(values)
    lengths = code_lengths(stream)
    assert stream.nbits == sum(lengths[int(v)] for v in values)
    assert stream.nbits == optimal_huffman_bits(values)
    decoded = huffman_decode(stream.to_bytes(), stream.nbits, stream.count, stream.symbols, stream.length)
    np.testing.assert_array_equal(decoded, values)
    # canonical: codes of equal length are consecutive in symbol order, shorter codes first
    assert all(lengths[a] <= lengths[b] for a, b in zip(stream.symbols, stream.symbols[1:]))


def test_huffman_single_symbol_and_bad_streams():
    stream = huffman_encode([7] * 5)
    assert stream.nbits == 5
    np.testing.assert_array_equal(huffman_decode(stream.to_bytes(), 5, stream.count, stream.symbols, 5), [7] * 5)
    stream = huffman_encode([1, 2, 3, 3, 3])
    with pytest.raises(ValueError, match="symbols, 6 expected"):
        huffman_decode(stream.to_bytes(), stream.nbits, stream.count, stream.symbols, 6)
    with pytest.raises(ValueError, match="bits announced"):
        huffman_decode(b"", stream.nbits, stream.count, stream.symbols, 5)


def relative_index_by_hand(positions: list[int], width: int) -> tuple[list[int], list[bool]]:
    """The paper's procedure, one entry at a time: a filler zero whenever the gap exceeds 2**width."""
    span, gaps, fillers, previous = 2 ** width, [], [], -1
    for position in positions:
        while position - previous > span:
            previous += span
            gaps.append(span - 1)
            fillers.append(True)
        gaps.append(position - previous - 1)
        fillers.append(False)
        previous = position
    return gaps, fillers


def test_relative_index_paper_example_fillers_exactly_where_gaps_exceed_width():
    coded = relative_index(np.array([1, 4, 15, 40]), 3)
    # differences 2, 3, 11 (> 8: a filler 8 on, then 3), 25 (> 8: fillers at +8, +16, +24, then 1)
    assert (coded.gaps + 1).tolist() == [2, 3, 8, 3, 8, 8, 8, 1]
    assert coded.filler.tolist() == [False, False, True, False, True, True, True, False]
    assert absolute_positions(coded.gaps, 3).tolist() == [1, 4, 12, 15, 23, 31, 39, 40]


@pytest.mark.parametrize("width", [1, 3, 5, 8])
def test_relative_index_matches_the_procedure_on_random_positions(width):
    rng = np.random.default_rng(width)
    positions = np.sort(rng.choice(5000, size=200, replace=False))
    coded = relative_index(positions, width)
    gaps, fillers = relative_index_by_hand(positions.tolist(), width)
    assert coded.gaps.tolist() == gaps and coded.filler.tolist() == fillers
    assert int(coded.filler.sum()) == int(np.sum((np.diff(positions, prepend=-1) - 1) // 2 ** width))
    assert absolute_positions(coded.gaps, width)[~coded.filler].tolist() == positions.tolist()


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 64),
                         nn.ReLU(), nn.Linear(64, 10))


def compressed_net(sparsity: float = 0.8) -> nn.Module:
    model = net()
    model[1].running_mean.uniform_()
    sparsify_(model, sparsity)
    share_weights_(model, {"conv": 2 if sparsity > 0.9 else 3, "linear": 4})
    return model


def plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors under plain keys (shared weights as codebook[index])."""
    state = {k: v for k, v in model.state_dict().items() if ".parametrizations." not in k}
    for name in sharing_of(model):
        state[name] = model.get_submodule(name.rpartition(".")[0]).weight.detach()
    return state


@pytest.mark.parametrize("sparsity", [0.0, 0.8, 0.97])
def test_shared_model_file_load_is_bit_exact(tmp_path, sparsity):
    model = compressed_net(sparsity)
    save_compressed(model, tmp_path)
    fresh = net()
    load_compressed(tmp_path, fresh)
    expected = plain_state(model)
    assert set(fresh.state_dict()) == set(expected)
    for key, value in fresh.state_dict().items():
        assert value.dtype == expected[key].dtype and torch.equal(value, expected[key]), key
    x = torch.randn(4, 2, 8, 8)
    model.eval(), fresh.eval()
    assert torch.equal(fresh(x), model(x))
    again = load_compressed(tmp_path / "model.tsc", net(), shared=True)
    for name, (codebook, index) in sharing_of(model).items():
        got_codebook, got_index = sharing_of(again)[name]
        assert torch.equal(got_codebook, codebook) and torch.equal(got_index, index)


def test_size_table_matches_the_real_file(tmp_path):
    model = compressed_net()
    report = save_compressed(model, tmp_path / "m.tsc", index_bits={"conv": 8, "linear": 5})
    size = os.path.getsize(tmp_path / "m.tsc")
    assert report.file_bytes == size == report.header_bytes + report.payload_bytes
    assert report.stage_bits("huffman") == 8 * report.payload_bytes
    assert compression_report(model).file_bytes == size
    dense = sum(v.numel() * v.element_size() for v in plain_state(model).values())
    assert report.stage_bits("dense") == 8 * dense
    by_name = {layer.name: layer for layer in report.layers}
    linear = by_name["4.weight"]
    kept = int((model[4].weight != 0).sum())
    assert linear.kept == kept and linear.numel == 8 * 6 * 6 * 64 and linear.width == 5
    positions = np.flatnonzero(model[4].weight.detach().flatten().numpy() != 0)
    fillers = int(np.sum((np.diff(positions, prepend=-1) - 1) // 32))
    assert linear.entries == kept + fillers
    assert linear.pruned_bits == (kept + fillers) * (32 + 5)
    assert report.stage_bits("dense") > report.stage_bits("pruned") > report.stage_bits("shared")
    assert report.stage_bits("shared") > report.stage_bits("huffman")
    assert report.ratio == pytest.approx(8 * dense / (8 * size))


def test_version_1_files_still_load_bit_exactly_and_v2_header_is_smaller(tmp_path):
    model = compressed_net()
    old = save_compressed(model, tmp_path / "v1.tsc", version=1)
    assert (tmp_path / "v1.tsc").read_bytes()[:12].startswith(b"TSLIMDC\0")
    new = save_compressed(model, tmp_path / "v2.tsc")
    assert (tmp_path / "v2.tsc").read_bytes()[:8] == b"TSLIMDC\x02"
    assert new.header_bytes < old.header_bytes / 3
    assert old.file_bytes == os.path.getsize(tmp_path / "v1.tsc") == old.header_bytes + old.payload_bytes
    expected = plain_state(model)
    for name in ("v1.tsc", "v2.tsc"):
        fresh = load_compressed(tmp_path / name, net())
        for key, value in fresh.state_dict().items():
            assert value.dtype == expected[key].dtype and torch.equal(value, expected[key]), (name, key)
    # a newer version is refused with a message naming the versions this torchslim reads
    data = bytearray((tmp_path / "v2.tsc").read_bytes())
    data[7] = 3
    (tmp_path / "v3.tsc").write_bytes(bytes(data))
    with pytest.raises(CompressedFileError, match="format version 3; this torchslim reads versions 1, 2"):
        load_compressed(tmp_path / "v3.tsc", net())
    with pytest.raises(ValueError, match="version must be one of"):
        save_compressed(model, tmp_path / "bad.tsc", version=7)


def test_packing_is_lossless_and_narrows_only_exactly_representable_tensors(tmp_path):
    model = compressed_net()
    with torch.no_grad():
        model[4].bias.copy_(model[4].bias.half().float())  # representable in float16: stored in 2 bytes each
        model[6].bias.copy_(torch.tensor([1e-30, 3.0, 7.0, 1.0 / 3.0, 0.0, -0.0, 2.0 ** -20, 1.0, 5.0, 6.0]))
    for pack in (True, False):
        report = save_compressed(model, tmp_path / f"{pack}.tsc", pack=pack)
        fresh = load_compressed(tmp_path / f"{pack}.tsc", net())
        expected = plain_state(model)
        for key, value in fresh.state_dict().items():  # bitwise, signed zeros included
            assert value.dtype == expected[key].dtype, key
            assert torch.equal(value.view(torch.uint8) if value.is_floating_point() else value,
                               expected[key].view(torch.uint8) if value.is_floating_point() else expected[key]), key
        raw = sum(v.numel() * v.element_size() for k, v in expected.items() if k not in sharing_of(model))
        assert report.other_raw_bytes == raw and report.stage_bits("dense") == 8 * sum(
            v.numel() * v.element_size() for v in expected.values())
        if pack:
            assert report.other_bytes <= raw - 2 * 64  # the float16-exact bias halves at least
        else:
            assert report.other_bytes == raw
        assert report.file_bytes == os.path.getsize(tmp_path / f"{pack}.tsc")


def _flip(path, position):
    data = bytearray(path.read_bytes())
    data[position] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("damage", ["payload", "header", "truncate", "magic", "empty"])
def test_corrupt_or_truncated_file_refused_before_the_model_is_touched(tmp_path, damage, version):
    path = tmp_path / "m.tsc"
    report = save_compressed(compressed_net(), path, version=version)
    if damage == "payload":
        _flip(path, report.header_bytes + report.payload_bytes // 2)
    elif damage == "header":
        _flip(path, report.header_bytes // 2)
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:-7])
    elif damage == "magic":
        _flip(path, 0)
    else:
        path.write_bytes(b"")
    fresh = net()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    message = {"payload": "corrupt", "header": "corrupt|not a|version|truncated", "truncate": "truncated",
               "magic": "bad magic", "empty": "bad magic"}[damage]
    with pytest.raises(CompressedFileError, match=message):
        load_compressed(path, fresh)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())


def test_file_that_does_not_fit_the_model_refused_naming_the_key(tmp_path):
    save_compressed(compressed_net(), tmp_path)
    other = nn.Sequential(nn.Conv2d(2, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 32),
                          nn.ReLU(), nn.Linear(32, 10))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CompressedFileError, match=r"'4\.(weight|bias)' is \[64"):
        load_compressed(tmp_path, other)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    with pytest.raises(CompressedFileError, match="cannot read"):
        load_compressed(tmp_path / "missing.tsc", other)


def test_save_refuses_a_model_without_codebooks_and_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match="no shared weights"):
        save_compressed(net(), tmp_path / "m.tsc")
    with pytest.raises(ValueError, match=r"index_bits for 'linear' must be an integer in \[1, 32\]"):
        save_compressed(compressed_net(), tmp_path / "m.tsc", index_bits={"linear": 0})
    assert list(tmp_path.iterdir()) == []


def test_load_refuses_a_parametrized_model_and_restores_sharing_on_request(tmp_path):
    model = compressed_net()
    save_compressed(model, tmp_path)
    shared = compressed_net()
    with pytest.raises(CompressedFileError, match="plain weights"):
        load_compressed(tmp_path, shared)
    restored = load_compressed(tmp_path, net(), shared=True)
    assert set(sharing_of(restored)) == set(sharing_of(model))


def test_without_bitarray_sharing_works_and_huffman_names_the_extra(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "bitarray", None)  # import bitarray now fails
    model = compressed_net()  # weight sharing needs no bitarray
    with pytest.raises(ImportError, match=r"torchslim\[compress\]"):
        save_compressed(model, tmp_path / "m.tsc")
    assert list(tmp_path.iterdir()) == []
