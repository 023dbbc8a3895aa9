"""Where a GGUF's numeric metadata values and tensor-table fields lie in the file: the byte offsets that the
header fuzzers (scripts/fuzz_gguf_load.py, tests/test_bad_input.py) overwrite with edge values."""

from __future__ import annotations

import struct
from dataclasses import dataclass


@dataclass(frozen=True)
class TableEntry:
    """One tensor's table entry: its name, the offset of its dimension count, and that count (its dimensions,
    ggml type and data offset follow at fixed steps: ``field_offset``)."""

    name: str
    at: int
    n_dims: int

    def field_offset(self, field: str) -> tuple[int, str]:
        """(offset, struct format) of ``field``: n_dims, ne0, ne1, type or offset."""
        return {"n_dims": (self.at, "<I"), "ne0": (self.at + 4, "<Q"), "ne1": (self.at + 12, "<Q"),
                "type": (self.at + 4 + 8 * self.n_dims, "<I"), "offset": (self.at + 8 + 8 * self.n_dims, "<Q")}[field]


def numeric_value_offsets(reader) -> dict[str, tuple[int, str]]:
    """Metadata key → (offset of its value, struct format) for every scalar numeric or bool value of an open
    ``gguf.GGUFReader`` (the GGUF.* header counts excluded)."""
    from ..llama_src import import_gguf

    vt = import_gguf().GGUFValueType
    fmt = {vt.UINT32: "<I", vt.INT32: "<i", vt.FLOAT32: "<f", vt.UINT64: "<Q", vt.BOOL: "<B"}
    return {name: (f.offset + sum(p.nbytes for p in f.parts[:f.data[0]]), fmt[f.types[0]])
            for name, f in reader.fields.items()
            if len(f.types) == 1 and f.types[0] in fmt and not name.startswith("GGUF.")}


def table_entries(reader) -> list[TableEntry]:
    """Every tensor's table entry of an open ``gguf.GGUFReader``, in header order."""
    entries = []
    for t in reader.tensors:
        at = t.field.offset + 8 + struct.unpack_from("<Q", reader.data, t.field.offset)[0]  # past the name
        entries.append(TableEntry(t.name, at, int(struct.unpack_from("<I", reader.data, at)[0])))
    return entries
