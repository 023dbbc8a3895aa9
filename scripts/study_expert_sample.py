"""What measuring a sample of each layer's experts costs a stock plan (docs/planner.md).

Measures the fixture's full importance (every expert at every candidate type, default recipe otherwise) or
loads one (``--importance``), then, for each sample size, masks the unsampled experts' errors at every type but
the anchor, predicts them as the importance pass would (``pmq.measure.predict_unsampled``; it uses only the
sampled experts' measured values, so this is exactly what a sampled pass produces), solves the whole-file stock
plan at a few budgets and prices both plans with the full measurement.

    python scripts/study_expert_sample.py --samples 4,6 [--importance imp.json] [--save imp.json]
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np


def sampled_layers(imp, k: int):
    """The importance's layers as a pass sampling ``k`` experts per layer would have recorded them."""
    from mcsharp_gguf.pmq.candidates import ANCHOR_TYPE
    from mcsharp_gguf.pmq.measure import predict_unsampled, sample_experts

    out = []
    for lay in imp.layers:
        s = sample_experts(lay.eps_fisher[ANCHOR_TYPE], k)
        new = {}
        for name in ("eps", "eps_fisher", "eps_fisher_a"):
            d = getattr(lay, name)
            masked = {t: [v if (e in s or t == ANCHOR_TYPE) else None for e, v in enumerate(d[t])] for t in d}
            new[name] = predict_unsampled(masked, ANCHOR_TYPE, s)
        out.append(replace(lay, eps=new["eps"], eps_fisher=new["eps_fisher"], eps_fisher_a=new["eps_fisher_a"],
                           sampled=s))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", default="4,6", help="experts sampled per layer, comma-separated")
    ap.add_argument("--bpw", default="3.0,3.9,4.6", help="whole-file budgets, comma-separated")
    ap.add_argument("--importance", type=Path, help="a full ModelImportance JSON (else measured on the fixture)")
    ap.add_argument("--save", type=Path, help="save the measured importance here")
    args = ap.parse_args()

    from mcsharp_gguf.pmq.candidates import EXPERT_TYPES
    from mcsharp_gguf.pmq.importance import ModelImportance
    from mcsharp_gguf.pmq.plan import plan_cost, solve_bit_plan

    if args.importance:
        imp = ModelImportance.from_json(args.importance.read_text())
    else:
        from mcsharp_gguf.dev.fixture import cached_fixture
        from mcsharp_gguf.model.calibration import calibration_ids
        from mcsharp_gguf.pipeline import measure
        from mcsharp_gguf.recipe import Recipe

        model = cached_fixture()
        recipe = Recipe(mode="mixed")  # every expert at every type: the reference the samples are priced by
        imp = measure(recipe, model, calibration_ids(recipe, model))
        if args.save:
            args.save.write_text(imp.to_json())
    if any(lay.sampled for lay in imp.layers):
        raise SystemExit("the importance is itself sampled; give a full one (measured for --mode mixed)")
    for k in map(int, args.samples.split(",")):
        layers = sampled_layers(imp, k)
        print(f"\n{k} of {imp.layers[0].n_expert} experts sampled per layer")
        print("| type | layer-sum error, median | worst layer |\n|---|---|---|")
        for t in EXPERT_TYPES:
            err = np.abs([sum(x * x for x in a.eps_fisher[t]) / sum(x * x for x in b.eps_fisher[t]) - 1
                          for a, b in zip(layers, imp.layers, strict=True) if sum(b.eps_fisher[t])])
            print(f"| {t} | {np.median(err):.1%} | {err.max():.1%} |")
        print("\n| bpw | layers typed differently | tensors typed differently | true cost, sampled / full plan |")
        print("|---|---|---|---|")
        for bpw in map(float, args.bpw.split(",")):
            kw = dict(mode="stock", scope="file", metric="fisher", tensors=imp.tensors)
            full, samp = solve_bit_plan(imp.layers, bpw, **kw), solve_bit_plan(layers, bpw, **kw)
            n_layers = sum(full.layers[lay][0] != samp.layers[lay][0] for lay in full.layers)
            n_tensors = sum(full.tensor_types[n] != samp.tensor_types[n] for n in full.tensor_types)
            ratio = plan_cost(samp, imp.layers, imp.tensors) / plan_cost(full, imp.layers, imp.tensors)
            print(f"| {bpw} | {n_layers} / {len(full.layers)} | {n_tensors} / {len(full.tensor_types)} | "
                  f"{ratio:.4f} |")


if __name__ == "__main__":
    main()
