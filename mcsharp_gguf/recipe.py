"""What a conversion does, as plain data: the :class:`Recipe` every entry point builds and ``pipeline.run`` executes.

A Recipe is JSON-able and written into the GGUF (``mcsharp.recipe``), so a file says how it was made. Its
defaults are what the quality tables measured best (docs/quality.md, docs/planner.md): a whole-file plan at
llama-quantize's Q3_K_M bytes, stock ggml types, GPTQ-measured importance on the built-in calibration text.
No torch here: the CLI builds a Recipe before any heavy import.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields

from .errors import McsharpError
from .ggml.types import QUANT_TYPES
from .pmq.presets import PRESETS
from .pmq.speed import MAX_SLOWDOWN

DEFAULT_PRESET = "Q3_K_M"
LOSSLESS_PRESETS = {"F32": "f32", "F16": "f16", "BF16": "bf16"}  # plain conversion, no plan
MODES = ("stock", "mixed")
SCOPES = ("file", "global", "layer")
METRICS = ("fisher", "mc")
EPS_SOURCES = ("gptq", "rtn")
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
DENSE_CLASSES = ("attn", "ffn", "embd", "output")  # the classes of non-expert tensors (quant.dense.DenseTypes)
RECIPE_VERSION = 1


@dataclass(frozen=True)
class Recipe:
    """One conversion: its budget (exactly one of ``preset`` / ``size_bytes`` / ``bpw``; none = DEFAULT_PRESET),
    how the plan is chosen, the calibration it learns from, and whether OTP routers are trained.

    ``bpw`` is in bits per planned weight (with ``scope="file"``: the experts and every non-expert tensor the plan
    types; "global"/"layer": the experts only). ``size_bytes`` is the whole file. A preset in LOSSLESS_PRESETS
    converts without a plan. ``dense_types`` (class → type: attn/ffn/embd/output) and ``tensor_types`` ((regex,
    type) rules on GGUF names) fix non-expert types by hand; only for the expert-only scopes.
    """

    preset: str | None = None
    size_bytes: int | None = None
    bpw: float | None = None
    mode: str = "stock"
    scope: str = "file"
    metric: str = "fisher"
    eps_source: str = "gptq"
    flip_probe: str | None = None
    outtype: str = "f16"
    gptq: bool = True
    calib: str = "builtin"
    calib_seqs: int | None = None  # None: scaled to the model (model.calibration.calibration_seqs)
    calib_len: int = 512
    otp: bool = False
    otp_target_frac: float = 0.75
    otp_hidden: int = 32
    otp_refine_steps: int = 0
    dense_types: dict[str, str] = field(default_factory=dict)
    tensor_types: tuple[tuple[str, str], ...] = ()
    max_slowdown: float | None = MAX_SLOWDOWN  # mixed: time over the stock plan's (pmq.speed); None: bytes only
    version: int = RECIPE_VERSION

    def __post_init__(self) -> None:
        self.check()

    @property
    def budget_preset(self) -> str | None:
        """The preset the budget comes from (DEFAULT_PRESET when no budget is given)."""
        if self.preset is None and self.size_bytes is None and self.bpw is None:
            return DEFAULT_PRESET
        return self.preset

    @property
    def lossless(self) -> bool:
        return self.budget_preset in LOSSLESS_PRESETS

    @property
    def lossless_outtype(self) -> str:
        return LOSSLESS_PRESETS.get(self.budget_preset or "", self.outtype)

    def check(self) -> None:
        """One-line errors for settings that cannot work, before anything runs."""
        given = [n for n, v in (("--preset", self.preset), ("--size", self.size_bytes), ("--bpw", self.bpw))
                 if v is not None]
        if len(given) > 1:
            raise McsharpError(f"{' and '.join(given)} both set the budget; give one of --preset, --size, --bpw")
        if self.preset is not None:
            check_preset_name(self.preset)
        if self.bpw is not None and not 0 < self.bpw <= 32:
            raise McsharpError(f"--bpw {self.bpw}: expected bits per weight in (0, 32]")
        if self.size_bytes is not None and self.size_bytes <= 0:
            raise McsharpError(f"--size {self.size_bytes}: expected a positive size such as 12GB")
        for name, value, allowed in (("mode", self.mode, MODES), ("scope", self.scope, SCOPES),
                                     ("metric", self.metric, METRICS), ("eps source", self.eps_source, EPS_SOURCES),
                                     ("outtype", self.outtype, OUTTYPES)):
            if value not in allowed:
                raise McsharpError(f"{name} {value!r} is not one of {', '.join(allowed)}")
        if self.max_slowdown is not None and not self.max_slowdown >= 0:
            raise McsharpError(f"--max-slowdown {self.max_slowdown}: a mixed plan cannot be held below its stock "
                               "plan's time; give a fraction >= 0 (e.g. 0.02) or none")
        if self.otp and not 0.0 < self.otp_target_frac <= 1.0:
            raise McsharpError(f"--otp-target-frac {self.otp_target_frac} must be in (0, 1]")
        if self.otp and self.otp_hidden < 1:
            raise McsharpError(f"--otp-hidden {self.otp_hidden} must be at least 1")
        if (self.calib_seqs is not None and self.calib_seqs < 1) or self.calib_len < 2:
            raise McsharpError(f"calibration of {self.calib_seqs} × {self.calib_len} tokens: need at least 1 × 2")
        if self.dense_types or self.tensor_types:
            self._check_dense_types()

    def _check_dense_types(self) -> None:
        if self.scope == "file":
            raise McsharpError("a whole-file plan chooses every non-expert type itself; drop --attn-type, "
                               "--ffn-type, --embd-type, --output-type and --tensor-type (or use --budget-scope "
                               "global)")
        if self.lossless:
            raise McsharpError("non-expert quantisation types need a PMQ plan (a budget or --plan), not "
                               f"--preset {self.budget_preset}")
        given = [*((f"--{c}-type", t) for c, t in self.dense_types.items()),
                 *((f"--tensor-type {pat}", t) for pat, t in self.tensor_types)]
        for c in self.dense_types:
            if c not in DENSE_CLASSES:
                raise McsharpError(f"no class {c!r} of non-expert tensors; classes: {', '.join(DENSE_CLASSES)}")
        for where, t in given:
            if t not in QUANT_TYPES:
                raise McsharpError(f"{where}={t}: not a type mcsharp writes; use one of {', '.join(QUANT_TYPES)}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Recipe:
        d = json.loads(text)
        if d.get("version") != RECIPE_VERSION:
            raise McsharpError(f"recipe version {d.get('version')} is not this mcsharp's {RECIPE_VERSION}; "
                               "write the recipe again")
        known = {f.name for f in fields(cls)}
        d["tensor_types"] = tuple(tuple(x) for x in d.get("tensor_types", ()))
        return cls(**{k: v for k, v in d.items() if k in known})


def check_preset_name(preset: str) -> None:
    """An unknown preset → one line listing the known ones."""
    if preset not in PRESETS and preset not in LOSSLESS_PRESETS:
        raise McsharpError(f"unknown preset {preset!r}; presets: {', '.join([*PRESETS, *LOSSLESS_PRESETS])}")


_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'12GB', '800MB', '1.5GiB', '123456789' → bytes (GB = 10⁹, GiB = 2³⁰, as llama.cpp prints sizes)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise McsharpError(f"--size {text!r}: expected a size such as 12GB, 800MB or 1.5GiB")
    unit = (m.group(2) or "B").upper().rstrip("B") or "B"
    scale = {"B": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
             "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    return int(float(m.group(1)) * scale)
