"""GPTQ of MoE experts: one expert's gate/up (on the Hessian of its routed inputs) and down (on that of its own
activations), on the Hessians of every token of the layer where too few reached it; and every expert of one
layer."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial

import numpy as np
import torch

from ..executors import InProcess, RayCluster
from ..ggml.libggml import ggml_dequantize
from ..ggml.packing import QuantResult, quantize_rtn
from .gptq import HessianAccumulator, gptq_factor, gptq_factor_in_place, gptq_quantize, gptq_quantize_many

PROJS = ("gate", "up", "down")


class LayerTokens:
    """Every calibration token's input to one MoE block: what an expert that saw fewer tokens than a projection's
    input width borrows that projection's Hessian from (expert_hessians). Measured on the fixture with its
    experts' own tokens cut to ¼–2 × d_model, GPTQ on these pooled Hessians had 0.43–0.77 of RTN's held-out
    output error on gate/up and 0.93–0.95 on down, below GPTQ on the expert's own (damped, rank-deficient)
    Hessian at every level (docs/planner.md, scripts/study_starved_experts.py)."""

    def __init__(self, x: torch.Tensor):
        self.x = x
        self._h_in: torch.Tensor | None = None
        self._u_in: torch.Tensor | None = None
        self._x_bf16: torch.Tensor | None = None

    @property
    def n(self) -> int:
        return int(self.x.shape[0])

    def h_in(self) -> torch.Tensor:
        """Hessian of the block's inputs (the gate/up input of every expert): computed once per layer."""
        if self._h_in is None:
            acc = HessianAccumulator(self.x.shape[1], device=self.x.device)
            acc.add(self.x)
            self._h_in = acc.H
        return self._h_in

    def prepare(self) -> None:
        """Compute the pooled input Hessian and its factor now, if any expert can borrow them: before this object
        is shipped to the tasks that would each compute them again (executors)."""
        if self.n >= self.x.shape[1]:
            self.factor_in(self.h_in())

    def factor_in(self, h: torch.Tensor | None) -> torch.Tensor | None:
        """GPTQ's factor of ``h`` when it is this layer's pooled input Hessian (computed once for every expert
        and type that borrows it), else None."""
        if h is None or h is not self._h_in:
            return None
        if self._u_in is None:
            self._u_in = gptq_factor(h, h.shape[0])
        return self._u_in

    def h_act(self, g: torch.Tensor, u: torch.Tensor, act) -> torch.Tensor:
        """Hessian of one expert's activations (its down projection's input) over every token: what a starved
        expert costs is this forward over all the layer's tokens, whose products are bf16 matmuls
        (activation_hessian) where the expert's weights are bf16 values (as checkpoints store them)."""
        if not (_bf16_values(g) and _bf16_values(u)):
            return activation_hessian(self.x, g, u, act)
        if self._x_bf16 is None:
            self._x_bf16 = self.x.bfloat16()
        return activation_hessian(self._x_bf16, g, u, act)


def _bf16_values(w: torch.Tensor, rows: int = 1024) -> bool:
    """Every value of ``w`` is a bf16 value (checked a block of rows at a time: no whole copy of a Mixtral-8x7B
    expert's 0.2 GB matrices)."""
    return all(torch.equal(c.bfloat16().to(c.dtype), c) for c in w.split(rows))


# activations are accumulated into their Hessian this many bytes at a time: a chunk's products take ~3× it at
# once (0.8 GB at 256 MB, the peak of a Mixtral-8x7B-shape GPTQ pass; 64 MB is as fast)
ACT_CHUNK_BYTES = 1 << 26


def activation_hessian(x: torch.Tensor, g: torch.Tensor, u: torch.Tensor, act) -> torch.Tensor:
    """Hessian of an expert's activations act(x gᵀ) ⊙ (x uᵀ) (its down projection's input) over the rows of
    ``x``, accumulated in float32, in chunks of rows: at Mixtral-8x7B's width (14,336) and 16k tokens, the whole
    activations would be three 0.9 GB arrays at once.

    With ``x`` in bf16 the products are bf16 matmuls (``g``, ``u`` rounded to bf16): on a Qwen3-30B-A3B-shape
    checkpoint's bf16 experts, a starved expert's pooled Hessian over 16k tokens took 0.40-0.44 s instead of
    0.68-0.70 s on 2 cores, within 4e-4 of float32's (relative Frobenius norm; GPTQ damps with 1% of its
    diagonal), and its down projection's GPTQ at Q4_K had 0.0001-0.02% more output error on float32's."""
    acc = HessianAccumulator(g.shape[0], device=x.device)
    rows = max(1, ACT_CHUNK_BYTES // (4 * g.shape[0]))
    g, u = g.to(x.dtype), u.to(x.dtype)
    for a in range(0, x.shape[0], rows):
        xc = x[a:a + rows]
        acc.add(act((xc @ g.T).float()) * (xc @ u.T).float())
    return acc.H


def expert_hessians(g: torch.Tensor, u: torch.Tensor, xe: torch.Tensor, act, gptq: bool = True,
                    d_ff: int | None = None, pooled: LayerTokens | None = None
                    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """GPTQ Hessians of one expert: (gate/up input, down input) from its routed inputs ``xe``; None where that
    projection gets RTN instead (without ``gptq``).

    A projection whose input width exceeds the expert's tokens would have a singular Hessian (GPTQ then fits those
    few tokens and generalises worse than RTN): it borrows the Hessian of every token of the layer (``pooled``,
    LayerTokens) and gets RTN only when those too are fewer than its width, or without ``pooled``.

    ``d_ff``: the expert's full width when ``g``/``u`` are a sample of its neurons (pmq.measure), so that the
    choice between own, pooled and RTN is the one the whole expert gets."""
    if not gptq:
        return None, None
    n, width_in, width_ff = int(xe.shape[0]), xe.shape[1], d_ff or g.shape[0]
    h_in = h_act = None
    if n >= width_in:
        acc = HessianAccumulator(width_in, device=xe.device)
        acc.add(xe)
        h_in = acc.H
    elif pooled is not None and pooled.n >= width_in:
        h_in = pooled.h_in()
    if n >= width_ff:
        h_act = activation_hessian(xe, g, u, act)
    elif pooled is not None and pooled.n >= width_ff:
        h_act = pooled.h_act(g, u, act)
    return h_in, h_act


def expert_factors(hessians: Callable[[], tuple[torch.Tensor | None, torch.Tensor | None]],
                   pooled: LayerTokens | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """GPTQ's factors of the expert's two Hessians ``hessians()`` computes (expert_hessians; the pooled input one
    factored once per layer): what quantize_expert walks with, worth computing once when the expert is
    quantised at several types.

    The expert's own Hessians, read by nothing else, are factored in their own memory (gptq_factor_in_place: the
    same bits, without a Mixtral down projection's 0.8 GB Hessian copied several times); the rare one its damping
    leaves indefinite is computed again (``hessians()``) and damped harder out of place."""
    def factor(h: torch.Tensor, which: int) -> torch.Tensor:
        u = gptq_factor_in_place(h, h.shape[0])
        return u if u is not None else gptq_factor(hessians()[which], h.shape[0])

    h_in, h_act = hessians()
    u_in = (pooled.factor_in(h_in) if pooled is not None else None) if h_in is not None else None
    if h_in is not None and u_in is None:
        u_in = factor(h_in, 0)
    return u_in, (factor(h_act, 1) if h_act is not None else None)


# Experts GPTQ walks together (gptq_quantize_many), by device type: on a GPU a walk's time is its kernel launches,
# so 16 experts cost about what one does; a fixed number, so that the same inputs give the same bytes on the same
# GPU. On the CPU one at a time (any type not listed): its walk is compute-bound (batched measured 0.25 s against
# 0.21 s a 768×2048 Q4_K matrix).
WALK = {"cuda": 16}


def walk_size(device: torch.device) -> int:
    """How many experts one GPTQ walk takes on ``device`` (WALK)."""
    return WALK.get(device.type, 1)


def quantize_expert(g: torch.Tensor, u: torch.Tensor, d: torch.Tensor, types: dict[str, str],
                    factors: tuple[torch.Tensor | None, torch.Tensor | None]) -> dict[str, QuantResult]:
    """One expert's gate/up/down on ``types`` (proj → ggml type): GPTQ walking ``factors`` (expert_factors of
    its Hessians) where there is one, RTN elsewhere."""
    return quantize_experts_together([(g, u, d)], [types], [factors])[0]


def quantize_experts_together(weights: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                              types: list[dict[str, str]],
                              factors: list[tuple[torch.Tensor | None, torch.Tensor | None]], packed: bool = True
                              ) -> list[dict[str, QuantResult]]:
    """quantize_expert of several experts ((gate, up, down), types, factors each): every projection of the experts
    with a factor and one type walked together (gptq_quantize_many, walk_size of them at a time), RTN for the
    others. Without ``packed`` the GPTQ results carry no bytes (the importance pass needs the decoded weights)."""
    out: list[dict[str, QuantResult]] = [{} for _ in weights]
    for i, p, res in each_expert_quantised(weights, types, factors, packed):
        out[i][p] = res
    return out


def each_expert_quantised(weights: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                          types: list[dict[str, str]],
                          factors: list[tuple[torch.Tensor | None, torch.Tensor | None]], packed: bool = True
                          ) -> Iterator[tuple[int, str, QuantResult]]:
    """What quantize_experts_together computes, as (expert's position in ``weights``, projection, result) when
    each is done: a caller that stores the result right away holds one projection's results at a time (a
    Mixtral-8x7B expert's three are 0.9 GB)."""
    together = walk_size(weights[0][0].device) if weights else 1
    for k, p in enumerate(PROJS):
        which = 1 if p == "down" else 0
        groups: dict[str, list[int]] = {}
        for i, (w, t, f) in enumerate(zip(weights, types, factors, strict=True)):
            if f[which] is None:
                yield i, p, quantize_rtn(w[k], t[p])
            else:
                groups.setdefault(t[p], []).append(i)
        for t, idx in groups.items():
            for j in range(0, len(idx), together):
                walk = idx[j:j + together]
                if len(walk) == 1:  # (the lone walk: the ops the CPU's files were measured with)
                    res = [gptq_quantize(weights[walk[0]][k], None, t, U=factors[walk[0]][which], packed=packed)]
                else:
                    res = gptq_quantize_many([weights[i][k] for i in walk], [factors[i][which] for i in walk], t,
                                             packed=packed)
                for i in walk:
                    yield i, p, res.pop(0)


def quantize_expert_group(group: list[tuple[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]],
                          types: list[dict[str, str]], pooled: LayerTokens, act, gptq: bool = True
                          ) -> list[tuple[int, str, np.ndarray]]:
    """GPTQ of a group of one layer's experts, each (expert, (gate, up, down), its routed inputs), walked together
    (walk_size of them) on the Hessians expert_hessians gives them: (expert, projection, packed bytes) of each.
    The unit of work an executor runs (a Ray task on a cluster)."""
    weights = [w for _, w, _ in group]
    # gate/up widened (from bf16) for the Hessians alone; each projection's walk widens its own copy, so a
    # Mixtral-8x7B expert's 0.7 GB of float32 weights are not held through its down projection's GPTQ
    factors = [expert_factors(partial(expert_hessians, g.float(), u.float(), xe, act, gptq, pooled=pooled), pooled)
               for _, (g, u, _), xe in group]
    return [(group[i][0], p, np.asarray(res.packed))
            for i, p, res in each_expert_quantised(weights, [types[e] for e, _, _ in group], factors)]


def quantize_layer_experts(gate_up: torch.Tensor, down: torch.Tensor, x: torch.Tensor, top_k_index: torch.Tensor,
                           types: list[dict[str, str]], act, gptq: bool = True,
                           executor: InProcess | RayCluster | None = None) -> dict:
    """GPTQ of one layer's experts ``gate_up`` / ``down`` (float32 or bf16, left as they are:
    load_packed_experts puts the results into the layer) by quantize_expert_group: on their own Hessians, or
    those of every token ``x`` of the layer where one saw too few.

    ``types[e]`` maps gate/up/down → ggml type; ``executor`` (executors.connect; default: this process) runs
    the groups. Returns {"packed": {(e, proj): uint8}, "tokens": per-expert token counts, "types": types}.
    """
    executor = executor or InProcess()
    ff = down.shape[2]
    pooled = LayerTokens(x)
    if gptq and executor.remote:  # the pooled input Hessian's factor once here, not in every task borrowing it
        pooled.prepare()
    routed = [(top_k_index == e).any(dim=1) for e in range(len(types))]
    together = walk_size(x.device)

    def views(e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return gate_up[e, :ff], gate_up[e, ff:], down[e]  # (as stored: widened where each is walked)

    groups = ([(e, views(e), x[routed[e]]) for e in range(e0, min(e0 + together, len(types)))]
              for e0 in range(0, len(types), together))  # (on a GPU, walk_size experts walked together)
    packed = {}
    for result in executor.map(quantize_expert_group, groups, types=types, pooled=pooled, act=act, gptq=gptq):
        for e, p, data in result:
            packed[(e, p)] = data
    return {"packed": packed, "tokens": [int(r.sum()) for r in routed], "types": types}


# A layer's finished experts kept in the checkpoint's dtype are decoded into float32 once when they take at most
# this many bytes so (the bf16 ones let go first: +1.2 GB at Qwen3-30B-A3B's shape, whose next forward then takes
# 17 s instead of 41 s decoding each expert for every sequence); larger ones (Mixtral-8x7B's: 5.6 GB) are decoded
# by the forward as it takes them.
DECODE_ONCE_BYTES = 3 << 30


def load_packed_experts(experts: torch.nn.Module, done: dict) -> None:
    """Put a finished layer's experts (``done``: quantize_layer_experts' result, or the work-dir entry it was saved
    as) into ``experts``, decoded from their packed bytes by libggml (bit-exact with what GPTQ computed): into
    float32 weights (written over them in place, or replacing the checkpoint-dtype ones of LayerStream's
    ``experts_as_stored`` up to DECODE_ONCE_BYTES); beyond that, decoded into the forward's buffer each time it
    takes them (ExpertMatrices), since bf16 cannot hold them."""
    ff = experts.down_proj.shape[2]
    if experts.down_proj.dtype != torch.float32:
        if 4 * (experts.gate_up_proj.numel() + experts.down_proj.numel()) > DECODE_ONCE_BYTES:
            for e, t in enumerate(done["types"]):
                experts.matrices.replaced[e] = partial(_decode_expert, done["packed"], e, t, ff)
            return
        for name in ("gate_up_proj", "down_proj"):
            shape = getattr(experts, name).shape
            setattr(experts, name, torch.nn.Parameter(torch.empty(0), requires_grad=False))  # (bf16 let go)
            setattr(experts, name, torch.nn.Parameter(torch.empty(shape), requires_grad=False))
    with torch.no_grad():
        for e, t in enumerate(done["types"]):
            for name in ("gate_up_proj", "down_proj"):
                w = getattr(experts, name)[e]
                if w.device.type == "cpu":  # (decoded in place)
                    _decode_expert(done["packed"], e, t, ff, name, w.detach())
                else:  # (libggml decodes on the CPU)
                    buf = torch.empty(w.shape)
                    _decode_expert(done["packed"], e, t, ff, name, buf)
                    w.copy_(buf)


def _decode_expert(packed: dict, e: int, types: dict[str, str], ff: int, name: str, out: torch.Tensor) -> None:
    """Expert ``e``'s ``name`` matrix ("gate_up_proj": gate over up; "down_proj") decoded from its packed bytes
    into ``out`` (an ExpertMatrices buffer on the CPU)."""
    parts = (("gate", out[:ff]), ("up", out[ff:])) if name == "gate_up_proj" else (("down", out),)
    for p, rows in parts:
        ggml_dequantize(packed[(e, p)], types[p], tuple(rows.shape), out=rows.numpy())
