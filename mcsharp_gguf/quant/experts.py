"""GPTQ of MoE experts: one expert's gate/up (on the Hessian of its routed inputs) and down (on that of its own
activations), RTN where too few tokens reached it; and every expert of one layer."""

from __future__ import annotations

import numpy as np
import torch

from ..ggml.libggml import ggml_dequantize
from ..ggml.packing import QuantResult, quantize_rtn
from .gptq import HessianAccumulator, gptq_quantize

PROJS = ("gate", "up", "down")


def expert_hessians(g: torch.Tensor, u: torch.Tensor, xe: torch.Tensor, act, gptq: bool = True,
                    d_ff: int | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """GPTQ Hessians of one expert: (gate/up input, down input) from its routed inputs ``xe``; None where that
    projection gets RTN instead — without ``gptq``, or when the expert saw fewer tokens than the projection's
    input width (its Hessian is then singular: GPTQ fits those few tokens and, measured on the tiny test models,
    generalises worse than RTN), in particular for experts no token reached.

    ``d_ff``: the expert's full width when ``g``/``u`` are a sample of its neurons (pmq.measure), so that the
    choice between GPTQ and RTN is the one the whole expert gets."""
    n = int(xe.shape[0])
    h_in = h_act = None
    if gptq and n >= xe.shape[1]:
        acc = HessianAccumulator(xe.shape[1])
        acc.add(xe)
        h_in = acc.H
    if gptq and n >= (d_ff or g.shape[0]):
        acc = HessianAccumulator(g.shape[0])
        acc.add(act(xe @ g.T) * (xe @ u.T))
        h_act = acc.H
    return h_in, h_act


def quantize_expert(g: torch.Tensor, u: torch.Tensor, d: torch.Tensor, types: dict[str, str],
                    hessians: tuple[torch.Tensor | None, torch.Tensor | None]) -> dict[str, QuantResult]:
    """One expert's gate/up/down on ``types`` (proj → ggml type): GPTQ where ``hessians`` (expert_hessians)
    has one, RTN elsewhere."""
    h_in, h_act = hessians
    res = {p: gptq_quantize(w, h_in, types[p]) if h_in is not None else quantize_rtn(w, types[p])
           for p, w in (("gate", g), ("up", u))}
    res["down"] = gptq_quantize(d, h_act, types["down"]) if h_act is not None else quantize_rtn(d, types["down"])
    return res


def quantize_layer_experts(gate_up: torch.Tensor, down: torch.Tensor, x: torch.Tensor, top_k_index: torch.Tensor,
                           types: list[dict[str, str]], act, gptq: bool = True, in_place: bool = False) -> dict:
    """GPTQ of one layer's experts (quantize_expert on each, RTN where expert_hessians says so).

    ``types[e]`` maps gate/up/down → ggml type. Returns {"packed": {(e, proj): uint8}, "dequant": ...,
    "tokens": per-expert token counts}. ``in_place``: write each expert's dequantised weights into ``gate_up`` /
    ``down`` as soon as it is done, and return no "dequant" (a layer's experts are then in memory once; an
    expert's GPTQ reads only its own weights, so the experts after it are unaffected).
    """
    ff = down.shape[2]
    packed, dequant, tokens = {}, {}, []
    for e, t in enumerate(types):
        xe = x[(top_k_index == e).any(dim=1)]
        tokens.append(int(xe.shape[0]))
        g, u, d = gate_up[e, :ff], gate_up[e, ff:], down[e]
        res = quantize_expert(g, u, d, t, expert_hessians(g, u, xe, act, gptq))
        for p in PROJS:
            packed[(e, p)] = np.asarray(res[p].packed)
        if in_place:
            with torch.no_grad():
                g.copy_(res["gate"].dequant)
                u.copy_(res["up"].dequant)
                d.copy_(res["down"].dequant)
        else:
            dequant.update({(e, p): res[p].dequant for p in PROJS})
    return {"packed": packed, "tokens": tokens, "types": types, **({} if in_place else {"dequant": dequant})}


def load_packed_experts(experts: torch.nn.Module, done: dict) -> None:
    """Write a finished layer's experts (``done``, a work-dir layer) into ``experts``, decoded from their packed
    bytes by libggml (bit-exact with what GPTQ computed)."""
    ff = experts.down_proj.shape[2]
    with torch.no_grad():
        for e, t in enumerate(done["types"]):
            for p, w in (("gate", experts.gate_up_proj[e, :ff]), ("up", experts.gate_up_proj[e, ff:]),
                         ("down", experts.down_proj[e])):
                w.copy_(torch.from_numpy(ggml_dequantize(done["packed"][(e, p)], t[p], tuple(w.shape))))
