"""A Recipe's budget in bytes for one checkpoint: a llama-quantize preset's bytes, a file size or bits per weight,
turned into the bytes the plan may spend on the tensors it types, from the converter's tensor list alone.

Checked before any calibration: a budget below the smallest plan or above the unquantised file is an error that
names the achievable range.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import McsharpError
from ..ggml.types import storable_type, tensor_bytes
from ..model.names import EXPS_RE, dense_class
from ..recipe import Recipe
from .candidates import DENSE_TYPES, EXPERT_TYPES
from .presets import preset_bytes

if TYPE_CHECKING:  # used in annotations only; no run-time import against the pipeline's direction
    from ..gguf.convert import GgufTensor

GGUF_HEADER_SLACK = 1 << 16  # besides the tokenizer: hparams, the plan and recipe strings, alignment


@dataclass(frozen=True)
class Budget:
    """What a plan may spend: ``planned_bytes`` on ``planned_weights`` (the experts, and with a whole-file scope
    every tensor the plan types); ``fixed_bytes`` is the rest of the file at the recipe's outtype."""

    planned_bytes: int
    planned_weights: int
    fixed_bytes: int
    source: str  # e.g. "preset Q3_K_M (135.8 MB)"

    @property
    def bpw(self) -> float:
        return 8 * self.planned_bytes / self.planned_weights


def planned_tensor(name: str, t: GgufTensor, scope: str) -> bool:
    """Whether a plan of ``scope`` types tensor ``name``: the routed experts, and for a whole-file plan every
    non-expert tensor measure_importance measures (model.names.dense_class)."""
    if EXPS_RE.match(name):
        return True
    return scope == "file" and dense_class(name, t.shape) is not None


def _smallest_bytes(name: str, t: GgufTensor) -> int:
    smallest = EXPERT_TYPES[0] if EXPS_RE.match(name) else DENSE_TYPES[0]
    return tensor_bytes(storable_type(smallest, t.shape[-1]), t.n_weights)


def header_bytes(model_dir: str | Path) -> int:
    """Estimated GGUF metadata bytes (tokenizer vocabulary and merges dominate), for --size."""
    tok = Path(model_dir) / "tokenizer.json"
    return (tok.stat().st_size if tok.is_file() else 0) + GGUF_HEADER_SLACK


def resolve_budget(recipe: Recipe, inventory: dict[str, GgufTensor], arch: str, header: int = 0) -> Budget:
    """The bytes ``recipe``'s budget allows the planned tensors of a model with tensors ``inventory``
    (gguf.convert.gguf_inventory at the recipe's outtype) and llama.cpp architecture ``arch``; ``header``: estimated
    metadata bytes (subtracted from a --size). Raises McsharpError when the budget is out of reach."""
    planned = {n: t for n, t in inventory.items() if planned_tensor(n, t, recipe.scope)}
    if not planned:
        raise McsharpError("the model has no routed-expert tensors (blk.N.ffn_*_exps); mcsharp plans MoE models")
    fixed = sum(t.n_bytes for n, t in inventory.items() if n not in planned)
    weights = sum(t.n_weights for t in planned.values())
    preset = recipe.budget_preset
    if recipe.bpw is not None:
        what = f"{recipe.bpw:g} bits per planned weight"
        target = int(recipe.bpw * weights / 8)
    elif recipe.size_bytes is not None:
        what = f"file size {recipe.size_bytes / 1e6:.1f} MB"
        target = recipe.size_bytes - fixed - header
    else:
        theirs = preset_bytes({n: (t.shape, t.type_name) for n, t in inventory.items()}, arch, preset)
        what = f"preset {preset} ({theirs / 1e6:.1f} MB of tensors at llama-quantize's types)"
        # llama-quantize's file minus what ours keeps outside the plan: the same bytes in both files
        target = theirs - fixed
    lo = sum(_smallest_bytes(n, t) for n, t in planned.items())
    hi = sum(t.n_bytes for t in planned.values())
    if not lo <= target < hi:
        lo_bpw, hi_bpw = 8 * lo / weights, 8 * hi / weights
        raise McsharpError(
            f"{what} gives the planned tensors {8 * target / weights:.3f} bits per weight; achievable: "
            f"{lo_bpw:.3f} to below {hi_bpw:.3f} (file {(lo + fixed + header) / 1e6:.1f} to "
            f"{(hi + fixed + header) / 1e6:.1f} MB); pick a budget in that range")
    return Budget(planned_bytes=int(target), planned_weights=weights, fixed_bytes=fixed, source=what)
