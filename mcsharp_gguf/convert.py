"""HF checkpoint → GGUF through the pinned llama.cpp ``conversion`` package.

Metadata, tokenizer and tensor naming are llama.cpp's own; we only subclass the architecture's model
class so later stages can substitute packed tensors (``TensorHook``), and we own validation and the
atomic write.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import McsharpError
from .llama_src import import_conversion, import_gguf
from .recipe import OUTTYPES

# A hook sees every tensor the converter is about to write (GGUF name, torch tensor, block id) and may
# return what to write instead: a list of (name, numpy data, ggml type or None) — packed bytes, a split
# into several tensors, or nothing at all; returning None keeps the converter's own handling.
TensorHook = Callable[[str, Any, "int | None"], "list[tuple[str, Any, Any]] | None"]


@dataclass(frozen=True)
class ModelDirInfo:
    """A validated HF checkpoint directory."""

    path: Path
    hf_arch: str
    config: dict


def safetensors_header(path: Path) -> tuple[int, dict]:
    """Refuse a truncated or corrupt safetensors file before the converter trips over it; returns (offset of the
    data, header)."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise McsharpError(f"{path} is truncated ({size} bytes, no header); re-download or re-save it")
        (hlen,) = struct.unpack("<Q", raw)
        if hlen > size - 8:
            raise McsharpError(f"{path} is truncated (header claims {hlen} bytes, file has {size}); re-download it")
        try:
            header = json.loads(fh.read(hlen))
        except (ValueError, UnicodeDecodeError):
            raise McsharpError(f"{path} has a corrupt header; re-download or re-save it") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + hlen + end > size:
        raise McsharpError(f"{path} is truncated ({size} of {8 + hlen + end} bytes); re-download or re-save it")
    return 8 + hlen, header


def validate_model_dir(model_dir: str | Path) -> ModelDirInfo:
    """Check that ``model_dir`` is a complete HF checkpoint of an architecture we can convert."""
    path = Path(model_dir)
    if not path.exists():
        raise McsharpError(f"model directory {path} does not exist; pass a Hugging Face checkpoint directory")
    if not path.is_dir():
        raise McsharpError(f"{path} is a file; pass the checkpoint directory that holds config.json")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise McsharpError(f"{path} is not a model directory (no config.json); pass the folder that holds "
                           "config.json and the *.safetensors weights")
    try:
        config = json.loads(cfg_file.read_text())
    except ValueError:
        raise McsharpError(f"{cfg_file} is not valid JSON; re-save the checkpoint") from None
    archs = config.get("architectures") or []
    if not archs:
        raise McsharpError(f"{cfg_file} names no \"architectures\"; re-save the checkpoint with transformers")
    shards = sorted(path.glob("*.safetensors"))
    if not shards and not list(path.glob("pytorch_model*.bin")):
        raise McsharpError(f"{path} holds no weights (*.safetensors); pass a complete checkpoint")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            if not (path / shard).is_file():
                raise McsharpError(f"{path / shard} is listed in {index.name} but missing; re-download it")
    for shard in shards:
        safetensors_header(shard)
    conversion = import_conversion()
    hf_arch = archs[0]
    try:
        conversion.get_model_class(hf_arch)
    except NotImplementedError:
        from .converters import supported_architectures

        raise McsharpError(f"{path}: architecture {hf_arch} is not supported by the pinned llama.cpp converter; "
                           f"supported MoE architectures: {', '.join(supported_architectures())}") from None
    return ModelDirInfo(path=path, hf_arch=hf_arch, config=config)


_OUT_BITS = {"f32": 32.0, "f16": 16.0, "bf16": 16.0, "q8_0": 8.5}


def checkpoint_weights(model_dir: str | Path) -> int:
    """Number of weights in a checkpoint's safetensors shards (headers only)."""
    n = 0
    for shard in sorted(Path(model_dir).glob("*.safetensors")):
        _, header = safetensors_header(shard)
        n += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return n


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
    at ``outtype`` without a plan, + 2% for metadata), with ``gptq`` the work dir's packed layers (the planned
    weights again) and the importance pass's spilled layer inputs (``spill_bytes``, in ``work_dir``, else in the
    system's temp dir)."""
    n = checkpoint_weights(model_dir)
    bits = _OUT_BITS[outtype] if bpw is None else max(bpw, 1.0) + 0.25  # router, norms stay wide
    wd = Path(work_dir).parent if work_dir is not None else Path(tempfile.gettempdir())
    needs = [(Path(out).parent, int(1.02 * n * bits / 8)),
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


def check_output_path(out: str | Path) -> Path:
    """Fail early (before any work) when ``out`` cannot be written."""
    out = Path(out)
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


@contextmanager
def atomic_output(out: Path) -> Iterator[Path]:
    """Yield a temp path beside ``out``; rename it over ``out`` only if the block succeeds."""
    fd, tmp = tempfile.mkstemp(dir=out.parent if str(out.parent) else ".", prefix=f".{out.name}.", suffix=".part")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; a result file gets normal permissions
        os.replace(tmp_path, out)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _model_class(conversion, hf_arch: str, hook: TensorHook | None):
    base = conversion.get_model_class(hf_arch)
    lazy_type = conversion.LazyTorchTensor

    class HookedModel(base):  # type: ignore[misc, valid-type]
        model_arch = base.model_arch  # the converter registry requires it on every subclass

        def modify_tensors(self, data_torch, name, bid):
            for new_name, tensor in super().modify_tensors(data_torch, name, bid):
                if hook is None:
                    yield new_name, tensor
                    continue
                # The converter's tensors are lazy; a hook computes on real values.
                eager = lazy_type.to_eager(tensor) if isinstance(tensor, lazy_type) else tensor
                replacement = hook(new_name, eager, bid)
                if replacement is None:
                    yield new_name, eager
                    continue
                for name_out, data, qtype in replacement:
                    self.gguf_writer.add_tensor(name_out, data, raw_dtype=qtype)

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

    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        model = _model_class(conversion, info.hf_arch, None)(info.path, _ftypes(gguf)[outtype],
                                                            Path(tmp) / "dry.gguf", eager=False)
        model.prepare_tensors()
        return {name: GgufTensor(tuple(int(x) for x in ti.shape), gguf.GGMLQuantizationType(ti.dtype).name,
                                 int(ti.nbytes))
                for shard in model.gguf_writer.tensors for name, ti in shard.items()}


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
    cls = _model_class(conversion, info.hf_arch, hook)
    import torch

    with atomic_output(out) as tmp, torch.inference_mode():
        model = cls(info.path, ftype, tmp, eager=False)
        if extra_kv is not None:
            extra_kv(model.gguf_writer)
        model.write()
    return out
