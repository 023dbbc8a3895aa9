"""The ``mcsharp`` command line (contract in DESIGN.md §8)."""

from __future__ import annotations

import errno
import json
import math
import os
import sys
from pathlib import Path

import click

from .errors import McsharpError
from .native.build import NativeBuildError


def _log(msg: str) -> None:
    click.echo(msg, err=True)


def _json(obj) -> str:
    """``--json`` output: always valid JSON, an undefined number (NaN, ±Inf) written as null."""
    def finite(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: finite(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [finite(v) for v in x]
        return x

    return json.dumps(finite(obj), indent=2, allow_nan=False)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mcsharp-gguf")
def cli() -> None:
    """MC# for Mixture-of-Experts GGUF: PMQ mixed-precision GPTQ + OTP expert pruning."""


@cli.command()
@click.option("--backend", type=click.Choice(["cpu", "cuda", "metal"]), default="cpu", show_default=True)
@click.option("--tools", is_flag=True, help="Also build llama-quantize, llama-imatrix, llama-perplexity.")
@click.option("--tests", is_flag=True, help="Also build llama.cpp's test-backend-ops.")
@click.option("--cuda-arch", default="native", show_default=True, help="CMAKE_CUDA_ARCHITECTURES for --backend cuda.")
@click.option("--json", "as_json", is_flag=True, help="Print the build info as JSON on stdout.")
def setup(backend: str, tools: bool, tests: bool, cuda_arch: str, as_json: bool) -> None:
    """Build (or find cached) the patched llama.cpp runtime and install the pinned gguf-py."""
    from .native import build as nb
    from .setup_env import ensure_pinned_gguf

    ensure_pinned_gguf(log=_log)
    info = nb.build(nb.BuildOptions(backend=backend, tools=tools, tests=tests, cuda_arch=cuda_arch), log=_log)
    if as_json:
        click.echo(_json(info.to_json()))
        return
    click.echo(f"library dir : {info.lib_dir}")
    click.echo(f"llama.cpp   : {info.llama_cpp_commit} (llama-cpp-python {nb.LLAMA_CPP_PYTHON_VERSION})")
    click.echo(f"patch hash  : {info.patch_hash} ({', '.join(info.patches) or 'no patches'})")
    click.echo(f"backends    : {', '.join(info.backends)}")
    click.echo(f"tools       : {', '.join(info.tools) or '-'}")
    click.echo(f"build       : {'compiled now' if info.built_now else 'cached, nothing compiled'}")


@cli.command()
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--kind", type=click.Choice(["sliced", "specialised"]), default="sliced", show_default=True,
              help="sliced: the dense FFN split into balanced experts behind a flat router (about 1 min); "
                   "specialised: those experts and router trained layer by layer to the dense FFN, uneven load "
                   "(about 15 min on two cores)")
def fixture(out_dir: Path, kind: str) -> None:
    """Build an embedded real MoE fixture (SmolLM2-135M upcycled to Qwen2-MoE) into OUT_DIR."""
    from .dev.fixture import build_fixture

    build_fixture(out_dir, kind=kind, log=_log)
    click.echo(str(out_dir))


def _calibration_ids(model_dir: Path, calib: str, calib_seqs: int | None, calib_len: int):
    from .model.calibration import calibration_ids
    from .recipe import Recipe

    return calibration_ids(Recipe(preset="F16", calib=calib, calib_seqs=calib_seqs, calib_len=calib_len), model_dir)


def _calib_file(calib: str) -> Path | None:
    """The calibration text file an option names (None for the built-in text and 'self')."""
    return None if calib in ("builtin", "self") else Path(calib)


def _option_group(options: list):
    """A decorator applying ``options`` (click options) in their listed order."""
    def apply(fn):
        for opt in reversed(options):
            fn = opt(fn)
        return fn

    return apply


def _show_advanced(ctx: click.Context, param, value: bool) -> None:
    # eager: un-hide the experiment knobs and print the full help
    if not value or ctx.resilient_parsing:
        return
    for p in ctx.command.params:
        p.hidden = False
    click.echo(ctx.get_help())
    ctx.exit()


def _advanced(*args, **kw):
    """An option kept out of ``--help`` (listed by ``--help-advanced``): experiment knobs, not user settings."""
    return click.option(*args, hidden=True, **kw)


_FORCE = click.option("--force", is_flag=True, help="Replace OUT if it exists.")
_DEVICE = click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda[:N]",
                       help="Where importance, GPTQ and OTP training run: auto takes the first CUDA GPU torch sees, "
                            "else the CPU.")


_RAY = click.option("--ray", "ray_address", default=None, metavar="auto|HOST:PORT",
                    help="Run each layer's expert work (importance, GPTQ) as Ray tasks (pip install "
                         "'mcsharp-gguf[ray]'): auto = the cluster running here or at RAY_ADDRESS, else a new one "
                         "on this machine; HOST:PORT = a cluster's head node. Same file as without.")


def _executor(address: str | None):
    """The executor of --ray (executors.connect), connected (and logged) before any long work."""
    from .executors import connect

    ex = connect(address)
    if ex.remote:
        _log(f"[ray] {ex.describe()}")
    return ex


def _device(name: str):
    """The torch device of --device, resolved (and logged) before any long work."""
    from .devices import describe_device, resolve_device

    dev = resolve_device(name)
    _log(f"[device] {describe_device(dev)}" + (" (auto)" if name == "auto" else ""))
    return dev
_CALIB = click.option("--calib", default="builtin", show_default=True,
                      help="Calibration text file; 'builtin' (Python's own documentation, never the text `eval` "
                           "scores); 'self' samples text from the model (through a temporary Q8_0 GGUF).")
_calib_size_options = [
    _advanced("--calib-seqs", type=click.IntRange(min=1), default=None,
              help="Calibration sequences [default: scaled to the model, 2 × hidden size × experts / top-k tokens "
                   "in 8-32 sequences]."),
    _advanced("--calib-len", type=click.IntRange(min=2), default=512, show_default=True,
              help="Tokens per calibration sequence."),
]
calib_options = _option_group([_CALIB, *_calib_size_options])


def _parse_size(ctx, param, value):
    from .recipe import parse_size

    if value is None:
        return None
    try:
        return parse_size(value)
    except McsharpError as e:
        raise click.BadParameter(str(e)) from None


def _parse_slowdown(ctx, param, value):
    """--max-slowdown: a fraction, 'none' (bytes only) or unset (the Recipe's default)."""
    if value is None:
        return "default"
    if value.strip().lower() == "none":
        return None
    try:
        return float(value)
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected a fraction such as 0.05, or none") from None


_budget_options = [
    click.option("--preset", default=None, metavar="NAME",
                 help="Spend the bytes llama-quantize's preset NAME would on this model (Q4_K_M, Q3_K_M, Q2_K, "
                      "IQ2_XS, ...; computed from the tensor shapes). F16 / BF16 / F32: plain conversion. "
                      "Default (no budget): Q3_K_M."),
    click.option("--size", "size_bytes", default=None, callback=_parse_size, metavar="SIZE",
                 help="Target file size, e.g. 12GB, 800MB."),
    click.option("--bpw", type=float, default=None, help="Bits per planned weight (experts and every typed tensor)."),
    click.option("--mode", type=click.Choice(["stock", "mixed"]), default="stock", show_default=True,
                 help="stock: stock ggml types, loads in any llama.cpp; mixed: experts of one tensor may differ "
                      "(needs this project's patched runtime)."),
]
_plan_knobs = [
    _advanced("--max-slowdown", default=None, callback=_parse_slowdown, metavar="FRACTION|none",
              help="Mixed mode: how much slower than the stock plan of the same bytes the plan may run, in decode "
                   "and in prefill, by the CPU kernel costs in mcsharp_gguf.pmq.speed (default 0.02); none: "
                   "price bytes only (e.g. for a GPU, whose kernels those costs do not describe)."),
    _advanced("--budget-scope", type=click.Choice(["file", "global", "layer"]), default="file", show_default=True,
              help="file: one budget over experts and non-expert tensors, all types planned; global/layer: the "
                   "experts only (non-expert tensors at --outtype or the --*-type options)."),
    _advanced("--cost", "cost_metric", type=click.Choice(["fisher", "mc"]), default="fisher", show_default=True,
              help="Plan cost: estimated output KL (Fisher metric) or MC's phi·w^1.5·eps² (file scope: fisher)."),
    _advanced("--flip-probe", default=None, metavar="TYPE",
              help="Scale each layer's Fisher costs by its measured real/estimated KL at TYPE (docs/planner.md)."),
    _advanced("--eps", "eps_source", type=click.Choice(["gptq", "rtn"]), default="gptq", show_default=True,
              help="Measure each candidate type's error with GPTQ, as convert quantises, or the RTN proxy."),
]
plan_options = _option_group([*_budget_options, *_plan_knobs])


def _otp_knobs(hidden: bool) -> list:
    return [
        click.option("--otp-target-frac", default=0.75, show_default=True, hidden=hidden,
                     help="OTP: fraction of the top-k expert slots to execute (on the calibration tokens)."),
        click.option("--otp-hidden", default=32, show_default=True, hidden=hidden,
                     help="OTP: hidden width of each layer's router."),
        click.option("--otp-refine-steps", default=0, show_default=True, hidden=hidden,
                     help="OTP: then refine all routers end to end on the logits' KL (loads the whole model in "
                          "fp32)."),
    ]


otp_train_options = _option_group(_otp_knobs(hidden=False))


def _check_otp_options(target_frac: float, hidden: int) -> None:
    # checked before the (long) calibration, so a typo fails at once
    from .recipe import Recipe

    Recipe(preset="F16", otp=True, otp_target_frac=target_frac, otp_hidden=hidden)


def _train_routers(model_dir: Path, ids, target_frac: float, hidden: int, refine_steps: int = 0, device="cpu"):
    from .otp.train import train_otp

    return train_otp(model_dir, ids, target_frac=target_frac, hidden=hidden, refine_steps=refine_steps, log=_log,
                     device=device)


def _parse_tensor_types(ctx, param, values) -> tuple[tuple[str, str], ...]:
    import re

    from .ggml.types import QUANT_TYPES

    out = []
    for v in values:
        pattern, _, t = v.rpartition("=")
        if not pattern or t.upper() not in QUANT_TYPES:
            raise click.BadParameter(f"{v!r}: expected PATTERN=TYPE with TYPE one of {', '.join(QUANT_TYPES)}")
        try:
            re.compile(pattern)
        except re.error as e:
            raise click.BadParameter(f"{v!r}: {pattern!r} is not a regular expression ({e})") from None
        out.append((pattern, t.upper()))
    return tuple(out)


def _dense_type_option(flag: str, what: str):
    return _advanced(flag, default=None, metavar="TYPE", callback=lambda ctx, p, v: v.upper() if v else v,
                     help=f"Expert-only scopes: ggml type for {what} (default: --outtype).")


_convert_knobs = [
    _advanced("--gptq/--rtn", "use_gptq", default=True, show_default=True,
              help="GPTQ on calibration Hessians (sequential, layer-streamed) or plain round-to-nearest."),
    _advanced("--outtype", type=click.Choice(["f32", "f16", "bf16", "q8_0"]), default="f16", show_default=True,
              help="Type of the tensors no plan covers (norms stay F32, as the converter writes them)."),
    _dense_type_option("--attn-type", "attention linears (GPTQ)"),
    _dense_type_option("--ffn-type", "shared-expert / dense-FFN linears (GPTQ)"),
    _dense_type_option("--embd-type", "the token embedding (RTN)"),
    _dense_type_option("--output-type", "the LM head (GPTQ on the final-norm input)"),
    _advanced("--tensor-type", "tensor_types", multiple=True, callback=_parse_tensor_types, metavar="PATTERN=TYPE",
              help="Expert-only scopes: type for non-expert GGUF tensors whose name matches the regex (first match "
                   "wins; repeatable, as llama-quantize's --tensor-type)."),
    _advanced("-v", "--verbose", is_flag=True),
]


def _recipe(kw: dict, otp: bool = False):
    """The Recipe the convert / plan options describe (checked now: before any calibration)."""
    from .recipe import Recipe

    dense = {c: kw.pop(f"{c}_type", None) for c in ("attn", "ffn", "embd", "output")}
    return Recipe(preset=kw.get("preset"), size_bytes=kw.get("size_bytes"), bpw=kw.get("bpw"), mode=kw["mode"],
                  scope=kw["budget_scope"], metric=kw["cost_metric"], eps_source=kw["eps_source"],
                  flip_probe=kw.get("flip_probe"), outtype=kw.get("outtype", "f16"), gptq=kw.get("use_gptq", True),
                  calib=kw["calib"], calib_seqs=kw["calib_seqs"], calib_len=kw["calib_len"], otp=otp,
                  otp_target_frac=kw.get("otp_target_frac", 0.75), otp_hidden=kw.get("otp_hidden", 32),
                  otp_refine_steps=kw.get("otp_refine_steps", 0),
                  dense_types={c: t for c, t in dense.items() if t}, tensor_types=kw.get("tensor_types", ()),
                  **({} if kw.get("max_slowdown", "default") == "default" else {"max_slowdown": kw["max_slowdown"]}))


_HELP_ADVANCED = click.option("--help-advanced", is_flag=True, expose_value=False, is_eager=True,
                              callback=_show_advanced, help="Also list the experiment knobs, and exit.")


@cli.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out", required=True, type=click.Path(path_type=Path), help="Output GGUF file.")
@_FORCE
@plan_options
@click.option("--otp/--no-otp", default=False, show_default=True,
              help="Also train OTP expert-pruning routers into the file (the patched runtime runs fewer experts).")
@calib_options
@click.option("--plan", "plan_file", type=click.Path(path_type=Path), default=None,
              help="Use this plan.json (from `mcsharp plan`) instead of planning now.")
@_advanced("--work-dir", type=click.Path(path_type=Path), default=None,
           help="Keeps finished layers so an interrupted conversion resumes (default: OUT.work, removed after "
                "success).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary (file, size, bpw, estimated KL, each "
                                                       "stage's time and peak memory) on stdout.")
@_DEVICE
@_RAY
@_advanced("--allow-nonfinite", is_flag=True,  # (a rare escape hatch: the NaN/Inf error names it)
           help="With --preset F16/BF16/F32: copy NaN/Inf weights as they are, with a warning (refused otherwise).")
@_option_group(_convert_knobs)
@_option_group(_otp_knobs(hidden=True))
@_HELP_ADVANCED
def convert(model_dir: Path, out: Path, force: bool, otp: bool, plan_file: Path | None, work_dir: Path | None,
            device: str, ray_address: str | None, allow_nonfinite: bool, as_json: bool, verbose: bool, **kw) -> None:
    """Convert a Hugging Face MoE checkpoint to a compressed GGUF: PMQ mixed-precision GPTQ at a llama-quantize
    preset's size (default Q3_K_M), a file size or a bpw; --otp adds OTP routers."""
    from .gguf.convert import check_output_path
    from .pipeline import run
    from .pmq.plan import BitPlan
    from .stages import StageClock

    recipe = _recipe(kw, otp=otp)
    check_output_path(out, (model_dir, _calib_file(recipe.calib), plan_file), force)
    plan = None
    if plan_file is not None:
        if not plan_file.is_file():
            raise McsharpError(f"--plan {plan_file} does not exist; write one with `mcsharp plan`")
        try:
            plan = BitPlan.from_json(plan_file.read_text())
        except McsharpError as e:
            raise McsharpError(f"--plan {plan_file}: {e}") from None
    clock = StageClock(log=_log)
    executor = _executor(ray_address)
    try:
        res = run(recipe, model_dir, out, plan=plan, work_dir=work_dir, device=device, executor=executor, log=_log,
                  clock=clock, verbose=verbose, allow_nonfinite=allow_nonfinite)
    finally:
        executor.close()
    peak = clock.peak_mb()
    _log(f"[convert] {res.summary()}, peak RSS {peak:.0f} MB")
    if as_json:
        click.echo(_json({
            "out": str(out), "file_bytes": out.stat().st_size, "wall_s": res.wall_s, "peak_rss_mb": peak,
            "recipe": json.loads(recipe.to_json()),
            "budget": None if res.budget is None else {"source": res.budget.source, "bpw": res.budget.bpw,
                                                       "planned_bytes": res.budget.planned_bytes},
            "planned_bpw": None if res.plan is None else res.plan.planned_bpw,
            "est_kl": res.est_kl, "stages": clock.to_json()}))
    else:
        click.echo(str(out))


@cli.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out", required=True, type=click.Path(path_type=Path),
              help="plan.json to write (plan.png beside it).")
@_FORCE
@plan_options
@calib_options
@_DEVICE
@_RAY
@_HELP_ADVANCED
def plan(model_dir: Path, out: Path, force: bool, device: str, ray_address: str | None, **kw) -> None:
    """Measure expert importance and solve the per-expert bit plan (JSON + table + PNG heatmap)."""
    from .gguf.convert import atomic_output, check_output_path
    from .model.calibration import calibration_ids
    from .model.checkpoint import check_finite_weights, validate_model_dir
    from .pipeline import model_budget, plan_model
    from .pmq.report import format_plan_table, plot_plan
    from .stages import StageClock

    recipe = _recipe(kw)
    if recipe.lossless:
        raise McsharpError(f"--preset {recipe.budget_preset} is a plain conversion; a plan needs a quantised budget")
    validate_model_dir(model_dir)
    check_output_path(out, (model_dir, _calib_file(recipe.calib)), force)
    check_finite_weights(model_dir, lossless=False)
    budget = model_budget(recipe, model_dir, _log)
    dev = _device(device)
    executor = _executor(ray_address)
    clock = StageClock(log=_log)
    try:
        with clock.stage("calibration"):
            ids = calibration_ids(recipe, model_dir)
        _, result = plan_model(recipe, model_dir, ids, budget, log=_log, clock=clock,
                               device=executor.layer_device(dev, device == "auto"), executor=executor)
    finally:
        executor.close()
    with atomic_output(out) as tmp:
        tmp.write_text(result.to_json())
    plot_plan(result, out.with_suffix(".png"))
    click.echo(format_plan_table(result))
    click.echo(f"wrote {out} and {out.with_suffix('.png')}")


@cli.command()
@click.argument("gguf_file", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True)
@click.option("--no-tensors", is_flag=True, help="Only the summary, not every tensor.")
def inspect(gguf_file: Path, as_json: bool, no_tensors: bool) -> None:
    """Tensor types and sizes, true bits per weight for experts / attention / other."""
    from .gguf.inspect import format_report, read_report

    rep = read_report(gguf_file)
    click.echo(_json(rep.to_json()) if as_json else format_report(rep, not no_tensors))


_prune_options = [
    click.option("--otp", default=None, metavar="on|off|threshold=T",
                 help="OTP routers in the file: on (default when present), off, or on with keep-logit threshold T."),
    click.option("--top-k", type=int, default=None, help="Static pruning: execute only the first K top-k slots."),
    click.option("--prune-mu", type=float, default=None,
                 help="Threshold rule: execute slot j iff its weight >= MU x the top-1 weight."),
]


prune_options = _option_group(_prune_options)


@cli.command(name="eval")
@click.argument("gguf_file", type=click.Path(path_type=Path))
@click.option("--text", "text_file", type=click.Path(path_type=Path), default=None,
              help="Evaluation text (UTF-8). Default: the built-in held-out pydoc text.")
@click.option("--base", type=click.Path(path_type=Path), default=None, help="Reference GGUF for KLD / top-1.")
@click.option("--ctx", type=click.IntRange(min=2), default=512, show_default=True, help="Chunk length in tokens.")
@click.option("--max-tokens", type=click.IntRange(min=0), default=4096, show_default=True,
              help="Evaluate at most this many tokens (0 = all).")
@prune_options
@click.option("--json", "as_json", is_flag=True)
def eval_cmd(gguf_file: Path, text_file: Path | None, base: Path | None, ctx: int, max_tokens: int,
             otp: str | None, top_k: int | None, prune_mu: float | None, as_json: bool) -> None:
    """Perplexity, and with --base: mean / p99 KLD and top-1 agreement (and the executed expert-slot
    fraction when a pruning rule is active).

    \f
    (Nine parameters: click passes one per option.)
    """
    from .runtime.evaluate import evaluate_gguf
    from .runtime.prune import prune_overrides
    from .text import heldout_text, read_text_file

    kv = prune_overrides(otp, top_k, prune_mu)
    text = read_text_file(text_file) if text_file is not None else heldout_text()
    if base is not None and not base.is_file():
        raise McsharpError(f"--base {base}: no such GGUF file")
    res = evaluate_gguf(gguf_file, text, base_path=base, ctx=ctx, max_tokens=max_tokens or None,
                        kv_overrides=kv or None, progress=not as_json)
    if as_json:
        click.echo(_json(res.to_json()))
    else:
        for k, v in res.to_json().items():
            click.echo(f"{k:<20} {v}")


@cli.command()
@click.argument("gguf_file", type=click.Path(path_type=Path))
@click.option("--prompt-tokens", type=click.IntRange(min=1), default=256, show_default=True,
              help="Prompt length for prefill speed.")
@click.option("--tokens", "decode_tokens", type=click.IntRange(min=1), default=64, show_default=True,
              help="Tokens decoded one at a time.")
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True,
              help="Interleaved rounds; the best is reported.")
@prune_options
@click.option("--compare/--no-compare", default=True, show_default=True,
              help="Also time the unpruned file (all pruning off) in the same run and report the ratio.")
@click.option("--json", "as_json", is_flag=True)
def bench(gguf_file: Path, prompt_tokens: int, decode_tokens: int, rounds: int, otp: str | None,
          top_k: int | None, prune_mu: float | None, compare: bool, as_json: bool) -> None:
    """Prefill / decode tokens per second (and executed expert-slot fraction), side by side with unpruned.

    \f
    (Nine parameters: click passes one per option.)
    """
    from .runtime.bench import bench_gguf
    from .runtime.prune import prune_overrides

    kv = prune_overrides(otp, top_k, prune_mu)
    configs = {"run": kv}
    if compare:
        configs["unpruned"] = {"mcsharp.moe.prune_mode": 0}
    res = {r.name: r.to_json() for r in bench_gguf(gguf_file, configs, prompt_tokens, decode_tokens, rounds,
                                                   progress=not as_json)}
    if compare:
        res["ratio_vs_unpruned"] = {
            "prefill": res["run"]["prefill_tok_s"] / res["unpruned"]["prefill_tok_s"],
            "decode": res["run"]["decode_tok_s"] / res["unpruned"]["decode_tok_s"]}
    if as_json:
        click.echo(_json(res))
        return
    for name, r in res.items():
        click.echo(f"{name:<18} " + "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                              for k, v in r.items() if k != "name"))


@cli.group()
def otp() -> None:
    """OTP expert-pruning routers: train them, add them to a GGUF, strip them from one."""


@otp.command(name="train")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out", required=True, type=click.Path(path_type=Path), help="Router file (.npz).")
@_FORCE
@otp_train_options
@calib_options
@_DEVICE
def otp_train(model_dir: Path, out: Path, force: bool, otp_target_frac: float, otp_hidden: int,
              otp_refine_steps: int, calib: str, calib_seqs: int | None, calib_len: int, device: str) -> None:
    """Train the routers of every MoE layer of MODEL_DIR into a router file for `mcsharp otp add`.

    \f
    (Ten parameters: click passes one per argument and option.)
    """
    from .gguf.convert import atomic_output, check_output_path
    from .model.checkpoint import check_finite_weights, validate_model_dir

    _check_otp_options(otp_target_frac, otp_hidden)
    validate_model_dir(model_dir)
    out = check_output_path(out, (model_dir, _calib_file(calib)), force)
    check_finite_weights(model_dir, lossless=False)
    dev = _device(device)
    routers = _train_routers(model_dir, _calibration_ids(model_dir, calib, calib_seqs, calib_len),
                             otp_target_frac, otp_hidden, otp_refine_steps, dev)
    with atomic_output(out) as tmp:
        routers.save(tmp)
    click.echo(str(out))


@otp.command(name="add")
@click.argument("gguf_file", type=click.Path(path_type=Path))
@click.argument("source", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out", required=True, type=click.Path(path_type=Path), help="Output GGUF file.")
@_FORCE
@otp_train_options
@calib_options
@_DEVICE
def otp_add(gguf_file: Path, source: Path, out: Path, force: bool, otp_target_frac: float, otp_hidden: int,
            otp_refine_steps: int, calib: str, calib_seqs: int | None, calib_len: int, device: str) -> None:
    """Add OTP routers to GGUF_FILE: SOURCE is the HF checkpoint it came from (routers are trained now)
    or a router file from `mcsharp otp train`.

    \f
    (Eleven parameters: click passes one per argument and option.)
    """
    from .gguf.convert import check_output_path
    from .gguf.edit import open_gguf
    from .gguf.table import read_header
    from .model.checkpoint import check_finite_weights, validate_model_dir
    from .otp.io import OtpRouters, add_otp_to_gguf, gguf_moe_shape, model_moe_shape
    from .runtime.llama import check_header

    open_gguf(gguf_file)  # the whole file readable, before training routers for it
    header = read_header(gguf_file)
    check_header(gguf_file, header)  # hyperparameters llama.cpp could not load the result with
    arch, n_embd, k, _ = gguf_moe_shape(header)
    check_output_path(out, (gguf_file, source, _calib_file(calib)), force)
    if source.is_dir():
        _check_otp_options(otp_target_frac, otp_hidden)
        validate_model_dir(source)
        if model_moe_shape(source) != (arch, n_embd, k):  # refuse before the long calibration
            src_arch, d, src_k = model_moe_shape(source)
            raise McsharpError(f"{source} is a {src_arch or 'non-MoE'} model with hidden size {d} and top-{src_k} "
                               f"routing, {gguf_file} is {arch} with {n_embd} and top-{k}; pass the checkpoint "
                               "this GGUF was converted from")
        check_finite_weights(source, lossless=False)
        dev = _device(device)
        routers = _train_routers(source, _calibration_ids(source, calib, calib_seqs, calib_len), otp_target_frac,
                                 otp_hidden, otp_refine_steps, dev)
    elif source.is_file():
        routers = OtpRouters.load(source)
    else:
        raise McsharpError(f"{source} does not exist; pass the HF checkpoint directory or a router file")
    add_otp_to_gguf(gguf_file, routers, out)  # (checks that the routers fit first)
    click.echo(str(out))


@otp.command(name="strip")
@click.argument("gguf_file", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out", required=True, type=click.Path(path_type=Path), help="Output GGUF file.")
@_FORCE
def otp_strip(gguf_file: Path, out: Path, force: bool) -> None:
    """Copy GGUF_FILE without its OTP routers (then any llama.cpp loads it)."""
    from .gguf.convert import check_output_path
    from .otp.io import strip_otp

    check_output_path(out, (gguf_file,), force)
    strip_otp(gguf_file, out)
    click.echo(str(out))


@cli.command()
@click.argument("gguf_file", type=click.Path(path_type=Path))
@click.option("--prompt", default=None, help="One non-interactive turn: print the reply and exit.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=128, show_default=True)
def chat(gguf_file: Path, prompt: str | None, max_tokens: int) -> None:
    """Chat with a GGUF using the model's chat template."""
    from .runtime.chat import interactive, open_chat_model, reply

    llm = open_chat_model(gguf_file)
    if prompt is not None:
        click.echo(reply(llm, [{"role": "user", "content": prompt}], max_tokens=max_tokens))
    else:
        interactive(llm, max_tokens=max_tokens)


_LOOPBACK = ("127.0.0.1", "localhost", "::1")


@cli.command()
@click.argument("gguf_file", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but loopback exposes the model to the network.")
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True)
@click.option("--alias", default=None, help="Model name clients ask for. Default: the file name.")
@click.option("--ctx", type=click.IntRange(min=16), default=4096, show_default=True,
              help="Context length in tokens (prompt + reply).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads. Default: all cores.")
@click.option("--api-key", default=None, envvar="MCSHARP_API_KEY", show_envvar=True,
              help="Require this bearer token on every request.")
@prune_options
def serve(gguf_file: Path, host: str, port: int, alias: str | None, ctx: int, threads: int | None,
          api_key: str | None, otp: str | None, top_k: int | None, prune_mu: float | None) -> None:
    """Serve GGUF_FILE with an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models;
    the executed expert-slot fraction on /metrics). Needs `pip install 'mcsharp-gguf[server]'`.

    \f
    (Ten parameters: click passes one per argument and option.)
    """
    from .runtime.prune import prune_overrides
    from .runtime.serve import ServeOptions, run_server

    kv = prune_overrides(otp, top_k, prune_mu)
    if host not in _LOOPBACK:
        _log(f"warning: --host {host} serves the model to every machine that can reach this one"
             + ("" if api_key else "; consider --api-key"))
    opts = ServeOptions(model=gguf_file, alias=alias or gguf_file.name, n_ctx=ctx,
                        n_threads=threads, kv_overrides=kv, api_key=api_key)
    selected, executed = run_server(opts, host=host, port=port, log=_log)
    if selected:
        _log(f"stopped; executed {executed / selected:.1%} of {selected} expert slots")
    else:
        _log("stopped")


@cli.command()
@click.option("--work-dir", type=click.Path(path_type=Path), default=Path("out/demo"), show_default=True)
@click.option("--prompt", default="What is a Python list? Answer in one sentence.", show_default=True)
@click.option("--fixture", "kind", type=click.Choice(["sliced", "specialised"]), default="specialised",
              show_default=True, help="which embedded fixture (mcsharp fixture --kind), built and cached on first use")
def demo(work_dir: Path, prompt: str, kind: str) -> None:
    """The main job on an embedded fixture: build → convert → evaluate → one chat turn."""
    from .demo import run_demo

    run_demo(work_dir, prompt, fixture=kind, log=_log)


def _crash_log(exc: BaseException) -> Path:
    """Write ``exc``'s traceback (and the command line) to a new file under the cache's crash/ folder."""
    import time
    import traceback

    from .native.build import cache_root

    folder = cache_root() / "crash"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    path.write_text(f"mcsharp {' '.join(sys.argv[1:])}\n\n"
                    + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    return path


def main() -> None:
    """The console entry point: exit 0 on success, 2 with one ``error:`` line for bad input or a failed build,
    130 on Ctrl-C, and 3 with one line and the path of a traceback log for anything unexpected (a bug)."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except (McsharpError, NativeBuildError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except OSError as e:
        if e.errno == errno.ENOSPC:  # no partial output is left: every output is written to a temp name first
            click.echo(f"error: no space left on the device while writing {e.filename or 'a file'}; free some and "
                       "rerun (a conversion's work dir is kept, so it resumes)", err=True)
            sys.exit(2)
        _internal_error(e)
    except Exception as e:  # noqa: BLE001 — a bug: one line here, the traceback in a file for the report
        _internal_error(e)


def _internal_error(exc: BaseException) -> None:
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    try:
        where = f"traceback in {_crash_log(exc)}"
    except OSError:
        where = "the traceback could not be saved"
    click.echo(f"error: internal: {type(exc).__name__}: {first} ({where}; please report it)", err=True)
    sys.exit(3)


if __name__ == "__main__":
    main()
