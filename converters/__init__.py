"""One module per supported MoE architecture: where its MoE pieces live and how its router scores.

Each module defines ``ARCH`` (a :class:`mcsharp_gguf.converters.base.MoeArchitecture`); the registry
below maps HF ``architectures`` names to them.
"""

from __future__ import annotations

from . import deepseek_v2, mixtral, olmoe, qwen2_moe, qwen3_moe
from .base import MoeArchitecture

_MODULES = (qwen2_moe, mixtral, qwen3_moe, olmoe, deepseek_v2)
REGISTRY: dict[str, MoeArchitecture] = {name: m.ARCH for m in _MODULES for name in m.ARCH.hf_archs}


def supported_architectures() -> list[str]:
    """HF architecture names with an MoE adapter."""
    return sorted(REGISTRY)


def get_architecture(hf_arch: str) -> MoeArchitecture | None:
    """The adapter for ``hf_arch``, or None when we have none."""
    return REGISTRY.get(hf_arch)
