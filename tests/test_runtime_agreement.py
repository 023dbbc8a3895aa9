"""Packed tensors of every type, run by llama.cpp, give the logits of torch with the dequantised weights.

Two views: the token embedding stored in type T is decoded by ``get_rows`` without touching the activations,
so llama.cpp must reproduce torch to float precision; linears stored in type T go through llama.cpp's CPU
matmuls, which quantise the *activations* to Q8_0/Q8_K first (stock behaviour), so there the agreement is
bounded by that rounding (measured 0.4–1.5% per tensor on these random models), not by our packing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mcsharp_gguf.dev.tiny_models import load_hf, pick_tokens
from mcsharp_gguf.ggml.packing import quantize_rtn
from mcsharp_gguf.ggml.types import QUANT_TYPES, ggml_type
from mcsharp_gguf.gguf.convert import convert_checkpoint, tensor_values
from mcsharp_gguf.runtime import llama

# the patched llama.cpp runtime, the pinned converter and the cached tokenizer
pytestmark = pytest.mark.slow

# GGUF name suffix → how to write the dequantised weight back into the transformers qwen2moe layer.
_ATTN = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
         "attn_output": "self_attn.o_proj"}


def _quantising_hook(type_name: str, dequant: dict):
    def hook(name: str, tensor, bid):
        parts = name.split(".")
        if bid is None or parts[-1] != "weight" or (parts[2] not in _ATTN and not parts[2].endswith("_exps")):
            return None
        w = tensor_values(tensor).float()
        mats = w if w.dim() == 3 else w[None]
        results = [quantize_rtn(m, type_name) for m in mats]
        packed = np.stack([r.packed for r in results])
        deq = torch.stack([r.dequant for r in results])
        dequant[(bid, parts[2])] = deq if w.dim() == 3 else deq[0]
        return [(name, packed if w.dim() == 3 else packed[0], ggml_type(type_name))]

    return hook


def _load_dequantised(hf, dequant: dict) -> None:
    with torch.no_grad():
        for (bid, kind), w in dequant.items():
            layer = hf.model.layers[bid]
            if kind in _ATTN:
                layer.get_submodule(_ATTN[kind]).weight.copy_(w)
            elif kind == "ffn_down_exps":
                layer.mlp.experts.down_proj.copy_(w)
            else:
                ff = w.shape[1]
                half = slice(0, ff) if kind == "ffn_gate_exps" else slice(ff, 2 * ff)
                layer.mlp.experts.gate_up_proj[:, half, :].copy_(w)


@pytest.mark.parametrize("type_name", QUANT_TYPES)
def test_llama_cpp_decodes_packed_embedding_exactly(type_name, tiny_model, tmp_path):
    """Same file twice: embedding packed in type T vs our dequantised values stored as F32. llama.cpp's
    decode of our bytes must give bit-identical logits (F32-file vs transformers parity is test_convert_parity's)."""
    model_dir = tiny_model("qwen2moe", hidden=256, expert_ff=256)

    def hook(as_f32: bool):
        def fn(name, tensor, bid):
            if name != "token_embd.weight":
                return None
            res = quantize_rtn(tensor_values(tensor).float(), type_name)
            if as_f32:
                return [(name, res.dequant.numpy(), None)]
            return [(name, res.packed, ggml_type(type_name))]
        return fn

    packed = convert_checkpoint(model_dir, tmp_path / f"embd-{type_name}.gguf", outtype="f32", hook=hook(False))
    plain = convert_checkpoint(model_dir, tmp_path / "embd-f32.gguf", outtype="f32", hook=hook(True))
    ids = np.random.default_rng(0).integers(0, 49152, 32)
    got = llama.logits_for(llama.load_model(packed, n_ctx=64), ids)
    same = llama.logits_for(llama.load_model(plain, n_ctx=64), ids)
    assert np.array_equal(got, same), f"{type_name}: llama.cpp decodes our packed bytes differently"


@pytest.mark.parametrize("type_name", QUANT_TYPES)
def test_llama_cpp_runs_packed_linears_like_torch(type_name, tiny_model, tmp_path):
    model_dir = tiny_model("qwen2moe", hidden=256, expert_ff=256)
    dequant: dict = {}
    out = convert_checkpoint(model_dir, tmp_path / f"{type_name}.gguf", outtype="f32",
                             hook=_quantising_hook(type_name, dequant))
    assert len(dequant) == 2 * (4 + 3)
    hf = load_hf(model_dir)
    _load_dequantised(hf, dequant)
    ids = pick_tokens(hf, 2, n=48)
    with torch.no_grad():
        ref = hf(torch.as_tensor(ids)[None]).logits[0].numpy()
    got = llama.logits_for(llama.load_model(out, n_ctx=64), ids)
    per_token = np.abs(got - ref).max(-1) / np.abs(ref).max()
    # Activation rounding in llama.cpp's kernels (see module doc) bounds this, not the packing.
    assert np.median(per_token) <= 5e-2, f"{type_name}: median per-token rel error {np.median(per_token):.3g}"
