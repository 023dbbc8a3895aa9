"""GGUF assembly of a PMQ plan: quantise every expert tensor as planned and lay it out for llama.cpp.

``stock``: one type per layer tensor, standard ``blk.N.ffn_{gate,up,down}_exps.weight`` (any llama.cpp).
``mixed``: experts permuted so experts of one recipe are contiguous, each group written as
``blk.N.ffn_{gate,up,down}_exps.gG.weight``; the router rows are permuted identically, so routing is
unchanged (needs the patched runtime, which reads group sizes from the tensors).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..ggml.packing import quantize_rtn
from ..ggml.types import ggml_type, storable_type
from ..model.names import EXPS_RE, ROUTER_RE, dense_class, gguf_name_map
from ..pmq.candidates import EXPERT_TYPES
from ..pmq.plan import BitPlan
from ..quant.dense import row_keys
from ..quant.sequential import load_dense_entries
from .convert import tensor_values

# quantise(W (rows, cols), type, layer, expert, projection) -> packed uint8 (rows, bytes per row). W may be the
# converter's lazy tensor: a quantiser that computes from it reads it with gguf.convert.tensor_values.
Quantiser = Callable[[torch.Tensor, str, int, int, str], np.ndarray]


def rtn_quantiser(w: torch.Tensor, type_name: str, layer: int, expert: int, proj: str) -> np.ndarray:
    """Round-to-nearest on the ggml grid (no calibration needed)."""
    return quantize_rtn(tensor_values(w).float(), type_name).packed


@dataclass(frozen=True)
class LayerLayout:
    """Expert order and group boundaries of one layer in the file."""

    order: list[int]  # file position → original expert index
    groups: list[tuple[str, int]]  # (recipe target, n experts) in file order


def layer_layout(targets: list[str], mode: str) -> LayerLayout:
    """Stock keeps the original order in one group; mixed sorts experts by recipe (stable)."""
    if mode == "stock":
        if len(set(targets)) != 1:
            raise ValueError("a stock plan has one recipe per layer")
        return LayerLayout(list(range(len(targets))), [(targets[0], len(targets))])
    rank = {t: i for i, t in enumerate(EXPERT_TYPES)}
    order = sorted(range(len(targets)), key=lambda e: (rank.get(targets[e], len(rank)), e))
    groups: list[tuple[str, int]] = []
    for e in order:
        if groups and groups[-1][0] == targets[e]:
            groups[-1] = (targets[e], groups[-1][1] + 1)
        else:
            groups.append((targets[e], 1))
    return LayerLayout(order, groups)


def plan_hook(plan: BitPlan, quantise: Quantiser = rtn_quantiser):
    """A ``convert_checkpoint`` hook that writes the planned expert tensors (and permutes routers)."""
    layouts = {layer: layer_layout(t, plan.mode) for layer, t in plan.layers.items()}

    def hook(name: str, tensor, bid):
        m = ROUTER_RE.match(name)
        if m and plan.mode == "mixed" and int(m.group(1)) in layouts:
            order = layouts[int(m.group(1))].order
            return [(name, tensor_values(tensor).float().numpy()[order], None)]
        m = EXPS_RE.match(name)
        if not m or int(m.group(1)) not in layouts:
            return None
        layer, proj = int(m.group(1)), m.group(2)
        lay = layouts[layer]
        out, pos = [], 0
        for g, (target, n) in enumerate(lay.groups):
            qtype = plan.recipes[f"{layer}:{target}"][proj]
            # one (lazy) expert at a time: read and widened only by a quantiser that computes from it
            packed = np.stack([np.asarray(quantise(tensor[e], qtype, layer, e, proj))
                               for e in lay.order[pos:pos + n]])
            pos += n
            gname = name if plan.mode == "stock" else name.replace("_exps.weight", f"_exps.g{g}.weight")
            out.append((gname, packed, ggml_type(qtype)))
        return out

    return hook


def plan_metadata(plan: BitPlan):
    """``extra_kv`` for convert_checkpoint: record the plan in the file."""

    def add(writer) -> None:
        writer.add_string("mcsharp.pmq.mode", plan.mode)
        writer.add_float32("mcsharp.pmq.target_bpw", float(plan.target_bpw))
        writer.add_float32("mcsharp.pmq.expert_bpw", float(plan.achieved_bpw))
        writer.add_string("mcsharp.pmq.plan", plan.to_json())

    return add


def dense_hook(types, work_dir=None, arch=None, n_layer: int = 0, log=print):
    """A ``convert_checkpoint`` hook writing the non-expert tensors at ``types`` (a quant.dense.DenseTypes); ``arch``
    is the architecture adapter and ``n_layer`` its decoder layer count.

    Tensors GPTQ'd in ``work_dir`` (by ``quantize_experts(..., dense=types)``) are served from it, with their
    rows reordered if the converter reordered them (llama.cpp permutes llama's q/k rows for RoPE); any other
    tensor of a chosen class (the token embedding, a tensor the converter reshaped) gets RTN on its type.
    """
    by_name: dict[str, dict] = {}
    loaded: set = set()
    if work_dir is not None:
        name_map = gguf_name_map(arch, n_layer)

    def entries(bid):
        if work_dir is None or bid in loaded:
            return
        loaded.add(bid)
        for ck, entry in load_dense_entries(work_dir, bid).items():
            gname = name_map.get_name(ck, try_suffixes=(".weight",))
            if gname is not None:
                by_name[gname] = entry

    def hook(name: str, tensor, bid):
        cls = dense_class(name, tuple(tensor.shape))
        t = types.type_for(name, cls) if cls is not None else None
        if t is None:
            return None
        entries(bid)
        entries(None)
        w = tensor_values(tensor).float()
        entry = by_name.get(name)
        if entry is not None and tuple(entry["shape"]) == tuple(w.shape):
            keys = row_keys(w)
            if keys == entry["row_keys"]:
                return [(name, entry["packed"], ggml_type(entry["type"]))]
            pos = {k: r for r, k in enumerate(entry["row_keys"])}
            if all(k in pos for k in keys):  # the same rows, reordered by the converter
                return [(name, entry["packed"][[pos[k] for k in keys]], ggml_type(entry["type"]))]
            log(f"[pmq] {name}: the converter changed this tensor; RTN on {t} instead of its GPTQ result")
        rows = w.reshape(-1, w.shape[-1])
        tt = storable_type(t, rows.shape[1])
        packed = quantize_rtn(rows, tt).packed
        return [(name, np.asarray(packed).reshape(*w.shape[:-1], -1), ggml_type(tt))]

    return hook


def chain_hooks(*hooks):
    """One hook trying each of ``hooks`` in turn (the first that returns a replacement wins)."""
    hooks = [h for h in hooks if h is not None]
    if not hooks:
        return None

    def hook(name: str, tensor, bid):
        for h in hooks:
            out = h(name, tensor, bid)
            if out is not None:
                return out
        return None

    return hook
