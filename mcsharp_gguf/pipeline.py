"""The one conversion pipeline every entry point runs: ``run(recipe, model_dir, out)``.

budget (from the converter's tensor list) → calibration token ids → Importance (PMQ measurement, streamed layer
by layer, resumable) → BitPlan (MILP) → quantised layers (sequential GPTQ into the work dir) → OTP routers →
one GGUF carrying the plan and the recipe. Each stage takes the previous stage's plain result; a caller may
hand in a measured ``importance`` or a finished ``plan`` to skip the stages before it (benchmarks, ``--plan``).
"""

from __future__ import annotations

import errno
import json
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .converters import get_architecture
from .devices import describe_device, resolve_device
from .errors import McsharpError
from .executors import InProcess, RayCluster
from .gguf.convert import check_free_disk, check_output_path, convert_checkpoint, gguf_inventory
from .gguf.pack import chain_hooks, dense_hook, plan_hook, plan_metadata, rtn_quantiser
from .model.calibration import calibration_ids, calibration_seqs
from .model.checkpoint import check_finite_weights, checkpoint_weights, model_identity, validate_model_dir
from .otp.io import OtpRouters, otp_metadata
from .otp.train import train_otp
from .pmq.budget import Budget, header_bytes, resolve_budget
from .pmq.candidates import ANCHOR_TYPE, STOCK_SAMPLE
from .pmq.importance import ModelImportance
from .pmq.measure import measure_importance
from .pmq.plan import BitPlan, plan_cost, plan_metric, solve_bit_plan
from .pmq.report import format_plan_table
from .quant.dense import DenseTypes
from .quant.sequential import WorkDirQuantiser, quantize_experts
from .recipe import Recipe
from .stages import StageClock


@dataclass
class Conversion:
    """What ``run`` wrote and decided."""

    out: Path
    recipe: Recipe
    budget: Budget | None = None
    importance: ModelImportance | None = None
    plan: BitPlan | None = None
    routers: OtpRouters | None = None
    est_kl: float | None = None  # the plan's output KL per token as its importance estimates it
    n_tokens: int = 0
    wall_s: float = 0.0

    def summary(self) -> str:
        """The final one-line summary: file size, bpw, estimated KL, wall time."""
        size = self.out.stat().st_size
        parts = [f"{self.out}: {size / 1e6:.1f} MB"]
        if self.plan is not None:
            source = self.budget.source if self.budget else "given plan"
            parts.append(f"{self.plan.planned_bpw:.3f} bpw planned ({source})")
        if self.est_kl is not None:
            parts.append(f"est. KL {self.est_kl:.4f}/token")
        if self.routers is not None:
            parts.append("OTP routers")
        return ", ".join(parts) + f", {self.wall_s:.0f} s"


def _llama_arch(model_dir: Path) -> tuple[object, int]:
    """(architecture adapter, decoder layer count) of a checkpoint."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    return get_architecture(cfg["architectures"][0]), int(cfg.get("text_config", cfg)["num_hidden_layers"])


def check_disk(model_dir, out: Path, recipe: Recipe, bpw: float | None, planning: bool, work_dir: Path) -> None:
    """gguf.convert.check_free_disk for a conversion: the importance pass (``planning``) spills every layer's input
    states (n_layer × tokens × d float32) into ``work_dir``; GPTQ keeps its packed layers there; ``--calib self``
    a Q8_0 copy of the model while it samples."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    n_tokens = calibration_seqs(recipe, model_dir) * recipe.calib_len
    spill = int(cfg["num_hidden_layers"]) * n_tokens * int(cfg["hidden_size"]) * 4 if planning else 0
    if recipe.calib == "self":  # sampled from a temporary Q8_0 file of the model (34 bytes a block of 32)
        spill += checkpoint_weights(model_dir) * 34 // 32
    check_free_disk(model_dir, out, recipe.outtype, bpw, work_dir, recipe.gptq and bpw is not None, spill)


def measure(recipe: Recipe, model_dir, ids: torch.Tensor, work_dir: Path | None = None,
            device: torch.device | str = "cpu", executor: InProcess | RayCluster | None = None) -> ModelImportance:
    """The Importance stage: PMQ's per-(expert, type) and per-tensor errors on ``ids`` (resumable in
    ``work_dir``), computed on ``device``. A stock plan prices a layer's experts together: every type is measured
    on a sample of them (STOCK_SAMPLE; a mixed plan measures all). Each expert's measurement runs on ``executor``
    (executors.connect; default: this process)."""
    return measure_importance(model_dir, ids, dense=recipe.scope == "file", flip_probe=recipe.flip_probe,
                              eps_source=recipe.eps_source, work_dir=work_dir,
                              expert_sample=STOCK_SAMPLE if recipe.mode == "stock" else None, device=device,
                              executor=executor)


def planned_weights(importance: ModelImportance, scope: str) -> int:
    """Weights a plan of ``scope`` types: every expert, and with a whole-file scope the measured tensors."""
    experts = sum(3 * lay.n_expert * lay.d_model * lay.d_ff for lay in importance.layers)
    return experts + (sum(t.rows * t.cols for t in importance.tensors) if scope == "file" else 0)


def solve(recipe: Recipe, importance: ModelImportance, budget: Budget, log: Callable[[str], None] = print
          ) -> BitPlan:
    """The BitPlan stage: the MILP over ``importance`` at ``budget``'s bytes."""
    weights = planned_weights(importance, recipe.scope)
    if weights != budget.planned_weights:  # the measured set is what the plan types; keep the bytes
        log(f"[plan] the importance covers {weights} weights, the tensor list {budget.planned_weights}; "
            f"spending the budget's {budget.planned_bytes} bytes on the measured ones")
    bpw = 8 * budget.planned_bytes / weights
    return solve_bit_plan(importance.layers, bpw, mode=recipe.mode, scope=recipe.scope, tensors=importance.tensors,
                          metric=plan_metric(recipe.scope, recipe.metric), max_slowdown=recipe.max_slowdown)


def plan_model(recipe: Recipe, model_dir, ids: torch.Tensor | None, budget: Budget,
               importance: ModelImportance | None = None, work_dir: Path | None = None,
               log: Callable[[str], None] = print, clock: StageClock | None = None,
               device: torch.device | str = "cpu", executor: InProcess | RayCluster | None = None
               ) -> tuple[ModelImportance, BitPlan]:
    """Importance (measured on ``ids`` on ``device`` unless given) → BitPlan at ``budget``: what ``mcsharp plan``
    runs and the first stages of ``run``."""
    clock = clock or StageClock(log=log)
    if importance is None:
        log(f"[pmq] measuring importance on {ids.numel()} calibration tokens")
        with clock.stage("importance"):
            importance = measure(recipe, model_dir, ids, work_dir, device, executor)
        sampled = [lay for lay in importance.layers if lay.sampled]
        if sampled:
            log(f"[pmq] {len(sampled[0].sampled)} of {sampled[0].n_expert} experts per layer measured at every "
                f"candidate type, the rest by RTN at {ANCHOR_TYPE} and predicted from it (a stock plan prices a "
                "layer's experts as a sum)")
    with clock.stage("plan (MILP)"):
        plan = solve(recipe, importance, budget, log=log)
    plan.model = model_identity(model_dir)
    return importance, plan


def model_budget(recipe: Recipe, model_dir: str | Path, log: Callable[[str], None] = print) -> Budget:
    """The recipe's budget for ``model_dir`` from the converter's tensor list (seconds; no weight read)."""
    arch, _ = _llama_arch(model_dir)
    budget = resolve_budget(recipe, gguf_inventory(model_dir, recipe.outtype), arch.llama_arch,
                            header_bytes(model_dir))
    log(f"[budget] {budget.source}: {budget.planned_bytes / 1e6:.1f} MB for {budget.planned_weights} planned "
        f"weights ({budget.bpw:.3f} bpw)")
    return budget


def estimated_kl(plan: BitPlan, importance: ModelImportance, n_tokens: int) -> float | None:
    """The plan's output KL per token as its importance estimates it (½ Σ eps_fisher² of every chosen
    (expert, type) and (tensor, type) over the calibration tokens); None outside the Fisher metric."""
    if plan.metric != "fisher" or not n_tokens:
        return None
    return 0.5 * plan_cost(plan, importance.layers, importance.tensors) / n_tokens


def _dense_types(recipe: Recipe, plan: BitPlan | None) -> DenseTypes | None:
    if plan is not None and plan.tensor_types:
        return DenseTypes.exact(plan.tensor_types)
    d = DenseTypes(tensor_types=recipe.tensor_types, **recipe.dense_types)  # Recipe.check: only beside a plan
    return d if d.any() else None


def quantise(model_dir, plan: BitPlan, dense: DenseTypes | None, ids: torch.Tensor | None, work: Path,
             log: Callable[[str], None] = print, device: torch.device | str = "cpu",
             executor: InProcess | RayCluster | None = None):
    """The quantisation stage: sequential GPTQ (on ``device``) of the planned experts (and ``dense`` tensors) into
    ``work``, or RTN when ``ids`` is None; returns the convert hook that writes them."""
    served = None
    quantiser = rtn_quantiser
    if ids is not None:
        what = (f" and of {len(plan.tensor_types)} non-expert tensors" if plan.tensor_types
                else f" and of {dense.to_json()}" if dense else "")
        log(f"[pmq] sequential GPTQ of the planned experts{what}")
        served = quantize_experts(model_dir, plan, ids, work, dense=dense, device=device, executor=executor)
        quantiser = WorkDirQuantiser(served)
    hook = plan_hook(plan, quantiser)
    if dense is not None:
        hook = chain_hooks(hook, dense_hook(dense, served, *_llama_arch(model_dir), log=log))
    return hook


def _metadata(recipe: Recipe, plan: BitPlan | None, dense: DenseTypes | None, routers: OtpRouters | None):
    """One ``extra_kv`` for convert_checkpoint: the recipe, and the plan / dense types / routers when present."""
    adders = [plan_metadata(plan) if plan is not None else None,
              otp_metadata(routers) if routers is not None else None]

    def add(writer) -> None:
        writer.add_string("mcsharp.recipe", recipe.to_json())
        if dense is not None:
            writer.add_string("mcsharp.pmq.dense_types", dense.to_json())
        for a in adders:
            if a is not None:
                a(writer)

    return add


@contextmanager
def _full_disk_resumable(work: Path) -> Iterator[None]:
    """A full disk at any stage (every file is written under a temporary name, removed on failure): one line
    naming the file and the work dir whose finished layers the rerun resumes from."""
    try:
        yield
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        kept = work.is_dir() and any(work.iterdir())
        then = (f"run the same command again: it resumes from the finished work kept in {work}" if kept
                else "run the same command again")
        raise McsharpError(f"no space left on the device while writing {e.filename or 'a file'}; free some space "
                           f"and {then}") from None


def run(recipe: Recipe, model_dir: str | Path, out: str | Path, *, plan: BitPlan | None = None,
        importance: ModelImportance | None = None, routers: OtpRouters | None = None, work_dir: Path | None = None,
        device: torch.device | str = "auto", executor: InProcess | RayCluster | None = None,
        log: Callable[[str], None] = print, clock: StageClock | None = None, verbose: bool = False,
        allow_nonfinite: bool = False) -> Conversion:
    """Convert ``model_dir`` to ``out`` as ``recipe`` says; every stage is timed on ``clock``.

    ``plan`` (e.g. from ``mcsharp plan``) or ``importance`` (a measured ModelImportance) skip the stages before
    them; ``routers`` (trained OTP routers, with ``recipe.otp``) skip the OTP training. ``work_dir`` (default
    ``OUT.work``, removed after success unless given) keeps every finished layer of the importance pass and of
    GPTQ, so an interrupted run resumes with the same bytes. Budget and disk are checked before any calibration.
    ``device`` (devices.resolve_device: auto, cpu, cuda[:N]) is where importance, GPTQ and OTP training run; a
    device that cannot be used fails here, before any work. ``executor`` (executors.connect) runs each expert's
    importance measurement and GPTQ: this process by default, or Ray tasks on a cluster (the same bytes). NaN/Inf
    weights are refused before any work; ``allow_nonfinite`` lets a lossless conversion copy them (a warning).

    (Thirteen parameters: what to convert and where, then keyword-only stage results to reuse, the device and
    executor, the log, clock and verbosity a caller brings, and the one input-acceptance switch.)
    """
    t0 = time.perf_counter()
    model_dir, out = Path(model_dir), Path(out)
    clock = clock or StageClock(log=log)
    auto, device = str(device) == "auto", resolve_device(str(device))
    if executor is not None:
        device = executor.layer_device(device, auto)
    if routers is not None and not recipe.otp:
        raise McsharpError("OTP routers were given to a recipe without otp")
    validate_model_dir(model_dir)
    check_output_path(out)
    if plan is not None and plan.model and plan.model != model_identity(model_dir):
        raise McsharpError(f"the plan was made for another model (config or tensor shapes differ from {model_dir}); "
                           "make one for this model with `mcsharp plan`")
    work = work_dir or out.with_name(out.name + ".work")
    if work.exists() and not work.is_dir():
        raise McsharpError(f"--work-dir {work} is a file; pass a directory (it keeps the finished layers)")
    lossless = plan is None and recipe.lossless
    if allow_nonfinite and not lossless:
        raise McsharpError("--allow-nonfinite applies to a lossless conversion only (--preset F16, BF16 or F32): "
                           "a compressed one needs finite weights")
    check_finite_weights(model_dir, lossless=lossless, allow=allow_nonfinite, log=log)
    res = Conversion(out=out, recipe=recipe, importance=importance, plan=plan)
    outtype = recipe.outtype
    if lossless:
        outtype = recipe.lossless_outtype
    elif plan is None:
        res.budget = model_budget(recipe, model_dir, log)
    planning = res.budget is not None and importance is None
    bpw = res.budget.bpw if res.budget is not None else plan.target_bpw if plan is not None else None
    check_disk(model_dir, out, recipe, bpw, planning, work)
    with _full_disk_resumable(work):
        ids = None
        if planning or (recipe.otp and routers is None) or (bpw is not None and recipe.gptq):
            with clock.stage("calibration"):
                ids = calibration_ids(recipe, model_dir, work)
            res.n_tokens = ids.numel()
            log(f"[calib] {ids.shape[0]} × {ids.shape[1]} calibration tokens ({recipe.calib}"
                + (", sequences scaled to the model's experts per token)" if recipe.calib_seqs is None else ")"))
        if ids is not None:
            log(f"[device] {describe_device(device)}" + (" (auto)" if auto else ""))
        if res.plan is None and res.budget is not None:
            res.importance, res.plan = plan_model(recipe, model_dir, ids, res.budget, importance, work, log, clock,
                                                  device, executor)
        dense = _dense_types(recipe, res.plan)
        hook = None
        if res.plan is not None:
            log(format_plan_table(res.plan))
            if res.importance is not None:
                res.est_kl = estimated_kl(res.plan, res.importance, res.n_tokens)
            with clock.stage("gptq" if recipe.gptq else "rtn"):
                hook = quantise(model_dir, res.plan, dense, ids if recipe.gptq else None, work, log=log, device=device,
                                executor=executor)
        res.routers = routers
        if recipe.otp and routers is None:
            log(f"[otp] training routers for executed fraction {recipe.otp_target_frac}")
            with clock.stage("otp"):
                res.routers = train_otp(model_dir, ids, target_frac=recipe.otp_target_frac, hidden=recipe.otp_hidden,
                                        refine_steps=recipe.otp_refine_steps, log=log, device=device)
        with clock.stage("gguf write"):
            convert_checkpoint(model_dir, out, outtype=outtype, hook=hook, verbose=verbose,
                               extra_kv=_metadata(recipe, res.plan, dense, res.routers))
    if work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    res.wall_s = time.perf_counter() - t0
    return res
