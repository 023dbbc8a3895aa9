"""PMQ plans packed into GGUF: stock and mixed layouts load and compute what the plan says."""

from __future__ import annotations

import numpy as np
import pytest

from mcsharp_gguf.ggml.packing import quantize_rtn
from mcsharp_gguf.gguf.convert import convert_checkpoint, tensor_values
from mcsharp_gguf.gguf.inspect import read_report
from mcsharp_gguf.gguf.pack import layer_layout, plan_hook, plan_metadata
from mcsharp_gguf.model.names import EXPS_RE
from mcsharp_gguf.pmq.importance import LayerImportance
from mcsharp_gguf.pmq.plan import solve_bit_plan
from mcsharp_gguf.runtime import llama

TARGETS = ("Q2_K", "Q4_K", "Q6_K", "Q8_0")


def _plan(bpw: float, mode: str, seed: int = 0):
    rng = np.random.default_rng(seed)
    layers = []
    for layer in range(2):
        phi = rng.dirichlet(np.ones(8))
        eps = {t: list(rng.uniform(0.5, 2.0, 8) * 4.0 ** -i) for i, t in enumerate(TARGETS)}
        layers.append(LayerImportance(layer, 256, 256, list(phi), list(phi), eps))
    # a global budget on eps^1 (MC's cost) keeps Q2_K out of the 6.6 bpw plan, so argmax can be compared there;
    # bytes only: priced in CPU kernel time (pmq.speed) the 6.6 bpw plan would not mix Q8_0 in, and packing is
    # what this tests
    return solve_bit_plan(layers, bpw, mode=mode, targets=TARGETS, scope="global", gamma=1.0, metric="mc",
                          max_slowdown=None)


def test_layout_groups_experts_by_recipe():
    lay = layer_layout(["Q4_K", "Q2_K", "Q4_K", "Q8_0"], "mixed")
    assert lay.order == [1, 0, 2, 3] and lay.groups == [("Q2_K", 1), ("Q4_K", 2), ("Q8_0", 1)]
    assert layer_layout(["Q4_K"] * 3, "stock").groups == [("Q4_K", 3)]


def _dequant_hook(plan):
    """Same experts as the plan, but stored as F32 dequantised values in the original order."""
    def hook(name, tensor, bid):
        m = EXPS_RE.match(name)
        if not m:
            return None
        layer, proj = int(m.group(1)), m.group(2)
        targets = plan.layers[layer]
        w = tensor_values(tensor).float()
        deq = np.stack([quantize_rtn(w[e], plan.recipes[f"{layer}:{targets[e]}"][proj]).dequant.numpy()
                        for e in range(w.shape[0])])
        return [(name, deq, None)]
    return hook


@pytest.mark.slow  # the patched runtime, the pinned converter, a tiny model
@pytest.mark.parametrize("mode,bpw", [("mixed", 4.0), ("stock", 4.0), ("mixed", 6.6)])
def test_packed_plan_runs_like_its_dequantised_weights(mode, bpw, tiny_model, tmp_path):
    model_dir = tiny_model("qwen2moe", hidden=256, expert_ff=256)
    plan = _plan(bpw, mode)
    if mode == "mixed":
        assert len({t for v in plan.layers.values() for t in v}) > 1  # really mixed
    packed = convert_checkpoint(model_dir, tmp_path / "packed.gguf", outtype="f16", hook=plan_hook(plan),
                                extra_kv=plan_metadata(plan))
    plain = convert_checkpoint(model_dir, tmp_path / "plain.gguf", outtype="f16", hook=_dequant_hook(plan))
    rep = read_report(packed)
    assert rep.classes["experts"].n_bytes == plan.expert_bytes  # inspect agrees with the plan
    assert abs(rep.classes["experts"].bpw - plan.achieved_bpw) < 1e-9 and plan.achieved_bpw <= bpw
    assert rep.metadata["mcsharp.pmq.mode"] == mode
    names = [t.name for t in rep.tensors]
    assert any(".g1.weight" in n for n in names) == (mode == "mixed")

    ids = np.random.default_rng(0).integers(0, 49152, 48)
    got = llama.logits_for(llama.load_model(packed, n_ctx=64), ids)
    ref = llama.logits_for(llama.load_model(plain, n_ctx=64), ids)
    per_token = np.abs(got - ref).max(-1) / np.abs(ref).max()
    # llama.cpp quantises activations for quantised weights, not for F32 ones (see test_runtime_agreement)
    assert np.median(per_token) <= 5e-2
    if bpw >= 6:
        assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.98


def test_spilled_tensors_are_written_like_arrays(tmp_path):
    """A hook's tensors wait in a TensorSpill file (not in memory) until the writer lays out the GGUF: gguf-py's
    writer takes them as it takes arrays, and its reader gets the same values back."""
    import gguf

    from mcsharp_gguf.gguf.convert import TensorSpill

    rng = np.random.default_rng(0)
    arrays = {"a": rng.standard_normal((3, 64)).astype(np.float32), "b": rng.integers(0, 255, (5, 18), np.uint8),
              "c": rng.standard_normal((2, 4, 32)).astype(np.float16)}
    spill = TensorSpill(tmp_path)
    try:
        w = gguf.GGUFWriter(tmp_path / "t.gguf", "llama")
        for name, arr in arrays.items():
            w.add_tensor(name, spill.add(arr), raw_dtype=gguf.GGMLQuantizationType.Q4_0 if name == "b" else None)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    finally:
        spill.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.gguf"]  # the spill file is gone
    got = {t.name: t for t in gguf.GGUFReader(tmp_path / "t.gguf").tensors}
    np.testing.assert_array_equal(np.asarray(got["a"].data).reshape(3, 64), arrays["a"])
    np.testing.assert_array_equal(np.asarray(got["c"].data).reshape(2, 4, 32), arrays["c"])
    assert np.asarray(got["b"].data).tobytes() == arrays["b"].tobytes()
