"""End-to-end refinement of trained OTP routers on KL(full model ‖ pruned model) of the next-token distribution
(loads the whole model in fp32)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch

from ..model.stream import LayerStream
from .capture import renormalises
from .io import OtpRouters
from .router import _router_from_arrays, executed_frac, layer_arrays, pruned_weights, shift_for_frac


def refine_otp_kl(model_dir: str | Path, token_ids: torch.Tensor, routers: OtpRouters, steps: int = 40,
                  lr: float = 1e-3, batch: int = 2, tau: tuple[float, float] = (1.0, 0.2), rho: float = 10.0,
                  seed: int = 0, log: Callable[[str], None] | None = None, progress: bool = True) -> OtpRouters:
    """Fine-tune every layer's router jointly on KL(full model ‖ pruned model) of the next-token distribution.

    The layer-wise training sees one block's output error at a time, with the full model's inputs; here the
    pruned model runs end to end (each router sees what upstream pruning produced) and the loss is what the
    evaluation measures. The forward pass applies the deployed rule (keep iff logit > 0) with a temperature-τ
    sigmoid's straight-through gradient, plus ρ·Σ(layer executed fraction − target)² to hold each layer at the
    target; before and afterwards each layer's keep logits are shifted (into b2) so that, with every router
    active, it executes exactly the target fraction of its calibration slots. ``calib_kl`` of the result records
    the end-to-end KL on the calibration tokens before and after, both at the target fraction; when refinement
    did not lower it, the layer-wise routers (re-shifted) are returned. Needs the whole model in memory in fp32
    (the layer-wise stage streams): for models that fit, e.g. the fixture.

    (Eleven parameters: the fine-tuning's knobs, all with defaults.)
    """
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    stream = LayerStream.open(model_dir)  # the adapter: where blocks / experts live, how weights renormalise
    arch, renorm = stream.arch, renormalises(stream.arch, stream.config)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    mods = {n: _router_from_arrays(lay) for n, lay in routers.layers.items()}
    state: dict = {"mode": "off", "tau": tau[0], "x": {}, "keep": {}}
    hooks = _hook_routers(model, arch, mods, state, renorm)
    params = [p for r in mods.values() for p in r.parameters()]
    opt = torch.optim.Adam(params, lr=lr)
    target = routers.target_frac
    n_seq = token_ids.shape[0]

    try:
        # the layer-wise routers were shifted on unpruned inputs; compare both at the same fraction, as run
        fracs = _shift_to_target(model, mods, state, token_ids, target)
        kl_before, _ = _hard_kl_and_inputs(model, mods, state, token_ids)
        start = {n: {k: v.clone() for k, v in r.state_dict().items()} for n, r in mods.items()}
        for step in tqdm(range(steps), desc="otp kl refine", unit="step", disable=not progress):
            state["tau"] = tau[0] * (tau[1] / tau[0]) ** (step / max(steps - 1, 1))
            rows = token_ids[torch.arange(step * batch, (step + 1) * batch) % n_seq]
            with torch.no_grad():
                state["mode"] = "off"
                teacher = torch.log_softmax(model(rows, use_cache=False).logits.float(), -1)
            state["mode"] = "soft"
            student = torch.log_softmax(model(rows, use_cache=False).logits.float(), -1)
            kl = (teacher.exp() * (teacher - student)).sum(-1).mean()
            pen = sum((k.mean() - target) ** 2 for k in state["keep"].values()) / len(mods)
            opt.zero_grad()
            (kl + rho * pen).backward()
            opt.step()
        new_fracs = _shift_to_target(model, mods, state, token_ids, target)
        kl_after, _ = _hard_kl_and_inputs(model, mods, state, token_ids)
        if kl_after < kl_before:
            fracs = new_fracs
        else:  # the refinement did not pay off on its own tokens: keep the (shifted) layer-wise routers
            for n, r in mods.items():
                r.load_state_dict(start[n])
    finally:
        for h in hooks:
            h.remove()
    out = OtpRouters(**{**routers.__dict__, "layers": {n: layer_arrays(r.state_dict()) for n, r in mods.items()}})
    out.calib_frac, out.calib_kl = float(np.mean(fracs)), (kl_before, kl_after)
    if log:
        log(f"[otp] KL refinement ({steps} steps): calibration KL {kl_before:.4f} → {kl_after:.4f} at executed "
            f"fraction {out.calib_frac:.3f}" + ("" if kl_after < kl_before else "; kept the layer-wise routers"))
    return out


def _hook_routers(model: torch.nn.Module, arch, mods: dict[int, torch.nn.Module], state: dict, renorm: bool) -> list:
    """Hooks on every routed layer ``n`` of ``model``: keep its MoE input in ``state["x"][n]`` and, unless
    ``state["mode"]`` is "off", apply router ``mods[n]``'s keep mask to its routing weights ("hard": the deployed
    rule; "soft": the same with a temperature-``state["tau"]`` sigmoid's gradient), recorded in
    ``state["keep"][n]``. Returns the hook handles."""

    def save_x(n, mod, args):
        state["x"][n] = args[0].reshape(-1, args[0].shape[-1])

    def mask(n, mod, args):
        if state["mode"] == "off":
            return None
        x, idx, w = args[0], args[1], args[2]
        order = torch.argsort(w.detach(), dim=1, descending=True, stable=True)  # the runtime's slot order
        ws = w.gather(1, order)
        logits = mods[n](state["x"][n])
        if state["mode"] == "soft":
            # the deployed rule (logit > 0) in the forward pass, a sigmoid's gradient in the backward one: no
            # Gumbel noise here, since random keeps near the threshold would train a rule that is never run
            soft = torch.sigmoid(logits / state["tau"])
            keep = (logits > 0).float() + soft - soft.detach()
        else:
            keep = (logits > 0).float()
        keep = torch.cat([torch.ones_like(keep[:, :1]), keep[:, 1:]], dim=1)
        state["keep"][n] = keep
        kept = pruned_weights(ws, keep, renorm)
        return x, idx, torch.zeros_like(w).scatter(1, order, kept)

    hooks = []
    for n, layer in enumerate(model.model.layers):
        if n in mods:
            block = getattr(layer, arch.moe_block)
            hooks.append(block.register_forward_pre_hook(partial(save_x, n)))
            hooks.append(getattr(block, arch.experts).register_forward_pre_hook(partial(mask, n)))
    return hooks


def _hard_kl_and_inputs(model: torch.nn.Module, mods: dict[int, torch.nn.Module], state: dict,
                        token_ids: torch.Tensor) -> tuple[float, dict[int, torch.Tensor]]:
    """KL(full ‖ pruned) over all calibration tokens with the hard rule, and every router's inputs (``model``
    hooked by _hook_routers with ``state``)."""
    n_seq = token_ids.shape[0]
    xs, kls = {n: [] for n in mods}, []
    with torch.no_grad():
        for s in range(n_seq):
            state["mode"] = "off"
            teacher = torch.log_softmax(model(token_ids[s:s + 1], use_cache=False).logits.float(), -1)
            state["mode"] = "hard"
            student = torch.log_softmax(model(token_ids[s:s + 1], use_cache=False).logits.float(), -1)
            kls.append((teacher.exp() * (teacher - student)).sum(-1).flatten())
            for n in mods:
                xs[n].append(state["x"][n])
    return float(torch.cat(kls).mean()), {n: torch.cat(v) for n, v in xs.items()}


def _shift_to_target(model: torch.nn.Module, mods: dict[int, torch.nn.Module], state: dict, token_ids: torch.Tensor,
                     target: float) -> list[float]:
    """Shift every router's keep logits so it executes the ``target`` fraction with upstream pruning active."""
    _, xs = _hard_kl_and_inputs(model, mods, state, token_ids)
    fracs = []
    with torch.no_grad():
        for n, r in mods.items():
            lg = r(xs[n])
            shift = shift_for_frac([lg], target)
            fracs.append(executed_frac([lg], shift))
            r.fc2.bias.add_(shift)
    return fracs
