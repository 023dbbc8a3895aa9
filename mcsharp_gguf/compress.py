"""The compressed conversion, stage by stage: plan (PMQ importance + MILP) → GPTQ the planned experts →
train OTP routers → write one GGUF. ``mcsharp convert --bpw/--plan/--otp`` and ``mcsharp demo`` both run it.

Every stage takes the previous stage's plain output (calibration ids, a :class:`~.pmq.BitPlan`, a work dir of
packed layers, :class:`~.otp.OtpRouters`); nothing reaches back.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .convert import convert_checkpoint
from .errors import McsharpError
from .otp import OtpRouters
from .pmq import EPS_SOURCE, METRIC, SCOPE, BitPlan
from .quantize import DenseTypes
from .stages import StageClock


def _arch_and_layers(model_dir):
    """(architecture adapter, decoder layer count) of a checkpoint, for GGUF tensor names."""
    import json

    from .converters import get_architecture

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    return get_architecture(cfg["architectures"][0]), int(cfg.get("text_config", cfg)["num_hidden_layers"])


def check_disk(model_dir, out: Path, outtype: str, bpw: float | None, planning: bool, gptq: bool, work_dir: Path,
               n_tokens: int) -> None:
    """convert.check_free_disk for a compressed conversion: the importance pass (``planning``) spills every
    layer's input states (n_layer × ``n_tokens`` × d float32) into ``work_dir``; ``gptq`` keeps its packed
    layers there."""
    import json

    from .convert import check_free_disk

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    spill = int(cfg["num_hidden_layers"]) * n_tokens * int(cfg["hidden_size"]) * 4 if planning else 0
    check_free_disk(model_dir, out, outtype, bpw, work_dir, gptq, spill)


@dataclass
class CompressResult:
    """What a compressed conversion wrote and decided."""

    out: Path
    plan: BitPlan | None
    routers: OtpRouters | None


def _chain_kv(*adders):
    """One ``extra_kv`` callable running every non-None ``adders`` in order (None if there are none)."""
    adders = [a for a in adders if a is not None]
    if not adders:
        return None

    def add(writer) -> None:
        for a in adders:
            a(writer)

    return add


def _dense_metadata(dense: DenseTypes):
    def add(writer) -> None:
        writer.add_string("mcsharp.pmq.dense_types", dense.to_json())

    return add


def compress_checkpoint(model_dir: str | Path, out: str | Path, ids: torch.Tensor | None, *,
                        bpw: float | None = None, plan: BitPlan | None = None, mode: str = "mixed",
                        scope: str = SCOPE, metric: str = METRIC, flip_probe: str | None = None,
                        eps_source: str = EPS_SOURCE, outtype: str = "f16",
                        dense: DenseTypes | None = None, gptq: bool = True, work_dir: Path | None = None,
                        otp_target_frac: float | None = None, otp_hidden: int = 32, otp_refine_steps: int = 0,
                        log: Callable[[str], None] = print, verbose: bool = False,
                        clock: StageClock | None = None) -> CompressResult:
    """Convert ``model_dir`` to ``out`` with PMQ experts (``bpw`` budget or a given ``plan``) and/or OTP routers
    (``otp_target_frac`` set).

    ``ids`` (calibration token ids, (n_seq, seq_len)) is needed to plan, for GPTQ and for OTP. The importance pass
    and GPTQ keep every finished layer in ``work_dir`` (default ``OUT.work``, removed after success unless given)
    so an interrupted run resumes with the same bytes. Non-expert tensors get ``outtype``, except the
    classes ``dense`` names (GPTQ'd in the same layer stream, RTN without ``gptq``); with ``scope="file"`` the
    plan chooses every non-expert tensor's type too (``bpw`` is then over all of them and the experts).
    ``clock`` records each stage's wall time and peak memory (importance, plan, gptq, otp, write).
    """
    from .otp import otp_metadata, train_otp
    from .pack import chain_hooks, dense_hook, plan_hook, plan_metadata, rtn_quantiser
    from .pmq import format_plan_table, plan_checkpoint
    from .quantize import WorkDirQuantiser, quantize_experts

    out = Path(out)
    clock = clock or StageClock(log=log)
    work = work_dir or out.with_name(out.name + ".work")
    check_disk(model_dir, out, outtype, bpw if plan is None else plan.target_bpw, plan is None and bpw is not None,
               gptq, work, 0 if ids is None else ids.numel())
    dense = dense if dense is not None and dense.any() else None
    if dense is not None and (scope == "file" or (plan is not None and plan.tensor_types)):
        raise McsharpError("a whole-file plan (--budget-scope file) chooses every non-expert type itself; drop "
                           "--attn-type, --ffn-type, --embd-type, --output-type and --tensor-type")
    if plan is None and bpw is not None:
        log(f"[pmq] measuring importance on {ids.numel()} calibration tokens")
        plan = plan_checkpoint(model_dir, ids, bpw, mode=mode, scope=scope, metric=metric, flip_probe=flip_probe,
                               eps_source=eps_source, clock=clock, work_dir=work)
    if plan is not None and plan.tensor_types:
        dense = DenseTypes.exact(plan.tensor_types)
    hook = None
    if plan is not None:
        log(format_plan_table(plan))
        quantiser = rtn_quantiser
        served = None
        if gptq:
            what = (f" and of {len(plan.tensor_types)} non-expert tensors" if plan.tensor_types
                    else f" and of {dense.to_json()}" if dense else "")
            log(f"[pmq] sequential GPTQ of the planned experts{what}")
            with clock.stage("gptq"):
                served = quantize_experts(model_dir, plan, ids, work, dense=dense)
            quantiser = WorkDirQuantiser(served)
        hook = plan_hook(plan, quantiser)
        if dense is not None:
            stream_info = _arch_and_layers(model_dir)
            hook = chain_hooks(hook, dense_hook(dense, served, *stream_info, log=log))
    elif dense is not None:
        raise McsharpError("non-expert quantisation types need a PMQ plan (--bpw or --plan)")
    routers = None
    if otp_target_frac is not None:
        log(f"[otp] training routers for executed fraction {otp_target_frac}")
        with clock.stage("otp"):
            routers = train_otp(model_dir, ids, target_frac=otp_target_frac, hidden=otp_hidden,
                                refine_steps=otp_refine_steps, log=log)
    with clock.stage("gguf write"):
        convert_checkpoint(model_dir, out, outtype=outtype, hook=hook, verbose=verbose,
                           extra_kv=_chain_kv(plan_metadata(plan) if plan is not None else None,
                                              _dense_metadata(dense) if dense is not None else None,
                                              otp_metadata(routers) if routers is not None else None))
    if work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return CompressResult(out, plan, routers)
