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
import json
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from .calib import LayerStream, capture_moe
from .errors import McsharpError
from .formats import QuantResult, quantize_rtn
from .gptq import HessianAccumulator, gptq_quantize
from .pmq import BitPlan, storable_type
from .recipe import DENSE_CLASSES

PROJS = ("gate", "up", "down")
MIN_ROWS = 32  # smaller matrices (e.g. a 1-row shared-expert gate) stay at --outtype


def _layer_file(work_dir: Path, layer: int) -> Path:
    return work_dir / f"layer-{layer:04d}.pt"


def expert_hessians(g: torch.Tensor, u: torch.Tensor, xe: torch.Tensor, act, gptq: bool = True
                    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """GPTQ Hessians of one expert: (gate/up input, down input) from its routed inputs ``xe``; None where that
    projection gets RTN instead — without ``gptq``, or when the expert saw fewer tokens than the projection's
    input width (its Hessian is then singular: GPTQ fits those few tokens and, measured on the tiny test models,
    generalises worse than RTN), in particular for experts no token reached."""
    n = int(xe.shape[0])
    h_in = h_act = None
    if gptq and n >= xe.shape[1]:
        acc = HessianAccumulator(xe.shape[1])
        acc.add(xe)
        h_in = acc.H
    if gptq and n >= g.shape[0]:
        acc = HessianAccumulator(g.shape[0])
        acc.add(act(xe @ g.T) * (xe @ u.T))
        h_act = acc.H
    return h_in, h_act


def quantize_expert(g: torch.Tensor, u: torch.Tensor, d: torch.Tensor, types: dict[str, str],
                    hessians: tuple[torch.Tensor | None, torch.Tensor | None]) -> dict[str, QuantResult]:
    """One expert's gate/up/down on ``types`` (proj → ggml type): GPTQ where ``hessians`` (expert_hessians)
    has one, RTN elsewhere."""
    h_in, h_act = hessians
    res = {p: gptq_quantize(w, h_in, types[p]) if h_in is not None else quantize_rtn(w, types[p])
           for p, w in (("gate", g), ("up", u))}
    res["down"] = gptq_quantize(d, h_act, types["down"]) if h_act is not None else quantize_rtn(d, types["down"])
    return res


def quantize_layer_experts(gate_up: torch.Tensor, down: torch.Tensor, x: torch.Tensor, top_k_index: torch.Tensor,
                           types: list[dict[str, str]], act, gptq: bool = True, in_place: bool = False) -> dict:
    """GPTQ of one layer's experts (quantize_expert on each, RTN where expert_hessians says so).

    ``types[e]`` maps gate/up/down → ggml type. Returns {"packed": {(e, proj): uint8}, "dequant": ...,
    "tokens": per-expert token counts}. ``in_place``: write each expert's dequantised weights into ``gate_up`` /
    ``down`` as soon as it is done, and return no "dequant" (a layer's experts are then in memory once; an
    expert's GPTQ reads only its own weights, so the experts after it are unaffected).
    """
    ff = down.shape[2]
    packed, dequant, tokens = {}, {}, []
    for e, t in enumerate(types):
        xe = x[(top_k_index == e).any(dim=1)]
        tokens.append(int(xe.shape[0]))
        g, u, d = gate_up[e, :ff], gate_up[e, ff:], down[e]
        res = quantize_expert(g, u, d, t, expert_hessians(g, u, xe, act, gptq))
        for p in PROJS:
            packed[(e, p)] = np.asarray(res[p].packed)
        if in_place:
            with torch.no_grad():
                g.copy_(res["gate"].dequant)
                u.copy_(res["up"].dequant)
                d.copy_(res["down"].dequant)
        else:
            dequant.update({(e, p): res[p].dequant for p in PROJS})
    return {"packed": packed, "tokens": tokens, "types": types, **({} if in_place else {"dequant": dequant})}


def load_packed_experts(experts: torch.nn.Module, done: dict) -> None:
    """Write a finished layer's experts (``done``, a work-dir layer) into ``experts``, decoded from their packed
    bytes by libggml (bit-exact with what GPTQ computed)."""
    from .formats import ggml_dequantize

    ff = experts.down_proj.shape[2]
    with torch.no_grad():
        for e, t in enumerate(done["types"]):
            for p, w in (("gate", experts.gate_up_proj[e, :ff]), ("up", experts.gate_up_proj[e, ff:]),
                         ("down", experts.down_proj[e])):
                w.copy_(torch.from_numpy(ggml_dequantize(done["packed"][(e, p)], t[p], tuple(w.shape))))


@dataclass(frozen=True)
class DenseTypes:
    """ggml types of the tensors outside the routed experts; None leaves a class at ``--outtype``.

    ``attn``: attention linears; ``ffn``: shared-expert and dense-FFN linears (both GPTQ on their own input
    Hessians, in the same layer stream as the experts); ``output``: the LM head (GPTQ on the final-norm
    Hessian); ``embd``: the token embedding (RTN: a lookup table has no input Hessian). ``tensor_types``:
    (regex, type) rules on GGUF tensor names, first match wins over the class type (llama-quantize's
    ``--tensor-type``), e.g. ``(r"attn_v", "Q8_0")``.
    """

    attn: str | None = None
    ffn: str | None = None
    embd: str | None = None
    output: str | None = None
    tensor_types: tuple[tuple[str, str], ...] = ()

    def any(self) -> bool:
        return bool(self.tensor_types) or any(getattr(self, c) is not None for c in DENSE_CLASSES)

    def type_for(self, gguf_name: str, cls: str) -> str | None:
        """The type of GGUF tensor ``gguf_name`` of class ``cls`` (None: left at --outtype)."""
        for pattern, t in self.tensor_types:
            if re.search(pattern, gguf_name):
                return t
        return getattr(self, cls)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def exact(cls, types: dict[str, str]) -> DenseTypes:
        """One exact-name rule per GGUF tensor (a whole-file plan's ``tensor_types``)."""
        return cls(tensor_types=tuple((rf"^{re.escape(n)}$", t) for n, t in sorted(types.items())))




def gguf_name_map(arch, n_layer: int):
    """llama.cpp's checkpoint → GGUF tensor-name map for an adapter's architecture."""
    from .llama_src import import_gguf

    gguf = import_gguf()
    arch_enum = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch.llama_arch]
    return gguf.get_tensor_name_map(arch_enum, n_layer)


def dense_linears(layer: torch.nn.Module, arch) -> dict[str, tuple[str, torch.nn.Linear]]:
    """The quantisable linears of a decoder layer outside the routed experts: local name → (class, module).

    The router, tiny gates (e.g. Qwen2-MoE's 1-row shared-expert gate) and anything inside the expert container
    stay unquantised; ``self_attn.*`` is "attn", the rest (shared experts, dense MLPs) "ffn".
    """
    skip = (f"{arch.moe_block}.{arch.router}", f"{arch.moe_block}.{arch.experts}")
    out = {}
    for name, mod in layer.named_modules():
        if not isinstance(mod, torch.nn.Linear) or any(name == s or name.startswith(s + ".") for s in skip):
            continue
        if mod.out_features < MIN_ROWS:
            continue
        out[name] = ("attn" if name.startswith("self_attn.") else "ffn", mod)
    return out


def checkpoint_name(arch, layer: int, local: str) -> str:
    """The checkpoint key of a layer-local module weight (the MoE block may be named differently there)."""
    if local.startswith(arch.moe_block + "."):
        local = arch.checkpoint_moe_block + local[len(arch.moe_block):]
    return f"model.layers.{layer}.{local}.weight"


def row_keys(w: torch.Tensor) -> list[bytes]:
    """A digest per row of ``w`` as float32: tells whether the converter reordered rows (e.g. llama's q/k)."""
    a = np.ascontiguousarray(w.detach().float().numpy())
    return [hashlib.blake2b(r.tobytes(), digest_size=8).digest() for r in a]


def _quantize_linear(w: torch.Tensor, h: HessianAccumulator | None, type_name: str) -> dict:
    t = storable_type(type_name, w.shape[1])
    res = gptq_quantize(w, h.H, t) if h is not None and h.n > 0 else quantize_rtn(w, t)
    return {"type": t, "packed": np.asarray(res.packed), "row_keys": row_keys(w), "shape": tuple(w.shape)}


def quantize_dense(mods: dict[str, tuple[str, torch.nn.Linear]], hess: dict[str, HessianAccumulator], arch,
                   layer: int, gptq: bool = True) -> dict[str, dict]:
    """GPTQ (RTN without calibration) of a layer's dense linears, ``mods``: local name → (type, module); keyed
    by checkpoint name."""
    return {checkpoint_name(arch, layer, n): {**_quantize_linear(m.weight.detach(), hess.get(n) if gptq else None,
                                                                 t), "local": n}
            for n, (t, m) in mods.items()}


def _apply_dense(layer: torch.nn.Module, done: dict[str, dict]) -> None:
    """Load quantised dense linears into ``layer``, decoded from their packed bytes (the work dir keeps no float
    copy: it would be 4× the packed size)."""
    from .formats import ggml_dequantize

    with torch.no_grad():
        for entry in done.values():
            w = layer.get_submodule(entry["local"]).weight
            w.copy_(torch.from_numpy(ggml_dequantize(entry["packed"], entry["type"], tuple(w.shape))))


def quantize_experts(model_dir, plan: BitPlan, token_ids: torch.Tensor, work_dir: Path, gptq: bool = True,
                     progress: bool = True, dense: DenseTypes | None = None) -> Path:
    """Quantise every planned MoE layer (and, with ``dense``, the other linears and the LM head) into
    ``work_dir``, one layer at a time on the outputs of the already-quantised layers (finished layers are
    reused). Within a layer the attention is quantised first and the FFN side calibrates on its output."""
    dense = dense or DenseTypes()
    check_work_dir(work_dir, plan, dense)
    stream = LayerStream.open(model_dir)
    names = gguf_name_map(stream.arch, stream.n_layer)

    def step(i: int, layer, run, hidden: torch.Tensor) -> torch.Tensor:
        block = stream.moe_block(layer)
        planned = block is not None and i in plan.layers
        mods = {}  # local name → (class, type, module) of the linears this layer quantises
        for n, (c, m) in dense_linears(layer, stream.arch).items():
            gname = names.get_name(checkpoint_name(stream.arch, i, n), try_suffixes=(".weight",))
            t = dense.type_for(gname, c) if gname is not None else None
            if t is not None:
                mods[n] = (c, t, m)
        if not planned and not mods:
            return run(hidden)
        path = _layer_file(work_dir, i)
        applied = False  # the experts in the layer module are already the quantised ones
        if path.exists():
            done = torch.load(path, weights_only=False)
        else:
            done = {"dense": {}}
            attn = {n: (t, m) for n, (c, t, m) in mods.items() if c == "attn"}
            if attn:  # attention first: the FFN side then sees what the quantised attention produces
                _, hess = _with_hessians({n: m for n, (_, m) in attn.items()}, run, hidden)
                done["dense"].update(quantize_dense(attn, hess, stream.arch, i, gptq))
                _apply_dense(layer, done["dense"])
            ffn = {n: (t, m) for n, (c, t, m) in mods.items() if c == "ffn"}
            hooks_for = {n: m for n, (_, m) in ffn.items()}
            if planned:
                experts = getattr(block, stream.arch.experts)
                (cap, _), hess = _with_hessians(hooks_for, partial(capture_moe, block, stream.arch,
                                                                   stream.n_expert, run), hidden)
                types = [plan.recipes[f"{i}:{t}"] for t in plan.layers[i]]
                done.update(quantize_layer_experts(experts.gate_up_proj.detach(), experts.down_proj.detach(),
                                                   cap.x, cap.top_k_index, types, experts.act_fn, gptq=gptq,
                                                   in_place=True))
                applied = True
            elif ffn:
                _, hess = _with_hessians(hooks_for, run, hidden)
            if ffn:
                done["dense"].update(quantize_dense(ffn, hess, stream.arch, i, gptq))
            tmp = path.with_suffix(".tmp")
            torch.save(done, tmp)
            os.replace(tmp, path)
        _apply_dense(layer, done.get("dense", {}))  # (work dirs from before dense quantisation have none)
        if planned and not applied:  # the next layer calibrates on the quantised experts
            load_packed_experts(getattr(block, stream.arch.experts), done)
        return run(hidden)

    hidden = stream.sweep(stream.embed(token_ids), step, "gptq" if gptq else "rtn", progress)
    out_type = dense.type_for("output.weight", "output")
    if out_type is not None and not _output_file(work_dir).exists():
        head = stream.lm_head()
        h = HessianAccumulator(head.shape[1])
        if gptq:
            h.add(stream.final_norm(hidden))
        res = _quantize_linear(head, h if gptq else None, out_type)
        tmp = _output_file(work_dir).with_suffix(".tmp")
        torch.save({stream.lm_head_name(): res}, tmp)
        os.replace(tmp, _output_file(work_dir))
    return work_dir


def _with_hessians(mods: dict[str, torch.nn.Linear], fn: Callable, hidden: torch.Tensor):
    """``fn(hidden)`` with input-Hessian hooks on ``mods``; returns (fn's result, the Hessians)."""
    acc = {n: HessianAccumulator(m.in_features) for n, m in mods.items()}
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
    """A ``pack.plan_hook`` quantiser that serves the packed experts from a quantize_experts work dir."""

    def __init__(self, work_dir: Path):
        self.work_dir = work_dir
        self._cache: dict[int, dict] = {}

    def __call__(self, w: torch.Tensor, type_name: str, layer: int, expert: int, proj: str) -> np.ndarray:
        if layer not in self._cache:  # the converter visits one layer's tensors together: keep one layer
            self._cache = {layer: torch.load(_layer_file(self.work_dir, layer), weights_only=False)}
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
    done = torch.load(path, weights_only=False)
    return done if layer is None else done.get("dense", {})
