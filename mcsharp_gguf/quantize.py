"""Sequential, layer-streamed GPTQ of every planned expert, resumable from a work directory.

Layer by layer (one decoder layer resident): run it on the carried hidden states, capture each expert's
routed inputs, GPTQ its gate/up (Hessian of the MoE input) and down (Hessian of its own activations) on the
planned ggml types, then load the dequantised experts back and re-run the layer, so the next layer
calibrates on what the quantised model really produces. Each finished layer is one ``layer-NNNN.pt`` file
(written atomically); a re-run skips finished layers and produces the same bytes.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .calib import LayerStream, capture_moe
from .errors import McsharpError
from .formats import quantize_rtn
from .gptq import HessianAccumulator, gptq_quantize
from .pmq import BitPlan

PROJS = ("gate", "up", "down")


def _layer_file(work_dir: Path, layer: int) -> Path:
    return work_dir / f"layer-{layer:04d}.pt"


def quantize_layer_experts(gate_up: torch.Tensor, down: torch.Tensor, x: torch.Tensor, top_k_index: torch.Tensor,
                           types: list[dict[str, str]], act, gptq: bool = True) -> dict:
    """GPTQ (RTN for experts no token reached) of one layer's experts.

    ``types[e]`` maps gate/up/down → ggml type. Returns {"packed": {(e, proj): uint8}, "dequant": ...,
    "tokens": per-expert token counts}.
    """
    ff = down.shape[2]
    packed, dequant, tokens = {}, {}, []
    for e, t in enumerate(types):
        xe = x[(top_k_index == e).any(dim=1)]
        tokens.append(int(xe.shape[0]))
        g, u, d = gate_up[e, :ff], gate_up[e, ff:], down[e]
        if gptq and xe.shape[0] > 0:
            h_in = HessianAccumulator(xe.shape[1])
            h_in.add(xe)
            h_act = HessianAccumulator(ff)
            h_act.add(act(xe @ g.T) * (xe @ u.T))
            res = {"gate": gptq_quantize(g, h_in.H, t["gate"]), "up": gptq_quantize(u, h_in.H, t["up"]),
                   "down": gptq_quantize(d, h_act.H, t["down"])}
        else:
            res = {"gate": quantize_rtn(g, t["gate"]), "up": quantize_rtn(u, t["up"]),
                   "down": quantize_rtn(d, t["down"])}
        for p in PROJS:
            packed[(e, p)] = np.asarray(res[p].packed)
            dequant[(e, p)] = res[p].dequant
    return {"packed": packed, "dequant": dequant, "tokens": tokens, "types": types}


def quantize_experts(model_dir, plan: BitPlan, token_ids: torch.Tensor, work_dir: Path, gptq: bool = True,
                     progress: bool = True) -> Path:
    """Quantise every planned MoE layer into ``work_dir`` (finished layers are reused)."""
    from tqdm import tqdm

    check_work_dir(work_dir, plan)
    stream = LayerStream.open(model_dir)
    hidden = stream.embed(token_ids)
    bar = tqdm(total=stream.n_layer, desc="gptq layers", unit="layer", disable=not progress)
    for i, layer, run in stream.layers(hidden):
        block = stream.moe_block(layer)
        if block is None or i not in plan.layers:
            hidden = run(hidden)
            bar.update()
            continue
        experts = getattr(block, stream.arch.experts)
        path = _layer_file(work_dir, i)
        if path.exists():
            done = torch.load(path, weights_only=False)
        else:
            cap, _ = capture_moe(block, stream.arch, stream.n_expert, run, hidden)
            types = [plan.recipes[f"{i}:{t}"] for t in plan.layers[i]]
            done = quantize_layer_experts(experts.gate_up_proj.detach(), experts.down_proj.detach(), cap.x,
                                          cap.top_k_index, types, experts.act_fn, gptq=gptq)
            tmp = path.with_suffix(".tmp")
            torch.save(done, tmp)
            os.replace(tmp, path)
        with torch.no_grad():  # the next layer calibrates on the quantised experts' outputs
            for e in range(stream.n_expert):
                experts.gate_up_proj[e].copy_(torch.cat([done["dequant"][(e, "gate")], done["dequant"][(e, "up")]]))
                experts.down_proj[e].copy_(done["dequant"][(e, "down")])
        hidden = run(hidden)
        bar.update()
    bar.close()
    return work_dir


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


def check_work_dir(work_dir: Path, plan: BitPlan) -> None:
    """A work dir belongs to one plan: record it, and refuse a dir made for another."""
    work_dir.mkdir(parents=True, exist_ok=True)
    stamp = work_dir / "plan.json"
    if stamp.exists() and stamp.read_text() != plan.to_json():
        raise McsharpError(f"--work-dir {work_dir} holds layers of a different plan; pass a fresh --work-dir")
    stamp.write_text(plan.to_json())
