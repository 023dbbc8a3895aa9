"""The embedded MoE fixture: recipe invariants, determinism of its steps, idempotent cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mcsharp_gguf.dev import fixture as fx


def _synthetic_capture(seed: int = 0) -> tuple[fx.LayerCapture, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 576, generator=g)
    h = torch.randn(512, 1536, generator=g) * torch.linspace(0.1, 2.0, 1536)
    return fx.LayerCapture(x=x, h=h), torch.randn(576, 1536, generator=g) * 0.02


def test_upcycle_layer_is_deterministic_and_balanced():
    cap, wd = _synthetic_capture()
    a, b = fx.upcycle_layer(cap, wd, seed=3), fx.upcycle_layer(cap, wd, seed=3)
    assert np.array_equal(a.shared, b.shared) and np.array_equal(a.router, b.router)
    assert all(np.array_equal(x, y) for x, y in zip(a.experts, b.experts, strict=True))
    assert [len(e) for e in a.experts] == [fx.EXPERT_WIDTH] * fx.N_EXPERTS
    used = np.concatenate([a.shared, *a.experts])
    assert len(np.unique(used)) == fx.N_SHARED + fx.N_EXPERTS * fx.EXPERT_WIDTH  # disjoint
    # The shared expert takes the most active neurons.
    act = cap.h.abs().mean(0).numpy()
    assert act[a.shared].min() >= act[np.concatenate(a.experts)].max()
    logits = cap.x.double() @ torch.from_numpy(a.router).double().T
    assert abs(float((logits - logits.mean(1, keepdim=True)).std()) - fx.ROUTER_LOGIT_STD) < 1e-6


def test_balanced_kmeans_recovers_planted_clusters():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 32))
    labels = np.repeat(np.arange(4), 16)
    pts = centers[labels] + 0.05 * rng.normal(size=(64, 32))
    got = fx.balanced_kmeans(pts, 4, seed=1)
    assert np.bincount(got).tolist() == [16] * 4
    for c in range(4):  # each planted cluster maps to exactly one found cluster
        assert len(set(got[labels == c])) == 1


@pytest.mark.slow
def test_fixture_structure_and_idempotence(moe_fixture):
    from safetensors import safe_open

    cfg = json.loads((moe_fixture / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2MoeForCausalLM"]
    assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (768, 12, 4)
    assert (cfg["num_experts"], cfg["num_experts_per_tok"], cfg["moe_intermediate_size"]) == (8, 6, 128)
    assert cfg["shared_expert_intermediate_size"] == 512 and cfg["tie_word_embeddings"] is False
    with safe_open(str(moe_fixture / "model.safetensors"), "pt") as f:
        q = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
        assert q[576:].abs().max() == 0 and q[:, 576:].abs().max() == 0  # zero heads, zero padding
        gate = f.get_tensor("model.layers.0.mlp.shared_expert_gate.weight")
        assert 0 < gate.abs().max() < 1e-3
        assert f.get_tensor("model.embed_tokens.weight")[:, 576:].abs().max() == 0
    stamp = moe_fixture / "mcsharp-fixture.json"
    mtime = stamp.stat().st_mtime_ns
    assert fx.build_fixture(moe_fixture, log=lambda *_: None) == moe_fixture  # cached: no rebuild
    assert stamp.stat().st_mtime_ns == mtime
