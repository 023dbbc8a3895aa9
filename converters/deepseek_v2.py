"""DeepSeek-V2 (and -Lite): softmax router with routed scaling, shared experts, dense first layers."""

from .base import MoeArchitecture

ARCH = MoeArchitecture(
    name="deepseek2", hf_archs=("DeepseekV2ForCausalLM",), llama_arch="deepseek2",
    moe_block="mlp", router="gate", experts="experts", shared_expert="shared_experts",
    norm_topk_config="norm_topk_prob", first_moe_layer_config="first_k_dense_replace",
)
