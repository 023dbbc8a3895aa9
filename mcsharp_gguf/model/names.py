"""Every checkpoint and GGUF tensor name MC# relies on: llama.cpp's checkpoint → GGUF name map, the patterns by
which each stage picks GGUF tensors, and the class of a tensor by its name. No torch here."""

from __future__ import annotations

import re

from ..llama_src import import_gguf

MIN_ROWS = 32  # smaller matrices (e.g. a 1-row shared-expert gate) stay at --outtype

# GGUF names as the converter writes them: the routed experts (one tensor per layer and projection), the router,
# and the non-expert linears a quant.dense.DenseTypes may quantise (dense_class)
EXPS_RE = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight$")
ROUTER_RE = re.compile(r"^blk\.(\d+)\.ffn_gate_inp\.weight$")
ATTN_RE = re.compile(r"^blk\.\d+\.attn_[a-z_]+\.weight$")
FFN_RE = re.compile(r"^blk\.\d+\.ffn_(gate|up|down)(_shexp)?\.weight$")

# any routed-expert tensor of a finished file (mixed-plan groups .gG and fused gate_up included), OTP tensors
EXPERT_RE = re.compile(r"\.ffn_(gate|up|down|gate_up)_exps(\.g\d+)?\.weight$")
OTP_RE = re.compile(r"\.ffn_otp_")


def gguf_name_map(arch, n_layer: int):
    """llama.cpp's checkpoint → GGUF tensor-name map for an adapter's architecture."""
    gguf = import_gguf()
    arch_enum = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch.llama_arch]
    return gguf.get_tensor_name_map(arch_enum, n_layer)


def checkpoint_name(arch, layer: int, local: str) -> str:
    """The checkpoint key of a layer-local module weight (the MoE block may be named differently there)."""
    if local.startswith(arch.moe_block + "."):
        local = arch.checkpoint_moe_block + local[len(arch.moe_block):]
    return f"model.layers.{layer}.{local}.weight"


def dense_class(name: str, shape: tuple[int, ...]) -> str | None:
    """attn / ffn / embd / output for GGUF tensors outside the routed experts that a DenseTypes may quantise."""
    if name == "token_embd.weight":
        return "embd"
    if name == "output.weight":
        return "output"
    if len(shape) != 2 or shape[0] < MIN_ROWS:
        return None
    if ATTN_RE.match(name):
        return "attn"
    if FFN_RE.match(name):
        return "ffn"
    return None


def tensor_class(name: str) -> str:
    """experts / attention / otp / other, by GGUF tensor name."""
    if EXPERT_RE.search(name):
        return "experts"
    if OTP_RE.search(name):
        return "otp"
    if ".attn_" in name:
        return "attention"
    return "other"
