"""HF → GGUF conversion is lossless: llama.cpp logits equal transformers logits on the same token ids."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mcsharp_gguf.dev.tiny_models import load_hf, pick_tokens
from mcsharp_gguf.runtime import llama

# the patched llama.cpp runtime, the pinned converter and the cached tokenizer
pytestmark = pytest.mark.slow

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
    got = llama.logits_for(llama.load_model(tiny_gguf(arch, "f32"), n_ctx=128), ids)
    err = np.abs(got - ref).max()
    assert err <= 1e-3 * np.abs(ref).max(), f"{arch}: max |Δlogit| {err:.3g} vs max|logit| {np.abs(ref).max():.3g}"
    assert np.array_equal(got.argmax(-1), ref.argmax(-1))


def test_gptoss_logits_close_to_transformers(tiny_model, tiny_gguf):
    """GPT-OSS converts and runs; measured agreement is looser (≈5e-3 relative) than the other archs."""
    model_dir = tiny_model("gptoss")
    hf = load_hf(model_dir)
    ids = pick_tokens(hf, _top_k(model_dir))
    ref = _hf_logits(hf, ids)
    got = llama.logits_for(llama.load_model(tiny_gguf("gptoss", "f32"), n_ctx=128), ids)
    assert np.abs(got - ref).max() <= 1e-2 * np.abs(ref).max()
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.98


@pytest.mark.parametrize("arch", ["qwen2moe", "mixtral", "deepseek2"])
def test_f16_argmax_agreement(arch, tiny_model, tiny_gguf):
    model_dir = tiny_model(arch)
    hf = load_hf(model_dir)
    ids = pick_tokens(hf, _top_k(model_dir), n=128)
    ref = _hf_logits(hf, ids)
    got = llama.logits_for(llama.load_model(tiny_gguf(arch, "f16"), n_ctx=256), ids)
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.99


def test_fixture_parity_f32_and_f16(moe_fixture, tmp_path):
    """The fixture's router is deliberately flat (top-6 gaps down to ~1e-6 over a few hundred tokens), so one
    near-tie lets F32 rounding pick another expert and that token's change spreads through attention. Exact
    F32 parity is therefore checked on short windows whose top-6 gap is ≥ 5e-5 in every layer; F16 is
    checked for argmax agreement over 256 consecutive tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mcsharp_gguf.dev.tiny_models import min_router_margin
    from mcsharp_gguf.gguf.convert import convert_checkpoint
    from mcsharp_gguf.text import heldout_text

    tok = AutoTokenizer.from_pretrained(moe_fixture)
    all_ids = np.asarray(tok(heldout_text()[:12000], add_special_tokens=False)["input_ids"])
    ids = all_ids[:256]
    hf = AutoModelForCausalLM.from_pretrained(moe_fixture, dtype=torch.float32).eval()
    candidates = all_ids[: min(len(all_ids), 1536) // 6 * 6].reshape(-1, 6)
    windows = [w for w, m in zip(candidates, min_router_margin(hf, candidates, 6), strict=True) if m >= 5e-5][:6]
    assert len(windows) >= 4, "too few tie-free windows in the held-out text"
    refs = [_hf_logits(hf, w) for w in windows]
    ref_long = _hf_logits(hf, ids)
    del hf

    out = convert_checkpoint(moe_fixture, tmp_path / "fixture-f32.gguf", outtype="f32")
    llm = llama.load_model(out, n_ctx=256)
    for w, ref in zip(windows, refs, strict=True):
        got = llama.logits_for(llm, w)
        assert np.abs(got - ref).max() <= 1e-3 * np.abs(ref).max()
        assert np.array_equal(got.argmax(-1), ref.argmax(-1))
    assert (llama.logits_for(llm, ids).argmax(-1) == ref_long.argmax(-1)).mean() >= 0.99
    del llm
    out.unlink()

    out = convert_checkpoint(moe_fixture, tmp_path / "fixture-f16.gguf", outtype="f16")
    got = llama.logits_for(llama.load_model(out, n_ctx=256), ids)
    assert (got.argmax(-1) == ref_long.argmax(-1)).mean() >= 0.99
