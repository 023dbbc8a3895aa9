"""What a plan costs each token in kernel time, in decode and in prefill, so that a mixed plan can be held to the
speed of the stock plan at the same bytes.

ggml's kernels are not equally fast per weight, and bytes do not predict it: on the CPU measured here
(docs/runtime.md, "Kernel time per type") Q2_0 has no SIMD path (3.9× Q4_K's decode time per weight with half its
bytes, 79× its prefill time), and Q1_0 and Q8_0 have no fast matrix-matrix path (4.3× and 6.4× in prefill).
A plan that only counts bytes can therefore run slower than a stock file of the same size. ``KERNEL_COST`` is
each type's time per weight in decode and in prefill, relative to Q4_K, measured by
``scripts/bench_type_speed.py``; a plan's time in a phase is Σ over what it types of (how often a token runs
it) × weights × cost.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..ggml.types import QUANT_TYPES, bits_per_weight
from .candidates import Recipe

if TYPE_CHECKING:  # annotations only
    from .importance import LayerImportance, TensorImportance
    from .plan import BitPlan

PHASES = ("decode", "prefill")

# Kernel time per weight relative to Q4_K, (decode, prefill): the routed experts' share of each phase's time on the
# Mixtral-8x7B shape (2 layers, 2 threads, x86 AVX-512 CPU), every expert of one type a file,
# `python scripts/bench_type_speed.py` (docs/runtime.md).
KERNEL_COST: dict[str, tuple[float, float]] = {
    "Q1_0": (0.41, 4.27), "Q2_0": (3.85, 78.5), "Q2_K": (0.59, 1.36), "Q3_K": (0.85, 1.04), "IQ4_XS": (1.09, 0.93),
    "Q4_K": (1.0, 1.0), "Q5_K": (1.15, 0.90), "Q6_K": (1.58, 1.96), "Q8_0": (1.68, 6.41),
}

# How much slower than its stock plan a mixed plan may run, in either phase, by KERNEL_COST on the calibration
# routing (the quality that buys: docs/planner.md "Speed-priced mixed plans").
MAX_SLOWDOWN = 0.02


def type_cost(type_name: str) -> np.ndarray:
    """KERNEL_COST of ``type_name`` (decode, prefill); a type not measured is priced by its bytes per weight
    against Q4_K's."""
    if type_name in KERNEL_COST:
        return np.array(KERNEL_COST[type_name])
    return np.full(len(PHASES), bits_per_weight(type_name) / bits_per_weight("Q4_K"))


def recipe_cost(target: str, d_model: int, d_ff: int) -> np.ndarray:
    """One expert's time at recipe ``target`` per phase: its three projections' weights × their types' cost."""
    r = Recipe.for_shapes(target, d_model, d_ff)
    return d_model * d_ff * sum(type_cost(t) for t in (r.gate, r.up, r.down))


def run_rate(imp: LayerImportance) -> np.ndarray:
    """How often a token runs each expert of the layer: routed tokens / tokens reaching the layer (summing to the
    layer's top-k); an importance without token counts gives its frequencies (summing to 1)."""
    if imp.tokens and imp.layer_tokens:
        return np.asarray(imp.tokens, dtype=np.float64) / imp.layer_tokens
    return np.asarray(imp.phi, dtype=np.float64)


def tensor_rate(ti: TensorImportance) -> float:
    """How often a token runs a non-expert tensor: once, except the token embedding (one row looked up)."""
    return 0.0 if ti.cls == "embd" else 1.0


def plan_time(plan: BitPlan, layers: list[LayerImportance], tensors=()) -> np.ndarray:
    """The time per token of what ``plan`` types, per phase (decode, prefill), in Q4_K-weight units."""
    total = np.zeros(len(PHASES))
    for imp in layers:
        cost = {t: recipe_cost(t, imp.d_model, imp.d_ff) for t in set(plan.layers[imp.layer])}
        total += run_rate(imp) @ np.array([cost[t] for t in plan.layers[imp.layer]])
    by_name = {ti.name: ti for ti in tensors}
    for name, t in plan.tensor_types.items():
        ti = by_name[name]
        total += tensor_rate(ti) * ti.rows * ti.cols * type_cost(t)
    return total


assert all(t in QUANT_TYPES and len(c) == len(PHASES) for t, c in KERNEL_COST.items())
