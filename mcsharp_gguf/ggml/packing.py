"""Bit-exact ggml packers (integer codes + grid fields → ggml's block byte layout) and round-to-nearest on our grid.

``pack`` writes one type's blocks; ``finish`` packs codes and decodes them as ggml does; ``quantize_rtn`` ties
fitting, coding and packing together. Layouts were derived from ggml-common.h / ggml-quants.c (pinned llama.cpp);
nothing is copied from there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import McsharpError
from .grids import Grid, fit_grid, grid_codes, grid_dequant
from .types import _spec, bits_per_weight, block_size, check_shape, type_size


def _b16(t: torch.Tensor) -> np.ndarray:
    """(rows, nb, 1) fp16 → (rows, nb, 2) little-endian bytes."""
    a = t.contiguous().numpy().astype("<f2")
    return a.view(np.uint8).reshape(*a.shape[:2], 2)


def _nib(c: np.ndarray) -> np.ndarray:
    """Pairs (…, 32) codes as in Q4_0: element j in the low nibble, element j+16 in the high nibble of byte j."""
    return (c[..., :16] & 15) | ((c[..., 16:] & 15) << 4)


def _crumbs(c: np.ndarray) -> np.ndarray:
    """K-quant 2-bit planes (…, 256) → (…, 64): byte 32·(e//128) + e%32, shift 2·((e%128)//32)."""
    r = c.reshape(*c.shape[:-1], 2, 4, 32) & 3
    return (r[..., 0, :] | (r[..., 1, :] << 2) | (r[..., 2, :] << 4) | (r[..., 3, :] << 6)).reshape(*c.shape[:-1], 64)


def _bitplane(bits: np.ndarray) -> np.ndarray:
    """(…, 256) single bits → (…, 32): byte l holds bit (e//32) for element e with e%32 == l."""
    r = bits.reshape(*bits.shape[:-1], 8, 32).astype(np.uint8)
    out = np.zeros(r.shape[:-2] + (32,), np.uint8)
    for k in range(8):
        out |= r[..., k, :] << k
    return out


def _k4_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K: 8 six-bit scales + 8 six-bit mins → 12 bytes (inverse of ggml's get_scale_min_k4)."""
    out = np.zeros(sc.shape[:-1] + (12,), np.uint8)
    out[..., 0:4] = (sc[..., 0:4] & 63) | ((sc[..., 4:8] >> 4) << 6)
    out[..., 4:8] = (mn[..., 0:4] & 63) | ((mn[..., 4:8] >> 4) << 6)
    out[..., 8:12] = (sc[..., 4:8] & 15) | ((mn[..., 4:8] & 15) << 4)
    return out


def _q3_scales(sc: np.ndarray) -> np.ndarray:
    """Q3_K: 16 signed six-bit scales (stored +32) → 12 bytes: low nibbles in 0..7, high 2-bit pairs in 8..11."""
    u = (sc + 32).astype(np.uint8)
    out = np.zeros(sc.shape[:-1] + (12,), np.uint8)
    out[..., 0:8] = (u[..., 0:8] & 15) | ((u[..., 8:16] & 15) << 4)
    hi = u >> 4
    for j in range(16):
        out[..., 8 + j % 4] |= hi[..., j] << (2 * (j // 4))
    return out


def pack(codes: torch.Tensor, grid: Grid) -> np.ndarray:
    """ggml bytes (rows, n // block * type_size) for codes (rows, n) on grid."""
    t = grid.type_name
    sp = _spec(t)
    rows, n = codes.shape
    nb = n // sp.block
    c = codes.to(torch.uint8).numpy().reshape(rows, nb, sp.block)
    f = grid.fields
    if t == "Q8_0":
        parts = [_b16(f["d"]), c ^ 0x80]  # code = q + 128; int8 byte of q
    elif t in ("Q4_0", "IQ4_NL"):
        parts = [_b16(f["d"]), _nib(c)]
    elif t == "Q4_1":
        parts = [_b16(f["d"]), _b16(f["m"]), _nib(c)]
    elif t in ("Q5_0", "Q5_1"):
        qh = np.packbits((c >> 4) & 1, axis=-1, bitorder="little")  # uint32 LE: bit j = high bit of element j
        head = [_b16(f["d"])] + ([_b16(f["m"])] if t == "Q5_1" else [])
        parts = head + [qh, _nib(c)]
    elif t == "Q1_0":
        parts = [_b16(f["d"]), np.packbits(c & 1, axis=-1, bitorder="little")]
    elif t == "Q2_0":
        r = c.reshape(rows, nb, 16, 4)
        parts = [_b16(f["d"]), r[..., 0] | (r[..., 1] << 2) | (r[..., 2] << 4) | (r[..., 3] << 6)]
    elif t == "Q2_K":
        sc = f["sc"].numpy() | (f["mn"].numpy() << 4)
        parts = [sc, _crumbs(c), _b16(f["d"]), _b16(f["dmin"])]
    elif t == "Q3_K":
        parts = [_bitplane(c >> 2), _crumbs(c), _q3_scales(f["sc"].numpy()), _b16(f["d"])]
    elif t in ("Q4_K", "Q5_K"):
        s12 = _k4_scales(f["sc"].numpy(), f["mn"].numpy())
        lo = c.reshape(rows, nb, 4, 2, 32) & 15
        qs = (lo[..., 0, :] | (lo[..., 1, :] << 4)).reshape(rows, nb, 128)
        qh = [_bitplane(c >> 4)] if t == "Q5_K" else []
        parts = [_b16(f["d"]), _b16(f["dmin"]), s12] + qh + [qs]
    elif t == "Q6_K":
        r = c.reshape(rows, nb, 2, 4, 32)
        ql = np.concatenate(
            [(r[:, :, :, 0] & 15) | ((r[:, :, :, 2] & 15) << 4), (r[:, :, :, 1] & 15) | ((r[:, :, :, 3] & 15) << 4)],
            axis=-1,
        ).reshape(rows, nb, 128)
        h = r >> 4
        qh = (h[:, :, :, 0] | (h[:, :, :, 1] << 2) | (h[:, :, :, 2] << 4) | (h[:, :, :, 3] << 6)).reshape(rows, nb, 64)
        parts = [ql, qh, f["sc"].numpy().astype(np.int8).view(np.uint8), _b16(f["d"])]
    elif t == "IQ4_XS":
        u = (f["sc"].numpy() + 32).astype(np.uint16)  # 8 six-bit scales
        sh = np.zeros(u.shape[:-1], np.uint16)
        for ib in range(8):
            sh |= (u[..., ib] >> 4) << (2 * ib)
        sl = ((u[..., 0::2] & 15) | ((u[..., 1::2] & 15) << 4)).astype(np.uint8)
        qs = _nib(c.reshape(rows, nb, 8, 32)).reshape(rows, nb, 128)
        parts = [_b16(f["d"]), sh.astype("<u2").view(np.uint8).reshape(rows, nb, 2), sl, qs]
    else:  # pragma: no cover - guarded by _spec
        raise McsharpError(f"no packer for {t}")
    out = np.concatenate([p.astype(np.uint8, copy=False) for p in parts], axis=-1)
    assert out.shape[-1] == type_size(t), (t, out.shape)
    return np.ascontiguousarray(out.reshape(rows, nb * out.shape[-1]))


@dataclass
class QuantResult:
    """A matrix quantised to one ggml type.

    ``packed``: uint8 (rows, cols // block * type_size), ready for ``GGUFWriter.add_tensor(name, packed,
    raw_dtype=ggml_type(type_name))`` (None when only the decoded weights were asked for); ``dequant``: float32
    (rows, cols), bit-identical to ggml's decode of ``packed``; ``codes``/``grid``: what was packed.
    """

    type_name: str
    packed: np.ndarray | None
    dequant: torch.Tensor
    codes: torch.Tensor | None = None
    grid: Grid | None = None

    @property
    def bpw(self) -> float:
        return bits_per_weight(self.type_name)


def _grid_rows(grid: Grid, r0: int, r1: int) -> Grid:
    """Rows r0:r1 of a grid."""
    return Grid(grid.type_name, grid.scale[r0:r1], None if grid.offset is None else grid.offset[r0:r1],
                {k: v[r0:r1] for k, v in grid.fields.items()})


def finish(codes: torch.Tensor, grid: Grid, chunk_rows: int = 1024, device: torch.device | None = None,
           packed: bool = True) -> QuantResult:
    """Pack codes on grid and decode them the way ggml does (``chunk_rows`` rows at a time: the per-element
    scales and index tensors of a whole LM head would be several times its size).

    The decode runs where the codes are (on a GPU too: one fp32 product and one fp32 add per weight, as ggml
    does, give the same bits there) and the result's ``dequant`` is handed over on ``device`` (default: the codes'
    device); the bytes are packed on the CPU (numpy), or not at all without ``packed`` (the importance pass needs
    only the decoded weights)."""
    device = device or codes.device
    codes = codes.to(torch.uint8)
    grid = grid.to(codes.device)
    rows, n = codes.shape
    out = np.empty((rows, n // block_size(grid.type_name) * type_size(grid.type_name)), np.uint8) if packed else None
    deq = torch.empty(rows, n, device=device)
    for r0 in range(0, rows, chunk_rows):
        c, g = codes[r0:r0 + chunk_rows], _grid_rows(grid, r0, r0 + chunk_rows)
        if out is not None:
            out[r0:r0 + chunk_rows] = pack(c.cpu(), g.to("cpu"))
        deq[r0:r0 + chunk_rows] = grid_dequant(c, g)
    return QuantResult(grid.type_name, out, deq, codes, grid)


def quantize_rtn(W: torch.Tensor, type_name: str, imatrix: torch.Tensor | None = None,
                 chunk_rows: int = 1024) -> QuantResult:
    """Round-to-nearest on our grid: fit each block's scales/mins (weighted by ``imatrix``, per input column, if
    given), then take the nearest code. Rows are processed in chunks to bound memory."""
    check_shape(tuple(W.shape), type_name)
    device = W.device  # RTN fits on the CPU; the dequantised result goes back where W was
    W = W.detach().float().cpu()
    grids, codes = [], []
    for r0 in range(0, W.shape[0], chunk_rows):
        x = W[r0:r0 + chunk_rows]
        g = fit_grid(x, type_name, None if imatrix is None else imatrix.float().cpu().reshape(1, -1))
        grids.append(g)
        codes.append(grid_codes(x, g).to(torch.uint8))
    grid = Grid.cat(grids, dim=0)
    return finish(torch.cat(codes, 0), grid, chunk_rows, device)
