"""A fast reader of a GGUF file's header: metadata as plain values, tensors as views.

:class:`gguf.GGUFReader` builds a NumPy memory-map view for every element of every
metadata array, so a file with a 49k-token vocabulary and its 48k merges (SmolLM2) takes
5–13 s to open, most of a model load. The layout is simple (llama.cpp's
``docs/gguf.md``): a header, ``kv_count`` key/value pairs (a string key, a ``uint32``
value type, the value; arrays are an item type, a ``uint64`` count and the items), then
``tensor_count`` tensor infos (name, ``uint32`` rank, ``uint64`` dims, ``uint32`` type,
``uint64`` offset) and the tensor data from the next multiple of ``general.alignment``.
This module walks it once with :mod:`struct` (about 0.1 s) and returns the same values
as :func:`lmppl.lm.gguf_reader.read_gguf_metadata` and tensors shaped as
:class:`gguf.GGUFReader`'s, so :func:`gguf.quants.dequantize` reads them unchanged; the
type and block-size tables are ``gguf``'s. Files it does not read (big-endian, nested
arrays) return None and the caller uses :class:`gguf.GGUFReader`.
"""

from __future__ import annotations

import mmap
import os
import struct
from typing import Any, NamedTuple

import numpy as np

__all__ = ["GGUFFileTensor", "GGUFLayoutError", "read_gguf_file"]

_MAGIC = 0x46554747  # b"GGUF" little-endian
_SCALARS = {  # GGUFValueType -> struct format
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_NUMPY = {0: "u1", 1: "i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?"}
_NUMPY |= {10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY, _FLOAT32, _BOOL = 8, 9, 6, 7
_PLAIN_TENSORS = {0: np.float32, 1: np.float16, 24: np.int8, 25: np.int16, 26: np.int32}
_PLAIN_TENSORS |= {27: np.int64, 28: np.float64}


class GGUFLayoutError(ValueError):
    """The file is not a GGUF file this reader can walk (bad magic, cut short, ...)."""


class _Unsupported(Exception):
    """A valid file this reader leaves to :class:`gguf.GGUFReader`."""


class GGUFFileTensor(NamedTuple):
    """One tensor: ``data`` is a read-only view of the file, shaped as
    :class:`gguf.GGUFReader` shapes it (quantized types as bytes per block row)."""

    name: str
    tensor_type: Any
    shape: np.ndarray
    data: np.ndarray


class _Cursor:
    def __init__(self, buffer: Any):
        self.buffer, self.offset = buffer, 0

    def unpack(self, fmt: str) -> Any:
        try:
            values = struct.unpack_from("<" + fmt, self.buffer, self.offset)
        except struct.error:
            raise GGUFLayoutError("the header ends early") from None
        self.offset += struct.calcsize("<" + fmt)
        return values[0] if len(values) == 1 else values

    def string(self) -> str:
        length = self.unpack("Q")
        end = self.offset + length
        if end > len(self.buffer):
            raise GGUFLayoutError("a string runs past the end of the file")
        text = bytes(self.buffer[self.offset : end]).decode("utf-8", errors="replace")
        self.offset = end
        return text

    def value(self, kind: int) -> Any:
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.unpack("I"), self.unpack("Q")
            if item == _STRING:
                return [self.string() for _ in range(count)]
            if item not in _NUMPY:
                raise _Unsupported(f"array of value type {item}")
            dtype = np.dtype(_NUMPY[item])
            end = self.offset + count * dtype.itemsize
            if end > len(self.buffer):
                raise GGUFLayoutError("an array runs past the end of the file")
            values = np.frombuffer(self.buffer, dtype, count, self.offset).tolist()
            self.offset = end
            return values
        if kind not in _SCALARS:
            raise GGUFLayoutError(f"unknown value type {kind}")
        value = self.unpack(_SCALARS[kind])
        if kind == _FLOAT32:  # the shortest decimal that is this float32 (1e-05)
            return float(np.format_float_positional(np.float32(value), unique=True, trim="-"))
        return bool(value) if kind == _BOOL else value


def read_gguf_file(path: str | os.PathLike) -> tuple[dict[str, Any], list[GGUFFileTensor]] | None:
    """``(metadata, tensors)`` of a little-endian GGUF file (v2 or v3), or None for a file
    this reader leaves to :class:`gguf.GGUFReader`.

    ``metadata`` holds ``GGUF.version``, ``GGUF.tensor_count``, ``GGUF.kv_count`` and every
    key/value pair as plain Python values (see :func:`~lmppl.lm.gguf_reader.read_gguf_metadata`).

    Raises:
      GGUFLayoutError: not a GGUF file, or one cut short (``"truncated"`` in the message
        when the tensor data ends before its declared size).
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import quant_shape_to_byte_shape

    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size < 24:
            raise GGUFLayoutError("GGUF magic invalid")
        buffer = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    cursor = _Cursor(buffer)
    if cursor.unpack("I") != _MAGIC:
        raise GGUFLayoutError("GGUF magic invalid")
    version = cursor.unpack("I")
    if version & 0xFFFF == 0:  # written for the other byte order
        return None
    if version not in (2, 3):
        raise GGUFLayoutError(f"GGUF version {version} is not supported")
    tensor_count, kv_count = cursor.unpack("Q"), cursor.unpack("Q")
    metadata: dict[str, Any] = {
        "GGUF.version": version,
        "GGUF.tensor_count": tensor_count,
        "GGUF.kv_count": kv_count,
    }
    try:
        for _ in range(kv_count):
            key = cursor.string()
            metadata[key] = cursor.value(cursor.unpack("I"))
    except _Unsupported:
        return None
    infos = []
    for _ in range(tensor_count):
        name = cursor.string()
        rank = cursor.unpack("I")
        dims = np.asarray([cursor.unpack("Q") for _ in range(rank)], np.uint64)
        infos.append((name, dims, cursor.unpack("I"), cursor.unpack("Q")))
    alignment = int(metadata.get("general.alignment", 32))
    start = -(-cursor.offset // alignment) * alignment
    whole = np.frombuffer(buffer, np.uint8)
    tensors = []
    for name, dims, kind, offset in infos:
        tensor_type = GGMLQuantizationType(kind)
        elements = int(np.prod(dims))
        block, block_bytes = GGML_QUANT_SIZES[tensor_type]
        shape = tuple(int(n) for n in reversed(dims.tolist()))
        begin = start + offset
        end = begin + elements * block_bytes // block
        if end > size:
            raise GGUFLayoutError(
                f"truncated GGUF file ({size} bytes): tensor {name} ends at byte {end}"
            )
        raw = whole[begin:end]
        if kind in _PLAIN_TENSORS:
            data = raw.view(_PLAIN_TENSORS[kind]).reshape(shape)
        else:
            data = raw.reshape(quant_shape_to_byte_shape(shape, tensor_type))
        tensors.append(GGUFFileTensor(name, tensor_type, dims, data))
    return metadata, tensors
