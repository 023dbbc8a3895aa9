"""Sequential, layer-streamed GPTQ of every planned expert (and optionally every other linear), resumable
from a work directory.

Layer by layer (one decoder layer resident): run it on the carried hidden states, capture each expert's
routed inputs, GPTQ its gate/up (Hessian of the MoE input) and down (Hessian of its own activations) on the
planned ggml types, then load the dequantised experts back and re-run the layer, so the next layer
calibrates on what the quantised model really produces. With :class:`DenseTypes`, the attention linears are
quantised first (the FFN side then sees their quantised output), then the shared-expert / dense-FFN linears
with the experts, and the LM head at the end on the final-norm Hessian. Each finished layer is one
``layer-NNNN.pt`` file (written atomically); a re-run skips finished layers and produces the same bytes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import McsharpError
from ..executors import InProcess, RayCluster
from ..files import write_atomically
from ..model.names import checkpoint_name, gguf_name_map
from ..model.stream import LayerStream, MoeRecorder, capture_moe, dense_linears
from ..nested import map_arrays
from .dense import DenseTypes, _apply_dense, _quantize_linear, quantize_dense
from .experts import load_packed_experts, quantize_layer_experts
from .gptq import HessianAccumulator

if TYPE_CHECKING:  # used in annotations only; no run-time import against the pipeline's direction
    from ..pmq.plan import BitPlan


def _layer_file(work_dir: Path, layer: int) -> Path:
    return work_dir / f"layer-{layer:04d}.pt"


def _digest_file(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def save_work_entry(entry: dict, path: Path) -> None:
    """Write a work-dir entry atomically, with its SHA-256 beside it (work_entry_ok). Its numpy arrays (the
    packed bytes) go in as tensors: torch.save streams tensor storages into the file, while numpy arrays are
    pickled, copied twice in memory on the way (+1.7 GB at the peak of a Qwen3-30B-A3B-shape layer)."""
    def write(tmp: Path) -> None:
        torch.save(map_arrays(entry, lambda a: torch.from_numpy(a) if isinstance(a, np.ndarray) else a), tmp)
        # a new digest before the new file: a stop in between leaves a mismatch, i.e. the entry is recomputed,
        # never a wrong one trusted
        write_atomically(_digest_file(path), lambda d: d.write_text(_sha256(tmp)))

    write_atomically(path, write)


def work_entry_ok(path: Path) -> bool:
    """``path`` holds a finished entry: it exists and matches the SHA-256 save_work_entry wrote beside it (an
    entry truncated or changed on disk, or written before digests, is not trusted: it is recomputed)."""
    digest = _digest_file(path)
    return path.exists() and digest.exists() and digest.read_text().strip() == _sha256(path)


def load_work_entry(path: Path) -> dict:
    """A work-dir entry as save_work_entry got it (packed bytes as numpy arrays)."""
    try:
        entry = torch.load(path, weights_only=False)
    except Exception as e:  # noqa: BLE001 — torch raises several kinds for a damaged file
        raise McsharpError(f"{path} is damaged ({type(e).__name__}); delete it, the conversion recomputes it") \
            from None
    return map_arrays(entry, lambda a: a.numpy() if isinstance(a, torch.Tensor) and a.dtype == torch.uint8 else a)


class GptqPass:
    """The sequential pass's work on one decoder layer (``LayerStream.sweep`` calls it with each layer in
    turn): quantise the layer's planned experts and non-expert linears on what the already-quantised layers
    before it produce, keep the result in the work dir, and return the quantised layer's output, the next
    layer's input. A layer finished in an earlier run is loaded from the work dir instead."""

    def __init__(self, stream: LayerStream, plan: BitPlan, dense: DenseTypes, work_dir: Path, gptq: bool = True,
                 executor: InProcess | RayCluster | None = None):
        self.stream, self.plan, self.dense, self.work_dir, self.gptq = stream, plan, dense, work_dir, gptq
        self.executor = executor  # where each expert's GPTQ runs (executors.connect)
        self.names = gguf_name_map(stream.arch, stream.n_layer)

    def linears(self, i: int, layer: torch.nn.Module) -> dict[str, tuple[str, str, torch.nn.Linear]]:
        """local name → (class, ggml type, module) of the non-expert linears of layer ``i`` that are quantised."""
        mods = {}
        for n, (c, m) in dense_linears(layer, self.stream.arch).items():
            gname = self.names.get_name(checkpoint_name(self.stream.arch, i, n), try_suffixes=(".weight",))
            t = self.dense.type_for(gname, c) if gname is not None else None
            if t is not None:
                mods[n] = (c, t, m)
        return mods

    def __call__(self, i: int, layer: torch.nn.Module, run: Callable, hidden: torch.Tensor) -> torch.Tensor:
        block = self.stream.moe_block(layer)
        planned = block is not None and i in self.plan.layers
        mods = self.linears(i, layer)
        if not planned and not mods:
            return run(hidden)
        path = _layer_file(self.work_dir, i)
        fresh = not work_entry_ok(path)
        if fresh and path.exists():
            from tqdm import tqdm

            tqdm.write(f"[gptq] {path} does not match its checksum (damaged or unfinished): quantising layer {i} "
                       "again")
        if fresh:
            done = self.quantise(i, layer, run, hidden, block if planned else None, mods)
            save_work_entry(done, path)
        else:
            done = load_work_entry(path)
        _apply_dense(layer, done.get("dense", {}))  # (work dirs from before dense quantisation have none)
        if planned:  # the next layer calibrates on the quantised experts
            load_packed_experts(getattr(block, self.stream.arch.experts), done)
        return run(hidden)

    def quantise(self, i: int, layer: torch.nn.Module, run: Callable, hidden: torch.Tensor,
                 block: torch.nn.Module | None, mods: dict[str, tuple[str, str, torch.nn.Linear]]) -> dict:
        """Layer ``i``'s work-dir entry: attention first (the FFN side then sees what the quantised attention
        produces), then the planned experts of ``block`` (written into the layer in place) and the shared /
        dense FFN linears, calibrated on the same forward."""
        stream = self.stream
        done: dict = {"dense": {}}
        attn = {n: (t, m) for n, (c, t, m) in mods.items() if c == "attn"}
        if attn:  # (the attention's inputs need the layer only up to its attention)
            _, hess = _with_hessians({n: m for n, (_, m) in attn.items()},
                                     stream.attention_runner(layer, hidden.shape[1]), hidden)
            done["dense"].update(quantize_dense(attn, hess, stream.arch, i, self.gptq))
            del hess  # (four 64 MB Hessians at Mixtral's width, not to be held through the experts' GPTQ)
            _apply_dense(layer, done["dense"])
        ffn = {n: (t, m) for n, (c, t, m) in mods.items() if c == "ffn"}
        hooks_for = {n: m for n, (_, m) in ffn.items()}
        if block is not None:
            experts = getattr(block, stream.arch.experts)
            if hooks_for:  # (a shared expert may run after the routed ones: its Hessians need the whole forward)
                (cap, out), hess = _with_hessians(hooks_for, partial(capture_moe, block, stream.arch,
                                                                     stream.n_expert, run), hidden)
                del out  # (the layer's output: 0.25 GB at Mixtral's width and 16k tokens)
            else:  # the experts' inputs and routing need the layer only up to its routed experts
                with MoeRecorder(block, stream.arch, outputs=False) as rec:
                    stream.routing_runner(layer, hidden.shape[1])(hidden)
                cap = rec.capture(stream.n_expert)
            x, top_k_index = cap.x, cap.top_k_index
            del cap  # (from a whole forward it holds the block's outputs too: 0.25 GB at Mixtral's width)
            types = [self.plan.recipes[f"{i}:{t}"] for t in self.plan.layers[i]]
            done.update(quantize_layer_experts(experts.gate_up_proj.detach(), experts.down_proj.detach(), x,
                                               top_k_index, types, experts.act_fn, gptq=self.gptq,
                                               executor=self.executor))
        elif ffn:
            _, hess = _with_hessians(hooks_for, run, hidden)
        if ffn:
            done["dense"].update(quantize_dense(ffn, hess, stream.arch, i, self.gptq))
        return done


def quantize_experts(model_dir, plan: BitPlan, token_ids: torch.Tensor, work_dir: Path, gptq: bool = True,
                     progress: bool = True, dense: DenseTypes | None = None, device: torch.device | str = "cpu",
                     executor: InProcess | RayCluster | None = None) -> Path:
    """Quantise every planned MoE layer (and, with ``dense``, the other linears and the LM head) into
    ``work_dir``, one layer at a time on the outputs of the already-quantised layers (:class:`GptqPass`;
    finished layers are reused), then the LM head on the last layer's output. ``device``: where the layers run
    and GPTQ walks (devices.resolve_device); ``executor``: where each expert's GPTQ runs (executors.connect:
    this process by default, or Ray tasks; the same bytes either way)."""
    dense = dense or DenseTypes()
    check_work_dir(work_dir, plan, dense)
    # on the CPU the layer's experts stay bf16 and are widened one at a time: the peak here is the layer itself
    stream = LayerStream.open(model_dir, device, experts_as_stored=torch.device(device).type == "cpu")
    step = GptqPass(stream, plan, dense, work_dir, gptq, executor)
    hidden = stream.sweep(token_ids, step, "gptq" if gptq else "rtn", progress)
    out_type = dense.type_for("output.weight", "output")
    if out_type is not None and not work_entry_ok(_output_file(work_dir)):
        _quantize_head(stream, hidden, out_type, work_dir, gptq)
    return work_dir


def _quantize_head(stream: LayerStream, hidden: torch.Tensor, out_type: str, work_dir: Path, gptq: bool) -> None:
    """GPTQ (RTN without ``gptq``) of the LM head on the Hessian of its input, the final norm of the last hidden
    states ``hidden``, into the work dir's output file."""
    head = stream.lm_head()
    h = HessianAccumulator(head.shape[1], device=hidden.device)
    if gptq:
        h.add(stream.final_norm(hidden))
    save_work_entry({stream.lm_head_name(): _quantize_linear(head, h if gptq else None, out_type)},
                    _output_file(work_dir))


def _with_hessians(mods: dict[str, torch.nn.Linear], fn: Callable, hidden: torch.Tensor):
    """``fn(hidden)`` with input-Hessian hooks on ``mods``; returns (fn's result, the Hessians)."""
    acc = {n: HessianAccumulator(m.in_features, device=m.weight.device) for n, m in mods.items()}
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: acc[n].add(args[0])) for n, m in mods.items()]
    try:
        out = fn(hidden)
    finally:
        for h in hooks:
            h.remove()
    return out, acc


def _output_file(work_dir: Path) -> Path:
    return work_dir / "output.pt"


class WorkDirQuantiser:
    """A ``gguf.pack.plan_hook`` quantiser that serves the packed experts from a quantize_experts work dir."""

    def __init__(self, work_dir: Path):
        self.work_dir = work_dir
        self._cache: dict[int, dict] = {}

    def __call__(self, w: torch.Tensor, type_name: str, layer: int, expert: int, proj: str) -> np.ndarray:
        if layer not in self._cache:  # the converter visits one layer's tensors together: keep one layer
            self._cache = {layer: load_work_entry(_layer_file(self.work_dir, layer))}
        done = self._cache[layer]
        if done["types"][expert][proj] != type_name:
            raise McsharpError(f"{self.work_dir}: layer {layer} expert {expert} {proj} was quantised as "
                               f"{done['types'][expert][proj]}, the plan says {type_name}; use a fresh --work-dir")
        return done["packed"][(expert, proj)]


def check_work_dir(work_dir: Path, plan: BitPlan, dense: DenseTypes | None = None) -> None:
    """A work dir belongs to one plan (and set of dense types): record it, and refuse a dir made for another."""
    work_dir.mkdir(parents=True, exist_ok=True)
    stamp = work_dir / "plan.json"
    want = plan.to_json() if dense is None or not dense.any() else f"{plan.to_json()}\n{dense.to_json()}"
    if stamp.exists() and stamp.read_text() != want:
        raise McsharpError(f"--work-dir {work_dir} holds layers of a different plan; pass a fresh --work-dir")
    stamp.write_text(want)


def load_dense_entries(work_dir: Path, layer: int | None) -> dict[str, dict]:
    """The dense tensors a work dir holds for decoder layer ``layer`` (None: the LM head), by checkpoint name."""
    path = _output_file(work_dir) if layer is None else _layer_file(work_dir, layer)
    if not path.exists():
        return {}
    done = load_work_entry(path)
    return done if layer is None else done.get("dense", {})
