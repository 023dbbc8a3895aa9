#!/usr/bin/env python
"""Kernel time per weight of each expert type at a real layer shape (not a test): the numbers behind
``mcsharp_gguf.pmq.speed.KERNEL_COST``.

A random-weight checkpoint with the real model's layer shapes (mcsharp_gguf.dev.scale) is converted once per type,
every routed expert of that type and the rest fixed (attention and embedding Q4_K, head Q6_K; bench_runtime's
write_file). Each type is timed on the patched libraries in lock step (bench_runtime's run_lockstep: prefill and
decode in alternating steps, so that the drift of this shared machine falls on every file alike) beside the
all-Q4_K file and that file at static k/2, over --rounds rounds after a warm-up: prefill of --prompt tokens and
decode of --decode tokens, --threads threads. From Q4_K at k and k/2 the experts' share of each phase's time
follows (t(f) = t_rest + f · t_experts, f the executed fraction, k/2 / k); a type's cost is its experts' time over
Q4_K's, (t_T − t_rest) / t_experts, i.e. time per weight relative to Q4_K: per round, and the median over rounds is
reported with its range. --mixes adds bench_runtime's type-mix files (costed the same way, as the mean cost per
weight of their experts), --together times every type and mix in one lock-step run so that they can be compared
with each other directly.

Usage: python scripts/bench_type_speed.py [--shape mixtral-8x7b:2] [--types Q3_K,Q4_K,...] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from bench_runtime import require_counts, run_lockstep, write_file


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def type_costs(times: dict[str, dict], k: int, expert_type: str) -> dict:
    """Per phase: the cost of ``expert_type`` relative to Q4_K in each round (see the docstring), its median and
    range, the experts' share of Q4_K's time, and the type's median tok/s."""
    out = {}
    for phase in ("prefill", "decode"):
        ref, half, mine = (np.array(times[n][phase]) for n in ("Q4_K", f"Q4_K k={k // 2}", expert_type))
        f = times[f"Q4_K k={k // 2}"][f"executed_{phase}"]  # k/2 / k, read from the slot counter
        t_exp = (ref - half) / (1.0 - f)
        t_rest = ref - t_exp
        cost = (mine - t_rest) / t_exp
        out[phase] = {"cost": float(np.median(cost)), "min": float(cost.min()), "max": float(cost.max()),
                      "rounds": cost.tolist(), "moe_share": float(np.median(t_exp / ref)),
                      "seconds": float(np.median(mine))}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="mixtral-8x7b:2", metavar="NAME:LAYERS")
    ap.add_argument("--types", default=None, help="comma-separated expert types (default: pmq's candidates)")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--prefill-chunk", type=int, default=512, help="tokens per lock-step prefill step")
    ap.add_argument("--decode-chunk", type=int, default=16, help="tokens per lock-step decode step")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("out/bench-type-speed"))
    ap.add_argument("--mixes", default="", help="comma-separated bench_runtime files to cost as well (mixed, grouped, "
                                                "planned-bytes, planned-speed)")
    ap.add_argument("--together", action="store_true",
                    help="every type and mix in one lock-step run (default: each type in its own, beside Q4_K)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    require_counts(ap, args, ("prompt", "decode", "prefill_chunk", "decode_chunk", "rounds", "threads"))

    from mcsharp_gguf.native import build as nb

    from mcsharp_gguf.dev.scale import real_shape, write_real_shape_checkpoint
    from mcsharp_gguf.ggml.types import bits_per_weight
    from mcsharp_gguf.pmq.candidates import EXPERT_TYPES

    shape, _, layers = args.shape.partition(":")
    n_layer = int(layers or 2)
    k = int(real_shape(shape).config["num_experts_per_tok"])
    types = args.types.split(",") if args.types else list(EXPERT_TYPES)
    mixes = [m for m in args.mixes.split(",") if m]
    bad = [m for m in mixes if m not in ("mixed", "grouped", "planned-bytes", "planned-speed")] + [
        t for t in types if t not in EXPERT_TYPES]
    if bad:
        ap.error(f"unknown --types / --mixes entries {bad}: types are {', '.join(EXPERT_TYPES)}; mixes are mixed, "
                 "grouped, planned-bytes, planned-speed")
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    ckpt = write_real_shape_checkpoint(shape, work / f"{shape}-{n_layer}L", n_layer, log=log)
    lib = nb.build(log=lambda *a: None).lib_dir
    files = {t: write_file(ckpt, f"single-{t}", work / f"{shape}-{n_layer}L-{t}.gguf", log=log)
             for t in dict.fromkeys(["Q4_K", *types])}
    files.update({m: write_file(ckpt, m, work / f"{shape}-{n_layer}L-{m}.gguf", log=log) for m in mixes})
    half = {"mcsharp.moe.prune_mode": 2, "mcsharp.moe.static_k": k // 2}
    base = {"Q4_K": (lib, files["Q4_K"], {}), f"Q4_K k={k // 2}": (lib, files["Q4_K"], half)}
    names = [t for t in [*types, *mixes] if t != "Q4_K"]
    # each name with the configurations it is timed beside: all in one run, or each alone beside Q4_K
    runs = [names] if args.together else [[t] for t in names]
    results = {}
    for run in runs:
        t0 = time.perf_counter()
        times = run_lockstep({**base, **{t: (lib, files[t], {}) for t in run}}, args, args.rounds)
        for t in run:
            results[t] = got = type_costs(times, k, t)
            log(f"[bench] {t}: decode cost {got['decode']['cost']:.3f} [{got['decode']['min']:.3f}-"
                f"{got['decode']['max']:.3f}], prefill cost {got['prefill']['cost']:.3f} "
                f"[{got['prefill']['min']:.3f}-{got['prefill']['max']:.3f}] (Q4_K = 1; experts "
                f"{100 * got['decode']['moe_share']:.0f}% of Q4_K's decode), run of {time.perf_counter() - t0:.0f} s")
    print(f"\n## {shape}, {n_layer} layers, top-{k}, {args.threads} threads: expert kernel time per weight, Q4_K = 1 "
          f"(median of {args.rounds} lock-step rounds [min-max])")
    print("| expert type | bits per weight | file GiB | decode tok/s | decode cost | prefill tok/s | prefill cost |")
    print("|---|---|---|---|---|---|---|")
    for t in [*sorted((t for t in results if t not in mixes), key=bits_per_weight), *mixes]:
        d, p = results[t]["decode"], results[t]["prefill"]
        bpw = "-" if t in mixes else f"{bits_per_weight(t):.3f}"
        print(f"| {t} | {bpw} | {files[t].stat().st_size / 2**30:.2f} | "
              f"{args.decode / d['seconds']:.1f} | {d['cost']:.3f} [{d['min']:.3f}-{d['max']:.3f}] | "
              f"{args.prompt / p['seconds']:.1f} | {p['cost']:.3f} [{p['min']:.3f}-{p['max']:.3f}] |")
    print("KERNEL_COST = {" + ", ".join(f'"{t}": ({results[t]["decode"]["cost"]:.2f}, '
                                         f'{results[t]["prefill"]["cost"]:.2f})'
                                         for t in sorted(set(results) - set(mixes), key=bits_per_weight)) + "}")
    if args.json:
        args.json.write_text(json.dumps({"shape": shape, "layers": n_layer, "top_k": k, "threads": args.threads,
                                         "types": results}, indent=2))


if __name__ == "__main__":
    main()
