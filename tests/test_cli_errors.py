"""Bad input: a one-line error naming the thing and the fix, exit status 2, and no output left behind."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
import torch


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mcsharp_gguf.cli", *args], capture_output=True, text=True,
                          timeout=600)


def assert_one_line_error(res: subprocess.CompletedProcess, *must_contain: str) -> None:
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1, res.stderr
    assert "Traceback" not in res.stderr
    for s in must_contain:
        assert s in errors[0], errors[0]


@pytest.fixture()
def out_dir(tmp_path) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    return d


def assert_empty(d: Path) -> None:
    assert list(d.iterdir()) == [], f"left behind: {list(d.iterdir())}"


def test_missing_model_dir(tmp_path, out_dir):
    res = run_cli("convert", str(tmp_path / "nope"), "-o", str(out_dir / "m.gguf"))
    assert_one_line_error(res, str(tmp_path / "nope"), "does not exist")
    assert_empty(out_dir)


def test_not_a_model_dir(tmp_path, out_dir):
    (tmp_path / "empty").mkdir()
    res = run_cli("convert", str(tmp_path / "empty"), "-o", str(out_dir / "m.gguf"))
    assert_one_line_error(res, "not a model directory", "config.json")
    assert_empty(out_dir)


def test_truncated_safetensors(tiny_model, tmp_path, out_dir):
    bad = tmp_path / "truncated"
    shutil.copytree(tiny_model("qwen2moe"), bad)
    st = bad / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2])
    res = run_cli("convert", str(bad), "-o", str(out_dir / "m.gguf"))
    assert_one_line_error(res, "model.safetensors", "truncated", "re-download")
    assert_empty(out_dir)


def test_unsupported_architecture(tiny_model, tmp_path, out_dir):
    bad = tmp_path / "alien"
    shutil.copytree(tiny_model("qwen2moe"), bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["AlienMoeForCausalLM"]
    (bad / "config.json").write_text(json.dumps(cfg))
    res = run_cli("convert", str(bad), "-o", str(out_dir / "m.gguf"))
    assert_one_line_error(res, "AlienMoeForCausalLM", "not supported", "Qwen2MoeForCausalLM")
    assert_empty(out_dir)


def test_unwritable_output(tiny_model):
    res = run_cli("convert", str(tiny_model("qwen2moe")), "-o", "/proc/mcsharp-test.gguf")
    assert_one_line_error(res, "/proc", "writable")
    res = run_cli("convert", str(tiny_model("qwen2moe")), "-o", "/nonexistent-dir/m.gguf")
    assert_one_line_error(res, "/nonexistent-dir", "does not exist")


def test_missing_and_empty_text(tiny_gguf, tmp_path):
    gguf_path = tiny_gguf("qwen2moe", "f16")
    res = run_cli("eval", str(gguf_path), "--text", str(tmp_path / "missing.txt"), "--json")
    assert_one_line_error(res, "missing.txt", "does not exist")
    (tmp_path / "empty.txt").write_text("  \n")
    res = run_cli("eval", str(gguf_path), "--text", str(tmp_path / "empty.txt"), "--json")
    assert_one_line_error(res, "empty.txt", "empty")


def test_conversion_failure_leaves_nothing(tiny_model, tmp_path, out_dir, monkeypatch):
    """A crash mid-write (here: a hook that raises) leaves neither the output nor a temp file."""
    from mcsharp_gguf.gguf.convert import convert_checkpoint

    def boom(name, tensor, bid):
        if bid == 1:
            raise RuntimeError("simulated failure")
        return None

    with pytest.raises(RuntimeError):
        convert_checkpoint(tiny_model("qwen2moe"), out_dir / "m.gguf", outtype="f16", hook=boom)
    assert_empty(out_dir)


def test_budget_errors_come_before_any_calibration(tiny_model, out_dir, monkeypatch):
    """An unknown preset lists the presets; a budget out of reach names the achievable range; two budgets are one
    too many: each a one-line error before calibration, nothing written."""
    from click.testing import CliRunner

    from mcsharp_gguf.cli import cli
    from mcsharp_gguf.errors import McsharpError
    from mcsharp_gguf.model import calibration

    monkeypatch.setattr(calibration, "calibration_token_ids", lambda *a, **k: pytest.fail("calibration ran"))
    model = str(tiny_model("qwen2moe"))
    cases = [(["--preset", "Q3_K_XL"], ("unknown preset", "Q3_K_M", "IQ2_XS", "F16")),
             (["--bpw", "0.5"], ("achievable", "bits per weight", "MB")),
             (["--size", "1MB"], ("achievable", "MB")),
             (["--size", "100GB"], ("achievable",)),
             (["--bpw", "4", "--preset", "Q2_K"], ("--preset", "--bpw", "one of")),
             (["--size", "twelve"], ("--size",))]
    for args, needles in cases:
        res = CliRunner().invoke(cli, ["convert", model, "-o", str(out_dir / "m.gguf"), *args],
                                 standalone_mode=False)
        msg = str(res.exception)
        assert isinstance(res.exception, (McsharpError, click.BadParameter)), (args, res.exception)
        assert "\n" not in msg and all(n in msg for n in needles), (args, msg)
        assert_empty(out_dir)


def test_convert_help_lists_at_most_fourteen_options():
    from click.testing import CliRunner

    from mcsharp_gguf.cli import cli

    short = CliRunner().invoke(cli, ["convert", "--help"]).output
    options = [ln for ln in short.splitlines() if ln.lstrip().startswith("-")]
    assert len(options) <= 14, short  # (twelve, and where it runs: --device, --ray)
    assert "--budget-scope" not in short and "--preset" in short and "--size" in short and "--device" in short
    full = CliRunner().invoke(cli, ["convert", "--help-advanced"]).output
    assert "--budget-scope" in full and "--eps" in full and "--otp-hidden" in full


def test_cli_starts_without_torch():
    """`mcsharp --help` and a bad option answer at once: the CLI module imports no torch."""
    res = subprocess.run([sys.executable, "-c", "import sys, mcsharp_gguf.cli, mcsharp_gguf.recipe; "
                          "print('torch' in sys.modules)"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "False", res.stderr


def test_a_plan_from_another_version_is_refused_in_one_line(tiny_model, tmp_path, out_dir):
    from click.testing import CliRunner

    from mcsharp_gguf.cli import cli
    from mcsharp_gguf.errors import McsharpError

    old = tmp_path / "old-plan.json"
    old.write_text(json.dumps({"mode": "mixed", "layers": {"0": ["Q4_K"]}, "budget": 3.0}))
    res = CliRunner().invoke(cli, ["convert", str(tiny_model("qwen2moe")), "-o", str(out_dir / "m.gguf"),
                                   "--plan", str(old)], standalone_mode=False)
    assert isinstance(res.exception, McsharpError), res.exception
    assert "old-plan.json" in str(res.exception) and "mcsharp plan" in str(res.exception)
    assert_empty(out_dir)


def _tree_digest(d: Path) -> dict[str, bytes]:
    import hashlib

    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).digest() for p in sorted(d.rglob("*"))
            if p.is_file()}


def test_outputs_never_replace_inputs_or_existing_files(tiny_model, tmp_path, out_dir):
    """-o inside the checkpoint, onto the calibration file or the input GGUF, or onto an existing file without
    --force: one line, exit 2, every input byte-identical; with --force the file is replaced."""
    model = tiny_model("qwen2moe")
    before = _tree_digest(model)
    calib = tmp_path / "calib.txt"
    calib.write_text("some calibration text " * 50)
    res = run_cli("convert", str(model), "-o", str(model / "model.safetensors"), "--preset", "F16")
    assert_one_line_error(res, "is inside the input", str(model))
    res = run_cli("convert", str(model), "-o", str(model), "--preset", "F16")
    assert_one_line_error(res, "is the input")
    res = run_cli("convert", str(model), "-o", str(calib), "--calib", str(calib))
    assert_one_line_error(res, "is the input", "calib.txt")
    assert _tree_digest(model) == before and calib.read_text().startswith("some calibration")
    gguf = out_dir / "m.gguf"
    assert run_cli("convert", str(model), "-o", str(gguf), "--preset", "F16").returncode == 0
    first = gguf.read_bytes()
    res = run_cli("convert", str(model), "-o", str(gguf), "--preset", "BF16")
    assert_one_line_error(res, "exists", "--force")
    assert gguf.read_bytes() == first
    res = run_cli("otp", "strip", str(gguf), "-o", str(gguf))
    assert_one_line_error(res, "is the input")
    assert gguf.read_bytes() == first
    res = run_cli("convert", str(model), "-o", str(gguf), "--preset", "BF16", "--force")
    assert res.returncode == 0, res.stderr
    assert gguf.read_bytes() != first and sorted(p.name for p in out_dir.iterdir()) == ["m.gguf"]


def test_an_unexpected_error_is_one_line_with_a_saved_traceback(monkeypatch, tmp_path, capsys):
    """A bug reaches the user as `error: internal: …` + the path of a log holding the traceback, exit 3; a full
    disk as a one-line error, exit 2."""
    import errno

    from mcsharp_gguf import cli as cli_mod

    monkeypatch.setenv("MCSHARP_CACHE", str(tmp_path / "cache"))

    def boom(**kw):
        raise KeyError("unexpected\nsecond line")

    monkeypatch.setattr(cli_mod.cli, "main", boom)
    with pytest.raises(SystemExit) as e:
        cli_mod.main()
    err = capsys.readouterr().err
    assert e.value.code == 3 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("error: internal: KeyError: 'unexpected") and "please report it" in err
    logs = list((tmp_path / "cache" / "crash").glob("*.log"))
    assert len(logs) == 1 and str(logs[0]) in err and "Traceback" in logs[0].read_text()

    def full(**kw):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/out.gguf.part")

    monkeypatch.setattr(cli_mod.cli, "main", full)
    with pytest.raises(SystemExit) as e:
        cli_mod.main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "no space left" in err and "/data/out.gguf" in err


def test_json_output_is_always_valid_json_and_counts_are_positive(tmp_path):
    """--json writes undefined numbers as null (json.loads accepts it); zero counts are refused before work."""
    from click.testing import CliRunner

    from mcsharp_gguf.cli import _json, cli

    assert json.loads(_json({"ppl": float("nan"), "kld": [0.5, float("inf")], "n": 3})) == \
        {"ppl": None, "kld": [0.5, None], "n": 3}
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"GGUF")
    for args in (["bench", str(gguf), "--rounds", "0"], ["bench", str(gguf), "--tokens", "0"],
                 ["eval", str(gguf), "--ctx", "1"], ["eval", str(gguf), "--max-tokens", "-5"],
                 ["chat", str(gguf), "--max-tokens", "0"],
                 ["convert", str(tmp_path), "-o", str(tmp_path / "o.gguf"), "--calib-seqs", "0"],
                 ["convert", str(tmp_path), "-o", str(tmp_path / "o.gguf"), "--calib-len", "-5"]):
        res = CliRunner().invoke(cli, args, standalone_mode=False)
        assert isinstance(res.exception, click.BadParameter) and "range" in str(res.exception), (args, res)
    assert not (tmp_path / "o.gguf").exists()


def test_nonfinite_weights_are_named_before_any_work(tiny_model, tmp_path, out_dir):
    """NaN in an expert, Inf in the router: convert (compressed or lossless), plan and otp train stop before any
    calibration with one line naming the shard and the tensor, and nothing written (not even a work dir);
    `--allow-nonfinite` lets a lossless conversion copy them with a warning, and is refused for a compressed one."""
    import gguf
    import numpy as np
    from safetensors.torch import load_file, save_file

    for name, value in (("model.layers.1.mlp.experts.3.down_proj.weight", float("nan")),
                        ("model.layers.0.mlp.gate.weight", float("-inf"))):
        bad = tmp_path / f"bad-{value}"
        shutil.copytree(tiny_model("qwen2moe"), bad)
        shard = next(bad.glob("*.safetensors"))
        sd = load_file(shard)
        assert name in sd, sorted(sd)[:20]
        sd[name][0, 0] = value
        save_file(sd, shard, metadata={"format": "pt"})
        for cmd in (["convert", "--bpw", "4"], ["convert", "--preset", "F32"], ["plan", "--bpw", "4"],
                    ["otp", "train"], ["convert", "--bpw", "4", "--allow-nonfinite"]):
            res = run_cli(*cmd, str(bad), "-o", str(out_dir / "m.out"))
            if "--allow-nonfinite" in cmd:
                assert_one_line_error(res, "--allow-nonfinite", "lossless")
            else:
                assert_one_line_error(res, name, "NaN/Inf", shard.name, "1 NaN/Inf")
                assert ("pass --allow-nonfinite" in res.stderr) == ("F32" in cmd)
            assert "[calib]" not in res.stderr and "[pmq]" not in res.stderr, (cmd, res.stderr)
            assert_empty(out_dir)
        res = run_cli("convert", str(bad), "-o", str(out_dir / "m.gguf"), "--preset", "F32", "--allow-nonfinite")
        assert res.returncode == 0, res.stderr
        assert "[warning]" in res.stderr and name in res.stderr
        r = gguf.GGUFReader(out_dir / "m.gguf")
        gname = {"model.layers.1.mlp.experts.3.down_proj.weight": "blk.1.ffn_down_exps.weight",
                 "model.layers.0.mlp.gate.weight": "blk.0.ffn_gate_inp.weight"}[name]
        t = next(t for t in r.tensors if t.name == gname)
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        assert int((~np.isfinite(np.asarray(t.data))).sum()) == 1  # copied as it is, nothing else non-finite
        (out_dir / "m.gguf").unlink()


def test_the_nonfinite_scan_finds_every_format_in_chunks(tmp_path):
    """nonfinite_tensors (the scan before any work) counts NaN, +Inf and -Inf in BF16, F16 and F32 tensors, also
    across the boundaries of its read chunks, and ignores integer tensors and huge finite values."""
    from safetensors.torch import save_file

    from mcsharp_gguf.model.checkpoint import nonfinite_tensors

    d = tmp_path / "ck"
    d.mkdir()
    tensors = {}
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        t = torch.randn(1000, dtype=torch.float32).to(dt)
        t[[0, 499, 999]] = torch.tensor([float("nan"), float("inf"), float("-inf")]).to(dt)
        tensors[f"bad.{dt}"] = t
        tensors[f"big.{dt}"] = torch.full((300,), torch.finfo(dt).max, dtype=dt)
    tensors["ints"] = torch.full((64,), -1, dtype=torch.int32)
    save_file(tensors, d / "model.safetensors")
    for chunk in (1 << 26, 64):
        found = {name: n for _, name, n in nonfinite_tensors(d, chunk_bytes=chunk)}
        assert found == {f"bad.{dt}": 3 for dt in (torch.bfloat16, torch.float16, torch.float32)}, (chunk, found)


def test_a_tokenizer_the_converter_cannot_write_is_refused_before_any_work(tiny_model, tmp_path, out_dir):
    """No tokenizer files, a damaged tokenizer.json, a pre-tokenizer llama.cpp does not know: one line naming the
    checkpoint and the files to copy, before calibration (it used to fail at the GGUF write, after GPTQ)."""
    cases = [("missing", lambda d: [(d / f).unlink() for f in ("tokenizer.json", "tokenizer_config.json")]),
             ("damaged", lambda d: (d / "tokenizer.json").write_text("{not json")),
             ("unknown pre-tokenizer", lambda d: (d / "tokenizer_config.json").unlink())]
    for what, damage in cases:
        bad = tmp_path / what.replace(" ", "-")
        shutil.copytree(tiny_model("qwen2moe"), bad)
        damage(bad)
        for cmd in (["convert", "--bpw", "4"], ["plan", "--bpw", "4"], ["otp", "train"]):
            res = run_cli(*cmd, str(bad), "-o", str(out_dir / "m.out"))
            assert_one_line_error(res, str(bad), "tokenizer", "copy the tokenizer files")
            assert "[calib]" not in res.stderr and "**" not in res.stderr, (what, cmd, res.stderr)
            assert_empty(out_dir)


def test_a_config_that_does_not_fit_the_weights_is_refused_before_any_work(tiny_model, tmp_path, out_dir):
    """config.json contradicting the weights (hidden size, expert count, no expert count at all) or an index
    naming a tensor no shard holds: one line naming the tensor / layer and the file, before calibration."""
    cases = [("qwen2moe", lambda c: c.update(hidden_size=2 * c["hidden_size"]), None, ("is [", "by config.json")),
             ("qwen2moe", lambda c: c.update(num_experts=4), None, ("mlp.gate.weight is [8, 64]", "[4, 64]")),
             ("qwen2moe", lambda c: c.pop("num_experts"), None, ("mlp.gate.weight is [8, 64]",)),
             # transformers renames Mixtral's router on load: the expert count is what disagrees
             ("mixtral", lambda c: c.update(num_local_experts=4), None, ("layer 0 holds 8 experts", "says 4")),
             ("qwen2moe", None, "index", ("model.safetensors.index.json lists tensor", "does not hold it"))]
    for i, (arch, edit, kind, needles) in enumerate(cases):
        bad = tmp_path / f"bad-{i}"
        shutil.copytree(tiny_model(arch), bad)
        if edit is not None:
            cfg = json.loads((bad / "config.json").read_text())
            edit(cfg)
            (bad / "config.json").write_text(json.dumps(cfg))
        if kind == "index":
            shard = next(bad.glob("*.safetensors")).name
            (bad / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {}, "weight_map": {"model.layers.9.mlp.gate.weight": shard}}))
        res = run_cli("convert", str(bad), "-o", str(out_dir / "m.gguf"), "--bpw", "4")
        assert_one_line_error(res, str(bad), *needles)
        assert_empty(out_dir)


def test_a_plan_for_another_model_or_a_malformed_one_is_refused(tiny_model, tmp_path, out_dir):
    """A plan carries the identity of the checkpoint it was made for (config + tensor shapes): another model's
    plan, or one whose fields make no sense, is refused in one line before any work."""
    from mcsharp_gguf.text import calibration_text

    calib = tmp_path / "calib.txt"
    calib.write_text(calibration_text(20_000))
    plan = tmp_path / "plan.json"
    res = run_cli("plan", str(tiny_model("qwen2moe")), "--bpw", "4", "--calib", str(calib), "--calib-seqs", "2",
                  "--calib-len", "64", "-o", str(plan))
    assert res.returncode == 0, res.stderr
    assert len(json.loads(plan.read_text())["model"]) == 16
    res = run_cli("convert", str(tiny_model("qwen2moe", hidden=128)), "--plan", str(plan), "-o",
                  str(out_dir / "m.gguf"))
    assert_one_line_error(res, "made for another model", "mcsharp plan")
    for edit in ({"mode": "weird"}, {"layers": {"0": "Q4_K"}}, {"expert_bytes": -1}, {"target_bpw": 0}):
        bad = tmp_path / "bad-plan.json"
        bad.write_text(json.dumps({**json.loads(plan.read_text()), **edit}))
        res = run_cli("convert", str(tiny_model("qwen2moe")), "--plan", str(bad), "-o", str(out_dir / "m.gguf"))
        assert_one_line_error(res, "bad-plan.json", "mcsharp plan")
    assert_empty(out_dir)


def test_a_killed_writers_temp_file_is_removed_by_the_next_run_a_live_ones_is_not(tmp_path):
    """atomic_output: a `.OUT.*.part` left by a killed run goes at the next write of OUT; one a live writer
    holds (locked) stays; a failed block leaves neither output nor temp file."""
    import os

    from mcsharp_gguf.files import atomic_output, remove_stale_parts

    out = tmp_path / "m.gguf"
    stale = tmp_path / ".m.gguf.abc123.part"
    stale.write_bytes(b"half a file")
    with atomic_output(out) as live:
        assert not stale.exists() and live.exists()
        assert remove_stale_parts(out) == [] and live.exists()  # locked: a concurrent run's file is kept
        live.write_bytes(b"done")
    assert out.read_bytes() == b"done" and not live.exists()
    with pytest.raises(RuntimeError), atomic_output(out) as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("stopped")
    assert out.read_bytes() == b"done" and sorted(os.listdir(tmp_path)) == ["m.gguf"]


def test_a_text_file_that_is_not_utf8_is_refused(tmp_path):
    from mcsharp_gguf.errors import McsharpError
    from mcsharp_gguf.text import read_text_file

    binary = tmp_path / "model.bin"
    binary.write_bytes(bytes(range(128, 256)) * 100)
    with pytest.raises(McsharpError, match="is not UTF-8 text"):
        read_text_file(binary, what="--calib")
    latin = tmp_path / "notes.txt"
    latin.write_bytes("caf\xe9 ".encode("latin-1") * 10 + b"plain ascii " * 100)  # 10 bad bytes in ~1,250
    assert read_text_file(latin).count("\ufffd") == 10


def test_a_work_dir_that_is_a_file_is_refused(tiny_model, tmp_path, out_dir):
    f = tmp_path / "work"
    f.write_text("not a directory")
    res = run_cli("convert", str(tiny_model("qwen2moe")), "-o", str(out_dir / "m.gguf"), "--bpw", "4",
                  "--work-dir", str(f))
    assert_one_line_error(res, "--work-dir", "is a file")
    assert_empty(out_dir)
    assert f.read_text() == "not a directory"
