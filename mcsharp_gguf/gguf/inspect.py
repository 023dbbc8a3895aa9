"""What is inside a GGUF: tensor types and bytes, true bits per weight by tensor class, MoE shape."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..llama_src import import_gguf
from ..model.names import tensor_class
from .edit import open_gguf


@dataclass
class TensorRow:
    name: str
    type: str
    shape: list[int]
    n_elements: int
    n_bytes: int
    cls: str


@dataclass
class ClassTotals:
    n_elements: int = 0
    n_bytes: int = 0

    @property
    def bpw(self) -> float:
        return 8.0 * self.n_bytes / self.n_elements if self.n_elements else 0.0


@dataclass
class GgufReport:
    """Summary printed by ``mcsharp inspect`` (``--json`` prints :meth:`to_json`)."""

    path: str
    file_bytes: int
    arch: str
    n_expert: int | None
    n_expert_used: int | None
    n_layer: int | None
    tensors: list[TensorRow]
    classes: dict[str, ClassTotals] = field(default_factory=dict)
    metadata: dict[str, object] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "path": self.path, "file_bytes": self.file_bytes, "arch": self.arch, "n_expert": self.n_expert,
            "n_expert_used": self.n_expert_used, "n_layer": self.n_layer,
            "otp": any(t.cls == "otp" for t in self.tensors),
            "classes": {k: {"n_elements": v.n_elements, "n_bytes": v.n_bytes, "bpw": v.bpw}
                        for k, v in self.classes.items()},
            "metadata": self.metadata,
            "tensors": [asdict(t) for t in self.tensors],
        }


def _field_value(f):
    """Decode a scalar or string GGUF field (arrays are summarised by length)."""
    gguf = import_gguf()
    if not f.types:
        return None
    if f.types[0] == gguf.GGUFValueType.ARRAY:
        return f"[{len(f.data)} items]"
    val = f.parts[f.data[0]]
    if f.types[0] == gguf.GGUFValueType.STRING:
        return bytes(val).decode("utf-8", errors="replace")
    return val.tolist()[0] if isinstance(val, np.ndarray) else val


def read_report(path: str | Path) -> GgufReport:
    """Parse ``path`` with gguf-py's reader (no runtime needed)."""
    reader = open_gguf(path)
    kv = {name: f for name, f in reader.fields.items()}
    arch = _field_value(kv["general.architecture"]) if "general.architecture" in kv else "unknown"

    def arch_int(key: str) -> int | None:
        f = kv.get(f"{arch}.{key}")
        return int(_field_value(f)) if f is not None else None

    rows, classes = [], {}
    for t in reader.tensors:
        row = TensorRow(name=t.name, type=t.tensor_type.name, shape=[int(x) for x in t.shape],
                        n_elements=int(t.n_elements), n_bytes=int(t.n_bytes), cls=tensor_class(t.name))
        rows.append(row)
        tot = classes.setdefault(row.cls, ClassTotals())
        tot.n_elements += row.n_elements
        tot.n_bytes += row.n_bytes
    meta = {k: _field_value(f) for k, f in kv.items() if k.startswith("mcsharp.")}
    return GgufReport(path=str(path), file_bytes=path.stat().st_size, arch=str(arch),
                      n_expert=arch_int("expert_count"), n_expert_used=arch_int("expert_used_count"),
                      n_layer=arch_int("block_count"), tensors=rows, classes=classes, metadata=meta)


def format_report(rep: GgufReport, show_tensors: bool = True) -> str:
    """Human-readable table."""
    lines = [f"{rep.path}: {rep.file_bytes / 1e6:.1f} MB, arch {rep.arch}, {rep.n_layer} layers, "
             f"{rep.n_expert} experts, {rep.n_expert_used} used per token"]
    for cls in ("experts", "attention", "otp", "other"):
        if cls in rep.classes:
            c = rep.classes[cls]
            lines.append(f"  {cls:<10} {c.n_elements / 1e6:9.2f} M weights {c.n_bytes / 1e6:9.2f} MB "
                         f"{c.bpw:6.3f} bpw")
    for k, v in rep.metadata.items():
        lines.append(f"  {k} = {v}")
    if show_tensors:
        lines.append(f"  {'tensor':<44} {'type':<8} {'shape':<20} {'bytes':>12}")
        for t in rep.tensors:
            lines.append(f"  {t.name:<44} {t.type:<8} {'x'.join(map(str, t.shape)):<20} {t.n_bytes:>12}")
    return "\n".join(lines)
