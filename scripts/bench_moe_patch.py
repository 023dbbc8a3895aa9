#!/usr/bin/env python
"""Side-by-side benchmark of the native patch (not a test): ratios, measured in one run.

1. decode tok/s: patched runtime with OTP off (kv-override mcsharp.otp.enable=false) vs the stock build
   (no patches) on the same GGUF; the two libraries run in separate worker processes, interleaved.
2. MoE-FFN time: the same weights with an OTP router that drops the last k/2 slots vs one that keeps all,
   in the patched runtime. The MoE-FFN time is isolated by subtracting the time of the same model with
   a tiny expert FFN (width 32): t_ffn = t(model) - t(thin model). Reported for prompt processing and
   for decode.

Usage: MCSHARP_CACHE=... python scripts/bench_moe_patch.py [--hidden 1024] [--ff 1024] [--experts 16] [--k 4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

WORKER = r"""
import json, os, sys, time
import numpy as np
os.environ["LLAMA_CPP_LIB_PATH"] = sys.argv[1]
import llama_cpp
path, mode, n, reps = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
kv = json.loads(sys.argv[6])
llm = llama_cpp.Llama(model_path=path, n_ctx=max(512, n + 8), n_batch=512, n_gpu_layers=0,
                      n_threads=os.cpu_count(), verbose=False, kv_overrides=kv or None, logits_all=False)
rng = np.random.default_rng(0)
toks = [int(t) for t in rng.integers(100, 20000, n)]
times = []
for r in range(reps + 1):
    llm.reset(); llm._ctx.kv_cache_clear()
    if mode == "decode":
        llm.eval(toks[:1])
        t0 = time.perf_counter()
        for t in toks[1:]:
            llm.eval([t])
    else:
        t0 = time.perf_counter()
        llm.eval(toks)
    if r:
        times.append(time.perf_counter() - t0)
print(json.dumps({"times": times}))
"""


def run_worker(lib: str, path: Path, mode: str, n: int, reps: int, kv: dict) -> list[float]:
    res = subprocess.run([sys.executable, "-c", WORKER, lib, str(path), mode, str(n), str(reps), json.dumps(kv)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"worker failed: {res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])["times"]


def make_gguf(work: Path, name: str, hidden: int, ff: int, experts: int, k: int, otp_drop: int | None) -> Path:
    import numpy as np

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
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (min over rounds is reported)")
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()

    from mcsharp_gguf.native import build as nb

    patched = nb.build(log=lambda *a: None).lib_dir
    # the stock build: the same recipe with an empty patch set
    with tempfile.TemporaryDirectory() as empty:
        saved = nb.PATCH_DIR
        nb.PATCH_DIR = Path(empty)
        try:
            stock = nb.build(log=lambda *a: None).lib_dir
        finally:
            nb.PATCH_DIR = saved

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-moe-"))
    work.mkdir(parents=True, exist_ok=True)
    h, f, e, k = args.hidden, args.ff, args.experts, args.k
    otp = make_gguf(work, f"otp-keep-h{h}-f{f}-e{e}-k{k}", h, f, e, k, otp_drop=0)
    half = make_gguf(work, f"otp-half-h{h}-f{f}-e{e}-k{k}", h, f, e, k, otp_drop=k // 2)
    plain = make_gguf(work, f"plain-h{h}-f{f}-e{e}-k{k}", h, f, e, k, otp_drop=None)  # loads in stock too
    thin = make_gguf(work, f"thin-h{h}-e{e}-k{k}", h, 32, e, k, otp_drop=None)  # MoE FFN ~free: the rest

    best: dict[str, float] = {}

    def note(key, times):
        best[key] = min(best.get(key, float("inf")), min(times))

    off = {"mcsharp.otp.enable": False}
    for _ in range(args.rounds):
        note("decode_stock", run_worker(stock, plain, "decode", args.decode_tokens, args.reps, {}))
        note("decode_patched_plain", run_worker(patched, plain, "decode", args.decode_tokens, args.reps, {}))
        note("decode_patched_off", run_worker(patched, otp, "decode", args.decode_tokens, args.reps, off))
        note("pp_keep", run_worker(patched, otp, "prompt", args.prompt_tokens, args.reps, {}))
        note("pp_half", run_worker(patched, half, "prompt", args.prompt_tokens, args.reps, {}))
        note("pp_thin", run_worker(patched, thin, "prompt", args.prompt_tokens, args.reps, {}))
        note("dec_keep", run_worker(patched, otp, "decode", args.decode_tokens, args.reps, {}))
        note("dec_half", run_worker(patched, half, "decode", args.decode_tokens, args.reps, {}))
        note("dec_thin", run_worker(patched, thin, "decode", args.decode_tokens, args.reps, {}))

    n_dec = args.decode_tokens - 1
    res = {
        "model": f"mixtral-like, 2 layers, hidden {h}, expert ffn {f}, {e} experts, top-{k}, q8_0",
        "stock_lib": stock, "patched_lib": patched,
        "decode_tok_s_stock": n_dec / best["decode_stock"],
        "decode_tok_s_patched_otp_off": n_dec / best["decode_patched_off"],
        "decode_tok_s_patched_plain_file": n_dec / best["decode_patched_plain"],
        "decode_ratio_patched_vs_stock_same_file": best["decode_stock"] / best["decode_patched_plain"],
        "decode_ratio_patched_otp_off_vs_stock": best["decode_stock"] / best["decode_patched_off"],
    }
    for tag, keep, halfk, thin_t in (("prompt", "pp_keep", "pp_half", "pp_thin"),
                                     ("decode", "dec_keep", "dec_half", "dec_thin")):
        ffn_keep = best[keep] - best[thin_t]
        ffn_half = best[halfk] - best[thin_t]
        res[f"{tag}_total_time_ratio_half_vs_all"] = best[halfk] / best[keep]
        res[f"{tag}_moe_ffn_time_ratio_half_vs_all"] = ffn_half / ffn_keep
        res[f"{tag}_moe_ffn_time_reduction"] = 1.0 - ffn_half / ffn_keep
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
