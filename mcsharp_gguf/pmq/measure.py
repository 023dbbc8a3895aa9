"""Measuring importance: one layer-streamed pass (forward, then the reverse pass of sensitivity.py) that records,
per MoE layer, phi, w and every (expert, candidate type)'s eps, and per non-expert tensor its Fisher error;
resumable from a work dir, layer by layer.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from ..errors import McsharpError
from ..executors import InProcess, RayCluster
from ..files import write_atomically
from ..ggml.packing import quantize_rtn
from ..ggml.types import storable_type
from ..model.names import checkpoint_name, gguf_name_map
from ..model.stream import LayerStream, dense_linears
from ..quant.experts import LayerTokens, expert_factors, expert_hessians, quantize_experts_together, walk_size
from .candidates import ANCHOR_TYPE, DENSE_TYPES, EXPERT_TYPES, Recipe
from .eps import _dense_fisher, expert_output_delta, fisher_error, fisher_error_split, fold_a_mask
from .importance import LayerImportance, ModelImportance, TensorImportance
from .sensitivity import perturbation_kl, resumable_from, reverse_layers

EPS_SOURCE = "gptq"  # measure_importance's quantiser for eps (see its docstring; README: it plans better)
# Experts at least twice this wide are measured on this many of their intermediate neurons (sample_neurons), in
# chunks of NEURON_CHUNK: the largest ggml block, so a chunk's rows of gate/up and columns of down are whole blocks
# of every candidate type and quantise exactly as they do in the whole expert (docs/planner.md: the study)
NEURON_SAMPLE, NEURON_CHUNK = 2048, 256


@dataclass
class _Measure:
    """What every item of one importance pass shares (see measure_importance)."""

    stream: object  # model.stream.LayerStream
    token_ids: torch.Tensor
    targets: tuple[str, ...]
    dense_types: tuple[str, ...]
    gptq: bool
    tap_scale: float
    flip_probe: str | None
    in_a: torch.Tensor  # fold A mask over all calibration tokens
    tied: bool  # the LM head is the token embedding (GGUF then has no output.weight)
    expert_sample: int | None  # measure every type on this many experts of a layer (None: on all of them)
    neuron_sample: int | None  # measure wide experts on this many of their neurons (None: on all of them)
    executor: InProcess | RayCluster  # where each expert's measurement runs (executors.connect)


@dataclass
class _Case:
    """One expert in the importance pass, as every candidate type's measurement of it uses it."""

    tokens: ExpertTokens  # the calibration tokens routed to it (and which expert it is)
    weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # gate, up, down (a neuron sample of wide experts)
    scale: float  # from the sample's error to the whole expert's
    factors: tuple[torch.Tensor | None, torch.Tensor | None]  # GPTQ's, of its two Hessians
    base: torch.Tensor  # its unquantised output on x


def _head_record(m: _Measure, item) -> dict:
    """The LM head's Fisher errors (a TensorImportance unless tied: then they add to the embedding's)."""
    head = m.stream.lm_head()
    x, g = item.taps["lm_head"]
    eps, eps_a = _dense_fisher(head, x, g, m.dense_types, m.in_a[:x.shape[0]], gptq=m.gptq and not m.tied,
                               scale=m.tap_scale)
    tensors = [] if m.tied else [asdict(TensorImportance("output.weight", "output", *head.shape, eps,
                                                         eps_fisher_a=eps_a))]
    return {"tensors": tensors, "head_eps": eps, "head_eps_a": eps_a}


def _embedding_record(m: _Measure, item, head: dict) -> dict:
    """The token embedding's Fisher errors (RTN, as the file stores it; a tied head's errors added)."""
    emb = m.stream.tensors["model.embed_tokens.weight"]
    ids = m.token_ids.flatten().to(emb.device)
    used, where = torch.unique(ids, return_inverse=True)  # rows are independent: quantise those seen
    g = item.g_out.reshape(ids.shape[0], -1)
    eps, eps_a = {}, {}
    for t in dict.fromkeys(storable_type(t, emb.shape[1]) for t in m.dense_types):
        de = quantize_rtn(emb[used], t).dequant - emb[used]
        eps[t], eps_a[t] = fisher_error_split((g * de[where]).sum(1).square(), m.in_a)
        if m.tied:
            eps[t] = float(np.hypot(eps[t], head["head_eps"][t]))
            eps_a[t] = float(np.hypot(eps_a[t], head["head_eps_a"][t]))
    return {"tensors": [asdict(TensorImportance("token_embd.weight", "embd", *emb.shape, eps, eps_fisher_a=eps_a))]}


def sample_experts(anchor_cost: list[float], k: int) -> list[int]:
    """``k`` experts spread evenly over the ranking of their anchor cost (a stratified sample: small, typical
    and large contributors alike), among those with any cost; all of them when there are at most ``k``."""
    live = sorted((c, e) for e, c in enumerate(anchor_cost) if c > 0)
    if len(live) <= k:
        return sorted(e for _, e in live)
    return sorted(live[int((j + 0.5) * len(live) / k)][1] for j in range(k))


def neuron_energy(g: torch.Tensor, u: torch.Tensor, d: torch.Tensor, x: torch.Tensor, w: torch.Tensor, act
                  ) -> torch.Tensor:
    """Each intermediate neuron's share of an expert's weighted output on ``x`` (routing weights ``w``):
    ||d_j||² Σ_t (w_t act(g_j x_t) u_j x_t)², NEURON_CHUNK neurons at a time (a Mixtral-8x7B expert's whole
    tokens × 14,336 activations are 0.5 GB an array, and the expression makes several)."""
    return torch.cat([(act(x @ g[a:a + NEURON_CHUNK].T) * (x @ u[a:a + NEURON_CHUNK].T) * w[:, None]
                       ).square().sum(0) for a in range(0, g.shape[0], NEURON_CHUNK)]) * d.square().sum(0)


def measured_neurons(d_ff: int, k: int | None) -> int:
    """How many of an expert's ``d_ff`` intermediate neurons the importance pass measures (sample_neurons): ``k``
    when the expert is at least twice as wide and both are whole numbers of NEURON_CHUNK, else all of them."""
    return k if k and d_ff >= 2 * k and not d_ff % NEURON_CHUNK and not k % NEURON_CHUNK else d_ff


def sample_neurons(energy: torch.Tensor, k: int | None) -> tuple[torch.Tensor | None, float]:
    """The intermediate neurons an expert is measured on, and the factor from their squared error to the whole
    expert's: ``k`` neurons in NEURON_CHUNK-wide chunks spread evenly over the ranking of the chunks' output
    energy (``energy``: neuron_energy, one per neuron) — (None, 1.0), all of them, when the expert is narrower
    than 2 ``k`` or its width is not a whole number of chunks.

    An expert's output is a sum over its neurons (down[:, j] · act(gate_j x) · up_j x) and its quantisation error
    a sum of the chunks' errors, which are independent (no ggml block spans two chunks) and scale with the
    chunks' size: the whole expert's squared error is the sample's times the energy ratio all / sample (a ratio
    estimator, as predict_unsampled; with a few loud neurons, the neuron count ratio would miss them)."""
    d_ff = energy.shape[0]
    if measured_neurons(d_ff, k) == d_ff:
        return None, 1.0
    per_chunk = energy.double().reshape(-1, NEURON_CHUNK).sum(1)
    n, kc = per_chunk.shape[0], k // NEURON_CHUNK
    ranked = torch.argsort(per_chunk, stable=True).tolist()
    chunks = sorted(ranked[int((j + 0.5) * n / kc)] for j in range(kc))
    picked = float(per_chunk[chunks].sum())
    factor = float(per_chunk.sum()) / picked if picked > 0 else d_ff / k
    return torch.cat([torch.arange(c * NEURON_CHUNK, (c + 1) * NEURON_CHUNK) for c in chunks]), factor


def predict_unsampled(values: dict[str, list[float | None]], aux: list[float], sample: list[int]
                      ) -> dict[str, list[float]]:
    """Fill each unmeasured (None) error from the expert's auxiliary error ``aux`` (its RTN error at the anchor
    type) and the sampled experts' ratio: v_t(e) = aux(e) · sqrt(Σ_S v_t² / Σ_S aux²), a ratio estimator of the
    layer's sum of squares (what a stock plan prices)."""
    den = sum(aux[e] ** 2 for e in sample)
    out = {}
    for t, v in values.items():
        r = (sum(v[e] ** 2 for e in sample) / den) ** 0.5 if den > 0 else 0.0
        out[t] = [x if x is not None else aux[e] * r for e, x in enumerate(v)]
    return out


@dataclass
class ExpertTokens:
    """One expert's share of a layer's calibration tokens: what measuring it needs, shipped to wherever it runs
    (executors)."""

    expert: int
    x: torch.Tensor  # the MoE inputs of the tokens routed to it
    w: torch.Tensor  # their routing weights
    grad: torch.Tensor  # ∇ log p(ŷ) at the block output, for those tokens
    in_a: torch.Tensor  # the fold A mask, for those tokens
    weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # its gate, up, down, as stored (bf16 or float32)


@dataclass(frozen=True)
class ErrorSettings:
    """How one layer's experts are measured (the _Measure settings an expert's measurement uses)."""

    gptq: bool
    d_model: int
    d_ff: int
    neuron_sample: int | None
    flip_probe: str | None


def _prepare(t: ExpertTokens, s: ErrorSettings, pooled: LayerTokens, act) -> _Case:
    """What every type's measurement of one expert shares: its (sampled) weights in float32, their GPTQ factors,
    its unquantised output. (Widened here, one expert at a time: a Mixtral-8x7B expert is 0.7 GB in float32, and
    only its neuron sample is kept.)"""
    g, u, d = (w.float() for w in t.weights)
    scale = 1.0
    if measured_neurons(s.d_ff, s.neuron_sample) < s.d_ff:  # measured on a sample of its neurons, scaled up
        neurons, factor = sample_neurons(neuron_energy(g, u, d, t.x, t.w, act), s.neuron_sample)
        neurons = neurons.to(g.device)
        g, u, d, scale = g[neurons], u[neurons], d[:, neurons], factor ** 0.5
    hessians = partial(expert_hessians, g, u, t.x, act, s.gptq, s.d_ff, pooled)
    return _Case(t, (g, u, d), scale, expert_factors(hessians, pooled),  # once for every type
                 (act(t.x @ g.T) * (t.x @ u.T)) @ d.T)


def measure_experts(group: list[ExpertTokens], types: tuple[str, ...], pooled: LayerTokens, act,
                    settings: ErrorSettings) -> list[dict]:
    """Each expert of ``group`` (walked together by GPTQ: walk_size of them) at every type of ``types``: per
    expert {"eps"|"fisher"|"a": {type: error}, "probe": the RTN Fisher error at the flip probe or None}. The
    unit of work an executor runs (a Ray task on a cluster)."""
    s = settings
    cases = [_prepare(t, s, pooled, act) for t in group]
    out = [{"expert": c.tokens.expert, "eps": {}, "fisher": {}, "a": {}, "probe": None} for c in cases]
    for t in types:
        r = Recipe.for_shapes(t, s.d_model, s.d_ff)
        results = quantize_experts_together([c.weights for c in cases],
                                            [{"gate": r.gate, "up": r.up, "down": r.down}] * len(cases),
                                            [c.factors for c in cases], packed=False
                                            ) if s.gptq else [None] * len(cases)
        for c, res, rec in zip(cases, results, out, strict=True):
            q = None if res is None else (res["gate"].dequant, res["up"].dequant, res["down"].dequant)
            g, u, d = c.weights
            gu = torch.cat([g, u])
            delta = expert_output_delta(gu, d, c.tokens.x, c.tokens.w, r, act=act, quantised=q, base=c.base
                                        ) * c.scale
            rec["eps"][t] = float(delta.norm())
            rec["fisher"][t], rec["a"][t] = fisher_error_split((delta * c.tokens.grad).sum(1).square(),
                                                               c.tokens.in_a)
            if t == s.flip_probe:
                rec["probe"] = rec["fisher"][t] if not s.gptq else fisher_error(
                    expert_output_delta(gu, d, c.tokens.x, c.tokens.w, r, act=act, base=c.base) * c.scale,
                    c.tokens.grad)
    return out


def _expert_errors(m: _Measure, cap, grad: torch.Tensor, experts) -> tuple[dict, list[int], list[float]]:
    """Every (expert, candidate type)'s eps, Fisher error and fold-A Fisher error of one MoE layer
    ({"eps"|"fisher"|"a": {type: per expert}}), the experts measured at every type (empty: all) and the RTN
    Fisher errors at the flip probe (what its real KL is compared with).

    With ``m.expert_sample`` below the layer's expert count, every expert is measured by RTN at the anchor type
    (and the flip probe), a stratified sample of them at every type, and the rest predicted from their RTN
    anchor error (predict_unsampled).
    Experts wider than 2 ``m.neuron_sample`` are measured on a sample of their neurons (sample_neurons).
    Each expert's measurement (measure_experts) runs on ``m.executor``."""
    executor = m.executor
    gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
    d_model, d_ff = gate_up.shape[2], down.shape[2]
    n_e = gate_up.shape[0]
    probe = [0.0] * n_e
    pooled = LayerTokens(cap.x)
    if m.gptq and executor.remote:  # the pooled input Hessian's factor once here, not in every task borrowing it
        pooled.prepare()
    together = walk_size(cap.x.device)

    def measure(es: list[int], types: tuple[str, ...], gptq: bool) -> dict[str, dict[str, list]]:
        errors: dict[str, dict[str, list]] = {k: {t: [None] * n_e for t in m.targets} for k in ("eps", "fisher", "a")}
        routed = {e: torch.where(cap.top_k_index == e) for e in es}
        for e in (e for e in es if routed[e][0].numel() == 0):  # no token reached it
            for acc in errors.values():
                for t in types:
                    acc[t][e] = 0.0
        live = [e for e in es if routed[e][0].numel()]
        groups = ([ExpertTokens(e, cap.x[routed[e][0]], cap.top_k_weights[routed[e]], grad[routed[e][0]],
                                m.in_a[routed[e][0]], (gate_up[e, :d_ff], gate_up[e, d_ff:], down[e]))
                   for e in live[j:j + together]] for j in range(0, len(live), together))  # (made as needed)
        settings = ErrorSettings(gptq, d_model, d_ff, m.neuron_sample, m.flip_probe)
        for result in executor.map(measure_experts, groups, types=types, pooled=pooled, act=experts.act_fn,
                                   settings=settings):
            for rec in result:
                e = rec["expert"]
                for k in ("eps", "fisher", "a"):
                    for t in types:
                        errors[k][t][e] = rec[k][t]
                if rec["probe"] is not None:
                    probe[e] = rec["probe"]
        return errors

    if not m.expert_sample or n_e <= m.expert_sample:
        return measure(list(range(n_e)), m.targets, m.gptq), [], probe
    anchor = ANCHOR_TYPE if ANCHOR_TYPE in m.targets else m.targets[len(m.targets) // 2]
    first = tuple(dict.fromkeys(t for t in (anchor, m.flip_probe) if t is not None))
    # every expert at the anchor by RTN (no Hessians, no GPTQ walks): the ratio estimator's auxiliary and the
    # sample's strata; the sample at every type as convert quantises it (docs/planner.md: the study)
    aux = measure(list(range(n_e)), first, gptq=False)
    sample = sample_experts(aux["fisher"][anchor], m.expert_sample)
    errors = measure(sample, m.targets if m.gptq else tuple(t for t in m.targets if t not in first), m.gptq)
    if not m.gptq:  # (RTN errors are the auxiliary's: not measured twice)
        for k, v in errors.items():
            for t in first:
                v[t] = [x if e in sample else None for e, x in enumerate(aux[k][t])]
    return {k: predict_unsampled(v, aux[k][anchor], sample) for k, v in errors.items()}, sample, probe


def _layer_record(m: _Measure, item, names) -> dict:
    """One decoder layer: its tapped non-expert linears' Fisher errors and, for an MoE layer, phi, w and every
    (expert, recipe)'s eps (plain and Fisher, all tokens and fold A)."""
    stream, i, layer = m.stream, item.index, item.layer
    tensors = []
    for n, (cls, mod) in dense_linears(layer, stream.arch).items():
        gname = names.get_name(checkpoint_name(stream.arch, i, n), try_suffixes=(".weight",))
        if gname is not None and n in item.taps:
            w, (x, g) = mod.weight.detach(), item.taps[n]
            eps_t, eps_t_a = _dense_fisher(w, x, g, m.dense_types, m.in_a[:x.shape[0]], gptq=m.gptq,
                                           scale=m.tap_scale)
            tensors.append(asdict(TensorImportance(gname, cls, *w.shape, eps_t, eps_fisher_a=eps_t_a)))
    item.taps.clear()  # (measured: not held while the experts are, 0.5 GB at Mixtral-8x7B's shape)
    if item.moe is None:
        return {"tensors": tensors, "layer": None}
    cap = item.moe  # (recorded in the reverse pass's forward)
    grad = item.g_out.reshape(-1, item.g_out.shape[-1])
    experts = getattr(stream.moe_block(layer), stream.arch.experts)
    gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
    d_model, d_ff = gate_up.shape[2], down.shape[2]
    errors, sample, probe = _expert_errors(m, cap, grad, experts)
    phi, wmass = cap.stats.normalised()
    imp = LayerImportance(i, d_model, d_ff, phi.tolist(), wmass.tolist(), errors["eps"],
                          out_norm=item.out_norm, eps_fisher=errors["fisher"],
                          eps_fisher_a=errors["a"], tokens=[int(f) for f in cap.stats.freq], sampled=sample,
                          neurons=measured_neurons(d_ff, m.neuron_sample), layer_tokens=int(cap.x.shape[0]))
    return {"tensors": tensors, "layer": asdict(imp), "probe": probe}


def _importance_state(work_dir, key: str, n_layer: int, head_needed: bool) -> tuple[Path | None, dict, int | None]:
    """(state dir, finished item records, layer to resume below) of an importance pass kept in ``work_dir``.
    A state of other inputs (``key``) or one that cannot be continued is cleared."""
    if work_dir is None:
        return None, {}, None
    state = Path(work_dir) / "importance"
    if (state / "key.txt").exists() and (state / "key.txt").read_text() != key:
        shutil.rmtree(state)
    records = {}
    for p in sorted(state.glob("item-*.json")):
        try:
            records[int(p.stem.split("-")[1])] = json.loads(p.read_text())
        except ValueError:  # damaged on disk (records are written through a temporary name): measured again
            p.unlink()
    resume = resumable_from(state, {i for i in records if 0 <= i < n_layer}, n_layer)
    if resume is None or (head_needed and n_layer not in records):
        shutil.rmtree(state, ignore_errors=True)
        records, resume = {}, None
    state.mkdir(parents=True, exist_ok=True)
    (state / "key.txt").write_text(key)
    return state, {i: r for i, r in records.items() if resume is not None and (i >= resume)}, resume


def _importance_key(model_dir, token_ids: torch.Tensor, **settings) -> str:
    """What an importance pass's results depend on: the checkpoint's config and shard headers, the tokens and
    the settings."""
    h = hashlib.sha256((Path(model_dir) / "config.json").read_bytes())
    for shard in sorted(Path(model_dir).glob("*.safetensors")):
        st = shard.stat()  # a re-saved checkpoint (new mtime) is measured anew
        h.update(shard.name.encode() + str((st.st_size, st.st_mtime_ns)).encode())
        with open(shard, "rb") as f:
            h.update(f.read(1 << 16))
    h.update(token_ids.numpy().tobytes())
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()


def measure_importance(model_dir, token_ids: torch.Tensor, targets: tuple[str, ...] = EXPERT_TYPES,
                       progress: bool = True, seed: int = 0, dense: bool = False,
                       dense_types: tuple[str, ...] = DENSE_TYPES, tap_seqs: int = 8,
                       flip_probe: str | None = None, probe_seqs: int = 4, eps_source: str = EPS_SOURCE,
                       work_dir=None, expert_sample: int | None = None,
                       neuron_sample: int | None = NEURON_SAMPLE, device: torch.device | str = "cpu",
                       executor: InProcess | RayCluster | None = None) -> ModelImportance:
    """Stream the model layer by layer over ``token_ids`` and measure, for every MoE layer, phi, w and per
    (expert, recipe) eps both at the block output and in the output-KL (Fisher) metric; with
    ``dense``, also the Fisher error of every non-expert tensor the converter quantises (attention and shared
    linears, token embedding, LM head) for ``dense_types``, on the first ``tap_seqs`` sequences.

    The layers are visited last to first (sensitivity.reverse_layers: one forward keeps the layer inputs, the
    reverse pass carries ∇ log p(ŷ) back); the result is in layer order. With ``flip_probe`` (a recipe target),
    each layer's flip_factor is measured too, on the first ``probe_seqs`` sequences (see _measure_flip_factors).

    ``eps_source``: the quantiser behind eps. ``rtn`` is the fast proxy; ``gptq`` quantises each (expert, type)
    and each planned linear as convert will (GPTQ on the Hessian of the inputs it is measured on; the token
    embedding, RTN in the file, stays RTN), 1.7× the time on the fixture.

    ``expert_sample``: in a layer with more experts than this, measure every expert by RTN at ANCHOR_TYPE and
    only a stratified sample of ``expert_sample`` of them at every type, predicting the rest by ratio
    (predict_unsampled): a stock plan prices a layer's experts only as a sum, which this estimates with 16 of 128
    experts quantised as convert will (GPTQ) at each type; a mixed plan needs every expert measured
    (solve_bit_plan refuses a sampled importance for one). None: measure every expert at every type.

    ``neuron_sample``: measure an expert at least twice as wide as this on this many of its intermediate
    neurons (sample_neurons; Mixtral-8x7B's 14,336 → 2,048: 1/7 of the grid fits and forwards); None: all.

    ``work_dir``: keep the pass's state (spilled layer inputs, gradients, each finished layer's results) in
    ``work_dir/importance``, so a run stopped at layer N continues there with the same result.

    ``device``: where the layers run and the errors are computed (devices.resolve_device); a GPU's results
    differ from the CPU's by float rounding only. ``executor``: where each expert's measurement runs
    (executors.connect: this process by default, or Ray tasks; the same results either way).

    (Sixteen parameters: the measurement's knobs, all with defaults, passed by name.)
    """
    from tqdm import tqdm

    if eps_source not in ("rtn", "gptq"):
        raise McsharpError(f"eps source {eps_source} is not one of rtn, gptq")
    if flip_probe is not None and flip_probe not in targets:
        raise McsharpError(f"--flip-probe {flip_probe} is not one of the candidate types {', '.join(targets)}")
    # on the CPU a layer's experts stay bf16 (widened one at a time): at Mixtral-8x7B's shape float32 experts
    # are 5.6 GB of an 8.4 GB bound
    stream = LayerStream.open(model_dir, device, experts_as_stored=torch.device(device).type == "cpu")
    m = _Measure(stream, token_ids, tuple(targets), tuple(dense_types), eps_source == "gptq",
                 (token_ids.shape[0] / min(tap_seqs, token_ids.shape[0])) ** 0.5, flip_probe,
                 fold_a_mask(token_ids.numel(), token_ids.shape[1]).to(stream.device),
                 stream.lm_head_name() != "lm_head.weight",
                 expert_sample, neuron_sample, executor or InProcess())
    names = gguf_name_map(stream.arch, stream.n_layer)
    key = _importance_key(model_dir, token_ids, targets=m.targets, dense=dense, dense_types=m.dense_types,
                          tap_seqs=tap_seqs, seed=seed, eps_source=eps_source, flip_probe=flip_probe, version=2,
                          **({"expert_sample": expert_sample} if expert_sample else {}),
                          neuron_sample=neuron_sample)
    state, records, resume = _importance_state(work_dir, key, stream.n_layer, dense)

    def taps(layer):
        return {n: mod for n, (_, mod) in dense_linears(layer, stream.arch).items()}

    bar = tqdm(total=stream.n_layer, initial=stream.n_layer - (stream.n_layer if resume is None else resume),
               desc="importance: measure", unit="layer", disable=not progress)
    for item in reverse_layers(stream, token_ids, seed=seed, taps=taps if dense else None, tap_seqs=tap_seqs,
                               state_dir=state, resume_at=resume, progress=progress, moe=True):
        i = item.index
        if item.layer is None and i >= 0:
            rec = _head_record(m, item)
        elif item.layer is None:
            rec = _embedding_record(m, item, records.get(stream.n_layer, {})) if dense else {"tensors": []}
        else:
            rec = _layer_record(m, item, names)
            bar.update()
        records[i] = rec
        _save_record(state, i, rec)
        del item  # its layer inputs, gradients and taps are not held while the next layer loads
    bar.close()
    out = sorted((LayerImportance(**r["layer"]) for r in records.values() if r.get("layer")), key=lambda x: x.layer)
    tensors = [TensorImportance(**t) for r in records.values() for t in r["tensors"]]
    if not out:
        raise McsharpError(f"{model_dir} has no MoE layers; PMQ needs a Mixture-of-Experts checkpoint")
    if flip_probe is not None:  # (its probes write dequantised experts into the layer: a float32 one)
        _probe_flips(LayerStream.open(model_dir, device), token_ids, out, tensors, flip_probe, probe_seqs, records)
    return ModelImportance(out, sorted(tensors, key=lambda t: t.name), eps_source)


def _save_record(state: Path | None, i: int, rec: dict) -> None:
    """Keep item ``i``'s record in the pass's state dir, if it has one (through a temporary name)."""
    if state is not None:
        write_atomically(state / f"item-{i:05d}.json", lambda tmp: tmp.write_text(json.dumps(rec)))


def _probe_flips(stream, token_ids: torch.Tensor, layers: list[LayerImportance], tensors: list[TensorImportance],
                 probe: str, probe_seqs: int, records: dict) -> None:
    """Measure every layer's flip_factor at ``probe`` on the first ``probe_seqs`` sequences
    (_measure_flip_factors) and give each tensor that of the first router its error reaches (_feeding_factor)."""
    n_probe = min(probe_seqs, token_ids.shape[0])
    _measure_flip_factors(stream, token_ids[:n_probe], layers, probe, token_ids.shape[0] / n_probe,
                          {i: r["probe"] for i, r in records.items() if r.get("layer")})
    by_layer = {imp.layer: imp.flip_factor for imp in layers}
    moe = sorted(by_layer)
    for ti in tensors:
        ti.flip_factor = _feeding_factor(ti, by_layer, moe)


def _feeding_factor(ti: TensorImportance, by_layer: dict[int, float], moe: list[int]) -> float:
    """Flip factor of the first router a tensor's error reaches: attention of layer l feeds router l (whose
    output error is that of MoE layer l-1's experts), a shared/dense FFN of layer l what layer l's experts feed;
    the embedding everything; the LM head none."""
    if ti.cls == "output":
        return 1.0
    if ti.cls == "embd":
        return by_layer[moe[0]]
    layer = int(ti.name.split(".")[1])
    if ti.cls == "attn" and layer - 1 in by_layer:
        return by_layer[layer - 1]
    after = [m for m in moe if m >= layer]
    return by_layer[after[0]] if after else 1.0


def _measure_flip_factors(stream, token_ids: torch.Tensor, layers: list[LayerImportance], probe: str,
                          scale: float, rtn_fisher: dict[int, list[float]]) -> dict[int, float]:
    """Set each layer's flip_factor: real output KL of RTN-quantising all its experts at ``probe`` (on
    ``token_ids``, perturbation_kl) over the Fisher estimate of the same RTN error (½ Σ ``rtn_fisher[layer]``²,
    measured on ``scale`` × as many tokens). Clamped to [1, 16]: the Fisher term is a floor, and a handful of
    tokens must not dominate. Returns the unclamped ratios."""
    wanted = {imp.layer: imp for imp in layers}

    def perturb(i, layer):
        if i not in wanted:
            return None
        experts = getattr(stream.moe_block(layer), stream.arch.experts)
        imp = wanted[i]
        r = Recipe.for_shapes(probe, imp.d_model, imp.d_ff)
        saved = experts.gate_up_proj.detach().clone(), experts.down_proj.detach().clone()
        with torch.no_grad():
            for e in range(imp.n_expert):
                gu, d = saved[0][e], saved[1][e]
                experts.gate_up_proj[e].copy_(torch.cat([quantize_rtn(gu[:imp.d_ff], r.gate).dequant,
                                                         quantize_rtn(gu[imp.d_ff:], r.up).dequant]))
                experts.down_proj[e].copy_(quantize_rtn(d, r.down).dequant)

        def undo():
            with torch.no_grad():
                experts.gate_up_proj.copy_(saved[0])
                experts.down_proj.copy_(saved[1])

        return undo

    real = perturbation_kl(stream, token_ids, perturb)
    ratios = {}
    for imp in layers:
        predicted = 0.5 * sum(x ** 2 for x in rtn_fisher[imp.layer]) / scale
        ratios[imp.layer] = real[imp.layer] / predicted if predicted > 0 else 1.0
        imp.flip_factor = float(np.clip(ratios[imp.layer], 1.0, 16.0))
    return ratios
