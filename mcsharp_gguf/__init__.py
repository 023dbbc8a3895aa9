"""mcsharp-gguf: MC# compression (PMQ + OTP) for Mixture-of-Experts LLMs, written as GGUF for llama.cpp."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__version__ = "0.1.0"
__all__ = ["load"]


def load(path: str | Path, *, otp: bool | None = None, otp_threshold: float | None = None,
         top_k: int | None = None, prune_mu: float | None = None, n_ctx: int = 4096, **llama_kwargs: Any):
    """A ``llama_cpp.Llama`` for the GGUF at ``path`` on the patched runtime (built on first use), CPU.

    Pruning (one rule at most; none given = the file's own default, OTP when it has routers):
    ``otp`` True/False switches the file's OTP routers on/off, ``otp_threshold`` runs them with that
    keep-logit threshold, ``top_k`` executes only the first K of the router's top-k slots, ``prune_mu``
    executes slot j iff its weight ≥ μ × the top-1 weight. Other keyword arguments go to ``llama_cpp.Llama``
    (e.g. ``n_threads``, ``verbose``, ``kv_overrides``).
    """
    from .errors import McsharpError
    from .runtime.llama import load_model
    from .runtime.prune import prune_overrides

    if otp_threshold is not None:
        if otp is False:
            raise McsharpError("otp=False and otp_threshold contradict each other; pass one")
        otp_knob: str | None = f"threshold={float(otp_threshold)}"
    else:
        otp_knob = None if otp is None else "on" if otp else "off"
    kv = {**prune_overrides(otp_knob, top_k, prune_mu), **(llama_kwargs.pop("kv_overrides", None) or {})}
    llama_kwargs.setdefault("logits_all", False)
    return load_model(path, n_ctx=n_ctx, kv_overrides=kv or None, **llama_kwargs)
