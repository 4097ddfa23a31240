"""The deep-compression file: shared weights as Huffman-coded indices, no pickle.

Layout (one file, ``model.tsc``), format version 2::

    b"TSLIMDC" + b"\\x02"         8 bytes, magic and format version
    header length                 4 bytes, little-endian unsigned
    SHA-256                       32 bytes, of the header and payload bytes that follow
    header                        compact JSON (UTF-8), raw-deflated (stdlib ``zlib``)
    payload                       the tensors' bytes, one after the other in header order

A shared weight (see :func:`~torchslim.compress.share_weights_`) is stored as its codebook,
the Huffman-coded relative positions of its kept weights (omitted when it has no zeros) and the
Huffman-coded cluster indices of the kept weights and filler zeros
(:mod:`torchslim.compress.huffman`, codes built by ``bitarray``); each coded stream's canonical
code table (codes per length, symbols in canonical order, as small unsigned integers) is in the
payload next to it, so the header only holds the layout. Every other tensor of the
``state_dict`` (biases, BatchNorm statistics, unshared weights) and each codebook is stored
losslessly: as raw bytes, or (``pack=True``, the default) in the narrowest float type that holds
every value exactly (float16 or bfloat16 when the values are representable there, e.g. because
the model was rounded to them) and raw-deflated when that is smaller; the loaded tensor is
bit-identical either way. Raw bytes are little-endian; the SHA-256 covers header and payload, so
a corrupt or truncated file is refused before the model is touched.

Version 1 (magic ``b"TSLIMDC\\0"``, plain JSON header with offsets and the payload's SHA-256, raw
tensors only) is still read, and written with ``save_compressed(..., version=1)``.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
import tempfile
import zlib
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from torchslim.compress.huffman import HuffmanStream, absolute_positions, huffman_decode, huffman_encode, relative_index
from torchslim.compress.report import CompressionReport, LayerBits
from torchslim.compress.sharing import TYPE_KEYS, restore_sharing_, sharing_of
from torchslim.sparsity import live_parametrizations

MAGIC = b"TSLIMDC\0"  # version 1
MAGIC_PREFIX = b"TSLIMDC"  # then one byte: the format version (0 for version 1)
FORMAT = "torchslim.compressed"
VERSION = 2
VERSIONS = (1, 2)
FILE_NAME = "model.tsc"
#: relative-index widths of the paper: 8 bits for conv layers, 5 for fully connected ones
DEFAULT_INDEX_BITS = {"conv": 8, "linear": 5}
_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64,
                                                      torch.int8, torch.uint8, torch.int16, torch.int32,
                                                      torch.int64, torch.bool)}
#: narrower float types a tensor may be stored in when every value survives the round trip
_NARROWER = {torch.float64: (torch.float16, torch.bfloat16, torch.float32), torch.float32: (torch.float16,
                                                                                            torch.bfloat16)}
_BITS_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_MAX_HEADER = 1 << 26  # inflated header bytes accepted (64 MiB)
_V2_FIXED = len(MAGIC_PREFIX) + 1 + 4 + 32


_UINTS = {"uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32}


class CompressedFileError(ValueError):
    """A compressed file that cannot be read (corrupt, truncated, another format or version) or
    that does not fit the model it is loaded into."""


def save_compressed(model: nn.Module, path: str | Path, index_bits: int | Mapping[str, int] | None = None, *,
                    pack: bool = True, version: int = VERSION) -> CompressionReport:
    """Write ``model`` (with shared weights) to ``path``; returns the per-layer size report.

    ``path``: a file, or a directory (then ``DIR/model.tsc``). ``index_bits`` is the width of the
    relative index of sparse positions: an int, or ``{"conv": 8, "linear": 5}`` (the paper's,
    the default) with module names as further keys. ``pack`` stores codebooks and the other
    tensors in the narrowest float type that holds them exactly, deflated when smaller
    (lossless; ``False``: raw bytes). ``version=1`` writes the previous format (plain JSON
    header, raw tensors) for older readers. A model without shared weights, or with other live
    parametrisations (masks: call ``remove_masks_`` first), raises a ``ValueError`` and nothing
    is written; the file appears complete or not at all.
    """
    header, payload, report = _encode(model, index_bits, pack, version)
    blob = _frame(header, payload, version)
    target = _file(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(blob)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    report.file_bytes = target.stat().st_size
    return report


def compression_report(model: nn.Module, index_bits: int | Mapping[str, int] | None = None, *, pack: bool = True,
                       version: int = VERSION) -> CompressionReport:
    """The report :func:`save_compressed` would return, without writing a file."""
    header, payload, report = _encode(model, index_bits, pack, version)
    report.file_bytes = len(_frame(header, payload, version))
    return report


def load_compressed(path: str | Path, model: nn.Module, *, shared: bool = False) -> nn.Module:
    """Load a :func:`save_compressed` file into ``model`` (same architecture, plain weights); returns it.

    The weights come back bit-exactly as ``codebook[index]`` (zeros where pruned). ``shared=True``
    also restores the codebooks and indices as weight sharing, to fine-tune further. The whole
    file is read, checked (magic, version, SHA-256, every stream decoded) and matched against the
    model's ``state_dict`` keys, shapes and dtypes before the model is changed; any problem
    raises :class:`CompressedFileError` naming the file and key. Versions 1 and 2 are read.
    """
    target = _file(path)
    try:
        blob = target.read_bytes()
    except OSError as exc:
        raise CompressedFileError(f"cannot read {target}: {exc}") from None
    header, payload = _unframe(blob, target)
    state, sharing = _decode(header, payload, target)
    problem = live_parametrizations(model)
    if problem:
        raise CompressedFileError(f"load_compressed needs a model with plain weights; {', '.join(problem[:5])} "
                                  "are parametrized (masked or shared): load into a fresh model")
    _check_fits(model, state, target)
    model.load_state_dict(state, strict=True)
    if shared:
        restore_sharing_(model, sharing)
    return model


# ----------------------------------------------------------------------------------------
# encoding
# ----------------------------------------------------------------------------------------
def _encode(model: nn.Module, index_bits: int | Mapping[str, int] | None, pack: bool = True,
            version: int = VERSION) -> tuple[dict[str, Any], bytes, CompressionReport]:
    if version not in VERSIONS:
        raise ValueError(f"save_compressed: version must be one of {VERSIONS}, got {version!r}")
    sharing = sharing_of(model)  # raises for a model without codebooks
    others = [name for name in live_parametrizations(model) if name not in sharing]
    if others:
        raise ValueError(f"save_compressed: {', '.join(others[:5])} have other parametrizations (masks?): call "
                         "torchslim.sparsity.remove_masks_(model) before sharing and saving")
    widths = _widths(model, list(sharing), index_bits)
    pack = pack and version >= 2  # version 1 stores raw tensors only
    chunks: list[bytes] = []
    offset = 0

    def put(data: bytes, **extra: Any) -> dict[str, Any]:
        nonlocal offset
        chunks.append(data)
        where = {"offset": offset, "nbytes": len(data), **extra}
        offset += len(data)
        return where

    def put_tensor(tensor: torch.Tensor) -> dict[str, Any]:
        data, extra = _packed(tensor) if pack else (_raw_bytes(tensor), {})
        return put(data, **extra)

    entries: list[dict[str, Any]] = []
    layers: list[LayerBits] = []
    other_bytes = other_raw = 0
    emitted: set[str] = set()
    for key, tensor in model.state_dict().items():
        shared_key = _shared_key(key, sharing)
        if shared_key is not None:
            if shared_key not in emitted:
                emitted.add(shared_key)
                codebook, index = sharing[shared_key]
                entry, layer = _encode_shared(shared_key, codebook, index, widths[shared_key], put, put_tensor)
                entries.append(entry)
                layers.append(layer)
            continue
        where = put_tensor(tensor)
        entries.append({"key": key, "kind": "raw", "dtype": _dtype_name(tensor), "shape": list(tensor.shape),
                        **where})
        other_bytes += where["nbytes"]
        other_raw += tensor.numel() * tensor.element_size()
    payload = b"".join(chunks)
    header = {"format": FORMAT, "version": version, "byteorder": "little", "payload_bytes": len(payload),
              "sha256": hashlib.sha256(payload).hexdigest(), "tensors": entries}
    header_bytes = len(_frame(header, payload, version)) - len(payload)
    return header, payload, CompressionReport(layers, other_bytes, header_bytes, 0, other_raw)


def _packed(tensor: torch.Tensor) -> tuple[bytes, dict[str, Any]]:
    """The smallest lossless form of ``tensor``: its raw bytes, or those of the narrowest float type
    that holds every value bit-exactly (checked by the round trip), raw-deflated when smaller."""
    _dtype_name(tensor)
    flat = tensor.detach().contiguous().cpu().reshape(-1)
    extra: dict[str, Any] = {}
    for narrow in _NARROWER.get(flat.dtype, ()):
        back = flat.to(narrow).to(flat.dtype)
        if torch.equal(back.view(_BITS_VIEW[flat.element_size()]), flat.view(_BITS_VIEW[flat.element_size()])):
            flat, extra = flat.to(narrow), {"stored": _dtype_name(flat.to(narrow))}
            break
    data = _raw_bytes(flat)
    deflated = _deflate(data)
    if len(deflated) < len(data):
        data, extra = deflated, {**extra, "deflate": True}
    return data, extra


def _deflate(data: bytes) -> bytes:
    """Raw deflate (no zlib wrapper: the file's SHA-256 already guards the bytes)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    return packer.compress(data) + packer.flush()


def _inflate(data: bytes, limit: int) -> bytes:
    """Undo :func:`_deflate`; a ``ValueError`` when the data is not a whole deflate stream of at most ``limit`` bytes."""
    unpacker = zlib.decompressobj(-15)
    try:
        out = unpacker.decompress(data, limit + 1)
    except zlib.error as exc:
        raise ValueError(f"deflated data cannot be inflated ({exc})") from None
    if len(out) > limit or not unpacker.eof or unpacker.unused_data:
        raise ValueError("deflated data does not match its announced size")
    return out


def _encode_shared(key: str, codebook: torch.Tensor, index: torch.Tensor, width: int, put,
                   put_tensor) -> tuple[dict, LayerBits]:
    """Header entry and size row of one shared weight; its streams go to ``put``."""
    k = codebook.numel()
    flat = index.detach().flatten().cpu().numpy().astype(np.int64)
    positions = np.flatnonzero(flat < k)
    dense = positions.size == flat.size
    element = codebook.element_size() * 8
    entry: dict[str, Any] = {"key": key, "kind": "shared", "dtype": _dtype_name(codebook),
                             "shape": list(index.shape), "clusters": k, "codebook": put_tensor(codebook)}
    if dense:
        symbols = flat
        entry["positions"] = None
        fillers = 0
    else:
        relative = relative_index(positions, width)
        symbols = np.full(relative.gaps.size, k, dtype=np.int64)  # fillers read the zero symbol k
        symbols[~relative.filler] = flat[positions]
        gaps = huffman_encode(relative.gaps)
        entry["positions"] = {"width": width, **_put_stream(gaps, put)}
        fillers = int(relative.filler.sum())
    values = huffman_encode(symbols)
    entry["values"] = _put_stream(values, put)
    entries = symbols.size
    bits = max(k - 1, 1).bit_length()
    codebook_bits = k * element
    if dense:
        pruned, shared = flat.size * element, flat.size * bits + codebook_bits
    else:
        value_bits = k.bit_length() if fillers else bits  # fillers add the symbol k
        pruned = entries * (element + width)
        shared = entries * (value_bits + width) + codebook_bits
    streams = [entry["values"]] + ([] if dense else [entry["positions"]])
    coded_bits = sum(stream["nbits"] + 8 * stream["table"]["nbytes"] for stream in streams)
    stored = entry["codebook"]["nbytes"] + sum(stream["nbytes"] + stream["table"]["nbytes"] for stream in streams)
    layer = LayerBits(key, flat.size, int(positions.size), entries, bits, None if dense else width, flat.size * element,
                      pruned, shared, coded_bits + 8 * entry["codebook"]["nbytes"], stored)
    return entry, layer


def _put_stream(stream: HuffmanStream, put) -> dict[str, Any]:
    """Header entry of one coded stream; its code table (``count`` then ``symbols``, each as the
    smallest unsigned integers that hold them) and its bits go to the payload."""
    count, symbols = _compact(stream.count), _compact(stream.symbols)
    table = put(count.tobytes() + symbols.tobytes())
    return {"nbits": stream.nbits, "length": stream.length, "lengths": len(stream.count),
            "count_dtype": count.dtype.name, "symbols_dtype": symbols.dtype.name,
            "table": table, **put(stream.to_bytes())}


def _compact(values: list[int]) -> np.ndarray:
    top = max(values, default=0)
    dtype = np.uint8 if top < 1 << 8 else np.uint16 if top < 1 << 16 else np.uint32
    return np.asarray(values, dtype=np.dtype(dtype).newbyteorder("<"))


def _shared_key(key: str, sharing: Mapping[str, Any]) -> str | None:
    """The shared weight (``fc.weight``) a state_dict key of its parametrisation belongs to."""
    for name in sharing:
        prefix = name.rpartition(".")[0]
        if key.startswith(f"{prefix}.parametrizations.weight." if prefix else "parametrizations.weight."):
            return name
    return None


def _widths(model: nn.Module, names: list[str], index_bits: int | Mapping[str, int] | None) -> dict[str, int]:
    """Relative-index width per shared weight, from ``index_bits`` (checked: 1 to 32 bits)."""
    import fnmatch

    spec: Mapping[str, int] = DEFAULT_INDEX_BITS if index_bits is None else (
        index_bits if isinstance(index_bits, Mapping) else dict.fromkeys(TYPE_KEYS, index_bits))
    for key, value in spec.items():
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 32:
            raise ValueError(f"index_bits for '{key}' must be an integer in [1, 32], got {value!r}")
    widths = {}
    for name in names:
        path = name.rpartition(".")[0]
        module = model.get_submodule(path) if path else model
        by_name = [value for key, value in spec.items() if key not in TYPE_KEYS and fnmatch.fnmatchcase(path, key)]
        by_type = [spec[key] for key, types in TYPE_KEYS.items() if key in spec and isinstance(module, types)]
        widths[name] = (by_name or by_type or [max(spec.values(), default=8)])[0]
    return widths


def _raw_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().contiguous().cpu().reshape(-1)
    data = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    if sys.byteorder != "little" and flat.element_size() > 1:
        raise ValueError("save_compressed writes little-endian data and needs a little-endian machine")
    return data


def _dtype_name(tensor: torch.Tensor) -> str:
    name = str(tensor.dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"save_compressed: dtype {tensor.dtype} is not supported")
    return name


def _header_json(header: dict[str, Any]) -> bytes:
    return json.dumps(header, separators=(",", ":")).encode("utf-8")


def _frame(header: dict[str, Any], payload: bytes, version: int = VERSION) -> bytes:
    """The file's bytes: version 1 (plain JSON header) or 2 (SHA-256, then the compact header deflated)."""
    if version == 1:
        text = _header_json(header)
        return MAGIC + struct.pack("<I", len(text)) + text + payload
    packed = _deflate(_header_json(_compact_header(header)))
    digest = hashlib.sha256(packed + payload).digest()
    return MAGIC_PREFIX + bytes([version]) + struct.pack("<I", len(packed)) + digest + packed + payload


# version 2 header: short keys, no offsets (the payload holds the tensors in header order)
_SHORT = {"key": "k", "dtype": "d", "shape": "s", "nbytes": "n", "stored": "e", "deflate": "z", "clusters": "K",
          "codebook": "c", "positions": "p", "values": "x", "width": "w", "nbits": "b", "length": "l",
          "lengths": "m", "count_dtype": "cd", "symbols_dtype": "sd", "table": "t"}
_LONG = {short: long for long, short in _SHORT.items()}


def _compact_header(header: dict[str, Any]) -> dict[str, Any]:
    """The version-2 header of a (version-1 style) header: payload size and compact tensor entries,
    without what the reader derives (offsets, a stream's bytes from its bits, the values' count
    from the positions' or the shape, uint8 code-table types)."""
    derived = {"offset", "kind"}

    def shrink(value: Any, stream: bool = False) -> Any:
        if not isinstance(value, dict):
            return value
        out = {}
        for key, item in value.items():
            if key in derived or (key == "deflate" and not item) or (
                    stream and (key == "nbytes" or (key.endswith("_dtype") and item == "uint8"))):
                continue
            out[_SHORT.get(key, key)] = shrink(item, key in ("positions", "values"))
        return out

    entries = []
    for entry in header["tensors"]:
        small = shrink(entry)
        if "x" in small:
            del small["x"]["l"]
        entries.append(small)
    return {"n": header["payload_bytes"], "t": entries}


def _expand_header(compact: Any) -> dict[str, Any]:
    """The version-1 style header (kinds and offsets) of a version-2 header, walking the payload in order."""
    if not isinstance(compact, dict) or not isinstance(compact.get("t"), list):
        raise ValueError("the header has no tensor list")
    offset = 0

    def grow(value: Any, order: tuple[str, ...], stream: bool = False) -> Any:
        nonlocal offset
        if not isinstance(value, dict):
            return value
        out = {_LONG.get(key, key): item for key, item in value.items()}
        if stream:
            out.update({"nbytes": (int(out["nbits"]) + 7) // 8, "count_dtype": out.get("count_dtype", "uint8"),
                        "symbols_dtype": out.get("symbols_dtype", "uint8")})
        for key in order:  # the chunks of this entry, in the order they were written
            if isinstance(out.get(key), dict):
                out[key] = grow(out[key], ("table",) if key in ("positions", "values") else (),
                                key in ("positions", "values"))
        if "nbytes" in out:
            out["offset"] = offset
            offset += int(out["nbytes"])
        return out

    entries = []
    for entry in compact["t"]:
        if not isinstance(entry, dict):
            raise ValueError("a tensor entry is not an object")
        shared = "K" in entry
        grown = grow(entry, ("codebook", "positions", "values") if shared else ())
        grown["kind"] = "shared" if shared else "raw"
        grown.setdefault("positions", None)
        if shared and isinstance(grown.get("values"), dict):
            grown["values"]["length"] = (grown["positions"]["length"] if isinstance(grown["positions"], dict)
                                         else int(np.prod(grown["shape"], dtype=np.int64)))
        entries.append(grown)
    return {"format": FORMAT, "version": 2, "payload_bytes": compact.get("n"), "tensors": entries}


def _file(path: str | Path) -> Path:
    path = Path(path)
    return path / FILE_NAME if path.is_dir() else path


# ----------------------------------------------------------------------------------------
# decoding
# ----------------------------------------------------------------------------------------
def _unframe(blob: bytes, where: Path) -> tuple[dict[str, Any], bytes]:
    """Header and payload of a file, after checking magic, version, length and checksum."""
    prefix = len(MAGIC_PREFIX)
    if len(blob) < prefix + 1 + 4 or blob[:prefix] != MAGIC_PREFIX:
        raise CompressedFileError(f"{where} is not a torchslim compressed file (bad magic)")
    version = blob[prefix] or 1  # version 1 files end their magic with a zero byte
    if version == 1:
        return _unframe_v1(blob, where)
    if version != 2:
        raise CompressedFileError(f"{where}: format version {version}; this torchslim reads versions "
                                  f"{', '.join(map(str, VERSIONS))} (a newer torchslim wrote it?)")
    (length,) = struct.unpack("<I", blob[prefix + 1:prefix + 5])
    if _V2_FIXED + length > len(blob):
        raise CompressedFileError(f"{where} is truncated: the header needs {length} bytes, "
                                  f"{max(len(blob) - _V2_FIXED, 0)} present")
    digest, packed = blob[prefix + 5:_V2_FIXED], blob[_V2_FIXED:_V2_FIXED + length]
    payload = blob[_V2_FIXED + length:]
    intact = hashlib.sha256(blob[_V2_FIXED:]).digest() == digest
    try:
        header = _expand_header(json.loads(_inflate(packed, _MAX_HEADER).decode("utf-8")))
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError, TypeError, KeyError) as exc:
        raise CompressedFileError(f"{where}: corrupt header ({exc})") from None
    expected = header["payload_bytes"]
    if not intact:
        state = "truncated" if isinstance(expected, int) and len(payload) < expected else "corrupt"
        raise CompressedFileError(f"{where} is {state}: the SHA-256 of header and payload does not match "
                                  f"(payload {len(payload)} bytes, the header announces {expected})")
    if len(payload) != expected:
        raise CompressedFileError(f"{where} is corrupt: the payload has {len(payload)} bytes, the header "
                                  f"announces {expected}")
    return header, payload


def _unframe_v1(blob: bytes, where: Path) -> tuple[dict[str, Any], bytes]:
    """Version 1: plain JSON header with the payload's SHA-256."""
    if len(blob) < len(MAGIC) + 4 or blob[:len(MAGIC)] != MAGIC:
        raise CompressedFileError(f"{where} is not a torchslim compressed file (bad magic)")
    (length,) = struct.unpack("<I", blob[len(MAGIC):len(MAGIC) + 4])
    start = len(MAGIC) + 4
    if start + length > len(blob):
        raise CompressedFileError(f"{where} is truncated: the header needs {length} bytes, "
                                  f"{len(blob) - start} present")
    try:
        header = json.loads(blob[start:start + length].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CompressedFileError(f"{where}: corrupt header ({exc})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CompressedFileError(f"{where}: not a {FORMAT} header")
    if header.get("version") != 1:
        raise CompressedFileError(f"{where}: format version {header.get('version')!r} in a version-1 frame; "
                                  f"this torchslim reads versions {', '.join(map(str, VERSIONS))}")
    payload = blob[start + length:]
    expected = header.get("payload_bytes")
    if len(payload) != expected:
        state = "truncated" if isinstance(expected, int) and len(payload) < expected else "corrupt"
        raise CompressedFileError(f"{where} is {state}: the payload has {len(payload)} bytes, the header "
                                  f"announces {expected}")
    if hashlib.sha256(payload).hexdigest() != header.get("sha256"):
        raise CompressedFileError(f"{where} is corrupt: the payload's SHA-256 does not match the header")
    return header, payload


def _decode(header: dict[str, Any], payload: bytes, where: Path
            ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The state_dict (plain weights) and the sharing (codebook, index) the file holds."""
    state: dict[str, torch.Tensor] = {}
    sharing: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for entry in header.get("tensors", []):
        key = str(entry.get("key")) if isinstance(entry, dict) else "?"
        try:
            if entry["kind"] == "raw":
                state[key] = _tensor(payload, entry, entry["shape"])
            elif entry["kind"] == "shared":
                codebook, index = _decode_shared(payload, entry)
                sharing[key] = (codebook, index)
                state[key] = torch.cat([codebook, codebook.new_zeros(1)])[index]
            else:
                raise ValueError(f"unknown kind {entry['kind']!r}")
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CompressedFileError(f"{where}: tensor {key!r} cannot be decoded: {exc}") from None
    return state, sharing


def _decode_shared(payload: bytes, entry: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    k = int(entry["clusters"])
    codebook = _tensor(payload, {**entry["codebook"], "dtype": entry["dtype"]}, [k])
    numel = int(np.prod(entry["shape"], dtype=np.int64))
    symbols = _stream(payload, entry["values"])
    if symbols.size and (int(symbols.min()) < 0 or int(symbols.max()) > k):
        raise ValueError("cluster index out of range")
    if entry["positions"] is None:
        if symbols.size != numel or (symbols.size and int(symbols.max()) >= k):
            raise ValueError("dense index stream does not match the shape")
        flat = symbols
    else:
        positions = absolute_positions(_stream(payload, entry["positions"]), int(entry["positions"]["width"]))
        if positions.size != symbols.size or (positions.size and int(positions[-1]) >= numel):
            raise ValueError("positions do not match the values or run past the end of the weight")
        flat = np.full(numel, k, dtype=np.int64)
        flat[positions] = symbols
    index = torch.from_numpy(flat).reshape(entry["shape"])
    return codebook, index


def _stream(payload: bytes, info: dict[str, Any]) -> np.ndarray:
    table = _slice(payload, info["table"])
    lengths = int(info["lengths"])
    count_dtype, symbols_dtype = (np.dtype(_UINTS[info[key]]).newbyteorder("<") for key in ("count_dtype",
                                                                                           "symbols_dtype"))
    split = lengths * count_dtype.itemsize
    if split > len(table) or (len(table) - split) % symbols_dtype.itemsize:
        raise ValueError("code table size does not match its description")
    count = np.frombuffer(table[:split], dtype=count_dtype).astype(np.int64).tolist()
    symbols = np.frombuffer(table[split:], dtype=symbols_dtype).astype(np.int64).tolist()
    return huffman_decode(_slice(payload, info), int(info["nbits"]), count, symbols, int(info["length"]))


def _slice(payload: bytes, info: dict[str, Any]) -> bytes:
    offset, nbytes = int(info["offset"]), int(info["nbytes"])
    if offset < 0 or nbytes < 0 or offset + nbytes > len(payload):
        raise ValueError(f"bytes {offset}..{offset + nbytes} lie outside the payload")
    return payload[offset:offset + nbytes]


def _tensor(payload: bytes, info: dict[str, Any], shape: list[int]) -> torch.Tensor:
    """A tensor of ``info["dtype"]`` from its bytes (stored as ``info["stored"]``, deflated or not)."""
    dtype = _DTYPES.get(info["dtype"])
    stored = _DTYPES.get(info.get("stored", info["dtype"]))
    if dtype is None or stored is None:
        raise ValueError(f"unknown dtype {info.get('stored', info['dtype'])!r}")
    if stored != dtype and stored not in _NARROWER.get(dtype, ()):
        raise ValueError(f"{dtype} cannot be stored as {stored}")
    data = _slice(payload, info)
    numel = int(np.prod(shape, dtype=np.int64))
    if info.get("deflate"):
        data = _inflate(data, numel * stored.itemsize)
    if len(data) != numel * stored.itemsize:
        raise ValueError(f"{len(data)} bytes for {numel} values of {stored}")
    if not data:
        return torch.empty(shape, dtype=dtype)
    values = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(stored).reshape(shape).clone()
    return values.to(dtype)


def _check_fits(model: nn.Module, state: Mapping[str, torch.Tensor], where: Path) -> None:
    """Every key, shape and dtype of the file matches the model's ``state_dict``, both ways."""
    own = model.state_dict()
    missing = [key for key in own if key not in state]
    unexpected = [key for key in state if key not in own]
    if missing or unexpected:
        parts = ([f"missing from the file: {', '.join(missing[:5])}"] if missing else []) + (
            [f"not in the model: {', '.join(unexpected[:5])}"] if unexpected else [])
        raise CompressedFileError(f"{where} does not fit {type(model).__name__} ({'; '.join(parts)})")
    for key, tensor in state.items():
        if tuple(own[key].shape) != tuple(tensor.shape) or own[key].dtype != tensor.dtype:
            raise CompressedFileError(f"{where}: '{key}' is {list(tensor.shape)} {tensor.dtype} in the file, "
                                      f"{list(own[key].shape)} {own[key].dtype} in the model")
