"""The embedded MoE fixture: recipe invariants, determinism of its steps, idempotent cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mcsharp_gguf.dev import fixture as fx
from mcsharp_gguf.dev import upcycle as up


def _synthetic_capture(seed: int = 0) -> tuple[up.LayerCapture, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 576, generator=g)
    h = torch.randn(512, 1536, generator=g) * torch.linspace(0.1, 2.0, 1536)
    return up.LayerCapture(x=x, h=h), torch.randn(576, 1536, generator=g) * 0.02


def test_upcycle_layer_is_deterministic_and_balanced():
    cap, wd = _synthetic_capture()
    a, b = up.upcycle_layer(cap, wd, seed=3), up.upcycle_layer(cap, wd, seed=3)
    assert np.array_equal(a.shared, b.shared) and np.array_equal(a.router, b.router)
    assert all(np.array_equal(x, y) for x, y in zip(a.experts, b.experts, strict=True))
    assert [len(e) for e in a.experts] == [up.EXPERT_WIDTH] * up.N_EXPERTS
    used = np.concatenate([a.shared, *a.experts])
    assert len(np.unique(used)) == up.N_SHARED + up.N_EXPERTS * up.EXPERT_WIDTH  # disjoint
    # The shared expert takes the most active neurons.
    act = cap.h.abs().mean(0).numpy()
    assert act[a.shared].min() >= act[np.concatenate(a.experts)].max()
    logits = cap.x.double() @ torch.from_numpy(a.router).double().T
    assert abs(float((logits - logits.mean(1, keepdim=True)).std()) - up.ROUTER_LOGIT_STD) < 1e-6


def test_balanced_kmeans_recovers_planted_clusters():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 32))
    labels = np.repeat(np.arange(4), 16)
    pts = centers[labels] + 0.05 * rng.normal(size=(64, 32))
    got = up.balanced_kmeans(pts, 4, seed=1)
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


def _synthetic_mlp(seed: int = 0, d: int = 576, ff: int = 1536):
    """A dense SwiGLU FFN with SmolLM2's widths, as the attributes train_layer reads."""
    from types import SimpleNamespace

    g = torch.Generator().manual_seed(seed)
    lin = [SimpleNamespace(weight=torch.randn(*shape, generator=g) / shape[1] ** 0.5)
           for shape in ((ff, d), (ff, d), (d, ff))]
    return SimpleNamespace(gate_proj=lin[0], up_proj=lin[1], down_proj=lin[2])


def _routed_output(x: torch.Tensor, router: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """An independent top-k softmax mixture of SwiGLU experts (gate rows before up rows, no renormalisation)."""
    w, idx = torch.softmax(x @ router.T, dim=1).topk(up.TOP_K, dim=1)
    gate, upp = gate_up.split(gate_up.shape[1] // 2, dim=1)  # (n_e, width, d) each
    out = torch.zeros_like(x)
    for j in range(router.shape[0]):
        sel = (idx == j).any(1)
        wj = (w * (idx == j)).sum(1)[sel, None]
        xe = x[sel]
        out[sel] += wj * ((torch.nn.functional.silu(xe @ gate[j].T) * (xe @ upp[j].T)) @ down[j].T)
    return out


def test_train_layer_is_deterministic_and_fits_its_training_tokens():
    from mcsharp_gguf.dev.specialised import HOLDOUT, train_layer

    mlp = _synthetic_mlp()
    x = torch.randn(4096, 576, generator=torch.Generator().manual_seed(1))
    h = torch.nn.functional.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)
    cap = up.LayerCapture(x=x, h=h)
    a, b = (train_layer(cap, mlp, seed=0, epochs=8, lr=1e-3) for _ in range(2))
    for name in ("router", "gate_up", "down"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    # the initialisation is the sliced layer's own: same neurons, same router and experts before training
    sliced = up.upcycle_layer(cap, mlp.down_proj.weight, seed=0)
    assert np.array_equal(a.plan.shared, sliced.shared) and np.array_equal(a.plan.router, sliced.router)
    assert all(np.array_equal(p, q) for p, q in zip(a.plan.experts, sliced.experts, strict=True))
    wg, wu, wd = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    init = (torch.from_numpy(sliced.router), torch.stack([torch.cat([wg[e], wu[e]]) for e in sliced.experts]),
            torch.stack([wd[:, e] * up.ROUTED_DOWN_SCALE for e in sliced.experts]))
    s = torch.as_tensor(sliced.shared)
    target = h @ wd.T - h[:, s] @ wd[:, s].T  # the dense output less the shared neurons' exact part
    n_train = int(x.shape[0] * (1 - HOLDOUT))

    def err(weights, rows: slice) -> float:
        return float((_routed_output(x[rows], *weights) - target[rows]).norm() / (h[rows] @ wd.T).norm())

    trained = (a.router, a.gate_up, a.down)
    assert err(init, slice(n_train, None)) == pytest.approx(a.init_error, rel=1e-4)
    assert err(trained, slice(n_train, None)) == pytest.approx(a.error, rel=1e-4)
    # the optimiser lowers its objective on the tokens it trained on (a random FFN has little to generalise)
    assert err(trained, slice(0, n_train)) < 0.97 * err(init, slice(0, n_train))


def _tiny_smollm2(n_layer: int = 2):
    """A random dense Llama of SmolLM2's widths (the fixture recipes' geometry) with a small vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=576, intermediate_size=1536, num_hidden_layers=n_layer,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=256,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def test_capture_layers_streams_what_the_whole_model_forward_sees():
    from mcsharp_gguf.dev.specialised import capture_layers

    dense = _tiny_smollm2()
    ids = torch.randint(0, 128, (3, 64), generator=torch.Generator().manual_seed(2))
    whole = up.capture_ffn_activations(dense, ids)
    streamed = list(capture_layers(dense, ids))
    assert len(streamed) == len(whole) == 2
    for a, b in zip(streamed, whole, strict=True):
        torch.testing.assert_close(a.x, b.x, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.h, b.h, rtol=1e-5, atol=1e-5)


def test_specialised_model_runs_the_trained_layers_in_transformers():
    """The assembled Qwen2-MoE block's routed output is the trained layer's, as _routed_output computes it."""
    from mcsharp_gguf.dev.specialised import capture_layers, specialised_model, train_layer

    dense = _tiny_smollm2(n_layer=1)
    ids = torch.randint(0, 128, (9, 512), generator=torch.Generator().manual_seed(3))
    for cap in capture_layers(dense, ids):  # trained while the generator is alive, as the fixture build does
        layer = train_layer(cap, dense.model.layers[0].mlp, seed=0, epochs=1)
    moe = specialised_model(dense, [layer])
    block = moe.model.layers[0].mlp
    x = cap.x[:256]
    xp = torch.nn.functional.pad(x, (0, up.NEW_HIDDEN - x.shape[1]))
    with torch.no_grad():
        out = block(xp[None])
        out = (out[0] if isinstance(out, tuple) else out)[0]
        shared = torch.sigmoid(block.shared_expert_gate(xp)) * block.shared_expert(xp)
        ref = _routed_output(x, layer.router, layer.gate_up, layer.down)
    torch.testing.assert_close((out - shared)[:, :x.shape[1]], ref, rtol=1e-4, atol=1e-5)
    assert (out - shared)[:, x.shape[1]:].abs().max() == 0  # the widened residual's padding stays zero


def test_build_fixture_reuses_only_a_stamp_of_the_same_kind_and_version(tmp_path, monkeypatch):
    """A complete fixture is reused without loading anything; a stamp without a kind is a sliced one (written
    before there were kinds); another kind or version is rebuilt; an unknown kind is refused before any work."""
    from mcsharp_gguf.errors import McsharpError

    class Rebuilt(Exception):
        pass

    def load_dense():
        raise Rebuilt

    monkeypatch.setattr(fx.upcycle, "load_dense_smollm2", load_dense)

    quiet = []
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / fx.STAMP).write_text(json.dumps({"version": fx.FIXTURE_VERSION}))
    assert fx.build_fixture(legacy, log=quiet.append) == legacy
    spec = tmp_path / "spec"
    spec.mkdir()
    (spec / fx.STAMP).write_text(json.dumps({"kind": "specialised", "version": fx.FIXTURE_KINDS["specialised"]}))
    assert fx.build_fixture(spec, kind="specialised", log=quiet.append) == spec
    assert quiet == [f"[fixture] {legacy} is up to date", f"[fixture] {spec} is up to date"]
    with pytest.raises(Rebuilt):
        fx.build_fixture(legacy, kind="specialised", log=quiet.append)
    (spec / fx.STAMP).write_text(json.dumps({"kind": "specialised", "version": "0"}))
    with pytest.raises(Rebuilt):
        fx.build_fixture(spec, kind="specialised", log=quiet.append)
    with pytest.raises(McsharpError, match="unknown fixture kind 'bogus'; pass one of sliced, specialised"):
        fx.build_fixture(tmp_path / "new", kind="bogus")
    other = tmp_path / "other"
    other.mkdir()
    (other / "weights.bin").write_bytes(b"x")
    with pytest.raises(McsharpError, match="not a fixture directory"):
        fx.build_fixture(other, kind="specialised")
