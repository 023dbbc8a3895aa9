"""``mcsharp demo``: the main job end to end on the embedded fixture.

fixture → F16 reference → PMQ whole-file plan (4 bpw over the experts and every quantised tensor, types chosen
per expert and per tensor by the Fisher-metric MILP, sequential GPTQ) + OTP routers in one GGUF → held-out
evaluation against the reference, OTP on and off → one chat turn with OTP on.
"""

from __future__ import annotations

import json
from pathlib import Path

from .calib import calibration_token_ids
from .chat import open_chat_model, reply
from .compress import compress_checkpoint
from .convert import convert_checkpoint
from .evaluate import evaluate_gguf, reference_logits
from .fixture import cached_fixture
from .inspect_gguf import read_report
from .otp import prune_overrides
from .runtime import ensure_runtime
from .text import calibration_text, heldout_text

DEMO_BPW = 4.0  # over experts + every quantised tensor (--budget-scope file): ~118 MB, llama.cpp Q2_K's size
DEMO_OTP_FRAC = 0.75
DEMO_CALIB = (8, 512)  # sequences × tokens of pydoc calibration text (disjoint from the held-out text)


def run_demo(work_dir: Path, prompt: str, bpw: float = DEMO_BPW, otp_frac: float = DEMO_OTP_FRAC,
             log=print) -> dict:
    """Build, compress, evaluate and chat; prints (and returns) a JSON summary."""
    work_dir.mkdir(parents=True, exist_ok=True)
    info = ensure_runtime(log=log)
    log(f"[demo] runtime {info.lib_dir} (patch {info.patch_hash})")
    model_dir = cached_fixture(log=log)
    ref = work_dir / "fixture-f16.gguf"
    if not ref.exists():
        log("[demo] converting the fixture to F16 (reference)")
        convert_checkpoint(model_dir, ref, outtype="f16")
    out = work_dir / f"fixture-pmq{bpw:g}-file-otp.gguf"
    log(f"[demo] PMQ whole-file plan at {bpw:g} bpw (mixed experts, GPTQ) + OTP at executed fraction {otp_frac} "
        f"→ {out}")
    ids = calibration_token_ids(model_dir, calibration_text(120_000), *DEMO_CALIB)
    res = compress_checkpoint(model_dir, out, ids, bpw=bpw, mode="mixed", scope="file", outtype="q8_0", gptq=True,
                              otp_target_frac=otp_frac, log=log)
    rep = read_report(out)
    log(f"[demo] {out}: {rep.file_bytes / 1e6:.1f} MB, experts {rep.classes['experts'].bpw:.3f} bpw "
        f"(plan {res.plan.achieved_bpw:.3f}), other planned tensors "
        f"{8 * res.plan.dense_bytes / res.plan.dense_weights:.3f} bpw")
    log("[demo] evaluating on held-out text against the F16 reference (OTP on, then off)")
    text = heldout_text()
    base = reference_logits(ref, text)
    ev_on = evaluate_gguf(out, text, base_logits=base)
    ev_off = evaluate_gguf(out, text, base_logits=base, kv_overrides=prune_overrides(otp="off"))
    llm = open_chat_model(out)
    answer = reply(llm, [{"role": "user", "content": prompt}], max_tokens=64)
    summary = {"model": str(out), "file_mb": rep.file_bytes / 1e6, "expert_bpw": rep.classes["experts"].bpw,
               "planned_bpw": 8 * (res.plan.expert_bytes + res.plan.dense_bytes)
               / (res.plan.expert_weights + res.plan.dense_weights),
               "eval_otp_on": ev_on.to_json(), "eval_otp_off": ev_off.to_json(),
               "prompt": prompt, "reply": answer}
    print(json.dumps(summary, indent=2))
    return summary
