"""The tensors outside the routed experts (attention, shared-expert / dense-FFN linears, LM head, token embedding):
the types they get (:class:`DenseTypes`) and their GPTQ, keyed by checkpoint name with a digest per row."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..ggml.libggml import ggml_dequantize
from ..ggml.packing import quantize_rtn
from ..ggml.types import storable_type
from ..model.names import checkpoint_name
from ..recipe import DENSE_CLASSES
from .gptq import HessianAccumulator, gptq_quantize


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


def row_keys(w: torch.Tensor) -> list[bytes]:
    """A digest per row of ``w`` as float32: tells whether the converter reordered rows (e.g. llama's q/k)."""
    a = np.ascontiguousarray(w.detach().float().cpu().numpy())
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
    with torch.no_grad():
        for entry in done.values():
            w = layer.get_submodule(entry["local"]).weight
            w.copy_(torch.from_numpy(ggml_dequantize(entry["packed"], entry["type"], tuple(w.shape))))
