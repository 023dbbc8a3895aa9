"""What PMQ chooses from: the candidate ggml types of experts and of non-expert tensors, and an expert's *recipe*.

An expert's recipe is one target type applied to its gate/up/down projections; a projection whose row length does
not fit that type's block (e.g. 128-wide down_proj rows and 256-blocks of K-quants) falls back to the closest type
that fits (``ggml.types.storable_type``), and the recipe's byte count is computed from the real shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..ggml.types import storable_type, tensor_bytes

# Expert candidates (DESIGN §3): scalar grids with CPU/CUDA mul_mat_id support, ascending size.
EXPERT_TYPES: tuple[str, ...] = ("Q1_0", "Q2_0", "Q2_K", "Q3_K", "IQ4_XS", "Q4_K", "Q5_K", "Q6_K", "Q8_0")

# A stock plan prices a layer's experts only as a sum: in a layer of more than STOCK_SAMPLE experts, every expert
# is measured at ANCHOR_TYPE and a stratified sample of STOCK_SAMPLE of them at every type (pmq.measure)
ANCHOR_TYPE, STOCK_SAMPLE = "Q4_K", 16

# Candidates for non-expert tensors in a whole-file plan; rows that don't fit fall back (storable_type).
DENSE_TYPES: tuple[str, ...] = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")


@dataclass(frozen=True)
class Recipe:
    """The types an expert's three projections get when it is planned at ``target``."""

    target: str
    gate: str
    up: str
    down: str

    @classmethod
    def for_shapes(cls, target: str, d_model: int, d_ff: int) -> Recipe:
        # gate/up rows run over d_model, down rows over d_ff (ggml blocks run along the input dimension).
        t_in = storable_type(target, d_model)
        return cls(target, t_in, t_in, storable_type(target, d_ff))

    def n_bytes(self, d_model: int, d_ff: int) -> int:
        return sum(tensor_bytes(t, d_model * d_ff) for t in (self.gate, self.up, self.down))
