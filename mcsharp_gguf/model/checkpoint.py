"""A Hugging Face checkpoint directory on disk: complete and convertible (config, shards, safetensors headers, an
architecture llama.cpp's converter knows, weights that fit the config), and how many weights it holds. Torch and
transformers are imported only to compare the weights with the config."""

from __future__ import annotations

import json
import math
import re
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
    weight_map = {}
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError):
            raise McsharpError(f"{index} is not a safetensors index (no weight_map); re-save the checkpoint") from None
        for shard in sorted(set(weight_map.values())):
            if not (path / shard).is_file():
                raise McsharpError(f"{path / shard} is listed in {index.name} but missing; re-download it")
    shapes: dict[str, list[int]] = {}
    for shard in shards:
        _, header = safetensors_header(shard)
        for k, v in header.items():
            if k != "__metadata__":
                shapes[k] = v["shape"]
                if weight_map and weight_map.get(k, shard.name) != shard.name:
                    raise McsharpError(f"{index} puts {k} in {weight_map[k]}, but {shard.name} holds it; re-save "
                                       "the checkpoint")
    for k, shard in weight_map.items():
        if k not in shapes:
            raise McsharpError(f"{index} lists tensor {k} in {shard}, which does not hold it; re-download or "
                               "re-save the checkpoint")
    conversion = import_conversion()
    hf_arch = archs[0]
    try:
        conversion.get_model_class(hf_arch)
    except NotImplementedError:
        from ..converters import supported_architectures

        raise McsharpError(f"{path}: architecture {hf_arch} is not supported by the pinned llama.cpp converter; "
                           f"supported MoE architectures: {', '.join(supported_architectures())}") from None
    if shapes:
        check_weights_fit_config(path, config, shapes)
    return ModelDirInfo(path=path, hf_arch=hf_arch, config=config)


_EXPERT_RE = re.compile(r"\.layers\.(\d+)\..*?experts\.(\d+)\.")


def moe_counts(config: dict) -> tuple[int | None, int | None]:
    """(routed experts per layer, experts per token) from a config.json dict, under any of the names the
    supported architectures use (None where absent: a dense model, or a config missing them)."""
    text = config.get("text_config", config)
    n_expert = text.get("num_experts") or text.get("num_local_experts") or text.get("n_routed_experts")
    return n_expert, text.get("num_experts_per_tok")


def check_weights_fit_config(path: Path, config: dict, shapes: dict[str, list[int]]) -> None:
    """The weights are those config.json describes: every tensor the transformers skeleton of the config has
    (built on the meta device: no memory) and the checkpoint both name has the shape the config gives it, and
    every MoE layer has the config's number of experts. (Names alone prove little: transformers renames some
    tensors on load, e.g. Mixtral's block_sparse_moe.) A config transformers cannot build is not compared."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        cfg = AutoConfig.from_pretrained(path)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
    except Exception:  # noqa: BLE001 — an architecture transformers has no class for: nothing to compare with
        return
    known = {k: list(v.shape) for k, v in model.state_dict().items()}
    cfg_file = path / "config.json"
    for name, shape in shapes.items():
        if name in known and known[name] != shape:
            raise McsharpError(f"{path}: tensor {name} is {shape} in the weights, {known[name]} by {cfg_file.name} "
                               f"({config['architectures'][0]}); the config does not belong to these weights")
    n_expert, _ = moe_counts(config)
    per_layer: dict[int, set[int]] = {}
    for name in shapes:
        m = _EXPERT_RE.search(name)
        if m and "shared_expert" not in name:
            per_layer.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    for layer, experts in sorted(per_layer.items()):
        if len(experts) != n_expert:
            raise McsharpError(f"{path}: layer {layer} holds {len(experts)} experts, {cfg_file.name} says "
                               f"{n_expert or 'nothing'} (num_experts / num_local_experts / n_routed_experts); "
                               "fix the config")


def model_identity(model_dir: str | Path) -> str:
    """What a plan is made for: a hash of the checkpoint's config and of every tensor's name, dtype and shape
    (not the values: a plan carries over to another checkpoint of the same shapes, but not across shapes)."""
    import hashlib

    h = hashlib.sha256(json.dumps(json.loads((Path(model_dir) / "config.json").read_text()), sort_keys=True)
                       .encode())
    for shard in sorted(Path(model_dir).glob("*.safetensors")):
        _, header = safetensors_header(shard)
        for k in sorted(k for k in header if k != "__metadata__"):
            h.update(f"{k}:{header[k]['dtype']}:{header[k]['shape']};".encode())
    return h.hexdigest()[:16]


def checkpoint_weights(model_dir: str | Path) -> int:
    """Number of weights in a checkpoint's safetensors shards (headers only)."""
    n = 0
    for shard in sorted(Path(model_dir).glob("*.safetensors")):
        _, header = safetensors_header(shard)
        n += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return n
