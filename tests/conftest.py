"""Shared test fixtures: tiny random MoE checkpoints, their GGUFs, and the real MoE fixture."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_model(tiny_root):
    """Factory: arch → path of a tiny random checkpoint (made once per session)."""
    from mcsharp_gguf.tiny_models import make_tiny_moe

    def make(arch: str, **kw) -> Path:
        suffix = "-".join(f"{k}{v}" for k, v in sorted(kw.items()))
        return make_tiny_moe(arch, tiny_root / f"{arch}{'-' + suffix if suffix else ''}", **kw)

    return make


@pytest.fixture(scope="session")
def tiny_gguf(tiny_model, tiny_root):
    """Factory: (arch, outtype) → converted GGUF path (made once per session)."""
    from mcsharp_gguf.convert import convert_checkpoint

    def make(arch: str, outtype: str = "f32") -> Path:
        out = tiny_root / f"{arch}-{outtype}.gguf"
        if not out.exists():
            convert_checkpoint(tiny_model(arch), out, outtype=outtype)
        return out

    return make


@pytest.fixture(scope="session")
def moe_fixture() -> Path:
    """The real MoE fixture (built into the cache on first use, ~2.5 min)."""
    from mcsharp_gguf.fixture import cached_fixture

    return cached_fixture(log=lambda *_: None)

