#!/usr/bin/env python
"""Kernel time per weight of each expert type at a real layer shape (not a test): the numbers behind
``mcsharp_gguf.pmq.speed.KERNEL_COST``.

A random-weight checkpoint with the real model's layer shapes (mcsharp_gguf.dev.scale) is converted to F16
(``mcsharp convert --preset F16``) and llama-quantize writes one file per type with every routed expert of that
type and the rest fixed (attention and embedding Q4_K, head Q6_K: ``--pure`` plus overrides). Each type is timed
in its own worker process on the patched libraries, interleaved with the all-Q4_K file and that file at static
k/2 (bench_runtime's worker: best over --rounds rounds after a warm-up, prefill of --prompt tokens and decode of
--decode tokens, --threads threads). From Q4_K at k and k/2 the experts' share of each phase's time follows
(t(f) = t_rest + f · t_experts, f the executed fraction read from the slot counter); a type's cost is its
experts' time over Q4_K's: (t_T − t_rest) / t_experts, i.e. time per weight relative to Q4_K. Every ratio is
measured side by side in one process.

Usage: python scripts/bench_type_speed.py [--shape mixtral-8x7b:2] [--types Q3_K,Q4_K,...] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench_runtime import run_worker


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def type_file(tools: Path, f16: Path, out: Path, expert_type: str, threads: int) -> Path:
    """``f16`` with every routed expert ``expert_type``, attention and embedding Q4_K, head Q6_K."""
    if out.exists():
        return out
    t = expert_type.lower().replace("_k", "_K")
    cmd = [str(tools / "llama-quantize"), "--pure", "--output-tensor-type", "q6_K", "--token-embedding-type", "q4_K",
           *(a for p in ("gate", "up", "down") for a in ("--tensor-type", f"ffn_{p}_exps={t}")),
           str(f16), str(out.with_suffix(".part")), "Q4_K", str(threads)]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"llama-quantize {expert_type} failed: {res.stderr[-1500:]}")
    out.with_suffix(".part").rename(out)
    log(f"[files] {out.name}: {out.stat().st_size / 2**30:.2f} GiB in {time.perf_counter() - t0:.0f} s")
    return out


def type_costs(runs: dict[str, dict], k: int) -> dict[str, dict]:
    """Per type and phase: tok/s and cost relative to Q4_K, from one worker's best times (see the docstring)."""
    out = {}
    ref, half = runs["Q4_K"], runs[f"Q4_K k={k // 2}"]
    for phase in ("prefill", "decode"):
        f = half[f"executed_{phase}"]
        t_exp = (ref[f"{phase}_s"] - half[f"{phase}_s"]) / (1.0 - f)
        t_rest = ref[f"{phase}_s"] - t_exp
        for name, r in runs.items():
            if " k=" in name:
                continue
            o = out.setdefault(name, {})
            o[f"{phase}_s"] = r[f"{phase}_s"]
            o[f"{phase}_cost"] = (r[f"{phase}_s"] - t_rest) / t_exp
            o[f"{phase}_moe_share"] = t_exp / ref[f"{phase}_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="mixtral-8x7b:2", metavar="NAME:LAYERS")
    ap.add_argument("--types", default=None, help="comma-separated expert types (default: pmq's candidates)")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("out/bench-type-speed"))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from mcsharp_gguf.native import build as nb

    from mcsharp_gguf.dev.scale import real_shape, write_real_shape_checkpoint
    from mcsharp_gguf.ggml.types import bits_per_weight
    from mcsharp_gguf.pmq.candidates import EXPERT_TYPES

    shape, _, layers = args.shape.partition(":")
    n_layer = int(layers or 2)
    k = int(real_shape(shape).config["num_experts_per_tok"])
    types = args.types.split(",") if args.types else list(EXPERT_TYPES)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    ckpt = write_real_shape_checkpoint(shape, work / f"{shape}-{n_layer}L", n_layer, log=log)
    f16 = work / f"{shape}-{n_layer}L-f16.gguf"
    if not f16.exists():
        subprocess.run([sys.executable, "-m", "mcsharp_gguf.cli", "convert", str(ckpt), "--preset", "F16", "-o",
                        str(f16)], check=True)
    tools = Path(nb.build(nb.BuildOptions(tools=True), log=lambda *a: None).lib_dir) / "bin"
    lib = nb.build(log=lambda *a: None).lib_dir
    files = {t: type_file(tools, f16, work / f"{shape}-{n_layer}L-{t}.gguf", t, args.threads)
             for t in dict.fromkeys(["Q4_K", *types])}
    half = {"mcsharp.moe.prune_mode": 2, "mcsharp.moe.static_k": k // 2}
    results = {}
    for t in types:
        if t == "Q4_K":
            continue
        configs = {"Q4_K": (files["Q4_K"], {}), f"Q4_K k={k // 2}": (files["Q4_K"], half), t: (files[t], {})}
        raw = run_worker(lib, configs, args)
        best = {}
        for name, r in raw.items():
            best[name] = {"prefill_s": min(r["prefill"]), "decode_s": min(r["decode"])}
            for phase in ("prefill", "decode"):
                s = r.get(f"slots_{phase}")
                best[name][f"executed_{phase}"] = (s[1] / s[0]) if s and s[0] else 1.0
        got = type_costs(best, k)
        results[t] = got[t]
        results.setdefault("Q4_K", got["Q4_K"])  # from the first worker
        log(f"[bench] {t}: decode cost {got[t]['decode_cost']:.3f}, prefill cost {got[t]['prefill_cost']:.3f} "
            f"(Q4_K = 1; experts {100 * got[t]['decode_moe_share']:.0f}% of Q4_K's decode)")
    print(f"\n## {shape}, {n_layer} layers, top-{k}, {args.threads} threads: expert kernel time per weight, Q4_K = 1")
    print("| expert type | bits per weight | file GiB | decode tok/s | decode cost | prefill tok/s | prefill cost |")
    print("|---|---|---|---|---|---|---|")
    for t in sorted(results, key=bits_per_weight):
        r = results[t]
        print(f"| {t} | {bits_per_weight(t):.3f} | {files[t].stat().st_size / 2**30:.2f} | "
              f"{args.decode / r['decode_s']:.1f} | {r['decode_cost']:.3f} | {args.prompt / r['prefill_s']:.1f} | "
              f"{r['prefill_cost']:.3f} |")
    print("KERNEL_COST = {" + ", ".join(f'"{t}": ({results[t]["decode_cost"]:.2f}, {results[t]["prefill_cost"]:.2f})'
                                         for t in sorted(results, key=bits_per_weight)) + "}")
    if args.json:
        args.json.write_text(json.dumps({"shape": shape, "layers": n_layer, "top_k": k, "threads": args.threads,
                                         "types": results}, indent=2))


if __name__ == "__main__":
    main()
