"""Bits per layer and per stage of deep compression, as in Han et al. 2016 (Tables 2-5).

Stages, per shared layer (``numel`` weights of ``b`` bits, ``kept`` of them non-zero,
``entries = kept + fillers`` relative-index entries of ``width`` bits, ``2**bits`` centroids):

* dense: ``numel * b``;
* pruned: ``entries * (b + width)`` (values plus the relative index; a layer without zeros
  stores no index: ``numel * b``);
* shared: ``entries * index_bits + entries * width + codebook`` with fixed-width indices (one
  more code when there are filler zeros);
* huffman: the coded streams as written to the file (whole bytes per stream) with their code
  tables, plus the codebook.

The other tensors (biases, BatchNorm, unshared weights) count their raw size at the dense,
pruned and shared stages and what the file holds for them (raw, or packed losslessly) at the
Huffman stage; the header is counted apart, so ``payload + header = file size``.
"""
from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class LayerBits:
    """Size of one shared weight at each stage, in bits (``stored_bytes``: what the file holds)."""

    name: str
    numel: int
    kept: int
    entries: int
    bits: int
    width: int | None
    dense_bits: int
    pruned_bits: int
    shared_bits: int
    huffman_bits: int
    stored_bytes: int

    @property
    def ratio(self) -> float:
        """Dense size over stored size."""
        return self.dense_bits / max(8 * self.stored_bytes, 1)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "ratio": self.ratio}


@dataclasses.dataclass
class CompressionReport:
    """Per-layer and total sizes of a compressed model; ``file_bytes`` is the real file size."""

    layers: list[LayerBits]
    other_bytes: int  # other tensors (biases, BatchNorm, unshared weights) as stored in the file
    header_bytes: int  # magic, length, checksum and header
    file_bytes: int
    other_dense_bytes: int | None = None  # their raw size (None: as stored)

    @property
    def other_raw_bytes(self) -> int:
        """Raw size of the other tensors (what the dense, pruned and shared stages count)."""
        return self.other_bytes if self.other_dense_bytes is None else self.other_dense_bytes

    def stage_bits(self, stage: str) -> int:
        """Total bits of ``stage`` (dense, pruned, shared, huffman), other tensors included, header not."""
        if stage == "huffman":
            return 8 * (sum(layer.stored_bytes for layer in self.layers) + self.other_bytes)
        return sum(getattr(layer, f"{stage}_bits") for layer in self.layers) + 8 * self.other_raw_bytes

    @property
    def payload_bytes(self) -> int:
        """Bytes of the file after the header: ``file_bytes - header_bytes``."""
        return sum(layer.stored_bytes for layer in self.layers) + self.other_bytes

    @property
    def ratio(self) -> float:
        """Compression of the whole model: dense bits over the file's bits (header included)."""
        return self.stage_bits("dense") / max(8 * self.file_bytes, 1)

    def to_dict(self) -> dict[str, Any]:
        stages = ("dense", "pruned", "shared", "huffman")
        return {"layers": [layer.to_dict() for layer in self.layers], "other_bytes": self.other_bytes,
                "other_raw_bytes": self.other_raw_bytes,
                "header_bytes": self.header_bytes, "file_bytes": self.file_bytes, "ratio": self.ratio,
                "stage_bits": {stage: self.stage_bits(stage) for stage in stages}}

    def table(self):
        """A ``rich`` table: one row per shared layer, then other tensors, header and total."""
        from rich.table import Table

        table = Table(title="deep compression: size per layer and stage")
        for column in ("layer", "weights", "kept", "bits", "index bits", "dense", "pruned", "shared",
                       "huffman", "ratio"):
            table.add_column(column, justify="left" if column == "layer" else "right")
        for layer in self.layers:
            table.add_row(layer.name, f"{layer.numel:,}", f"{layer.kept / max(layer.numel, 1):.1%}", str(layer.bits),
                          "-" if layer.width is None else str(layer.width), _size(layer.dense_bits),
                          _size(layer.pruned_bits), _size(layer.shared_bits), _size(8 * layer.stored_bytes),
                          f"{layer.ratio:.1f}x")
        raw, stored = _size(8 * self.other_raw_bytes), _size(8 * self.other_bytes)
        table.add_row("other tensors", "", "", "", "", raw, raw, raw, stored,
                      f"{self.other_raw_bytes / max(self.other_bytes, 1):.1f}x")
        table.add_row("header", "", "", "", "", "", "", "", _size(8 * self.header_bytes), "")
        table.add_row("total", "", "", "", "", _size(self.stage_bits("dense")), _size(self.stage_bits("pruned")),
                      _size(self.stage_bits("shared")), _size(8 * self.file_bytes), f"{self.ratio:.1f}x",
                      style="bold")
        return table

    def print(self, console=None) -> None:
        """Print :meth:`table` (on ``console`` or a new ``rich`` console)."""
        from rich.console import Console

        (console or Console()).print(self.table())


def _size(bits: int) -> str:
    """Bits as a readable byte count."""
    nbytes = bits / 8
    for unit in ("B", "KB", "MB"):
        if nbytes < 1024 or unit == "MB":
            return f"{nbytes:,.0f} {unit}" if unit == "B" else f"{nbytes:,.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:,.1f} GB"
