"""OLMoE: softmax router, 64 experts top-8, no shared expert."""

from .base import MoeArchitecture

ARCH = MoeArchitecture(
    name="olmoe", hf_archs=("OlmoeForCausalLM",), llama_arch="olmoe",
    moe_block="mlp", router="gate", experts="experts",
)
