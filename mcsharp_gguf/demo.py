"""``mcsharp demo``: the main job end to end on an embedded fixture (the specialised one unless told otherwise:
its uneven expert load is what real MoEs have and what PMQ and OTP exploit; docs/fixture.md).

fixture → F16 reference → the default Recipe with OTP (whole-file PMQ plan at llama-quantize Q3_K_M's bytes,
stock types chosen per expert and per tensor by the Fisher-metric MILP, sequential GPTQ, OTP routers) through
``pipeline.run``, as ``mcsharp convert FIXTURE -o OUT --otp`` would → held-out evaluation against the reference,
OTP on and off → one chat turn with OTP on.
"""

from __future__ import annotations

import json
from pathlib import Path

from .dev.fixture import cached_fixture
from .gguf.convert import convert_checkpoint
from .gguf.inspect import read_report
from .pipeline import run
from .recipe import Recipe
from .runtime.chat import open_chat_model, reply
from .runtime.evaluate import evaluate_gguf, reference_logits
from .runtime.llama import ensure_runtime
from .runtime.prune import prune_overrides
from .text import heldout_text

DEMO_RECIPE = Recipe(otp=True)  # the defaults: what `mcsharp convert MODEL -o OUT --otp` runs


def run_demo(work_dir: Path, prompt: str, recipe: Recipe = DEMO_RECIPE, fixture: str = "specialised",
             log=print) -> dict:
    """Build the ``fixture`` kind (dev.fixture), compress, evaluate and chat; prints (and returns) a JSON
    summary."""
    work_dir.mkdir(parents=True, exist_ok=True)
    info = ensure_runtime(log=log)
    log(f"[demo] runtime {info.lib_dir} (patch {info.patch_hash})")
    model_dir = cached_fixture(fixture, log=log)
    stem = "fixture" if fixture == "sliced" else f"fixture-{fixture}"  # one work dir holds either kind's files
    ref = work_dir / f"{stem}-f16.gguf"
    if not ref.exists():
        log("[demo] converting the fixture to F16 (reference)")
        convert_checkpoint(model_dir, ref, outtype="f16")
    out = work_dir / f"{stem}-{recipe.budget_preset or 'plan'}-{recipe.mode}{'-otp' if recipe.otp else ''}.gguf"
    log(f"[demo] {recipe.to_json()} → {out}")
    res = run(recipe, model_dir, out, log=log)
    log(f"[demo] {res.summary()}")
    rep = read_report(out)
    log("[demo] evaluating on held-out text against the F16 reference (OTP on, then off)")
    text = heldout_text()
    base = reference_logits(ref, text)
    ev_on = evaluate_gguf(out, text, base_logits=base)
    ev_off = evaluate_gguf(out, text, base_logits=base, kv_overrides=prune_overrides(otp="off"))
    llm = open_chat_model(out)
    answer = reply(llm, [{"role": "user", "content": prompt}], max_tokens=64)
    summary = {"fixture": fixture, "model": str(out), "file_mb": rep.file_bytes / 1e6,
               "expert_bpw": rep.classes["experts"].bpw, "planned_bpw": res.plan.planned_bpw, "est_kl": res.est_kl,
               "eval_otp_on": ev_on.to_json(), "eval_otp_off": ev_off.to_json(),
               "prompt": prompt, "reply": answer}
    print(json.dumps(summary, indent=2))
    return summary
