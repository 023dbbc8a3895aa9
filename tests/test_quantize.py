"""Sequential GPTQ of planned experts: resumable, deterministic, and better than RTN at the same size."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from mcsharp_gguf.calib import calibration_token_ids
from mcsharp_gguf.convert import convert_checkpoint
from mcsharp_gguf.errors import McsharpError
from mcsharp_gguf.evaluate import evaluate_gguf
from mcsharp_gguf.pack import plan_hook, plan_metadata, rtn_quantiser
from mcsharp_gguf.pmq import measure_importance, solve_bit_plan
from mcsharp_gguf.quantize import WorkDirQuantiser, quantize_experts
from mcsharp_gguf.text import calibration_text, heldout_text


@pytest.fixture(scope="module")
def setup(tiny_model):
    model_dir = tiny_model("qwen2moe", hidden=256, expert_ff=256)
    ids = calibration_token_ids(model_dir, calibration_text(120_000), 16, 256)
    plan = solve_bit_plan(measure_importance(model_dir, ids, progress=False).layers, 3.2, mode="mixed")
    return model_dir, ids, plan


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_resume_and_byte_identical_output(setup, tmp_path):
    model_dir, ids, plan = setup
    work = quantize_experts(model_dir, plan, ids, tmp_path / "work", progress=False)
    first = convert_checkpoint(model_dir, tmp_path / "a.gguf", hook=plan_hook(plan, WorkDirQuantiser(work)),
                               extra_kv=plan_metadata(plan))
    layer1 = work / "layer-0001.pt"
    layer1.unlink()  # as if killed after finishing layer 0
    mtime0 = (work / "layer-0000.pt").stat().st_mtime_ns
    quantize_experts(model_dir, plan, ids, work, progress=False)
    assert (work / "layer-0000.pt").stat().st_mtime_ns == mtime0  # finished layer not redone
    second = convert_checkpoint(model_dir, tmp_path / "b.gguf", hook=plan_hook(plan, WorkDirQuantiser(work)),
                                extra_kv=plan_metadata(plan))
    assert _sha(first) == _sha(second)
    other = solve_bit_plan(measure_importance(model_dir, ids, progress=False).layers, 4.5, mode="mixed")
    with pytest.raises(McsharpError, match="different plan"):
        quantize_experts(model_dir, other, ids, work, progress=False)


def test_gptq_beats_rtn_at_equal_size(setup, tmp_path):
    """GPTQ's file is closer to F16 than RTN's with the same plan and bytes.

    The plan is MC's per-layer one, which puts a third of these random-weight experts at 1-2 bits, where GPTQ's
    gain is far above the eval noise. (With the Fisher plan, mostly 3-4 bits here, the two measured even:
    0.0151 vs 0.0142 at 3.2 bpw, 0.0656 vs 0.0654 at 2.5 bpw; on the real fixture GPTQ wins clearly, see README.)
    """
    model_dir, ids, _ = setup
    plan = solve_bit_plan(measure_importance(model_dir, ids, progress=False).layers, 3.2, mode="mixed",
                          metric="mc", scope="layer")
    base = convert_checkpoint(model_dir, tmp_path / "f16.gguf", outtype="f16")
    work = quantize_experts(model_dir, plan, ids, tmp_path / "work", progress=False)
    gptq = convert_checkpoint(model_dir, tmp_path / "gptq.gguf", hook=plan_hook(plan, WorkDirQuantiser(work)))
    rtn = convert_checkpoint(model_dir, tmp_path / "rtn.gguf", hook=plan_hook(plan, rtn_quantiser))
    assert gptq.stat().st_size == rtn.stat().st_size
    text = heldout_text()[:8000]
    kld_gptq = evaluate_gguf(gptq, text, base_path=base, ctx=256, max_tokens=1024, progress=False).kld_mean
    kld_rtn = evaluate_gguf(rtn, text, base_path=base, ctx=256, max_tokens=1024, progress=False).kld_mean
    print(f"KLD vs F16: GPTQ {kld_gptq:.4f}, RTN {kld_rtn:.4f}")
    assert kld_gptq < kld_rtn


def test_unreached_experts_fall_back_to_rtn(setup):
    from mcsharp_gguf.formats import quantize_rtn
    from mcsharp_gguf.quantize import quantize_layer_experts

    g = torch.Generator().manual_seed(0)
    gate_up, down = torch.randn(2, 512, 256, generator=g) * 0.05, torch.randn(2, 256, 256, generator=g) * 0.05
    x = torch.randn(300, 256, generator=g)
    idx = torch.zeros(300, 1, dtype=torch.long)  # every token goes to expert 0
    types = [{"gate": "Q4_K", "up": "Q4_K", "down": "Q4_K"}] * 2
    res = quantize_layer_experts(gate_up, down, x, idx, types, torch.nn.functional.silu)
    assert res["tokens"] == [300, 0]
    assert np.array_equal(res["packed"][(1, "down")], quantize_rtn(down[1], "Q4_K").packed)
    assert not np.array_equal(res["packed"][(0, "down")], quantize_rtn(down[0], "Q4_K").packed)
    # fewer tokens than the 256-wide inputs: a singular Hessian, RTN instead
    few = quantize_layer_experts(gate_up, down, x[:100], idx[:100], types, torch.nn.functional.silu)
    assert all(np.array_equal(few["packed"][(0, p)], quantize_rtn(w, "Q4_K").packed)
               for p, w in (("gate", gate_up[0, :256]), ("down", down[0])))
