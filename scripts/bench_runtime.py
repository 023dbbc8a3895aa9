#!/usr/bin/env python
"""Runtime speed at real layer shapes (not a test): the patch's costs and savings, measured side by side.

For each shape (a random-weight checkpoint with the real model's layer shapes, mcsharp_gguf.dev.scale) six
files are written by our converter with llama.cpp's own round-to-nearest quantiser (speed does not depend on the
weights' values):

- single: every expert projection Q4_K, attention Q4_K, head Q6_K, embedding Q4_K (Q4_K_M-like; no mcsharp
  tensors, so the stock llama.cpp loads it too);
- mixed: the same dense types, the experts of each layer split at random into Q3_K / Q4_K / Q5_K groups
  (1/4, 1/2, 1/4: 4.48 bpw against Q4_K's 4.50, the same bytes within 0.4%), stored as expert groups;
- planned-bytes, planned-speed: the planner's mixed plans at Q4_K's bytes on a synthetic importance (experts of
  random sensitivity; :func:`synthetic_importance`), pricing bytes only, and bytes and kernel time (pmq.speed, the
  default): what the speed-priced planner buys at real shapes (each type's kernel alone:
  scripts/bench_type_speed.py);
- grouped: as single, the experts stored as three groups (1/4, 1/2, 1/4) of the same Q4_K (the grouping's cost);
- otp: single + synthetic OTP routers (random weights, bias set for ~3/4 of the slots kept; trained routers
  would cost a calibration pass and change nothing about speed; their executed fraction is measured).

A worker process (one llama.cpp library per process) holds every configuration of the patched library and
times them interleaved, in a fresh order each round, after a warm-up round; --processes such workers run one
after the other and the best time of each configuration over all rounds is reported: prefill of --prompt
tokens and decode of --decode tokens, --threads threads.
The stock comparison (stock vs patched libraries, pruning off, the single file) runs --stock-pairs pairs of
short one-file workers, alternating. Patched configurations: static k (k, 3k/4, k/2 slots);
the threshold rule; OTP routers; mixed grouped vs single-type. From the static-k decode times the MoE share of
decode time s is fitted (t(f) = t(1) · (1 − s(1 − f)), f = executed fraction); each pruning rule's speed-up is
compared with its Amdahl bound 1 / (1 − s(1 − f)) at its measured f.

Usage: python scripts/bench_runtime.py [--shape qwen3-30b-a3b:8] [--shape mixtral-8x7b:2] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np

from mcsharp_gguf.pmq.speed import PHASES

WORKER = r"""
import json, os, random, sys, time
lib, configs, n_prompt, n_decode, rounds, threads = sys.argv[1:7]
os.environ["LLAMA_CPP_LIB_PATH"] = lib
import llama_cpp
from mcsharp_gguf.runtime.llama import plain_cpu_buffers, read_slot_counter, reset_slot_counter
configs, n_prompt, n_decode = json.loads(configs), int(n_prompt), int(n_decode)
rounds, threads = int(rounds), int(threads)
llms = {}
with plain_cpu_buffers(llama_cpp):
    for name, (path, kv) in configs.items():  # one Llama per configuration; a file's weights are mmapped once
        llms[name] = llama_cpp.Llama(model_path=path, n_ctx=n_prompt + n_decode + 8, n_batch=512, n_ubatch=512,
                                     n_gpu_layers=0, n_threads=threads, n_threads_batch=threads, verbose=False,
                                     kv_overrides=kv or None, logits_all=False)
lib_ = llama_cpp.llama_cpp._lib
patched = hasattr(lib_, "mcsharp_moe_slot_counter_read")
def slots():  # (selected, executed) since the last call; None on the stock library
    if not patched:
        return None
    got = read_slot_counter(lib_)
    reset_slot_counter(lib_)
    return list(got)
rnd = random.Random(0)
toks = [rnd.randrange(100, 40000) for _ in range(n_prompt + n_decode)]
out = {name: {"prefill": [], "decode": []} for name in configs}
order = list(configs)
for r in range(rounds + 1):  # round 0 warms every model up
    rnd.shuffle(order)  # a fresh order each round: no configuration always runs first
    for name in order:
        llm, o = llms[name], out[name]
        llm.reset(); llm._ctx.kv_cache_clear()
        slots()
        t0 = time.perf_counter(); llm.eval(toks[:n_prompt]); t1 = time.perf_counter()
        pf = slots()
        for t in toks[n_prompt:]:
            llm.eval([t])
        t2 = time.perf_counter()
        if r:
            o["prefill"].append(t1 - t0); o["decode"].append(t2 - t1)
            o["slots_prefill"], o["slots_decode"] = pf, slots()
print(json.dumps(out))
"""


def run_worker(lib: str, configs: dict[str, tuple[Path, dict]], args) -> dict:
    """Time ``configs`` (name → (file, kv_overrides)) in one process on ``lib``, interleaved over rounds."""
    spec = json.dumps({n: (str(p), kv) for n, (p, kv) in configs.items()})
    cmd = [sys.executable, "-c", WORKER, lib, spec, str(args.prompt), str(args.decode), str(args.rounds),
           str(args.threads)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"worker failed on {list(configs)}: {res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _moe_config(ckpt: Path) -> tuple[dict, int, int]:
    """config.json (its text part), routed experts per layer, experts per token: read, no model built."""
    from mcsharp_gguf.model.checkpoint import moe_counts

    cfg = json.loads((ckpt / "config.json").read_text())
    n_expert, k = moe_counts(cfg)
    return cfg.get("text_config", cfg), int(n_expert), int(k)


def synthetic_importance(ckpt: Path, seed: int = 0) -> list:
    """Importance for planning the random-weight model as if it were trained: every expert routed equally often
    (as the benchmark's random tokens route), each with its own sensitivity (log-normal, σ = 0.7) and an error
    falling 4× per bit of each candidate type, so that a mixed plan spreads its experts over several types."""
    from mcsharp_gguf.ggml.types import bits_per_weight
    from mcsharp_gguf.pmq.candidates import EXPERT_TYPES, Recipe
    from mcsharp_gguf.pmq.importance import LayerImportance

    cfg, n_expert, k = _moe_config(ckpt)
    d_model = cfg["hidden_size"]
    d_ff = cfg.get("moe_intermediate_size") or cfg["intermediate_size"]
    rng = np.random.default_rng(seed)
    n_tok = 64 * n_expert
    layers = []
    for layer in range(cfg["num_hidden_layers"]):
        sens = rng.lognormal(0.0, 0.7, n_expert)
        phi = np.full(n_expert, 1.0 / n_expert)
        eps = {}
        for t in EXPERT_TYPES:
            r = Recipe.for_shapes(t, d_model, d_ff)
            bits = np.mean([bits_per_weight(x) for x in (r.gate, r.up, r.down)])
            eps[t] = list(np.sqrt(sens * phi) * 2.0 ** -bits)
        layers.append(LayerImportance(layer, d_model, d_ff, list(phi), list(phi), eps, eps_fisher=eps,
                                      tokens=[n_tok * k // n_expert] * n_expert, layer_tokens=n_tok))
    return layers


def expert_plan(ckpt: Path, kind: str, seed: int = 0):
    """A BitPlan: every expert Q4_K ("single"); each layer's experts at random 1/4 Q3_K, 1/2 Q4_K, 1/4 Q5_K
    ("mixed"); every expert Q4_K but stored as the same three groups of 1/4, 1/2, 1/4 ("grouped": the grouping's
    own cost, without the types' different kernel speeds); or the planner's mixed plan at Q4_K's bytes on
    :func:`synthetic_importance`, pricing bytes only ("planned-bytes") or bytes and kernel time in decode and
    prefill ("planned-speed", pmq.speed: the default)."""
    from dataclasses import replace

    from mcsharp_gguf.model.checkpoint import model_identity
    from mcsharp_gguf.pmq.candidates import Recipe as ExpertRecipe
    from mcsharp_gguf.pmq.plan import BitPlan, solve_bit_plan

    cfg, n_expert, _ = _moe_config(ckpt)
    n_layer, d_model = cfg["num_hidden_layers"], cfg["hidden_size"]
    d_ff = cfg.get("moe_intermediate_size") or cfg["intermediate_size"]
    if kind.startswith("planned-"):
        bpw = 8 * ExpertRecipe.for_shapes("Q4_K", d_model, d_ff).n_bytes(d_model, d_ff) / (3 * d_model * d_ff)
        plan = solve_bit_plan(synthetic_importance(ckpt, seed), bpw, mode="mixed", metric="fisher", shrink=1.0,
                              **({"max_slowdown": None} if kind == "planned-bytes" else {}))
        return replace(plan, model=model_identity(ckpt))
    rng = np.random.default_rng(seed)
    layers, recipes, spent = {}, {}, 0
    for layer in range(n_layer):
        quarter = n_expert // 4
        if kind == "mixed":
            targets = np.array(["Q3_K"] * quarter + ["Q5_K"] * quarter + ["Q4_K"] * (n_expert - 2 * quarter))
            targets = [str(t) for t in rng.permutation(targets)]
        elif kind == "grouped":  # labels, each a Q4_K recipe; contiguous, so each label is one group
            targets = ["g0"] * quarter + ["g1"] * (n_expert - 2 * quarter) + ["g2"] * quarter
        else:  # "single" (Q4_K) or "single-T"
            targets = [kind.partition("-")[2] or "Q4_K"] * n_expert
        layers[layer] = targets
        type_of = {t: "Q4_K" if kind == "grouped" else t for t in targets}
        for t in sorted(set(targets)):
            r = ExpertRecipe.for_shapes(type_of[t], d_model, d_ff)
            recipes[f"{layer}:{t}"] = {"gate": r.gate, "up": r.up, "down": r.down}
        spent += sum(ExpertRecipe.for_shapes(type_of[t], d_model, d_ff).n_bytes(d_model, d_ff) for t in targets)
    n_w = n_layer * n_expert * 3 * d_model * d_ff
    bpw = 8 * spent / n_w
    return BitPlan(mode="stock" if kind.startswith("single") else "mixed", target_bpw=bpw, achieved_bpw=bpw,
                   expert_bytes=spent, expert_weights=n_w, layers=layers, recipes=recipes, model=model_identity(ckpt))


def mix_cost(ckpt: Path, kind: str) -> np.ndarray:
    """The mean kernel cost (pmq.speed, per phase, Q4_K = 1) of the experts of ``expert_plan(ckpt, kind)``."""
    from mcsharp_gguf.pmq.speed import recipe_cost

    cfg = _moe_config(ckpt)[0]
    d_model, d_ff = cfg["hidden_size"], cfg.get("moe_intermediate_size") or cfg["intermediate_size"]
    plan = expert_plan(ckpt, kind)
    q4 = recipe_cost("Q4_K", d_model, d_ff)
    return np.mean([recipe_cost(t, d_model, d_ff) / q4 for v in plan.layers.values() for t in v], axis=0)


def synthetic_routers(ckpt: Path, keep: float = 0.75, hidden: int = 32, seed: int = 0):
    """OTP routers with random weights; b2 puts each slot's logit above 0 (kept) with probability ~``keep`` for
    unit-RMS inputs (the FFN-normed block input)."""
    from scipy.stats import norm

    from mcsharp_gguf.otp.io import OtpRouters

    cfg, _, k = _moe_config(ckpt)
    d, n_layer = cfg["hidden_size"], cfg["num_hidden_layers"]
    rng = np.random.default_rng(seed)
    layers = {}
    for layer in range(n_layer):
        w1 = (rng.standard_normal((hidden, d)) / np.sqrt(d)).astype(np.float32)
        w2 = (rng.standard_normal((k, hidden)) / np.sqrt(hidden)).astype(np.float32)
        # logit_j ≈ N(0, σ²) with σ² ≈ E[gelu(z)²] for z ~ N(0, 1) (≈ 0.43), summed over hidden / hidden
        b2 = np.full(k, norm.ppf(keep) * np.sqrt(0.43), np.float32)
        layers[layer] = {"w1": w1, "b1": np.zeros(hidden, np.float32), "w2": w2, "b2": b2}
    return OtpRouters(n_embd=d, top_k=k, hidden=hidden, target_frac=keep, calib_frac=keep, calib_err=0.0,
                      lam=[0.0] * n_layer, layers=layers)


def ggml_rtn(w, type_name: str, layer: int, expert: int, proj: str) -> np.ndarray:
    """A pack.Quantiser: ``ggml_quantize_chunk`` on the weights (no importance matrix)."""
    from mcsharp_gguf.ggml.libggml import ggml_quantize
    from mcsharp_gguf.gguf.convert import tensor_values

    return ggml_quantize(tensor_values(w).float().numpy(), type_name)


def write_files(shape: str, n_layer: int, work: Path, log=print) -> dict[str, Path]:
    from mcsharp_gguf.dev.scale import write_real_shape_checkpoint
    from mcsharp_gguf.pipeline import run
    from mcsharp_gguf.recipe import Recipe

    ckpt = write_real_shape_checkpoint(shape, work / f"{shape}-{n_layer}L", n_layer, log=log)
    dense = {"attn": "Q4_K", "embd": "Q4_K", "output": "Q6_K"}
    files = {}
    for name, otp in (("single", False), ("mixed", False), ("grouped", False), ("otp", True),
                      ("planned-bytes", False), ("planned-speed", False)):
        out = work / f"{shape}-{n_layer}L-{name}.gguf"
        files[name] = out
        if out.exists():
            continue
        plan = expert_plan(ckpt, "single" if otp else name)
        recipe = Recipe(bpw=plan.target_bpw, mode=plan.mode, scope="global", gptq=False, dense_types=dense,
                        otp=otp)
        t0 = time.perf_counter()
        # speed does not depend on the weights' values: llama.cpp's own quantiser (C) writes the files many times
        # faster than our bit-exact Python RTN, with the same types and layout
        with mock.patch("mcsharp_gguf.pipeline.rtn_quantiser", ggml_rtn):
            run(recipe, ckpt, out, plan=plan, routers=synthetic_routers(ckpt) if otp else None, device="cpu",
                log=lambda *_: None)
        log(f"[files] {out.name}: {out.stat().st_size / 2**30:.2f} GiB in {time.perf_counter() - t0:.0f} s")
    return files


def stock_vs_patched(files: dict[str, Path], args, libs: dict[str, str], log=print) -> dict:
    """The single-type file (no mcsharp tensors) on the stock and on the patched libraries, pruning off: short
    one-configuration workers, alternating stock / patched --stock-pairs times, best time of each library.
    (Long workers measured minutes apart differed by up to ±10% on this shared machine in either direction.)"""
    per: dict[str, list[dict]] = {"stock": [], "patched": []}
    for i in range(args.stock_pairs):
        for lib in (("stock", "patched") if i % 2 == 0 else ("patched", "stock")):
            r = run_worker(libs[lib], {"single": (files["single"], {})}, args)["single"]
            per[lib].append({"prefill_s": min(r["prefill"]), "decode_s": min(r["decode"])})
        log(f"[bench] stock vs patched: pair {i + 1}/{args.stock_pairs} done")
    out = {}
    for phase in ("prefill", "decode"):
        best = {lib: min(x[f"{phase}_s"] for x in runs) for lib, runs in per.items()}
        out[f"patched_vs_stock_{phase}"] = best["stock"] / best["patched"]  # speed ratio: > 1 = patched faster
        out[f"{phase}_tok_s"] = {lib: (args.prompt if phase == "prefill" else args.decode) / t
                                 for lib, t in best.items()}
    out["per_process"] = per
    return out


def bench_shape(shape: str, n_layer: int, args, libs: dict[str, str], log=print) -> dict:
    from mcsharp_gguf.dev.scale import real_shape

    files = write_files(shape, n_layer, args.work, log=log)
    if args.only_stock_pairs:
        return {"shape": shape, "layers": n_layer, "stock_vs_patched": stock_vs_patched(files, args, libs, log)}
    k = int(real_shape(shape).config["num_experts_per_tok"])
    ks = sorted({k, max(1, 3 * k // 4), max(1, k // 2)}, reverse=True)
    configs: dict[str, tuple[str, dict]] = {  # name → (file, kv_overrides), all on the patched libraries
        "patched, single (off)": ("single", {}),
        "patched, mixed grouped (off)": ("mixed", {}),
        "patched, Q4_K in 3 groups (off)": ("grouped", {}),
        "patched, planned mix, bytes only (off)": ("planned-bytes", {}),
        "patched, planned mix, speed-priced (off)": ("planned-speed", {}),
        "patched, OTP routers": ("otp", {}),
        f"patched, threshold mu={args.mu}": ("single", {"mcsharp.moe.prune_mode": 3,
                                                        "mcsharp.moe.threshold_mu": args.mu}),
    }
    for kk in ks[1:]:
        configs[f"patched, static k={kk}"] = ("single", {"mcsharp.moe.prune_mode": 2, "mcsharp.moe.static_k": kk})
    best: dict[str, dict] = {}
    for proc in range(args.processes):  # each a fresh process holding every configuration
        mine = {n: (files[f], kv) for n, (f, kv) in configs.items()}
        for name, r in run_worker(libs["patched"], mine, args).items():
            b = best.setdefault(name, {"prefill_s": float("inf"), "decode_s": float("inf")})
            b["prefill_s"] = min(b["prefill_s"], *r["prefill"])
            b["decode_s"] = min(b["decode_s"], *r["decode"])
            for phase in ("prefill", "decode"):
                s = r.get(f"slots_{phase}")
                b[f"executed_{phase}"] = (s[1] / s[0]) if s and s[0] else 1.0
        log(f"[bench] {shape}: process {proc + 1}/{args.processes} done")
    best = {n: best[n] for n in configs}  # table order
    base = best["patched, single (off)"]
    for b in best.values():
        b["prefill_tok_s"] = args.prompt / b["prefill_s"]
        b["decode_tok_s"] = args.decode / b["decode_s"]
        b["prefill_speedup"] = base["prefill_s"] / b["prefill_s"]
        b["decode_speedup"] = base["decode_s"] / b["decode_s"]
    # the MoE share of each phase's time from the static-k line: t(f)/t(1) = 1 - s (1 - f)
    out = {"shape": shape, "layers": n_layer, "top_k": k, "files": {n: p.stat().st_size for n, p in files.items()},
           "configs": best}
    for phase in ("prefill", "decode"):
        pts = [(1.0, 1.0)] + [(best[f"patched, static k={kk}"][f"executed_{phase}"],
                               best[f"patched, static k={kk}"][f"{phase}_s"] / base[f"{phase}_s"]) for kk in ks[1:]]
        x = np.array([1 - f for f, _ in pts])
        y = np.array([1 - t for _, t in pts])
        s = float((x @ y) / (x @ x)) if (x @ x) > 0 else float("nan")
        out[f"moe_share_{phase}"] = s
        for b in best.values():
            f = b[f"executed_{phase}"]
            if f < 1.0:
                bound = 1.0 / (1.0 - s * (1.0 - f))
                b[f"{phase}_amdahl_bound"] = bound
                b[f"{phase}_of_bound"] = b[f"{phase}_speedup"] / bound
    out["stock_vs_patched"] = stock_vs_patched(files, args, libs, log)
    out["mixed_vs_single_decode"] = base["decode_s"] / best["patched, mixed grouped (off)"]["decode_s"]
    out["mixed_vs_single_prefill"] = base["prefill_s"] / best["patched, mixed grouped (off)"]["prefill_s"]
    # each mixed file against what its types' kernel costs (pmq.speed) predict: t = t_single (1 − s + s · c̄), c̄
    # the mean cost of its experts (the random tokens route about evenly), s the MoE share fitted above
    ckpt = args.work / f"{shape}-{n_layer}L"
    for config, kind in (("patched, mixed grouped (off)", "mixed"),
                         ("patched, planned mix, bytes only (off)", "planned-bytes"),
                         ("patched, planned mix, speed-priced (off)", "planned-speed")):
        c_mean = mix_cost(ckpt, kind)
        for i, phase in enumerate(PHASES):
            b = best[config]
            b[f"{phase}_predicted"] = 1.0 / (1.0 - out[f"moe_share_{phase}"] * (1.0 - c_mean[i]))
            b[f"{phase}_of_predicted"] = b[f"{phase}_speedup"] / b[f"{phase}_predicted"]
    out["grouped_vs_single_decode"] = base["decode_s"] / best["patched, Q4_K in 3 groups (off)"]["decode_s"]
    out["grouped_vs_single_prefill"] = base["prefill_s"] / best["patched, Q4_K in 3 groups (off)"]["prefill_s"]
    return out


def print_table(res: dict) -> None:
    sp = res["stock_vs_patched"]
    stock_line = (f"{res['shape']}: patched / stock speed, pruning off, same file: prefill "
                  f"{sp['patched_vs_stock_prefill']:.3f}, decode {sp['patched_vs_stock_decode']:.3f} "
                  f"(best of {len(sp['per_process']['stock'])} alternating process pairs)")
    if "configs" not in res:
        print(stock_line)
        return
    print(f"\n## {res['shape']}, {res['layers']} layers, top-{res['top_k']} — "
          + ", ".join(f"{n} {b / 2**30:.2f} GiB" for n, b in res["files"].items()))
    print("| configuration | executed prefill / decode | prefill tok/s | speed-up (of Amdahl bound) | "
          "decode tok/s | speed-up (of Amdahl bound) |")
    print("|---|---|---|---|---|---|")
    for name, b in res["configs"].items():
        cells = []
        for phase in ("prefill", "decode"):
            ob, op = b.get(f"{phase}_of_bound"), b.get(f"{phase}_predicted")
            cells.append(f"{b[f'{phase}_tok_s']:.1f} | {b[f'{phase}_speedup']:.3f}"
                         + ("" if ob is None else f" ({ob:.2f})")
                         + ("" if op is None else f" [kernel costs predict {op:.3f}]"))
        print(f"| {name} | {b['executed_prefill']:.3f} / {b['executed_decode']:.3f} | {cells[0]} | {cells[1]} |")
    print(f"MoE share of time (static-k fit): decode {res['moe_share_decode']:.3f}, "
          f"prefill {res['moe_share_prefill']:.3f}; "
          f"mixed grouped / single-type: decode {res['mixed_vs_single_decode']:.3f}, "
          f"prefill {res['mixed_vs_single_prefill']:.3f}; Q4_K in 3 groups / single: decode "
          f"{res['grouped_vs_single_decode']:.3f}, prefill {res['grouped_vs_single_prefill']:.3f}")
    print(stock_line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", action="append", default=None, metavar="NAME:LAYERS",
                    help="a dev.scale shape and its depth (default: qwen3-30b-a3b:8 and mixtral-8x7b:2)")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3,
                    help="interleaved rounds over the configurations inside each worker (after a warm-up round)")
    ap.add_argument("--processes", type=int, default=2,
                    help="patched workers run one after the other; the best time over all is reported")
    ap.add_argument("--stock-pairs", type=int, default=4,
                    help="alternating stock / patched one-file workers for the stock comparison")
    ap.add_argument("--only-stock-pairs", action="store_true", help="run only the stock comparison")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mu", type=float, default=0.3, help="the threshold rule's μ")
    ap.add_argument("--work", type=Path, default=Path("out/bench-runtime"))
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)

    from mcsharp_gguf.native import build as nb

    libs = {"patched": nb.build(log=lambda *a: None).lib_dir, "stock": nb.build_stock(log=lambda *a: None).lib_dir}
    results = []
    for spec in args.shape or ["qwen3-30b-a3b:8", "mixtral-8x7b:2"]:
        name, _, layers = spec.partition(":")
        res = bench_shape(name, int(layers or 8), args, libs, log=lambda m: print(m, file=sys.stderr, flush=True))
        print_table(res)
        results.append(res)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
