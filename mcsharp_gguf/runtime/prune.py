"""The runtime's expert-pruning knobs as ``kv_overrides`` (native/README.md): OTP on/off/threshold, static k, the
μ rule."""

from __future__ import annotations

from ..errors import McsharpError

PRUNE_MODES = {"none": 0, "otp": 1, "static": 2, "threshold": 3}  # mcsharp.moe.prune_mode (native/README.md)


def prune_overrides(otp: str | None = None, top_k: int | None = None, prune_mu: float | None = None) -> dict:
    """kv_overrides for the runtime's pruning knobs (DESIGN.md §7): OTP on/off/threshold, static k, μ rule.

    ``otp`` is ``on``, ``off`` or ``threshold=T``; at most one pruning rule may be chosen.
    """
    chosen = [n for n, v in (("--otp on/threshold", otp not in (None, "off")), ("--top-k", top_k is not None),
                             ("--prune-mu", prune_mu is not None)) if v]
    if len(chosen) > 1:
        raise McsharpError(f"{' and '.join(chosen)} are different pruning rules; choose one")
    # prune modes as integers: a string override first trips the loader's integer read (a logged warning)
    kv: dict = {}
    if otp == "off":
        kv["mcsharp.otp.enable"] = False
    elif otp == "on":
        kv["mcsharp.moe.prune_mode"] = PRUNE_MODES["otp"]
    elif otp is not None:
        if not otp.startswith("threshold="):
            raise McsharpError(f"--otp {otp}: expected on, off or threshold=T")
        try:
            t = float(otp.split("=", 1)[1])
        except ValueError:
            raise McsharpError(f"--otp {otp}: T must be a number, e.g. threshold=0.5") from None
        kv.update({"mcsharp.moe.prune_mode": PRUNE_MODES["otp"], "mcsharp.otp.threshold": t})
    if top_k is not None:
        if top_k < 1:
            raise McsharpError(f"--top-k {top_k}: keep at least 1 expert slot")
        kv.update({"mcsharp.moe.prune_mode": PRUNE_MODES["static"], "mcsharp.moe.static_k": int(top_k)})
    if prune_mu is not None:
        if not 0.0 <= prune_mu <= 1.0:
            raise McsharpError(f"--prune-mu {prune_mu}: μ is a fraction of the top-1 weight in [0, 1]")
        kv.update({"mcsharp.moe.prune_mode": PRUNE_MODES["threshold"], "mcsharp.moe.threshold_mu": float(prune_mu)})
    return kv
