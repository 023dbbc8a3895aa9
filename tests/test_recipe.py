"""The Recipe (plain data every entry point builds) and its budget: presets, sizes and bpw turned into bytes from
the tensor list, checked before any calibration."""

from __future__ import annotations

import pytest

from mcsharp_gguf.errors import McsharpError
from mcsharp_gguf.gguf.convert import GgufTensor
from mcsharp_gguf.pmq.budget import Budget, resolve_budget
from mcsharp_gguf.recipe import DEFAULT_PRESET, Recipe, parse_size


def test_recipe_round_trips_and_defaults_are_the_measured_best():
    r = Recipe()
    assert (r.budget_preset, r.mode, r.scope, r.eps_source, r.calib, r.otp) == (DEFAULT_PRESET, "stock", "file",
                                                                                "gptq", "builtin", False)
    assert not r.lossless and Recipe(preset="F16").lossless and Recipe(preset="BF16").lossless_outtype == "bf16"
    r2 = Recipe(bpw=3.5, mode="mixed", scope="global", tensor_types=((r"attn_v", "Q8_0"),), otp=True)
    assert Recipe.from_json(r2.to_json()) == r2
    assert r.max_slowdown == 0.02  # mixed plans held to +2% of the stock plan's kernel time (docs/planner.md)
    r3 = Recipe(bpw=3.5, mode="mixed", max_slowdown=None)
    assert Recipe.from_json(r3.to_json()) == r3 and Recipe.from_json(r3.to_json()).max_slowdown is None
    with pytest.raises(McsharpError, match="recipe version"):
        Recipe.from_json(r2.to_json().replace('"version": 1', '"version": 0'))


@pytest.mark.parametrize(("kw", "needle"), [
    ({"preset": "Q3_K_XL"}, "presets: "), ({"bpw": 3.0, "preset": "Q2_K"}, "give one of"),
    ({"bpw": -1.0}, "--bpw"), ({"mode": "fancy"}, "mode"), ({"otp": True, "otp_target_frac": 1.5}, "(0, 1]"),
    ({"max_slowdown": -0.1}, "--max-slowdown -0.1"),
    ({"dense_types": {"attn": "Q8_0"}}, "whole-file plan"),
    ({"scope": "global", "dense_types": {"attn": "Q9_K"}}, "--attn-type=Q9_K"),
    ({"scope": "global", "tensor_types": (("attn_v", "FP8"),)}, "--tensor-type attn_v=FP8"),
    ({"scope": "global", "preset": "F16", "dense_types": {"attn": "Q8_0"}}, "need a PMQ plan")])
def test_bad_recipes_fail_in_one_line(kw, needle):
    with pytest.raises(McsharpError) as e:
        Recipe(**kw)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_parse_size():
    assert parse_size("12GB") == 12 * 10**9 and parse_size("800 MB") == 800 * 10**6
    assert parse_size("1.5GiB") == int(1.5 * 2**30) and parse_size("123") == 123
    with pytest.raises(McsharpError, match="12GB"):
        parse_size("twelve")


def _inventory(n_layer: int = 4, n_expert: int = 8, d: int = 256, ff: int = 512) -> dict[str, GgufTensor]:
    inv = {"token_embd.weight": GgufTensor((1000, d), "F16", 1000 * d * 2),
           "output.weight": GgufTensor((1000, d), "F16", 1000 * d * 2),
           "output_norm.weight": GgufTensor((d,), "F32", d * 4)}
    for i in range(n_layer):
        for p, shape in (("gate", (n_expert, ff, d)), ("up", (n_expert, ff, d)), ("down", (n_expert, d, ff))):
            inv[f"blk.{i}.ffn_{p}_exps.weight"] = GgufTensor(shape, "F16", 2 * n_expert * ff * d)
        for p in ("q", "k", "v", "output"):
            inv[f"blk.{i}.attn_{p}.weight"] = GgufTensor((d, d), "F16", 2 * d * d)
        inv[f"blk.{i}.ffn_gate_inp.weight"] = GgufTensor((n_expert, d), "F32", 4 * n_expert * d)
        inv[f"blk.{i}.attn_norm.weight"] = GgufTensor((d,), "F32", 4 * d)
    return inv


def test_budgets_in_bytes():
    inv = _inventory()
    fixed = sum(t.n_bytes for n, t in inv.items() if "norm" in n or "gate_inp" in n)
    planned = sum(t.n_weights for n, t in inv.items() if "norm" not in n and "gate_inp" not in n)
    b = resolve_budget(Recipe(bpw=4.0), inv, "qwen2moe")
    assert isinstance(b, Budget) and b.fixed_bytes == fixed and b.planned_weights == planned
    assert b.planned_bytes == 4 * planned // 8 and abs(b.bpw - 4.0) < 1e-6
    size = 3 * 10**6
    b = resolve_budget(Recipe(size_bytes=size), inv, "qwen2moe", header=12_345)
    assert b.planned_bytes + b.fixed_bytes + 12_345 == size
    # the expert-only scope plans the experts alone: everything else is fixed bytes
    b = resolve_budget(Recipe(bpw=4.0, scope="global"), inv, "qwen2moe")
    assert b.planned_weights == sum(t.n_weights for n, t in inv.items() if "_exps" in n)


def test_a_preset_spends_what_llama_quantize_would():
    """The budget of a preset is llama-quantize's tensor bytes for it minus what stays outside the plan."""
    from mcsharp_gguf.pmq.presets import preset_types, tensor_data_bytes

    inv = _inventory()
    types = preset_types({n: (t.shape, t.type_name) for n, t in inv.items()}, "qwen2moe", "Q4_K_M")
    theirs = sum(tensor_data_bytes(t.shape, types[n]) for n, t in inv.items())
    b = resolve_budget(Recipe(preset="Q4_K_M"), inv, "qwen2moe")
    assert b.planned_bytes + b.fixed_bytes == theirs
    assert 4.5 < b.bpw < 6.0 and "Q4_K_M" in b.source


@pytest.mark.parametrize("kw", [{"bpw": 0.5}, {"size_bytes": 10**4}, {"size_bytes": 10**9}, {"bpw": 16.0}])
def test_budget_out_of_reach_names_the_range(kw):
    with pytest.raises(McsharpError) as e:
        resolve_budget(Recipe(**kw), _inventory(), "qwen2moe")
    msg = str(e.value)
    assert "achievable" in msg and "MB" in msg and "\n" not in msg


def test_default_calibration_scales_with_experts_per_token(tmp_path):
    """Without --calib-seqs, the median expert is given 2 × d_model tokens (2 · d · n_expert / top_k), in 8-32
    sequences: the real shapes all hit the cap, the fixture and the tiny models keep 8; given, as given."""
    import json

    from mcsharp_gguf.dev.scale import SHAPES
    from mcsharp_gguf.dev.upcycle import EXPERT_WIDTH, N_EXPERTS, NEW_HIDDEN, TOP_K
    from mcsharp_gguf.model.calibration import MAX_CALIB_SEQS, MIN_CALIB_SEQS, calibration_seqs

    def seqs(cfg: dict, **kw) -> int:
        (tmp_path / "config.json").write_text(json.dumps(cfg))
        return calibration_seqs(Recipe(**kw), tmp_path)

    assert (MIN_CALIB_SEQS, MAX_CALIB_SEQS) == (8, 32)
    for name in SHAPES:  # 2 · 2048 · 128 / 8 = 65,536 tokens for Qwen3-30B-A3B: capped at 32 × 512
        assert seqs(SHAPES[name].config) == MAX_CALIB_SEQS, name
    fixture = {"hidden_size": NEW_HIDDEN, "num_experts": N_EXPERTS, "num_experts_per_tok": TOP_K,
               "moe_intermediate_size": EXPERT_WIDTH}
    assert seqs(fixture) == MIN_CALIB_SEQS  # 2 · 768 · 8 / 6 = 2,048 tokens: 4 sequences, raised to 8
    mid = {"hidden_size": 1024, "num_local_experts": 16, "num_experts_per_tok": 2}  # 16,384 tokens
    assert seqs(mid) == 32 and seqs(mid, calib_len=1024) == 16 and seqs(mid, calib_seqs=3) == 3
    assert seqs({"text_config": {"hidden_size": 64, "n_routed_experts": 64, "num_experts_per_tok": 1}}) == 16
    assert seqs({"hidden_size": 4096}) == MIN_CALIB_SEQS  # no experts: the floor
