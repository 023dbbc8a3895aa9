"""OTP routers as files: the ``.npz`` router file, the GGUF tensors ``blk.N.ffn_otp_*`` and ``mcsharp.otp.*`` keys
(written at conversion, added to or stripped from an existing GGUF), and the checks that routers fit a model."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..converters import get_architecture
from ..errors import McsharpError
from ..gguf.edit import open_gguf, rewrite_gguf
from ..gguf.table import GgufHeader, read_header
from ..llama_src import import_gguf

OTP_VERSION = 1


@dataclass
class OtpRouters:
    """The trained routers of a model, ready for a GGUF; ``layers[N]`` holds numpy w1, b1, w2, b2."""

    n_embd: int
    top_k: int
    hidden: int
    target_frac: float
    calib_frac: float  # executed fraction on the calibration tokens
    calib_err: float  # mean normalised block-output error on the calibration tokens
    lam: list[float]  # the λ each layer's router was trained with
    arch: str = ""  # llama.cpp architecture of the model they were trained on ("" = unknown)
    calib_kl: tuple[float, float] | None = None  # end-to-end KL before / after refine_otp_kl, if it ran
    layers: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)

    def save(self, path: str | Path) -> None:
        """One ``.npz``: arrays ``L.w1`` … plus a JSON header."""
        head = {k: getattr(self, k) for k in ("n_embd", "top_k", "hidden", "target_frac", "calib_frac",
                                                "calib_err", "lam", "arch", "calib_kl")}
        arrays = {f"{n}.{k}": v for n, lay in self.layers.items() for k, v in lay.items()}
        with open(path, "wb") as fh:
            np.savez(fh, __header__=np.frombuffer(json.dumps(head).encode(), dtype=np.uint8), **arrays)

    @classmethod
    def load(cls, path: str | Path) -> OtpRouters:
        try:
            z = np.load(path)
            head = json.loads(bytes(z["__header__"]).decode())
            layers: dict[int, dict[str, np.ndarray]] = {}
            for key in z.files:
                if key != "__header__":
                    n, name = key.split(".", 1)
                    layers.setdefault(int(n), {})[name] = z[key]
            return cls(**head, layers=dict(sorted(layers.items())))
        except (OSError, ValueError, KeyError, TypeError, EOFError, AttributeError):
            raise McsharpError(f"{path} is not an OTP router file; write one with `mcsharp otp train`") from None


def otp_tensors(routers: OtpRouters) -> list[tuple[str, np.ndarray]]:
    """GGUF tensors ``blk.N.ffn_otp_*`` (numpy shapes are ggml ``ne`` reversed: w1 (h, n_embd))."""
    out = []
    for n, lay in sorted(routers.layers.items()):
        out += [(f"blk.{n}.ffn_otp_w1.weight", lay["w1"]), (f"blk.{n}.ffn_otp_b1.bias", lay["b1"]),
                (f"blk.{n}.ffn_otp_w2.weight", lay["w2"]), (f"blk.{n}.ffn_otp_b2.bias", lay["b2"])]
    return out


def otp_kv(routers: OtpRouters) -> list[tuple[str, object, str]]:
    """Metadata (key, value, gguf value type name) recorded with the routers."""
    return [("mcsharp.otp.version", OTP_VERSION, "UINT32"), ("mcsharp.otp.hidden_size", routers.hidden, "UINT32"),
            ("mcsharp.otp.threshold", 0.0, "FLOAT32"), ("mcsharp.otp.target_frac", routers.target_frac, "FLOAT32"),
            ("mcsharp.otp.calib_frac", routers.calib_frac, "FLOAT32")]


def otp_metadata(routers: OtpRouters):
    """``extra_kv`` for convert_checkpoint: write the router tensors and their metadata."""
    gguf = import_gguf()

    def add(writer) -> None:
        for key, value, vtype in otp_kv(routers):
            writer.add_key_value(key, value, getattr(gguf.GGUFValueType, vtype))
        for name, arr in otp_tensors(routers):
            writer.add_tensor(name, arr)

    return add


def _is_otp_tensor(name: str) -> bool:
    return ".ffn_otp_" in name


def _is_otp_key(key: str) -> bool:
    return key.startswith("mcsharp.otp.")


def gguf_moe_shape(header: GgufHeader) -> tuple[str, int, int, list[int]]:
    """(arch, n_embd, n_expert_used, MoE layer ids) of a GGUF, from its header (``gguf.table.read_header``)."""
    arch = header.values.get("general.architecture")
    n_embd = header.values.get(f"{arch}.embedding_length")
    k = header.values.get(f"{arch}.expert_used_count")
    layers = sorted(int(t.name.split(".")[1]) for t in header.tensors if t.name.endswith(".ffn_gate_inp.weight"))
    return arch, int(n_embd or 0), int(k or 0), layers


def check_routers_fit(routers: OtpRouters, path: Path, arch: str, n_embd: int, top_k: int,
                      layers: list[int]) -> None:
    """Refuse routers trained for another model (architecture, k, hidden size or MoE layers)."""
    if not layers or top_k == 0:
        raise McsharpError(f"{path} has no MoE layers (no blk.N.ffn_gate_inp.weight): OTP has nothing to prune")
    if routers.arch and routers.arch != arch:
        raise McsharpError(f"the OTP routers were trained on a {routers.arch} model, {path} is {arch}; "
                           "train them on the checkpoint this GGUF was converted from")
    if routers.top_k != top_k:
        raise McsharpError(f"the OTP routers were trained for top-{routers.top_k} routing, {path} uses top-{top_k}; "
                           "train them on the checkpoint this GGUF was converted from")
    if routers.n_embd != n_embd:
        raise McsharpError(f"the OTP routers were trained for hidden size {routers.n_embd}, {path} has {n_embd}; "
                           "train them on the checkpoint this GGUF was converted from")
    if sorted(routers.layers) != layers:
        raise McsharpError(f"the OTP routers cover layers {sorted(routers.layers)}, {path} has MoE layers {layers}; "
                           "train them on the checkpoint this GGUF was converted from")
    for n, lay in routers.layers.items():
        check_router_arrays(n, lay, n_embd)


def check_router_arrays(layer: int, lay: dict[str, np.ndarray], n_embd: int) -> None:
    """One layer's router is whole: w1 (hidden, n_embd), b1 (hidden), w2 (out, hidden), b2 (out), all finite (a
    NaN there would make the runtime's keep/drop decision silently meaningless)."""
    if not {"w1", "b1", "w2", "b2"} <= lay.keys():
        raise McsharpError(f"the OTP router of layer {layer} lacks {sorted({'w1', 'b1', 'w2', 'b2'} - lay.keys())}; "
                           "train the routers again")
    w1, b1, w2, b2 = (np.asarray(lay[k]) for k in ("w1", "b1", "w2", "b2"))
    if (w1.ndim != 2 or w1.shape[1] != n_embd or b1.shape != (w1.shape[0],) or w2.ndim != 2
            or w2.shape[1] != w1.shape[0] or b2.shape != (w2.shape[0],)):
        raise McsharpError(f"the OTP router of layer {layer} has inconsistent shapes (w1 {w1.shape}, b1 {b1.shape}, "
                           f"w2 {w2.shape}, b2 {b2.shape}, hidden size {n_embd}); train the routers again")
    for k, a in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
        if not np.isfinite(a).all():
            raise McsharpError(f"the OTP router of layer {layer} has NaN/Inf in {k}; train the routers again")


def add_otp_to_gguf(src: str | Path, routers: OtpRouters, dst: str | Path) -> Path:
    """Copy ``src`` with these routers (replacing any it had) into ``dst``, after checking they fit."""
    check_routers_fit(routers, Path(src), *gguf_moe_shape(read_header(src)))
    return rewrite_gguf(src, dst, drop_key=_is_otp_key, add_kv=otp_kv(routers), drop_tensor=_is_otp_tensor,
                        add_tensors=otp_tensors(routers))


def strip_otp(src: str | Path, dst: str | Path) -> Path:
    """Copy ``src`` without its OTP tensors and ``mcsharp.otp.*`` keys (error if it has none)."""
    reader = open_gguf(src)
    if not any(_is_otp_tensor(t.name) for t in reader.tensors):
        raise McsharpError(f"{src} has no OTP tensors (blk.N.ffn_otp_*); nothing to strip")
    return rewrite_gguf(src, dst, drop_key=_is_otp_key, drop_tensor=_is_otp_tensor)


def model_moe_shape(model_dir: str | Path) -> tuple[str, int, int]:
    """(llama.cpp architecture, hidden size, top-k) from a checkpoint's config.json."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    adapter = get_architecture((cfg.get("architectures") or [""])[0])
    cfg = cfg.get("text_config", cfg)
    return (adapter.llama_arch if adapter else "", int(cfg["hidden_size"]),
            int(cfg.get("num_experts_per_tok") or cfg.get("moe_top_k") or 0))
