#!/usr/bin/env python
"""OTP on the embedded fixture, in one run (not a test): quality vs executed expert slots, and speed.

1. Quality curve on the held-out text (4096 tokens, 512-token chunks), every point against the same F16 GGUF
   unpruned: OTP routers at several target fractions (trained once per λ on pydoc calibration text, then
   selected/shifted per target), static k (k-1, k-2, k-3) and the threshold rule (sweep of μ). The executed
   fraction is the runtime's own counter on the held-out text.
2. Speed: prefill and decode tok/s of the same GGUF with OTP on vs unpruned, side by side, as a ratio; the
   routed-expert share of decode time is estimated from the slope of decode time over static k.
   With --pmq FILE (a PMQ GGUF of the fixture) the same OTP routers are added to it and timed too.

Usage: python scripts/bench_otp.py [--fixture sliced|specialised | --model DIR] [--work DIR]
                                  [--targets 0.9,0.833,0.75,0.667,0.5] [--pmq FILE] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bench_quality import add_model_options, check_model_option


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def interp(curve: list[tuple[float, float]], x: float) -> float | None:
    """Linear interpolation of (fraction, value) points at fraction x (None outside their range)."""
    pts = sorted(curve)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:], strict=False):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("out/bench-otp"))
    ap.add_argument("--targets", default="0.9,0.833,0.75,0.667,0.5")
    ap.add_argument("--mus", default="0.5,0.7,0.8,0.85,0.9,0.93,0.95,0.97,0.99")
    ap.add_argument("--calib-seqs", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--pmq", type=Path, default=None, help="A PMQ GGUF of the fixture to time with OTP too.")
    ap.add_argument("--speed-target", type=float, default=0.75)
    ap.add_argument("--refine-steps", type=int, default=0,
                    help="Also refine the routers end to end on the logits' KL (this many steps) at --refine-targets")
    ap.add_argument("--refine-targets", default="0.75")
    ap.add_argument("--json", dest="json_out", type=Path, default=None)
    add_model_options(ap)
    args = ap.parse_args()
    check_model_option(ap, args)  # before the llama.cpp build

    import torch

    from mcsharp_gguf.dev.fixture import cached_fixture
    from mcsharp_gguf.model.calibration import calibration_token_ids
    from mcsharp_gguf.otp.capture import capture_otp_data
    from mcsharp_gguf.otp.io import add_otp_to_gguf
    from mcsharp_gguf.otp.refine import refine_otp_kl
    from mcsharp_gguf.otp.train import otp_routers, select_for_target, train_candidates
    from mcsharp_gguf.pipeline import run
    from mcsharp_gguf.recipe import Recipe
    from mcsharp_gguf.runtime.bench import bench_gguf
    from mcsharp_gguf.runtime.evaluate import evaluate_gguf, reference_logits
    from mcsharp_gguf.runtime.prune import prune_overrides
    from mcsharp_gguf.text import calibration_text, heldout_text

    t_start = time.time()
    args.work.mkdir(parents=True, exist_ok=True)
    model = args.model or cached_fixture(args.fixture, log=log)
    f16 = args.work / "fixture-f16.gguf"
    if not f16.exists():
        run(Recipe(preset="F16"), model, f16, log=log)
    k = json.loads((model / "config.json").read_text())["num_experts_per_tok"]

    t0 = time.time()
    ids = calibration_token_ids(model, calibration_text(200_000), args.calib_seqs, 512)
    # calibration + training is the slow part: kept in the work dir (keyed by its settings) for re-runs
    cache = args.work / f"otp-candidates-v2-s{args.calib_seqs}-h{args.hidden}.pt"  # (v2: candidates per layer)
    if cache.exists():
        data, cands, train_s = torch.load(cache, weights_only=False)
        log(f"[bench-otp] calibration + training from {cache} (took {train_s:.0f} s)")
    else:
        data = capture_otp_data(model, ids)
        cands = [train_candidates(d, hidden=args.hidden) for d in data]
        train_s = time.time() - t0
        torch.save((data, cands, train_s), cache)
        log(f"[bench-otp] calibration + training: {train_s:.0f} s")

    def routers_at(tgt: float):
        """Every layer's router at ``tgt``, selected from the shared training."""
        return otp_routers([select_for_target(c, d, tgt) for c, d in zip(cands, data, strict=True)], tgt, log=log)

    text = heldout_text()
    ref = reference_logits(f16, text)
    rows = []

    def point(rule: str, setting, path: Path, kv: dict) -> dict:
        r = evaluate_gguf(path, text, kv_overrides=kv or None, base_logits=ref, progress=False).to_json()
        row = {"rule": rule, "setting": setting, "executed_frac": r.get("executed_slot_frac", 1.0),
               "n_tokens": r["n_tokens"],
               "kld_mean": r["kld_mean"], "kld_p99": r["kld_p99"], "top1": r["top1_agree"], "ppl": r["ppl"]}
        log(f"[bench-otp] {rule:<9} {setting!s:<8} frac {row['executed_frac']:.3f}  KLD {row['kld_mean']:.4f}  "
            f"p99 {row['kld_p99']:.3f}  top1 {row['top1']:.3f}  PPL {row['ppl']:.3f}")
        rows.append(row)
        return row

    base = point("none", "-", f16, {})
    otp_files = {}
    for tgt in [float(t) for t in args.targets.split(",")]:
        routers = routers_at(tgt)
        path = args.work / f"fixture-f16-otp{tgt:.3f}.gguf"
        # the user's path (`mcsharp convert --preset F16 --otp`), with routers selected from the shared training
        run(Recipe(preset="F16", otp=True, otp_target_frac=tgt, otp_hidden=args.hidden), model, path,
            routers=routers, log=log)
        otp_files[tgt] = (path, routers)
        point("otp", tgt, path, {})
    refine_s = {}
    for tgt in ([float(t) for t in args.refine_targets.split(",")] if args.refine_steps else []):
        t0 = time.time()
        routers = refine_otp_kl(model, ids, routers_at(tgt), steps=args.refine_steps, log=log)
        refine_s[tgt] = time.time() - t0
        path = args.work / f"fixture-f16-otpkl{tgt:.3f}.gguf"
        run(Recipe(preset="F16", otp=True, otp_target_frac=tgt, otp_hidden=args.hidden,
                   otp_refine_steps=args.refine_steps), model, path, routers=routers, log=log)
        point("otp+kl", tgt, path, {})
    for kk in range(k - 1, k - 4, -1):
        point("static", kk, f16, prune_overrides(top_k=kk))
    for mu in [float(m) for m in args.mus.split(",")]:
        point("threshold", mu, f16, prune_overrides(prune_mu=mu))

    # OTP vs each baseline at the OTP point's executed fraction (baseline curves interpolated, the unpruned
    # point closing them at fraction 1)
    curves = {rule: [(r["executed_frac"], r["kld_mean"]) for r in rows if r["rule"] in (rule, "none")]
              for rule in ("static", "threshold")}
    comparison = []
    for r in rows:
        if r["rule"] in ("otp", "otp+kl"):
            comparison.append({"rule": r["rule"], "otp_frac": r["executed_frac"], "otp_kld": r["kld_mean"],
                               **{f"{rule}_kld": interp(c, r["executed_frac"]) for rule, c in curves.items()}})

    # speed: OTP on vs unpruned on one file, interleaved rounds in one process
    speed_path, speed_routers = otp_files.get(args.speed_target) or next(iter(otp_files.values()))
    configs = {"otp": {}, "unpruned": {"mcsharp.moe.prune_mode": 0}}
    configs.update({f"static{kk}": prune_overrides(top_k=kk) for kk in (1, k // 2)})
    speed = {r.name: r.to_json() for r in bench_gguf(speed_path, configs, prompt_tokens=256, decode_tokens=64,
                                                    rounds=5, progress=False)}
    dec_t = {n: 1.0 / v["decode_tok_s"] for n, v in speed.items()}  # seconds per decoded token
    slot_s = (dec_t["unpruned"] - dec_t["static1"]) / (k - 1)  # decode time per executed slot
    result = {
        "fixture": str(model), "reference": str(f16), "heldout_tokens": base["n_tokens"],
        "calib_tokens": int(ids.numel()),
        "train_seconds": train_s, "refine_seconds": refine_s, "curve": rows, "otp_vs_baselines": comparison,
        "speed_file": str(speed_path), "speed": speed,
        "decode_ratio_otp_vs_unpruned": speed["otp"]["decode_tok_s"] / speed["unpruned"]["decode_tok_s"],
        "prefill_ratio_otp_vs_unpruned": speed["otp"]["prefill_tok_s"] / speed["unpruned"]["prefill_tok_s"],
        "routed_expert_share_of_decode": k * slot_s / dec_t["unpruned"],
    }
    if args.pmq is not None:
        pmq_otp = args.work / "pmq-otp.gguf"
        add_otp_to_gguf(args.pmq, speed_routers, pmq_otp)
        pspeed = {r.name: r.to_json() for r in bench_gguf(pmq_otp, {"otp": {}, "unpruned": {
            "mcsharp.moe.prune_mode": 0}}, prompt_tokens=256, decode_tokens=64, rounds=5, progress=False)}
        result["pmq_speed"] = pspeed
        result["pmq_decode_ratio_otp_vs_unpruned"] = pspeed["otp"]["decode_tok_s"] / pspeed["unpruned"]["decode_tok_s"]
        result["pmq_prefill_ratio_otp_vs_unpruned"] = (pspeed["otp"]["prefill_tok_s"]
                                                      / pspeed["unpruned"]["prefill_tok_s"])
        result["pmq_quality"] = point("pmq+otp", args.speed_target, pmq_otp, {})
        result["pmq_quality_unpruned"] = point("pmq", "-", pmq_otp, {"mcsharp.otp.enable": False})
    result["wall_seconds"] = time.time() - t_start
    out = json.dumps(result, indent=2)
    if args.json_out:
        args.json_out.write_text(out)
    print(out)


if __name__ == "__main__":
    main()
