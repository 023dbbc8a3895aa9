#!/usr/bin/env python
"""Runtime speed at real layer shapes (not a test): the patch's costs and savings, measured side by side.

For each shape (a random-weight checkpoint with the real model's layer shapes, mcsharp_gguf.dev.scale) six files
are written by our converter with llama.cpp's own round-to-nearest quantiser (speed does not depend on the weights'
values):

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

Every configuration runs in its own process (one llama.cpp library per process) and all of them in lock step
(run_lockstep): the prompt in --prefill-chunk steps, then the decode tokens in --decode-chunk steps (each token
decoded alone), each process's step i next to the others' in a fresh order each step; --rounds rounds after a
warm-up round, --threads threads. This shared machine's speed drifts by ±10% between runs seconds apart, which
hides the few percent between type mixes; in lock step the drift falls on every configuration alike, and the same
file loaded twice shows what is resolved. (Steps of a single token resolve more finely, but every other process
runs between two tokens and evicts the caches: that slowed decode by ~15% at the Qwen3 shape and seemed to penalise
files with more graph nodes.) Configurations (bench_configs): the single file on the patched libraries, pruning off
(the reference); the same again; the same file on the stock libraries; static k (3k/4, k/2 slots); the threshold
rule; OTP routers; the grouped / mixed / planned files. Each speed is the reference's time over the
configuration's, per round: median and range. From the static-k times the MoE share of each phase's time s is
fitted (t(f) = t(1) · (1 − s(1 − f)), f = executed fraction, read from the slot counter); each pruning rule's
speed-up is compared with its Amdahl bound 1 / (1 − s(1 − f)), each type mix with what KERNEL_COST predicts.

Usage: python scripts/bench_runtime.py [--shape qwen3-30b-a3b:8] [--shape mixtral-8x7b:2] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np

from mcsharp_gguf.pmq.speed import PHASES

# One configuration's process, driven by run_lockstep over stdin / stdout (see the module docstring).
STEP_WORKER = r"""
import json, os, random, sys, time
lib, path, kv, n_ctx, threads = sys.argv[1:6]
os.environ["LLAMA_CPP_LIB_PATH"] = lib
import llama_cpp
from mcsharp_gguf.runtime.llama import plain_cpu_buffers
with plain_cpu_buffers(llama_cpp):
    llm = llama_cpp.Llama(model_path=path, n_ctx=int(n_ctx), n_batch=512, n_ubatch=512, n_gpu_layers=0,
                          n_threads=int(threads), n_threads_batch=int(threads), verbose=False,
                          kv_overrides=json.loads(kv) or None, logits_all=False)
lib_ = llama_cpp.llama_cpp._lib
patched = hasattr(lib_, "mcsharp_moe_slot_counter_read")
if patched:
    from mcsharp_gguf.runtime.llama import read_slot_counter, reset_slot_counter
print("ready", flush=True)
for line in sys.stdin:  # "reset" | "slots" | [tokens, one_by_one] to evaluate → the seconds it took
    if line.strip() == "reset":
        llm.reset(); llm._ctx.kv_cache_clear(); print("ok", flush=True); continue
    if line.strip() == "slots":  # (selected, executed) expert slots since the last call; [] on the stock library
        got = list(read_slot_counter(lib_)) if patched else []
        if patched:
            reset_slot_counter(lib_)
        print(json.dumps(got), flush=True); continue
    toks, one_by_one = json.loads(line)
    t0 = time.perf_counter()
    for batch in ([[t] for t in toks] if one_by_one else [toks]):
        llm.eval(batch)
    print(time.perf_counter() - t0, flush=True)
"""


def run_lockstep(configs: dict[str, tuple[str, Path, dict]], args, rounds: int) -> dict:
    """Time ``configs`` (name → (library dir, file, kv_overrides)) in lock step, one STEP_WORKER process each:
    per name and phase, each round's seconds (after a warm-up round) and the executed fraction of the selected
    expert slots (1 on the stock library)."""
    n_ctx = args.prompt + args.decode + 8
    procs = {name: subprocess.Popen([sys.executable, "-c", STEP_WORKER, lib, str(path), json.dumps(kv), str(n_ctx),
                                     str(args.threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for name, (lib, path, kv) in configs.items()}

    def ask(name: str, msg: str) -> str:
        p = procs[name]
        p.stdin.write(msg + "\n")
        p.stdin.flush()
        got = p.stdout.readline()
        if not got:
            raise SystemExit(f"step worker {name} ({configs[name][1]}) died")
        return got.strip()

    try:
        for name, p in procs.items():
            if p.stdout.readline().strip() != "ready":
                raise SystemExit(f"step worker {name} could not load {configs[name][1]}")
        rnd = random.Random(0)
        toks = [rnd.randrange(100, 40000) for _ in range(args.prompt + args.decode)]
        order = list(configs)
        out = {name: {"prefill": [], "decode": []} for name in configs}
        slots = {name: {phase: np.zeros(2) for phase in PHASES} for name in configs}
        n = args.prompt + args.decode
        steps = [("prefill", toks[i:min(i + args.prefill_chunk, args.prompt)])
                 for i in range(0, args.prompt, args.prefill_chunk)]
        steps += [("decode", toks[i:min(i + args.decode_chunk, n)]) for i in range(args.prompt, n, args.decode_chunk)]
        for r in range(rounds + 1):  # round 0 warms every configuration up
            took = {phase: dict.fromkeys(configs, 0.0) for phase in PHASES}
            for name in configs:
                ask(name, "reset")
                ask(name, "slots")
            for i, (phase, chunk) in enumerate(steps):
                rnd.shuffle(order)
                for name in order:
                    took[phase][name] += float(ask(name, json.dumps([chunk, phase == "decode"])))
                    if i + 1 == len(steps) or steps[i + 1][0] != phase:
                        got = json.loads(ask(name, "slots"))
                        slots[name][phase] += got or 0
            if r:
                for name in configs:
                    for phase in PHASES:
                        out[name][phase].append(took[phase][name])
        for name in configs:
            for phase in PHASES:
                sel, ex = slots[name][phase]
                out[name][f"executed_{phase}"] = float(ex / sel) if sel else 1.0
        return out
    finally:
        for p in procs.values():
            p.stdin.close()
            p.wait()


def require_counts(ap, args, names: tuple[str, ...]) -> None:
    """argparse's one-line error (exit 2) for any of ``names`` (dest names) below 1."""
    for opt in names:
        if getattr(args, opt) < 1:
            ap.error(f"--{opt.replace('_', '-')} must be at least 1, got {getattr(args, opt)}")


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


_PACKED: dict[tuple, np.ndarray] = {}


def ggml_rtn(w, type_name: str, layer: int, expert: int, proj: str) -> np.ndarray:
    """A pack.Quantiser for speed files: ``ggml_quantize_chunk`` (no importance matrix) on the first weight of each
    type and shape, whose bytes then stand for every weight of that type and shape. Kernel time does not depend on
    the values (every expert keeps its own memory, and the router its own rows), and llama.cpp's K-quant search
    takes ~10 min per Mixtral-8x7B-shaped file at two layers."""
    from mcsharp_gguf.ggml.libggml import ggml_quantize
    from mcsharp_gguf.gguf.convert import tensor_values

    key = (type_name, tuple(w.shape))
    if key not in _PACKED:
        _PACKED[key] = ggml_quantize(tensor_values(w).float().numpy(), type_name)
    return _PACKED[key].copy()


def write_file(ckpt: Path, kind: str, out: Path, otp: bool = False, log=print) -> Path:
    """``ckpt`` converted to ``out`` with ``expert_plan(ckpt, kind)``'s experts (+ synthetic OTP routers), the
    dense tensors Q4_K_M-like (attention and embedding Q4_K, head Q6_K); kept when it exists."""
    from mcsharp_gguf.pipeline import run
    from mcsharp_gguf.recipe import Recipe

    if out.exists():
        return out
    plan = expert_plan(ckpt, kind)
    dense = {"attn": "Q4_K", "embd": "Q4_K", "output": "Q6_K"}
    recipe = Recipe(bpw=plan.target_bpw, mode=plan.mode, scope="global", gptq=False, dense_types=dense, otp=otp)
    t0 = time.perf_counter()
    # speed does not depend on the weights' values: llama.cpp's own quantiser (C), once per type and shape
    # (ggml_rtn), writes the files many times faster than our bit-exact Python RTN, same types and layout
    with mock.patch("mcsharp_gguf.pipeline.rtn_quantiser", ggml_rtn):
        run(recipe, ckpt, out, plan=plan, routers=synthetic_routers(ckpt) if otp else None, device="cpu",
            log=lambda *_: None)
    log(f"[files] {out.name}: {out.stat().st_size / 2**30:.2f} GiB in {time.perf_counter() - t0:.0f} s")
    return out


FILES = ("single", "mixed", "grouped", "otp", "planned-bytes", "planned-speed")


def write_files(shape: str, n_layer: int, work: Path, log=print, kinds: tuple[str, ...] = FILES) -> dict[str, Path]:
    """The random-weight checkpoint of ``shape`` at ``n_layer`` layers and its files ``kinds`` (of FILES) under
    ``work``; each kept when it exists."""
    from mcsharp_gguf.dev.scale import write_real_shape_checkpoint

    ckpt = write_real_shape_checkpoint(shape, work / f"{shape}-{n_layer}L", n_layer, log=log)
    return {name: write_file(ckpt, "single" if name == "otp" else name, work / f"{shape}-{n_layer}L-{name}.gguf",
                             otp=name == "otp", log=log)
            for name in kinds}


def bench_configs(k: int, mu: float) -> dict[str, tuple[str, str, dict]]:
    """Every configuration of a shape with top-k ``k``: name → (library, file, kv_overrides), table order; the
    first is the reference every speed ratio is taken against."""
    off: dict = {}
    static = {kk: {"mcsharp.moe.prune_mode": 2, "mcsharp.moe.static_k": kk}
              for kk in sorted({max(1, 3 * k // 4), max(1, k // 2)} - {k}, reverse=True)}
    return {
        "all-Q4_K experts, pruning off": ("patched", "single", off),
        "the same, loaded again (the method's resolution)": ("patched", "single", off),
        "stock llama.cpp, the same file": ("stock", "single", off),
        **{f"static k {k} → {kk}": ("patched", "single", kv) for kk, kv in static.items()},
        f"threshold μ = {mu:g}": ("patched", "single", {"mcsharp.moe.prune_mode": 3, "mcsharp.moe.threshold_mu": mu}),
        "OTP, synthetic routers": ("patched", "otp", off),
        "Q4_K in 3 groups (1/4, 1/2, 1/4), same bytes": ("patched", "grouped", off),
        "random 1/4 Q3_K, 1/2 Q4_K, 1/4 Q5_K groups, same bytes": ("patched", "mixed", off),
        "planned mix, bytes only, same bytes": ("patched", "planned-bytes", off),
        "planned mix, speed-priced (default), same bytes": ("patched", "planned-speed", off),
    }


def bench_shape(shape: str, n_layer: int, args, libs: dict[str, str], log=print) -> dict:
    """Every configuration of bench_configs in lock step: per configuration and phase the median seconds and tok/s,
    the speed ratio over the reference per round (median, min, max), the executed fraction; the MoE share of time
    fitted on static k, each pruning rule's Amdahl bound, each mix's prediction from KERNEL_COST."""
    from mcsharp_gguf.dev.scale import real_shape

    files = write_files(shape, n_layer, args.work, log=log)
    k = int(real_shape(shape).config["num_experts_per_tok"])
    configs = bench_configs(k, args.mu)
    t0 = time.perf_counter()
    times = run_lockstep({n: (libs[lib], files[f], kv) for n, (lib, f, kv) in configs.items()}, args, args.rounds)
    log(f"[bench] {shape}: {len(configs)} configurations × {args.rounds} rounds in lock step, "
        f"{time.perf_counter() - t0:.0f} s")
    ref = next(iter(configs))
    res: dict[str, dict] = {}
    for name in configs:
        row = res[name] = {}
        for phase in PHASES:
            mine = np.array(times[name][phase])
            ratio = np.array(times[ref][phase]) / mine  # > 1: faster than the reference
            n_tok = args.prompt if phase == "prefill" else args.decode
            row[phase] = {"tok_s": n_tok / float(np.median(mine)), "speed": float(np.median(ratio)),
                          "min": float(ratio.min()), "max": float(ratio.max()), "rounds": ratio.tolist(),
                          "executed": times[name][f"executed_{phase}"]}
    out = {"shape": shape, "layers": n_layer, "top_k": k, "rounds": args.rounds,
           "files": {n: p.stat().st_size for n, p in files.items()}, "configs": res}
    static = [n for n, (_, _, kv) in configs.items() if kv.get("mcsharp.moe.prune_mode") == 2]
    # each mix's mean kernel cost per phase (pmq.speed; its plan solved once)
    c_mean = {f: mix_cost(args.work / f"{shape}-{n_layer}L", f) for _, f, _ in configs.values()
              if f in ("mixed", "planned-bytes", "planned-speed")}
    for i, phase in enumerate(PHASES):
        # the MoE share of the phase's time from the static-k line: t(f)/t(1) = 1 − s (1 − f)
        pts = [(1.0, 1.0)] + [(res[n][phase]["executed"], 1.0 / res[n][phase]["speed"]) for n in static]
        x = np.array([1 - f for f, _ in pts])
        y = np.array([1 - t for _, t in pts])
        s = out[f"moe_share_{phase}"] = float((x @ y) / (x @ x)) if (x @ x) > 0 else float("nan")
        for r in res.values():
            f = r[phase]["executed"]
            if f < 1.0:
                r[phase]["amdahl_bound"] = bound = 1.0 / (1.0 - s * (1.0 - f))
                r[phase]["of_bound"] = r[phase]["speed"] / bound
        # each mix against what its types' kernel costs (pmq.speed) predict: t = t_single (1 − s + s · c̄), c̄ the
        # mean cost of its experts (the random tokens route about evenly)
        for name, (_, f, _) in configs.items():
            if f in c_mean:
                res[name][phase]["predicted"] = 1.0 / (1.0 - s * (1.0 - c_mean[f][i]))
    return out


def print_table(res: dict) -> None:
    print(f"\n## {res['shape']}, {res['layers']} layers, top-{res['top_k']} — "
          + ", ".join(f"{n} {b / 2**30:.2f} GiB" for n, b in res["files"].items()))
    print(f"Speed over the first row, median of {res['rounds']} lock-step rounds [min-max]; (of the Amdahl bound) for "
          "pruning, [predicted by KERNEL_COST] for type mixes; stock row: its speed over the patched libraries'")
    print("| configuration | executed prefill / decode | prefill tok/s | prefill speed | decode tok/s | decode speed |")
    print("|---|---|---|---|---|---|")
    for name, r in res["configs"].items():
        cells = []
        for phase in PHASES[::-1]:  # prefill, decode
            c = r[phase]
            extra = (f" ({c['of_bound']:.2f})" if "of_bound" in c else "") + (
                f" [{c['predicted']:.3f}]" if "predicted" in c else "")
            cells.append(f"{c['tok_s']:.1f} | {c['speed']:.3f} [{c['min']:.3f}-{c['max']:.3f}]{extra}")
        print(f"| {name} | {r['prefill']['executed']:.3f} / {r['decode']['executed']:.3f} | {cells[0]} | "
              f"{cells[1]} |")
    print(f"MoE share of time (static-k fit): decode {res['moe_share_decode']:.3f}, "
          f"prefill {res['moe_share_prefill']:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", action="append", default=None, metavar="NAME:LAYERS",
                    help="a dev.scale shape and its depth (default: qwen3-30b-a3b:8 and mixtral-8x7b:2)")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=7, help="lock-step rounds (after a warm-up round)")
    ap.add_argument("--prefill-chunk", type=int, default=512,
                    help="tokens per lock-step prefill step (the whole prompt by default: one 512-token batch)")
    ap.add_argument("--decode-chunk", type=int, default=16,
                    help="tokens per lock-step decode step (each decoded alone; a step of one process's tokens keeps "
                         "its small tensors in cache, as when it runs alone)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mu", type=float, default=0.3, help="the threshold rule's μ")
    ap.add_argument("--work", type=Path, default=Path("out/bench-runtime"))
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    require_counts(ap, args, ("prompt", "decode", "prefill_chunk", "decode_chunk", "rounds", "threads"))
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
