"""Bit-exactness of our ggml grids/packers against libggml's own decoder and gguf-py's, for all 14 types."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mcsharp_gguf.errors import McsharpError
from mcsharp_gguf.ggml.grids import _is_uniform, fit_grid, nearest_code, nearest_level
from mcsharp_gguf.ggml.libggml import _libggml, ggml_dequantize, ggml_quantize
from mcsharp_gguf.ggml.packing import QuantResult, finish, quantize_rtn
from mcsharp_gguf.ggml.types import QUANT_TYPES, _spec, bits_per_weight, block_size, ggml_type, type_size

# gguf-py 0.19 decodes every type we write except the two newest (its quants.py has no Q1_0/Q2_0 classes)
GGUF_PY_CANNOT = {"Q1_0", "Q2_0"}

# enum ggml_type of the pinned llama.cpp (ggml/include/ggml.h): the type ids a GGUF file stores
GGML_TYPE_ID = {
    "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q2_K": 10, "Q3_K": 11, "Q4_K": 12, "Q5_K": 13,
    "Q6_K": 14, "IQ4_NL": 20, "IQ4_XS": 23, "Q1_0": 41, "Q2_0": 42,
}

EXPECTED_BPW = {
    "Q8_0": 8.5, "Q4_0": 4.5, "Q4_1": 5.0, "Q5_0": 5.5, "Q5_1": 6.0, "Q1_0": 1.125, "Q2_0": 2.25,
    "Q2_K": 2.625, "Q3_K": 3.4375, "Q4_K": 4.5, "Q5_K": 5.5, "Q6_K": 6.5625, "IQ4_NL": 4.5, "IQ4_XS": 4.25,
}


def assert_exact(res: QuantResult, shape: tuple[int, int], oracles: tuple[str, ...] = ("ggml", "gguf-py")) -> None:
    """The named decoders reproduce res.dequant bit for bit: "ggml" is libggml's own to_float (needs the native
    build, so slow tier only), "gguf-py" the pinned gguf-py's dequantize (pure Python; it cannot decode the
    GGUF_PY_CANNOT types, which it then skips)."""
    t = res.type_name
    assert res.packed.dtype == np.uint8
    assert res.packed.shape == (shape[0], shape[1] // block_size(t) * type_size(t))
    ours = res.dequant.numpy()
    assert ours.dtype == np.float32 and ours.shape == shape
    if "ggml" in oracles:
        ref = ggml_dequantize(res.packed, t, shape)
        bad = ref.view(np.uint32) != ours.view(np.uint32)
        # compare bit patterns, except that +0 and -0 are the same number
        bad &= ~((ref == 0) & (ours == 0))
        assert not bad.any(), f"{t}: {bad.sum()} values differ from ggml, e.g. {ref[bad][:4]} vs {ours[bad][:4]}"
    if "gguf-py" in oracles and t not in GGUF_PY_CANNOT:
        import gguf

        g = gguf.quants.dequantize(res.packed, ggml_type(t))
        np.testing.assert_array_equal(g.reshape(shape), ours, err_msg=f"{t}: gguf-py decodes differently")


def oracle_params(types) -> list:
    """(type, oracle) cases for an exactness test: gguf-py for every type it decodes (fast tier), libggml for
    every type (slow tier: it loads the native build)."""
    return ([pytest.param(t, "gguf-py", id=f"{t}-gguf-py") for t in types if t not in GGUF_PY_CANNOT]
            + [pytest.param(t, "ggml", id=f"{t}-ggml", marks=pytest.mark.slow) for t in types])


def test_table():
    """Our type table: true bpw, ggml.h's type id (what a GGUF stores), and gguf-py's block size for that id."""
    import gguf

    assert len(QUANT_TYPES) == 14 and set(QUANT_TYPES) == set(GGML_TYPE_ID)
    for t in QUANT_TYPES:
        assert bits_per_weight(t) == EXPECTED_BPW[t], t
        g = ggml_type(t)
        assert int(g) == GGML_TYPE_ID[t] and g.name == t, (t, g)
        assert gguf.GGML_QUANT_SIZES[g] == (block_size(t), type_size(t)), t


@pytest.mark.slow  # loads libggml from the native build
def test_table_matches_libggml():
    """libggml's own type traits for each id: the name, elements per block and bytes per block we use."""
    for t in QUANT_TYPES:
        tr = _libggml().ggml_get_type_traits(GGML_TYPE_ID[t]).contents
        got = (tr.type_name.decode().upper(), tr.blck_size, tr.type_size)  # ggml spells them q4_0, q4_K, iq4_xs
        assert got == (t, block_size(t), type_size(t)), got


def test_gguf_py_coverage_is_as_documented():
    import gguf

    x = quantize_rtn(torch.randn(1, 256), "Q2_K").packed
    gguf.quants.dequantize(x, ggml_type("Q2_K"))
    for t in GGUF_PY_CANNOT:
        with pytest.raises(NotImplementedError):
            gguf.quants.dequantize(np.zeros((1, type_size(t)), np.uint8), ggml_type(t))


@pytest.mark.parametrize("t,oracle", oracle_params(QUANT_TYPES))
def test_rtn_random_matrices_exact(t, oracle):
    g = torch.Generator().manual_seed(1)
    for W in (
        torch.randn(16, 512, generator=g),
        torch.randn(8, 768, generator=g) * 0.02 + 0.01,  # offset: mins matter
        torch.rand(8, 256, generator=g) - 0.9,  # mostly negative
        torch.randn(4, 256, generator=g) ** 3,  # heavy tails
    ):
        assert_exact(quantize_rtn(W, t), tuple(W.shape), (oracle,))


@pytest.mark.parametrize("t,oracle", oracle_params(QUANT_TYPES))
def test_rtn_with_imatrix_exact(t, oracle):
    g = torch.Generator().manual_seed(2)
    W = torch.randn(8, 512, generator=g)
    im = torch.rand(512, generator=g) ** 4
    im[:40] = 0  # dead columns
    assert_exact(quantize_rtn(W, t, im), (8, 512), (oracle,))


@pytest.mark.parametrize("t,oracle", oracle_params(QUANT_TYPES))
def test_edge_blocks_exact(t, oracle):
    """All-zero, constant, outlier, subnormal-scale and fp16-overflowing blocks, each one super-block wide."""
    n = 256
    rows = [
        torch.zeros(n),
        torch.full((n,), 0.37),
        torch.full((n,), -2.5),
        torch.where(torch.arange(n) == 7, 3.0e4, 1e-2 * torch.sin(torch.arange(n, dtype=torch.float32))),
        torch.where(torch.arange(n) == 200, -6.0e4, 0.5 * torch.cos(torch.arange(n, dtype=torch.float32))),
        # magnitude 1e-5 · (largest level): block scales ≈ 1e-5, fp16 subnormals
        1e-5 * max(map(abs, _spec(t).levels)) * torch.randn(n, generator=torch.Generator().manual_seed(3)).sign(),
        3e-9 * torch.randn(n, generator=torch.Generator().manual_seed(4)),  # below fp16's range: scale 0
        torch.linspace(-1e5, 1e5, n),  # beyond fp16's range: scales clamp to 65504
        torch.tensor([0.0, 1.0] * (n // 2)),
    ]
    W = torch.stack(rows)
    res = quantize_rtn(W, t)
    assert_exact(res, tuple(W.shape), (oracle,))
    assert torch.isfinite(res.dequant).all()
    assert (res.dequant[0] == 0).all()  # an all-zero block decodes to zeros
    if t not in ("Q1_0",):  # a constant block is exact on every grid that has a zero-offset level or a min
        assert torch.allclose(res.dequant[1], W[1], rtol=2e-2), t
    # ggml's fp16 scale must really be subnormal for row 5 in single-scale types
    if block_size(t) == _spec(t).sub:
        d = np.frombuffer(res.packed[5, :2].tobytes(), "<f2")[0] if t not in ("Q6_K",) else None
        assert d is None or 0 < abs(float(d)) < 6.1e-5, (t, d)


@pytest.mark.parametrize("t,oracle", oracle_params(QUANT_TYPES))
def test_packer_every_code_exact(t, oracle):
    """Random codes over the full level range (every bit of every field) on fitted grids."""
    g = torch.Generator().manual_seed(5)
    W = torch.randn(32, 512, generator=g)
    grid = fit_grid(W, t)
    codes = torch.randint(0, len(_spec(t).levels), W.shape, generator=g)
    assert_exact(finish(codes, grid), tuple(W.shape), (oracle,))


@pytest.mark.parametrize("t,oracle", oracle_params(["Q2_K", "Q4_K", "Q5_K", "Q3_K", "Q6_K", "IQ4_XS"]))
def test_every_subscale_value_exact(t, oracle):
    """Sub-block scales/mins take every value of their bit range (exercise all 4/6/8-bit scale packings)."""
    g = torch.Generator().manual_seed(6)
    W = torch.randn(64, 256, generator=g)
    grid = fit_grid(W, t)
    per = 256 // _spec(t).sub
    bits = _spec(t).sub_bits
    lo, hi = (0, (1 << bits) - 1) if _spec(t).asym else (-(1 << (bits - 1)), (1 << (bits - 1)) - 1)
    vals = torch.arange(lo, hi + 1).repeat(64 * per // (hi - lo + 1) + 1)[: 64 * per].reshape(64, 1, per)
    grid.fields["sc"] = vals.to(grid.fields["sc"].dtype)
    d = grid.fields["d"].float()
    grid.scale = (d * vals).reshape(64, per)
    if grid.offset is not None:
        mn = vals.flip(-1).to(torch.uint8)
        grid.fields["mn"] = mn
        grid.offset = -(grid.fields["dmin"].float() * mn).reshape(64, per)
    codes = torch.randint(0, len(_spec(t).levels), W.shape, generator=g)
    assert_exact(finish(codes, grid), (64, 256), (oracle,))


@pytest.mark.slow  # llama.cpp's quantiser and decoder from the native build
def test_rtn_quality_vs_ggml():
    """Our RTN grid fit is at most 1% worse than llama.cpp's own quantiser in the error it minimises (plain MSE,
    or MSE weighted by the same importance matrix), on Gaussian, heavy-tailed and already-quantised (Q4_1-grid)
    weights; the K-quants (whose sub-block scale search used to be coarser than llama.cpp's: up to 1.4x with an
    imatrix) are strictly better."""
    g = torch.Generator().manual_seed(7)
    W = torch.randn(64, 1024, generator=g)
    im = torch.rand(1024, generator=g) ** 2 + 0.01
    data = {"gauss": W, "heavy": W**3, "q4_1 grid": quantize_rtn(W, "Q4_1").dequant}
    for t in QUANT_TYPES:
        for kind, X in data.items():
            for imx in (None, im):
                w = 1.0 if imx is None else imx
                ours = float((((quantize_rtn(X, t, imx).dequant - X) ** 2) * w).sum())
                ref = torch.from_numpy(ggml_dequantize(ggml_quantize(X, t, imx), t, tuple(X.shape)))
                theirs = float((((ref - X) ** 2) * w).sum())
                what = (t, kind, imx is not None, ours / max(theirs, 1e-30))
                assert ours <= 1.01 * theirs, what
                if _spec(t).sub_bits and theirs > 0:
                    assert ours < theirs, what


@pytest.mark.parametrize("t", ["Q2_K", "Q4_K", "IQ4_XS", "Q1_0"])
def test_bad_row_length_is_one_line_error(t):
    with pytest.raises(McsharpError) as e:
        quantize_rtn(torch.randn(768, 128 if t != "Q1_0" else 96), t)
    msg = str(e.value)
    assert "\n" not in msg and "multiple" in msg and t in msg and "768" in msg


def test_unknown_type():
    with pytest.raises(McsharpError):
        block_size("Q7_7")


def test_gguf_writer_roundtrip(tmp_path):
    """packed has exactly the shape GGUFWriter.add_tensor(raw_dtype=...) needs for a (rows, cols) tensor."""
    import gguf

    W = torch.randn(4, 512, generator=torch.Generator().manual_seed(8))
    path = tmp_path / "t.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    results = {t: quantize_rtn(W, t) for t in ("Q4_K", "Q1_0", "IQ4_XS")}
    for t, r in results.items():
        w.add_tensor(f"w.{t}", r.packed, raw_dtype=ggml_type(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    for tensor in gguf.GGUFReader(str(path)).tensors:
        t = tensor.name.split(".")[1]
        assert list(tensor.shape) == [512, 4]  # ggml order: ne0 = row length
        np.testing.assert_array_equal(np.asarray(tensor.data).reshape(results[t].packed.shape), results[t].packed)


@pytest.mark.slow  # the real fixture and libggml
@pytest.mark.parametrize("t", QUANT_TYPES)
def test_real_fixture_weights_exact(t, moe_fixture):
    from safetensors import safe_open

    names = [
        "model.layers.3.self_attn.q_proj.weight",
        "model.layers.3.mlp.experts.0.gate_proj.weight",
        "model.layers.3.mlp.shared_expert.down_proj.weight",
        "model.layers.3.mlp.experts.0.down_proj.weight",
        "model.embed_tokens.weight",
    ]
    with safe_open(str(moe_fixture / "model.safetensors"), "pt") as f:
        for name in names:
            W = f.get_tensor(name).float()
            if name.startswith("model.embed"):
                W = W[:512]
            if W.shape[1] % block_size(t):
                with pytest.raises(McsharpError):
                    quantize_rtn(W, t)
                continue
            assert_exact(quantize_rtn(W, t), tuple(W.shape))
            im = torch.rand(W.shape[1], generator=torch.Generator().manual_seed(9))
            assert_exact(quantize_rtn(W, t, im), tuple(W.shape))


@pytest.mark.parametrize("t", [t for t in QUANT_TYPES if not _is_uniform(_spec(t).levels)])
def test_nearest_code_table_is_bucketize(t):
    """The lookup-table nearest level (non-contiguous levels: IQ4_NL/IQ4_XS, Q1_0) is exactly torch.bucketize
    against the midpoints, ties and values far outside the levels included."""
    lt = torch.tensor(_spec(t).levels, dtype=torch.float32)
    mids = (lt[1:] + lt[:-1]) * 0.5
    x = torch.cat([torch.randn(200_000, generator=torch.Generator().manual_seed(3)) * 100, mids, lt,
                   torch.nextafter(mids, mids + 1), torch.nextafter(mids, mids - 1), torch.tensor([-1e30, 1e30, 0.0])])
    ref = torch.bucketize(x, mids)
    assert torch.equal(nearest_code(x, t), ref)
    assert torch.equal(nearest_level(x, t), lt[ref])
