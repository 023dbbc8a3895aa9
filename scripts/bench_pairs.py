#!/usr/bin/env python
"""(e) PMQ mixed against (d) PMQ stock (and (f), mixed on bytes alone) on more text than bench_quality.py's table
can afford.

bench_quality.py scores every file on 4096 held-out tokens; on the fixture the paired differences (e) − (d) it
reports are of the order of their own standard error. This scores the (d), (e) and (f) files a bench_quality.py run left
in ``--work`` on text that run never used: the pydoc corpus after its 60,000 calibration characters and before the
held-out range (the table's text is not reused, so this is a second, independent measurement). Every file is
scored against the same F16 reference, one 512-token chunk at a time (the reference runs once per chunk; no
logits are kept beyond a chunk).

Per point: the paired differences of bench_quality.PAIRS ((e) − (d), (f) − (d), (e) − (f); (f) where the run
wrote it), each with both files' KLD means and its standard error over 64-token blocks.

Usage: python scripts/bench_pairs.py [--work out/bench-quality] [--points P1,...] [--eps gptq] [--max-tokens N]
                                    [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bench_quality import CALIB_CHARS, FILE_PLANS, PAIRS, POINTS, our_stem, paired_difference


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def unused_text() -> str:
    """The corpus between bench_quality's calibration characters and the held-out range."""
    from mcsharp_gguf.text import HELDOUT_CHARS, pydoc_corpus

    return pydoc_corpus()[CALIB_CHARS:-HELDOUT_CHARS]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("out/bench-quality"), help="a bench_quality.py --work dir")
    ap.add_argument("--points", default=",".join(POINTS))
    ap.add_argument("--eps", default="gptq", help="eps source of the (d)/(e) files to compare: gptq or rtn")
    ap.add_argument("--max-tokens", type=int, default=None, help="score at most this many tokens (default: all)")
    ap.add_argument("--json", dest="json_out", type=Path, default=None)
    args = ap.parse_args()

    import numpy as np

    from mcsharp_gguf.runtime import llama
    from mcsharp_gguf.runtime.evaluate import chunk_tokens, log_softmax, token_kld

    t0 = time.time()
    f16 = args.work / "fixture-f16.gguf"
    files = {}  # (point, "d" | "e" | "f") → GGUF path
    for point in args.points.split(","):
        for kind, _, source, _ in FILE_PLANS:
            path = args.work / f"{our_stem(point, kind)}.gguf"
            if source != args.eps or (kind[1] == "f" and not path.exists()):  # (f): from a run that wrote it
                continue
            if not path.exists():
                raise SystemExit(f"{path} does not exist; run scripts/bench_quality.py --work {args.work} first")
            files[point, kind[1]] = path
    if not f16.exists():
        raise SystemExit(f"{f16} does not exist; run scripts/bench_quality.py --work {args.work} first")
    ref = llama.load_model(f16, n_ctx=512)
    models = {k: llama.load_model(p, n_ctx=512) for k, p in files.items()}
    text = unused_text()
    chunks = chunk_tokens(ref.tokenize(text.encode("utf-8"), add_bos=False, special=False), 512, args.max_tokens)
    log(f"[pairs] {len(text)} characters, {len(chunks)} chunks of 512 tokens, {len(files)} files")
    kld: dict = {k: [] for k in files}
    for i, chunk in enumerate(chunks):
        base = log_softmax(llama.logits_for(ref, chunk)[:-1])  # as evaluate.score_chunk, reference once
        for k, llm in models.items():
            kld[k].append(token_kld(base, log_softmax(llama.logits_for(llm, chunk)[:-1])))
        if (i + 1) % 10 == 0:
            log(f"[pairs] {i + 1}/{len(chunks)} chunks, {time.time() - t0:.0f} s")
    kld = {k: np.concatenate(v) for k, v in kld.items()}
    rows = []
    print("| point | tokens | pair | KLD of each | difference | block SE | difference / SE |")
    print("|---|---|---|---|---|---|---|")
    for point in args.points.split(","):
        for a, b in PAIRS:
            if (point, a) not in kld or (point, b) not in kld:
                continue
            x, y = kld[point, a], kld[point, b]
            mean, se = paired_difference(x, y)
            rows.append({"point": point, "eps": args.eps, "tokens": int(x.size), "pair": f"({a}) − ({b})",
                         f"kld_{a}": float(x.mean()), f"kld_{b}": float(y.mean()), "diff": mean, "se": se})
            ratio = f"{mean / se:+.2f}" if se > 0 else "-"  # se 0: the two files give the same logits
            print(f"| {point} | {x.size} | ({a}) − ({b}) | {x.mean():.4f} / {y.mean():.4f} | {mean:+.5f} | {se:.5f} | "
                  f"{ratio} |")
    result = {"rows": rows, "chars": len(text), "wall_s": time.time() - t0}
    print(json.dumps({"wall_s": result["wall_s"]}))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
