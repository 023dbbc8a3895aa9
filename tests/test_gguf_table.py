"""The fast GGUF tensor-table reader against gguf-py's reader, and the OTP routers' NaN/Inf check at load."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from mcsharp_gguf.cli import cli
from mcsharp_gguf.errors import McsharpError
from mcsharp_gguf.gguf.table import check_finite_tensors, tensor_table
from mcsharp_gguf.llama_src import import_gguf
from mcsharp_gguf.runtime.llama import check_otp_routers


def _write(path, tensors: dict[str, np.ndarray], alignment: int | None = None) -> None:
    """A GGUF with every kind of metadata value before the tensor table (what the reader must skip)."""
    gguf = import_gguf()
    w = gguf.GGUFWriter(str(path), "qwen2moe")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    w.add_string("general.name", "tëst")
    w.add_array("tokenizer.ggml.tokens", [f"tok{i}" for i in range(300)])
    w.add_array("tokenizer.ggml.scores", [float(i) for i in range(300)])
    w.add_array("test.nested", [[1, 2], [3]])
    w.add_bool("test.flag", True)
    w.add_uint64("test.u64", 2**40)
    w.add_int8("test.i8", -3)
    w.add_float64("test.f64", 0.5)
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _tensors(bad: str | None = None, value: float = np.nan) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    t = {"token_embd.weight": rng.standard_normal((8, 16)).astype(np.float32),
         "blk.0.ffn_otp_w1.weight": rng.standard_normal((4, 16)).astype(np.float32),
         "blk.0.ffn_otp_b1.bias": rng.standard_normal(4).astype(np.float16),
         "blk.1.ffn_otp_w2.weight": rng.standard_normal((2, 4)).astype(np.float32)}
    if bad is not None:
        t[bad].flat[3] = value
    return t


@pytest.mark.parametrize("alignment", [None, 64])
def test_tensor_table_matches_gguf_py(tmp_path, alignment):
    path = tmp_path / "m.gguf"
    _write(path, _tensors(), alignment)
    ref = import_gguf().GGUFReader(path)
    want = [(t.name, int(t.tensor_type), tuple(int(x) for x in t.shape), int(t.data_offset)) for t in ref.tensors]
    assert [(t.name, t.ggml_type, t.shape, t.offset) for t in tensor_table(path)] == want


@pytest.mark.parametrize("bad, value", [("blk.0.ffn_otp_w1.weight", np.nan), ("blk.0.ffn_otp_b1.bias", np.inf),
                                        ("blk.1.ffn_otp_w2.weight", -np.inf)])
def test_nonfinite_otp_router_is_refused_at_load(tmp_path, bad, value):
    path = tmp_path / "m.gguf"
    _write(path, _tensors(bad, value))
    with pytest.raises(McsharpError, match=f"tensor {bad} holds NaN/Inf"):
        check_otp_routers(path, None)
    # OTP switched off or another pruning rule: the routers are never evaluated, so the file may run
    check_otp_routers(path, {"mcsharp.otp.enable": False})
    check_otp_routers(path, {"mcsharp.moe.prune_mode": 2, "mcsharp.moe.static_k": 1})
    res = CliRunner().invoke(cli, ["chat", str(path), "--prompt", "hi"])
    assert res.exit_code == 1 and isinstance(res.exception, McsharpError) and bad in str(res.exception)


def test_finite_routers_and_other_tensors_pass(tmp_path):
    path = tmp_path / "m.gguf"
    t = _tensors()
    t["token_embd.weight"][0, 0] = np.nan  # not a router: not this check's business
    _write(path, t)
    check_otp_routers(path, None)
    with pytest.raises(McsharpError, match="token_embd.weight holds NaN/Inf"):
        check_finite_tensors(path, lambda n: n.startswith("token_embd"), fix="convert it again")


def test_truncated_or_foreign_file_is_a_one_line_error(tmp_path):
    path = tmp_path / "m.gguf"
    _write(path, _tensors())
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:200])
    with pytest.raises(McsharpError, match="truncated"):
        tensor_table(cut)
    other = tmp_path / "x.gguf"
    other.write_bytes(b"PK\x03\x04" + data[4:])
    with pytest.raises(McsharpError, match="not a GGUF"):
        tensor_table(other)
