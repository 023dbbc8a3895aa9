"""Hessian-aware GPTQ whose quantiser is a ggml grid, so its output packs bit-exactly into GGUF.

The algorithm is the one of Frantar et al. (IST-DASLab gptq.py): damp H, take the upper Cholesky factor U of H⁻¹,
walk the input columns left to right, quantise a column, divide its error by U[j, j] and subtract err ⊗ U[j, j:]
from the not yet quantised columns; updates are batched lazily ("lazy block updates").

ggml twist: blocks run along the input dimension. When the walk reaches the first column of a ggml block
(K-quant super-block), that block's grid (fp16 scales/mins, quantised sub-block scales) is fitted from the current,
error-updated weights and frozen; its columns are then quantised on it one by one. Codes + grids go through
``ggml.packing.pack``, so ``ggml.libggml.ggml_dequantize(result.packed)`` equals ``result.dequant`` exactly.

Work happens on Wᵀ (columns contiguous) with two levels of lazy batching: rank-1 updates stay inside a group of
``GROUP`` columns, a matmul pushes a finished group into the rest of its lazy block, and another one pushes a
finished lazy block into the rest of the matrix.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import McsharpError
from ..ggml.grids import Grid, _is_uniform, _levels_t, fit_grid, nearest_code, nearest_level
from ..ggml.packing import QuantResult, _grid_rows, finish
from ..ggml.types import _spec, block_size, check_shape

GROUP = 32  # columns per rank-1 group inside a lazy block (a divisor of every ggml block size)
ROW_CHUNK = 16384  # rows walked together (every expert projection of the supported models is one chunk)
GPU_ROW_CHUNK = 262144  # on a GPU, whose walk time is its launches: an LM head (≤ 256k rows) in one walk


class HessianAccumulator:
    """Running H = (2/n) Σ xᵀx over calibration rows x (GPTQ's convention; the 2 is irrelevant to GPTQ itself).

    ``n`` counts rows (tokens) seen. ``imatrix`` = diag(H)/2 = mean x², llama.cpp's importance-matrix convention.
    """

    def __init__(self, cols: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.H = torch.zeros(cols, cols, dtype=dtype, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        """Accumulate calibration inputs x (..., cols) of the linear layer."""
        x = x.detach().reshape(-1, self.H.shape[0]).to(self.H.device, self.H.dtype)
        m = x.shape[0]
        if m == 0:
            return
        self.H *= self.n / (self.n + m)
        self.n += m
        x = x * (2.0 / self.n) ** 0.5
        self.H.addmm_(x.T, x)

    @property
    def imatrix(self) -> torch.Tensor:
        return torch.diagonal(self.H) / 2


def inverse_cholesky_upper(H: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Upper U with Uᵀ U = (H + λI)⁻¹, λ = damp · mean diag(H).

    Uses one Cholesky of the index-reversed H and one triangular inverse instead of GPTQ's
    Cholesky → cholesky_inverse → Cholesky (about half the flops): if P H P = L Lᵀ (P = reversal), then
    U = P L⁻¹ P is upper and Uᵀ U = H⁻¹. Damping is raised tenfold (up to 5 times) if H is not positive definite.
    """
    H = H.float()
    diag = torch.diagonal(H)
    lam = damp * diag.mean().clamp_min(1e-12)
    for _ in range(6):
        # one n² copy at a time beside H (a 14,336-wide Hessian is 0.8 GB): the reversal is the damped copy
        Hd = H.flip(0, 1)
        Hd.diagonal().add_(lam)  # (the reversal keeps the diagonal on the diagonal)
        L, info = torch.linalg.cholesky_ex(Hd)
        del Hd
        if int(info) == 0:
            _trinv_lower_(L)
            return L.flip(0, 1)
        lam = lam * 10
    raise McsharpError("GPTQ: Hessian is not positive definite even with heavy damping; check the calibration inputs")


def inverse_cholesky_upper_(H: torch.Tensor, damp: float = 0.01) -> torch.Tensor | None:
    """inverse_cholesky_upper computed in ``H``'s memory (a contiguous float32 tensor, overwritten by the factor,
    which is returned as a view of it), bit for bit, with no n² matrix beside H where the out-of-place version
    holds about four (a 14,336-wide Hessian, Mixtral-8x7B's down projection, is 0.8 GB). None where damping by
    ``damp`` leaves H indefinite: H is then spent, and inverse_cholesky_upper of it computed again damps harder."""
    lam = damp * torch.diagonal(H).mean().clamp_min(1e-12)
    _reverse_(H)  # P H P: the reversal inverse_cholesky_upper factors
    torch.diagonal(H).add_(lam)
    # the factor in H's memory with the layout it has out of place (column-major): the triangular solves and the
    # walk's products then see what they see there (a row-major copy rounds differently)
    out = H.T
    _, info = torch.linalg.cholesky_ex(out, out=(out, torch.empty((), dtype=torch.int32)))
    if int(info):
        return None
    _trinv_lower_(out)
    _reverse_(H)  # U = P L⁻¹ P (a reversal of the memory reverses both axes of either layout)
    return out


def _trinv_lower_(L: torch.Tensor) -> None:
    """L's lower triangle becomes its inverse, in place, by recursive 2×2 blocking (matmul-bound, faster than a
    full solve)."""
    n = L.shape[0]
    if n <= 512:
        L.copy_(torch.linalg.solve_triangular(L, torch.eye(n, dtype=L.dtype, device=L.device), upper=False))
        return
    h = n // 2
    _trinv_lower_(L[:h, :h])
    _trinv_lower_(L[h:, h:])
    L[h:, :h] = -(L[h:, h:] @ (L[h:, :h] @ L[:h, :h]))


def _reverse_(t: torch.Tensor, chunk: int = 1 << 22) -> None:
    """Reverse a contiguous tensor's elements in place (for a square matrix: both axes flipped), with chunk-sized
    temporaries."""
    f = t.view(-1)
    n = f.numel()
    for a in range(0, n // 2, chunk):
        b = min(a + chunk, n // 2)
        head = f[a:b].clone()
        f[a:b] = f[n - b:n - a].flip(0)
        f[n - b:n - a] = head.flip(0)


def _prepare_h(H: torch.Tensor, cols: int) -> torch.Tensor:
    if tuple(H.shape) != (cols, cols):
        raise McsharpError(f"GPTQ: Hessian shape {tuple(H.shape)} does not match the {cols} input columns of W")
    H = H.float()
    dead = torch.diagonal(H) == 0
    if dead.any():  # (a copy only then: the caller's H stays as it was)
        H = H.clone()
        H[dead, dead] = 1.0  # columns that never saw an input: isolated, their error propagates nowhere
    return H


def _prepare(W: torch.Tensor, H: torch.Tensor, type_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    check_shape(tuple(W.shape), type_name)
    return W.detach().float().cpu().clone(), _prepare_h(H, W.shape[1]).clone()  # (copies its callers may change)


def _quant_col(w: torch.Tensor, s: torch.Tensor, o: torch.Tensor | None, inv_s: torch.Tensor, type_name: str
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(level value, dequantised value) of one column on its frozen grid, computed as ggml decodes it."""
    level = nearest_level((w - o if o is not None else w) * inv_s, type_name)
    q = s * level
    return level, (q + o if o is not None else q)


def gptq_factor(H: torch.Tensor, cols: int, damp: float = 0.01) -> torch.Tensor:
    """The factor U GPTQ walks with for Hessian ``H`` (dead columns isolated, damped): what gptq_quantize computes
    first, for callers that quantise several matrices on one Hessian (an expert's gate and up)."""
    return inverse_cholesky_upper(_prepare_h(H, cols), damp)


def gptq_factor_in_place(H: torch.Tensor, cols: int, damp: float = 0.01) -> torch.Tensor | None:
    """gptq_factor of a Hessian nothing else reads, computed in its own memory on the CPU (inverse_cholesky_upper_;
    elsewhere as gptq_factor): the same bits. None where ``damp`` is not enough: H is then spent, and the caller
    computes it again for gptq_factor (which damps harder)."""
    H = _prepare_h(H, cols)
    if H.device.type != "cpu" or not H.is_contiguous() or H.dtype != torch.float32:
        return inverse_cholesky_upper(H, damp)
    return inverse_cholesky_upper_(H, damp)


def gptq_quantize(W: torch.Tensor, H: torch.Tensor | None, type_name: str, damp: float = 0.01, block: int = 128,
                  row_chunk: int = ROW_CHUNK, U: torch.Tensor | None = None, packed: bool = True) -> QuantResult:
    """GPTQ of W (rows=out, cols=in) with Hessian H (cols, cols) on ``type_name``'s ggml grid.

    ``block`` is the lazy-batch width, rounded up to a multiple of the ggml block. Each ggml block's grid is fitted
    (weighted by the GPTQ saliency 1/U[j,j]², i.e. how much an error in column j costs after compensation) from
    the error-updated weights when the walk reaches it. Returns packed bytes and the exact ggml dequantisation.

    Rows never interact in GPTQ (the error of a column moves along its own row), so a tall matrix (an LM head:
    150k rows) is walked ``row_chunk`` rows at a time: its working copies then take a chunk's memory, not the
    whole matrix's several times over. ``U``: gptq_factor(H) computed already (H is then not needed).

    The walk and the exact decode run on W's device (H or U are moved there), the packing on the CPU
    (ggml.packing.finish); without ``packed``, no bytes (the result's ``packed`` is None).
    """
    check_shape(tuple(W.shape), type_name)
    if U is None:
        U = gptq_factor(H.to(W.device), W.shape[1], damp)
    U = U.to(W.device)
    rows, cols = W.shape
    if W.is_cuda:
        row_chunk = max(row_chunk, GPU_ROW_CHUNK)
    codes = torch.empty(rows, cols, dtype=torch.uint8, device=W.device)
    grids: list[Grid] = []
    for r0 in range(0, rows, row_chunk):
        Wt = _walk_input([W[r0:r0 + row_chunk]])
        levels, grid = _gptq_walk(Wt, U[None], type_name, block)
        del Wt
        grids.append(grid)
        _codes(levels[0], type_name, out=codes[r0:r0 + row_chunk])
        del levels
    return finish(codes, grids[0] if len(grids) == 1 else Grid.cat(grids, dim=0), packed=packed)


def _walk_input(mats: Sequence[torch.Tensor]) -> torch.Tensor:
    """The walk's input: float32 (n, cols, rows), each matrix transposed — a copy the walk updates in place. Each
    is widened and transposed in one copy, so no float32 matrix is ever held beside its transpose."""
    rows, cols = mats[0].shape
    out = torch.empty(len(mats), cols, rows, device=mats[0].device)
    for e, w in enumerate(mats):
        out[e].copy_(w.detach().T)
    return out


def gptq_quantize_many(Ws: Sequence[torch.Tensor], Us: Sequence[torch.Tensor], type_name: str, block: int = 128,
                       packed: bool = True) -> list[QuantResult]:
    """gptq_quantize of several matrices of one shape, each on its own factor U (gptq_factor), walked together:
    every step of the walk is one op over all of them. The result of each is what gptq_quantize gives it, up to
    float summation order; on a GPU, where a lone walk's time goes to launching its small ops, many experts cost
    about what one does."""
    if not Ws:
        return []
    W0 = Ws[0]
    check_shape(tuple(W0.shape), type_name)
    if any(tuple(w.shape) != tuple(W0.shape) for w in Ws):
        raise McsharpError("GPTQ: gptq_quantize_many needs matrices of one shape")
    rows = W0.shape[0]
    Wt = _walk_input(Ws)
    levels, grid = _gptq_walk(Wt, torch.stack([u.to(W0.device) for u in Us]), type_name, block)
    del Wt
    return [finish(_codes(levels[e], type_name), _grid_rows(grid, e * rows, (e + 1) * rows), packed=packed)
            for e in range(len(Ws))]


CODE_CHUNK = 256  # levels turned into codes this many columns at a time


def _codes(levels: torch.Tensor, type_name: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """The (rows, cols) uint8 codes of a walk's (cols, rows) levels (into ``out`` if given), CODE_CHUNK columns at
    a time: whole, the float copy and the bucket indices of a Mixtral-8x7B expert matrix would be 0.7 GB beside
    the levels."""
    sp = _spec(type_name)
    cols, rows = levels.shape
    out = torch.empty(rows, cols, dtype=torch.uint8, device=levels.device) if out is None else out
    table = None if _is_uniform(sp.levels) else _levels_t(sp, levels.device)
    for c0 in range(0, cols, CODE_CHUNK):
        lv = levels[c0:c0 + CODE_CHUNK].T.float()
        if table is None:
            out[:, c0:c0 + CODE_CHUNK] = (lv - sp.levels[0]).to(torch.uint8)
        else:
            out[:, c0:c0 + CODE_CHUNK] = torch.bucketize(lv.contiguous(), table, out_int32=True).to(torch.uint8)
    return out


def _gptq_walk(Wt: torch.Tensor, U: torch.Tensor, type_name: str, block: int) -> tuple[torch.Tensor, Grid]:
    """The GPTQ walk over the columns of ``Wt`` (E, cols, rows): E matrices, each with its factor in ``U``
    (E, cols, cols), updated in place. Returns (the level of every weight as (E, cols, rows) int16, the fitted
    grid of all E × rows rows, matrix by matrix)."""
    n_mat, cols, rows = Wt.shape
    B = block_size(type_name)
    lazy = max(B, -(-block // B) * B)
    grp = min(GROUP, B)
    # per-column weight of the grid fit (on the real fixture about as good as diag(H), better than imatrix·sqrt(σ²+x²))
    sal = 1.0 / torch.diagonal(U, dim1=1, dim2=2) ** 2  # (E, cols)
    if n_mat > 1:  # one scale per matrix: fit_grid's floor (1e-6 × mean weight) is then alike for all of them
        sal = sal / sal.mean(1, keepdim=True).clamp_min(1e-30)
    levels = torch.empty(n_mat, cols, rows, dtype=torch.int16, device=Wt.device)
    grids: list[Grid] = []
    for i1 in range(0, cols, lazy):
        i2 = min(i1 + lazy, cols)
        W1 = Wt[:, i1:i2]  # view: updated in place
        U1 = U[:, i1:i2, i1:i2]
        E1 = torch.empty(n_mat, i2 - i1, rows, device=Wt.device)
        for b0 in range(0, i2 - i1, B):
            x = W1[:, b0:b0 + B].transpose(1, 2).reshape(n_mat * rows, B)
            s = sal[:, i1 + b0:i1 + b0 + B]
            g = fit_grid(x, type_name, s if n_mat == 1 else s[:, None, :].expand(n_mat, rows, B).reshape(-1, B))
            grids.append(g)
            S, O = g.expand()  # (E·rows, B) → per column k: (E, rows)
            S = S.reshape(n_mat, rows, B).permute(2, 0, 1).contiguous()
            O = None if O is None else O.reshape(n_mat, rows, B).permute(2, 0, 1).contiguous()
            invS = torch.where(S != 0, 1.0 / torch.where(S != 0, S, 1.0), 0.0)
            for g0 in range(b0, b0 + B, grp):
                g1 = g0 + grp
                for j in range(g0, g1):
                    k = j - b0
                    lev, q = _quant_col(W1[:, j], S[k], None if O is None else O[k], invS[k], type_name)
                    levels[:, i1 + j] = lev.to(torch.int16)
                    err = (W1[:, j] - q) / U1[:, j, j, None]
                    E1[:, j] = err
                    if j + 1 < g1:
                        _push(W1[:, j + 1:g1], U1[:, j:j + 1, j + 1:g1], err[:, None, :])
                if g1 < i2 - i1:  # push the finished group into the rest of the lazy block
                    _push(W1[:, g1:], U1[:, g0:g1, g1:], E1[:, g0:g1])
        if i2 < cols:  # push the finished lazy block into the rest of the matrix
            _push(Wt[:, i2:], U[:, i1:i2, i2:], E1)
    return levels, Grid.cat(grids)


def _push(W: torch.Tensor, U: torch.Tensor, E: torch.Tensor) -> None:
    """W -= Uᵀ E for each matrix of the batch (W (n, a, rows), U (n, b, a), E (n, b, rows)): the errors of
    finished columns pushed into later ones. One matrix takes the 2-D ops (addr_/addmm_), whose rounding the
    CPU's files were measured with; a batch takes baddbmm_."""
    if W.shape[0] == 1 and U.shape[1] == 1:
        W[0].addr_(U[0, 0], E[0, 0], alpha=-1.0)
    elif W.shape[0] == 1:
        W[0].addmm_(U[0].T, E[0], alpha=-1.0)
    else:
        W.baddbmm_(U.transpose(1, 2), E, alpha=-1.0)


def gptq_textbook(W: torch.Tensor, H: torch.Tensor, type_name: str, damp: float = 0.01) -> QuantResult:
    """Plain GPTQ loop (no lazy batching; H⁻¹ by Cholesky → cholesky_inverse → Cholesky) on the same grids.

    Reference for tests and for the speed comparison in scripts/bench_gptq.py; same result as ``gptq_quantize`` up
    to float summation order.
    """
    W, H = _prepare(W, H, type_name)
    rows, cols = W.shape
    sp = _spec(type_name)
    B = block_size(type_name)
    H.diagonal().add_(damp * torch.diagonal(H).mean())
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    sal = 1.0 / torch.diagonal(U) ** 2
    lv = _levels_t(sp)
    codes = torch.empty(rows, cols, dtype=torch.uint8)
    grids: list[Grid] = []
    S = O = None
    for j in range(cols):
        if j % B == 0:
            g = fit_grid(W[:, j:j + B], type_name, sal[j:j + B].reshape(1, -1))
            grids.append(g)
            S, O = g.expand()
        k = j % B
        w = W[:, j]
        o = None if O is None else O[:, k]
        t = (w - o if o is not None else w) * torch.where(S[:, k] != 0, 1.0 / S[:, k], 0.0)
        c = nearest_code(t, type_name)
        q = S[:, k] * lv[c]
        q = q + o if o is not None else q
        codes[:, j] = c.to(torch.uint8)
        err = (w - q) / U[j, j]
        W[:, j:] -= err[:, None] * U[j, j:][None, :]
    return finish(codes, Grid.cat(grids))


def output_error(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor) -> float:
    """Layer-output error tr(ΔW H ΔWᵀ) (with H = (2/n)Σxᵀx this is 2/n · Σ‖ΔW x‖²)."""
    D = (Wq.double() - W.double())
    return float(((D @ H.double()) * D).sum())
