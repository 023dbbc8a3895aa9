"""What an MoE architecture adapter declares."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MoeArchitecture:
    """Where the MoE parts of one HF architecture live and how its router normalises.

    Module paths are relative to a decoder layer (``model.layers[i]``).
    """

    name: str
    hf_archs: tuple[str, ...]
    llama_arch: str  # llama.cpp LLM_ARCH name
    moe_block: str  # e.g. "mlp" or "block_sparse_moe"
    router: str  # linear producing expert logits, relative to the MoE block
    experts: str  # expert container, relative to the MoE block
    shared_expert: str | None = None  # relative to the MoE block
    scoring: str = "softmax"  # "softmax" | "sigmoid"
    norm_topk_config: str | None = "norm_topk_prob"  # config key; None = always renormalise
    first_moe_layer_config: str | None = None  # config key of the first MoE layer (dense before it)
