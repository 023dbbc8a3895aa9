"""GPTQ of the tensors outside the routed experts (attention, shared experts, LM head) in the PMQ layer stream.

The file must hold the GPTQ result itself (not an RTN stand-in), in the converter's row order (llama.cpp permutes
llama/mixtral q/k rows for RoPE), and the model must still compute what the F16 conversion computes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mcsharp_gguf.ggml.packing import quantize_rtn
from mcsharp_gguf.gguf.convert import convert_checkpoint
from mcsharp_gguf.gguf.edit import open_gguf
from mcsharp_gguf.model.stream import LayerStream, dense_linears
from mcsharp_gguf.pipeline import run
from mcsharp_gguf.quant.sequential import load_dense_entries
from mcsharp_gguf.recipe import Recipe
from mcsharp_gguf.runtime.evaluate import evaluate_gguf
from mcsharp_gguf.text import calibration_text, heldout_text

# tiny models (cached tokenizer), the pinned converter, libggml decoding of the work dir, the runtime
pytestmark = pytest.mark.slow

DENSE = {"dense_types": {"attn": "Q8_0", "ffn": "Q8_0", "embd": "Q8_0", "output": "Q8_0"},
         "tensor_types": ((r"blk\.1\.attn_v", "Q5_0"),)}


@pytest.fixture()
def calib(tmp_path) -> str:
    path = tmp_path / "calib.txt"
    path.write_text(calibration_text(60_000))
    return str(path)


@pytest.mark.parametrize("arch", ["qwen2moe", "mixtral"])
def test_dense_gptq_lands_in_the_file(arch, tiny_model, tmp_path, calib):
    model = tiny_model(arch)
    work = tmp_path / "work"
    recipe = Recipe(bpw=8.0, mode="mixed", scope="global", calib=calib, calib_seqs=8, calib_len=128, **DENSE)
    out = run(recipe, model, tmp_path / "q.gguf", work_dir=work, log=lambda *_: None).out
    reader = open_gguf(out)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    data = {t.name: np.asarray(t.data) for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.1.attn_output.weight"] == "Q8_0"
    assert types["token_embd.weight"] == "Q8_0" and types["output.weight"] == "Q8_0"
    assert types["blk.1.attn_v.weight"] == "Q5_0" and types["blk.0.attn_v.weight"] == "Q8_0"  # a --tensor-type rule
    if arch == "qwen2moe":
        assert types["blk.0.ffn_down_shexp.weight"] == "Q8_0"
        assert types["blk.0.ffn_gate_inp_shexp.weight"] in ("F32", "F16")  # a 1-row gate stays as it was
    assert types["blk.0.ffn_gate_inp.weight"] in ("F32", "F16")  # the router is never quantised

    stream = LayerStream.open(model)
    entries = load_dense_entries(work, 0)
    assert {e["local"] for e in entries.values()} == set(dense_linears(stream.load_layer(0), stream.arch))
    # the file holds the GPTQ bytes (in the converter's row order), which differ from plain RTN
    q = entries["model.layers.0.self_attn.q_proj.weight"]
    stored = data["blk.0.attn_q.weight"]
    assert sorted(map(bytes, stored)) == sorted(map(bytes, q["packed"]))
    w = stream.tensors["model.layers.0.self_attn.q_proj.weight"]
    assert not np.array_equal(np.sort(stored, axis=0), np.sort(np.asarray(quantize_rtn(w, "Q8_0").packed), axis=0))
    if arch == "mixtral":  # llama.cpp permuted the q rows: the hook reordered the packed rows to match
        assert not np.array_equal(stored, q["packed"])
    else:
        assert np.array_equal(stored, q["packed"])

    f16 = convert_checkpoint(model, tmp_path / "f16.gguf", outtype="f16")
    res = evaluate_gguf(out, heldout_text()[:6000], base_path=f16, ctx=128, max_tokens=512, progress=False)
    # a random tiny model has near-flat logits (top-1 flips at near-ties: 94-97% agreement measured), so KLD is
    # the check here; rows in the wrong order would be a different model
    assert res.kld_mean < 1e-3, res


def test_dense_types_need_a_plan(tiny_model, tmp_path):
    from mcsharp_gguf.errors import McsharpError

    with pytest.raises(McsharpError, match="need a PMQ plan"):
        run(Recipe(preset="F16", scope="global", **DENSE), tiny_model("qwen2moe"), tmp_path / "x.gguf",
            log=lambda *_: None)
    assert not (tmp_path / "x.gguf").exists()


def test_dense_linears_skip_router_and_tiny_gates(tiny_model):
    stream = LayerStream.open(tiny_model("qwen2moe"))
    names = dense_linears(stream.load_layer(0), stream.arch)
    assert "mlp.gate" not in names and "mlp.shared_expert_gate" not in names
    assert names["self_attn.q_proj"][0] == "attn" and names["mlp.shared_expert.down_proj"][0] == "ffn"
    assert all(isinstance(m, torch.nn.Linear) for _, m in names.values())


def test_whole_file_plan_sets_every_type_within_budget(tiny_model, tmp_path, calib):
    """`--budget-scope file`: one budget over experts and every quantised non-expert tensor; the file holds
    exactly the plan's types, the planned bytes fit the budget, and the model stays close to F16."""
    from mcsharp_gguf.errors import McsharpError
    from mcsharp_gguf.ggml.types import bits_per_weight

    model = tiny_model("qwen2moe")
    recipe = Recipe(bpw=5.0, mode="mixed", calib=calib, calib_seqs=8, calib_len=128)
    res = run(recipe, model, tmp_path / "f.gguf", log=lambda *_: None)
    from mcsharp_gguf.gguf.inspect import read_report

    assert Recipe.from_json(read_report(res.out).to_json()["metadata"]["mcsharp.recipe"]) == recipe  # in the file
    plan = res.plan
    types = {t.name: (t.tensor_type.name, int(t.n_bytes)) for t in open_gguf(res.out).tensors}
    assert plan.tensor_types and {"token_embd.weight", "output.weight", "blk.1.attn_q.weight",
                                  "blk.0.ffn_down_shexp.weight"} <= set(plan.tensor_types)
    assert all(types[n][0] == t for n, t in plan.tensor_types.items())
    dense_bytes = sum(types[n][1] for n in plan.tensor_types)
    assert dense_bytes == plan.dense_bytes
    assert plan.expert_bytes + plan.dense_bytes <= 5.0 * (plan.expert_weights + plan.dense_weights) / 8
    assert len({bits_per_weight(t) for t in plan.tensor_types.values()}) > 1  # a real choice, not one type
    f16 = convert_checkpoint(model, tmp_path / "f16.gguf", outtype="f16")
    ev = evaluate_gguf(res.out, heldout_text()[:6000], base_path=f16, ctx=128, max_tokens=512, progress=False)
    assert ev.kld_mean < 0.05, ev
    with pytest.raises(McsharpError, match="whole-file plan"):
        Recipe(bpw=5.0, **DENSE)
