#!/usr/bin/env python
"""Side-by-side benchmark of the native patch on a small model (not a test): ratios, measured in one run.

Six configurations, each in its own process, driven in lock step by bench_runtime.run_lockstep (a prompt as one
step, then decode tokens in steps, every process's step next to the others' in a fresh order; --rounds rounds
after a warm-up; each ratio per round, median and range):

1. stock llama.cpp (no patches) vs the patched runtime on the same plain GGUF, and vs the patched runtime with
   OTP off (kv-override mcsharp.otp.enable=false) on a file with routers: what the patch costs when idle;
2. MoE-FFN time: the same weights with an OTP router that drops the last k/2 slots vs one that keeps all. The
   MoE-FFN time is isolated by subtracting the time of the same model with a tiny expert FFN (width 32):
   t_ffn = t(model) - t(thin model); for prompt processing and for decode.

scripts/bench_runtime.py measures the same at real layer shapes.

Usage: python scripts/bench_moe_patch.py [--hidden 1024] [--ff 1024] [--experts 16] [--k 4] [--rounds 7]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from bench_runtime import require_counts, run_lockstep


def make_gguf(work: Path, name: str, hidden: int, ff: int, experts: int, k: int, otp_drop: int | None) -> Path:
    """A 2-layer random Mixtral-like GGUF (Q8_0) in ``work``, reused if there; ``otp_drop``: OTP routers whose bias
    keeps the first k − otp_drop slots and drops the rest (None: no routers, a file stock llama.cpp loads)."""
    from mcsharp_gguf.dev.tiny_models import make_tiny_moe
    from mcsharp_gguf.gguf.convert import convert_checkpoint

    out = work / f"{name}.gguf"
    if out.exists():
        return out
    d = make_tiny_moe("mixtral", work / f"mixtral-h{hidden}-f{ff}-e{experts}-k{k}", hidden=hidden,
                      n_expert=experts, top_k=k, expert_ff=ff)
    extra = None
    if otp_drop is not None:
        def extra(w):
            for i in range(2):
                b2 = np.array([1.0] * (k - otp_drop) + [-1.0] * otp_drop, dtype=np.float32)
                w.add_tensor(f"blk.{i}.ffn_otp_w1.weight", np.zeros((16, hidden), np.float32))
                w.add_tensor(f"blk.{i}.ffn_otp_b1.bias", np.zeros(16, np.float32))
                w.add_tensor(f"blk.{i}.ffn_otp_w2.weight", np.zeros((k, 16), np.float32))
                w.add_tensor(f"blk.{i}.ffn_otp_b2.bias", b2)
    convert_checkpoint(d, out, outtype="q8_0", extra_kv=extra)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ff", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=256, help="prompt tokens (one step)")
    ap.add_argument("--decode", type=int, default=64, help="decode tokens")
    ap.add_argument("--decode-chunk", type=int, default=16, help="decode tokens per lock-step step")
    ap.add_argument("--rounds", type=int, default=7, help="lock-step rounds (after a warm-up round)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    require_counts(ap, args, ("hidden", "ff", "experts", "k", "prompt", "decode", "decode_chunk", "rounds", "threads"))
    args.prefill_chunk = args.prompt

    from mcsharp_gguf.native import build as nb

    patched = nb.build(log=lambda *a: None).lib_dir
    stock = nb.build_stock(log=lambda *a: None).lib_dir
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-moe-"))
    work.mkdir(parents=True, exist_ok=True)
    h, f, e, k = args.hidden, args.ff, args.experts, args.k
    otp = make_gguf(work, f"otp-keep-h{h}-f{f}-e{e}-k{k}", h, f, e, k, otp_drop=0)
    half = make_gguf(work, f"otp-half-h{h}-f{f}-e{e}-k{k}", h, f, e, k, otp_drop=k // 2)
    plain = make_gguf(work, f"plain-h{h}-f{f}-e{e}-k{k}", h, f, e, k, otp_drop=None)  # loads in stock too
    thin = make_gguf(work, f"thin-h{h}-e{e}-k{k}", h, 32, e, k, otp_drop=None)  # MoE FFN ~free: the rest

    configs = {"stock": (stock, plain, {}), "patched_plain": (patched, plain, {}),
               "patched_otp_off": (patched, otp, {"mcsharp.otp.enable": False}), "keep": (patched, otp, {}),
               "half": (patched, half, {}), "thin": (patched, thin, {})}
    t = {name: {ph: np.array(v[ph]) for ph in ("prefill", "decode")} for name, v in
         run_lockstep(configs, args, args.rounds).items()}

    def spread(x: np.ndarray) -> dict:
        return {"median": float(np.median(x)), "min": float(x.min()), "max": float(x.max())}

    res = {"model": f"mixtral-like, 2 layers, hidden {h}, expert ffn {f}, {e} experts, top-{k}, q8_0",
           "stock_lib": stock, "patched_lib": patched, "rounds": args.rounds,
           "decode_tok_s_stock": float(np.median(args.decode / t["stock"]["decode"]))}
    for phase in ("prefill", "decode"):  # speed over stock's, per round: > 1 is faster than stock
        res[f"{phase}_speed_patched_vs_stock_same_file"] = spread(t["stock"][phase] / t["patched_plain"][phase])
        res[f"{phase}_speed_patched_otp_off_vs_stock"] = spread(t["stock"][phase] / t["patched_otp_off"][phase])
        res[f"{phase}_total_time_ratio_half_vs_all"] = spread(t["half"][phase] / t["keep"][phase])
        ffn = (t["half"][phase] - t["thin"][phase]) / (t["keep"][phase] - t["thin"][phase])
        res[f"{phase}_moe_ffn_time_ratio_half_vs_all"] = spread(ffn)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
