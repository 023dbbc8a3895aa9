"""Qwen3-MoE: softmax router, optional top-k renormalisation, no shared expert."""

from .base import MoeArchitecture

ARCH = MoeArchitecture(
    name="qwen3moe", hf_archs=("Qwen3MoeForCausalLM",), llama_arch="qwen3moe",
    moe_block="mlp", router="gate", experts="experts",
)
