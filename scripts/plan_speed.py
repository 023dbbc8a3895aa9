#!/usr/bin/env python
"""What pricing kernel time costs a mixed plan (not a test): for a saved importance, the estimated output KL
(in-sample and out-of-fold, against the stock plan) and the kernel time per token (decode, prefill, against the
stock plan; pmq.speed) of mixed plans at several --max-slowdown values; and, with --synthetic, how long solving
takes at real expert counts on a synthetic importance (log-normal sensitivities, Dirichlet routing, an error 4×
lower per bit).

Usage: python scripts/plan_speed.py --importance out/specialised-importance.json --bpw 4.644
       python scripts/plan_speed.py --synthetic 26x64,58x256
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import numpy as np

from mcsharp_gguf.pmq.plan import out_of_fold_cost, plan_cost, solve_bit_plan

SLOWDOWNS = (None, 0.05, 0.02, 0.0)


def importance_table(path: str, bpw: float) -> None:
    from mcsharp_gguf.pmq.importance import ModelImportance

    imp = ModelImportance.from_json(open(path).read())
    layers, tensors = imp.layers, imp.tensors
    kw = {"tensors": tensors, "metric": "fisher", "scope": "file"}
    stock = solve_bit_plan(layers, bpw, mode="stock", **kw)
    c_stock, oof_stock = plan_cost(stock, layers, tensors), out_of_fold_cost(layers, bpw, mode="stock", **kw)
    print("| max_slowdown | est. KL vs stock, in-sample / out-of-fold | time vs stock, decode / prefill | types |")
    print("|---|---|---|---|")
    for ms in SLOWDOWNS:
        p = solve_bit_plan(layers, bpw, mode="mixed", max_slowdown=ms, **kw)
        oof = out_of_fold_cost(layers, bpw, mode="mixed", shrink=p.shrink, max_slowdown=ms, **kw)
        kinds = Counter(t for v in p.layers.values() for t in v)
        print(f"| {ms} | {plan_cost(p, layers, tensors) / c_stock - 1:+.1%} / {oof / oof_stock - 1:+.1%} | "
              f"{p.time_vs_stock['decode']:.3f} / {p.time_vs_stock['prefill']:.3f} | {dict(kinds)} |", flush=True)


def synthetic_layers(n_layer: int, n_expert: int, k: int = 8, d_model: int = 7168, d_ff: int = 2048, seed: int = 0):
    from mcsharp_gguf.ggml.types import bits_per_weight
    from mcsharp_gguf.pmq.candidates import EXPERT_TYPES
    from mcsharp_gguf.pmq.importance import LayerImportance

    rng = np.random.default_rng(seed)
    out = []
    for layer in range(n_layer):
        phi = rng.dirichlet(np.full(n_expert, 2.0))
        sens = rng.lognormal(0.0, 0.7, n_expert)
        eps = {t: list(np.sqrt(sens * phi) * 2.0 ** -bits_per_weight(t)) for t in EXPERT_TYPES}
        out.append(LayerImportance(layer, d_model, d_ff, list(phi), list(phi), eps, eps_fisher=eps,
                                   tokens=np.round(phi * 4096 * k).astype(int).tolist(), layer_tokens=4096))
    return out


def synthetic_table(sizes: str, bpw: float) -> None:
    print("| layers × experts | max_slowdown | solve s | cost | time vs stock, decode / prefill |")
    print("|---|---|---|---|---|")
    for size in sizes.split(","):
        n_layer, n_expert = (int(x) for x in size.split("x"))
        layers = synthetic_layers(n_layer, n_expert)
        for ms in (None, 0.02):
            t0 = time.perf_counter()
            p = solve_bit_plan(layers, bpw, mode="mixed", metric="fisher", shrink=1.0, max_slowdown=ms)
            print(f"| {n_layer} × {n_expert} | {ms} | {time.perf_counter() - t0:.1f} | {plan_cost(p, layers):.5f} | "
                  f"{p.time_vs_stock['decode']:.3f} / {p.time_vs_stock['prefill']:.3f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--importance", default=None, help="a saved importance JSON (scripts/fixture_stats.py writes one)")
    ap.add_argument("--bpw", type=float, default=3.9, help="bits per planned weight (fixture_stats' JSON has it)")
    ap.add_argument("--synthetic", default=None, metavar="LxE,...", help="synthetic sizes, e.g. 26x64,58x256")
    args = ap.parse_args()
    if args.importance:
        importance_table(args.importance, args.bpw)
    if args.synthetic:
        synthetic_table(args.synthetic, args.bpw)


if __name__ == "__main__":
    main()
