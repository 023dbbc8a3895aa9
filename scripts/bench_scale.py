#!/usr/bin/env python
"""Conversion cost at real layer shapes, ours against llama.cpp's, side by side on one machine.

A random-weight checkpoint with a real model's exact layer shapes (``mcsharp_gguf.dev.scale``: Qwen3-30B-A3B,
Mixtral-8x7B, DeepSeek-V2-Lite, OLMoE-1B-7B) at ``--layers`` decoder layers is written shard by shard, then
converted by both pipelines, every step its own process with its own peak RSS:

llama.cpp: HF → F16 GGUF (llama.cpp's own converter, through ``mcsharp convert``), ``llama-imatrix`` on the
calibration text, ``llama-quantize --imatrix`` to ``--preset`` (default Q3_K_M).
Ours: ``mcsharp convert --preset P --mode stock`` (the preset's bytes, computed from the tensor shapes) on the
same calibration text; its stages (calibration, importance, MILP, GPTQ, GGUF
write) are timed inside the process, each with its own peak RSS.

Printed: per-decoder-layer seconds of every step, peak RSS, ours / llama.cpp, the extrapolation to the real
model's depth (per-layer time × its layer count: the per-model parts, e.g. the LM head, are counted as if
they grew with depth, so the figure errs high), and the memory bound 2 × one decoder layer in bf16 + 3 GB.

``--device cuda`` runs our torch stages on the GPU (llama.cpp's steps stay on the CPU, as llama-imatrix and
llama-quantize run for a user without a GPU build); ``--ours-only`` skips llama.cpp's steps (a machine without
the native tools, e.g. a GPU box that only times ours).

``--ray-workers 1,2`` also converts ours with its expert work on a local Ray cluster of each number of CPUs
(``ray start --head --num-cpus N`` on 127.0.0.1, ``mcsharp convert --ray``; each task on ``--threads`` threads),
and prints the per-layer time of each beside the one-process run and whether the files are byte-identical (the
peak RSS of a Ray run is its driver's: the workers are the cluster's processes).

Usage: python scripts/bench_scale.py --shape qwen3-30b-a3b --layers 4 [--work out/bench-scale]
                                     [--calib-seqs 8] [--preset Q3_K_M] [--threads 1] [--json OUT]
                                     [--device auto|cpu|cuda] [--ours-only] [--ray-workers 1,2]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import time
from pathlib import Path

from bench_quality import CALIB_CHARS, log, tensor_types

STAGE_RE = re.compile(r"^\[stage\] (.+): ([\d.]+) s, peak RSS (\d+) MB$")


def run_logged(cmd: list[str], env: dict | None = None) -> tuple[float, float, str]:
    """Run ``cmd``; (wall seconds, its peak RSS in MB, its stderr)."""
    from mcsharp_gguf.stages import run_with_peak_rss

    wall, rss, rc, err = run_with_peak_rss(cmd, env)
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return wall, rss, err


def planned_bpw(path: Path) -> tuple[float, int]:
    """(bits per weight, weights) over the tensors a whole-file plan types, in a llama.cpp GGUF: every matrix but
    the router (norms and the router stay unquantised in both pipelines)."""
    n_w = n_b = 0
    for name, (t, shape, n_el, b) in tensor_types(path).items():
        if len(shape) < 2 or "ffn_gate_inp" in name or t in ("F32", "F16", "BF16"):
            continue
        n_w, n_b = n_w + n_el, n_b + b
    return 8 * n_b / n_w, n_w


def stage_lines(err: str) -> list[dict]:
    """The ``[stage]`` lines of a conversion's log: each stage's wall seconds and peak RSS."""
    return [{"stage": m.group(1), "wall_s": float(m.group(2)), "peak_rss_mb": float(m.group(3))}
            for m in map(STAGE_RE.match, err.splitlines()) if m]


def print_ray_table(ray_runs: list[dict], stages: list[dict], rows: list[dict], n: int, threads: int) -> None:
    """Per-layer seconds of ours in one process and on each local Ray cluster, the expert stages apart."""
    def per_layer(st: list[dict], name: str) -> str:
        return next((f"{s['wall_s'] / n:.1f}" for s in st if s["stage"] == name), "-")

    one = next(r for r in rows if r["pipeline"] == "ours")
    print(f"\n#### ours, one process vs a local Ray cluster (tasks on {threads} thread(s) each), s / layer\n")
    print("| run | total | importance | gptq | same bytes as one process |")
    print("|---|---|---|---|---|")
    print(f"| one process | {one['wall_s'] / n:.1f} | {per_layer(stages, 'importance')} | "
          f"{per_layer(stages, 'gptq')} | – |")
    for r in ray_runs:
        print(f"| Ray, {r['workers']} CPU(s) | {r['wall_s'] / n:.1f} | {per_layer(r['stages'], 'importance')} | "
              f"{per_layer(r['stages'], 'gptq')} | {'yes' if r['byte_identical'] else 'NO'} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", required=True)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("out/bench-scale"))
    ap.add_argument("--calib-seqs", type=int, default=8, help="512-token calibration sequences (both pipelines)")
    ap.add_argument("--preset", default="Q3_K_M")
    ap.add_argument("--threads", type=int, default=2, help="threads for every step (torch and llama.cpp)")
    ap.add_argument("--json", dest="json_out", type=Path, default=None)
    ap.add_argument("--device", default="cpu", help="where our torch stages run (mcsharp convert --device)")
    ap.add_argument("--ours-only", action="store_true", help="skip llama.cpp's steps")
    ap.add_argument("--ray-workers", default="", help="also convert ours on a local Ray cluster of each of these "
                                                      "CPU counts, e.g. 1,2")
    args = ap.parse_args()

    import os

    from mcsharp_gguf.native import build as nb

    from mcsharp_gguf.dev.ray_head import local_ray_head
    from mcsharp_gguf.dev.scale import layer_bytes_bf16, real_shape, write_real_shape_checkpoint
    from mcsharp_gguf.text import calibration_text

    shape = real_shape(args.shape)
    work = args.work / f"{args.shape}-{args.layers}"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model = write_real_shape_checkpoint(args.shape, args.work / f"ckpt-{args.shape}-{args.layers}", args.layers,
                                        log=log)
    log(f"[scale] checkpoint {model} ({time.time() - t0:.0f} s)")
    if not args.ours_only and not shape.llama_cpp_loads(args.layers):
        log(f"[scale] llama.cpp loads the {args.shape} shape only at {shape.llama_cpp_depths} layers (its loader tells "
            f"the model apart by depth): its steps are skipped at {args.layers}, ours alone is measured")
        args.ours_only = True
    tools = None if args.ours_only else Path(nb.build(nb.BuildOptions(tools=True), log=log).lib_dir) / "bin"
    calib = work / "calib.txt"
    # enough characters for the sequences asked for (pydoc text runs ~4 characters a token)
    calib.write_text(calibration_text(max(CALIB_CHARS, args.calib_seqs * 512 * 5)))
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    mcsharp = [sys.executable, "-m", "mcsharp_gguf.cli"]
    f16, imatrix, theirs, ours = (work / n for n in ("f16.gguf", "imatrix.gguf", f"llama-{args.preset}.gguf",
                                                     "ours.gguf"))
    for p in (f16, imatrix, theirs, ours):
        p.unlink(missing_ok=True)
    rows: list[dict] = []

    def step(who: str, what: str, cmd: list[str]) -> str:
        log(f"[scale] {who}: {what}")
        wall, rss, err = run_logged(cmd, env)
        rows.append({"pipeline": who, "step": what, "wall_s": wall, "peak_rss_mb": rss})
        log(f"[scale]   {wall:7.1f} s, peak RSS {rss:7.0f} MB")
        return err

    if tools is not None:
        step("llama.cpp", "convert HF → F16", [*mcsharp, "convert", str(model), "--preset", "F16", "-o",
                                               str(f16)])
        step("llama.cpp", "llama-imatrix", [str(tools / "llama-imatrix"), "-m", str(f16), "-f", str(calib), "-o",
                                            str(imatrix), "-c", "512", "--chunks", str(args.calib_seqs), "-t",
                                            str(args.threads), "--no-ppl"])
        step("llama.cpp", f"llama-quantize {args.preset}", [str(tools / "llama-quantize"), "--imatrix",
                                                             str(imatrix), str(f16), str(theirs), args.preset,
                                                             str(args.threads)])
        bpw, _ = planned_bpw(theirs)
        log(f"[scale] {args.preset} spends {bpw:.4f} bpw on the tensors a whole-file plan types")
    convert_ours = [*mcsharp, "convert", str(model), "--preset", args.preset, "--mode", "stock", "--calib", str(calib),
                    "--calib-seqs", str(args.calib_seqs), "--calib-len", "512", "--device", args.device]
    err = step("ours", f"mcsharp convert --preset {args.preset} --device {args.device}",
               [*convert_ours, "-o", str(ours)])
    stages = stage_lines(err)
    # the stages reset the process's high-water mark (stages.py): its peak is the largest stage's
    rows[-1]["peak_rss_mb"] = max([rows[-1]["peak_rss_mb"]] + [s["peak_rss_mb"] for s in stages])
    ray_runs = []
    for n_cpus in [int(w) for w in args.ray_workers.split(",") if w]:
        out = work / f"ours-ray{n_cpus}.gguf"
        out.unlink(missing_ok=True)
        with local_ray_head(n_cpus, env) as address:
            log(f"[scale] ours on a local Ray cluster of {n_cpus} CPU(s) at {address}")
            wall, rss, err = run_logged([*convert_ours, "--ray", address, "-o", str(out)], env)
        same = hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(ours.read_bytes()).digest()
        ray_runs.append({"workers": n_cpus, "wall_s": wall, "driver_peak_rss_mb": rss, "stages": stage_lines(err),
                         "byte_identical": same})
        log(f"[scale]   {wall:7.1f} s, driver peak RSS {rss:7.0f} MB, same bytes as one process: {same}")

    n, full = args.layers, shape.n_layer
    bound_mb = (2 * layer_bytes_bf16(model, n - 1) + 3e9) / 2**20
    ours_total = sum(r["wall_s"] for r in rows if r["pipeline"] == "ours")
    theirs_total = sum(r["wall_s"] for r in rows if r["pipeline"] == "llama.cpp") or float("nan")
    print(f"### {args.shape}, {n} of {full} layers, {args.calib_seqs} × 512 calibration tokens, "
          f"{args.threads} thread(s)\n")
    print("| pipeline | step | s / layer | peak RSS MB | extrapolated to {full} layers |".replace("{full}", str(full)))
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['pipeline']} | {r['step']} | {r['wall_s'] / n:.1f} | {r['peak_rss_mb']:.0f} | "
              f"{r['wall_s'] / n * full / 3600:.2f} h |")
        if r["pipeline"] == "ours":
            for s in stages:
                print(f"| | · {s['stage']} | {s['wall_s'] / n:.1f} | {s['peak_rss_mb']:.0f} | "
                      f"{s['wall_s'] / n * full / 3600:.2f} h |")
    peak_ours = max(r["peak_rss_mb"] for r in rows if r["pipeline"] == "ours")
    peak_theirs = max([r["peak_rss_mb"] for r in rows if r["pipeline"] == "llama.cpp"] or [float("nan")])
    print(f"\nours / llama.cpp: time {ours_total / theirs_total:.1f}×, peak RSS {peak_ours / peak_theirs:.1f}×; "
          f"ours extrapolated to {full} layers: {ours_total / n * full / 3600:.1f} h; "
          f"memory bound (2 × layer bf16 + 3 GB) {bound_mb:.0f} MB: "
          f"{'held' if peak_ours <= bound_mb else 'EXCEEDED'} (peak {peak_ours:.0f} MB)")
    theirs_bytes = theirs.stat().st_size if theirs.exists() else None
    print(f"file sizes: llama.cpp {args.preset} + imatrix "
          f"{'-' if theirs_bytes is None else f'{theirs_bytes / 1e9:.3f}'} GB, ours {ours.stat().st_size / 1e9:.3f} GB")
    if ray_runs:
        print_ray_table(ray_runs, stages, rows, n, args.threads)
    if args.json_out:
        args.json_out.write_text(json.dumps({
            "ray": ray_runs,
            "shape": args.shape, "layers": n, "full_layers": full, "calib_seqs": args.calib_seqs,
            "threads": args.threads, "device": args.device, "rows": rows, "ours_stages": stages, "bound_mb": bound_mb,
            "ratio_time": ours_total / theirs_total, "ours_extrapolated_h": ours_total / n * full / 3600,
            "file_bytes": {"llama.cpp": theirs_bytes, "ours": ours.stat().st_size}}, indent=2))


if __name__ == "__main__":
    main()
