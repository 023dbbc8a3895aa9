"""The patched llama.cpp runtime, through llama-cpp-python.

``LLAMA_CPP_LIB_PATH`` must point at our build before ``llama_cpp`` is first imported, so every
caller goes through :func:`llama_cpp_module` instead of importing ``llama_cpp`` directly.
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from ..errors import McsharpError
from ..gguf.table import GgufHeader, TensorEntry, check_finite_tensors, read_header
from ..native import build as native_build

_LOG_LINES: deque[str] = deque(maxlen=64)
_LOG_STATE: dict[str, Any] = {"callback": None, "verbose": False}


def ensure_runtime(build_if_missing: bool = True, log=print) -> native_build.BuildInfo:
    """The cached patched build for this machine, building it first if allowed."""
    info = native_build.find_build()
    if info is None:
        if not build_if_missing:
            raise McsharpError("the patched llama.cpp runtime is not built; run `mcsharp setup`")
        info = native_build.build(log=log)
    return info


def llama_cpp_module(log=print) -> ModuleType:
    """Import ``llama_cpp`` bound to the patched libraries (built on first use)."""
    if _LOG_STATE["callback"] is not None:  # already bound in this process
        return sys.modules["llama_cpp"]
    info = ensure_runtime(log=log)
    current = os.environ.get("LLAMA_CPP_LIB_PATH")
    if "llama_cpp" in sys.modules and current != info.lib_dir:
        raise McsharpError(f"llama_cpp was already imported with libraries from {current!r}; "
                           "import mcsharp_gguf.runtime.llama before anything imports llama_cpp")
    os.environ["LLAMA_CPP_LIB_PATH"] = info.lib_dir
    import llama_cpp

    _install_log_capture(llama_cpp)
    return llama_cpp


def _install_log_capture(llama_cpp: ModuleType) -> None:
    """Route llama.cpp's log through us: keep recent error lines for messages, echo only when verbose."""
    if _LOG_STATE["callback"] is not None:
        return

    @llama_cpp.llama_log_callback
    def _callback(level: int, text: bytes, user_data) -> None:
        line = text.decode("utf-8", errors="replace")
        if level in (3, 4):  # GGML_LOG_LEVEL_WARN, GGML_LOG_LEVEL_ERROR
            _LOG_LINES.append(line.strip())
        if _LOG_STATE["verbose"]:
            sys.stderr.write(line)

    _LOG_STATE["callback"] = _callback  # keep a reference: ctypes does not
    llama_cpp.llama_log_set(_callback, ctypes.c_void_p(0))


def clear_llama_log() -> None:
    """Forget earlier llama.cpp log lines, so that :func:`last_llama_error` tells about the next call only."""
    _LOG_LINES.clear()


def last_llama_error() -> str:
    """The most telling recent llama.cpp error line (the loader's reason), or ''."""
    for line in reversed(_LOG_LINES):
        if "error loading model:" in line:
            return line.split("error loading model:", 1)[1].strip()
    return _LOG_LINES[-1] if _LOG_LINES else ""


@contextmanager
def plain_cpu_buffers(llama_cpp: ModuleType) -> Iterator[None]:
    """Load weights into plain CPU buffers (``use_extra_bufts = false``, which llama-cpp-python does not expose).

    On CPUs with AMX (built with GGML_NATIVE), llama.cpp otherwise puts some weights into its AMX / repack
    buffer types, and graphs it cannot schedule there abort the process (seen: a DeepSeek-V2 F16 file,
    ``GGML_ASSERT(*cur_backend_id != -1)`` in ggml_backend_sched_split_graph) or compute other results than on
    every other CPU. Plain buffers give the same graph on every machine; the patched and the stock runtime both
    load this way, so speed ratios between them are unaffected.
    """
    import llama_cpp.llama as llama_mod

    default = llama_cpp.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    llama_mod.llama_cpp.llama_model_default_params = params
    try:
        yield
    finally:
        llama_mod.llama_cpp.llama_model_default_params = default


def load_model(path: str | Path, n_ctx: int = 512, logits_all: bool = True, n_threads: int | None = None,
               kv_overrides: dict[str, Any] | None = None, verbose: bool = False, **kw: Any):
    """Open a GGUF with the patched runtime (CPU), all logits kept by default."""
    path = Path(path)
    if not path.is_file():
        raise McsharpError(f"{path}: no such GGUF file")
    check_before_load(path, kv_overrides)
    llama_cpp = llama_cpp_module()
    clear_llama_log()
    _LOG_STATE["verbose"] = verbose
    try:
        with plain_cpu_buffers(llama_cpp):
            return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=logits_all, n_gpu_layers=0,
                                   n_threads=n_threads or os.cpu_count(), n_batch=min(n_ctx, 512),
                                   kv_overrides=kv_overrides, verbose=verbose, seed=0, **kw)
    except ValueError:  # llama-cpp-python raises ValueError("Failed to load model from file: ...")
        raise cannot_load(path) from None


def check_before_load(path: Path, kv_overrides: dict[str, Any] | None) -> None:
    """What every load (eval, bench, chat, serve, ``load``) checks before llama.cpp sees the file: hyperparameters
    it would abort on, and OTP routers it would run with NaN."""
    header = read_header(path)  # once: both checks read the same table
    check_header(path, header)
    check_otp_routers(path, kv_overrides, header.tensors)


# llama.cpp's limits (src/llama-hparams.h of the pinned source)
LLAMA_MAX_LAYERS = 512
LLAMA_MAX_EXPERTS = 1024


def check_header(path: Path, header: GgufHeader | None = None) -> None:
    """Refuse what llama.cpp cannot load without aborting the whole process (GGML_ASSERTs in
    ``llama_model::load_hparams`` and in the ops; llama-cpp-python's tokenizer buffer is sized by the context
    length as an int32): hyperparameters out of range, and a norm weight stored as anything but F32 (every
    converter and llama-quantize keep norms F32). One line naming the key or tensor, before the file reaches
    the loader; everything else wrong in a header the loader reports as an error (``cannot_load``). ``header``:
    the file's header when the caller has read it already."""
    header = read_header(path) if header is None else header
    for t in header.tensors:
        if t.name.endswith("norm.weight") and t.ggml_type != 0:
            raise McsharpError(f"{path}: tensor {t.name} is stored as ggml type {t.ggml_type}; llama.cpp needs F32 "
                               "for norms: the file is damaged, convert it again")
    values = header.values
    arch = values.get("general.architecture")
    if not isinstance(arch, str):
        return  # the loader refuses it cleanly

    def number(key: str):
        v = values.get(f"{arch}.{key}")
        if isinstance(v, list):
            v = max(v, default=0)
        return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    def refuse(key: str, why: str) -> None:
        raise McsharpError(f"{path}: {arch}.{key} is {values.get(f'{arch}.{key}')!r}, {why}; the file is damaged: "
                           "convert it again")

    n_layer = number("block_count")
    if n_layer is not None and not 0 < n_layer <= LLAMA_MAX_LAYERS:
        refuse("block_count", f"llama.cpp needs 1 to {LLAMA_MAX_LAYERS} layers")
    nextn = number("nextn_predict_layers")
    if nextn is not None and n_layer is not None and nextn > n_layer:
        refuse("nextn_predict_layers", "more than the block count")
    n_ctx = number("context_length")
    if n_ctx is not None and not 0 <= n_ctx < 2 ** 31:
        refuse("context_length", "not a context length (llama.cpp reads it as a 32-bit integer)")
    n_expert, used = number("expert_count") or 0, number("expert_used_count") or 0
    groups, group_used = number("expert_group_count") or 0, number("expert_group_used_count") or 0
    if n_expert > LLAMA_MAX_EXPERTS:
        refuse("expert_count", f"llama.cpp supports up to {LLAMA_MAX_EXPERTS} experts")
    if used > n_expert or (n_expert and not used):
        refuse("expert_used_count", f"llama.cpp needs 1 to expert_count ({n_expert}) experts per token")
    if n_expert and (groups >= n_expert or (groups > 1 and (n_expert % groups or not 0 < group_used < groups))):
        refuse("expert_group_count", "the expert groups do not divide the experts")
    if not n_expert and groups:
        refuse("expert_group_count", "expert groups without experts")
    for key in ("attention.layer_norm_rms_epsilon", "attention.layer_norm_epsilon"):
        eps = number(key)
        if eps is not None and not (math.isfinite(eps) and eps >= 0):
            refuse(key, "a norm epsilon must be a finite number ≥ 0")


def check_otp_routers(path: Path, kv_overrides: dict[str, Any] | None,
                      tensors: list[TensorEntry] | None = None) -> None:
    """Refuse OTP router tensors with NaN/Inf when OTP will run: a NaN logit keeps or drops slots silently.
    ``tensors``: the file's tensor table when the caller has read it already."""
    kv = kv_overrides or {}
    if kv.get("mcsharp.otp.enable") is not False and kv.get("mcsharp.moe.prune_mode", 1) == 1:
        check_finite_tensors(path, lambda name: ".ffn_otp_" in name,
                             fix="add routers again (mcsharp otp add) or remove them (mcsharp otp strip)",
                             tensors=tensors)


def cannot_load(path: Path) -> McsharpError:
    """The error for a GGUF llama.cpp just refused, with the loader's logged reason and the fix."""
    reason = last_llama_error() or "no reason logged"
    fix = ("choose a pruning option the file supports (--otp / --top-k / --prune-mu)" if "mcsharp." in reason
           else "re-convert it with this version of mcsharp")
    return McsharpError(f"{path}: llama.cpp cannot load it: {reason}; {fix}")


def logits_for(llm, tokens: list[int] | np.ndarray) -> np.ndarray:
    """Logits (n_tokens, n_vocab) as float32 for one sequence, from a fresh KV cache."""
    tokens = [int(t) for t in tokens]
    if len(tokens) > llm.n_ctx():
        raise McsharpError(f"sequence of {len(tokens)} tokens exceeds the context {llm.n_ctx()}")
    llm.reset()
    llm._ctx.kv_cache_clear()
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


def _counter_fns(lib=None):
    """The patch's exported slot counter functions of ``lib`` (a loaded llama.cpp library; default: the patched
    one this process runs), or None on a build without them."""
    lib = lib if lib is not None else llama_cpp_module().llama_cpp._lib
    try:
        return lib.mcsharp_moe_slot_counter_reset, lib.mcsharp_moe_slot_counter_read
    except AttributeError:
        return None


def reset_slot_counter(lib=None) -> None:
    """Zero the runtime's selected/executed expert-slot counter (no-op without the patch). ``lib``: as in
    ``read_slot_counter``."""
    fns = _counter_fns(lib)
    if fns:
        fns[0]()


def read_slot_counter(lib=None) -> tuple[int, int]:
    """(selected, executed) expert slots since the last reset; (0, 0) without the patch. ``lib``: a loaded
    llama.cpp library (``llama_cpp.llama_cpp._lib``) when the caller bound llama_cpp itself (a benchmark timing
    stock and patched libraries); default: this process's patched runtime."""
    import ctypes

    fns = _counter_fns(lib)
    if not fns:
        return 0, 0
    sel, exe = ctypes.c_int64(0), ctypes.c_int64(0)
    fns[1].argtypes = [ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_int64)]
    fns[1](ctypes.byref(sel), ctypes.byref(exe))
    return sel.value, exe.value
