"""``mcsharp demo``: the main job end to end on the embedded fixture."""

from __future__ import annotations

import json
from pathlib import Path

from .chat import open_chat_model, reply
from .convert import convert_checkpoint
from .evaluate import evaluate_gguf
from .fixture import cached_fixture
from .inspect_gguf import read_report
from .runtime import ensure_runtime
from .text import heldout_text


def run_demo(work_dir: Path, prompt: str, log=print) -> dict:
    """fixture → F16 reference + converted file → eval against the reference → one chat turn."""
    work_dir.mkdir(parents=True, exist_ok=True)
    info = ensure_runtime(log=log)
    log(f"[demo] runtime {info.lib_dir} (patch {info.patch_hash})")
    model_dir = cached_fixture(log=log)
    ref = work_dir / "fixture-f16.gguf"
    if not ref.exists():
        log("[demo] converting the fixture to F16 (reference)")
        convert_checkpoint(model_dir, ref, outtype="f16")
    out = work_dir / "fixture-q8_0.gguf"
    log("[demo] converting the fixture to Q8_0")
    convert_checkpoint(model_dir, out, outtype="q8_0")
    rep = read_report(out)
    log(f"[demo] {out}: {rep.file_bytes / 1e6:.1f} MB, experts {rep.classes['experts'].bpw:.3f} bpw")
    log("[demo] evaluating on held-out text against the F16 reference")
    res = evaluate_gguf(out, heldout_text(), base_path=ref)
    llm = open_chat_model(out)
    answer = reply(llm, [{"role": "user", "content": prompt}], max_tokens=64)
    summary = {"model": str(out), "file_mb": rep.file_bytes / 1e6, "eval": res.to_json(),
               "prompt": prompt, "reply": answer}
    print(json.dumps(summary, indent=2))
    return summary
