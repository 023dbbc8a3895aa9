"""Routing statistics and the planner's ceiling of a MoE checkpoint: how much its experts differ (#22's table).

Routing, on the held-out text (up to 8 × 512 tokens; dev.routing, one decoder layer at a time): per MoE layer the
mean top-1 routing weight and the expert activation frequency max / min.

Planner ceiling, at the budget of ``--preset`` (a whole-file plan, as ``mcsharp convert``): the importance measured
for a mixed plan (every expert at every type, GPTQ eps) on the first 60,000 pydoc characters (bench_quality's
calibration), then the fisher-metric cost of a stock plan, of a mixed plan on costs shrunk to the layer mean and
of a mixed plan on the costs as measured, in-sample and two-fold out-of-fold (pmq.plan.planner_ceiling). The
ceiling is 1 − mixed / mixed-on-mean-costs: what per-expert differences in error, beyond how often each expert
runs, can buy.

    python scripts/fixture_stats.py [--fixture sliced|specialised | --model DIR] [--preset Q3_K_M]
                                    [--importance FILE] [--json OUT]

The model is an embedded fixture (``--fixture``, default sliced) or any checkpoint (``--model``).
``--importance FILE`` reuses a measured importance (e.g. bench_quality's ``importance-28x512-v3-gptq.json``
for the fixture) or, when FILE does not exist, stores the one measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quality import CALIB_CHARS, add_model_options, log  # noqa: E402

HELDOUT_SEQS = 8


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="Q3_K_M", help="the budget: llama-quantize preset whose bytes the plans get")
    ap.add_argument("--importance", type=Path, default=None, help="importance JSON to reuse, or where to store it")
    ap.add_argument("--json", dest="json_out", type=Path, default=None)
    add_model_options(ap)
    args = ap.parse_args()
    from mcsharp_gguf.errors import McsharpError

    try:
        report(args)
    except McsharpError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def report(args: argparse.Namespace) -> None:
    """Measure (or load) and print what ``main`` describes."""
    from transformers import AutoTokenizer

    from mcsharp_gguf.dev.fixture import cached_fixture
    from mcsharp_gguf.dev.routing import routing_statistics
    from mcsharp_gguf.errors import McsharpError
    from mcsharp_gguf.model.calibration import calibration_token_ids
    from mcsharp_gguf.model.checkpoint import validate_model_dir
    from mcsharp_gguf.pipeline import measure, model_budget, planned_weights
    from mcsharp_gguf.pmq.importance import ModelImportance
    from mcsharp_gguf.pmq.plan import planner_ceiling, solve_bit_plan
    from mcsharp_gguf.pmq.report import expert_traffic, format_expert_traffic
    from mcsharp_gguf.recipe import Recipe
    from mcsharp_gguf.text import calibration_text, heldout_text

    model = args.model or cached_fixture(args.fixture, log=log)
    validate_model_dir(model)
    tok = AutoTokenizer.from_pretrained(model)
    text = calibration_text(CALIB_CHARS)
    n_cal = len(tok(text, add_special_tokens=False)["input_ids"]) // 512
    recipe = Recipe(preset=args.preset, mode="mixed", calib_seqs=n_cal, calib_len=512)
    budget = model_budget(recipe, model, log)  # a bad --preset fails here, before any measuring
    importance = None
    if args.importance is not None and args.importance.exists():
        try:
            importance = ModelImportance.from_json(args.importance.read_text())
        except (ValueError, KeyError, TypeError) as e:
            raise McsharpError(f"--importance {args.importance} is not an importance JSON ({e}); pass another "
                               "path to measure and store one") from None

    n_held = len(tok(heldout_text(), add_special_tokens=False)["input_ids"])
    held = calibration_token_ids(model, heldout_text(), min(HELDOUT_SEQS, n_held // 512), 512)
    routing = routing_statistics(model, held, progress=False)
    top1 = np.array([r.top1_weight for r in routing])
    ratio = np.array([r.freq_ratio for r in routing])
    log(f"[stats] routing on {held.numel()} held-out tokens: mean top-1 weight {top1.mean():.3f} "
        f"({top1.min():.3f}-{top1.max():.3f}), frequency max/min median {np.median(ratio):.2f} "
        f"({ratio.min():.2f}-{ratio.max():.2f})")

    if importance is None:
        importance = measure(recipe, model, calibration_token_ids(model, text, n_cal, 512))
        if args.importance is not None:  # written whole or not at all
            tmp = args.importance.with_name(args.importance.name + ".tmp")
            tmp.write_text(importance.to_json())
            os.replace(tmp, args.importance)
    bpw = 8 * budget.planned_bytes / planned_weights(importance, recipe.scope)
    ceiling = planner_ceiling(importance.layers, bpw, importance.tensors, scope=recipe.scope)
    n_tok = n_cal * 512
    print("| plan | est. KL in-sample | est. KL out-of-fold |\n|---|---|---|")
    for name in ("stock", "mixed_mean", "mixed"):
        c = getattr(ceiling, name)
        print(f"| {name} | {0.5 * c[0] / n_tok:.5f} | {0.5 * c[1] / n_tok:.5f} |")
    gains = {f"{over} {'out-of-fold' if oof else 'in-sample'}": ceiling.gain(over, oof)
             for over in ("mixed_mean", "stock") for oof in (False, True)}
    for k, v in gains.items():
        print(f"mixed over {k}: {100 * v:+.2f}%")
    traffic = {}  # what each plan's experts cost a decoded token (pmq.report.expert_traffic)
    for mode in ("stock", "mixed"):
        plan = solve_bit_plan(importance.layers, bpw, mode=mode, tensors=importance.tensors, metric="fisher",
                              scope=recipe.scope)
        t = expert_traffic(plan)
        traffic[mode] = asdict(t)
        print(f"{mode} plan: {format_expert_traffic(t)}")
    print(f"routing: mean top-1 weight {top1.mean():.3f} ({top1.min():.3f}-{top1.max():.3f}), frequency max/min "
          f"median {np.median(ratio):.2f} ({ratio.min():.2f}-{ratio.max():.2f})")
    if args.json_out:
        args.json_out.write_text(json.dumps({
            "model": str(model), "preset": args.preset, "bpw": bpw, "calib_tokens": n_tok,
            "heldout_tokens": int(held.numel()),
            "routing": [{"layer": r.layer, "top1_weight": r.top1_weight, "freq": r.freq} for r in routing],
            "ceiling": {"stock": ceiling.stock, "mixed_mean": ceiling.mixed_mean, "mixed": ceiling.mixed},
            "gains": gains, "expert_traffic": traffic}, indent=2))


if __name__ == "__main__":
    main()
