"""Mixtral: softmax over top-k logits (equivalent to renormalised top-k softmax), no shared expert."""

from .base import MoeArchitecture

ARCH = MoeArchitecture(
    name="mixtral", hf_archs=("MixtralForCausalLM",), llama_arch="llama",
    moe_block="mlp", router="gate", experts="experts", norm_topk_config=None,
    checkpoint_moe_block="block_sparse_moe", checkpoint_expert_names=("w1", "w3", "w2"),
)
