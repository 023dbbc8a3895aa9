"""Seconds per matrix of ggml-grid GPTQ (mcsharp_gguf.quant.gptq) vs a textbook GPTQ loop on the same grids.

Shapes: the fixture's (q_proj 768×768, expert gate/up 128×768, expert down 768×128, shared down 768×512) and
Mixtral-8x7B's expert matrices: w1/w3 (ggml 4096×14336: 14336 rows of 4096) and w2 (4096 rows of 14336).
Types: Q2_K, Q4_K, Q1_0. Hessians are synthetic (speed does not depend on their values).

The textbook loop (no lazy batching, H⁻¹ via Cholesky → cholesky_inverse → Cholesky, a rank-1 update of all
remaining columns per column) runs in full on the fixture shapes; on Mixtral shapes it runs the first
``--textbook-cols`` columns and is extrapolated by its exact per-column cost profile (work ∝ remaining columns),
with its H⁻¹ time extrapolated cubically from a 4096-wide one when wider. Extrapolated numbers are marked "~".

Usage: .venv/bin/python scripts/bench_gptq.py [--quick] [--skip-mixtral] [--textbook-cols 256]
       .venv/bin/python scripts/bench_gptq.py --shape 2048x2048 --types Q4_K --repeat 3 --no-textbook
(``--shape ROWSxCOLS``, repeatable, replaces the default shapes; the best of ``--repeat`` runs is reported, with the
part of it spent fitting block grids.)
"""

from __future__ import annotations

import argparse
import time

import torch

from mcsharp_gguf.ggml.grids import _levels_t, fit_grid, nearest_code
from mcsharp_gguf.ggml.types import _spec, block_size
from mcsharp_gguf.quant import gptq as gptq_mod
from mcsharp_gguf.quant.gptq import _prepare, gptq_quantize, gptq_textbook

TYPES = ("Q2_K", "Q4_K", "Q1_0")
FIXTURE = {"fixture q_proj": (768, 768), "fixture expert gate/up": (128, 768), "fixture expert down": (768, 128),
           "fixture shared down": (768, 512)}
MIXTRAL = {"Mixtral w1/w3 (ggml 4096x14336)": (14336, 4096), "Mixtral w2 (ggml 14336x4096)": (4096, 14336)}


def synthetic(rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(cols + 256, cols, generator=g) * (torch.rand(cols, generator=g) + 0.1)
    return torch.randn(rows, cols, generator=g) * 0.02, X.T @ X * (2 / X.shape[0])


def textbook_partial(W: torch.Tensor, H: torch.Tensor, t: str, ncols: int, damp: float = 0.01) -> float:
    """Extrapolated seconds of gptq_textbook on (W, H), timing only its first ncols columns (same code path)."""
    cols = W.shape[1]
    if cols <= 4096:
        t0 = time.perf_counter()
        W, H = _prepare(W, H, t)
        H.diagonal().add_(damp * torch.diagonal(H).mean())
        U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
        t_hinv = time.perf_counter() - t0
    else:  # cubic extrapolation from a 4096-wide H⁻¹
        _, Hs = synthetic(8, 4096)
        t0 = time.perf_counter()
        Hs.diagonal().add_(damp * torch.diagonal(Hs).mean())
        torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hs)), upper=True)
        t_hinv = (time.perf_counter() - t0) * (cols / 4096) ** 3
        W, _ = _prepare(W, torch.eye(cols), t)
        U = torch.eye(cols)  # values are irrelevant to the cost of the column walk
    sp, B = _spec(t), block_size(t)
    lv = _levels_t(sp)
    sal = 1.0 / torch.diagonal(U) ** 2
    t0 = time.perf_counter()
    for j in range(ncols):  # identical to gptq_textbook's walk
        if j % B == 0:
            S, O = fit_grid(W[:, j:j + B], t, sal[j:j + B].reshape(1, -1)).expand()
        k, w = j % B, W[:, j]
        o = None if O is None else O[:, k]
        c = nearest_code((w - o if o is not None else w) * torch.where(S[:, k] != 0, 1.0 / S[:, k], 0.0), t)
        q = S[:, k] * lv[c]
        q = q + o if o is not None else q
        err = (w - q) / U[j, j]
        W[:, j:] -= err[:, None] * U[j, j:][None, :]
    t_walk = time.perf_counter() - t0
    work_done = sum(cols - j for j in range(ncols))
    work_all = cols * (cols + 1) / 2
    return t_hinv + t_walk * work_all / work_done


def gptq_timed(W: torch.Tensor, H: torch.Tensor, t: str, repeat: int = 1) -> tuple[float, float]:
    """Best-of-``repeat`` seconds of gptq_quantize and the seconds its fit_grid calls took in that run."""
    orig = gptq_mod.fit_grid
    fit = [0.0]

    def timed_fit(*a, **k):
        t0 = time.perf_counter()
        g = orig(*a, **k)
        fit[0] += time.perf_counter() - t0
        return g

    best = (float("inf"), 0.0)
    gptq_mod.fit_grid = timed_fit
    try:
        for _ in range(repeat):
            fit[0] = 0.0
            t0 = time.perf_counter()
            gptq_quantize(W, H, t)
            best = min(best, (time.perf_counter() - t0, fit[0]))
    finally:
        gptq_mod.fit_grid = orig
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fixture shapes only, Q4_K only")
    ap.add_argument("--skip-mixtral", action="store_true")
    ap.add_argument("--textbook-cols", type=int, default=256, help="columns of the textbook loop timed on Mixtral")
    ap.add_argument("--shape", action="append", default=[], metavar="ROWSxCOLS", help="time this shape instead")
    ap.add_argument("--types", help=f"comma-separated types (default {','.join(TYPES)})")
    ap.add_argument("--repeat", type=int, default=1, help="report the best of this many GPTQ runs")
    ap.add_argument("--no-textbook", action="store_true", help="skip the textbook reference")
    args = ap.parse_args()
    types = tuple(args.types.split(",")) if args.types else ("Q4_K",) if args.quick else TYPES
    if args.shape:
        shapes = {f"custom {s}": tuple(int(v) for v in s.lower().split("x")) for s in args.shape}
    else:
        shapes = dict(FIXTURE)
        if not (args.quick or args.skip_mixtral):
            shapes.update(MIXTRAL)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'matrix':34s} {'rows x cols':>13s} {'type':5s} {'gptq s':>8s} {'fit s':>6s} {'textbook s':>11s} "
          f"{'speed-up':>8s}")
    for name, (rows, cols) in shapes.items():
        W, H = synthetic(rows, cols)
        for t in types:
            if cols % block_size(t):
                print(f"{name:34s} {rows:>6d}x{cols:<6d} {t:5s} {'n/a: row length not a multiple of the block':>30s}")
                continue
            t_fast, t_fit = gptq_timed(W, H, t, args.repeat)
            if args.no_textbook:
                print(f"{name:34s} {rows:>6d}x{cols:<6d} {t:5s} {t_fast:8.2f} {t_fit:6.2f}", flush=True)
                continue
            if name in MIXTRAL:
                t_tb, mark = textbook_partial(W, H, t, args.textbook_cols), "~"
            else:
                t0 = time.perf_counter()
                gptq_textbook(W, H, t)
                t_tb, mark = time.perf_counter() - t0, " "
            ratio = t_tb / t_fast
            print(f"{name:34s} {rows:>6d}x{cols:<6d} {t:5s} {t_fast:8.2f} {t_fit:6.2f} {mark}{t_tb:10.2f} "
                  f"{mark}{ratio:7.1f}x", flush=True)


if __name__ == "__main__":
    main()
