"""A Hugging Face checkpoint directory on disk: complete and convertible (config, shards, safetensors headers, an
architecture llama.cpp's converter knows), and how many weights it holds. No torch here."""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import McsharpError
from ..llama_src import import_conversion


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
        from ..converters import supported_architectures

        raise McsharpError(f"{path}: architecture {hf_arch} is not supported by the pinned llama.cpp converter; "
                           f"supported MoE architectures: {', '.join(supported_architectures())}") from None
    return ModelDirInfo(path=path, hf_arch=hf_arch, config=config)


def checkpoint_weights(model_dir: str | Path) -> int:
    """Number of weights in a checkpoint's safetensors shards (headers only)."""
    n = 0
    for shard in sorted(Path(model_dir).glob("*.safetensors")):
        _, header = safetensors_header(shard)
        n += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return n
