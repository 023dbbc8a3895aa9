#!/usr/bin/env python
"""Conversion cost on the embedded fixture, side by side: wall time and peak RSS of each step, every step its own
process (os.wait4 gives each one's own peak RSS).

llama.cpp: HF → F16 GGUF (`mcsharp convert`, which runs llama.cpp's own conversion code), `llama-imatrix` on the
calibration text, `llama-quantize --imatrix` to Q2_K (3.25 expert bpw, the preset nearest 3).
Ours: `mcsharp convert --bpw 3.0` straight from the checkpoint (importance, MILP plan, layer-streamed GPTQ, GGUF),
on the same calibration text (28 × 512 tokens), default planner.

Usage: python scripts/bench_convert_cost.py [--work out/bench-cost] [--bpw 3.0] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench_quality import CALIB_CHARS, log, run_tool


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("out/bench-cost"))
    ap.add_argument("--bpw", type=float, default=3.0)
    ap.add_argument("--json", dest="json_out", type=Path, default=None)
    args = ap.parse_args()

    from mcsharp_gguf.native import build as nb

    from mcsharp_gguf.dev.fixture import cached_fixture
    from mcsharp_gguf.text import calibration_text

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    model = cached_fixture(log=log)
    tools = Path(nb.build(nb.BuildOptions(tools=True), log=log).lib_dir) / "bin"
    calib = work / "calib.txt"
    calib.write_text(calibration_text(CALIB_CHARS))
    mcsharp = [sys.executable, "-m", "mcsharp_gguf.cli"]
    f16, imatrix, q2k, ours = (work / n for n in ("f16.gguf", "imatrix.gguf", "llama-Q2_K-imatrix.gguf",
                                                  f"ours-{args.bpw}.gguf"))
    for p in (f16, imatrix, q2k, ours):
        p.unlink(missing_ok=True)
    steps = [
        ("llama.cpp", "convert HF → F16", [*mcsharp, "convert", str(model), "--preset", "F16", "-o", str(f16)]),
        ("llama.cpp", "llama-imatrix", [str(tools / "llama-imatrix"), "-m", str(f16), "-f", str(calib),
                                        "-o", str(imatrix), "-c", "512", "-t", "2", "--no-ppl"]),
        ("llama.cpp", "llama-quantize Q2_K", [str(tools / "llama-quantize"), "--imatrix", str(imatrix), str(f16),
                                              str(q2k), "Q2_K", "2"]),
        ("ours", f"mcsharp convert --bpw {args.bpw}", [*mcsharp, "convert", str(model), "--bpw", str(args.bpw),
                                                      "--calib", str(calib), "--calib-seqs", "28", "--calib-len",
                                                      "512", "-o", str(ours)]),
    ]
    rows = []
    for who, what, cmd in steps:
        log(f"[cost] {who}: {what}")
        wall, rss = run_tool(cmd)
        rows.append({"pipeline": who, "step": what, "wall_s": wall, "peak_rss_mb": rss})
        log(f"[cost]   {wall:7.1f} s, peak RSS {rss:7.0f} MB")
    print("| pipeline | step | wall s | peak RSS MB |\n|---|---|---|---|")
    for who in ("llama.cpp", "ours"):
        mine = [r for r in rows if r["pipeline"] == who]
        for r in mine:
            print(f"| {who} | {r['step']} | {r['wall_s']:.1f} | {r['peak_rss_mb']:.0f} |")
        print(f"| {who} | **total** | **{sum(r['wall_s'] for r in mine):.1f}** | "
              f"**{max(r['peak_rss_mb'] for r in mine):.0f}** |")
    print(f"file sizes: llama.cpp Q2_K + imatrix {q2k.stat().st_size / 1e6:.1f} MB, ours "
          f"{ours.stat().st_size / 1e6:.1f} MB")
    if args.json_out:
        args.json_out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
