"""The Importance stage's result: what the planner needs from each MoE layer and each non-expert tensor. JSON-able.

Every Fisher error is also kept for one half of the calibration sequences (fold A), so a planning rule can be
scored out of sample (plan.out_of_fold_cost).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from ..ggml.types import bits_per_weight, tensor_bytes


@dataclass
class LayerImportance:
    """What the planner needs from one MoE layer."""

    layer: int
    d_model: int
    d_ff: int
    phi: list[float]  # normalised activation frequency per expert
    w: list[float]  # normalised routing-weight mass per expert
    eps: dict[str, list[float]]  # recipe target → eps per expert
    out_norm: float = 0.0  # ||residual stream after the layer||_F over the calibration tokens (0 = unknown)
    eps_fisher: dict[str, list[float]] = field(default_factory=dict)  # same, in the output-KL metric
    # real / Fisher-predicted output KL of RTN-quantising this layer's experts (> 1: downstream top-k flips)
    flip_factor: float = 1.0
    # eps_fisher over the tokens of calibration fold A (the even sequences) only; B's is sqrt(all² − A²).
    # Two independent halves of the same estimate: what cross-validating a plan needs (choose_shrinkage).
    eps_fisher_a: dict[str, list[float]] = field(default_factory=dict)
    tokens: list[int] = field(default_factory=list)  # calibration tokens routed to each expert
    # experts measured at every candidate type (empty: all of them); the others were measured by RTN at
    # ANCHOR_TYPE only and their errors predicted from these (measure.predict_unsampled): a stock plan's sum, not a
    # mixed plan's per-expert choice
    sampled: list[int] = field(default_factory=list)
    neurons: int = 0  # intermediate neurons each expert was measured on (measure.sample_neurons; 0: unknown/all)
    layer_tokens: int = 0  # calibration tokens reaching the layer (what a starved expert borrows Hessians from)

    @property
    def n_expert(self) -> int:
        return len(self.phi)


@dataclass
class TensorImportance:
    """A non-expert tensor as a whole-file plan sees it: its GGUF name, shape and Fisher error per type."""

    name: str  # GGUF tensor name, e.g. "blk.3.attn_q.weight"
    cls: str  # attn | ffn | embd | output (recipe.DENSE_CLASSES)
    rows: int
    cols: int  # row length (ggml blocks run along it)
    eps_fisher: dict[str, float]  # storable type → sqrt of the estimated 2·ΔKL summed over tokens
    flip_factor: float = 1.0  # that of the MoE layer whose routers it feeds first (see LayerImportance)
    eps_fisher_a: dict[str, float] = field(default_factory=dict)  # fold A's part (see LayerImportance)

    @property
    def types(self) -> tuple[str, ...]:
        return tuple(sorted(self.eps_fisher, key=bits_per_weight))

    def n_bytes(self, type_name: str) -> int:
        return tensor_bytes(type_name, self.rows * self.cols)


@dataclass
class ModelImportance:
    """Everything measure_importance found: the MoE layers and, when asked, the non-expert tensors. JSON-able."""

    layers: list[LayerImportance]
    tensors: list[TensorImportance] = field(default_factory=list)
    eps_source: str = "rtn"  # the quantiser behind every eps: "rtn" (proxy) or "gptq" (what convert runs)

    def to_json(self) -> str:
        return json.dumps({"layers": [asdict(x) for x in self.layers], "tensors": [asdict(x) for x in self.tensors],
                           "eps_source": self.eps_source})

    @classmethod
    def from_json(cls, text: str) -> ModelImportance:
        d = json.loads(text)
        return cls([LayerImportance(**x) for x in d["layers"]], [TensorImportance(**x) for x in d["tensors"]],
                   d.get("eps_source", "rtn"))
