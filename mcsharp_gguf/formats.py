"""ggml quantisation grids and bit-exact packers for the 14 scalar types MC# writes.

Every type is described by a small table (block size, sub-block size, integer levels, whether blocks carry an
additive min) and three pure functions:

* ``fit_grid``: choose a block's scales/mins from (possibly error-updated) weights. For K-quants this includes
  quantising the per-sub-block scales/mins to 4/6/8 bits against an fp16 super-block scale, exactly as stored.
* ``grid_codes`` / ``grid_dequant``: nearest code on that fixed grid, and the value ggml will decode for it. The
  decode uses the same float32 operations in the same order as ggml's ``dequantize_row_*`` (fp16 → fp32 scale,
  one product per scale, ``scale * level + offset``), so it is bit-identical to ggml.
* ``pack``: integer codes + grid fields → ggml's exact block byte layout.

``quantize_rtn`` ties them together (round-to-nearest on our grid). ``gptq.gptq_quantize`` uses the same grid with
Hessian-aware error feedback. ``ggml_dequantize`` / ``ggml_quantize`` call the built libggml through ctypes and
serve as independent references for tests and benchmarks.

Layouts were derived from ggml-common.h / ggml-quants.c (pinned llama.cpp); nothing is copied from there.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import gguf
import numpy as np
import torch

from .errors import McsharpError

QUANT_TYPES: tuple[str, ...] = (
    "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q1_0", "Q2_0",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS",
)

QK_K = 256
FP16_MAX = 65504.0
KVALUES_IQ4NL = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


@dataclass(frozen=True)
class _Spec:
    """Static description of one ggml type: dequantised value = scale[sub] * levels[code] + offset[sub]."""

    block: int  # elements per packed ggml block (super-block for K-quants)
    sub: int  # elements sharing one effective scale/offset
    levels: tuple[int, ...]  # code -> integer multiplier, ascending
    asym: bool  # blocks carry an additive min (Q4_1, Q5_1, Q2_K, Q4_K, Q5_K)
    sub_bits: int = 0  # K-quant/IQ4_XS quantised sub-block scale width (0: scale is plain fp16)


def _rng(lo: int, hi: int) -> tuple[int, ...]:
    return tuple(range(lo, hi + 1))


_SPECS: dict[str, _Spec] = {
    "Q8_0": _Spec(32, 32, _rng(-128, 127), False),
    "Q4_0": _Spec(32, 32, _rng(-8, 7), False),
    "Q4_1": _Spec(32, 32, _rng(0, 15), True),
    "Q5_0": _Spec(32, 32, _rng(-16, 15), False),
    "Q5_1": _Spec(32, 32, _rng(0, 31), True),
    "Q1_0": _Spec(128, 128, (-1, 1), False),
    "Q2_0": _Spec(64, 64, _rng(-1, 2), False),
    "Q2_K": _Spec(QK_K, 16, _rng(0, 3), True, 4),
    "Q3_K": _Spec(QK_K, 16, _rng(-4, 3), False, 6),
    "Q4_K": _Spec(QK_K, 32, _rng(0, 15), True, 6),
    "Q5_K": _Spec(QK_K, 32, _rng(0, 31), True, 6),
    "Q6_K": _Spec(QK_K, 16, _rng(-32, 31), False, 8),
    "IQ4_NL": _Spec(32, 32, KVALUES_IQ4NL, False),
    "IQ4_XS": _Spec(QK_K, 32, KVALUES_IQ4NL, False, 6),
}
assert tuple(_SPECS) == QUANT_TYPES


def _spec(type_name: str) -> _Spec:
    try:
        return _SPECS[type_name]
    except KeyError:
        raise McsharpError(f"unknown quant type {type_name!r}: use one of {', '.join(QUANT_TYPES)}") from None


def ggml_type(type_name: str) -> gguf.GGMLQuantizationType:
    """The gguf/ggml enum member of a type name (same numbering as ``enum ggml_type``)."""
    _spec(type_name)
    return gguf.GGMLQuantizationType[type_name]


def block_size(type_name: str) -> int:
    """Elements per ggml block; a row length must be a multiple of it."""
    return _spec(type_name).block


def type_size(type_name: str) -> int:
    """Bytes per ggml block."""
    return gguf.GGML_QUANT_SIZES[ggml_type(type_name)][1]


def bits_per_weight(type_name: str) -> float:
    """True storage cost in bits per weight, scales and mins included (e.g. Q4_K: 144·8/256 = 4.5)."""
    return 8.0 * type_size(type_name) / block_size(type_name)


def tensor_bytes(type_name: str, n_elements: int) -> int:
    """Bytes of ``n_elements`` weights stored as ``type_name`` (whole blocks; rows must fit them)."""
    return n_elements // block_size(type_name) * type_size(type_name)


def check_shape(shape: tuple[int, ...], type_name: str) -> None:
    """Raise a one-line McsharpError unless a (rows, cols) matrix can be stored as ``type_name``."""
    bs = block_size(type_name)
    if len(shape) != 2 or shape[1] % bs != 0:
        fits = [t for t in QUANT_TYPES if len(shape) == 2 and shape[1] % block_size(t) == 0]
        raise McsharpError(
            f"cannot store a {tuple(shape)} matrix as {type_name}: the row length (last dim) must be a multiple of "
            f"its block size {bs}; pick a type with a smaller block ({', '.join(fits) or 'none fits'})"
        )


# --------------------------------------------------------------------------------------------------------------
# grid: fitted block parameters


@dataclass
class Grid:
    """Fitted parameters of a (rows, n) span of columns on one type's grid.

    ``scale``/``offset`` (rows, n // sub) are the float32 numbers ggml multiplies/adds when it decodes (already the
    product of fp16 super-scale and quantised sub-scale for K-quants); ``fields`` hold the raw stored fields per
    ggml block for the packer.
    """

    type_name: str
    scale: torch.Tensor
    offset: torch.Tensor | None
    fields: dict[str, torch.Tensor] = field(default_factory=dict)

    @staticmethod
    def cat(grids: list[Grid], dim: int = 1) -> Grid:
        """Concatenate grids of consecutive column spans (dim=1, block-aligned) or row chunks (dim=0)."""
        g0 = grids[0]
        return Grid(
            g0.type_name,
            torch.cat([g.scale for g in grids], dim),
            None if g0.offset is None else torch.cat([g.offset for g in grids], dim),
            {k: torch.cat([g.fields[k] for g in grids], dim) for k in g0.fields},
        )

    def expand(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-element (rows, n) scale and offset."""
        sub = _spec(self.type_name).sub
        s = self.scale.repeat_interleave(sub, dim=1)
        o = None if self.offset is None else self.offset.repeat_interleave(sub, dim=1)
        return s, o


def _f16(x: torch.Tensor) -> torch.Tensor:
    """fp32 → fp16 with round-to-nearest-even (as GGML_FP32_TO_FP16), clamped so huge blocks don't become inf."""
    return x.clamp(-FP16_MAX, FP16_MAX).to(torch.float16)


def _levels_t(sp: _Spec) -> torch.Tensor:
    return torch.tensor(sp.levels, dtype=torch.float32)


def _is_uniform(levels: tuple[int, ...]) -> bool:
    return levels == _rng(levels[0], levels[-1])


@cache
def _code_table(levels: tuple[int, ...]) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(c0, codes, values) with which ``c = ceil(2t)`` finds the level nearest to t for any integer levels.

    Ties go to the lower level (t exactly on a midpoint m picks the level below, as ``bucketize`` against the
    midpoints does). The doubled midpoints 2m are integers, and 2m < 2t ⟺ 2m < ceil(2t), so the code is the
    number of doubled midpoints below c: a table over c, clamped to [c0, c0 + len − 1]. 2t and its ceiling are
    exact in float32, so this is bucketize's answer, found by one lookup instead of a binary search.
    """
    mids2 = [lo + hi for lo, hi in zip(levels[:-1], levels[1:], strict=True)]
    c0 = mids2[0]
    codes = torch.tensor([sum(m < c for m in mids2) for c in range(c0, mids2[-1] + 2)], dtype=torch.long)
    return c0, codes, torch.tensor(levels, dtype=torch.float32)[codes]


def _table_index(t: torch.Tensor, levels: tuple[int, ...]) -> torch.Tensor:
    c0, codes, _ = _code_table(levels)
    return torch.ceil(t * 2.0).clamp_(c0, c0 + len(codes) - 1).sub_(c0).long()


def nearest_code(t: torch.Tensor, type_name: str) -> torch.Tensor:
    """Index of the level nearest to ``t`` (= (w - offset) / scale), as int64."""
    lv = _spec(type_name).levels
    if _is_uniform(lv):  # contiguous integers: round and clamp
        return (torch.round(t).clamp_(lv[0], lv[-1]) - lv[0]).long()
    return _code_table(lv)[1][_table_index(t, lv)]


def nearest_level(t: torch.Tensor, type_name: str) -> torch.Tensor:
    """The nearest level's value itself (float32); cheaper than codes for contiguous integer levels."""
    lv = _spec(type_name).levels
    if _is_uniform(lv):
        return torch.round(t).clamp_(lv[0], lv[-1])
    return _code_table(lv)[2][_table_index(t, lv)]


def _inv(s: torch.Tensor) -> torch.Tensor:
    return torch.where(s != 0, 1.0 / torch.where(s != 0, s, 1.0), 0.0)


def codes_on(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, type_name: str) -> torch.Tensor:
    """Nearest codes of x on per-element scale/offset (same shapes)."""
    t = (x - offset) if offset is not None else x
    return nearest_code(t * _inv(scale), type_name)


def dequant_on(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, type_name: str) -> torch.Tensor:
    """ggml's decode: one fp32 product scale*level, then one fp32 add of the offset (= ggml's ``- m``)."""
    y = scale * _levels_t(_spec(type_name))[codes.long()]  # (uint8 would index as a mask)
    return y + offset if offset is not None else y


def _nearest_level_(t: torch.Tensor, type_name: str) -> torch.Tensor:
    """``nearest_level`` computed in place in ``t`` where the levels are contiguous integers (else a new tensor).

    The grid fits below reuse scratch buffers: fresh multi-MB temporaries cost more than the arithmetic here.
    """
    lv = _spec(type_name).levels
    if _is_uniform(lv):
        return t.round_().clamp_(lv[0], lv[-1])
    return nearest_level(t, type_name)


def _fit_sym(x: torch.Tensor, w: torch.Tensor, type_name: str, ntry: int = 4) -> torch.Tensor:
    """Signed scale per group (last dim) for value = s * level, minimising sum w (s*level - x)^2.

    Candidate assignments map the largest-|x| element to either extreme level, stretched by ``ntry`` ratios
    spanning 0.8…1.2 (the clipping trade-off); each assignment then gets its least-squares scale (as ggml's
    make_qx_quants does). ``w`` may be a broadcastable per-column weight.
    """
    lv = _spec(type_name).levels
    idx = x.abs().argmax(-1, keepdim=True)
    xm = x.gather(-1, idx).squeeze(-1)  # signed max-|x|
    wx = w * x
    step = 0.4 / ntry
    ratios = [1.0 + step * (k - ntry // 2) for k in range(ntry)]
    invs = [_inv(xm / (e * r)) for e in sorted({lv[0], lv[-1]}) for r in ratios]
    qb, tb = torch.empty_like(x), torch.empty_like(x)
    sxl, sll = torch.empty((len(invs),) + xm.shape), torch.empty((len(invs),) + xm.shape)
    for k, iv in enumerate(invs):  # only the big per-element work in the loop; the choice is batched below
        q = _nearest_level_(torch.mul(x, iv.unsqueeze(-1), out=qb), type_name)
        torch.sum(torch.mul(q, wx, out=tb), -1, out=sxl[k])
        torch.sum(torch.mul(q, w, out=tb).mul_(q), -1, out=sll[k])
    g = torch.where(sll > 0, sxl * sxl / sll.clamp_min(1e-30), -1.0)  # gain (Σwxl)² / Σwl²: larger is better
    k = g.movedim(0, -1).contiguous().argmax(-1).unsqueeze(0)  # (a reduction over dim 0 is slow)
    best_s = (sxl.gather(0, k) / sll.gather(0, k).clamp_min(1e-30)).squeeze(0)
    return torch.where(xm == 0, 0.0, best_s)


def _solve_sb(sw: torch.Tensor, swq: torch.Tensor, swqq: torch.Tensor, swx: torch.Tensor, swqx: torch.Tensor,
              nonpos_min: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted least-squares (s >= 0, b) of x ≈ s·q + b from the sufficient statistics of fixed codes q.

    ``nonpos_min``: K-quants store -b as an unsigned min, so b <= 0 is enforced (then s is refitted alone).
    """
    det = sw * swqq - swq * swq
    ok = det > 1e-12 * sw * swqq
    dets = torch.where(ok, det, 1.0)
    # all codes equal (e.g. a constant block): (s, b) is underdetermined, the mean goes into b where allowed
    b0 = torch.where(sw > 0, swx / sw.clamp_min(1e-38), 0.0)
    if nonpos_min:
        b0 = b0.clamp(max=0.0)
    s0 = torch.where(swqq > 0, (swqx - b0 * swq) / swqq.clamp_min(1e-30), 0.0)
    s = torch.where(ok, (sw * swqx - swq * swx) / dets, s0)
    b = torch.where(ok, (swqq * swx - swq * swqx) / dets, b0)
    if nonpos_min:
        fix = b > 0
        s = torch.where(fix, swqx / swqq.clamp_min(1e-30), s)
        b = torch.where(fix, 0.0, b)
    return s.clamp_min(0.0), b


def _fit_asym(x: torch.Tensor, w: torch.Tensor, nmax: int, nonpos_min: bool, nstep: int = 6, span: float = 0.5
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(s >= 0, b, q) per group for value = s*q + b, q in 0..nmax, minimising sum w (s q + b - x)^2.

    Candidate assignments map the min..max range onto nmax + δ steps, δ in {0} ∪ ``nstep`` values spanning
    ±``span`` (ggml's make_qkx3_quants idea; δ = -1 also finds a grid of half the resolution, e.g. Q4 data in
    Q5), then a weighted least-squares (s, b) per assignment. Returns the best (s, b) and its codes q (float).
    ``nonpos_min``: K-quants store -b as an unsigned min, so b <= 0.
    """
    xmin = x.amin(-1)
    if nonpos_min:
        xmin = xmin.clamp(max=0.0)
    rng = x.amax(-1) - xmin
    xr = x - xmin.unsqueeze(-1)
    wx = w * x
    sw = torch.broadcast_to(w, x.shape).sum(-1)
    swx = wx.sum(-1)
    swxx = (wx * x).sum(-1)
    irng = torch.where(rng > 0, 1.0 / rng.clamp_min(1e-30), 0.0)
    deltas = sorted({0.0} | {span * (2.0 * k / (nstep - 1) - 1.0) for k in range(nstep)} if nstep > 1 else {0.0})
    iscales = torch.stack([(nmax + d) * irng for d in deltas])
    qb, tb = torch.empty_like(x), torch.empty_like(x)
    swq, swqq, swqx = (torch.empty_like(iscales) for _ in range(3))
    for k in range(len(deltas)):  # only the big per-element work in the loop; the choice is batched below
        q = torch.mul(xr, iscales[k].unsqueeze(-1), out=qb).round_().clamp_(0, nmax)
        wq = torch.mul(q, w, out=tb)
        torch.sum(wq, -1, out=swq[k])
        torch.sum(wq.mul_(q), -1, out=swqq[k])
        torch.sum(q.mul_(wx), -1, out=swqx[k])
    s, b = _solve_sb(sw, swq, swqq, swx, swqx, nonpos_min)
    # weighted squared error of (s, b) on each assignment, from the sufficient statistics
    e = swxx + s * (s * swqq - 2 * swqx + 2 * b * swq) + b * (b * sw - 2 * swx)
    k = e.movedim(0, -1).contiguous().argmin(-1).unsqueeze(0)  # (a reduction over dim 0 is slow)
    s, b, iscale = s.gather(0, k).squeeze(0), b.gather(0, k).squeeze(0), iscales.gather(0, k).squeeze(0)
    q = xr.mul_(iscale.unsqueeze(-1)).round_().clamp_(0, nmax)
    return s, b, q


# K-quant sub-block scales. With a sub-block's codes fixed, its weighted error is a quadratic in its effective
# (scale s, offset b): E(s, b) = A s² + C b² + 2 Bq s b - 2 P s - 2 S b + const, with A = Σwq², Bq = Σwq, C = Σw,
# P = Σwqx, S = Σwx. The stored s = d·sc and b = -dmin·mn (fp16 super-scales, 4/6/8-bit integers) are chosen to
# minimise Σ E over the super-block by alternating exact integer choices and a 2×2 least-squares for (d, dmin);
# ggml's make_qp_quants instead fits the integers to the sub-scales alone, weighted by Σw. Then the codes are
# re-chosen on the stored grid and the whole thing repeats (each round keeps the better grid per super-block).


def _k_ints_asym(st: tuple[torch.Tensor, ...], s: torch.Tensor, D: torch.Tensor, M: torch.Tensor, hi: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best (sc, mn) in 0..hi per sub-block (…, per) for super-scale D and super-min M (…,): for sc around the
    continuous optimum s/D, the exactly best mn; returns (sc, mn, E summed over the super-block)."""
    Dx, Mx = D.unsqueeze(-1), M.unsqueeze(-1)
    A, Bq, C, P, S = st
    # candidates sc = round(s/D) + (-1, 0, 1) along a leading dim (a short last dim would make every op slow)
    a = (torch.round(s * _inv(Dx)) + torch.tensor([-1.0, 0.0, 1.0]).reshape(3, *[1] * s.dim())).clamp_(0, hi)
    sv = Dx * a  # the fp32 products ggml decodes with
    mn = torch.round((Bq * sv - S) * _inv(C * Mx)).clamp_(0, hi)
    bv = -(Mx * mn)
    E = sv * (A * sv + 2 * Bq * bv - 2 * P) + bv * (C * bv - 2 * S)
    ba, bm, be = a[0], mn[0], E[0]
    for k in (1, 2):
        bt = E[k] < be
        ba, bm, be = torch.where(bt, a[k], ba), torch.where(bt, mn[k], bm), torch.where(bt, E[k], be)
    return ba, bm, be.sum(-1)


def _k_lsq_asym(st: tuple[torch.Tensor, ...], a: torch.Tensor, mn: torch.Tensor, D: torch.Tensor, M: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16-rounded (D >= 0, M >= 0) minimising Σ E(D·a, -M·mn) for fixed integers (old values where
    undetermined)."""
    A, Bq, C, P, S = st
    a11, a22, a12 = (A * a * a).sum(-1), (C * mn * mn).sum(-1), -(Bq * a * mn).sum(-1)
    r1, r2 = (P * a).sum(-1), -(S * mn).sum(-1)
    det = a11 * a22 - a12 * a12
    ok = det > 1e-6 * a11 * a22
    dets = torch.where(ok, det, 1.0)
    D1 = torch.where(a11 > 0, r1 / a11.clamp_min(1e-38), D)  # independent fits where the 2×2 is singular
    M1 = torch.where(a22 > 0, r2 / a22.clamp_min(1e-38), M)
    Dn = torch.where(ok, (r1 * a22 - a12 * r2) / dets, D1)
    Mn = torch.where(ok, (a11 * r2 - a12 * r1) / dets, M1)
    neg_m = Mn < 0
    Dn, Mn = torch.where(neg_m, D1, Dn), torch.where(neg_m, 0.0, Mn)
    neg_d = Dn < 0
    Dn, Mn = torch.where(neg_d, 0.0, Dn), torch.where(neg_d, M1.clamp_min(0.0), Mn)
    return _f16(Dn).float(), _f16(Mn).float()


def _k_quant_asym(st: tuple[torch.Tensor, ...], s: torch.Tensor, b: torch.Tensor, hi: int, n_alt: int = 2):
    """(d fp16, dmin fp16, sc, mn) for sub-blocks (…, per) with continuous optima (s, b) and statistics st."""
    D = _f16(s.amax(-1) / hi).float()  # ggml's start: the largest sub-scale/min maps to the top integer
    M = _f16((-b).amax(-1) / hi).float()
    best = None
    for it in range(n_alt + 1):
        a, mn, E = _k_ints_asym(st, s, D, M, hi)
        if best is None:
            best = (D, M, a, mn, E)
        else:
            bt = E < best[4]
            bt1 = bt.unsqueeze(-1)
            best = (torch.where(bt, D, best[0]), torch.where(bt, M, best[1]), torch.where(bt1, a, best[2]),
                    torch.where(bt1, mn, best[3]), torch.where(bt, E, best[4]))
        if it < n_alt:
            D, M = _k_lsq_asym(st, a, mn, D, M)
    D, M, a, mn, _ = best
    return _f16(D), _f16(M), a, mn


def _k_quant_sym(A: torch.Tensor, P: torch.Tensor, lo: int, hi: int, n_alt: int = 2):
    """(d fp16, sc) for signed sub-scales: s = d·sc, sc in lo..hi, minimising Σ (A s² - 2 P s) per super-block."""
    s = torch.where(A > 0, P / A.clamp_min(1e-38), 0.0)
    idx = s.abs().argmax(-1, keepdim=True)
    smax = s.gather(-1, idx).squeeze(-1)
    best = None
    # two starts: the largest-|s| sub-scale at the extra negative integer (as ggml does) or at the positive end
    for D in (_f16(smax / lo).float(), _f16(smax / hi).float()):
        for it in range(n_alt + 1):
            a = torch.round(s * _inv(D).unsqueeze(-1)).clamp_(lo, hi)  # exact: E is a 1-D quadratic per sub-block
            sv = D.unsqueeze(-1) * a
            E = (A * sv * sv - 2 * P * sv).sum(-1)
            if best is None:
                best = (D, a, E)
            else:
                bt = E < best[2]
                best = (torch.where(bt, D, best[0]), torch.where(bt.unsqueeze(-1), a, best[1]),
                        torch.where(bt, E, best[2]))
            if it < n_alt:
                den = (A * a * a).sum(-1)
                D = torch.where(den > 0, _f16((P * a).sum(-1) / den.clamp_min(1e-38)).float(), D)
    return _f16(best[0]), best[1]


def _fit_kquant(xs: torch.Tensor, ws: torch.Tensor, sp: _Spec, type_name: str, rounds: int = 2, nstep: int = 12,
                ntry: int = 8) -> dict[str, torch.Tensor]:
    """Stored fields (d, sc[, dmin, mn]) of K-quant/IQ4_XS super-blocks for x (rows, nsub, sub), weights ws.

    Per-sub-block codes from a candidate search (``nstep``/``ntry`` candidates), sub-scales quantised against the
    full per-sub-block error (see above), codes re-chosen on the stored grid; ``rounds`` times, keeping per
    super-block the grid with the smallest weighted error.
    """
    rows, nsub, sub = xs.shape
    per = sp.block // sp.sub
    nb = nsub // per
    sh = (rows, nb, per)
    if sp.asym:
        nmax, hi = len(sp.levels) - 1, (1 << sp.sub_bits) - 1
        s, b, q = _fit_asym(xs, ws, nmax, nonpos_min=True, nstep=nstep, span=1.0)
        C = torch.broadcast_to(ws, xs.shape).sum(-1).reshape(sh)
        S = (ws * xs).sum(-1).reshape(sh)
    else:
        lo, hi = -(1 << (sp.sub_bits - 1)), (1 << (sp.sub_bits - 1)) - 1
        s = _fit_sym(xs, ws, type_name, ntry=ntry)
        q = nearest_level(xs * _inv(s).unsqueeze(-1), type_name)
    f: dict[str, torch.Tensor] = {}
    best_err = None
    tb = torch.empty_like(xs)
    for r in range(rounds):
        wq = torch.mul(q, ws, out=tb)
        Bq = wq.sum(-1).reshape(sh)
        P = (wq * xs).sum(-1).reshape(sh)
        A = wq.mul_(q).sum(-1).reshape(sh)
        if sp.asym:
            if r:
                s, b = _solve_sb(C, Bq, A, S, P, True)
            d, dmin, sc, mn = _k_quant_asym((A, Bq, C, P, S), s.reshape(sh), b.reshape(sh), hi)
            scale = (d.float().unsqueeze(-1) * sc).reshape(rows, nsub, 1)
            off = -(dmin.float().unsqueeze(-1) * mn).reshape(rows, nsub, 1)
            q = _nearest_level_(torch.sub(xs, off, out=q).mul_(_inv(scale)), type_name)
            cand = {"d": d.unsqueeze(-1), "dmin": dmin.unsqueeze(-1), "sc": sc.to(torch.uint8),
                    "mn": mn.to(torch.uint8)}
            res = torch.mul(q, scale, out=tb).add_(off).sub_(xs)
        else:
            d, sc = _k_quant_sym(A, P, lo, hi)
            scale = (d.float().unsqueeze(-1) * sc).reshape(rows, nsub, 1)
            q = _nearest_level_(torch.mul(xs, _inv(scale), out=q), type_name)
            cand = {"d": d.unsqueeze(-1), "sc": sc.to(torch.int16)}
            res = torch.mul(q, scale, out=tb).sub_(xs)
        err = res.mul_(res).mul_(ws).reshape(rows, nb, -1).sum(-1)  # the exact weighted error of this grid
        if best_err is None:
            f, best_err = cand, err
        else:
            bt = (err < best_err).unsqueeze(-1)
            f = {k: torch.where(bt, v, f[k]) for k, v in cand.items()}
            best_err = torch.minimum(err, best_err)
    return f


def fit_grid(x: torch.Tensor, type_name: str, weights: torch.Tensor | None = None) -> Grid:
    """Fit ``type_name``'s grid to x (rows, n), n a multiple of the block size.

    ``weights`` (broadcastable to x, e.g. a per-column importance (n,)) weights the squared error of the fit;
    None means plain MSE.
    """
    sp = _spec(type_name)
    x = x.float().contiguous()  # GPTQ passes a transposed view: strided reductions are slow
    rows, n = x.shape
    nb, nsub = n // sp.block, n // sp.sub
    xs = x.reshape(rows, nsub, sp.sub)
    if weights is None:
        ws = torch.ones(1, 1, 1)
    else:
        w = weights.float()
        w = w + 1e-6 * w.mean().clamp_min(1e-30)  # never an all-zero weight group
        # keep a per-column weight as a broadcast (1, nsub, sub) tensor: no (rows, n) copy
        ws = w.reshape(1, nsub, sp.sub) if w.numel() == n else torch.broadcast_to(w, x.shape).reshape(xs.shape)
    f: dict[str, torch.Tensor] = {}
    offset = None
    if not sp.sub_bits:  # legacy / IQ4_NL: one fp16 scale (and fp16 min) per block
        if sp.asym:
            s, b, _ = _fit_asym(xs, ws, len(sp.levels) - 1, nonpos_min=False, nstep=12, span=1.0)
            f["d"], f["m"] = _f16(s), _f16(b)
            scale, offset = f["d"].float(), f["m"].float()
        else:
            f["d"] = _f16(_fit_sym(xs, ws, type_name))
            scale = f["d"].float()
    else:
        f = _fit_kquant(xs, ws, sp, type_name)
        scale = (f["d"].float() * f["sc"]).reshape(rows, nsub)
        if sp.asym:
            offset = -(f["dmin"].float() * f["mn"]).reshape(rows, nsub)
    return Grid(type_name, scale, offset, {k: v.reshape(rows, nb, -1) for k, v in f.items()})


def grid_codes(x: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Nearest codes (rows, n) of x on a fitted grid."""
    s, o = grid.expand()
    return codes_on(x.float(), s, o, grid.type_name)


def grid_dequant(codes: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Exactly the float32 values ggml decodes from these codes and grid."""
    s, o = grid.expand()
    return dequant_on(codes, s, o, grid.type_name)


# --------------------------------------------------------------------------------------------------------------
# packers: codes (rows, n) + grid fields -> ggml block bytes


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


# --------------------------------------------------------------------------------------------------------------
# RTN


@dataclass
class QuantResult:
    """A matrix quantised to one ggml type.

    ``packed``: uint8 (rows, cols // block * type_size), ready for ``GGUFWriter.add_tensor(name, packed,
    raw_dtype=ggml_type(type_name))``; ``dequant``: float32 (rows, cols), bit-identical to ggml's decode of
    ``packed``; ``codes``/``grid``: what was packed.
    """

    type_name: str
    packed: np.ndarray
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


def finish(codes: torch.Tensor, grid: Grid, chunk_rows: int = 1024) -> QuantResult:
    """Pack codes on grid and decode them the way ggml does (``chunk_rows`` rows at a time: the per-element
    scales and index tensors of a whole LM head would be several times its size)."""
    codes = codes.to(torch.uint8)
    rows, n = codes.shape
    packed = np.empty((rows, n // block_size(grid.type_name) * type_size(grid.type_name)), np.uint8)
    deq = torch.empty(rows, n)
    for r0 in range(0, rows, chunk_rows):
        c, g = codes[r0:r0 + chunk_rows], _grid_rows(grid, r0, r0 + chunk_rows)
        packed[r0:r0 + chunk_rows] = pack(c, g)
        deq[r0:r0 + chunk_rows] = grid_dequant(c, g)
    return QuantResult(grid.type_name, packed, deq, codes, grid)


def quantize_rtn(W: torch.Tensor, type_name: str, imatrix: torch.Tensor | None = None,
                 chunk_rows: int = 1024) -> QuantResult:
    """Round-to-nearest on our grid: fit each block's scales/mins (weighted by ``imatrix``, per input column, if
    given), then take the nearest code. Rows are processed in chunks to bound memory."""
    check_shape(tuple(W.shape), type_name)
    W = W.detach().float().cpu()
    grids, codes = [], []
    for r0 in range(0, W.shape[0], chunk_rows):
        x = W[r0:r0 + chunk_rows]
        g = fit_grid(x, type_name, None if imatrix is None else imatrix.float().reshape(1, -1))
        grids.append(g)
        codes.append(grid_codes(x, g).to(torch.uint8))
    grid = Grid.cat(grids, dim=0)
    return finish(torch.cat(codes, 0), grid, chunk_rows)


# --------------------------------------------------------------------------------------------------------------
# libggml references (ctypes)


class _Traits(ctypes.Structure):
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)
_LIB: ctypes.CDLL | None = None


def _libggml() -> ctypes.CDLL:
    global _LIB
    if _LIB is None:
        from .runtime import ensure_runtime

        lib_dir = ensure_runtime(log=lambda *a, **k: None).lib_dir
        lib = ctypes.CDLL(str(Path(lib_dir) / "libggml-base.so"))
        lib.ggml_get_type_traits.restype = ctypes.POINTER(_Traits)
        lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                            ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        _LIB = lib
    return _LIB


def ggml_dequantize(packed: np.ndarray, type_name: str, shape: tuple[int, int]) -> np.ndarray:
    """Decode packed bytes with libggml's own ``to_float`` (the CPU reference dequantiser)."""
    tr = _libggml().ggml_get_type_traits(int(ggml_type(type_name))).contents
    assert tr.blck_size == block_size(type_name) and tr.type_size == type_size(type_name)
    src = np.ascontiguousarray(packed, dtype=np.uint8)
    out = np.empty(shape, np.float32)
    _TO_FLOAT(tr.to_float)(src.ctypes.data, out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), out.size)
    return out


def ggml_quantize(W: torch.Tensor | np.ndarray, type_name: str, imatrix: torch.Tensor | np.ndarray | None = None
                  ) -> np.ndarray:
    """llama.cpp's own quantiser (``ggml_quantize_chunk``, optionally with an importance matrix per column)."""
    check_shape(tuple(W.shape), type_name)
    x = np.ascontiguousarray(np.asarray(W, dtype=np.float32))
    rows, cols = x.shape
    out = np.zeros((rows, cols // block_size(type_name) * type_size(type_name)), np.uint8)
    im = None if imatrix is None else np.ascontiguousarray(np.asarray(imatrix, dtype=np.float32).reshape(cols))
    _libggml().ggml_quantize_chunk(int(ggml_type(type_name)), x.ctypes.data, out.ctypes.data, 0, rows, cols,
                                   None if im is None else im.ctypes.data)
    return out
