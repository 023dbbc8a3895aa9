"""`mcsharp inspect`: types, bytes and true bpw per tensor class, MoE hyper-parameters."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from mcsharp_gguf.cli import cli
from mcsharp_gguf.gguf.inspect import read_report

pytestmark = pytest.mark.slow  # a tiny GGUF: the pinned converter and the cached tokenizer


def test_inspect_counts_true_bytes(tiny_gguf):
    path = tiny_gguf("qwen2moe", "q8_0")
    rep = read_report(path)
    assert rep.arch == "qwen2moe" and rep.n_expert == 8 and rep.n_expert_used == 2 and rep.n_layer == 2
    assert abs(rep.classes["experts"].bpw - 8.5) < 1e-9  # Q8_0: 34 bytes per 32 weights
    assert sum(t.n_bytes for t in rep.tensors) < rep.file_bytes
    names = {t.name: t for t in rep.tensors}
    assert names["blk.0.ffn_gate_exps.weight"].shape == [64, 64, 8]
    res = CliRunner().invoke(cli, ["inspect", str(path), "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    js = json.loads(res.stdout)
    assert js["classes"]["experts"]["n_bytes"] == rep.classes["experts"].n_bytes and js["otp"] is False


@pytest.mark.parametrize("damage", ["count-1", "count-0", "truncated", "appended"])
def test_a_gguf_whose_header_disagrees_with_its_data_is_refused(tiny_gguf, tmp_path, damage):
    """A header tensor count one low (or zero), a cut file or bytes appended: `inspect` and `otp strip` answer
    with one line and exit 2, and strip writes nothing (it used to shift every tensor silently)."""
    import shutil
    import struct
    import subprocess
    import sys

    src = tiny_gguf("qwen2moe", "q8_0")
    bad = tmp_path / "bad.gguf"
    shutil.copy(src, bad)
    data = bytearray(bad.read_bytes())
    (n_tensors,) = struct.unpack_from("<Q", data, 8)  # magic, version, then the tensor count
    if damage.startswith("count"):
        struct.pack_into("<Q", data, 8, n_tensors - 1 if damage == "count-1" else 0)
    elif damage == "truncated":
        data = data[:-4096]
    else:
        data += bytes(4096)
    bad.write_bytes(bytes(data))
    for args in (["inspect", str(bad)], ["otp", "strip", str(bad), "-o", str(tmp_path / "out.gguf")]):
        res = subprocess.run([sys.executable, "-m", "mcsharp_gguf.cli", *args], capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == 2 and res.stderr.startswith("error: ") and str(bad) in res.stderr, res.stderr
        assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert not (tmp_path / "out.gguf").exists() and bad.read_bytes() == bytes(data)
