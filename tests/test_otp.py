"""OTP: router training learns what to drop, the runtime executes exactly the slots the trained router keeps,
and the GGUF round trip (convert --otp, otp add / strip, eval / bench knobs) behaves as the CLI promises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mcsharp_gguf.errors import McsharpError
from mcsharp_gguf.otp.capture import OtpLayerData
from mcsharp_gguf.otp.io import OtpRouters
from mcsharp_gguf.otp.router import hard_keep, layer_logits, mask_error
from mcsharp_gguf.otp.train import fit_otp
from mcsharp_gguf.runtime.prune import prune_overrides

TOP_K = 4


def _cli(*args, timeout=900) -> subprocess.CompletedProcess:
    """The real `mcsharp` entry point in its own process: exit status 2 and the one-line error are main()'s."""
    return subprocess.run([sys.executable, "-m", "mcsharp_gguf.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


def _invoke(*args) -> str:
    """A command that must succeed, run in this process (click's runner); returns its stdout."""
    from click.testing import CliRunner

    from mcsharp_gguf.cli import cli

    res = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res.stdout


def synthetic_layer(n: int, d: int = 32, k: int = TOP_K, seed: int = 0, layer: int = 0) -> OtpLayerData:
    """Slots with orthogonal outputs whose sizes |a_j·x| depend on the input: the best slots to drop change
    from token to token, and the routing weights (uniform) say nothing about it."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(k, d, generator=torch.Generator().manual_seed(123))
    x = torch.randn(n, d, generator=g)
    size = (x @ a.T).abs() + 0.05
    weights = torch.full((n, k), 1.0 / k)
    gram = torch.diag_embed(size ** 2)
    ref_sq = ((weights * size) ** 2).sum(-1)
    return OtpLayerData(layer=layer, x=x, weights=weights, gram=gram, ref_sq=ref_sq, renorm=False)


def test_router_learns_which_slots_to_drop():
    train, held = synthetic_layer(4096), synthetic_layer(2048, seed=1)
    res = fit_otp([train], target_frac=0.75, hidden=32, steps=600)
    logits = layer_logits(res.layers[0], held.x)
    frac = hard_keep(logits).mean().item()
    assert abs(frac - 0.75) < 0.05
    err_otp = mask_error(held, hard_keep(logits)).item()
    # static pruning at the same executed fraction: keep the first 3 of 4 slots
    err_static = mask_error(held, (torch.arange(TOP_K) < 3).float().expand(len(held.x), TOP_K)).item()
    # the oracle: drop the smallest slots over all tokens (errors add up: slot outputs are orthogonal and the
    # weights are not renormalised), as many as the router drops
    n_drop = int(round((1 - frac) * TOP_K * len(held.x)))
    size = held.gram.diagonal(dim1=1, dim2=2)[:, 1:].flatten()
    drop = torch.zeros_like(size)
    drop[torch.argsort(size)[:n_drop]] = 1
    oracle = torch.cat([torch.ones(len(held.x), 1), 1 - drop.reshape(len(held.x), TOP_K - 1)], dim=1)
    err_oracle = mask_error(held, oracle).item()
    print(f"held-out error at executed fraction {frac:.3f}: otp {err_otp:.4f}, static {err_static:.4f}, "
          f"oracle {err_oracle:.4f}")
    assert err_otp < 0.5 * err_static, (err_otp, err_static)
    assert err_otp < 3 * err_oracle + 1e-3, (err_otp, err_oracle)


def test_fit_hits_the_target_fraction_and_refuses_impossible_targets():
    data = [synthetic_layer(2048, seed=s, layer=s) for s in range(2)]
    res = fit_otp(data, target_frac=0.7, hidden=16, steps=200)
    assert abs(res.calib_frac - 0.7) < 0.02
    assert sorted(res.layers) == [0, 1] and res.layers[0]["w1"].shape == (16, 32) and res.layers[0]["b2"].shape == (4,)
    with pytest.raises(McsharpError, match="outside"):
        fit_otp(data, target_frac=0.2)  # below 1/k: slot 0 is always kept
    with pytest.raises(McsharpError, match="no MoE layers"):
        fit_otp([], target_frac=0.7)


def test_training_streams_one_layer_at_a_time_with_the_same_routers(tiny_model, calib_file, monkeypatch):
    """train_otp fits each layer's router as soon as that layer's data is captured (before the next layer loads;
    all layers' MoE inputs at once would be 6.4 GB at Qwen3-30B-A3B's depth), and capture keeps a bf16
    checkpoint's experts bf16 on the CPU: the routers are bit for bit those fitted on float32 layers' data held
    for every layer at once."""
    from mcsharp_gguf.model.calibration import calibration_token_ids
    from mcsharp_gguf.model.stream import LayerStream
    from mcsharp_gguf.otp import train
    from mcsharp_gguf.otp.capture import capture_otp_data

    model = tiny_model("mixtral", top_k=TOP_K, dtype="bf16")
    ids = calibration_token_ids(model, calib_file.read_text(), 2, 128)
    events, fit, load = [], train.fit_layer, LayerStream.load_layer

    def spy_fit(data, **kw):
        events.append(("fit", data.layer))
        return fit(data, **kw)

    def spy_load(self, i):
        events.append(("load", i, self.experts_as_stored))
        return load(self, i)

    monkeypatch.setattr(train, "fit_layer", spy_fit)
    monkeypatch.setattr(LayerStream, "load_layer", spy_load)
    streamed = train.train_otp(model, ids, target_frac=0.7, hidden=16, progress=False)
    assert events == [("load", 0, True), ("fit", 0), ("load", 1, True), ("fit", 1)]
    monkeypatch.undo()
    opened = LayerStream.open.__func__
    monkeypatch.setattr(LayerStream, "open", classmethod(
        lambda cls, d, device="cpu", experts_as_stored=False: opened(cls, d, device, False)))
    held = fit_otp(capture_otp_data(model, ids, progress=False), target_frac=0.7, hidden=16)
    assert (streamed.calib_frac, streamed.calib_err, streamed.lam) == (held.calib_frac, held.calib_err, held.lam)
    assert sorted(streamed.layers) == sorted(held.layers) == [0, 1]
    assert all(np.array_equal(streamed.layers[n][k], held.layers[n][k]) for n in held.layers for k in held.layers[n])


def test_router_file_round_trip(tmp_path):
    data = [synthetic_layer(512, layer=3)]
    res = fit_otp(data, target_frac=0.8, hidden=8, steps=50)
    res.save(tmp_path / "r.npz")
    back = OtpRouters.load(tmp_path / "r.npz")
    assert back.top_k == 4 and back.hidden == 8 and sorted(back.layers) == [3]
    assert all(np.array_equal(back.layers[3][k], res.layers[3][k]) for k in ("w1", "b1", "w2", "b2"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(McsharpError, match="not an OTP router file"):
        OtpRouters.load(tmp_path / "junk.npz")


def test_prune_overrides():
    assert prune_overrides() == {}
    assert prune_overrides(otp="off") == {"mcsharp.otp.enable": False}
    assert prune_overrides(otp="threshold=0.5") == {"mcsharp.moe.prune_mode": 1, "mcsharp.otp.threshold": 0.5}
    assert prune_overrides(top_k=2) == {"mcsharp.moe.prune_mode": 2, "mcsharp.moe.static_k": 2}
    assert prune_overrides(prune_mu=0.9)["mcsharp.moe.threshold_mu"] == 0.9
    with pytest.raises(McsharpError, match="choose one"):
        prune_overrides(otp="on", top_k=2)
    with pytest.raises(McsharpError, match="threshold=T"):
        prune_overrides(otp="maybe")


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory) -> Path:
    from mcsharp_gguf.text import calibration_text

    path = tmp_path_factory.mktemp("otp-calib") / "calib.txt"
    path.write_text(calibration_text(20_000))
    return path


@pytest.mark.slow  # the patched runtime, `mcsharp convert`, a tiny model
@pytest.mark.parametrize("arch", ["qwen2moe", "mixtral"])
def test_runtime_executes_exactly_what_the_router_keeps(arch, tiny_model, calib_file, tmp_path):
    """convert --otp, then compare the runtime's executed-slot counter with the router evaluated in numpy
    on transformers' MoE inputs for the same tokens (mixtral also renormalises the kept weights)."""
    from mcsharp_gguf.dev.tiny_models import load_hf, pick_tokens
    from mcsharp_gguf.otp.capture import capture_otp_data
    from mcsharp_gguf.runtime import llama

    model = tiny_model(arch, top_k=TOP_K)
    out = tmp_path / "otp.gguf"
    res = _cli("convert", model, "-o", out, "--preset", "F32", "--otp", "--otp-target-frac", "0.7",
               "--calib", calib_file, "--calib-seqs", "4", "--calib-len", "128")
    assert res.returncode == 0, res.stderr
    from mcsharp_gguf.gguf.edit import open_gguf

    reader = open_gguf(out)
    tensors = {t.name: np.array(t.data) for t in reader.tensors if ".ffn_otp_" in t.name}
    assert len(tensors) == 8
    ids = pick_tokens(load_hf(model), TOP_K, n=96)
    data = capture_otp_data(model, torch.tensor(ids)[None], progress=False)
    expected = near = 0
    for dat in data:
        lay = {k: tensors[f"blk.{dat.layer}.ffn_otp_{k}.{s}"] for k, s in
               (("w1", "weight"), ("b1", "bias"), ("w2", "weight"), ("b2", "bias"))}
        logits = layer_logits(lay, dat.x)
        near += (logits[:, 1:].abs() < 1e-4).sum().item()  # float noise may flip a logit this close to 0
        expected += hard_keep(logits).sum().item()
    llm = llama.load_model(out, n_ctx=128)
    llama.reset_slot_counter()
    llama.logits_for(llm, ids)
    selected, executed = llama.read_slot_counter()
    assert selected == len(ids) * TOP_K * len(data)
    assert abs(executed - expected) <= near, (executed, expected)
    assert executed < selected  # the router does drop slots on these tokens
    # the same file with OTP off runs every slot and counts nothing
    off = llama.load_model(out, n_ctx=128, kv_overrides=prune_overrides(otp="off"))
    llama.reset_slot_counter()
    llama.logits_for(off, ids)
    assert llama.read_slot_counter() == (0, 0)


@pytest.fixture(scope="module")
def plain_and_routers(tiny_model, tmp_path_factory, calib_file):
    """A plain F32 GGUF of a tiny qwen2moe and a router file trained on its checkpoint."""
    from mcsharp_gguf.gguf.convert import convert_checkpoint

    work = tmp_path_factory.mktemp("otp-add")
    model = tiny_model("qwen2moe", top_k=TOP_K)
    plain = convert_checkpoint(model, work / "plain.gguf", outtype="f32")
    res = _cli("otp", "train", model, "-o", work / "r.npz", "--otp-target-frac", "0.75", "--calib", calib_file,
               "--calib-seqs", "4", "--calib-len", "128")
    assert res.returncode == 0, res.stderr
    return model, plain, work / "r.npz"


@pytest.mark.slow  # the patched runtime (eval), the pinned converter
def test_otp_add_then_strip_restores_the_file_byte_for_byte(plain_and_routers, tmp_path):
    from mcsharp_gguf.gguf.inspect import read_report

    _, plain, routers = plain_and_routers
    with_otp = tmp_path / "otp.gguf"
    _invoke("otp", "add", plain, routers, "-o", with_otp)
    rep = read_report(with_otp)
    assert rep.to_json()["otp"] and rep.metadata["mcsharp.otp.version"] == 1
    res = _invoke("eval", with_otp, "--json", "--ctx", "128", "--max-tokens", "512")
    assert 0.25 < json.loads(res)["executed_slot_frac"] < 1.0
    stripped = tmp_path / "stripped.gguf"
    _invoke("otp", "strip", with_otp, "-o", stripped)
    assert stripped.read_bytes() == plain.read_bytes()
    res = _cli("otp", "strip", plain, "-o", tmp_path / "x.gguf")
    assert res.returncode == 2 and "no OTP tensors" in res.stderr and not (tmp_path / "x.gguf").exists()


@pytest.mark.slow  # tiny models (cached tokenizer), the pinned converter
def test_otp_add_refuses_routers_for_another_model(plain_and_routers, tiny_model, tmp_path):
    _, plain, routers = plain_and_routers
    good = OtpRouters.load(routers)
    cases = {
        "top-2": OtpRouters(**{**good.__dict__, "top_k": 2}),
        "hidden size 32": OtpRouters(**{**good.__dict__, "n_embd": 32}),
        "layers": OtpRouters(**{**good.__dict__, "layers": {0: good.layers[0]}}),
        "NaN/Inf in w2": OtpRouters(**{**good.__dict__, "layers": {
            n: {**lay, "w2": np.where(np.arange(lay["w2"].size).reshape(lay["w2"].shape) == 3, np.nan, lay["w2"])}
            for n, lay in good.layers.items()}}),
        "inconsistent shapes": OtpRouters(**{**good.__dict__, "layers": {
            n: {**lay, "b1": lay["b1"][:-1]} for n, lay in good.layers.items()}}),
    }
    out = tmp_path / "out.gguf"
    for needle, bad in cases.items():
        bad.save(tmp_path / "bad.npz")
        res = _cli("otp", "add", plain, tmp_path / "bad.npz", "-o", out)
        assert res.returncode == 2 and needle in res.stderr and res.stderr.count("\n") == 1, res.stderr
        assert not out.exists()
    # a checkpoint of another architecture (same hidden size and k) is refused before any training
    res = _cli("otp", "add", plain, tiny_model("mixtral", top_k=TOP_K), "-o", out, timeout=120)
    assert res.returncode == 2 and "is a llama model" in res.stderr and not out.exists(), res.stderr


@pytest.mark.slow  # the patched runtime, the pinned converter
def test_eval_and_bench_pruning_knobs(plain_and_routers, tmp_path):
    _, plain, routers = plain_and_routers
    common = ("--json", "--ctx", "128", "--max-tokens", "512")
    assert json.loads(_invoke("eval", plain, "--top-k", "2", *common))["executed_slot_frac"] == 0.5
    mu = json.loads(_invoke("eval", plain, "--prune-mu", "0.9", *common))["executed_slot_frac"]
    assert 0.25 <= mu < 1.0
    assert "executed_slot_frac" not in json.loads(_invoke("eval", plain, *common))
    res = _cli("eval", plain, "--otp", "on", *common)  # no routers in this file
    assert res.returncode == 2 and "ffn_otp" in res.stderr
    res = _cli("eval", plain, "--top-k", "2", "--prune-mu", "0.5", *common)
    assert res.returncode == 2 and "choose one" in res.stderr
    out = json.loads(_invoke("bench", plain, "--top-k", "2", "--json", "--rounds", "1", "--tokens", "8",
                             "--prompt-tokens", "32"))
    assert out["run"]["executed_slot_frac"] == 0.5 and "executed_slot_frac" not in out["unpruned"]
    assert out["ratio_vs_unpruned"]["decode"] > 0 and out["run"]["decode_tok_s"] > 0


@pytest.mark.slow  # the patched runtime, `mcsharp convert`, a tiny model
def test_pmq_mixed_with_otp(tiny_model, calib_file, tmp_path):
    """PMQ × OTP in one conversion: grouped mixed-type experts and routers in one file, both active."""
    from mcsharp_gguf.gguf.inspect import read_report

    out = tmp_path / "mixed-otp.gguf"
    res = _cli("convert", tiny_model("qwen2moe", top_k=TOP_K), "-o", out, "--bpw", "4.5", "--mode", "mixed", "--rtn",
               "--otp", "--otp-target-frac", "0.75", "--calib", calib_file, "--calib-seqs", "4", "--calib-len", "128")
    assert res.returncode == 0, res.stderr
    rep = read_report(out).to_json()
    assert rep["otp"] and rep["metadata"]["mcsharp.pmq.mode"] == "mixed"
    assert any(".ffn_up_exps.g1.weight" in t["name"] for t in rep["tensors"])
    res = _cli("eval", out, "--json", "--ctx", "128", "--max-tokens", "512")
    assert res.returncode == 0, res.stderr
    assert 0.25 < json.loads(res.stdout)["executed_slot_frac"] < 1.0


@pytest.mark.slow  # a tiny model (cached tokenizer)
def test_kl_refinement_holds_the_fraction_and_never_loses(tiny_model, calib_file):
    """End-to-end refinement on the logits' KL: both KLs it reports are measured at the target fraction with
    upstream pruning active, and it returns the better routers; on this random tiny model (KL ~5e-5) it has
    never beaten the layer-wise routers, so this also checks that they come back unchanged but re-shifted."""
    from mcsharp_gguf.model.calibration import calibration_token_ids
    from mcsharp_gguf.otp.capture import capture_otp_data
    from mcsharp_gguf.otp.refine import refine_otp_kl

    model = tiny_model("qwen2moe", top_k=TOP_K)
    ids = calibration_token_ids(model, calib_file.read_text(), 4, 128)
    layerwise = fit_otp(capture_otp_data(model, ids, progress=False), target_frac=0.7, hidden=16, steps=200)
    layerwise.arch = "qwen2moe"
    refined = refine_otp_kl(model, ids, layerwise, steps=20, lr=3e-3, progress=False)
    assert sorted(refined.layers) == sorted(layerwise.layers) and abs(refined.calib_frac - 0.7) < 0.03
    before, after = refined.calib_kl
    assert 0 < before < 1e-2 and after > 0
    for n, lay in refined.layers.items():
        same = all(np.array_equal(lay[k], layerwise.layers[n][k]) for k in ("w1", "b1", "w2"))
        assert same == (after >= before), n  # refined weights only when they lowered the KL
        if same:  # only the keep-logit shift (into b2) differs
            d = lay["b2"] - layerwise.layers[n]["b2"]
            assert np.allclose(d, d[0]), d


@pytest.mark.slow  # tiny models (cached tokenizer), the pinned converter
def test_run_writes_given_routers_without_training(plain_and_routers, tmp_path):
    """pipeline.run(routers=...) writes trained routers as they are, without training (bench_otp converts
    through it), and refuses them for a recipe without OTP before writing anything."""
    import gguf

    from mcsharp_gguf.otp.io import otp_tensors
    from mcsharp_gguf.pipeline import run
    from mcsharp_gguf.recipe import Recipe

    model, _, routers = plain_and_routers
    good = OtpRouters.load(routers)
    out, logged = tmp_path / "otp.gguf", []
    res = run(Recipe(preset="F32", otp=True), model, out, routers=good, log=logged.append)
    assert res.routers is good and not any("[otp] training" in line for line in logged)
    stored = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(out).tensors}
    want = dict(otp_tensors(good))
    assert want and all(np.array_equal(stored[n].reshape(a.shape), a) for n, a in want.items())
    with pytest.raises(McsharpError, match="without otp"):
        run(Recipe(preset="F32"), model, tmp_path / "x.gguf", routers=good, log=logged.append)
    assert not (tmp_path / "x.gguf").exists()
