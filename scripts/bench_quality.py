#!/usr/bin/env python
"""PMQ quality against llama.cpp's own quantisation on the embedded fixture, at matched file size, in one run.

Every file is scored against the fixture's F16 GGUF on the held-out text (4096 tokens, 512-token chunks): KLD
mean / p99, top-1 agreement, PPL. Rows:

(a) llama.cpp ``llama-quantize`` presets (RTN), (b) the same with an importance matrix from ``llama-imatrix`` on
the calibration text (the IQ presets need it). A row is ``PRESET[:PATTERN=TYPE[;...]][+im]``: the part after
``:`` are ``llama-quantize --tensor-type`` overrides, e.g. ``Q2_K:ffn_down_exps=q2_0`` (the fixture's 128-wide
expert down rows fit no K-quant, so the presets' experts never get below 3 bpw; Q2_0 takes them to 2.5).
For each size point P (a row without ``+im``; its imatrix file where there is one):
(c) uniform GPTQ: the experts in llama.cpp's own types for P (one type per projection, every expert; an IQ
lattice type becomes the largest scalar type of no more bits), GPTQ'd;
(d) PMQ stock and (e) PMQ mixed: whole-file plans (``--budget-scope file``): the bytes llama.cpp spent on the
experts and on every tensor we quantise, all types chosen by one MILP in the Fisher metric, one expert type per
layer (stock) or per expert (mixed), for each eps source of ``--eps-sources`` (GPTQ-measured eps, the default,
and/or the RTN proxy); (e) is the default recipe, its kernel time held to the stock plan's (``--max-slowdown``);
(f) PMQ mixed on bytes alone (``max_slowdown=None``), to show what that costs.
(c) gives every non-expert tensor the type llama.cpp gave it in P (IQ lattice types, which GPTQ here cannot
produce, become the largest scalar type of no more bits) and GPTQs it in the same layer stream. With
``--experts-only``, also (d0) stock and (e0) mixed with (c)'s non-expert types and the expert bytes that leaves.
Every file matches P's size to well under 2%.

Also printed (and in ``--json``): per whole-file plan its in-sample and two-fold out-of-fold estimated KL
(``est_kl``, ``cv_kl``; pmq.out_of_fold_cost) and the mixed plan's cross-validated shrinkage; per point the
paired held-out KLD differences (e) − (d), (f) − (d) and (e) − (f) with their standard errors over 64-token blocks
(``pairs``).

llama.cpp's tools run as subprocesses, timed with their peak RSS; our conversion time per file is GPTQ of every
planned tensor + writing the GGUF (importance, measured once per eps source, is listed apart).

Calibration for everything: the first 60,000 characters of pydoc text (never the held-out range).

Usage: python scripts/bench_quality.py [--fixture sliced|specialised | --model DIR] [--work out/bench-quality]
                                      [--points P1,P2,...]
                                      [--llama-rows R1,...] [--eps-sources gptq|rtn,gptq] [--experts-only]
                                      [--rows c,d,e,f] [--json OUT]

``--fixture specialised`` benchmarks the trained fixture (``mcsharp fixture --kind specialised``) and ``--model DIR``
any checkpoint of an architecture we convert, on the same code path; the default is the sliced fixture.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

# ≈2.5 expert bpw: Q2_K with the expert down rows in Q2_0 (2.25 bpw, group 64) instead of the fallback Q4_0
Q2_5 = "Q2_K:ffn_down_exps=q2_0"
LLAMA_ROWS = ["Q8_0", "Q4_K_M", "Q3_K_M", "Q3_K_M+im", "Q2_K", "Q2_K+im", "IQ3_XXS+im", "IQ2_M+im", "IQ2_XS+im",
              Q2_5, f"{Q2_5}+im"]
POINTS = ["Q3_K_M", "Q2_K", "IQ2_XS", Q2_5]
CALIB_CHARS = 60_000
EXPERT_RE = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight$")
# the whole-file plans of each point: (row kind, mode, eps source, Recipe changes); (e) is the default recipe (its
# kernel time held to the stock plan's, pmq.speed), (f) the mixed plan on bytes alone: (e) − (f) is what the
# speed pricing costs in quality
FILE_PLANS = [("(d) PMQ stock", "stock", "rtn", {}), ("(d) PMQ stock, eps gptq", "stock", "gptq", {}),
              ("(e) PMQ mixed", "mixed", "rtn", {}), ("(e) PMQ mixed, eps gptq", "mixed", "gptq", {}),
              ("(f) PMQ mixed, bytes only", "mixed", "rtn", {"max_slowdown": None}),
              ("(f) PMQ mixed, bytes only, eps gptq", "mixed", "gptq", {"max_slowdown": None})]
# paired differences reported per point and eps source: (minuend, subtrahend) row letters
PAIRS = [("e", "d"), ("f", "d"), ("e", "f")]


class LlamaRow(NamedTuple):
    preset: str
    overrides: list[str]  # llama-quantize --tensor-type PATTERN=TYPE
    imatrix: bool
    stem: str  # file name without .gguf, e.g. "llama-Q2_K-ffn_down_exps-q2_0-imatrix"
    name: str  # for the table, e.g. "Q2_K, ffn_down_exps Q2_0 + imatrix"


def llama_spec(spec: str) -> LlamaRow:
    """A llama.cpp row ``PRESET[:PAT=TYPE;...][+im]``."""
    im = spec.endswith("+im")
    preset, _, over = spec.removesuffix("+im").partition(":")
    overrides = [o for o in over.split(";") if o]
    tag = "".join(f"-{o.replace('=', '-')}" for o in overrides)
    name = preset + "".join(f", {o.split('=')[0]} {o.split('=')[1].upper()}" for o in overrides)
    return LlamaRow(preset, overrides, im, f"llama-{preset}{tag}{'-imatrix' if im else ''}",
                    name + (" + imatrix" if im else ""))


def plan_key(kind: str) -> str:
    """A row kind's short name in file and work-dir names, e.g. "(e) PMQ mixed, eps gptq" → "e-gptq"."""
    return kind[1:kind.index(")")] + ("-gptq" if "gptq" in kind else "")


def our_stem(point: str, kind: str) -> str:
    """File name without .gguf of our file of row ``kind`` at size point ``point``, e.g. "ours-Q3_K_M-e-gptq"."""
    return f"ours-{llama_spec(point).stem.removeprefix('llama-')}-{plan_key(kind)}"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def add_model_options(ap: argparse.ArgumentParser) -> None:
    """``--fixture sliced|specialised`` and ``--model DIR``: which checkpoint a benchmark script measures."""
    from mcsharp_gguf.dev.fixture import FIXTURE_KINDS

    ap.add_argument("--fixture", choices=tuple(FIXTURE_KINDS), default="sliced",
                    help="which embedded fixture (mcsharp fixture --kind), built and cached on first use")
    ap.add_argument("--model", type=Path, default=None, help="a checkpoint dir to benchmark instead of a --fixture")


def check_model_option(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse a bad ``--model`` with one usage error (exit 2) before any build or measurement."""
    if args.model is not None:
        from mcsharp_gguf.errors import McsharpError
        from mcsharp_gguf.model.checkpoint import validate_model_dir

        try:
            validate_model_dir(args.model)
        except McsharpError as e:
            ap.error(str(e))


def run_tool(cmd: list[str]) -> tuple[float, float]:
    """Run ``cmd``; (wall seconds, its peak RSS in MB)."""
    from mcsharp_gguf.stages import run_with_peak_rss

    wall, rss, rc, err = run_with_peak_rss(cmd)
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return wall, rss


def tensor_types(path: Path) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    """name → (ggml type, ggml shape ne, element count, bytes) of every tensor in a GGUF."""
    from mcsharp_gguf.gguf.edit import open_gguf

    return {t.name: (t.tensor_type.name, tuple(int(x) for x in t.shape), int(t.n_elements), int(t.n_bytes))
            for t in open_gguf(path).tensors}


def expert_totals(types: dict) -> tuple[int, int]:
    """(weights, bytes) of the routed-expert tensors."""
    ex = [v for n, v in types.items() if EXPERT_RE.match(n)]
    return sum(v[2] for v in ex), sum(v[3] for v in ex)


def scalar_type_for(t: str) -> str:
    """The type GPTQ here writes for llama.cpp's type ``t``: itself, or the largest scalar type of ≤ its bits."""
    from mcsharp_gguf.ggml.types import QUANT_TYPES, bits_per_weight

    if t in QUANT_TYPES:
        return t
    from mcsharp_gguf.llama_src import import_gguf

    gguf = import_gguf()
    bs, ts = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t]]
    bpw = 8 * ts / bs
    return max((x for x in QUANT_TYPES if bits_per_weight(x) <= bpw + 1e-9), key=bits_per_weight)


def estimated_kl(plan, importance, n_tokens: int) -> float:
    """The plan's output KL per token as its own importance estimates it: ½ Σ eps_fisher² of every chosen
    (expert, type) and (tensor, type), over the calibration tokens (compare with the measured held-out KLD)."""
    from mcsharp_gguf.pmq.plan import plan_cost

    return 0.5 * plan_cost(plan, importance.layers, importance.tensors) / n_tokens


def paired_difference(a, b, block: int = 64) -> tuple[float, float]:
    """Mean and standard error of the per-token KLD difference a − b of two files on the same tokens; the error
    from means over blocks of ``block`` consecutive tokens (neighbouring tokens' errors are correlated)."""
    import numpy as np

    d = np.asarray(a) - np.asarray(b)
    blocks = d[:d.size // block * block].reshape(-1, block).mean(1)
    return float(d.mean()), float(blocks.std(ddof=1) / np.sqrt(blocks.size))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("out/bench-quality"))
    ap.add_argument("--points", default=",".join(POINTS), help="llama.cpp rows whose sizes (c)-(e) match")
    ap.add_argument("--llama-rows", default=",".join(LLAMA_ROWS))
    ap.add_argument("--eps-sources", default="gptq", help="eps sources of the (d)/(e) rows: gptq, rtn or rtn,gptq")
    ap.add_argument("--experts-only", action="store_true",
                    help="also plan the experts alone, non-expert tensors at llama.cpp's types ((d0), (e0))")
    ap.add_argument("--rows", default="c,d,e,f", help="which of our rows to build and score (letters of c, d, e, f)")
    ap.add_argument("--json", dest="json_out", type=Path, default=None)
    add_model_options(ap)
    args = ap.parse_args()
    check_model_option(ap, args)  # before the llama.cpp build
    our_rows = set(args.rows.split(","))
    if not our_rows <= set("cdef"):
        ap.error(f"--rows {args.rows}: letters of c, d, e, f separated by commas")

    from mcsharp_gguf.native import build as nb

    from mcsharp_gguf.dev.fixture import cached_fixture
    from mcsharp_gguf.ggml.types import tensor_bytes
    from mcsharp_gguf.gguf.convert import convert_checkpoint
    from mcsharp_gguf.gguf.inspect import read_report
    from mcsharp_gguf.model.calibration import calibration_token_ids
    from mcsharp_gguf.pipeline import measure, run
    from mcsharp_gguf.pmq.importance import ModelImportance
    from mcsharp_gguf.pmq.plan import BitPlan, out_of_fold_cost, solve_bit_plan
    from mcsharp_gguf.pmq.report import format_plan_table
    from mcsharp_gguf.recipe import Recipe
    from mcsharp_gguf.runtime.evaluate import evaluate_gguf, reference_logits
    from mcsharp_gguf.stages import peak_rss_mb
    from mcsharp_gguf.text import calibration_text, heldout_text

    t_start = time.time()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    model = args.model or cached_fixture(args.fixture, log=log)
    f16 = work / "fixture-f16.gguf"
    if not f16.exists():
        convert_checkpoint(model, f16, outtype="f16")
    tools = Path(nb.build(nb.BuildOptions(tools=True), log=log).lib_dir) / "bin"
    calib = work / "calib.txt"
    calib.write_text(calibration_text(CALIB_CHARS))
    imatrix = work / "imatrix.gguf"
    timings: dict[str, float] = {}
    if not imatrix.exists():
        timings["llama-imatrix s"], timings["llama-imatrix peak RSS MB"] = run_tool(
            [str(tools / "llama-imatrix"), "-m", str(f16), "-f", str(calib), "-o", str(imatrix), "-c", "512",
             "-t", "2", "--no-ppl"])

    text = heldout_text()
    log("[quality] reference logits (F16)")
    ref = reference_logits(f16, text, progress=False)
    rows: list[dict] = []
    kld_tokens: dict = {}  # row name → KL per held-out token

    def score(name: str, kind: str, path: Path, expert_bpw: float | None = None, **extra) -> dict:
        res = evaluate_gguf(path, text, base_logits=ref, progress=False)
        kld_tokens[name] = res.kld_tokens
        r = res.to_json()
        row = {"name": name, "kind": kind, "file_mb": path.stat().st_size / 1e6, "expert_bpw": expert_bpw,
               "kld_mean": r["kld_mean"], "kld_p99": r["kld_p99"], "top1": r["top1_agree"], "ppl": r["ppl"],
               **extra}
        log(f"[quality] {name:<28} {row['file_mb']:7.1f} MB  KLD {row['kld_mean']:.4f}  p99 {row['kld_p99']:.3f}  "
            f"top1 {row['top1']:.3f}  PPL {row['ppl']:.2f}")
        rows.append(row)
        return row

    score("F16", "reference", f16, 16.0)
    llama_files: dict[str, Path] = {}
    for spec in args.llama_rows.split(","):
        preset, overrides, im, stem, name = llama_spec(spec)
        out = work / f"{stem}.gguf"
        if not out.exists():
            timings[f"llama-quantize {spec} s"], timings[f"llama-quantize {spec} peak RSS MB"] = run_tool(
                [str(tools / "llama-quantize"), *(["--imatrix", str(imatrix)] if im else []),
                 *[a for o in overrides for a in ("--tensor-type", o)], str(f16), str(out), preset, "2"])
        llama_files[spec] = out
        n_w, n_b = expert_totals(tensor_types(out))
        score(f"llama.cpp {name}", "(b)" if im else "(a)", out, 8 * n_b / n_w)

    from transformers import AutoTokenizer

    n_tok = len(AutoTokenizer.from_pretrained(model)(calibration_text(CALIB_CHARS), add_special_tokens=False)
                ["input_ids"])
    ids = calibration_token_ids(model, calibration_text(CALIB_CHARS), n_tok // 512, 512)
    # every conversion below calibrates on these same ids (the calib file, all of it in 512-token sequences)
    base_recipe = Recipe(calib=str(calib), calib_seqs=ids.shape[0], calib_len=512)
    importance: dict[str, ModelImportance] = {}
    pairs: list[dict] = []  # PAIRS per point and eps source, paired on the held-out tokens
    sources = args.eps_sources.split(",")
    for source in dict.fromkeys(sources + (["rtn"] if args.experts_only else [])):
        imp_cache = work / f"importance-{ids.shape[0]}x512-v3{'-gptq' if source == 'gptq' else ''}.json"
        if imp_cache.exists():
            importance[source] = ModelImportance.from_json(imp_cache.read_text())
        else:
            t0 = time.time()
            # measured as for a mixed plan (every expert at every type): the (e) rows plan per expert
            importance[source] = measure(replace(base_recipe, eps_source=source, mode="mixed"), model, ids)
            timings[f"importance (eps {source}) s"] = time.time() - t0
            imp_cache.write_text(importance[source].to_json())
    base_imp = importance[sources[0]]  # n_expert and the planned tensor set are the same in every importance

    for point in args.points.split(","):
        row = llama_spec(point)
        src = llama_files.get(f"{point}+im") or llama_files[point]
        types = tensor_types(src)
        # non-expert tensors: llama.cpp's type for each (scalar stand-in for IQ types), exact-name rules
        rules = []
        ours_dense = theirs_dense = 0
        for n, (t, _, n_el, b) in sorted(types.items()):
            if EXPERT_RE.match(n) or t in ("F32", "F16", "BF16"):
                continue
            ours = scalar_type_for(t)
            rules.append((rf"^{re.escape(n)}$", ours))
            theirs_dense += b
            ours_dense += tensor_bytes(ours, n_el)
        dense = tuple(rules)
        n_w, spent = expert_totals(types)
        bpw = 8 * (spent + theirs_dense - ours_dense) / n_w
        log(f"[quality] point {point}: {src.stat().st_size / 1e6:.1f} MB, experts get {bpw:.3f} bpw")
        plans = {}
        layer_types = {}
        uniform_bytes = 0  # (c)'s expert bytes: llama.cpp's types, IQ ones replaced by their scalar stand-in
        for n, (t, _, n_el, _) in types.items():
            m = EXPERT_RE.match(n)
            if m:
                ours = scalar_type_for(t)
                layer_types.setdefault(int(m.group(1)), {})[m.group(2)] = ours
                uniform_bytes += tensor_bytes(ours, n_el)
        n_e = base_imp.layers[0].n_expert
        plans["(c) uniform GPTQ"] = BitPlan(
            mode="stock", target_bpw=bpw, achieved_bpw=8 * uniform_bytes / n_w, expert_bytes=uniform_bytes,
            expert_weights=n_w, layers={lay: [f"L{lay}"] * n_e for lay in layer_types},
            recipes={f"{lay}:L{lay}": layer_types[lay] for lay in layer_types})
        if args.experts_only:
            plans["(d0) PMQ stock, experts only"] = solve_bit_plan(importance["rtn"].layers, bpw, mode="stock")
            plans["(e0) PMQ mixed, experts only"] = solve_bit_plan(importance["rtn"].layers, bpw, mode="mixed")
        # (d), (e): the same bytes over experts + every tensor we plan, all types chosen by one Fisher-metric MILP:
        # exactly `mcsharp convert --preset P --mode M` (a plain preset) or `--bpw` at llama.cpp's bytes (a point
        # with --tensor-type overrides, which no preset names), reusing the measured importance
        planned = {t.name for t in base_imp.tensors}
        file_bpw = 8 * (spent + sum(types[n][3] for n in planned)) / (n_w + sum(types[n][2] for n in planned))
        budget = {"preset": point} if ":" not in point else {"bpw": file_bpw}
        recipes: dict[str, tuple[Recipe, BitPlan | None]] = {}
        for kind, plan in plans.items():  # given plans: expert-only scope, non-expert types fixed
            recipes[kind] = (replace(base_recipe, bpw=bpw, mode=plan.mode, scope="global", tensor_types=dense), plan)
        for kind, mode, source, changes in (p for p in FILE_PLANS if p[2] in sources):
            recipes[kind] = (replace(base_recipe, mode=mode, eps_source=source, **budget, **changes), None)
        for kind, (recipe, given) in recipes.items():
            if kind[1] not in our_rows:
                continue
            stem = our_stem(point, kind)
            out = work / f"{stem}.gguf"
            source = recipe.eps_source if given is None else "rtn"
            t0 = time.time()
            res = run(recipe, model, out, plan=given, importance=None if given else importance[source], log=log)
            plan = res.plan
            out.with_suffix(".plan.txt").write_text(format_plan_table(plan) + "\n")
            est = {}
            if plan.tensor_types:
                imp = importance[source]
                # in-sample (the numbers that chose the plan) and two-fold out-of-sample estimate of its rule;
                # a cross-validated mixed plan already scored its own shrinkage
                cv = plan.cv_costs.get(f"{plan.shrink:g}") or out_of_fold_cost(
                    imp.layers, plan.target_bpw, imp.tensors, mode=plan.mode, scope="file", metric="fisher",
                    shrink=plan.shrink)
                est = {"est_kl": res.est_kl, "cv_kl": 0.5 * cv / ids.numel(), "shrink": plan.shrink}
            rep = read_report(out)
            score(f"{kind} @ {row.name}", kind[:kind.index(")") + 1], out, rep.classes["experts"].bpw,
                  point=point, size_ratio=out.stat().st_size / src.stat().st_size, convert_s=time.time() - t0, **est)
        for source in sources:
            name = {kind[1]: f"{kind} @ {row.name}" for kind, _, src_, _ in FILE_PLANS if src_ == source}
            for a, b in (p for p in PAIRS if set(p) <= our_rows):
                mean, se = paired_difference(kld_tokens[name[a]], kld_tokens[name[b]])
                pairs.append({"point": point, "eps": source, "pair": f"({a}) − ({b})", "diff": mean, "se": se})
                log(f"[quality] {point} eps {source}: KLD ({a}) − ({b}) = {mean:+.5f} ± {se:.5f} (block SE)")
    timings["peak RSS MB"] = peak_rss_mb()
    result = {"rows": rows, "pairs": pairs, "timings": timings, "wall_s": time.time() - t_start,
              "calib_tokens": int(ids.numel())}
    print(format_table(rows))
    print("\n| plan | shrink | est. KL in-sample | est. KL out-of-fold | measured KLD |\n|---|---|---|---|---|")
    for r in rows:
        if "cv_kl" in r:
            print(f"| {r['name']} | {r['shrink']:g} | {r['est_kl']:.4f} | {r['cv_kl']:.4f} | {r['kld_mean']:.4f} |")
    print("\n| point | eps | pair | KLD difference | block SE |\n|---|---|---|---|---|")
    for p in pairs:
        print(f"| {p['point']} | {p['eps']} | {p['pair']} | {p['diff']:+.5f} | {p['se']:.5f} |")
    print(json.dumps(timings, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2))


def format_table(rows: list[dict]) -> str:
    lines = ["| file | kind | size MB | expert bpw | KLD mean | KLD p99 | top-1 | PPL |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        bpw = f"{r['expert_bpw']:.3f}" if r.get("expert_bpw") is not None else "-"
        lines.append(f"| {r['name']} | {r['kind']} | {r['file_mb']:.1f} | {bpw} | {r['kld_mean']:.4f} | "
                     f"{r['kld_p99']:.3f} | {r['top1']:.3f} | {r['ppl']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
