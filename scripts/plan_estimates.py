#!/usr/bin/env python
"""Which eps predicts better: every whole-file plan a bench_quality.py run wrote, priced by both importances it
measured (RTN-proxy eps and GPTQ-measured eps) as an estimated output KL per token, next to the measured
held-out KLD of its file (from the run's --json).

Usage: python scripts/plan_estimates.py [--work out/bench-quality] [--json out/bench-quality.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench_quality import FILE_PLANS, estimated_kl, plan_key


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("out/bench-quality"))
    ap.add_argument("--json", dest="json_in", type=Path, default=None, help="bench_quality.py --json output")
    args = ap.parse_args()

    from mcsharp_gguf.pmq.importance import ModelImportance
    from mcsharp_gguf.pmq.plan import BitPlan

    imps = {}
    for path in sorted(args.work.glob("importance-*.json")):
        imps["gptq" if path.stem.endswith("-gptq") else "rtn"] = (ModelImportance.from_json(path.read_text()),
                                                                  int(path.stem.split("-")[1].split("x")[0]) * 512)
    measured = {}
    if args.json_in:
        for r in json.loads(args.json_in.read_text())["rows"]:
            measured[r["name"]] = r["kld_mean"]
    print("| plan (work dir) | est. KL, RTN eps | est. KL, GPTQ eps | measured KLD |\n|---|---|---|---|")
    for wd in sorted(args.work.glob("ours-*.work")):
        # plan.json holds the plan, then the dense types: read the first JSON document
        text = (wd / "plan.json").read_text()
        plan = BitPlan.from_json(text[:json.JSONDecoder().raw_decode(text)[1]])
        if not plan.tensor_types:
            continue  # not a whole-file plan: the non-expert tensors are not priced
        est = {s: estimated_kl(plan, imp, n) for s, (imp, n) in imps.items()}
        point, key = wd.stem.removeprefix("ours-").split("-", 1)
        kind = {plan_key(k): k for k, *_ in FILE_PLANS}.get(key, key)
        got = measured.get(f"{kind} @ {point}")
        print(f"| {wd.name} | {est.get('rtn', float('nan')):.4f} | {est.get('gptq', float('nan')):.4f} | "
              f"{'-' if got is None else f'{got:.4f}'} |")


if __name__ == "__main__":
    main()
