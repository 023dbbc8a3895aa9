"""The native patch (native/patches/0001-mcsharp-moe.patch) on GGUFs made here from tiny random MoEs.

Every check compares against an independent reference: the stock graph on the same weights (with
llama.cpp's own ``expert_used_count`` override as the "k-1" reference), transformers with the same
(dequantised) weights, or a numpy evaluation of the OTP router on transformers' MoE inputs.
"""

from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from mcsharp_gguf.dev.tiny_models import load_hf, make_tiny_moe, pick_tokens
from mcsharp_gguf.errors import McsharpError
from mcsharp_gguf.llama_src import import_gguf
from mcsharp_gguf.runtime import llama

pytestmark = pytest.mark.slow  # the patched llama.cpp runtime (and its source, for the C test)

ARCHS = ["qwen2moe", "mixtral"]
N_EXPERT, TOP_K, N_LAYER = 8, 4, 2
LLAMA_ARCH = {"qwen2moe": "qwen2moe", "mixtral": "llama"}  # GGUF general.architecture


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("native")


@pytest.fixture(scope="module")
def models(work):
    """arch → (checkpoint dir, transformers model, token ids with clear top-k margins)."""
    out = {}
    for arch in ARCHS:
        d = make_tiny_moe(arch, work / arch, n_expert=N_EXPERT, top_k=TOP_K)
        hf = load_hf(d)
        out[arch] = (d, hf, pick_tokens(hf, TOP_K, n=48))
    return out


def _convert(src: Path, out: Path, hook=None, extra_kv=None) -> Path:
    from mcsharp_gguf.gguf.convert import convert_checkpoint

    if not out.exists():
        convert_checkpoint(src, out, outtype="f32", hook=hook, extra_kv=extra_kv)
    return out


def _otp_kv(n_embd: int, hidden: int, b2_per_layer, w_scale: float = 0.0, seed: int = 0, bad_w2: bool = False,
            dtype=np.float32):
    """extra_kv writing an OTP router per layer: logits = W2·gelu(W1·x + b1) + b2 (numpy shapes = ggml ne reversed)."""
    rng = np.random.default_rng(seed)
    params = []
    for b2 in b2_per_layer:
        w1 = (rng.standard_normal((hidden, n_embd)) * w_scale).astype(dtype)
        b1 = (rng.standard_normal(hidden) * w_scale).astype(dtype)
        w2 = (rng.standard_normal((TOP_K + (1 if bad_w2 else 0), hidden)) * w_scale).astype(dtype)
        params.append((w1, b1, w2, np.asarray(b2, dtype=dtype)))

    def add(w):
        w.add_uint32("mcsharp.otp.version", 1)
        w.add_uint32("mcsharp.otp.hidden_size", hidden)
        for i, (w1, b1, w2, b2) in enumerate(params):
            w.add_tensor(f"blk.{i}.ffn_otp_w1.weight", w1)
            w.add_tensor(f"blk.{i}.ffn_otp_b1.bias", b1)
            w.add_tensor(f"blk.{i}.ffn_otp_w2.weight", w2)
            w.add_tensor(f"blk.{i}.ffn_otp_b2.bias", b2)

    return add, params


def _logits(path, ids, **kv) -> np.ndarray:
    llm = llama.load_model(path, n_ctx=128, kv_overrides=kv or None)
    try:
        return llama.logits_for(llm, ids)
    finally:
        llm.close()


def _logits_and_counter(path, ids, **kv):
    llm = llama.load_model(path, n_ctx=128, kv_overrides=kv or None)
    try:
        llama.reset_slot_counter()
        got = llama.logits_for(llm, ids)
        return got, llama.read_slot_counter()
    finally:
        llm.close()


def _rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def ggufs(models, work):
    """arch → dict of GGUF variants of the same weights."""
    out = {}
    for arch, (d, hf, _) in models.items():
        n_embd = hf.config.hidden_size
        keep, _ = _otp_kv(n_embd, 16, [[1.0] * TOP_K] * N_LAYER)
        drop, _ = _otp_kv(n_embd, 16, [[1.0] * (TOP_K - 1) + [-1.0]] * N_LAYER, dtype=np.float16)
        out[arch] = {
            "base": _convert(d, work / f"{arch}-base.gguf"),
            "otp_keep": _convert(d, work / f"{arch}-otp-keep.gguf", extra_kv=keep),
            "otp_drop_last": _convert(d, work / f"{arch}-otp-drop.gguf", extra_kv=drop),
        }
    return out


# --- (a) (b) (e): OTP execution, static-k and threshold baselines, slot counter ------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_otp_keep_all_is_identical_to_stock(arch, models, ggufs):
    ids = models[arch][2]
    base, (sel0, exe0) = _logits_and_counter(ggufs[arch]["base"], ids)
    got, (sel, exe) = _logits_and_counter(ggufs[arch]["otp_keep"], ids)
    assert np.array_equal(got, base)
    assert (sel0, exe0) == (0, 0)  # stock graph: no counting node at all
    assert sel == exe == N_LAYER * len(ids) * TOP_K
    # OTP tensors present but disabled by kv-override: stock graph again
    off, (sel, exe) = _logits_and_counter(ggufs[arch]["otp_keep"], ids, **{"mcsharp.otp.enable": False})
    assert np.array_equal(off, base) and (sel, exe) == (0, 0)


@pytest.mark.parametrize("arch", ARCHS)
def test_otp_drop_last_equals_k_minus_1(arch, models, ggufs):
    ids = models[arch][2]
    ref = _logits(ggufs[arch]["base"], ids, **{f"{LLAMA_ARCH[arch]}.expert_used_count": TOP_K - 1})
    full = _logits(ggufs[arch]["base"], ids)
    got, (sel, exe) = _logits_and_counter(ggufs[arch]["otp_drop_last"], ids)
    assert _rel(got, ref) <= 1e-4, _rel(got, ref)
    assert _rel(full, ref) > 1e-2  # dropping a slot matters, so the comparison above can fail
    assert (sel, exe) == (N_LAYER * len(ids) * TOP_K, N_LAYER * len(ids) * (TOP_K - 1))
    # the threshold knob is a load-time override: a threshold below every logit keeps all slots
    got, (sel, exe) = _logits_and_counter(ggufs[arch]["otp_drop_last"], ids, **{"mcsharp.otp.threshold": -5.0})
    assert np.array_equal(got, full) and sel == exe


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("k", [1, 2, 3])
def test_static_k_equals_expert_used_count(arch, k, models, ggufs):
    ids = models[arch][2]
    ref = _logits(ggufs[arch]["base"], ids, **{f"{LLAMA_ARCH[arch]}.expert_used_count": k})
    got, (sel, exe) = _logits_and_counter(ggufs[arch]["base"], ids,
                                          **{"mcsharp.moe.prune_mode": "static", "mcsharp.moe.static_k": k})
    assert _rel(got, ref) <= 1e-4, _rel(got, ref)
    assert (sel, exe) == (N_LAYER * len(ids) * TOP_K, N_LAYER * len(ids) * k)


def _hf_masked(hf, ids, rule):
    """transformers logits with the slot mask applied in every layer's router, and the executed-slot count.

    ``rule(x, w)`` gets the MoE input x (T, n_embd) and the top-k weights w (T, k, descending) and returns
    (keep mask, distance of each slot's decision from its threshold). Dropped slots get weight 0; Mixtral's
    weights are renormalised over the kept slots (as its router normalises), Qwen2-MoE's are not.
    """
    stats = {"kept": 0, "margin": np.inf}

    def hook(mod, args, out):
        logits, scores, idx = out
        keep, dist = rule(args[0].detach().double().numpy(), scores.detach().double().numpy())
        keep[:, 0] = True
        stats["kept"] += int(keep.sum())
        stats["margin"] = min(stats["margin"], float(np.abs(dist[:, 1:]).min()))
        scores = scores * torch.from_numpy(keep).to(scores.dtype)
        if getattr(mod, "norm_topk_prob", True):  # Mixtral's router always normalises
            scores = scores / scores.sum(-1, keepdim=True)
        return logits, scores, idx

    hooks = [layer.mlp.gate.register_forward_hook(hook) for layer in hf.model.layers]
    try:
        with torch.no_grad():
            logits = hf(torch.as_tensor(ids)[None]).logits[0].numpy()
    finally:
        for h in hooks:
            h.remove()
    return logits, stats["kept"], stats["margin"]


@pytest.mark.parametrize("arch", ARCHS)
def test_threshold_rule_matches_masked_transformers(arch, models, ggufs):
    """Training-free rule keep j iff w_j >= mu·w_0: logits and executed slots equal transformers with that mask."""
    _, hf, ids = models[arch]
    for mu in (0.3, 0.5, 0.7):
        ref, want, margin = _hf_masked(hf, ids, lambda x, w, mu=mu: (w / w[:, :1] >= mu, w / w[:, :1] - mu))
        if margin > 2e-3:  # no decision near its threshold: an exact count is a fair expectation
            break
    assert margin > 2e-3
    got, (sel, exe) = _logits_and_counter(ggufs[arch]["base"], ids,
                                          **{"mcsharp.moe.prune_mode": "threshold", "mcsharp.moe.threshold_mu": mu})
    assert sel == N_LAYER * len(ids) * TOP_K
    assert exe == want and 0 < want < sel
    assert _rel(got, ref) <= 1e-3, _rel(got, ref)
    full = _logits(ggufs[arch]["base"], ids)
    assert _rel(full, ref) > 1e-2  # the mask matters, so the comparison above can fail
    # mu > 1 keeps only slot 0, which equals top-1
    ref = _logits(ggufs[arch]["base"], ids, **{f"{LLAMA_ARCH[arch]}.expert_used_count": 1})
    got, (sel, exe) = _logits_and_counter(ggufs[arch]["base"], ids,
                                          **{"mcsharp.moe.prune_mode": "threshold", "mcsharp.moe.threshold_mu": 1.5})
    assert _rel(got, ref) <= 1e-4 and exe == N_LAYER * len(ids)


def _gelu(x):
    """Exact (erf) GELU, as torch.nn.functional.gelu and ggml_gelu_erf."""
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / np.sqrt(2.0)))


@pytest.mark.parametrize("arch", ARCHS)
def test_token_dependent_otp_matches_masked_transformers(arch, models, work):
    """A random OTP router: logits and executed slots equal transformers with the router's mask (numpy)."""
    d, hf, ids = models[arch]
    add, params = _otp_kv(hf.config.hidden_size, 32, [[0.0] * TOP_K] * N_LAYER, w_scale=0.3, seed=3)
    path = _convert(d, work / f"{arch}-otp-random.gguf", extra_kv=add)
    calls = []

    def rule(x, w):
        il = len(calls) % N_LAYER
        calls.append(il)
        w1, b1, w2, b2 = params[il]
        r = _gelu(x @ w1.T + b1) @ w2.T + b2
        return r > 0.0, r

    ref, want, margin = _hf_masked(hf, ids, rule)
    assert calls == list(range(N_LAYER)) and margin > 1e-3  # the rule masked every layer, once
    got, (sel, exe) = _logits_and_counter(path, ids)
    assert sel == N_LAYER * len(ids) * TOP_K
    assert exe == want and exe < sel
    assert _rel(got, ref) <= 1e-3, _rel(got, ref)


@pytest.mark.parametrize("arch", ARCHS)
def test_otp_wrong_shape_is_a_clear_load_error(arch, models, work, capfd):
    d, hf, ids = models[arch]
    add, _ = _otp_kv(hf.config.hidden_size, 16, [[1.0] * TOP_K] * N_LAYER, bad_w2=True)
    path = _convert(d, work / f"{arch}-otp-bad.gguf", extra_kv=add)
    capfd.readouterr()
    with pytest.raises(McsharpError):
        llama.load_model(path, n_ctx=64, verbose=True)
    log = capfd.readouterr().err
    assert "blk.0.ffn_otp_w2.weight" in log and "wrong shape" in log, log[-2000:]
    # the process is still fine: a good file loads afterwards
    good = llama.load_model(_convert(d, work / f"{arch}-base.gguf"), n_ctx=64)
    assert llama.logits_for(good, ids[:4]).shape[0] == 4


def test_bad_prune_mode_is_a_clear_load_error(models, ggufs, capfd):
    capfd.readouterr()
    with pytest.raises(McsharpError):
        llama.load_model(ggufs["qwen2moe"]["base"], n_ctx=64, verbose=True,
                           kv_overrides={"mcsharp.moe.prune_mode": "sometimes"})
    assert "invalid mcsharp.moe.prune_mode 'sometimes'" in capfd.readouterr().err


# --- (c) (d): grouped mixed-type experts ---------------------------------------------------------------------

GROUP_SIZES = [3, 1, 4]  # uneven on purpose
PERM = np.array([5, 0, 7, 2, 6, 1, 3, 4])  # stored expert s = original expert PERM[s]


def _eager(tensor) -> np.ndarray:
    """The converter hands hooks lazy tensors; materialise one as float32 numpy."""
    to_eager = getattr(type(tensor), "to_eager", None)
    return (to_eager(tensor) if to_eager else tensor).float().numpy()


def _group_hook(types, perm=None, dequantised: dict | None = None):
    """Converter hook: split (optionally permuted) merged experts into groups of the given ggml types."""
    gguf = import_gguf()
    bounds = np.cumsum([0] + GROUP_SIZES)

    def hook(name, tensor, bid):
        if bid is None:
            return None
        if perm is not None and name == f"blk.{bid}.ffn_gate_inp.weight":
            return [(name, _eager(tensor)[perm], None)]
        for kind in ("gate", "up", "down"):
            if name == f"blk.{bid}.ffn_{kind}_exps.weight":
                arr = _eager(tensor)
                if dequantised is not None:
                    dequantised[(bid, kind, "orig")] = arr
                if perm is not None:
                    arr = arr[perm]
                out = []
                for g, qt in enumerate(types):
                    part = np.ascontiguousarray(arr[bounds[g]:bounds[g + 1]])
                    if qt == gguf.GGMLQuantizationType.F32:
                        data, deq, raw = part.astype(np.float32), part, None
                    elif qt == gguf.GGMLQuantizationType.F16:
                        data = part.astype(np.float16)
                        deq, raw = data.astype(np.float32), None
                    else:
                        data = gguf.quants.quantize(part, qt)
                        deq, raw = gguf.quants.dequantize(data, qt), qt
                    out.append((f"blk.{bid}.ffn_{kind}_exps.g{g}.weight", data, raw))
                    if dequantised is not None:
                        dequantised[(bid, kind, g)] = deq
                return out
        return None

    return hook


@pytest.mark.parametrize("arch", ARCHS)
def test_grouped_same_type_is_identical_to_merged(arch, models, ggufs, work):
    d, _, ids = models[arch]
    gguf = import_gguf()
    f32 = gguf.GGMLQuantizationType.F32
    path = _convert(d, work / f"{arch}-grouped-f32.gguf", hook=_group_hook([f32] * 3))
    got, (sel, exe) = _logits_and_counter(path, ids)
    assert np.array_equal(got, _logits(ggufs[arch]["base"], ids))
    assert (sel, exe) == (0, 0)  # no pruning: no counting
    # grouped + OTP together: equals merged + the same OTP
    add, _ = _otp_kv(models[arch][1].config.hidden_size, 16, [[1.0] * (TOP_K - 1) + [-1.0]] * N_LAYER, dtype=np.float16)
    both = _convert(d, work / f"{arch}-grouped-f32-otp.gguf", hook=_group_hook([f32] * 3), extra_kv=add)
    got, (sel, exe) = _logits_and_counter(both, ids)
    assert np.array_equal(got, _logits(ggufs[arch]["otp_drop_last"], ids))
    assert exe == N_LAYER * len(ids) * (TOP_K - 1)


# llama.cpp's CPU kernels convert activations to the weight type's dot-product type (f16, q8), exactly as
# for a stock file of that type: with 4-bit groups the agreement is bounded by that, not by the grouping.
MIXED = {"f16+f32+f16": (("F16", "F32", "F16"), 1e-3), "f16+q8_0+f32": (("F16", "Q8_0", "F32"), 5e-3),
         "q8_0+f16+q4_0": (("Q8_0", "F16", "Q4_0"), 1e-2)}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mix", list(MIXED))
def test_mixed_types_match_transformers_with_dequantised_weights(arch, mix, models, work):
    d, hf, ids = models[arch]
    gguf = import_gguf()
    types, tol = MIXED[mix]
    deq: dict = {}
    hook = _group_hook([gguf.GGMLQuantizationType[t] for t in types], PERM, deq)
    path = _convert(d, work / f"{arch}-mixed-{mix}.gguf", hook=hook)
    for (bid, kind, g), arr in deq.items():  # the reference weights are the quantised originals
        if g != "orig":
            orig_w = deq[(bid, kind, "orig")][PERM if PERM is not None else slice(None)]
            part = orig_w[np.cumsum([0] + GROUP_SIZES)[g]:np.cumsum([0] + GROUP_SIZES)[g + 1]]
            assert np.abs(arr - part).max() <= 0.2 * np.abs(part).max() and np.abs(part).max() > 0
    # transformers reference: original expert order, each expert dequantised from its group's type
    ref_model = load_hf(d)
    bounds = np.cumsum([0] + GROUP_SIZES)
    with torch.no_grad():
        for bid, layer in enumerate(ref_model.model.layers):
            ex = layer.mlp.experts
            n_ff = ex.down_proj.shape[-1]
            for g in range(len(GROUP_SIZES)):
                for s in range(bounds[g], bounds[g + 1]):
                    e = int(PERM[s])
                    loc = s - bounds[g]
                    ex.gate_up_proj[e, :n_ff] = torch.from_numpy(deq[(bid, "gate", g)][loc])
                    ex.gate_up_proj[e, n_ff:] = torch.from_numpy(deq[(bid, "up", g)][loc])
                    ex.down_proj[e] = torch.from_numpy(deq[(bid, "down", g)][loc])
        ref = ref_model(torch.as_tensor(ids)[None]).logits[0].numpy()
        orig = hf(torch.as_tensor(ids)[None]).logits[0].numpy()
    got = llama.logits_for(llama.load_model(path, n_ctx=128), ids)
    assert _rel(got, ref) <= tol, _rel(got, ref)
    assert np.array_equal(got.argmax(-1), ref.argmax(-1))
    if "q4" in mix:  # the 4-bit quantisation is clearly visible, so the check has teeth
        assert _rel(orig, ref) > 2 * _rel(got, ref)  # the quantisation is visible, so the check has teeth


def test_groups_not_covering_all_experts_is_a_load_error(models, work, capfd):
    d = models["qwen2moe"][0]
    gguf = import_gguf()
    f32 = gguf.GGMLQuantizationType.F32
    hook = _group_hook([f32] * 3)

    def drop_last_group(name, tensor, bid):
        out = hook(name, tensor, bid)
        return [o for o in out if ".g2." not in o[0]] if out else out

    path = _convert(d, work / "qwen2moe-grouped-short.gguf", hook=drop_last_group)
    capfd.readouterr()
    with pytest.raises(McsharpError):
        llama.load_model(path, n_ctx=64, verbose=True)
    assert "expert groups hold 4 experts, expected 8" in capfd.readouterr().err


# --- C test: MUL_MAT_ID with masked / out-of-range ids on CPU ------------------------------------------------

def test_c_mul_mat_id_mask(tmp_path):
    """Builds native/tests/test_mul_mat_id_mask.c against the patched ggml and runs it (several quant types;
    merged experts, and experts split into type groups computed in place as llama-graph does on the CPU)."""
    from mcsharp_gguf.native import build as nb

    info = llama.ensure_runtime()
    src_root = nb.pristine_source()  # the patch does not change ggml's public headers
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    test_c = Path(__file__).resolve().parents[1] / "native" / "tests" / "test_mul_mat_id_mask.c"
    exe = tmp_path / "test_mul_mat_id_mask"
    res = subprocess.run([cc, "-O2", "-std=c11", str(test_c), "-o", str(exe),
                          f"-I{src_root / 'ggml' / 'include'}", f"-L{info.lib_dir}", "-lggml", "-lggml-base",
                          "-lggml-cpu", f"-Wl,-rpath,{info.lib_dir}", "-lm"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "types tested: 7, failures: 0" in run.stdout and "FAIL" not in run.stdout, run.stdout
    assert "parts cases: 42" in run.stdout, run.stdout  # grouped experts written in place, 7 types × 3 shapes × 2
