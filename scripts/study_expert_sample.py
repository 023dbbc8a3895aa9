"""What measuring a sample of each layer's experts costs a stock plan (docs/planner.md).

Measures the fixture's full importance (every expert at every candidate type, default recipe otherwise) and
every expert's RTN error at the anchor type, or loads them (``--importance``, ``--rtn-anchor``), then, for each
sample size and each auxiliary — ``rtn`` (what the importance pass does: every expert's RTN error at the anchor;
the sample measured at every type) or ``gptq`` (the earlier pass: every expert's GPTQ error at the anchor) —
masks the unsampled experts' measured errors, predicts them as the importance pass would
(``pmq.measure.predict_unsampled``; it uses only the sampled experts' measured values and the auxiliary, so this
is exactly what a sampled pass produces), solves the whole-file stock plan at a few budgets and prices both
plans with the full measurement.

    python scripts/study_expert_sample.py --samples 4,6 [--importance imp.json --rtn-anchor rtn.json] [--save P]
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np


def sampled_layers(imp, k: int, rtn=None):
    """The importance's layers as a pass sampling ``k`` experts per layer would have recorded them, with the
    RTN anchor errors of ``rtn`` (an importance measured by RTN at the anchor type) as the auxiliary, or
    without it each expert's own (GPTQ) anchor error."""
    from mcsharp_gguf.pmq.candidates import ANCHOR_TYPE
    from mcsharp_gguf.pmq.measure import predict_unsampled, sample_experts

    out = []
    for i, lay in enumerate(imp.layers):
        src = rtn.layers[i] if rtn is not None else lay
        s = sample_experts(src.eps_fisher[ANCHOR_TYPE], k)
        new = {}
        for name in ("eps", "eps_fisher", "eps_fisher_a"):
            d = getattr(lay, name)
            masked = {t: [v if (e in s or (t == ANCHOR_TYPE and rtn is None)) else None for e, v in enumerate(d[t])]
                      for t in d}
            new[name] = predict_unsampled(masked, getattr(src, name)[ANCHOR_TYPE], s)
        out.append(replace(lay, eps=new["eps"], eps_fisher=new["eps_fisher"], eps_fisher_a=new["eps_fisher_a"],
                           sampled=s))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", default="4,6", help="experts sampled per layer, comma-separated")
    ap.add_argument("--bpw", default="3.0,3.9,4.6", help="whole-file budgets, comma-separated")
    ap.add_argument("--importance", type=Path, help="a full ModelImportance JSON (else measured on the fixture)")
    ap.add_argument("--rtn-anchor", type=Path, help="the fixture's RTN importance at the anchor type (JSON)")
    ap.add_argument("--save", type=Path, help="save the measured importances as P.full.json and P.rtn.json")
    args = ap.parse_args()

    from mcsharp_gguf.pmq.candidates import ANCHOR_TYPE, EXPERT_TYPES
    from mcsharp_gguf.pmq.importance import ModelImportance
    from mcsharp_gguf.pmq.plan import plan_cost, solve_bit_plan

    if args.importance and args.rtn_anchor:
        imp = ModelImportance.from_json(args.importance.read_text())
        rtn = ModelImportance.from_json(args.rtn_anchor.read_text())
    else:
        from mcsharp_gguf.dev.fixture import cached_fixture
        from mcsharp_gguf.model.calibration import calibration_ids
        from mcsharp_gguf.pipeline import measure
        from mcsharp_gguf.pmq.measure import measure_importance
        from mcsharp_gguf.recipe import Recipe

        model = cached_fixture()
        recipe = Recipe(mode="mixed")  # every expert at every type: the reference the samples are priced by
        ids = calibration_ids(recipe, model)
        imp = measure(recipe, model, ids)
        rtn = measure_importance(model, ids, targets=(ANCHOR_TYPE,), eps_source="rtn")
        if args.save:
            Path(f"{args.save}.full.json").write_text(imp.to_json())
            Path(f"{args.save}.rtn.json").write_text(rtn.to_json())
    if any(lay.sampled for lay in imp.layers):
        raise SystemExit("the importance is itself sampled; give a full one (measured for --mode mixed)")
    for k, aux in ((int(k), aux) for k in args.samples.split(",") for aux in ("rtn", "gptq")):
        layers = sampled_layers(imp, k, rtn if aux == "rtn" else None)
        print(f"\n{k} of {imp.layers[0].n_expert} experts sampled per layer, {aux} anchor as the auxiliary")
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
