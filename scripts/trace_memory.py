"""Run an ``mcsharp`` command with its resident memory traced through the GPTQ pass: a line on stderr at the entry
and exit of each phase (layer load / unload, a layer's quantisation, each expert, its activation Hessian, each
factor, each GPTQ walk, the work-dir write, the decode back into the layer), with the RSS then and the highest
RSS a sampler thread (every 20 ms) saw since the line before. What found the Mixtral-8x7B-shape GPTQ stage's
peaks (docs/scale.md).

Usage: python scripts/trace_memory.py convert CKPT --plan plan.json ... -o OUT.gguf 2> trace.log
       (any `mcsharp` arguments; `--plan` skips the importance pass, `--work-dir` keeps finished layers, so that
       deleting one layer's ``layer-NNNN.pt`` re-runs that layer alone)
"""

from __future__ import annotations

import functools
import sys
import threading
import time
from collections.abc import Callable

from mcsharp_gguf.stages import rss_mb

_T0 = time.time()
_PEAK = [0.0]


def _sample() -> None:
    while True:
        _PEAK[0] = max(_PEAK[0], rss_mb())
        time.sleep(0.02)


def mark(label: str) -> None:
    """One trace line: elapsed s, ``label``, RSS now, the highest RSS since the line before."""
    now = rss_mb()
    print(f"[mem] {time.time() - _T0:8.1f}s {label:60s} rss {now:7.0f} peak-since-last {max(_PEAK[0], now):7.0f}",
          file=sys.stderr, flush=True)
    _PEAK[0] = now


def traced(owner: object, name: str, describe: Callable[[tuple], str] = lambda a: "") -> None:
    """Replace ``owner.name`` with a wrapper that marks its entry and exit."""
    f = getattr(owner, name)

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        label = f"{name}{describe(args)}"
        mark(f"> {label}")
        try:
            return f(*args, **kwargs)
        finally:
            mark(f"< {label}")

    setattr(owner, name, wrapper)


def main() -> None:
    import mcsharp_gguf.model.stream as stream
    import mcsharp_gguf.quant.experts as experts
    import mcsharp_gguf.quant.sequential as sequential
    from mcsharp_gguf.cli import main as mcsharp

    threading.Thread(target=_sample, daemon=True).start()
    traced(sequential.GptqPass, "__call__", lambda a: f" layer {a[1]}")
    traced(sequential.GptqPass, "quantise")
    for name in ("load_packed_experts", "save_work_entry", "load_work_entry", "quantize_layer_experts"):
        traced(sequential, name)  # (looked up in sequential's namespace when called)
    traced(experts, "quantize_expert_group", lambda a: f" e{a[0][0][0]}")
    for name in ("activation_hessian", "gptq_factor_in_place", "gptq_factor"):
        traced(experts, name)
    traced(experts, "gptq_quantize", lambda a: f" {tuple(a[0].shape)} {a[2]}")
    traced(stream.LayerStream, "load_layer")
    traced(stream.LayerStream, "unload_layer")
    sys.argv = ["mcsharp", *sys.argv[1:]]
    mcsharp()


if __name__ == "__main__":
    main()
