"""Rewrite a GGUF with metadata keys and tensors added or removed (everything else copied byte for byte)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import McsharpError
from ..llama_src import import_gguf
from .convert import atomic_output, check_output_path


def open_gguf(path: str | Path):
    """A ``GGUFReader`` on ``path``, or a one-line error naming the file."""
    gguf = import_gguf()
    path = Path(path)
    if not path.is_file():
        raise McsharpError(f"{path}: no such GGUF file")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError) as e:
        raise McsharpError(f"{path} is not a readable GGUF ({e}); pass a .gguf written by llama.cpp or mcsharp") \
            from None
    check_data_section(reader, path)
    check_metadata_text(reader, path)
    return reader


def check_metadata_text(reader, path: Path) -> None:
    """Every string of the metadata (values and string arrays) must be UTF-8, as GGUF requires: a damaged byte
    there would otherwise surface later, in whatever reads that key."""
    gguf = import_gguf()
    for f in reader.fields.values():
        if f.types and f.types[-1] == gguf.GGUFValueType.STRING:
            for i in f.data:
                try:
                    bytes(f.parts[i]).decode("utf-8")
                except UnicodeDecodeError:
                    raise McsharpError(f"{path}: metadata {f.name} is not valid UTF-8 (a damaged header); convert "
                                       "the file again") from None


def check_data_section(reader, path: Path) -> None:
    """The header's tensor table must account for the whole data section: tensors inside the file, in order,
    not overlapping, and nothing but alignment padding after the last one. (A header whose tensor count is off
    by one still parses: every tensor after it would be read from the wrong bytes.)"""
    size = path.stat().st_size
    end = reader.data_offset
    for t in sorted(reader.tensors, key=lambda t: t.data_offset):
        if t.data_offset < end:
            raise McsharpError(f"{path}: tensor {t.name} overlaps the one before it; the file is damaged, convert it "
                               "again")
        end = t.data_offset + int(t.n_bytes)
    if end > size:
        raise McsharpError(f"{path} is truncated: its tensors need {end} bytes, the file has {size}; copy or convert "
                           "it again")
    if size - end >= reader.alignment:
        raise McsharpError(f"{path} has {size - end} bytes after its last tensor: the header lists "
                           f"{len(reader.tensors)} tensors but the file holds more data (a damaged header); convert "
                           "it again")


def field_value(reader, key: str):
    """The value of scalar/string metadata ``key`` (None when absent)."""
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def rewrite_gguf(src: str | Path, dst: str | Path, drop_key: Callable[[str], bool] = lambda k: False,
                 add_kv: list[tuple[str, object, str]] = (), drop_tensor: Callable[[str], bool] = lambda n: False,
                 add_tensors: list[tuple[str, np.ndarray]] = ()) -> Path:
    """Copy ``src`` to ``dst`` (atomically) minus dropped keys/tensors, plus ``add_kv`` / ``add_tensors``.

    ``add_kv`` holds (key, value, GGUFValueType name); added tensors are written as given (F32/F16 arrays).
    """
    gguf = import_gguf()
    reader = open_gguf(src)
    dst = check_output_path(dst)
    if Path(src).resolve() == dst.resolve():
        raise McsharpError(f"-o {dst} is the input file; write to a new file")
    new_keys = {k for k, _, _ in add_kv}
    with atomic_output(dst) as tmp:
        writer = gguf.GGUFWriter(tmp, arch=field_value(reader, gguf.Keys.General.ARCHITECTURE),
                                 endianess=reader.endianess)
        alignment = field_value(reader, gguf.Keys.General.ALIGNMENT)
        if alignment is not None:
            writer.data_alignment = alignment
        for f in reader.fields.values():
            # the writer adds the architecture and GGUF.* header fields itself
            if f.name == gguf.Keys.General.ARCHITECTURE or f.name.startswith("GGUF.") or drop_key(f.name) \
                    or f.name in new_keys:
                continue
            vtype = f.types[0]
            sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(f.name, f.contents(), vtype, sub_type=sub)
        for key, value, vtype in add_kv:
            writer.add_key_value(key, value, getattr(gguf.GGUFValueType, vtype))
        kept = [t for t in reader.tensors if not drop_tensor(t.name)]
        for t in kept:
            writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
        for name, arr in add_tensors:
            qtype = gguf.GGMLQuantizationType.F16 if arr.dtype == np.float16 else gguf.GGMLQuantizationType.F32
            writer.add_tensor_info(name, arr.shape, arr.dtype, arr.nbytes, qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in kept:
            writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
        for _, arr in add_tensors:
            writer.write_tensor_data(arr)
        writer.close()
    return dst
