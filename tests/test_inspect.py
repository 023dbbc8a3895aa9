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
