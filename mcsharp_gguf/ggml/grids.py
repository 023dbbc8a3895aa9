"""ggml quantisation grids of the 14 scalar types MC# writes (their table: :mod:`.types`).

* ``fit_grid``: choose a block's scales/mins from (possibly error-updated) weights. For K-quants this includes
  quantising the per-sub-block scales/mins to 4/6/8 bits against an fp16 super-block scale, exactly as stored.
* ``grid_codes`` / ``grid_dequant``: nearest code on that fixed grid, and the value ggml will decode for it. The
  decode uses the same float32 operations in the same order as ggml's ``dequantize_row_*`` (fp16 → fp32 scale,
  one product per scale, ``scale * level + offset``), so it is bit-identical to ggml.

``packing.pack`` turns codes + grid fields into ggml's bytes; ``quant.gptq.gptq_quantize`` quantises on the same
grid with Hessian-aware error feedback.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache

import torch

from .types import _rng, _Spec, _spec

FP16_MAX = 65504.0


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

    def to(self, device: torch.device | str) -> Grid:
        """The same grid with its tensors on ``device``."""
        return Grid(self.type_name, self.scale.to(device), None if self.offset is None else self.offset.to(device),
                    {k: v.to(device) for k, v in self.fields.items()})

    def expand(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-element (rows, n) scale and offset."""
        sub = _spec(self.type_name).sub
        s = self.scale.repeat_interleave(sub, dim=1)
        o = None if self.offset is None else self.offset.repeat_interleave(sub, dim=1)
        return s, o


def _f16(x: torch.Tensor) -> torch.Tensor:
    """fp32 → fp16 with round-to-nearest-even (as GGML_FP32_TO_FP16), clamped so huge blocks don't become inf."""
    return x.clamp(-FP16_MAX, FP16_MAX).to(torch.float16)


def _levels_t(sp: _Spec, device: torch.device | str = "cpu") -> torch.Tensor:
    return _levels_on(sp.levels, torch.device(device))


@cache
def _levels_on(levels: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(levels, dtype=torch.float32, device=device)


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


@cache
def _code_table_on(levels: tuple[int, ...], device: torch.device) -> tuple[int, torch.Tensor, torch.Tensor]:
    """_code_table with its tensors on ``device`` (the lookups index them with tensors that live there)."""
    c0, codes, values = _code_table(levels)
    return c0, codes.to(device), values.to(device)


def _table_index(t: torch.Tensor, levels: tuple[int, ...]) -> torch.Tensor:
    c0, codes, _ = _code_table(levels)
    return torch.ceil(t * 2.0).clamp_(c0, c0 + len(codes) - 1).sub_(c0).long()


def nearest_code(t: torch.Tensor, type_name: str) -> torch.Tensor:
    """Index of the level nearest to ``t`` (= (w - offset) / scale), as int64."""
    lv = _spec(type_name).levels
    if _is_uniform(lv):  # contiguous integers: round and clamp
        return (torch.round(t).clamp_(lv[0], lv[-1]) - lv[0]).long()
    return _code_table_on(lv, t.device)[1][_table_index(t, lv)]


def nearest_level(t: torch.Tensor, type_name: str) -> torch.Tensor:
    """The nearest level's value itself (float32); cheaper than codes for contiguous integer levels."""
    lv = _spec(type_name).levels
    if _is_uniform(lv):
        return torch.round(t).clamp_(lv[0], lv[-1])
    return _code_table_on(lv, t.device)[2][_table_index(t, lv)]


def _inv(s: torch.Tensor) -> torch.Tensor:
    return torch.where(s != 0, 1.0 / torch.where(s != 0, s, 1.0), 0.0)


def codes_on(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, type_name: str) -> torch.Tensor:
    """Nearest codes of x on per-element scale/offset (same shapes)."""
    t = (x - offset) if offset is not None else x
    return nearest_code(t * _inv(scale), type_name)


def dequant_on(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, type_name: str) -> torch.Tensor:
    """ggml's decode: one fp32 product scale*level, then one fp32 add of the offset (= ggml's ``- m``)."""
    y = scale * _levels_t(_spec(type_name), codes.device)[codes.long()]  # (uint8 would index as a mask)
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
    sxl, sll = (torch.empty((len(invs),) + xm.shape, device=xm.device) for _ in range(2))
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
    steps = torch.tensor([-1.0, 0.0, 1.0], device=s.device).reshape(3, *[1] * s.dim())
    a = (torch.round(s * _inv(Dx)) + steps).clamp_(0, hi)
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
        ws = torch.ones(1, 1, 1, device=x.device)
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
