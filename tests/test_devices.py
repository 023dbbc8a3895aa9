"""--device: choosing the device (every machine), and the torch stages on a CUDA GPU against the CPU (a GPU machine:
skipped elsewhere with the reason; docs/devices.md records the last run on one)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from mcsharp_gguf.devices import resolve_device
from mcsharp_gguf.errors import McsharpError

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA GPU here; run `pytest tests/test_devices.py` on a GPU "
                                                 "machine (docs/devices.md)")


def test_resolve_device_names(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    for bad in ("gpu", "cuda:x", "mps", ""):
        with pytest.raises(McsharpError, match="expected auto, cpu, cuda or cuda:N"):
            resolve_device(bad)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    for name in ("cuda", "cuda:1"):
        with pytest.raises(McsharpError) as e:
            resolve_device(name)
        assert "\n" not in str(e.value) and "--device cpu" in str(e.value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    with pytest.raises(McsharpError, match="sees 1 CUDA GPU"):
        resolve_device("cuda:1")


@pytest.mark.skipif(CUDA, reason="checks the error of a machine without a GPU")
def test_convert_device_cuda_without_gpu_fails_before_work(tmp_path):
    from click.testing import CliRunner

    from mcsharp_gguf.cli import cli

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    for cmd in (["convert", str(model), "-o", str(tmp_path / "m.gguf"), "--device", "cuda"],
                ["convert", str(model), "-o", str(tmp_path / "m.gguf"), "--device", "tpu"]):
        res = CliRunner().invoke(cli, cmd, standalone_mode=False)
        assert isinstance(res.exception, McsharpError), res.exception  # (main prints it in one line, exit 2)
        assert str(res.exception).startswith(f"--device {cmd[-1]}") and "\n" not in str(res.exception)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def _synthetic(rows: int, cols: int, seed: int = 0):
    from mcsharp_gguf.quant.gptq import HessianAccumulator

    g = torch.Generator().manual_seed(seed)
    X = torch.randn(4 * cols, cols, generator=g) @ (torch.eye(cols) + 0.1 * torch.randn(cols, cols, generator=g))
    acc = HessianAccumulator(cols)
    acc.add(X)
    return torch.randn(rows, cols, generator=g) * 0.05, acc.H


@needs_cuda
@pytest.mark.parametrize("t", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "IQ4_NL", "Q4_0"])
def test_gptq_on_cuda_packs_exactly_and_matches_cpu(t):
    """GPTQ walked on the GPU: its bytes decode (gguf-py, an independent decoder) to exactly the dequantised
    weights it reports; against the CPU walk the output error is within 1% and most codes agree (≥ 85%: a walk
    that rounds one column differently carries that into the columns after it; Q8_0's dense levels flip most)."""
    import gguf

    from mcsharp_gguf.ggml.types import ggml_type
    from mcsharp_gguf.quant.gptq import gptq_factor, gptq_quantize, gptq_quantize_many, output_error

    W, H = _synthetic(512, 1024)
    cpu = gptq_quantize(W, H, t)
    gpu = gptq_quantize(W.cuda(), H.cuda(), t)
    assert gpu.dequant.device.type == "cuda" and gpu.packed.dtype == np.uint8
    decoded = gguf.quants.dequantize(gpu.packed, ggml_type(t)).reshape(W.shape)
    np.testing.assert_array_equal(decoded, gpu.dequant.cpu().numpy())
    agree = float((cpu.codes == gpu.codes.cpu()).float().mean())
    e_cpu, e_gpu = output_error(W, cpu.dequant, H), output_error(W, gpu.dequant.cpu(), H)
    assert agree >= 0.85, (t, agree)
    assert abs(e_gpu / e_cpu - 1) < 0.01, (t, e_cpu, e_gpu)
    # several matrices walked together on the GPU (what the conversion does with a layer's experts)
    mats = [(W, H)] + [_synthetic(512, 1024, seed=s) for s in (1, 2)]
    many = gptq_quantize_many([w.cuda() for w, _ in mats], [gptq_factor(h.cuda(), 1024) for _, h in mats], t)
    for (w, h), res in zip(mats, many, strict=True):
        decoded = gguf.quants.dequantize(res.packed, ggml_type(t)).reshape(w.shape)
        np.testing.assert_array_equal(decoded, res.dequant.cpu().numpy())
        ratio = output_error(w, res.dequant.cpu(), h) / output_error(w, gptq_quantize(w, h, t).dequant, h)
        assert abs(ratio - 1) < 0.01, (t, ratio)


def _tensors(path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF as float32, quantised ones decoded by libggml (gguf-py cannot decode Q1_0)."""
    import gguf

    from mcsharp_gguf.ggml.libggml import ggml_dequantize

    out = {}
    for t in gguf.GGUFReader(path).tensors:
        kind = t.tensor_type.name
        if kind in ("F32", "F16"):
            out[t.name] = np.asarray(t.data, np.float32).reshape(-1)
        else:
            ne0 = int(t.shape[0])
            out[t.name] = ggml_dequantize(np.asarray(t.data), kind, (int(t.n_elements) // ne0, ne0)).reshape(-1)
    return out


def _conversions(model, tmp_path, runs: dict[str, str]) -> dict:
    """A compressed conversion (importance, stock plan, GPTQ, OTP) of ``model`` per entry name → device, and
    the lossless F32 file, by name "f32"."""
    from mcsharp_gguf.pipeline import run
    from mcsharp_gguf.recipe import Recipe

    recipe = Recipe(bpw=3.5, otp=True, calib_seqs=4, calib_len=64)
    tmp_path.mkdir(parents=True, exist_ok=True)
    outs = {name: run(recipe, model, tmp_path / f"{name}.gguf", device=dev, log=lambda s: None)
            for name, dev in runs.items()}
    outs["f32"] = run(Recipe(preset="F32"), model, tmp_path / "f32.gguf", log=lambda s: None)
    return outs


def assert_same_conversion(ref, other, f32) -> None:
    """Two conversions of one model that differ only by float rounding (another device, experts walked
    together): ≥ 90% of the experts get the same type; every tensor typed alike has its quantisation error within
    3% of the reference's and differs from it by less than 1.5 × that error; the total error is within 2%; the
    routers execute the same fraction within 0.02."""
    same = [x == y for i in ref.plan.layers for x, y in zip(ref.plan.layers[i], other.plan.layers[i], strict=True)]
    assert np.mean(same) >= 0.9, np.mean(same)
    a, b, full = _tensors(ref.out), _tensors(other.out), _tensors(f32.out)
    err_a = err_b = 0.0
    for k in a.keys() & b.keys() & full.keys():
        if a[k].shape != full[k].shape or b[k].shape != full[k].shape or np.array_equal(a[k], full[k]):
            continue  # unquantised (norms, router) or typed differently in the two files
        qa, qb = np.linalg.norm(a[k] - full[k]), np.linalg.norm(b[k] - full[k])
        # the layers after the first calibrate on inputs that already differ a little, so GPTQ's choices there
        # differ about as much as two equally good quantisations do (0.6-1.1 × the error, measured); not more
        assert np.linalg.norm(b[k] - a[k]) < 1.5 * qa + 1e-6 and abs(qb / qa - 1) < 0.03, (k, qb / qa)
        err_a, err_b = err_a + qa ** 2, err_b + qb ** 2
    assert err_a > 0 and abs(err_b / err_a - 1) < 0.02, (err_a, err_b)
    assert abs(other.routers.calib_frac - ref.routers.calib_frac) < 0.02


@pytest.mark.slow  # (tiny_model: the SmolLM2 tokenizer, pinned converter)
def test_experts_walked_together_convert_alike(tiny_model, tmp_path, monkeypatch):
    """The GPU's batched expert walks (quant.experts.WALK), run on the CPU: the same conversion up to rounding."""
    from mcsharp_gguf.quant import experts

    model = tiny_model("qwen3moe", hidden=256, expert_ff=256)
    ref = _conversions(model, tmp_path, {"one": "cpu"})
    monkeypatch.setitem(experts.WALK, "cpu", 3)  # 8 experts: walks of 3, 3, 2
    other = _conversions(model, tmp_path / "w", {"three": "cpu"})
    assert_same_conversion(ref["one"], other["three"], ref["f32"])


@needs_cuda
@pytest.mark.parametrize("arch", ["qwen3moe", "mixtral"])
def test_convert_on_cuda(tiny_model, tmp_path, arch):
    """A whole compressed conversion on the GPU: the same bytes twice, and the CPU's conversion up to rounding
    (assert_same_conversion)."""
    outs = _conversions(tiny_model(arch, hidden=256, expert_ff=256), tmp_path,
                        {"cpu": "cpu", "cuda": "cuda", "cuda2": "cuda"})
    assert hashlib.sha256(outs["cuda"].out.read_bytes()).digest() == \
        hashlib.sha256(outs["cuda2"].out.read_bytes()).digest()
    assert_same_conversion(outs["cpu"], outs["cuda"], outs["f32"])
