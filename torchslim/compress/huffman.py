"""Canonical Huffman coding and relative-index encoding of sparse positions (Deep Compression,
Han, Mao & Dally, ICLR 2016, sections 2 and 4).

The bit-level work is done by the ``bitarray`` library (``bitarray.util.canonical_huffman``
builds the code from symbol frequencies, ``bitarray.encode`` writes it, and
``bitarray.util.canonical_decode`` reads it back), so nothing here twiddles bits by hand. A
canonical code is fully described by the number of codes of each length and the symbols in
canonical order, which is what the file header stores (no code table).

Relative index (the paper's Figure 2). The positions of the kept weights of a flattened layer
are stored as differences ``d`` to the previous kept position (the first to position -1), so
``d >= 1``, each in a fixed ``width`` of bits: a difference up to ``2**width`` is stored as the
symbol ``d - 1``; a larger one is split by *filler zeros*, extra entries ``2**width`` apart
whose value is zero, until the remainder fits.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:
    from bitarray import bitarray


def _bitarray() -> Any:
    """The ``bitarray`` module (the ``compress`` extra), imported when Huffman coding is used, so
    that weight sharing and network surgery work without it."""
    try:
        import bitarray
        import bitarray.util
    except ImportError:
        raise ImportError("Huffman coding (save_compressed / load_compressed) needs the bitarray package: "
                          "pip install 'torchslim[compress]'") from None
    return bitarray


@dataclasses.dataclass
class HuffmanStream:
    """A canonically Huffman-coded sequence of non-negative integer symbols."""

    bits: "bitarray"  # the coded symbols, exactly ``nbits`` long (no padding)
    count: list[int]  # count[i]: how many codes have length i
    symbols: list[int]  # the symbols in canonical order
    length: int  # how many symbols were coded

    @property
    def nbits(self) -> int:
        return len(self.bits)

    def to_bytes(self) -> bytes:
        """The bits, padded with zeros to whole bytes."""
        return self.bits.tobytes()


def huffman_encode(values: Sequence[int] | np.ndarray) -> HuffmanStream:
    """Encode integer ``values`` with the canonical Huffman code of their frequencies."""
    module = _bitarray()
    array = np.asarray(values, dtype=np.int64).ravel()
    if array.size == 0:
        return HuffmanStream(module.bitarray(endian="big"), [], [], 0)
    if int(array.min()) < 0:
        raise ValueError("Huffman symbols must be non-negative integers")
    symbols, counts = np.unique(array, return_counts=True)
    code, count, canonical = module.util.canonical_huffman({int(s): int(c) for s, c in zip(symbols, counts)})
    bits = module.bitarray(endian="big")
    bits.encode(code, array.tolist())
    return HuffmanStream(bits, [int(c) for c in count], [int(s) for s in canonical], int(array.size))


def code_lengths(stream: HuffmanStream) -> dict[int, int]:
    """Length in bits of each symbol's code (from the canonical description)."""
    lengths: dict[int, int] = {}
    position = 0
    for length, how_many in enumerate(stream.count):
        for symbol in stream.symbols[position:position + how_many]:
            lengths[symbol] = length
        position += how_many
    return lengths


def huffman_decode(data: bytes, nbits: int, count: list[int], symbols: list[int], length: int) -> np.ndarray:
    """Decode ``length`` symbols from the first ``nbits`` bits of ``data``; a ``ValueError`` when the
    stream does not hold exactly that (corrupt or inconsistent input)."""
    if length == 0:
        if nbits:
            raise ValueError("Huffman stream: bits given for zero symbols")
        return np.zeros(0, dtype=np.int64)
    if nbits > 8 * len(data):
        raise ValueError(f"Huffman stream: {nbits} bits announced, {8 * len(data)} present")
    if sum(count) != len(symbols) or not symbols:
        raise ValueError("Huffman stream: code description inconsistent (counts do not match symbols)")
    module = _bitarray()
    bits = module.bitarray(endian="big")
    bits.frombytes(data)
    del bits[nbits:]
    try:
        decoded = np.fromiter(module.util.canonical_decode(bits, count, symbols), dtype=np.int64)
    except ValueError as exc:
        raise ValueError(f"Huffman stream cannot be decoded: {exc}") from None
    if decoded.size != length:
        raise ValueError(f"Huffman stream holds {decoded.size} symbols, {length} expected")
    return decoded


@dataclasses.dataclass
class RelativeIndex:
    """Sparse positions as relative-index entries: ``gaps[i] = d_i - 1`` (``0 <= gaps < 2**width``)
    and ``filler[i]`` True where entry ``i`` is a filler zero rather than a kept weight."""

    gaps: np.ndarray
    filler: np.ndarray
    width: int


def relative_index(positions: np.ndarray, width: int) -> RelativeIndex:
    """Encode the sorted, distinct flat ``positions`` of the kept weights with ``width``-bit gaps."""
    if not 1 <= width <= 32:
        raise ValueError(f"relative index width must be in [1, 32] bits, got {width}")
    positions = np.asarray(positions, dtype=np.int64)
    if positions.size and (positions[0] < 0 or np.any(np.diff(positions) <= 0)):
        raise ValueError("positions must be sorted, distinct and non-negative")
    span = 1 << width
    diffs = np.diff(positions, prepend=-1)
    fillers = (diffs - 1) // span  # fillers needed before each kept entry
    total = int(positions.size + fillers.sum())
    gaps = np.full(total, span - 1, dtype=np.int64)
    filler = np.ones(total, dtype=bool)
    kept_at = np.arange(positions.size) + np.cumsum(fillers)  # where each kept entry lands
    gaps[kept_at] = diffs - fillers * span - 1
    filler[kept_at] = False
    return RelativeIndex(gaps, filler, width)


def absolute_positions(gaps: np.ndarray, width: int) -> np.ndarray:
    """The flat positions of all entries (kept and filler) from their gap symbols."""
    gaps = np.asarray(gaps, dtype=np.int64)
    if gaps.size and (int(gaps.min()) < 0 or int(gaps.max()) >= 1 << width):
        raise ValueError(f"relative index gaps must lie in [0, {(1 << width) - 1}] for width {width}")
    return np.cumsum(gaps + 1) - 1
