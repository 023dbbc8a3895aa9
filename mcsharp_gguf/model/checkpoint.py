"""A Hugging Face checkpoint directory on disk: complete and convertible (config, shards, safetensors headers, an
architecture llama.cpp's converter knows, weights that fit the config), and how many weights it holds. Torch and
transformers are imported only to compare the weights with the config."""

from __future__ import annotations

import functools
import json
import logging
import math
import re
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import McsharpError
from ..llama_src import import_conversion, import_gguf


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
    _check_safetensors_entries(path, header)
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + hlen + end > size:
        raise McsharpError(f"{path} is truncated ({size} of {8 + hlen + end} bytes); re-download or re-save it")
    return 8 + hlen, header


_ST_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
             "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


def _check_safetensors_entries(path: Path, header) -> None:
    """Each tensor entry of a safetensors header is well formed: a known dtype, a shape of whole numbers and
    data offsets that hold exactly that many bytes (a damaged header, one line naming the file and tensor)."""
    def bad(what: str) -> McsharpError:
        return McsharpError(f"{path} has a corrupt header ({what}); re-download or re-save it")

    if not isinstance(header, dict):
        raise bad("not a JSON object")
    for name, v in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(v, dict) or not {"dtype", "shape", "data_offsets"} <= v.keys():
            raise bad(f"tensor {name} lacks dtype / shape / data_offsets")
        shape, offs = v["shape"], v["data_offsets"]
        if v["dtype"] not in _ST_BYTES:
            raise bad(f"tensor {name} has dtype {v['dtype']!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise bad(f"tensor {name} has shape {shape!r}")
        if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) and not isinstance(o, bool)
                                                                  for o in offs) and 0 <= offs[0] <= offs[1]):
            raise bad(f"tensor {name} has data offsets {offs!r}")
        if offs[1] - offs[0] != math.prod(shape) * _ST_BYTES[v["dtype"]]:
            raise bad(f"tensor {name}: {offs[1] - offs[0]} bytes for shape {shape} of {v['dtype']}")


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
    if not isinstance(config, dict):
        raise McsharpError(f"{cfg_file} is not a JSON object; re-save the checkpoint with transformers")
    archs = config.get("architectures") or []
    if not archs:
        raise McsharpError(f"{cfg_file} names no \"architectures\"; re-save the checkpoint with transformers")
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise McsharpError(f"{cfg_file}: \"architectures\" is {json.dumps(archs)}, expected a list of class names "
                           "(e.g. [\"Qwen3MoeForCausalLM\"]); fix the config")
    if not isinstance(config.get("model_type", ""), str):
        raise McsharpError(f"{cfg_file}: \"model_type\" is {json.dumps(config['model_type'])}, expected a name; "
                           "fix the config")
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
    check_config_numbers(config, cfg_file)
    if shapes:
        check_weights_fit_config(path, config, shapes)
    _check_tokenizer(path.resolve(), hf_arch, _tokenizer_stamp(path))
    return ModelDirInfo(path=path, hf_arch=hf_arch, config=config)


def _tokenizer_stamp(path: Path) -> tuple:
    """What the tokenizer check depends on: every non-weight file's name, size and mtime (a changed file
    invalidates the cached verdict)."""
    return tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir()
                        if p.is_file() and p.suffix != ".safetensors"))


@functools.lru_cache(maxsize=16)
def _check_tokenizer(path: Path, hf_arch: str, stamp: tuple) -> None:
    """The pinned converter can write this checkpoint's vocabulary (its ``set_vocab`` into a throwaway writer,
    well under a second): a missing, damaged or unrecognised tokenizer fails here, before any calibration or
    quantisation, instead of at the GGUF write hours later. Cached per directory state (``stamp``)."""
    conversion = import_conversion()
    log = logging.getLogger("hf-to-gguf")
    level = log.level
    log.setLevel(logging.ERROR)  # its banner for an unknown pre-tokenizer: the one line below says it
    try:
        with tempfile.TemporaryDirectory() as tmp:
            model = conversion.get_model_class(hf_arch)(path, import_gguf().LlamaFileType.ALL_F32,
                                                        Path(tmp) / "vocab.gguf", eager=False)
            model.set_vocab()
    except Exception as e:  # noqa: BLE001 — the converter's tokenizer code raises many kinds
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        if "pre-tokenizer was not recognized" in reason:
            reason = "its BPE pre-tokenizer is not one the pinned llama.cpp knows"
        raise McsharpError(f"{path}: llama.cpp's converter cannot write this checkpoint's tokenizer ({reason}); "
                           "copy the tokenizer files (tokenizer.json, tokenizer_config.json, and vocab/merges or "
                           "tokenizer.model where the model has them) from the model's original repository") \
            from None
    finally:
        log.setLevel(level)


def nonfinite_tensors(model_dir: str | Path, chunk_bytes: int = 1 << 26) -> list[tuple[Path, str, int]]:
    """(shard, tensor, count) of every floating-point tensor holding NaN or ±Inf, read in ``chunk_bytes`` pieces
    (never a whole tensor in memory): a value with every exponent bit set is NaN or Inf in each format."""
    import numpy as np

    masks = {"BF16": (np.uint16, 0x7F80), "F16": (np.uint16, 0x7C00), "F32": (np.uint32, 0x7F800000),
             "F64": (np.uint64, 0x7FF0000000000000)}
    found = []
    for shard in sorted(Path(model_dir).glob("*.safetensors")):
        start, header = safetensors_header(shard)
        with open(shard, "rb") as fh:
            for name, v in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0] if kv[0] != "__metadata__"
                                  else -1):
                if name == "__metadata__" or v["dtype"] not in masks:
                    continue
                dtype, mask = masks[v["dtype"]]
                item = np.dtype(dtype).itemsize
                a, b = v["data_offsets"]
                fh.seek(start + a)
                bad, left = 0, b - a
                while left:
                    buf = fh.read(min(left, chunk_bytes // item * item))
                    if not buf:
                        raise McsharpError(f"{shard} is truncated inside tensor {name}; re-download or re-save it")
                    x = np.frombuffer(buf, dtype=dtype)
                    bad += int(np.count_nonzero((x & dtype(mask)) == dtype(mask)))
                    left -= len(buf)
                if bad:
                    found.append((shard, name, bad))
    return found


def check_finite_weights(model_dir: str | Path, lossless: bool, allow: bool = False, log=print) -> None:
    """Refuse NaN/Inf weights before any work, naming the tensor: nothing computed from them would mean anything.
    ``allow`` (``--allow-nonfinite``) lets a lossless conversion copy them as they are, with a warning."""
    bad = nonfinite_tensors(model_dir)
    if not bad:
        return
    shard, name, count = bad[0]
    more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
    if allow and lossless:
        log(f"[warning] {shard}: tensor {name} holds {count} NaN/Inf values{more}; copied as they are "
            "(--allow-nonfinite): the model's outputs may be NaN")
        return
    fix = ("fix or re-save the checkpoint, or pass --allow-nonfinite to copy them as they are" if lossless else
           "fix or re-save the checkpoint (a compressed conversion needs finite weights; --preset F16/BF16 "
           "--allow-nonfinite copies them as they are)")
    raise McsharpError(f"{shard}: tensor {name} holds {count} NaN/Inf values{more}; {fix}")


# config.json sizes a conversion reads: whole numbers > 0 where present (the first two always)
_REQUIRED_SIZES = ("hidden_size", "num_hidden_layers")
_SIZES = _REQUIRED_SIZES + (
    "intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size", "num_attention_heads",
    "num_key_value_heads", "head_dim", "vocab_size", "num_experts", "num_local_experts", "n_routed_experts",
    "num_experts_per_tok", "moe_top_k", "n_shared_experts", "max_position_embeddings")
_NULLABLE = ("head_dim", "max_position_embeddings", "shared_expert_intermediate_size", "n_shared_experts",
             "intermediate_size")
_POSITIVE_REALS = ("rms_norm_eps", "layer_norm_eps", "rope_theta")


def check_config_numbers(config: dict, cfg_file: Path) -> None:
    """The sizes and constants of config.json (its text_config for a multimodal one) have the types and ranges
    a model needs, before anything computes with them: one line naming the key otherwise."""
    cfg = config.get("text_config", config)
    if not isinstance(cfg, dict):
        raise McsharpError(f"{cfg_file}: text_config is not an object; re-save the checkpoint with transformers")
    for key in _SIZES:
        if key not in cfg:
            if key in _REQUIRED_SIZES:
                raise McsharpError(f"{cfg_file} has no {key}; re-save the checkpoint with transformers")
            continue
        v = cfg[key]
        if key in _NULLABLE and v is None:
            continue  # (transformers writes null for an unused size)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise McsharpError(f"{cfg_file}: {key} is {json.dumps(v)}, expected a whole number > 0; fix the config "
                               "or re-save the checkpoint")
    for key in _POSITIVE_REALS:
        v = cfg.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                              or v <= 0):
            raise McsharpError(f"{cfg_file}: {key} is {json.dumps(v)}, expected a number > 0; fix the config")


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
    except Exception as e:  # noqa: BLE001 — transformers validates fields with several error types
        if isinstance(e, (KeyError, ValueError)) and ("model_type" in str(e) or "Unrecognized" in str(e)):
            return  # an architecture transformers has no class for: nothing to compare with
        raise McsharpError(f"{path / 'config.json'} is not a config transformers can read ({type(e).__name__}: "
                           f"{(str(e).strip().splitlines() or [''])[0][:200]}); fix it or re-save the checkpoint") \
            from None
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
    except Exception:  # noqa: BLE001 — a config transformers has no model class for: nothing to compare with
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
