"""Random-weight checkpoints with the exact layer shapes of real MoE models, written shard by shard.

Real sizes cannot be downloaded here (no model hub), but time and memory do not depend on the weights' values:
a checkpoint with Qwen3-30B-A3B's layer shapes at a chosen depth measures a conversion honestly. Each decoder
layer is one bf16 safetensors shard, generated and written on its own, so writing a 48-layer model never holds
more than one layer. The vocabulary is the SmolLM2 tokenizer's (49,152 tokens) so llama.cpp's converter and our
calibration get a real tokenizer; embedding and head are sized to it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..converters import get_architecture
from ..errors import McsharpError
from .tiny_models import tokenizer_dir


@dataclass(frozen=True)
class RealShape:
    """One real model's layer shapes: its transformers config class and the config values that set them."""

    name: str
    config_class: str
    hf_arch: str
    n_layer: int  # the real model's depth (for extrapolation)
    config: dict
    # depths at which llama.cpp loads a checkpoint of this shape (None: any): its deepseek2 loader tells
    # DeepSeek-V2-Lite (no query LoRA) from DeepSeek-V2 by the layer count alone (26 or 27 layers,
    # src/models/deepseek2.cpp), so a few of V2-Lite's layers read as V2 and fail for want of q_lora_rank
    llama_cpp_depths: tuple[int, ...] | None = None

    def llama_cpp_loads(self, n_layer: int) -> bool:
        """Whether llama.cpp loads a checkpoint of this shape with ``n_layer`` decoder layers."""
        return self.llama_cpp_depths is None or n_layer in self.llama_cpp_depths


SHAPES: dict[str, RealShape] = {s.name: s for s in (
    RealShape("qwen3-30b-a3b", "Qwen3MoeConfig", "Qwen3MoeForCausalLM", 48, dict(
        hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
        num_experts_per_tok=8, num_attention_heads=32, num_key_value_heads=4, head_dim=128, rms_norm_eps=1e-6,
        rope_theta=1e6, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])),
    RealShape("mixtral-8x7b", "MixtralConfig", "MixtralForCausalLM", 32, dict(
        hidden_size=4096, intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2,
        num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=1e6)),
    RealShape("deepseek-v2-lite", "DeepseekV2Config", "DeepseekV2ForCausalLM", 27, dict(
        hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408, n_routed_experts=64,
        n_shared_experts=2, num_experts_per_tok=6, num_attention_heads=16, num_key_value_heads=16,
        kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
        first_k_dense_replace=1, topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0,
        norm_topk_prob=False, rms_norm_eps=1e-6), llama_cpp_depths=(26, 27)),
    RealShape("olmoe-1b-7b", "OlmoeConfig", "OlmoeForCausalLM", 16, dict(
        hidden_size=2048, intermediate_size=1024, num_experts=64, num_experts_per_tok=8, num_attention_heads=16,
        num_key_value_heads=16, rms_norm_eps=1e-5, norm_topk_prob=False)),
)}


def real_shape(name: str) -> RealShape:
    """The shape called ``name`` (error listing the known ones)."""
    if name not in SHAPES:
        raise McsharpError(f"unknown shape {name!r}; known: {', '.join(SHAPES)}")
    return SHAPES[name]


def _config(shape: RealShape, n_layer: int, vocab: int):
    import transformers

    cfg = getattr(transformers, shape.config_class)(
        **shape.config, num_hidden_layers=n_layer, vocab_size=vocab, max_position_embeddings=4096,
        tie_word_embeddings=False)
    cfg.architectures = [shape.hf_arch]
    return cfg


def _checkpoint_names(arch, local: str, n_expert: int, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
    """The checkpoint tensors behind one transformers (v5) parameter of a decoder layer (inverse of the adapter's
    layer_state_dict): fused experts unfused into one 2-D weight per expert and projection."""
    block = f"{arch.moe_block}."
    ck = arch.checkpoint_moe_block + "." + local[len(block):] if local.startswith(block) else local
    g, u, d = arch.checkpoint_expert_names
    base = f"{arch.checkpoint_moe_block}.experts"
    if local == f"{arch.moe_block}.experts.gate_up_proj":
        ff = shape[1] // 2
        return [(f"{base}.{e}.{p}.weight", (ff, shape[2])) for e in range(n_expert) for p in (g, u)]
    if local == f"{arch.moe_block}.experts.down_proj":
        return [(f"{base}.{e}.{d}.weight", tuple(shape[1:])) for e in range(n_expert)]
    return [(ck, shape)]


def _init(name: str, shape: tuple[int, ...], gen: torch.Generator, n_expert: int) -> torch.Tensor:
    """A random bf16 tensor: norms near 1, routers with well-spread logits, other weights ~ N(0, 1/fan_in)."""
    if len(shape) == 1:
        return (1.0 + 0.1 * torch.randn(shape, generator=gen)).to(torch.bfloat16) if "norm" in name else \
            (0.02 * torch.randn(shape, generator=gen)).to(torch.bfloat16)
    std = shape[-1] ** -0.5 * (4.0 if shape[0] == n_expert and ".gate." in name or ".router." in name else 1.0)
    return (std * torch.randn(shape, generator=gen)).to(torch.bfloat16)


def write_real_shape_checkpoint(shape_name: str, out_dir: str | Path, n_layer: int, seed: int = 0,
                                log=lambda *_: None) -> Path:
    """Write a random-weight checkpoint of ``shape_name`` with ``n_layer`` decoder layers to ``out_dir`` (bf16
    safetensors, one shard per decoder layer + one for embedding / final norm / head, an index, the SmolLM2
    tokenizer). Deterministic for ``seed``; at most one layer is in memory; the directory appears only when
    complete. An existing complete ``out_dir`` is returned as is."""
    import transformers
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if (out_dir / "model.safetensors.index.json").exists():
        return out_dir
    shape = real_shape(shape_name)
    arch = get_architecture(shape.hf_arch)
    tok_dir = tokenizer_dir()
    vocab = len(json.loads((tok_dir / "tokenizer.json").read_text())["model"]["vocab"])
    cfg = _config(shape, n_layer, vocab)
    with torch.device("meta"):
        skeleton = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    n_expert = int(getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None)
                   or cfg.n_routed_experts)
    shards = [f"model-{i + 1:05d}-of-{n_layer + 1:05d}.safetensors" for i in range(n_layer + 1)]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-"))
    weight_map: dict[str, str] = {}
    total = 0
    try:
        for i in range(n_layer):
            gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
            params = {k: tuple(v.shape) for k, v in skeleton.model.layers[i].state_dict().items()}
            tensors = {}
            for local, shp in params.items():
                for name, s in _checkpoint_names(arch, local, n_expert, shp):
                    full = f"model.layers.{i}.{name}"
                    tensors[full] = _init(full, s, gen, n_expert)
            save_file(tensors, str(tmp / shards[i]), metadata={"format": "pt"})
            total += sum(t.numel() * 2 for t in tensors.values())
            weight_map.update(dict.fromkeys(tensors, shards[i]))
            log(f"[scale] {shape_name}: layer {i + 1}/{n_layer} written ({total / 1e9:.2f} GB so far)")
            del tensors
        gen = torch.Generator().manual_seed(seed * 1_000_003 + n_layer)
        d = cfg.hidden_size
        last = {"model.embed_tokens.weight": (0.02 * torch.randn(vocab, d, generator=gen)).to(torch.bfloat16),
                "model.norm.weight": (1.0 + 0.1 * torch.randn(d, generator=gen)).to(torch.bfloat16),
                "lm_head.weight": (d ** -0.5 * torch.randn(vocab, d, generator=gen)).to(torch.bfloat16)}
        save_file(last, str(tmp / shards[n_layer]), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in last.values())
        weight_map.update(dict.fromkeys(last, shards[n_layer]))
        cfg.to_json_file(str(tmp / "config.json"))
        for f in tok_dir.iterdir():
            shutil.copy2(f, tmp / f.name)
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=1))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def layer_bytes_bf16(model_dir: str | Path, layer: int = 0) -> int:
    """Bytes of decoder layer ``layer``'s weights in bf16 (from the safetensors headers; nothing is loaded)."""
    from safetensors import safe_open

    prefix = f"model.layers.{layer}."
    n = 0
    for shard in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(shard), "pt") as h:
            for k in h.keys():
                if k.startswith(prefix):
                    n += 2 * math.prod(h.get_slice(k).get_shape())
    return n
