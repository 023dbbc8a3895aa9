"""Real layer shapes: the random-weight checkpoint writer, the one-decoder-layer memory bound of a whole
conversion, and the checks that stop a conversion that cannot finish (disk) or read (a bad shard)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mcsharp_gguf.errors import McsharpError

pytestmark = pytest.mark.slow  # tiny and real-shape checkpoints carry the cached SmolLM2 tokenizer


def test_disk_check_refuses_before_any_work(tiny_model, tmp_path, monkeypatch):
    """Too little free disk for output + work dir: a one-line error with the bytes needed, before calibration."""
    from mcsharp_gguf.gguf import convert
    from mcsharp_gguf.model import calibration
    from mcsharp_gguf.pipeline import check_disk
    from mcsharp_gguf.recipe import Recipe

    model = tiny_model("qwen3moe")
    monkeypatch.setattr(convert, "_free_bytes", lambda p: 1000)
    monkeypatch.setattr(calibration, "calibration_token_ids", lambda *a, **k: pytest.fail("calibration ran"))
    with pytest.raises(McsharpError) as e:
        check_disk(model, tmp_path / "o.gguf", Recipe(bpw=4.0), 4.0, True, tmp_path / "o.gguf.work")
    msg = str(e.value)
    assert "\n" not in msg and "not enough free disk" in msg and "GB" in msg and str(tmp_path) in msg
    # the same numbers the CLI refuses on, and nothing is written
    from click.testing import CliRunner

    from mcsharp_gguf.cli import cli

    res = CliRunner().invoke(cli, ["convert", str(model), "-o", str(tmp_path / "o.gguf"), "--bpw", "4",
                                   "--calib", str(model / "config.json")], standalone_mode=False)
    assert isinstance(res.exception, McsharpError) and "not enough free disk" in str(res.exception)
    assert not (tmp_path / "o.gguf").exists() and not (tmp_path / "o.gguf.work").exists()
    # with room to spare the check passes
    monkeypatch.setattr(convert, "_free_bytes", lambda p: 10**15)
    check_disk(model, tmp_path / "o.gguf", Recipe(bpw=4.0), 4.0, True, tmp_path / "o.gguf.work")


def test_truncated_shard_is_named_by_the_layer_stream(tiny_model, tmp_path):
    import shutil

    from mcsharp_gguf.model.stream import LayerStream

    src = tiny_model("qwen3moe")
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    shard = sorted(bad.glob("*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[:len(data) // 2])
    with pytest.raises(McsharpError) as e:
        LayerStream.open(bad)
    assert str(shard) in str(e.value) and "truncated" in str(e.value)


def test_unsupported_architecture_lists_the_supported(tiny_model, tmp_path):
    import shutil

    from mcsharp_gguf.converters import supported_architectures

    from mcsharp_gguf.model.stream import LayerStream

    bad = tmp_path / "other"
    shutil.copytree(tiny_model("qwen3moe"), bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(McsharpError) as e:
        LayerStream.open(bad)
    assert all(a in str(e.value) for a in supported_architectures())


@pytest.fixture(scope="module")
def olmoe_layer(tmp_path_factory) -> Path:
    """One decoder layer of OLMoE-1B-7B's real shapes (64 experts × 1024 × 2048, 0.8 GB in bf16)."""
    from mcsharp_gguf.dev.scale import write_real_shape_checkpoint

    return write_real_shape_checkpoint("olmoe-1b-7b", tmp_path_factory.mktemp("scale") / "olmoe", 1)


def test_real_shape_checkpoint_matches_its_model(olmoe_layer, tmp_path):
    """OLMoE-1B-7B's shapes at one layer: every tensor the architecture adapter stacks is there with the real
    shapes, llama.cpp's converter accepts the directory, and the layer stream loads the layer as transformers
    lays it out."""
    from mcsharp_gguf.dev.scale import SHAPES, layer_bytes_bf16, write_real_shape_checkpoint
    from mcsharp_gguf.model.checkpoint import validate_model_dir
    from mcsharp_gguf.model.stream import LayerStream

    shape = SHAPES["olmoe-1b-7b"].config
    model = olmoe_layer
    index = json.loads((model / "model.safetensors.index.json").read_text())
    names = index["weight_map"]
    e, ff, d = shape["num_experts"], shape["intermediate_size"], shape["hidden_size"]
    assert sum(".experts." in n for n in names) == 3 * e
    # bytes of layer 0 from the headers = what the real model's layer holds in bf16 (experts + attention + router)
    experts = 3 * e * ff * d
    attn = 4 * d * d
    assert layer_bytes_bf16(model) == 2 * (experts + attn + e * d + 2 * d + 2 * d)
    validate_model_dir(model)
    stream = LayerStream.open(model)
    layer = stream.load_layer(0)
    ex = stream.moe_block(layer).experts
    assert tuple(ex.gate_up_proj.shape) == (e, 2 * ff, d) and tuple(ex.down_proj.shape) == (e, d, ff)
    assert ex.gate_up_proj.dtype == torch.float32
    # deterministic: a second write is byte-identical
    again = write_real_shape_checkpoint("olmoe-1b-7b", tmp_path / "olmoe2", 1)
    for f in sorted(model.glob("*.safetensors")):
        assert (again / f.name).read_bytes() == f.read_bytes()


def test_gptq_pass_keeps_experts_bf16_with_the_same_bits(tiny_model, tmp_path, monkeypatch):
    """On the CPU the GPTQ pass keeps a bf16 checkpoint's experts bf16 (half a Mixtral layer's 5.6 GB) and widens
    one expert at a time: the layers' outputs, before and after their experts are quantised, and so every
    packed byte, are those of the float32 layer; finished experts decoded once into float32 or by the forward
    as it takes each (above DECODE_ONCE_BYTES), the same bytes again."""
    from mcsharp_gguf.model.calibration import calibration_token_ids
    from mcsharp_gguf.model.stream import LayerStream
    from mcsharp_gguf.pmq.candidates import Recipe
    from mcsharp_gguf.pmq.plan import BitPlan
    from mcsharp_gguf.quant import experts as experts_module
    from mcsharp_gguf.quant import sequential
    from mcsharp_gguf.text import calibration_text

    model = tiny_model("qwen3moe", hidden=256, expert_ff=256, dtype="bf16")
    ids = calibration_token_ids(model, calibration_text(20_000), 4, 128)  # 512 tokens: GPTQ on pooled Hessians
    wide, kept = LayerStream.open(model), LayerStream.open(model, experts_as_stored=True)
    h_wide = h_kept = wide.embed(ids)
    pairs = zip(wide.layers(h_wide.shape[1]), kept.layers(h_kept.shape[1]), strict=True)
    for (i, lw, run_w), (_, lk, run_k) in pairs:
        ek = kept.moe_block(lk).experts
        assert ek.gate_up_proj.dtype == torch.bfloat16 and wide.moe_block(lw).experts.down_proj.dtype == torch.float32
        h_wide, h_kept = run_w(h_wide), run_k(h_kept)
        assert torch.equal(h_wide, h_kept), i

    r = Recipe.for_shapes("Q4_K", 256, 256)
    plan = BitPlan(mode="stock", target_bpw=4.5, achieved_bpw=4.5, expert_bytes=0, expert_weights=0,
                   layers={i: ["Q4_K"] * 8 for i in range(2)},
                   recipes={f"{i}:Q4_K": {"gate": r.gate, "up": r.up, "down": r.down} for i in range(2)})
    sequential.quantize_experts(model, plan, ids, tmp_path / "kept", progress=False)
    with monkeypatch.context() as m:
        m.setattr(experts_module, "DECODE_ONCE_BYTES", 0)
        sequential.quantize_experts(model, plan, ids, tmp_path / "per-forward", progress=False)
    opened = LayerStream.open.__func__
    monkeypatch.setattr(LayerStream, "open", classmethod(
        lambda cls, d, device="cpu", experts_as_stored=False: opened(cls, d, device, False)))
    sequential.quantize_experts(model, plan, ids, tmp_path / "wide", progress=False)
    for i in range(2):  # layer 1's bytes depend on layer 0's quantised forward
        a, *others = (sequential.load_work_entry(tmp_path / w / f"layer-{i:04d}.pt")
                      for w in ("kept", "wide", "per-forward"))
        for b in others:
            assert a["packed"].keys() == b["packed"].keys()
            assert all(np.array_equal(a["packed"][k], b["packed"][k]) for k in a["packed"]), i


def test_importance_pass_keeps_experts_bf16_with_the_same_result(tiny_model, monkeypatch):
    """On the CPU the importance pass keeps a bf16 checkpoint's experts bf16 too (at Mixtral-8x7B's shape the
    float32 ones took its peak over the bound): forward and reverse pass widen one expert at a time, and every
    figure it measures (expert eps at every type on a neuron sample, dense Fisher errors, gradients carried
    through the reverse pass, the flip probe) is that of the float32 layer, bit for bit."""
    from mcsharp_gguf.model.calibration import calibration_token_ids
    from mcsharp_gguf.model.stream import LayerStream
    from mcsharp_gguf.pmq.measure import measure_importance
    from mcsharp_gguf.text import calibration_text

    model = tiny_model("mixtral", hidden=256, expert_ff=1024, dtype="bf16")
    ids = calibration_token_ids(model, calibration_text(20_000), 4, 128)

    def measure():
        return measure_importance(model, ids, targets=("Q2_K", "Q4_K"), dense=True, tap_seqs=2,
                                  flip_probe="Q2_K", probe_seqs=2, neuron_sample=512, progress=False).to_json()

    kept_opened, opened = [], LayerStream.open.__func__

    def spy(cls, d, device="cpu", experts_as_stored=False):
        kept_opened.append(experts_as_stored)
        return opened(cls, d, device, experts_as_stored)

    monkeypatch.setattr(LayerStream, "open", classmethod(spy))
    kept = measure()
    assert kept_opened[0] is True  # (the flip probe's stream is float32: it writes dequantised experts in)
    monkeypatch.setattr(LayerStream, "open", classmethod(
        lambda cls, d, device="cpu", experts_as_stored=False: opened(cls, d, device, False)))
    assert kept == measure()


def test_conversion_peak_rss_within_one_layer_bound(olmoe_layer, tmp_path):
    """A whole compressed conversion (importance, MILP, GPTQ, write) of a real-shape checkpoint stays within
    2 × one decoder layer in bf16 + 3 GB of resident memory, measured as its own process."""
    from mcsharp_gguf.dev.scale import layer_bytes_bf16
    from mcsharp_gguf.stages import run_with_peak_rss
    from mcsharp_gguf.text import calibration_text

    model = olmoe_layer
    calib = tmp_path / "calib.txt"
    calib.write_text(calibration_text(20_000))
    out = tmp_path / "out.gguf"
    wall, rss, rc, err = run_with_peak_rss([sys.executable, "-m", "mcsharp_gguf.cli", "convert", str(model), "-o",
                                            str(out), "--bpw", "3.5", "--budget-scope", "file", "--mode", "stock",
                                            "--calib", str(calib), "--calib-seqs", "2", "--json"])
    assert rc == 0, err[-3000:]
    stages = [ln for ln in err.splitlines() if ln.startswith("[stage] ")]
    # each stage resets the kernel's high-water mark (stages.py): the process's peak is the largest stage's
    rss = max([rss] + [float(ln.rsplit("peak RSS ", 1)[1].split()[0]) for ln in stages])
    bound_mb = (2 * layer_bytes_bf16(model) + 3e9) / 2**20
    assert rss <= bound_mb, f"peak RSS {rss:.0f} MB > bound {bound_mb:.0f} MB"
    # the layer really was materialised in float32: the bound is not met by doing nothing
    assert rss > 2 * layer_bytes_bf16(model) / 2**20
    assert [s.split(":")[0] for s in stages] == ["[stage] calibration", "[stage] importance",
                                                 "[stage] plan (MILP)", "[stage] gptq", "[stage] gguf write"]
    assert out.stat().st_size > 0 and math.isfinite(wall)
    assert not Path(str(out) + ".work").exists()


def test_importance_resumes_where_it_was_stopped(tiny_model, tmp_path, monkeypatch):
    """A planning pass killed after its first (top) layer continues from the next one on rerun, computes the
    finished layer no second time, and gives exactly the result of one uninterrupted run."""
    from mcsharp_gguf.model.calibration import calibration_token_ids
    from mcsharp_gguf.pmq import measure
    from mcsharp_gguf.text import calibration_text

    model = tiny_model("qwen3moe")
    ids = calibration_token_ids(model, calibration_text(20_000), 4, 64)
    kw = dict(targets=("Q2_K", "Q4_K"), dense=True, progress=False)
    whole = measure.measure_importance(model, ids, **kw)

    real = measure._layer_record
    calls = []

    def dies_on_second(m, item, names):
        calls.append(item.index)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a kill between layers
        return real(m, item, names)

    monkeypatch.setattr(measure, "_layer_record", dies_on_second)
    work = tmp_path / "work"
    with pytest.raises(KeyboardInterrupt):
        measure.measure_importance(model, ids, work_dir=work, **kw)
    assert calls == [1, 0]
    calls.clear()
    monkeypatch.setattr(measure, "_layer_record", lambda m, item, names: (calls.append(item.index),
                                                                          real(m, item, names))[1])
    resumed = measure.measure_importance(model, ids, work_dir=work, **kw)
    assert calls == [0]  # layer 1 was not measured again
    assert resumed.to_json() == whole.to_json()
    # other calibration tokens: the kept state is not reused
    calls.clear()
    measure.measure_importance(model, ids[:2], work_dir=work, **kw)
    assert calls == [1, 0]
