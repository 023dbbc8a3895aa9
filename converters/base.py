"""What an MoE architecture adapter declares."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MoeArchitecture:
    """Where the MoE parts of one HF architecture live and how its router normalises.

    Module paths are relative to a decoder layer (``model.layers[i]``) of the transformers (v5) model, whose
    MoE blocks all expose ``gate(x) -> (logits, top_k_weights, top_k_index)`` and fused
    ``experts(x, top_k_index, top_k_weights)``.
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
    # How the checkpoint (safetensors) names the MoE block and each expert's projections.
    checkpoint_moe_block: str = "mlp"
    checkpoint_expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")

    def layer_state_dict(self, tensors: dict, layer: int, n_expert: int) -> dict:
        """Checkpoint tensors of decoder layer ``layer`` renamed/stacked to the transformers module's keys.

        ``tensors`` maps full checkpoint names to tensors (or lazy getters returning tensors). Experts are
        stacked into the fused ``experts.gate_up_proj`` (E, 2·ff, d) and ``experts.down_proj`` (E, d, ff).
        """
        prefix = f"model.layers.{layer}."
        ck_block = f"{self.checkpoint_moe_block}."

        def get(k: str) -> torch.Tensor:
            return tensors[k]() if callable(tensors[k]) else tensors[k]

        out: dict = {}
        expert_keys = f"{ck_block}experts."
        for key in tensors:
            if not key.startswith(prefix):
                continue
            local = key[len(prefix):]
            if local.startswith(expert_keys):
                continue
            if local.startswith(ck_block):
                local = f"{self.moe_block}." + local[len(ck_block):]
            out[local] = get(key)
        g, u, d = self.checkpoint_expert_names
        first = f"{prefix}{expert_keys}0.{g}.weight"
        if first in tensors:  # a dense layer (e.g. DeepSeek's first_k_dense_replace) has no experts
            # filled one expert at a time: a layer's experts are in memory once, not once per list and stack
            g0, d0 = get(first), get(f"{prefix}{expert_keys}0.{d}.weight")
            gate_up = torch.empty((n_expert, 2 * g0.shape[0], g0.shape[1]), dtype=g0.dtype, device=g0.device)
            down = torch.empty((n_expert, *d0.shape), dtype=d0.dtype, device=d0.device)
            for e in range(n_expert):
                base = f"{prefix}{expert_keys}{e}."
                gate_up[e, :g0.shape[0]] = get(base + f"{g}.weight")
                gate_up[e, g0.shape[0]:] = get(base + f"{u}.weight")
                down[e] = get(base + f"{d}.weight")
            out[f"{self.moe_block}.experts.gate_up_proj"] = gate_up
            out[f"{self.moe_block}.experts.down_proj"] = down
        return out
