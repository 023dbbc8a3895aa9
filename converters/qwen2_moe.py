"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B; our fixture): softmax router, shared expert with sigmoid gate."""

from .base import MoeArchitecture

ARCH = MoeArchitecture(
    name="qwen2moe", hf_archs=("Qwen2MoeForCausalLM",), llama_arch="qwen2moe",
    moe_block="mlp", router="gate", experts="experts", shared_expert="shared_expert",
)
