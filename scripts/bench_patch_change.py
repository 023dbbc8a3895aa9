#!/usr/bin/env python
"""A change to the llama.cpp patch, before against after (not a test): bench_runtime's files at one real shape,
each run on an earlier build of the patched libraries (--before, a lib directory under the mcsharp cache) and on
this checkout's build, every configuration in its own process, all in lock step (bench_runtime.run_lockstep).

Each patch set keeps its own build under ``~/.cache/mcsharp-gguf/lib/<key>`` (``build-info.json`` there names its
patch hash), so the build from before a change is still there after it. Prints each configuration's speed over the
single-type file on this checkout's libraries (median of --rounds rounds [min-max]; the same file loaded again
shows the method's resolution), then, per file, this checkout over --before per round.

Usage: python scripts/bench_patch_change.py --before ~/.cache/mcsharp-gguf/lib/cpu-<key>
           [--shape qwen3-30b-a3b:8] [--kinds grouped,mixed,planned-speed] [--work DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import bench_runtime as br
import numpy as np

KINDS = tuple(k for k in br.FILES if k != "single")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", type=Path, required=True, help="lib directory of the earlier patched build")
    ap.add_argument("--shape", default="qwen3-30b-a3b:8", metavar="NAME:LAYERS")
    ap.add_argument("--kinds", default="grouped,mixed,planned-speed",
                    help=f"bench_runtime files besides the single-type one, comma-separated, of {', '.join(KINDS)}")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--prefill-chunk", type=int, default=512)
    ap.add_argument("--decode-chunk", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("out/bench-runtime"))
    ap.add_argument("--json", type=Path, default=None, help="also write the per-round ratios here")
    args = ap.parse_args()
    br.require_counts(ap, args, ("prompt", "decode", "prefill_chunk", "decode_chunk", "rounds", "threads"))
    kinds = [k for k in args.kinds.split(",") if k]
    if not kinds or any(k not in KINDS for k in kinds):
        ap.error(f"--kinds: each of {', '.join(KINDS)}")
    if not (args.before / "build-info.json").exists():
        ap.error(f"--before {args.before}: no build-info.json there; give a lib directory of a finished build")
    shape, _, depth = args.shape.partition(":")
    if not depth.isdigit() or int(depth) < 1:
        ap.error(f"--shape {args.shape}: NAME:LAYERS with LAYERS ≥ 1")
    n_layer = int(depth)

    from mcsharp_gguf.native import build as nb

    args.work.mkdir(parents=True, exist_ok=True)
    files = br.write_files(shape, n_layer, args.work, kinds=("single", *kinds))
    after = nb.build(log=lambda *a: None).lib_dir
    before = str(args.before)
    configs = {"single": (after, files["single"], {}), "single, loaded again": (after, files["single"], {}),
               "single, before": (before, files["single"], {})}
    for k in kinds:
        configs[f"{k}, before"] = (before, files[k], {})
        configs[k] = (after, files[k], {})
    t0 = time.perf_counter()
    times = br.run_lockstep(configs, args, args.rounds)
    print(f"\n## {shape}, {n_layer} layers: {len(configs)} configurations × {args.rounds} rounds in lock step, "
          f"{time.perf_counter() - t0:.0f} s; before = {args.before.name}, after = {Path(after).name}")
    print("| configuration | decode speed | prefill speed |\n|---|---|---|")
    out: dict = {"before": before, "after": after, "shape": args.shape, "speed": {}, "after_over_before": {}}

    def ratio(num: str, den: str, phase: str) -> np.ndarray:  # > 1: ``den`` is faster than ``num``
        return np.array(times[num][phase]) / np.array(times[den][phase])

    def cell(r: np.ndarray) -> str:
        return f"{np.median(r):.3f} [{r.min():.3f}-{r.max():.3f}]"

    for name in configs:
        rs = [ratio("single", name, ph) for ph in ("decode", "prefill")]
        out["speed"][name] = {ph: r.tolist() for ph, r in zip(("decode", "prefill"), rs, strict=True)}
        print(f"| {name} | {cell(rs[0])} | {cell(rs[1])} |")
    print("\nafter over before, per round (> 1: faster now)\n| file | decode | prefill |\n|---|---|---|")
    for k in ["single", *kinds]:
        rs = [ratio(f"{k}, before", k, ph) for ph in ("decode", "prefill")]
        out["after_over_before"][k] = {ph: r.tolist() for ph, r in zip(("decode", "prefill"), rs, strict=True)}
        print(f"| {k} | {cell(rs[0])} | {cell(rs[1])} |")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
