"""One layer's router and the runtime's keep rule: logits = W2 · gelu(W1 · x + b1) + b2, keep slot j iff its logit
is above the threshold (slot 0 always); the block-output error of a keep mask, the executed fraction, and the logit
shift that hits a target fraction."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .capture import OtpLayerData


class OtpRouter(torch.nn.Module):
    """logits = W2 · gelu(W1 · x + b1) + b2: one keep-logit per top-k slot (the runtime's formula)."""

    def __init__(self, d: int, hidden: int, k: int):
        super().__init__()
        self.fc1 = torch.nn.Linear(d, hidden)
        self.fc2 = torch.nn.Linear(hidden, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def pruned_weights(w: torch.Tensor, keep: torch.Tensor, renorm: bool) -> torch.Tensor:
    """Routing weights after dropping slots (keep 0/1, slot 0 kept), renormalised as the runtime does."""
    kept = w * keep
    if renorm:
        kept = kept * (w.sum(-1, keepdim=True) / kept.sum(-1, keepdim=True).clamp_min(1e-12))
    return kept


def mask_error(data: OtpLayerData, keep: torch.Tensor, rows: torch.Tensor | slice = slice(None)) -> torch.Tensor:
    """||y_masked − y_full||² / ||y_full||² over the tokens ``rows`` for the keep mask (T', k)."""
    w = data.weights[rows]
    delta = pruned_weights(w, keep, data.renorm) - w
    num = torch.einsum("ti,tij,tj->", delta, data.gram[rows], delta)
    return num / data.ref_sq[rows].sum().clamp_min(1e-30)


def hard_keep(logits: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """The runtime's rule: keep slot j iff logit_j > threshold; slot 0 always."""
    keep = (logits > threshold).float()
    keep[:, 0] = 1.0
    return keep


@dataclass
class TrainedRouter:
    """One layer's router and how it did on the calibration tokens."""

    layer: int
    state: dict[str, torch.Tensor]
    frac: float  # executed fraction of top-k slots at threshold 0
    err: float  # normalised block-output error at threshold 0

    def module(self) -> OtpRouter:
        w1, w2 = self.state["fc1.weight"], self.state["fc2.weight"]
        r = OtpRouter(w1.shape[1], w1.shape[0], w2.shape[0])
        r.load_state_dict(self.state)
        return r


ARRAY_KEYS = {"w1": "fc1.weight", "b1": "fc1.bias", "w2": "fc2.weight", "b2": "fc2.bias"}  # export → module


def layer_arrays(state: dict[str, torch.Tensor], b2_shift: float = 0.0) -> dict[str, np.ndarray]:
    """A router's exported F32 arrays w1, b1, w2, b2 from its module state, with ``b2_shift`` folded into b2."""
    out = {k: state[key].detach().numpy().astype(np.float32) for k, key in ARRAY_KEYS.items()}
    out["b2"] = (state["fc2.bias"].detach() + b2_shift).numpy().astype(np.float32)
    return out


def _router_from_arrays(lay: dict[str, np.ndarray]) -> OtpRouter:
    r = OtpRouter(lay["w1"].shape[1], lay["w1"].shape[0], lay["w2"].shape[0])
    r.load_state_dict({ARRAY_KEYS[k]: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in lay.items()})
    return r


def router_logits(routers: list[TrainedRouter], data: list[OtpLayerData]) -> list[torch.Tensor]:
    """Calibration keep-logits of every layer's router."""
    with torch.no_grad():
        return [r.module().to(dat.x.device)(dat.x) for r, dat in zip(routers, data, strict=True)]


def executed_frac(logits: list[torch.Tensor], shift: float = 0.0) -> float:
    """Mean executed fraction over layers and tokens when ``shift`` is added to every keep-logit."""
    return float(np.mean([hard_keep(lg + shift).mean().item() for lg in logits]))


def shift_for_frac(logits: list[torch.Tensor], target: float) -> float:
    """The logit shift whose executed fraction is closest to ``target`` (bisection; fraction rises with it)."""
    lo, hi = -50.0, 50.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if executed_frac(logits, mid) < target:
            lo = mid
        else:
            hi = mid
    return lo if abs(executed_frac(logits, lo) - target) <= abs(executed_frac(logits, hi) - target) else hi


def layer_logits(lay: dict[str, np.ndarray], x: torch.Tensor) -> torch.Tensor:
    """Keep-logits of one exported layer router (arrays w1, b1, w2, b2) on inputs x (T, d)."""
    w = {k: torch.from_numpy(np.asarray(v, dtype=np.float32)).to(x.device) for k, v in lay.items()}
    return F.gelu(x @ w["w1"].T + w["b1"]) @ w["w2"].T + w["b2"]
