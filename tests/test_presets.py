"""mcsharp_gguf.pmq.presets: llama-quantize's per-tensor type choice, from names and shapes.

Fast tests check rules read in the pinned src/llama-quant.cpp on synthetic inventories with real models' shapes
(names and shapes as llama.cpp's converter writes them). The slow tests run the real llama-quantize: on the
embedded fixture (qwen2moe, 8 experts, 30 layers) for real and with --dry-run for every preset, and with --dry-run
on "hollow" GGUFs (real metadata and tensor table, sparse zero data) of full-depth real shapes.
"""

from __future__ import annotations

import math
import os
import random
import re
import subprocess
from pathlib import Path

import pytest

from mcsharp_gguf.errors import McsharpError
from mcsharp_gguf.pmq.presets import PRESETS, preset_bytes, preset_types, resolve_preset, tensor_data_bytes

Inv = dict[str, tuple[tuple[int, ...], str]]


# --------------------------------------------------------------------------------------------------------------
# synthetic inventories (numpy-order shapes, as GGUFWriter records them)


def _attn(p: str, d: int, nq: int, nkv: int, hd: int, qk_norm: bool = False, bias: bool = False) -> Inv:
    t: Inv = {p + "attn_norm.weight": ((d,), "F32"), p + "attn_q.weight": ((nq * hd, d), "F16"),
              p + "attn_k.weight": ((nkv * hd, d), "F16"), p + "attn_v.weight": ((nkv * hd, d), "F16"),
              p + "attn_output.weight": ((d, nq * hd), "F16"), p + "ffn_norm.weight": ((d,), "F32")}
    if qk_norm:
        t.update({p + "attn_q_norm.weight": ((hd,), "F32"), p + "attn_k_norm.weight": ((hd,), "F32")})
    if bias:
        t.update({p + "attn_q.bias": ((nq * hd,), "F32"), p + "attn_k.bias": ((nkv * hd,), "F32"),
                  p + "attn_v.bias": ((nkv * hd,), "F32")})
    return t


def _experts(p: str, d: int, n_expert: int, ff: int) -> Inv:
    return {p + "ffn_gate_inp.weight": ((n_expert, d), "F32"), p + "ffn_gate_exps.weight": ((n_expert, ff, d), "F16"),
            p + "ffn_up_exps.weight": ((n_expert, ff, d), "F16"),
            p + "ffn_down_exps.weight": ((n_expert, d, ff), "F16")}


def _dense_ffn(p: str, d: int, ff: int, suffix: str = "") -> Inv:
    return {f"{p}ffn_gate{suffix}.weight": ((ff, d), "F16"), f"{p}ffn_up{suffix}.weight": ((ff, d), "F16"),
            f"{p}ffn_down{suffix}.weight": ((d, ff), "F16")}


def _globals(d: int, vocab: int, tied: bool = False) -> Inv:
    t: Inv = {"token_embd.weight": ((vocab, d), "F16"), "output_norm.weight": ((d,), "F32")}
    if not tied:
        t["output.weight"] = ((vocab, d), "F16")
    return t


def qwen3_30b_a3b(n_layer: int = 48, vocab: int = 151936) -> Inv:
    """Qwen3-30B-A3B: 128 experts x 768, hidden 2048, 32 q heads / 4 kv heads of 128."""
    t = _globals(2048, vocab)
    for i in range(n_layer):
        t |= _attn(f"blk.{i}.", 2048, 32, 4, 128, qk_norm=True) | _experts(f"blk.{i}.", 2048, 128, 768)
    return t


def olmoe_1b_7b(n_layer: int = 16, vocab: int = 50304) -> Inv:
    """OLMoE-1B-7B: 64 experts x 1024, hidden 2048, 16 heads (no GQA), full-width q/k norms."""
    t = _globals(2048, vocab)
    for i in range(n_layer):
        p = f"blk.{i}."
        t |= _attn(p, 2048, 16, 16, 128) | _experts(p, 2048, 64, 1024)
        t |= {p + "attn_q_norm.weight": ((2048,), "F32"), p + "attn_k_norm.weight": ((2048,), "F32")}
    return t


def mixtral_8x7b(n_layer: int = 32, vocab: int = 32000) -> Inv:
    """Mixtral-8x7B (arch "llama"): 8 experts x 14336, hidden 4096, 32 q / 8 kv heads of 128."""
    t = _globals(4096, vocab)
    for i in range(n_layer):
        t |= _attn(f"blk.{i}.", 4096, 32, 8, 128) | _experts(f"blk.{i}.", 4096, 8, 14336)
    return t


def qwen2moe_fixture(n_layer: int = 30, vocab: int = 49152) -> Inv:
    """Like the embedded fixture: 8 experts x 128 (rows of 128 do not fit 256-blocks), shared expert 512."""
    t = _globals(768, vocab)
    for i in range(n_layer):
        p = f"blk.{i}."
        t |= _attn(p, 768, 12, 4, 64, bias=True) | _experts(p, 768, 8, 128) | _dense_ffn(p, 768, 512, "_shexp")
        t[p + "ffn_gate_inp_shexp.weight"] = ((1, 768), "F32")
    return t


def deepseek_v2_lite(n_layer: int = 27, vocab: int = 102400) -> Inv:
    """DeepSeek-V2-Lite as the current converter writes it: split MLA (attn_k_b / attn_v_b), no q LoRA, one
    leading dense layer, 64 routed experts x 1408 + 2 shared."""
    t = _globals(2048, vocab)
    for i in range(n_layer):
        p = f"blk.{i}."
        t |= {p + "attn_norm.weight": ((2048,), "F32"), p + "attn_q.weight": ((16 * 192, 2048), "F16"),
              p + "attn_kv_a_mqa.weight": ((512 + 64, 2048), "F16"), p + "attn_kv_a_norm.weight": ((512,), "F32"),
              p + "attn_k_b.weight": ((16, 512, 128), "F16"), p + "attn_v_b.weight": ((16, 128, 512), "F16"),
              p + "attn_output.weight": ((2048, 16 * 128), "F16"), p + "ffn_norm.weight": ((2048,), "F32")}
        if i == 0:
            t |= _dense_ffn(p, 2048, 10944)
        else:
            t |= _experts(p, 2048, 64, 1408) | _dense_ffn(p, 2048, 2 * 1408, "_shexp")
    return t


def llama_dense(n_layer: int = 80, d: int = 8192, nq: int = 64, nkv: int = 8, ff: int = 28672,
                vocab: int = 128256) -> Inv:
    """A dense llama (default: Llama-3-70B's shapes)."""
    t = _globals(d, vocab)
    for i in range(n_layer):
        t |= _attn(f"blk.{i}.", d, nq, nkv, d // nq) | _dense_ffn(f"blk.{i}.", d, ff)
    return t


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _by_layer(types: dict[str, str], suffix: str) -> list[str]:
    """Types of ``blk.N.<suffix>`` in layer order."""
    found = {int(n.split(".")[1]): ty for n, ty in types.items() if n.startswith("blk.") and n.endswith("." + suffix)}
    return [found[i] for i in sorted(found)]


# --------------------------------------------------------------------------------------------------------------
# fast tests: rules read in src/llama-quant.cpp


def test_presets_listed():
    required = ("Q2_K Q2_K_S Q3_K_S Q3_K_M Q3_K_L Q4_K_S Q4_K_M Q5_K_S Q5_K_M Q6_K Q8_0 Q4_0 Q5_0 IQ2_XXS IQ2_XS "
                "IQ2_S IQ2_M IQ3_XXS IQ3_XS IQ3_S IQ3_M IQ4_XS IQ4_NL IQ1_S IQ1_M").split()
    assert set(required) <= set(PRESETS)
    assert resolve_preset("q4_k").name == "Q4_K_M" and resolve_preset("Q3_K").name == "Q3_K_M"
    assert resolve_preset("iq2_xs").default_type == "IQ2_XS"
    assert PRESETS["IQ2_S"].default_type == "IQ2_XS" and PRESETS["IQ2_M"].default_type == "IQ2_S"
    assert PRESETS["IQ3_XS"].default_type == "IQ3_S" and PRESETS["IQ3_M"].default_type == "IQ3_S"


def test_unknown_preset_one_line_error():
    with pytest.raises(McsharpError) as e:
        preset_types(qwen3_30b_a3b(2), "qwen3moe", "Q4_K_XL")
    msg = str(e.value)
    assert "\n" not in msg and "Q4_K_XL" in msg and "Q3_K_M" in msg and "IQ2_XS" in msg
    with pytest.raises(McsharpError):
        preset_bytes(qwen3_30b_a3b(2), "qwen3moe", "F16")


def test_qwen3_30b_q3_k_m():
    t = preset_types(qwen3_30b_a3b(), "qwen3moe", "Q3_K_M")
    # ffn_down: i_layer < n_layer/16 -> Q5_K, else Q4_K (non-falcon)
    assert _by_layer(t, "ffn_down_exps.weight") == ["Q5_K"] * 3 + ["Q4_K"] * 45
    # attn_v: the first two attention-v tensors Q5_K, then Q4_K (128 experts: no 8-expert bump)
    assert _by_layer(t, "attn_v.weight") == ["Q5_K"] * 2 + ["Q4_K"] * 46
    assert set(_by_layer(t, "attn_output.weight")) == {"Q4_K"}
    for s in ("attn_q.weight", "attn_k.weight", "ffn_gate_exps.weight", "ffn_up_exps.weight"):
        assert set(_by_layer(t, s)) == {"Q3_K"}
    assert t["output.weight"] == "Q6_K" and t["token_embd.weight"] == "Q3_K"
    assert t["blk.7.ffn_gate_inp.weight"] == "F32" and t["blk.7.attn_q_norm.weight"] == "F32"
    assert t["output_norm.weight"] == "F32"


def test_qwen3_30b_q4_k_m_use_more_bits():
    t = preset_types(qwen3_30b_a3b(), "qwen3moe", "Q4_K_M")
    more = [i for i in range(48) if _use_more_bits(i, 48)]
    assert more == [0, 1, 2, 3, 4, 5, 8, 11, 14, 17, 20, 23, 26, 29, 32, 35, 38, 41, 42, 43, 44, 45, 46, 47]
    assert _by_layer(t, "ffn_down_exps.weight") == ["Q6_K" if i in more else "Q4_K" for i in range(48)]
    assert _by_layer(t, "attn_v.weight") == ["Q6_K" if i in more else "Q4_K" for i in range(48)]
    assert set(_by_layer(t, "attn_output.weight")) == {"Q4_K"}
    assert t["output.weight"] == "Q6_K" and t["token_embd.weight"] == "Q4_K"


def test_qwen3_30b_iq2_xs():
    t = preset_types(qwen3_30b_a3b(), "qwen3moe", "IQ2_XS")
    assert set(_by_layer(t, "attn_v.weight")) == {"Q4_K"}  # n_gqa = 8 >= 4 (and n_expert >= 4)
    assert _by_layer(t, "ffn_down_exps.weight") == ["Q2_K"] * 6 + ["IQ2_XS"] * 42  # first n_ffn_down/8 tensors
    assert set(_by_layer(t, "attn_output.weight")) == {"IQ2_XS"}  # only 8-expert models bump it
    assert set(_by_layer(t, "attn_k.weight")) == {"IQ2_XS"}
    assert t["output.weight"] == "Q5_K" and t["token_embd.weight"] == "Q2_K"


def test_eight_experts_bumps():
    t = preset_types(mixtral_8x7b(), "llama", "Q4_K_M")
    assert set(_by_layer(t, "attn_v.weight")) == {"Q8_0"} and set(_by_layer(t, "attn_k.weight")) == {"Q8_0"}
    assert set(_by_layer(t, "attn_output.weight")) == {"Q5_K"}
    assert set(_by_layer(t, "attn_q.weight")) == {"Q4_K"}
    t = preset_types(mixtral_8x7b(), "llama", "IQ3_M")  # ffn_down: first eighth, plus use_more_bits with 8 experts
    assert _by_layer(t, "ffn_down_exps.weight") == ["Q4_K" if _use_more_bits(i, 32) else "IQ3_S" for i in range(32)]
    t = preset_types(mixtral_8x7b(), "llama", "IQ2_XXS")
    assert set(_by_layer(t, "attn_k.weight")) == {"Q4_K"} and set(_by_layer(t, "attn_output.weight")) == {"Q5_K"}


def test_shared_expert_counts_in_iq_ffn_down_counter():
    # The very-low-bit rule counts ffn_down *tensors* (routed + shared), not layers: with n_layer = 24 the first
    # 24/8 = 3 tensors in llama.cpp's order are blk.0 exps, blk.0 shexp, blk.1 exps.
    t = preset_types(qwen2moe_fixture(24), "qwen2moe", "IQ2_XXS")
    assert t["blk.0.ffn_down_exps.weight"] == "Q4_0"  # Q2_K does not fit rows of 128 -> Q4_0
    assert t["blk.0.ffn_down_shexp.weight"] == "Q2_K"
    assert t["blk.1.ffn_down_exps.weight"] == "Q4_0"
    assert t["blk.1.ffn_down_shexp.weight"] == "IQ2_XXS"
    assert t["blk.2.ffn_down_exps.weight"] == "IQ4_NL"  # IQ2_XXS does not fit rows of 128 -> IQ4_NL
    assert t["blk.0.ffn_gate_inp_shexp.weight"] == "F32" and t["blk.0.attn_q.bias"] == "F32"


def test_fallback_for_rows_not_fitting_blocks():
    t = preset_types(qwen2moe_fixture(), "qwen2moe", "Q4_K_M")
    assert _by_layer(t, "ffn_down_exps.weight") == ["Q8_0" if _use_more_bits(i, 30) else "Q5_0" for i in range(30)]
    assert t["blk.0.attn_v.weight"] == "Q8_0" and t["blk.3.ffn_down_shexp.weight"] == "Q4_K"
    t = preset_types(qwen2moe_fixture(), "qwen2moe", "Q5_K_S")
    assert set(_by_layer(t, "ffn_down_exps.weight")) == {"Q5_1"}
    odd = {"blk.0.ffn_down_exps.weight": ((8, 64, 80), "F16"), "blk.0.attn_q.weight": ((64, 64), "BF16")}
    t = preset_types(odd, "qwen2moe", "Q4_0")  # a row of 80 fits no block: F16 whatever the source
    assert t == {"blk.0.ffn_down_exps.weight": "F16", "blk.0.attn_q.weight": "Q4_0"}
    # output.weight whose row does not fit the default type's block: Q8_0
    assert preset_types({"output.weight": ((1000, 96), "F16")}, "llama", "Q4_K_M") == {"output.weight": "Q8_0"}


def test_deepseek2_mla():
    t = preset_types(deepseek_v2_lite(), "deepseek2", "Q4_K_M")
    assert t["blk.3.attn_k_b.weight"] == "Q5_0"  # rows of qk_nope = 128: Q4_K -> Q5_0
    assert t["blk.3.attn_v_b.weight"] == "Q4_K" and t["blk.3.attn_kv_a_mqa.weight"] == "Q4_K"
    assert t["blk.3.attn_q.weight"] == "Q4_K" and t["blk.3.attn_kv_a_norm.weight"] == "F32"
    # the leading dense layer's ffn_down (layer 0 uses more bits: Q6_K) has rows of 10944, not a multiple of 256
    assert t["blk.0.ffn_down.weight"] == "Q8_0"
    # routed experts' rows of 1408 do not fit 256-blocks either: Q4_K -> Q5_0, Q6_K -> Q8_0; shared rows of 2816 do
    assert t["blk.4.ffn_down_exps.weight"] == "Q5_0" and t["blk.4.ffn_down_shexp.weight"] == "Q4_K"
    assert t["blk.26.ffn_down_exps.weight"] == "Q8_0" and t["blk.26.ffn_down_shexp.weight"] == "Q6_K"
    t = preset_types(deepseek_v2_lite(), "deepseek2", "MXFP4_MOE")  # 3-D MLA tensors count as "MoE" here
    assert t["blk.3.attn_k_b.weight"] == "MXFP4" and t["blk.3.ffn_down_exps.weight"] == "MXFP4"
    assert t["blk.3.attn_q.weight"] == "Q8_0" and t["output.weight"] == "Q8_0"


def test_dense_llama_70b_and_counters():
    t = preset_types(llama_dense(), "llama", "Q3_K_S")  # LLM_TYPE_70B: Q3_K / Q4_K attn_v -> Q5_K
    assert set(_by_layer(t, "attn_v.weight")) == {"Q5_K"}
    t = preset_types(llama_dense(n_layer=32, d=4096, nq=32, nkv=8, ff=14336), "llama", "Q3_K_S")
    assert set(_by_layer(t, "attn_v.weight")) == {"Q3_K"}
    t = preset_types(llama_dense(n_layer=80, nkv=64), "llama", "Q3_K_S")  # 80 layers without GQA: 65B
    assert set(_by_layer(t, "attn_v.weight")) == {"Q3_K"}
    # dense models locate a layer by counting ffn_down tensors
    t = preset_types(llama_dense(n_layer=32, d=4096, nq=32, nkv=8, ff=14336), "llama", "Q4_K_M")
    assert _by_layer(t, "ffn_down.weight") == ["Q6_K" if _use_more_bits(i, 32) else "Q4_K" for i in range(32)]


def test_imatrix_dependent_choices():
    inv = olmoe_1b_7b()  # n_gqa = 1
    with_im = preset_types(inv, "olmoe", "IQ3_XXS")
    without = preset_types(inv, "olmoe", "IQ3_XXS", imatrix=False)
    assert set(_by_layer(with_im, "attn_v.weight")) == {"IQ3_XXS"}
    assert set(_by_layer(without, "attn_v.weight")) == {"IQ3_S"}
    assert set(_by_layer(with_im, "ffn_down_exps.weight")) == {"IQ3_XXS"}
    assert _by_layer(without, "ffn_down_exps.weight") == ["Q4_K"] * 2 + ["Q3_K"] * 14
    assert _by_layer(preset_types(inv, "olmoe", "Q4_0", imatrix=True), "ffn_down_exps.weight") == \
        ["Q4_1"] * 2 + ["Q4_0"] * 14
    assert set(_by_layer(preset_types(inv, "olmoe", "Q4_0"), "ffn_down_exps.weight")) == {"Q4_0"}
    assert _by_layer(preset_types(inv, "olmoe", "IQ4_XS", imatrix=False), "ffn_down_exps.weight") == \
        ["Q5_K"] * 2 + ["IQ4_XS"] * 14


def test_tied_embeddings_and_order_independence():
    inv = qwen2moe_fixture(8)
    tied = {k: v for k, v in inv.items() if k != "output.weight"}
    assert preset_types(tied, "qwen2moe", "Q4_K_M")["token_embd.weight"] == "Q6_K"
    assert preset_types(tied, "qwen2moe", "IQ2_XS")["token_embd.weight"] == "Q5_K"
    assert preset_types(inv, "qwen2moe", "IQ2_XS")["token_embd.weight"] == "Q2_K"
    items = list(inv.items())
    random.Random(0).shuffle(items)
    shuffled = dict(items)
    for p in ("Q3_K_M", "IQ2_XXS"):
        assert preset_types(shuffled, "qwen2moe", p) == preset_types(inv, "qwen2moe", p)
        assert list(preset_types(shuffled, "qwen2moe", p)) == list(shuffled)


def test_bytes():
    assert tensor_data_bytes((128, 768, 2048), "Q4_K") == 128 * 768 * 8 * 144
    assert tensor_data_bytes((2048,), "F32") == 8192 and tensor_data_bytes((3, 5), "F16") == 30
    inv = qwen3_30b_a3b(4)
    for p in ("Q4_K_M", "IQ2_XS", "Q8_0"):
        types = preset_types(inv, "qwen3moe", p)
        assert preset_bytes(inv, "qwen3moe", p) == sum(tensor_data_bytes(s, types[n]) for n, (s, _) in inv.items())
    full = qwen3_30b_a3b()
    sizes = [preset_bytes(full, "qwen3moe", p) for p in ("IQ2_XXS", "Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q8_0")]
    assert sizes == sorted(sizes)
    bpw = 8 * preset_bytes(full, "qwen3moe", "Q4_K_M") / sum(math.prod(s) for s, _ in full.values())
    assert 4.5 < bpw < 5.2


# --------------------------------------------------------------------------------------------------------------
# slow tests: the real llama-quantize

_LOG_LINE = re.compile(r"^\[\s*\d+/\s*\d+\]\s+(\S+)\s+- \[[^\]]*\], type =\s+(\w+), size =.*?(?:\((\w+)\))?$")


def _reader_inventory(path: Path) -> tuple[Inv, str, int]:
    from mcsharp_gguf.llama_src import import_gguf

    r = import_gguf().GGUFReader(str(path))
    inv = {t.name: (tuple(int(x) for x in reversed(t.shape)), t.tensor_type.name) for t in r.tensors}
    return inv, str(r.fields["general.architecture"].contents()), sum(int(t.n_bytes) for t in r.tensors)


def _quantize(tools: Path, src: Path, dst: Path, preset: str, imatrix: Path | None, dry: bool = False) -> str:
    cmd = [str(tools / "llama-quantize")] + (["--dry-run"] if dry else []) + \
        (["--imatrix", str(imatrix)] if imatrix else []) + [str(src), str(dst), preset, "1"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    return p.stdout + p.stderr


def _dry_run_types(tools: Path, src: Path, preset: str, imatrix: Path | None) -> dict[str, str]:
    """Per-tensor types from ``llama-quantize --dry-run``'s log (same selection code as a real run)."""
    out = {}
    for line in _quantize(tools, src, src.with_suffix(".dry.gguf"), preset, imatrix, dry=True).splitlines():
        m = _LOG_LINE.match(line.strip())
        if m:
            out[m.group(1)] = (m.group(3) or m.group(2)).upper()
    return out


def _mismatches(pred: dict[str, str], got: dict[str, str]) -> dict[str, tuple[str, str | None]]:
    return {n: (pred[n], got.get(n)) for n in pred if pred[n] != got.get(n)} | \
        {n: ("<missing>", got[n]) for n in got if n not in pred}


@pytest.fixture(scope="module")
def fixture_f16(tmp_path_factory):
    """(tools bin dir, the fixture as F16 GGUF, an imatrix of it) — built once per test session."""
    from mcsharp_gguf.native import build as nb

    from mcsharp_gguf.dev.fixture import cached_fixture
    from mcsharp_gguf.gguf.convert import convert_checkpoint
    from mcsharp_gguf.text import calibration_text

    tools = Path(nb.build(nb.BuildOptions(tools=True)).lib_dir) / "bin"
    d = tmp_path_factory.mktemp("presets")
    f16 = convert_checkpoint(cached_fixture(), d / "fixture-f16.gguf", outtype="f16")
    (d / "calib.txt").write_text(calibration_text(60_000))
    imatrix = d / "imatrix.gguf"
    # two 512-token chunks: the imatrix's values do not matter here, only its presence (every expert is hit)
    subprocess.run([str(tools / "llama-imatrix"), "-m", str(f16), "-f", str(d / "calib.txt"), "-o", str(imatrix),
                    "-c", "512", "--chunks", "2", "-t", "1", "--no-ppl"], check=True, capture_output=True, timeout=600)
    return tools, f16, imatrix


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["Q3_K_M", "Q4_K_M", "IQ4_XS"])
def test_fixture_matches_llama_quantize(fixture_f16, preset):
    """Real runs (IQ4_XS with the imatrix, which changes its ffn_down rule). The very-low-bit IQ presets are
    checked with --dry-run below: a real IQ2_XS run of the fixture takes a minute or more on one thread."""
    tools, f16, imatrix = fixture_f16
    src, arch, _ = _reader_inventory(f16)
    assert arch == "qwen2moe"
    out = f16.with_name(f"fixture-{preset}.gguf")
    _quantize(tools, f16, out, preset, imatrix if PRESETS[preset].imatrix_by_default else None)
    got, _, n_bytes = _reader_inventory(out)
    out.unlink()
    assert _mismatches(preset_types(src, arch, preset), {n: ty for n, (_, ty) in got.items()}) == {}
    assert preset_bytes(src, arch, preset) == n_bytes


@pytest.mark.slow
def test_fixture_dry_run_every_preset(fixture_f16):
    tools, f16, imatrix = fixture_f16
    src, arch, _ = _reader_inventory(f16)
    imatrix_sensitive = {"IQ3_XXS", "IQ4_NL", "IQ4_XS", "Q4_0", "Q5_0"}
    bad = {}
    for name, p in PRESETS.items():
        for im in ({True, False} if name in imatrix_sensitive else {p.imatrix_by_default}):
            got = _dry_run_types(tools, f16, name, imatrix if im else None)
            assert len(got) == len(src)
            if mm := _mismatches(preset_types(src, arch, name, imatrix=im), got):
                bad[(name, im)] = mm
    assert bad == {}


def _hollow_gguf(path: Path, arch: str, kv: dict, tensors: Inv) -> Path:
    """A GGUF with real metadata and tensor table whose data is a sparse hole (llama-quantize --dry-run never
    reads it), so full-depth real shapes cost no disk."""
    import numpy as np

    from mcsharp_gguf.llama_src import import_gguf

    gguf = import_gguf()
    w = gguf.GGUFWriter(str(path), arch)
    for key, (value, vtype) in kv.items():
        w.add_key_value(f"{arch}.{key}", value, getattr(gguf.GGUFValueType, vtype))
    data = 0
    for name, (shape, ty) in tensors.items():
        nbytes = tensor_data_bytes(shape, ty)
        w.add_tensor_info(name, shape, np.dtype(np.float16 if ty == "F16" else np.float32), nbytes,
                          raw_dtype=gguf.GGMLQuantizationType[ty])
        data += w.ggml_pad(nbytes, w.data_alignment)
    w.write_header_to_file(path=path)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.fout[0].flush()
    head = w.fout[0].tell()
    w.close()
    os.truncate(path, w.ggml_pad(head, w.data_alignment) + data)
    return path


def _kv(n_layer: int, d: int, nq: int, nkv: int, n_expert: int, used: int, **extra) -> dict:
    kv = {"context_length": (4096, "UINT32"), "embedding_length": (d, "UINT32"), "block_count": (n_layer, "UINT32"),
          "attention.head_count": (nq, "UINT32"), "attention.head_count_kv": (nkv, "UINT32"),
          "attention.layer_norm_rms_epsilon": (1e-6, "FLOAT32")}
    if n_expert:
        kv |= {"expert_count": (n_expert, "UINT32"), "expert_used_count": (used, "UINT32")}
    return kv | {k.replace("__", "."): (v, "UINT32") for k, v in extra.items()}


HOLLOW = {
    "qwen3-30b-a3b": ("qwen3moe", qwen3_30b_a3b, _kv(48, 2048, 32, 4, 128, 8, expert_feed_forward_length=768,
                                                   attention__key_length=128, attention__value_length=128)),
    "olmoe-1b-7b": ("olmoe", olmoe_1b_7b, _kv(16, 2048, 16, 16, 64, 8)),
    "mixtral-8x7b": ("llama", mixtral_8x7b, _kv(32, 4096, 32, 8, 8, 2)),
    "deepseek-v2-lite": ("deepseek2", deepseek_v2_lite, _kv(
        27, 2048, 16, 1, 64, 6, leading_dense_block_count=1, attention__kv_lora_rank=512, attention__key_length=576,
        attention__value_length=512, attention__key_length_mla=192, attention__value_length_mla=128,
        rope__dimension_count=64, expert_feed_forward_length=1408, expert_shared_count=2, vocab_size=102400)),
    "llama-3-70b": ("llama", llama_dense, _kv(80, 8192, 64, 8, 0, 0)),
    "qwen2moe-24": ("qwen2moe", lambda: qwen2moe_fixture(24), _kv(24, 768, 12, 4, 8, 6)),
}


@pytest.mark.slow
@pytest.mark.parametrize("model", list(HOLLOW))
def test_real_shapes_dry_run_every_preset(fixture_f16, tmp_path, model):
    """Full-depth real shapes (48-layer Qwen3-30B-A3B, ...): every preset's per-tensor types and bytes."""
    tools, _, imatrix = fixture_f16
    arch, make, kv = HOLLOW[model]
    inv = make()
    path = _hollow_gguf(tmp_path / f"{model}.gguf", arch, kv, inv)
    bad = {}
    for name, p in PRESETS.items():
        got = _dry_run_types(tools, path, name, imatrix if p.imatrix_by_default else None)
        if mm := _mismatches(preset_types(inv, arch, name), got):
            bad[name] = mm
    assert bad == {}
