"""OTP: a tiny learned router per MoE layer that drops some of the top-k expert slots of each token.

Pipeline (DESIGN.md §6): :func:`capture_otp_data` streams the checkpoint one decoder layer at a time and
keeps, per MoE layer, what training needs — the MoE input ``x``, the routing weights of the k slots and
the Gram matrix of the slots' expert outputs (so the block-output error of any keep mask is a k×k
quadratic form, no d-sized tensors). :func:`train_layer_router` fits one router with a straight-through
Gumbel-sigmoid keep mask; :func:`fit_otp` trains every layer for a few λ and keeps, per layer, the router
with the lowest error once its keep logits are shifted so the layer's calibration executed fraction hits
the target.
:func:`otp_tensors` / :func:`otp_metadata` put the result into a GGUF (``blk.N.ffn_otp_*``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import McsharpError

OTP_VERSION = 1
DEFAULT_HIDDEN = 32
DEFAULT_TARGET_FRAC = 0.75
PRUNE_MODES = {"none": 0, "otp": 1, "static": 2, "threshold": 3}  # mcsharp.moe.prune_mode (native/README.md)


@dataclass
class OtpLayerData:
    """One MoE layer's calibration data for router training (slots in descending routing score)."""

    layer: int
    x: torch.Tensor  # (T, d) MoE block input, after the FFN norm
    weights: torch.Tensor  # (T, k) routing weights as the model applies them
    gram: torch.Tensor  # (T, k, k) y_i·y_j of the slots' (unweighted) expert outputs
    ref_sq: torch.Tensor  # (T,) ||full block output||²
    renorm: bool  # the model renormalises the kept top-k weights

    @property
    def top_k(self) -> int:
        return int(self.weights.shape[1])


def renormalises(arch, config) -> bool:
    """Whether ``arch`` renormalises its top-k weights (then the runtime renormalises over kept slots)."""
    if arch.norm_topk_config is None:
        return True
    return bool(getattr(config, arch.norm_topk_config, False))


def slot_outputs(experts: torch.nn.Module, x: torch.Tensor, top_k_index: torch.Tensor) -> torch.Tensor:
    """(T, k, d) unweighted output of the expert in each slot, from the fused expert weights."""
    out = x.new_zeros(x.shape[0], top_k_index.shape[1], x.shape[1])
    ff = experts.down_proj.shape[2]
    with torch.no_grad():
        for e in torch.unique(top_k_index).tolist():
            tok, slot = torch.where(top_k_index == e)
            xe = x[tok]
            gu = xe @ experts.gate_up_proj[e].T
            out[tok, slot] = (experts.act_fn(gu[:, :ff]) * gu[:, ff:]) @ experts.down_proj[e].T
    return out


def capture_otp_data(model_dir, token_ids: torch.Tensor, progress: bool = True) -> list[OtpLayerData]:
    """Layer-streamed forward of the full-precision checkpoint; the training data of every MoE layer."""
    from .calib import LayerStream, capture_moe

    stream = LayerStream.open(model_dir)
    renorm = renormalises(stream.arch, stream.config)
    out = []

    def step(i: int, layer, run, hidden: torch.Tensor) -> torch.Tensor:
        block = stream.moe_block(layer)
        if block is None:
            return run(hidden)
        cap, hidden = capture_moe(block, stream.arch, stream.n_expert, run, hidden)
        # the runtime orders slots by descending score (ggml_argsort_top_k); some routers return them unsorted
        order = torch.argsort(cap.top_k_weights, dim=1, descending=True, stable=True)
        idx, w = cap.top_k_index.gather(1, order), cap.top_k_weights.gather(1, order)
        y = slot_outputs(getattr(block, stream.arch.experts), cap.x, idx)
        out.append(OtpLayerData(layer=i, x=cap.x.float(), weights=w.float(), gram=y @ y.transpose(1, 2),
                                ref_sq=(cap.y.float() ** 2).sum(-1), renorm=renorm))
        return hidden

    stream.sweep(stream.embed(token_ids), step, "otp: capture", progress)
    return out


class OtpRouter(torch.nn.Module):
    """logits = W2 · gelu(W1 · x + b1) + b2: one keep-logit per top-k slot (the runtime's formula)."""

    def __init__(self, d: int, hidden: int, k: int):
        super().__init__()
        self.fc1 = torch.nn.Linear(d, hidden)
        self.fc2 = torch.nn.Linear(hidden, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def pruned_weights(w: torch.Tensor, keep: torch.Tensor, renorm: bool) -> torch.Tensor:
    """Routing weights after dropping slots (keep 0/1, slot 0 kept), renormalised as the runtime does."""
    kept = w * keep
    if renorm:
        kept = kept * (w.sum(-1, keepdim=True) / kept.sum(-1, keepdim=True).clamp_min(1e-12))
    return kept


def mask_error(data: OtpLayerData, keep: torch.Tensor, rows: torch.Tensor | slice = slice(None)) -> torch.Tensor:
    """||y_masked − y_full||² / ||y_full||² over the tokens ``rows`` for the keep mask (T', k)."""
    w = data.weights[rows]
    delta = pruned_weights(w, keep, data.renorm) - w
    num = torch.einsum("ti,tij,tj->", delta, data.gram[rows], delta)
    return num / data.ref_sq[rows].sum().clamp_min(1e-30)


def hard_keep(logits: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """The runtime's rule: keep slot j iff logit_j > threshold; slot 0 always."""
    keep = (logits > threshold).float()
    keep[:, 0] = 1.0
    return keep


@dataclass
class TrainedRouter:
    """One layer's router and how it did on the calibration tokens."""

    layer: int
    state: dict[str, torch.Tensor]
    frac: float  # executed fraction of top-k slots at threshold 0
    err: float  # normalised block-output error at threshold 0

    def module(self) -> OtpRouter:
        w1, w2 = self.state["fc1.weight"], self.state["fc2.weight"]
        r = OtpRouter(w1.shape[1], w1.shape[0], w2.shape[0])
        r.load_state_dict(self.state)
        return r


def train_layer_router(data: OtpLayerData, lam: float, hidden: int = DEFAULT_HIDDEN, steps: int = 300,
                       batch: int = 512, lr: float = 3e-3, tau: tuple[float, float] = (2.0, 0.1),
                       seed: int = 0) -> TrainedRouter:
    """Fit one router: loss = mask error + λ · mean kept fraction of the droppable slots.

    The keep mask is a Gumbel-sigmoid (binary concrete) sample of sigmoid(logit) at temperature τ
    (annealed geometrically), made hard in the forward pass with straight-through gradients.
    """
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    T, d = data.x.shape
    k = data.top_k
    router = OtpRouter(d, hidden, k)
    with torch.no_grad():  # start from "keep everything": training then learns what can go
        router.fc2.weight.mul_(0.1)
        router.fc2.bias.fill_(2.0)
    opt = torch.optim.Adam(router.parameters(), lr=lr)
    # train on standardised inputs (RMSNorm gains spread channel scales widely), fold it into fc1 after
    mu, sd = data.x.mean(0), data.x.std(0).clamp_min(1e-6)
    xs = (data.x - mu) / sd
    for step in range(steps):
        t = tau[0] * (tau[1] / tau[0]) ** (step / max(steps - 1, 1))
        rows = torch.randint(0, T, (min(batch, T),), generator=g)
        logits = router(xs[rows])
        u = torch.rand(logits.shape, generator=g).clamp(1e-6, 1 - 1e-6)
        soft = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / t)
        keep = (soft > 0.5).float() + soft - soft.detach()
        keep = torch.cat([torch.ones_like(keep[:, :1]), keep[:, 1:]], dim=1)
        loss = mask_error(data, keep, rows) + lam * keep[:, 1:].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        router.fc1.bias.sub_(router.fc1.weight @ (mu / sd))
        router.fc1.weight.div_(sd)
        keep = hard_keep(router(data.x))
        err = float(mask_error(data, keep))
    state = {k_: v.detach().clone() for k_, v in router.state_dict().items()}
    return TrainedRouter(data.layer, state, float(keep.mean()), err)


ARRAY_KEYS = {"w1": "fc1.weight", "b1": "fc1.bias", "w2": "fc2.weight", "b2": "fc2.bias"}  # export → module


def layer_arrays(state: dict[str, torch.Tensor], b2_shift: float = 0.0) -> dict[str, np.ndarray]:
    """A router's exported F32 arrays w1, b1, w2, b2 from its module state, with ``b2_shift`` folded into b2."""
    out = {k: state[key].detach().numpy().astype(np.float32) for k, key in ARRAY_KEYS.items()}
    out["b2"] = (state["fc2.bias"].detach() + b2_shift).numpy().astype(np.float32)
    return out


def router_logits(routers: list[TrainedRouter], data: list[OtpLayerData]) -> list[torch.Tensor]:
    """Calibration keep-logits of every layer's router."""
    with torch.no_grad():
        return [r.module()(dat.x) for r, dat in zip(routers, data, strict=True)]


def executed_frac(logits: list[torch.Tensor], shift: float = 0.0) -> float:
    """Mean executed fraction over layers and tokens when ``shift`` is added to every keep-logit."""
    return float(np.mean([hard_keep(lg + shift).mean().item() for lg in logits]))


def shift_for_frac(logits: list[torch.Tensor], target: float) -> float:
    """The logit shift whose executed fraction is closest to ``target`` (bisection; fraction rises with it)."""
    lo, hi = -50.0, 50.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if executed_frac(logits, mid) < target:
            lo = mid
        else:
            hi = mid
    return lo if abs(executed_frac(logits, lo) - target) <= abs(executed_frac(logits, hi) - target) else hi


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
        except (OSError, ValueError, KeyError):
            raise McsharpError(f"{path} is not an OTP router file; write one with `mcsharp otp train`") from None
        layers: dict[int, dict[str, np.ndarray]] = {}
        for key in z.files:
            if key != "__header__":
                n, name = key.split(".", 1)
                layers.setdefault(int(n), {})[name] = z[key]
        return cls(**head, layers=dict(sorted(layers.items())))


DEFAULT_LAMS = (0.01, 0.03, 0.1, 0.3, 1.0)


@dataclass
class Candidate:
    """The routers of every layer trained with one λ, and their calibration keep-logits."""

    lam: float
    routers: list[TrainedRouter]
    logits: list[torch.Tensor]


def train_candidates(data: list[OtpLayerData], lams: tuple[float, ...] = DEFAULT_LAMS,
                     hidden: int = DEFAULT_HIDDEN, steps: int = 300, seed: int = 0,
                     log: Callable[[str], None] | None = None) -> list[Candidate]:
    """Train every layer's router once per λ in ``lams``."""
    if not data:
        raise McsharpError("the model has no MoE layers: OTP has nothing to prune")
    out = []
    for lam in lams:
        routers = [train_layer_router(dat, lam, hidden=hidden, steps=steps, seed=seed + dat.layer) for dat in data]
        out.append(Candidate(lam, routers, router_logits(routers, data)))
        if log:
            log(f"[otp] lambda {lam:.3g}: trained executed fraction {np.mean([r.frac for r in routers]):.3f}")
    return out


def select_for_target(candidates: list[Candidate], data: list[OtpLayerData], target_frac: float,
                      log: Callable[[str], None] | None = None) -> OtpRouters:
    """Per layer, the candidate router whose keep-logits, shifted so that layer executes ``target_frac`` of its
    calibration slots, give the lowest block-output error; the shift is folded into b2.

    Every layer executes the same fraction: a global trade-off on the normalised block-output error prunes
    layers whose routed experts are small next to the shared expert (or to massive activations) almost
    completely, and that costs far more downstream than the block error says (measured on the fixture).
    λ is picked by the error at the target rather than by the fraction training lands on: with a hard
    straight-through mask the trained fraction jumps with λ, while the shift reaches any fraction smoothly.
    """
    k = data[0].top_k
    if not (1.0 / k <= target_frac <= 1.0):
        raise McsharpError(f"--otp-target-frac {target_frac} is outside [{1.0 / k:.3f}, 1] (slot 0 of the "
                           f"top-{k} is always kept)")
    hidden = int(candidates[0].routers[0].state["fc1.weight"].shape[0])
    res = OtpRouters(n_embd=int(data[0].x.shape[1]), top_k=k, hidden=hidden, target_frac=target_frac,
                     calib_frac=0.0, calib_err=0.0, lam=[])
    fracs, errs = [], []
    for i, dat in enumerate(data):
        best = None
        for cand in candidates:
            lg = cand.logits[i]
            shift = shift_for_frac([lg], target_frac)
            with torch.no_grad():
                err = mask_error(dat, hard_keep(lg + shift)).item()
            if best is None or err < best[0]:
                best = (err, cand, shift)
        err, cand, shift = best
        s = cand.routers[i].state
        res.layers[dat.layer] = layer_arrays(s, shift)
        res.lam.append(cand.lam)
        fracs.append(executed_frac([cand.logits[i]], shift))
        errs.append(err)
    res.calib_frac, res.calib_err = float(np.mean(fracs)), float(np.mean(errs))
    if log:
        log(f"[otp] per-layer lambda {sorted(set(res.lam))}: calibration executed fraction {res.calib_frac:.3f}, "
            f"block-output error {res.calib_err:.4f}")
    return res


def fit_otp(data: list[OtpLayerData], target_frac: float = DEFAULT_TARGET_FRAC, hidden: int = DEFAULT_HIDDEN,
            lams: tuple[float, ...] = DEFAULT_LAMS, steps: int = 300, seed: int = 0,
            log: Callable[[str], None] | None = None) -> OtpRouters:
    """Routers for every MoE layer at ``target_frac``: :func:`train_candidates`, then :func:`select_for_target`."""
    if not data:
        raise McsharpError("the model has no MoE layers: OTP has nothing to prune")
    k = data[0].top_k
    if not (1.0 / k <= target_frac <= 1.0):  # before the training, not after
        raise McsharpError(f"--otp-target-frac {target_frac} is outside [{1.0 / k:.3f}, 1] (slot 0 of the "
                           f"top-{k} is always kept)")
    cands = train_candidates(data, lams, hidden=hidden, steps=steps, seed=seed, log=log)
    return select_for_target(cands, data, target_frac, log=log)


def layer_logits(lay: dict[str, np.ndarray], x: torch.Tensor) -> torch.Tensor:
    """Keep-logits of one exported layer router (arrays w1, b1, w2, b2) on inputs x (T, d)."""
    w = {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in lay.items()}
    return F.gelu(x @ w["w1"].T + w["b1"]) @ w["w2"].T + w["b2"]


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
    from .llama_src import import_gguf

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


def gguf_moe_shape(reader) -> tuple[str, int, int, list[int]]:
    """(arch, n_embd, n_expert_used, MoE layer ids) of an open GGUF."""
    from .gguf_edit import field_value

    arch = field_value(reader, "general.architecture")
    n_embd = field_value(reader, f"{arch}.embedding_length")
    k = field_value(reader, f"{arch}.expert_used_count")
    layers = sorted(int(t.name.split(".")[1]) for t in reader.tensors if t.name.endswith(".ffn_gate_inp.weight"))
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


def add_otp_to_gguf(src: str | Path, routers: OtpRouters, dst: str | Path) -> Path:
    """Copy ``src`` with these routers (replacing any it had) into ``dst``, after checking they fit."""
    from .gguf_edit import open_gguf, rewrite_gguf

    check_routers_fit(routers, Path(src), *gguf_moe_shape(open_gguf(src)))
    return rewrite_gguf(src, dst, drop_key=_is_otp_key, add_kv=otp_kv(routers), drop_tensor=_is_otp_tensor,
                        add_tensors=otp_tensors(routers))


def strip_otp(src: str | Path, dst: str | Path) -> Path:
    """Copy ``src`` without its OTP tensors and ``mcsharp.otp.*`` keys (error if it has none)."""
    from .gguf_edit import open_gguf, rewrite_gguf

    reader = open_gguf(src)
    if not any(_is_otp_tensor(t.name) for t in reader.tensors):
        raise McsharpError(f"{src} has no OTP tensors (blk.N.ffn_otp_*); nothing to strip")
    return rewrite_gguf(src, dst, drop_key=_is_otp_key, drop_tensor=_is_otp_tensor)


def model_moe_shape(model_dir: str | Path) -> tuple[str, int, int]:
    """(llama.cpp architecture, hidden size, top-k) from a checkpoint's config.json."""
    from .converters import get_architecture

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    adapter = get_architecture((cfg.get("architectures") or [""])[0])
    cfg = cfg.get("text_config", cfg)
    return (adapter.llama_arch if adapter else "", int(cfg["hidden_size"]),
            int(cfg.get("num_experts_per_tok") or cfg.get("moe_top_k") or 0))


def prune_overrides(otp: str | None = None, top_k: int | None = None, prune_mu: float | None = None) -> dict:
    """kv_overrides for the runtime's pruning knobs (DESIGN.md §7): OTP on/off/threshold, static k, μ rule.

    ``otp`` is ``on``, ``off`` or ``threshold=T``; at most one pruning rule may be chosen.
    """
    chosen = [n for n, v in (("--otp on/threshold", otp not in (None, "off")), ("--top-k", top_k is not None),
                             ("--prune-mu", prune_mu is not None)) if v]
    if len(chosen) > 1:
        raise McsharpError(f"{' and '.join(chosen)} are different pruning rules; choose one")
    # prune modes as integers: a string override first trips the loader's integer read (a logged warning)
    kv: dict = {}
    if otp == "off":
        kv["mcsharp.otp.enable"] = False
    elif otp == "on":
        kv["mcsharp.moe.prune_mode"] = PRUNE_MODES["otp"]
    elif otp is not None:
        if not otp.startswith("threshold="):
            raise McsharpError(f"--otp {otp}: expected on, off or threshold=T")
        try:
            t = float(otp.split("=", 1)[1])
        except ValueError:
            raise McsharpError(f"--otp {otp}: T must be a number, e.g. threshold=0.5") from None
        kv.update({"mcsharp.moe.prune_mode": PRUNE_MODES["otp"], "mcsharp.otp.threshold": t})
    if top_k is not None:
        if top_k < 1:
            raise McsharpError(f"--top-k {top_k}: keep at least 1 expert slot")
        kv.update({"mcsharp.moe.prune_mode": PRUNE_MODES["static"], "mcsharp.moe.static_k": int(top_k)})
    if prune_mu is not None:
        if not 0.0 <= prune_mu <= 1.0:
            raise McsharpError(f"--prune-mu {prune_mu}: μ is a fraction of the top-1 weight in [0, 1]")
        kv.update({"mcsharp.moe.prune_mode": PRUNE_MODES["threshold"], "mcsharp.moe.threshold_mu": float(prune_mu)})
    return kv


def train_otp(model_dir: str | Path, token_ids: torch.Tensor, target_frac: float = DEFAULT_TARGET_FRAC,
              hidden: int = DEFAULT_HIDDEN, refine_steps: int = 0, log: Callable[[str], None] | None = None,
              progress: bool = True) -> OtpRouters:
    """Calibrate (layer-streamed) and train the routers of every MoE layer of a checkpoint; with
    ``refine_steps`` > 0, then refine them end to end on the logits' KL (:func:`refine_otp_kl`)."""
    routers = fit_otp(capture_otp_data(model_dir, token_ids, progress=progress), target_frac=target_frac,
                      hidden=hidden, log=log)
    routers.arch = model_moe_shape(model_dir)[0]
    if refine_steps > 0:
        routers = refine_otp_kl(model_dir, token_ids, routers, steps=refine_steps, log=log, progress=progress)
    return routers


def _router_from_arrays(lay: dict[str, np.ndarray]) -> OtpRouter:
    r = OtpRouter(lay["w1"].shape[1], lay["w1"].shape[0], lay["w2"].shape[0])
    r.load_state_dict({ARRAY_KEYS[k]: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in lay.items()})
    return r


def refine_otp_kl(model_dir: str | Path, token_ids: torch.Tensor, routers: OtpRouters, steps: int = 40,
                  lr: float = 1e-3, batch: int = 2, tau: tuple[float, float] = (1.0, 0.2), rho: float = 10.0,
                  seed: int = 0, log: Callable[[str], None] | None = None, progress: bool = True) -> OtpRouters:
    """Fine-tune every layer's router jointly on KL(full model ‖ pruned model) of the next-token distribution.

    The layer-wise training sees one block's output error at a time, with the full model's inputs; here the
    pruned model runs end to end (each router sees what upstream pruning produced) and the loss is what the
    evaluation measures. The forward pass applies the deployed rule (keep iff logit > 0) with a temperature-τ
    sigmoid's straight-through gradient, plus ρ·Σ(layer executed fraction − target)² to hold each layer at the
    target; before and afterwards each layer's keep logits are shifted (into b2) so that, with every router
    active, it executes exactly the target fraction of its calibration slots. ``calib_kl`` of the result records
    the end-to-end KL on the calibration tokens before and after, both at the target fraction; when refinement
    did not lower it, the layer-wise routers (re-shifted) are returned. Needs the whole model in memory in fp32
    (the layer-wise stage streams): for models that fit, e.g. the fixture.
    """
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    from .calib import LayerStream

    stream = LayerStream.open(model_dir)  # the adapter: where blocks / experts live, how weights renormalise
    arch, renorm = stream.arch, renormalises(stream.arch, stream.config)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    mods = {n: _router_from_arrays(lay) for n, lay in routers.layers.items()}
    state: dict = {"mode": "off", "tau": tau[0], "x": {}, "keep": {}}

    def save_x(n, mod, args):
        state["x"][n] = args[0].reshape(-1, args[0].shape[-1])

    def mask(n, mod, args):
        if state["mode"] == "off":
            return None
        x, idx, w = args[0], args[1], args[2]
        order = torch.argsort(w.detach(), dim=1, descending=True, stable=True)  # the runtime's slot order
        ws = w.gather(1, order)
        logits = mods[n](state["x"][n])
        if state["mode"] == "soft":
            # the deployed rule (logit > 0) in the forward pass, a sigmoid's gradient in the backward one: no
            # Gumbel noise here, since random keeps near the threshold would train a rule that is never run
            soft = torch.sigmoid(logits / state["tau"])
            keep = (logits > 0).float() + soft - soft.detach()
        else:
            keep = (logits > 0).float()
        keep = torch.cat([torch.ones_like(keep[:, :1]), keep[:, 1:]], dim=1)
        state["keep"][n] = keep
        kept = pruned_weights(ws, keep, renorm)
        return x, idx, torch.zeros_like(w).scatter(1, order, kept)

    hooks = []
    for n, layer in enumerate(model.model.layers):
        if n in mods:
            block = getattr(layer, arch.moe_block)
            hooks.append(block.register_forward_pre_hook(partial(save_x, n)))
            hooks.append(getattr(block, arch.experts).register_forward_pre_hook(partial(mask, n)))
    params = [p for r in mods.values() for p in r.parameters()]
    opt = torch.optim.Adam(params, lr=lr)
    target = routers.target_frac
    n_seq = token_ids.shape[0]

    def hard_kl_and_inputs() -> tuple[float, dict[int, torch.Tensor]]:
        """KL(full ‖ pruned) over all calibration tokens with the hard rule, and every router's inputs."""
        xs, kls = {n: [] for n in mods}, []
        with torch.no_grad():
            for s in range(n_seq):
                state["mode"] = "off"
                teacher = torch.log_softmax(model(token_ids[s:s + 1], use_cache=False).logits.float(), -1)
                state["mode"] = "hard"
                student = torch.log_softmax(model(token_ids[s:s + 1], use_cache=False).logits.float(), -1)
                kls.append((teacher.exp() * (teacher - student)).sum(-1).flatten())
                for n in mods:
                    xs[n].append(state["x"][n])
        return float(torch.cat(kls).mean()), {n: torch.cat(v) for n, v in xs.items()}

    def shift_to_target() -> list[float]:
        """Shift every router's keep logits so it executes the target fraction with upstream pruning active."""
        _, xs = hard_kl_and_inputs()
        fracs = []
        with torch.no_grad():
            for n, r in mods.items():
                lg = r(xs[n])
                shift = shift_for_frac([lg], target)
                fracs.append(executed_frac([lg], shift))
                r.fc2.bias.add_(shift)
        return fracs

    try:
        # the layer-wise routers were shifted on unpruned inputs; compare both at the same fraction, as run
        fracs = shift_to_target()
        kl_before, _ = hard_kl_and_inputs()
        start = {n: {k: v.clone() for k, v in r.state_dict().items()} for n, r in mods.items()}
        for step in tqdm(range(steps), desc="otp kl refine", unit="step", disable=not progress):
            state["tau"] = tau[0] * (tau[1] / tau[0]) ** (step / max(steps - 1, 1))
            rows = token_ids[torch.arange(step * batch, (step + 1) * batch) % n_seq]
            with torch.no_grad():
                state["mode"] = "off"
                teacher = torch.log_softmax(model(rows, use_cache=False).logits.float(), -1)
            state["mode"] = "soft"
            student = torch.log_softmax(model(rows, use_cache=False).logits.float(), -1)
            kl = (teacher.exp() * (teacher - student)).sum(-1).mean()
            pen = sum((k.mean() - target) ** 2 for k in state["keep"].values()) / len(mods)
            opt.zero_grad()
            (kl + rho * pen).backward()
            opt.step()
        new_fracs = shift_to_target()
        kl_after, _ = hard_kl_and_inputs()
        if kl_after < kl_before:
            fracs = new_fracs
        else:  # the refinement did not pay off on its own tokens: keep the (shifted) layer-wise routers
            for n, r in mods.items():
                r.load_state_dict(start[n])
    finally:
        for h in hooks:
            h.remove()
    out = OtpRouters(**{**routers.__dict__, "layers": {n: layer_arrays(r.state_dict()) for n, r in mods.items()}})
    out.calib_frac, out.calib_kl = float(np.mean(fracs)), (kl_before, kl_after)
    if log:
        log(f"[otp] KL refinement ({steps} steps): calibration KL {kl_before:.4f} → {kl_after:.4f} at executed "
            f"fraction {out.calib_frac:.3f}" + ("" if kl_after < kl_before else "; kept the layer-wise routers"))
    return out
