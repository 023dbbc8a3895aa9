"""A GGUF's header, read fast: walked with ``struct`` over a memory map, large metadata arrays skipped.

gguf-py's ``GGUFReader`` builds an array per metadata field (a 49k-token vocabulary takes seconds), which is
fine for `inspect` and editing but not before every model load; this reads the scalar metadata values and the
tensor table (names, types, shapes, offsets) only (GGUF v2/v3 layout, gguf-py's ``constants.py``).
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import McsharpError

# GGUF metadata value types → fixed size in bytes (STRING = 8 and ARRAY = 9 are variable), and struct format
_SCALAR_SIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_SCALAR_FMT = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_SMALL_ARRAY = 4096  # numeric arrays up to this length are read (per-layer hyperparameters), longer ones skipped
_FLOAT_TYPES = {0: np.float32, 1: np.float16}  # ggml type id → numpy dtype, for the plain float tensors


@dataclass(frozen=True)
class TensorEntry:
    name: str
    ggml_type: int
    shape: tuple[int, ...]  # ggml ne order
    offset: int  # absolute, in the file


class _Cursor:
    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, fmt: str):
        try:
            vals = struct.unpack_from("<" + fmt, self.buf, self.pos)
        except struct.error:
            raise McsharpError(f"{self.path}: the GGUF header is truncated; convert the file again") from None
        self.pos += struct.calcsize("<" + fmt)
        return vals[0] if len(vals) == 1 else vals

    def string(self) -> bytes:
        n = self.take("Q")
        if self.pos + n > len(self.buf):
            raise McsharpError(f"{self.path}: the GGUF header is truncated; convert the file again")
        s = self.buf[self.pos:self.pos + n]
        self.pos += n
        return s

    def skip_value(self, vtype: int) -> None:
        if vtype == 8:
            n = self.take("Q")  # (not `self.pos += self.take(...)`: that adds to the position before the take)
            self.pos += n
        elif vtype == 9:
            etype, count = self.take("IQ")
            if etype in _SCALAR_SIZE:
                self.pos += count * _SCALAR_SIZE[etype]
            else:
                for _ in range(count):
                    self.skip_value(etype)
        elif vtype in _SCALAR_SIZE:
            self.pos += _SCALAR_SIZE[vtype]
        else:
            raise McsharpError(f"{self.path}: unknown GGUF metadata type {vtype} (a damaged header); convert the file "
                               "again")

    def value(self, vtype: int):
        """A scalar, a string (up to 1 KiB), or a short numeric array (a list); None for what is skipped."""
        if vtype in _SCALAR_FMT:
            return self.take(_SCALAR_FMT[vtype])
        if vtype == 8:
            s = self.string()
            return s.decode("utf-8", errors="replace") if len(s) <= 1024 else None
        if vtype == 9:
            start = self.pos
            etype, count = self.take("IQ")
            if etype in _SCALAR_FMT and count <= _SMALL_ARRAY:
                return [self.take(_SCALAR_FMT[etype]) for _ in range(count)]
            self.pos = start
        self.skip_value(vtype)
        return None


@dataclass(frozen=True)
class GgufHeader:
    """What a GGUF's header says: its small metadata values (key → number, string or short list) and tensors."""

    values: dict
    tensors: list[TensorEntry]


def tensor_table(path: str | Path) -> list[TensorEntry]:
    """Every tensor's name, ggml type, shape and absolute data offset, in header order."""
    return read_header(path).tensors


def read_header(path: str | Path) -> GgufHeader:
    """The header of a GGUF: scalar and short metadata values, and every tensor's table entry."""
    path = Path(path)
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        cur = _Cursor(buf, path)
        if buf[:4] != b"GGUF":
            raise McsharpError(f"{path} is not a GGUF file (no GGUF magic); pass a .gguf written by llama.cpp")
        version, n_tensors, n_kv = cur.take("4xIQQ")
        if version < 2:
            raise McsharpError(f"{path} is GGUF version {version}; convert it again with a current llama.cpp")
        values = {}
        for _ in range(n_kv):
            key = cur.string().decode("utf-8", errors="replace")
            v = cur.value(cur.take("I"))
            if v is not None:
                values[key] = v
        alignment = values.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise McsharpError(f"{path}: general.alignment is {alignment!r}, not a power of two; convert the file "
                               "again")
        infos = []
        for _ in range(n_tensors):
            name = cur.string().decode("utf-8", errors="replace")
            n_dims = cur.take("I")
            shape = tuple(cur.take("Q") for _ in range(n_dims))
            ggml_type, offset = cur.take("IQ")
            infos.append((name, ggml_type, shape, offset))
        data_start = (cur.pos + alignment - 1) // alignment * alignment
    return GgufHeader(values, [TensorEntry(n, t, s, data_start + o) for n, t, s, o in infos])


def check_finite_tensors(path: str | Path, select: Callable[[str], bool], fix: str,
                         tensors: list[TensorEntry] | None = None) -> None:
    """Refuse a GGUF whose selected float (F32/F16) tensors hold NaN/Inf, naming the first such tensor.
    ``tensors``: the file's tensor table when the caller has read it already."""
    path = Path(path)
    table = tensor_table(path) if tensors is None else tensors
    chosen = [t for t in table if select(t.name) and t.ggml_type in _FLOAT_TYPES]
    if not chosen:
        return
    data = np.memmap(path, dtype=np.uint8, mode="r")
    for t in chosen:
        dtype = _FLOAT_TYPES[t.ggml_type]
        n = int(np.prod(t.shape)) if t.shape else 1
        end = t.offset + n * np.dtype(dtype).itemsize
        if end > data.size:
            raise McsharpError(f"{path} is truncated inside tensor {t.name}; copy or convert it again")
        if not np.isfinite(data[t.offset:end].view(dtype)).all():
            raise McsharpError(f"{path}: tensor {t.name} holds NaN/Inf values; {fix}")
