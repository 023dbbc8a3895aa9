"""HF checkpoint → GGUF through the pinned llama.cpp ``conversion`` package.

Metadata, tokenizer and tensor naming are llama.cpp's own; we only subclass the architecture's model
class so later stages can substitute packed tensors (``TensorHook``), and we own validation and the
atomic write.
"""


from __future__ import annotations

import errno
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import McsharpError
from ..files import atomic_output
from ..llama_src import import_conversion, import_gguf
from ..model.checkpoint import checkpoint_weights, validate_model_dir
from ..recipe import OUTTYPES

# A hook sees every tensor the converter is about to write (GGUF name, the converter's lazy torch tensor: read
# it with tensor_values, block id) and may return what to write instead: a list of (name, numpy data, ggml type
# or None) — packed bytes, a split into several tensors, or nothing at all; None keeps the converter's handling.
TensorHook = Callable[[str, Any, "int | None"], "list[tuple[str, Any, Any]] | None"]


_OUT_BITS = {"f32": 32.0, "f16": 16.0, "bf16": 16.0, "q8_0": 8.5}


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing parent (where its bytes would go)."""
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return path


def _free_bytes(path: Path) -> int:
    return shutil.disk_usage(_existing(path)).free


def check_free_disk(model_dir: str | Path, out: str | Path, outtype: str = "f16", bpw: float | None = None,
                    work_dir: str | Path | None = None, gptq: bool = False, spill_bytes: int = 0) -> None:
    """Refuse to start a conversion that cannot finish for lack of disk: the output (every weight at ``bpw``, or
    at ``outtype`` without a plan, + 2% for metadata; with ``bpw`` twice: TensorSpill), with ``gptq`` the work
    dir's packed layers (the planned weights again) and the importance pass's spilled layer inputs
    (``spill_bytes``, in ``work_dir``, else in the system's temp dir)."""
    n = checkpoint_weights(model_dir)
    bits = _OUT_BITS[outtype] if bpw is None else max(bpw, 1.0) + 0.25  # router, norms stay wide
    wd = Path(work_dir).parent if work_dir is not None else Path(tempfile.gettempdir())
    # the output, and with a plan the hook's tensors spilled beside it until the writer lays the file out
    needs = [(Path(out).parent, int(1.02 * n * bits / 8) * (1 if bpw is None else 2)),
             (wd, int(1.02 * n * bits / 8) if gptq and bpw is not None else 0), (wd, spill_bytes)]
    by_fs: dict[int, tuple[Path, int]] = {}  # device → (a path on it, bytes needed there)
    for p, b in needs:
        dev = _existing(p).stat().st_dev
        first, total = by_fs.get(dev, (p, 0))
        by_fs[dev] = (first, total + b)
    for p, b in by_fs.values():
        free = _free_bytes(p)
        if free < b:
            raise McsharpError(f"not enough free disk in {p}: this conversion needs {b / 1e9:.1f} GB there (output, "
                               f"work dir, spilled calibration states), {free / 1e9:.1f} GB are free; free some "
                               "space or choose -o / --work-dir / TMPDIR on a larger disk")


def check_output_path(out: str | Path, inputs: tuple = (), force: bool = True) -> Path:
    """Fail early (before any work) when ``out`` cannot be written, is (or is inside) one of ``inputs`` (a
    checkpoint dir, a base GGUF, a calibration file: never overwritten), or exists and ``force`` is off."""
    out = Path(out)
    for src in inputs:
        if src is None or not Path(src).exists():
            continue
        src_r, out_r = Path(src).resolve(), out.resolve()
        if out_r == src_r or src_r in out_r.parents:
            where = "is" if out_r == src_r else "is inside"
            raise McsharpError(f"output {out} {where} the input {src}; write it somewhere else")
    if out.exists() and not out.is_dir() and not force:
        raise McsharpError(f"{out} exists; pass --force to replace it (or choose another -o path)")
    if out.is_dir():
        raise McsharpError(f"output {out} is a directory; pass a file name such as {out / 'model.gguf'}")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise McsharpError(f"output directory {parent} does not exist; create it or choose another -o path")
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=f".{out.name}.", suffix=".probe"):
            pass
    except OSError as e:
        raise McsharpError(f"cannot write to {parent} ({e.strerror}); choose a writable -o path") from None
    return out


class SpilledTensor:
    """A tensor a hook produced, kept in a TensorSpill's file until the GGUF writer copies it into the output: what
    ``GGUFWriter.add_tensor`` and ``write_tensors_to_file`` use of an array (shape, dtype, nbytes, tofile)."""

    def __init__(self, spill: TensorSpill, offset: int, shape: tuple[int, ...], dtype, nbytes: int):
        self.spill, self.offset, self.shape, self.dtype, self.nbytes = spill, offset, shape, dtype, nbytes

    def tofile(self, fout) -> None:
        """Copy the bytes into ``fout`` with plain reads, 64 MB at a time (never mapped: no resident pages)."""
        f = self.spill.file
        f.seek(self.offset)
        left = self.nbytes
        while left:
            chunk = f.read(min(left, 1 << 26))
            if not chunk:
                raise McsharpError(f"the tensor spill file beside {self.spill.directory} was cut short; convert again")
            fout.write(chunk)
            left -= len(chunk)


class TensorSpill:
    """Where a conversion keeps the tensors its hook computed until the writer lays out the file.

    llama.cpp's converter adds every tensor first and writes them all at the end; its own tensors stay lazy
    until then, a hook's quantised bytes would sit in memory: at the end of a whole Qwen3-30B-A3B conversion the
    entire file (~13 GB at Q3_K_M). They go to an unnamed temporary file beside the output instead (gone when
    closed, also after a crash)."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.file = tempfile.TemporaryFile(dir=directory, prefix=".mcsharp-tensors-")

    def add(self, data) -> SpilledTensor:
        """Append ``data`` (a numpy array) to the spill file."""
        import numpy as np

        arr = np.ascontiguousarray(data)
        offset = self.file.seek(0, os.SEEK_END)
        self.file.write(memoryview(arr.reshape(-1)).cast("B"))
        return SpilledTensor(self, offset, arr.shape, arr.dtype, arr.nbytes)

    def close(self) -> None:
        self.file.close()


def tensor_values(tensor):
    """The values of a tensor a hook was handed. The converter's tensors are lazy (read from the checkpoint only
    when asked): a hook reads only what it computes from, e.g. not a layer's merged experts (1.9 GB a projection
    at Mixtral-8x7B's shape in float32) that the GPTQ work dir already holds packed."""
    lazy = import_conversion().LazyTorchTensor
    return lazy.to_eager(tensor) if isinstance(tensor, lazy) else tensor


def _model_class(conversion, hf_arch: str, hook: TensorHook | None, spill: TensorSpill | None = None):
    base = conversion.get_model_class(hf_arch)

    class HookedModel(base):  # type: ignore[misc, valid-type]
        model_arch = base.model_arch  # the converter registry requires it on every subclass

        def modify_tensors(self, data_torch, name, bid):
            for new_name, tensor in super().modify_tensors(data_torch, name, bid):
                replacement = None if hook is None else hook(new_name, tensor, bid)  # (lazy: tensor_values)
                if replacement is None:
                    yield new_name, tensor
                    continue
                for name_out, data, qtype in replacement:
                    self.gguf_writer.add_tensor(name_out, data if spill is None else spill.add(data), raw_dtype=qtype)

    HookedModel.__name__ = f"Mcsharp{base.__name__}"
    return HookedModel


@dataclass(frozen=True)
class GgufTensor:
    """One tensor as the converter would write it: numpy-order shape, ggml type name, data bytes."""

    shape: tuple[int, ...]
    type_name: str
    n_bytes: int

    @property
    def n_weights(self) -> int:
        return math.prod(self.shape)


def gguf_inventory(model_dir: str | Path, outtype: str = "f16") -> dict[str, GgufTensor]:
    """GGUF name → :class:`GgufTensor` of every tensor ``convert_checkpoint(model_dir, outtype=outtype)`` writes
    (no hook), from the converter's lazy tensors: shapes and types only, no weight is read (seconds even for a
    large checkpoint). Budgets (presets, --size) are computed from it before any calibration."""
    if outtype not in OUTTYPES:
        raise McsharpError(f"--outtype {outtype} is not one of {', '.join(OUTTYPES)}")
    info = validate_model_dir(model_dir)
    gguf = import_gguf()
    conversion = import_conversion()
    logging.getLogger("hf-to-gguf").setLevel(logging.WARNING)
    import torch

    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode(), _unknown_tensors_named(info):
        model = _model_class(conversion, info.hf_arch, None)(info.path, _ftypes(gguf)[outtype],
                                                            Path(tmp) / "dry.gguf", eager=False)
        model.prepare_tensors()
        return {name: GgufTensor(tuple(int(x) for x in ti.shape), gguf.GGMLQuantizationType(ti.dtype).name,
                                 int(ti.nbytes))
                for shard in model.gguf_writer.tensors for name, ti in shard.items()}


@contextmanager
def _unknown_tensors_named(info):
    """The converter's ValueError for a tensor name its architecture has no mapping for (a damaged header, or
    weights of another architecture under this config), as a one-line error naming it."""
    try:
        yield
    except ValueError as e:
        msg = str(e)
        if not msg.startswith("Can not map tensor"):
            raise
        name = msg.removeprefix("Can not map tensor").strip().strip("'")
        raise McsharpError(f"{info.path}: tensor {name!r} is not one a {info.hf_arch} checkpoint has (a damaged "
                           "shard header, or weights of another architecture); re-download or re-save the checkpoint"
                           ) from None


def _ftypes(gguf) -> dict:
    return {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}


def convert_checkpoint(model_dir: str | Path, out: str | Path, outtype: str = "f16",
                       hook: TensorHook | None = None, extra_kv: Callable[[Any], None] | None = None,
                       verbose: bool = False) -> Path:
    """Convert ``model_dir`` to ``out`` with llama.cpp's converter; tensors pass through ``hook``.

    ``extra_kv(gguf_writer)`` may add metadata. The output appears only when complete.
    """
    if outtype not in OUTTYPES:
        raise McsharpError(f"--outtype {outtype} is not one of {', '.join(OUTTYPES)}")
    info = validate_model_dir(model_dir)
    out = check_output_path(out)
    gguf = import_gguf()
    conversion = import_conversion()
    ftype = _ftypes(gguf)[outtype]
    logging.getLogger("hf-to-gguf").setLevel(logging.INFO if verbose else logging.WARNING)
    spill = TensorSpill(out.parent if str(out.parent) else Path(".")) if hook is not None else None
    cls = _model_class(conversion, info.hf_arch, hook, spill)
    import torch

    try:
        with atomic_output(out) as tmp, torch.inference_mode(), _unknown_tensors_named(info):
            model = cls(info.path, ftype, tmp, eager=False)
            if extra_kv is not None:
                extra_kv(model.gguf_writer)
            model.write()
    except OSError as e:
        if e.errno == errno.ENOSPC and not e.filename:  # the writer's file objects do not name the file
            raise OSError(errno.ENOSPC, e.strerror, str(out)) from None
        raise
    finally:
        if spill is not None:
            spill.close()
    return out
