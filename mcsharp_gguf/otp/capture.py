"""OTP's training data: a layer-streamed forward of the full-precision checkpoint that keeps, per MoE layer, the MoE
input ``x``, the routing weights of the k slots and the Gram matrix of the slots' expert outputs (so the
block-output error of any keep mask is a k×k quadratic form, no d-sized tensors)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from ..model.stream import LayerStream, capture_moe

T = TypeVar("T")


@dataclass
class OtpLayerData:
    """One MoE layer's calibration data for router training (slots in descending routing score)."""

    layer: int
    x: torch.Tensor  # (T, d) MoE block input, after the FFN norm
    weights: torch.Tensor  # (T, k) routing weights as the model applies them
    gram: torch.Tensor  # (T, k, k) y_i·y_j of the slots' (unweighted) expert outputs
    ref_sq: torch.Tensor  # (T,) ||full block output||²
    renorm: bool  # the model renormalises the kept top-k weights

    @property
    def top_k(self) -> int:
        return int(self.weights.shape[1])


def renormalises(arch, config) -> bool:
    """Whether ``arch`` renormalises its top-k weights (then the runtime renormalises over kept slots)."""
    if arch.norm_topk_config is None:
        return True
    return bool(getattr(config, arch.norm_topk_config, False))


def slot_outputs(experts: torch.nn.Module, x: torch.Tensor, top_k_index: torch.Tensor) -> torch.Tensor:
    """(T, k, d) unweighted output of the expert in each slot, from the fused expert weights."""
    out = x.new_zeros(x.shape[0], top_k_index.shape[1], x.shape[1])
    ff = experts.down_proj.shape[2]
    with torch.no_grad():
        for e in torch.unique(top_k_index).tolist():
            tok, slot = torch.where(top_k_index == e)
            xe = x[tok]
            gu = xe @ experts.gate_up_proj[e].float().T  # (one expert widened at a time when stored bf16)
            out[tok, slot] = (experts.act_fn(gu[:, :ff]) * gu[:, ff:]) @ experts.down_proj[e].float().T
    return out


def capture_otp_data(model_dir, token_ids: torch.Tensor, progress: bool = True, device: torch.device | str = "cpu",
                     consume: Callable[[OtpLayerData], T] | None = None) -> list[T]:
    """Layer-streamed forward of the full-precision checkpoint on ``device``; the training data of every MoE
    layer (kept there), or with ``consume``, what it makes of each layer's data as soon as that is captured (the
    data itself is not kept). On the CPU a layer's experts stay as stored (widened one at a time)."""
    stream = LayerStream.open(model_dir, device, experts_as_stored=torch.device(device).type == "cpu")
    renorm = renormalises(stream.arch, stream.config)
    out = []

    def step(i: int, layer, run, hidden: torch.Tensor) -> torch.Tensor:
        block = stream.moe_block(layer)
        if block is None:
            return run(hidden)
        cap, hidden = capture_moe(block, stream.arch, stream.n_expert, run, hidden)
        # the runtime orders slots by descending score (ggml_argsort_top_k); some routers return them unsorted
        order = torch.argsort(cap.top_k_weights, dim=1, descending=True, stable=True)
        idx, w = cap.top_k_index.gather(1, order), cap.top_k_weights.gather(1, order)
        y = slot_outputs(getattr(block, stream.arch.experts), cap.x, idx)
        data = OtpLayerData(layer=i, x=cap.x.float(), weights=w.float(), gram=y @ y.transpose(1, 2),
                            ref_sq=(cap.y.float() ** 2).sum(-1), renorm=renorm)
        del cap, y  # (not held while consume works)
        out.append(consume(data) if consume is not None else data)
        return hidden

    stream.sweep(token_ids, step, "otp: capture", progress)
    return out
