"""Training OTP routers: :func:`train_layer_router` fits one router with a straight-through Gumbel-sigmoid keep
mask; :func:`fit_otp` trains every layer for a few λ and keeps, per layer, the router with the lowest error once its
keep logits are shifted so the layer's calibration executed fraction hits the target; :func:`train_otp` is the
whole stage (capture, fit, optionally the end-to-end KL refinement of refine.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from ..errors import McsharpError
from .capture import OtpLayerData, capture_otp_data
from .io import OtpRouters, model_moe_shape
from .refine import refine_otp_kl
from .router import (
    OtpRouter,
    TrainedRouter,
    executed_frac,
    hard_keep,
    layer_arrays,
    mask_error,
    router_logits,
    shift_for_frac,
)

DEFAULT_HIDDEN = 32
DEFAULT_TARGET_FRAC = 0.75


def train_layer_router(data: OtpLayerData, lam: float, hidden: int = DEFAULT_HIDDEN, steps: int = 300,
                       batch: int = 512, lr: float = 3e-3, tau: tuple[float, float] = (2.0, 0.1),
                       seed: int = 0) -> TrainedRouter:
    """Fit one router: loss = mask error + λ · mean kept fraction of the droppable slots.

    The keep mask is a Gumbel-sigmoid (binary concrete) sample of sigmoid(logit) at temperature τ
    (annealed geometrically), made hard in the forward pass with straight-through gradients. Trains on the
    device ``data`` lives on; initial weights and every random draw come from seeded CPU generators.
    """
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    T, d = data.x.shape
    k = data.top_k
    dev = data.x.device
    router = OtpRouter(d, hidden, k).to(dev)
    with torch.no_grad():  # start from "keep everything": training then learns what can go
        router.fc2.weight.mul_(0.1)
        router.fc2.bias.fill_(2.0)
    opt = torch.optim.Adam(router.parameters(), lr=lr)
    # train on standardised inputs (RMSNorm gains spread channel scales widely), fold it into fc1 after
    mu, sd = data.x.mean(0), data.x.std(0).clamp_min(1e-6)
    xs = (data.x - mu) / sd
    for step in range(steps):
        t = tau[0] * (tau[1] / tau[0]) ** (step / max(steps - 1, 1))
        rows = torch.randint(0, T, (min(batch, T),), generator=g).to(dev)
        logits = router(xs[rows])
        u = torch.rand(logits.shape, generator=g).to(dev).clamp(1e-6, 1 - 1e-6)
        soft = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / t)
        keep = (soft > 0.5).float() + soft - soft.detach()
        keep = torch.cat([torch.ones_like(keep[:, :1]), keep[:, 1:]], dim=1)
        loss = mask_error(data, keep, rows) + lam * keep[:, 1:].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        router.fc1.bias.sub_(router.fc1.weight @ (mu / sd))
        router.fc1.weight.div_(sd)
        keep = hard_keep(router(data.x))
        err = float(mask_error(data, keep))
    state = {k_: v.detach().cpu().clone() for k_, v in router.state_dict().items()}
    return TrainedRouter(data.layer, state, float(keep.mean()), err)


DEFAULT_LAMS = (0.01, 0.03, 0.1, 0.3, 1.0)


@dataclass
class Candidate:
    """One layer's router trained with one λ, and its calibration keep-logits."""

    lam: float
    router: TrainedRouter
    logits: torch.Tensor


@dataclass
class LayerChoice:
    """One layer's router at the target fraction: what OtpRouters keeps of it, and how it did."""

    layer: int
    arrays: dict[str, np.ndarray]  # w1, b1, w2, b2 (the shift folded into b2)
    lam: float
    frac: float  # calibration executed fraction after the shift
    err: float  # block-output error after the shift
    trained: dict[float, float]  # λ → executed fraction training landed on (before any shift), for the log


def train_candidates(data: OtpLayerData, lams: tuple[float, ...] = DEFAULT_LAMS, hidden: int = DEFAULT_HIDDEN,
                     steps: int = 300, seed: int = 0) -> list[Candidate]:
    """One layer's router trained once per λ in ``lams`` (seeded per layer: the same routers whatever order the
    layers come in)."""
    out = []
    for lam in lams:
        r = train_layer_router(data, lam, hidden=hidden, steps=steps, seed=seed + data.layer)
        out.append(Candidate(lam, r, router_logits([r], [data])[0]))
    return out


def select_for_target(candidates: list[Candidate], data: OtpLayerData, target_frac: float) -> LayerChoice:
    """Of one layer's candidates, the router whose keep-logits, shifted so that the layer executes
    ``target_frac`` of its calibration slots, give the lowest block-output error; the shift is folded into b2.

    Every layer executes the same fraction: a global trade-off on the normalised block-output error prunes
    layers whose routed experts are small next to the shared expert (or to massive activations) almost
    completely, and that costs far more downstream than the block error says (measured on the fixture).
    λ is picked by the error at the target rather than by the fraction training lands on: with a hard
    straight-through mask the trained fraction jumps with λ, while the shift reaches any fraction smoothly.
    """
    _check_target(data.top_k, target_frac)
    best = None
    for cand in candidates:
        shift = shift_for_frac([cand.logits], target_frac)
        with torch.no_grad():
            err = mask_error(data, hard_keep(cand.logits + shift)).item()
        if best is None or err < best[0]:
            best = (err, cand, shift)
    err, cand, shift = best
    return LayerChoice(data.layer, layer_arrays(cand.router.state, shift), cand.lam,
                       executed_frac([cand.logits], shift), err, {c.lam: c.router.frac for c in candidates})


def otp_routers(choices: list[LayerChoice], target_frac: float, log: Callable[[str], None] | None = None
                ) -> OtpRouters:
    """Every MoE layer's chosen router (select_for_target), as one OtpRouters."""
    if not choices:
        raise McsharpError("the model has no MoE layers: OTP has nothing to prune")
    (hidden, n_embd), top_k = choices[0].arrays["w1"].shape, choices[0].arrays["w2"].shape[0]
    res = OtpRouters(n_embd=int(n_embd), top_k=int(top_k), hidden=int(hidden), target_frac=target_frac,
                     calib_frac=float(np.mean([c.frac for c in choices])),
                     calib_err=float(np.mean([c.err for c in choices])), lam=[c.lam for c in choices])
    res.layers = {c.layer: c.arrays for c in choices}
    if log:
        for lam in choices[0].trained:
            log(f"[otp] lambda {lam:.3g}: trained executed fraction "
                f"{np.mean([c.trained[lam] for c in choices]):.3f}")
        log(f"[otp] per-layer lambda {sorted(set(res.lam))}: calibration executed fraction {res.calib_frac:.3f}, "
            f"block-output error {res.calib_err:.4f}")
    return res


def _check_target(k: int, target_frac: float) -> None:
    if not (1.0 / k <= target_frac <= 1.0):
        raise McsharpError(f"--otp-target-frac {target_frac} is outside [{1.0 / k:.3f}, 1] (slot 0 of the "
                           f"top-{k} is always kept)")


def fit_layer(data: OtpLayerData, target_frac: float = DEFAULT_TARGET_FRAC, hidden: int = DEFAULT_HIDDEN,
              lams: tuple[float, ...] = DEFAULT_LAMS, steps: int = 300, seed: int = 0) -> LayerChoice:
    """One layer's router at ``target_frac``: :func:`train_candidates`, then :func:`select_for_target`."""
    _check_target(data.top_k, target_frac)  # before the training, not after
    return select_for_target(train_candidates(data, lams, hidden=hidden, steps=steps, seed=seed), data, target_frac)


def fit_otp(data: list[OtpLayerData], target_frac: float = DEFAULT_TARGET_FRAC, hidden: int = DEFAULT_HIDDEN,
            lams: tuple[float, ...] = DEFAULT_LAMS, steps: int = 300, seed: int = 0,
            log: Callable[[str], None] | None = None) -> OtpRouters:
    """Routers for every MoE layer of ``data`` at ``target_frac`` (fit_layer of each)."""
    if not data:
        raise McsharpError("the model has no MoE layers: OTP has nothing to prune")
    _check_target(data[0].top_k, target_frac)
    return otp_routers([fit_layer(d, target_frac, hidden, lams, steps, seed) for d in data], target_frac, log=log)


def train_otp(model_dir: str | Path, token_ids: torch.Tensor, target_frac: float = DEFAULT_TARGET_FRAC,
              hidden: int = DEFAULT_HIDDEN, refine_steps: int = 0, log: Callable[[str], None] | None = None,
              progress: bool = True, device: torch.device | str = "cpu") -> OtpRouters:
    """Calibrate and train the routers of every MoE layer of a checkpoint on ``device``, one layer at a time: each
    layer's router is fitted as soon as its calibration data is captured, and the data let go (all layers' MoE
    inputs at once would be 6.4 GB at Qwen3-30B-A3B's 48 layers and 16k tokens); with ``refine_steps`` > 0, then
    refine them end to end on the logits' KL (:func:`refine_otp_kl`, on the CPU: it holds the whole model)."""
    arch, _, top_k = model_moe_shape(model_dir)
    if top_k:  # (before any work; else the first layer's fit checks it)
        _check_target(top_k, target_frac)
    choices = capture_otp_data(model_dir, token_ids, progress=progress, device=device,
                               consume=partial(fit_layer, target_frac=target_frac, hidden=hidden))
    routers = otp_routers(choices, target_frac, log=log)
    routers.arch = arch
    if refine_steps > 0:
        routers = refine_otp_kl(model_dir, token_ids, routers, steps=refine_steps, log=log, progress=progress)
    return routers
