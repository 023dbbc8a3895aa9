"""HF → GGUF conversion is lossless: llama.cpp logits equal transformers logits on the same token ids."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mcsharp_gguf import runtime
from mcsharp_gguf.tiny_models import load_hf, pick_tokens

REQUIRED = ["qwen2moe", "mixtral", "qwen3moe", "olmoe", "deepseek2", "granitemoe"]


def _hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(ids)[None]).logits[0].float().numpy()


def _top_k(model_dir) -> int:
    cfg = json.loads((model_dir / "config.json").read_text())
    return cfg["num_experts_per_tok"]


@pytest.mark.parametrize("arch", REQUIRED)
def test_f32_logits_match_transformers(arch, tiny_model, tiny_gguf):
    model_dir = tiny_model(arch)
    hf = load_hf(model_dir)
    ids = pick_tokens(hf, _top_k(model_dir))
    ref = _hf_logits(hf, ids)
    got = runtime.logits_for(runtime.load_model(tiny_gguf(arch, "f32"), n_ctx=128), ids)
    err = np.abs(got - ref).max()
    assert err <= 1e-3 * np.abs(ref).max(), f"{arch}: max |Δlogit| {err:.3g} vs max|logit| {np.abs(ref).max():.3g}"
    assert np.array_equal(got.argmax(-1), ref.argmax(-1))


def test_gptoss_logits_close_to_transformers(tiny_model, tiny_gguf):
    """GPT-OSS converts and runs; measured agreement is looser (≈5e-3 relative) than the other archs."""
    model_dir = tiny_model("gptoss")
    hf = load_hf(model_dir)
    ids = pick_tokens(hf, _top_k(model_dir))
    ref = _hf_logits(hf, ids)
    got = runtime.logits_for(runtime.load_model(tiny_gguf("gptoss", "f32"), n_ctx=128), ids)
    assert np.abs(got - ref).max() <= 1e-2 * np.abs(ref).max()
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.98


@pytest.mark.parametrize("arch", ["qwen2moe", "mixtral", "deepseek2"])
def test_f16_argmax_agreement(arch, tiny_model, tiny_gguf):
    model_dir = tiny_model(arch)
    hf = load_hf(model_dir)
    ids = pick_tokens(hf, _top_k(model_dir), n=128)
    ref = _hf_logits(hf, ids)
    got = runtime.logits_for(runtime.load_model(tiny_gguf(arch, "f16"), n_ctx=256), ids)
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.99


@pytest.mark.slow
def test_fixture_parity_f32_and_f16(moe_fixture, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mcsharp_gguf.convert import convert_checkpoint
    from mcsharp_gguf.text import heldout_text

    tok = AutoTokenizer.from_pretrained(moe_fixture)
    ids = np.asarray(tok(heldout_text()[:4000], add_special_tokens=False)["input_ids"][:256])
    hf = AutoModelForCausalLM.from_pretrained(moe_fixture, dtype=torch.float32).eval()
    ref = _hf_logits(hf, ids)
    del hf
    for outtype in ("f32", "f16"):
        out = convert_checkpoint(moe_fixture, tmp_path / f"fixture-{outtype}.gguf", outtype=outtype)
        got = runtime.logits_for(runtime.load_model(out, n_ctx=256), ids)
        out.unlink()
        agree = (got.argmax(-1) == ref.argmax(-1)).mean()
        if outtype == "f32":
            assert np.abs(got - ref).max() <= 1e-3 * np.abs(ref).max()
            assert agree == 1.0
        else:
            assert agree >= 0.99
