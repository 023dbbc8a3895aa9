"""eps: the error of quantising one expert (at the MoE block's output, and in the output-KL Fisher metric) or one
non-expert linear; fold A of the calibration tokens, for cross-validating a plan.

Costs follow MC: c(e, r) = phi_e^alpha · w_e^beta · eps(e, r), with eps the MoE-block output error when only expert e
is quantised with recipe r (see plan.costs).
"""

from __future__ import annotations

import torch

from ..ggml.packing import quantize_rtn
from ..ggml.types import storable_type
from ..quant.gptq import HessianAccumulator, gptq_quantize
from .candidates import Recipe


def expert_output_delta(gate_up: torch.Tensor, down: torch.Tensor, x: torch.Tensor, weights: torch.Tensor,
                        recipe: Recipe, act=torch.nn.functional.silu,
                        quantised: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                        base: torch.Tensor | None = None) -> torch.Tensor:
    """ΔZ (tokens, d): the change of the MoE-block output on the tokens routed to this expert when only it is
    quantised (RTN on ``recipe``, or the dequantised gate, up, down given as ``quantised``).
    ``base``: the unquantised expert's output on ``x`` (unweighted), when the caller has it already.

    ``gate_up`` (2·ff, d), ``down`` (d, ff); ``x`` the inputs routed to the expert, ``weights`` their routing
    weights. Other experts and the router are untouched, so ΔZ is this expert's weighted output change.
    """
    ff = down.shape[1]
    if quantised is None:
        quantised = (quantize_rtn(gate_up[:ff], recipe.gate).dequant, quantize_rtn(gate_up[ff:], recipe.up).dequant,
                     quantize_rtn(down, recipe.down).dequant)
    gq, uq, dq = quantised

    def ffn(g, u, d):
        return (act(x @ g.T) * (x @ u.T)) @ d.T

    if base is None:
        base = ffn(gate_up[:ff], gate_up[ff:], down)
    return (ffn(gq, uq, dq) - base) * weights[:, None]


def expert_output_error(gate_up: torch.Tensor, down: torch.Tensor, x: torch.Tensor, weights: torch.Tensor,
                        recipe: Recipe, act=torch.nn.functional.silu) -> float:
    """eps: ||ΔZ||_F of the MoE-block output when only this expert is quantised (see expert_output_delta)."""
    if x.shape[0] == 0:
        return 0.0
    return float(expert_output_delta(gate_up, down, x, weights, recipe, act).norm())


def fisher_error(delta: torch.Tensor, grad: torch.Tensor) -> float:
    """sqrt(Σ_t (g_t · ΔZ_t)²): ΔZ's size in the metric of the output KL (``grad`` = ∇ log p(ŷ) per token at
    the layer's output, see sensitivity.py); its square estimates 2·ΔKL summed over the tokens."""
    return float((delta * grad).sum(1).square().sum().sqrt())


def fisher_error_split(per_token: torch.Tensor, in_a: torch.Tensor) -> tuple[float, float]:
    """(all, fold A) of sqrt(Σ_t ``per_token``): a Fisher error over every token and over the tokens of fold A
    (``in_a``, a bool per token); fold B's is the difference of the squares."""
    return float(per_token.sum().sqrt()), float(per_token[in_a].sum().sqrt())


def fold_a_mask(n_tokens: int, seq_len: int) -> torch.Tensor:
    """Calibration fold A: the tokens of the even-numbered sequences (tokens are sequence-major)."""
    return (torch.arange(n_tokens) // seq_len) % 2 == 0


def _dense_fisher(w: torch.Tensor, x: torch.Tensor, g: torch.Tensor, types: tuple[str, ...], in_a: torch.Tensor,
                  gptq: bool = False, scale: float = 1.0) -> tuple[dict[str, float], dict[str, float]]:
    """Fisher error of a linear ``w`` (out, in) per storable type, over all tokens and over fold A's (``in_a``):
    x (tokens, in) its inputs, g (tokens, out) the gradient of log p(ŷ) at its output; the output change of
    quantising it is x·ΔWᵀ. ``gptq``: ΔW of GPTQ on x's Hessian (as convert quantises the tensor), else of RTN.
    ``scale``: (all tokens / tapped tokens)^½, so that eps² is summed over as many tokens as the experts' (the
    taps see only the first sequences)."""
    h = None
    if gptq and x.shape[0] > 0:
        h = HessianAccumulator(w.shape[1], device=x.device)
        h.add(x)
    out, out_a = {}, {}
    for t in dict.fromkeys(storable_type(t, w.shape[1]) for t in types):
        dw = (gptq_quantize(w, h.H, t, packed=False) if h is not None else quantize_rtn(w, t)).dequant - w
        per_token = ((g @ dw) * x).sum(1).square()  # (gᵀΔW)·x == gᵀ(ΔW x), cheaper
        out[t], out_a[t] = (scale * e for e in fisher_error_split(per_token, in_a))
    return out, out_a
