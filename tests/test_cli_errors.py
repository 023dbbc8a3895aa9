"""Bad input: a one-line error naming the thing and the fix, exit status 2, and no output left behind."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


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
    from mcsharp_gguf.convert import convert_checkpoint

    def boom(name, tensor, bid):
        if bid == 1:
            raise RuntimeError("simulated failure")
        return None

    with pytest.raises(RuntimeError):
        convert_checkpoint(tiny_model("qwen2moe"), out_dir / "m.gguf", outtype="f16", hook=boom)
    assert_empty(out_dir)


def test_cli_plan_defaults_are_the_planners():
    from mcsharp_gguf import cli, pmq

    assert (cli.PLAN_SCOPE, cli.PLAN_METRIC, cli.PLAN_EPS) == (pmq.SCOPE, pmq.METRIC, pmq.EPS_SOURCE)
