"""PMQ: per-expert bit budgets from expert importance, solved as an integer program.

An expert's *recipe* is one target type applied to its gate/up/down projections; a projection whose row
length does not fit that type's block (e.g. 128-wide down_proj rows and 256-blocks of K-quants) falls back
to the closest type that fits, and the recipe's byte count is computed from the real shapes. Costs follow
MC: c(e, r) = phi_e^alpha · w_e^beta · eps(e, r), with eps the MoE-block output error when only expert e
is quantised with recipe r.

Every Fisher error is also kept for one half of the calibration sequences (fold A), so a planning rule can be
scored out of sample: plan on one fold's costs, price the plan with the other's (out_of_fold_cost). Mixed plans
use that to choose how far to trust per-expert differences (choose_shrinkage).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from .errors import McsharpError
from .formats import QUANT_TYPES, bits_per_weight, block_size, quantize_rtn, tensor_bytes

# Expert candidates (DESIGN §3): scalar grids with CPU/CUDA mul_mat_id support, ascending size.
# Cost exponents and budget scope (see solve_bit_plan): measured on the fixture, scripts/bench_quality.py.
ALPHA, BETA, GAMMA, SCOPE, METRIC = 1.0, 1.5, 2.0, "global", "fisher"
EPS_SOURCE = "gptq"  # measure_importance's quantiser for eps (see its docstring; README: it plans better)

EXPERT_TYPES: tuple[str, ...] = ("Q1_0", "Q2_0", "Q2_K", "Q3_K", "IQ4_XS", "Q4_K", "Q5_K", "Q6_K", "Q8_0")


def storable_type(type_name: str, row_len: int) -> str:
    """``type_name`` if a row of ``row_len`` fits its blocks, else the fitting type of nearest true bpw
    (ties go to the larger type, so a fallback never silently loses precision)."""
    if row_len % block_size(type_name) == 0:
        return type_name
    want = bits_per_weight(type_name)
    fits = [t for t in QUANT_TYPES if row_len % block_size(t) == 0]
    if not fits:
        raise McsharpError(f"no ggml quant type fits rows of {row_len} elements; such tensors must stay F16")
    return min(fits, key=lambda t: (abs(bits_per_weight(t) - want), -bits_per_weight(t)))


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


def expert_output_delta(gate_up: torch.Tensor, down: torch.Tensor, x: torch.Tensor, weights: torch.Tensor,
                        recipe: Recipe, act=torch.nn.functional.silu,
                        quantised: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """ΔZ (tokens, d): the change of the MoE-block output on the tokens routed to this expert when only it is
    quantised (RTN on ``recipe``, or the dequantised gate, up, down given as ``quantised``).

    ``gate_up`` (2·ff, d), ``down`` (d, ff); ``x`` the inputs routed to the expert, ``weights`` their routing
    weights. Other experts and the router are untouched, so ΔZ is this expert's weighted output change.
    """
    ff = down.shape[1]
    if quantised is None:
        quantised = (quantize_rtn(gate_up[:ff], recipe.gate).dequant, quantize_rtn(gate_up[ff:], recipe.up).dequant,
                     quantize_rtn(down, recipe.down).dequant)
    gq, uq, dq = quantised

    def ffn(g, u, d):
        return (act(x @ g.T) * (x @ u.T)) @ d.T

    return (ffn(gq, uq, dq) - ffn(gate_up[:ff], gate_up[ff:], down)) * weights[:, None]


def expert_output_error(gate_up: torch.Tensor, down: torch.Tensor, x: torch.Tensor, weights: torch.Tensor,
                        recipe: Recipe, act=torch.nn.functional.silu) -> float:
    """eps: ||ΔZ||_F of the MoE-block output when only this expert is quantised (see expert_output_delta)."""
    if x.shape[0] == 0:
        return 0.0
    return float(expert_output_delta(gate_up, down, x, weights, recipe, act).norm())


def fisher_error(delta: torch.Tensor, grad: torch.Tensor) -> float:
    """sqrt(Σ_t (g_t · ΔZ_t)²): ΔZ's size in the metric of the output KL (``grad`` = ∇ log p(ŷ) per token at
    the layer's output, see sensitivity.py); its square estimates 2·ΔKL summed over the tokens."""
    return float((delta * grad).sum(1).square().sum().sqrt())


def fisher_error_split(per_token: torch.Tensor, in_a: torch.Tensor) -> tuple[float, float]:
    """(all, fold A) of sqrt(Σ_t ``per_token``): a Fisher error over every token and over the tokens of fold A
    (``in_a``, a bool per token); fold B's is the difference of the squares."""
    return float(per_token.sum().sqrt()), float(per_token[in_a].sum().sqrt())


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

    @property
    def n_expert(self) -> int:
        return len(self.phi)


# Candidates for non-expert tensors in a whole-file plan; rows that don't fit fall back (storable_type).
DENSE_TYPES: tuple[str, ...] = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")


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
class BitPlan:
    """The solved plan: layer → per-expert recipe targets, plus what it costs. JSON-able."""

    mode: str
    target_bpw: float
    achieved_bpw: float
    expert_bytes: int
    expert_weights: int
    layers: dict[int, list[str]]
    recipes: dict[str, dict[str, str]] = field(default_factory=dict)  # "layer:target" → projection types
    alpha: float = 1.0
    beta: float = 1.5
    gamma: float = 1.0
    scope: str = "global"
    metric: str = "mc"
    # whole-file plan (scope "file"; target_bpw is then over experts and these together): GGUF name → type
    tensor_types: dict[str, str] = field(default_factory=dict)
    dense_bytes: int = 0  # bytes and weights of the tensor_types tensors
    dense_weights: int = 0
    # mixed + fisher: per-expert costs pulled toward their layer's mean by 1 - shrink (choose_shrinkage);
    # cv_costs: shrink → out-of-fold cost of the plans it gave, when shrink was chosen by cross-validation
    shrink: float = 1.0
    cv_costs: dict[str, float] = field(default_factory=dict)
    # calibration coverage: layer → {"tokens": per-expert routed tokens, "d_model", "d_ff"}; an expert with fewer
    # tokens than a projection's input width gets RTN there instead of GPTQ (quantize.expert_hessians)
    coverage: dict[int, dict] = field(default_factory=dict)

    @property
    def planned_bpw(self) -> float:
        """True bits per weight over everything the plan types (the experts, and ``tensor_types``' tensors)."""
        return 8 * (self.expert_bytes + self.dense_bytes) / (self.expert_weights + self.dense_weights)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> BitPlan:
        """A plan written by ``to_json``; one from another mcsharp version (or not a plan) → one-line error."""
        try:
            d = json.loads(text)
            d["layers"] = {int(k): v for k, v in d["layers"].items()}
            d["coverage"] = {int(k): v for k, v in d.get("coverage", {}).items()}
            return cls(**d)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise McsharpError(f"not a plan of this mcsharp version ({type(e).__name__}: {e}); recompute it with "
                               "`mcsharp plan`") from None


def costs(imp: LayerImportance, targets: tuple[str, ...], alpha: float, beta: float, gamma: float = 1.0,
          metric: str = "mc") -> np.ndarray:
    """Cost of each (expert, recipe), shape (n_expert, n_targets).

    ``mc``: c = phi^alpha · w^beta · eps^gamma (MC's importance-weighted block-output error). ``fisher``:
    c = eps_fisher², the estimated rise of the output KL; frequency and routing weight are already inside it
    (an expert's error counts on the tokens routed to it, scaled by their routing weight), so alpha, beta and
    gamma do not apply.
    """
    if metric == "fisher":
        if not imp.eps_fisher:
            raise McsharpError(f"layer {imp.layer}: the importance has no Fisher errors (measured before they "
                               "existed); re-measure it or plan with metric 'mc'")
        return np.array([imp.eps_fisher[t] for t in targets]).T ** 2 * imp.flip_factor
    phi, w = np.asarray(imp.phi), np.asarray(imp.w)
    eps = np.array([imp.eps[t] for t in targets]).T
    return (phi ** alpha * w ** beta)[:, None] * eps ** gamma


def _spend_leftover(choice: np.ndarray, items_cost: list[np.ndarray], items_bytes: list[np.ndarray],
                    budget: float, members: list[int] | None = None) -> np.ndarray:
    """Give the bytes the MILP left unused to items whose cost is zero for every recipe.

    An expert no calibration token reached has phi = 0 and eps = 0, so every recipe costs it nothing and the
    solver leaves it at an arbitrary (often the smallest) type even when the budget would allow more, yet
    inference will route tokens to it. Upgrading such items one size step at a time, round-robin, while the
    budget holds leaves the optimal cost unchanged and stops unseen experts from being starved for nothing.
    """
    choice = choice.copy()
    members = list(range(len(items_cost))) if members is None else members
    spent = float(sum(items_bytes[i][choice[i]] for i in members))
    free = [i for i in members if not np.any(items_cost[i])]
    upgraded = True
    while upgraded:
        upgraded = False
        for i in free:
            b, k = items_bytes[i], choice[i]
            bigger = np.flatnonzero(b > b[k])
            if bigger.size == 0:
                continue
            nxt = int(bigger[np.argmin(b[bigger])])  # the next size up
            if spent + b[nxt] - b[k] <= budget:
                spent += b[nxt] - b[k]
                choice[i] = nxt
                upgraded = True
    return choice


def _spend_global_leftover(choice: np.ndarray, items_cost: list[np.ndarray], items_bytes: list[np.ndarray],
                           budget: float) -> np.ndarray:
    """Give what the plan leaves of the overall budget back greedily, to the upgrade with the largest cost
    reduction per byte that still fits, until none fits."""
    choice = choice.copy()
    left = budget - float(sum(b[k] for b, k in zip(items_bytes, choice, strict=True)))
    while True:
        best = None
        for i, (c, b) in enumerate(zip(items_cost, items_bytes, strict=True)):
            k = choice[i]
            for k2 in np.flatnonzero((b > b[k]) & (b - b[k] <= left) & (c <= c[k])):  # more bits never hurt
                gain = (c[k] - c[k2]) / (b[k2] - b[k])
                if best is None or gain > best[0]:
                    best = (gain, i, int(k2))
        if best is None:
            return choice
        _, i, k2 = best
        left -= items_bytes[i][k2] - items_bytes[i][choice[i]]
        choice[i] = k2


def solve_bit_plan(layers: list[LayerImportance], bpw: float, mode: str = "mixed",
                   targets: tuple[str, ...] = EXPERT_TYPES, alpha: float = ALPHA, beta: float = BETA,
                   gamma: float = GAMMA, scope: str = SCOPE, metric: str = METRIC,
                   tensors: tuple[TensorImportance, ...] | list[TensorImportance] = (),
                   shrink: float | str = "cv") -> BitPlan:
    """Choose one recipe per expert (``mixed``) or per layer (``stock``) minimising total cost under a budget
    of ``bpw`` true bits per expert weight: one budget all layers share (``scope="global"``) or one per layer
    (``"layer"``, MC's formulation; what the layers leave unspent is then handed out greedily, so the file
    still uses the whole budget).

    ``shrink`` (mixed mode, fisher metric): each expert's error per unit of frequency is taken as
    shrink·own + (1 − shrink)·its layer's mean (:func:`shrunk_costs`), so that per-expert differences smaller
    than the estimate's own noise do not steer the plan; ``"cv"`` chooses it by two-fold cross-validation over
    the calibration folds (:func:`choose_shrinkage`) where the importance has them, else uses 1 (as measured).

    Whole-file plan (``scope="file"``): ``bpw`` is over the expert weights and ``tensors`` (the non-expert
    tensors, see :class:`TensorImportance`) together, one budget in true bytes, each tensor getting one type;
    that needs the ``fisher`` metric, the only one in which an attention matrix's and an expert's errors are the
    same currency (estimated output KL).

    A global budget on the ``mc`` metric trades error between layers on the strength of eps alone, but eps is
    measured at each layer's own output and says nothing about how an error there grows or fades downstream: on
    the fixture such a plan sent whole layers to Q1_0 and doubled the KLD of the per-layer plan at the same size.
    ``gamma`` = 2 makes costs additive in squared output error (errors of different experts add like independent
    vectors), so one huge error is never bought with many small savings.
    """
    from scipy import sparse
    from scipy.optimize import Bounds, LinearConstraint, milp

    if mode not in ("mixed", "stock"):
        raise McsharpError(f"--mode {mode} is not one of mixed, stock")
    if scope not in ("global", "layer", "file"):
        raise McsharpError(f"budget scope {scope} is not one of layer, global, file")
    if metric not in ("fisher", "mc"):
        raise McsharpError(f"cost metric {metric} is not one of fisher, mc")
    if not layers:
        raise McsharpError("the model has no MoE layers to plan; PMQ needs a Mixture-of-Experts checkpoint")
    if scope == "file" and (not tensors or metric != "fisher"):
        raise McsharpError("a whole-file plan needs the non-expert tensors' importance and the fisher metric")
    if scope != "file":
        tensors = ()
    targets = tuple(targets)
    cv_costs: dict[str, float] = {}
    if mode != "mixed" or metric != "fisher":
        shrink = 1.0
    elif shrink == "cv":
        if all(imp.eps_fisher_a for imp in layers) and all(ti.eps_fisher_a for ti in tensors):
            shrink, cv_costs = choose_shrinkage(layers, bpw, targets=targets, scope=scope, tensors=tensors)
        else:
            shrink = 1.0
    if isinstance(shrink, str) or not 0.0 <= float(shrink) <= 1.0:
        raise McsharpError(f"cost shrinkage {shrink!r} is neither 'cv' nor a number in [0, 1]")
    if shrink < 1.0:
        layers = [shrunk_costs(imp, float(shrink)) for imp in layers]
    # one item = an expert (mixed), a layer's experts (stock) or a non-expert tensor; each picks one option
    items_cost, items_bytes, owners = [], [], []
    n_weights = 0
    layer_weights: list[int] = []
    for imp in layers:
        rec_bytes = np.array([Recipe.for_shapes(t, imp.d_model, imp.d_ff).n_bytes(imp.d_model, imp.d_ff)
                              for t in targets], dtype=np.float64)
        c = costs(imp, targets, alpha, beta, gamma, metric)
        layer_weights.append(imp.n_expert * 3 * imp.d_model * imp.d_ff)
        n_weights += layer_weights[-1]
        if mode == "mixed":
            for e in range(imp.n_expert):
                items_cost.append(c[e])
                items_bytes.append(rec_bytes)
                owners.append((imp.layer, e))
        else:
            items_cost.append(c.sum(0))
            items_bytes.append(rec_bytes * imp.n_expert)
            owners.append((imp.layer, -1))
    n_expert_items = len(owners)
    for ti in tensors:
        items_cost.append(np.array([ti.eps_fisher[t] ** 2 * ti.flip_factor for t in ti.types]))
        items_bytes.append(np.array([ti.n_bytes(t) for t in ti.types], dtype=np.float64))
        owners.append((ti.name, -2))
    n_items = len(owners)
    n_planned = n_weights + sum(ti.rows * ti.cols for ti in tensors)
    budget = bpw * n_planned / 8.0
    # budget groups: all items (global, file) or each layer's items
    if scope != "layer":
        groups = [(list(range(n_items)), budget)]
    else:
        by_layer: dict[int, list[int]] = {}
        for i, (layer, _) in enumerate(owners):
            by_layer.setdefault(layer, []).append(i)
        groups = [(by_layer[imp.layer], bpw * nw / 8.0) for imp, nw in zip(layers, layer_weights, strict=True)]
    min_bpw = max(bpw * sum(items_bytes[i].min() for i in members) / b for members, b in groups)
    if min_bpw > bpw + 1e-9:
        over = "all planned weights" if scope == "file" else "the expert weights"
        raise McsharpError(f"--bpw {bpw} is below what the candidate types can reach; the minimum achievable "
                           f"is {min_bpw:.3f} bpw over {over}")
    cost = np.concatenate(items_cost)
    # Scale costs so HiGHS sees O(1) numbers; the argmin is unchanged.
    scale = cost.max() if cost.max() > 0 else 1.0
    offsets = np.concatenate([[0], np.cumsum([len(c) for c in items_cost])])
    n_var = int(offsets[-1])
    one_each = sparse.csr_matrix((np.ones(n_var), np.concatenate([np.arange(offsets[i], offsets[i + 1])
                                                                  for i in range(n_items)]),
                                  offsets), shape=(n_items, n_var))  # DeepSeek: 10^4 items
    rows = sparse.lil_matrix((len(groups), n_var))
    for g, (members, _) in enumerate(groups):
        for i in members:
            rows[g, offsets[i]:offsets[i + 1]] = items_bytes[i]
    res = milp(c=cost / scale, integrality=np.ones_like(cost), bounds=Bounds(0, 1),
               constraints=[LinearConstraint(one_each, 1, 1),
                            LinearConstraint(rows.tocsr(), 0, [b for _, b in groups])],
               options={"disp": False})
    if res.x is None:
        raise McsharpError(f"the bit-plan MILP failed ({res.message}); try a slightly larger --bpw")
    x = np.round(res.x)
    choice = np.array([int(np.argmax(x[offsets[i]:offsets[i + 1]])) for i in range(n_items)])
    for members, b in groups:
        choice = _spend_leftover(choice, items_cost, items_bytes, b, members)
    # per-layer budgets each leave up to a step unspent; a global MILP stops within HiGHS' relative gap
    choice = _spend_global_leftover(choice, items_cost, items_bytes, budget)
    plan_layers: dict[int, list[str]] = {}
    recipes: dict[str, dict[str, str]] = {}
    spent = 0.0
    for i in range(n_expert_items):
        (layer, e), k = owners[i], choice[i]
        imp = next(x for x in layers if x.layer == layer)
        n_e = imp.n_expert
        plan_layers.setdefault(layer, [""] * n_e)
        if e < 0:
            plan_layers[layer] = [targets[k]] * n_e
        else:
            plan_layers[layer][e] = targets[k]
        r = Recipe.for_shapes(targets[k], imp.d_model, imp.d_ff)
        recipes[f"{layer}:{targets[k]}"] = {"gate": r.gate, "up": r.up, "down": r.down}
        spent += items_bytes[i][k]
    tensor_types = {ti.name: ti.types[choice[n_expert_items + j]] for j, ti in enumerate(tensors)}
    dense_bytes = sum(items_bytes[i][choice[i]] for i in range(n_expert_items, n_items))
    return BitPlan(mode=mode, target_bpw=bpw, achieved_bpw=8 * spent / n_weights,
                   expert_bytes=int(spent), expert_weights=n_weights, layers=plan_layers, recipes=recipes,
                   alpha=alpha, beta=beta, gamma=gamma, scope=scope, metric=metric, tensor_types=tensor_types,
                   dense_bytes=int(dense_bytes), dense_weights=n_planned - n_weights, shrink=float(shrink),
                   cv_costs=cv_costs, coverage={imp.layer: {"tokens": imp.tokens, "d_model": imp.d_model,
                                                            "d_ff": imp.d_ff} for imp in layers if imp.tokens})


def plan_metric(scope: str, metric: str) -> str:
    """The cost metric a plan of ``scope`` prices in: a whole-file plan always in the Fisher metric, the only one
    in which an expert's and a non-expert tensor's errors compare."""
    return "fisher" if scope == "file" else metric


SHRINK_GRID: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)


def shrunk_costs(imp: LayerImportance, shrink: float) -> LayerImportance:
    """``imp`` with every expert's eps_fisher² per unit of activation frequency pulled toward the layer's mean
    for the same type: c' = phi·(shrink·c/phi + (1 − shrink)·mean(c/phi)). Frequencies are counted exactly;
    the error per routed token is the noisy part (shrink 0: the layer's experts differ only in how often they
    run; 1: as measured). Experts no token reached keep cost 0."""
    phi = np.asarray(imp.phi, dtype=np.float64)
    seen = phi > 0
    eps = {}
    for t, v in imp.eps_fisher.items():
        per = np.zeros_like(phi)
        per[seen] = np.square(v)[seen] / phi[seen]
        mean = per[seen].mean() if seen.any() else 0.0
        eps[t] = np.sqrt(phi * (shrink * per + (1.0 - shrink) * mean)).tolist()
    return replace(imp, eps_fisher=eps, eps_fisher_a={})


def _fold_part(all_: np.ndarray, a: np.ndarray, fold: str) -> np.ndarray:
    """eps of one calibration fold from the all-token and fold-A values (squares add over tokens)."""
    return a if fold == "a" else np.sqrt(np.maximum(np.square(all_) - np.square(a), 0.0))


def fold_importance(layers: list[LayerImportance], tensors, fold: str
                    ) -> tuple[list[LayerImportance], list[TensorImportance]]:
    """The importance as measured on calibration fold ``fold`` ("a": even sequences, "b": odd) alone."""
    lay = [replace(imp, eps_fisher={t: _fold_part(np.asarray(v), np.asarray(imp.eps_fisher_a[t]), fold).tolist()
                                    for t, v in imp.eps_fisher.items()}, eps_fisher_a={}) for imp in layers]
    ten = [replace(ti, eps_fisher={t: float(_fold_part(np.float64(v), np.float64(ti.eps_fisher_a[t]), fold))
                                   for t, v in ti.eps_fisher.items()}, eps_fisher_a={}) for ti in tensors]
    return lay, ten


def plan_cost(plan: BitPlan, layers: list[LayerImportance], tensors=()) -> float:
    """The fisher-metric objective of ``plan`` priced by ``layers``/``tensors``: Σ eps_fisher² · flip_factor over
    every chosen (expert, type) and (tensor, type), i.e. 2× the estimated output KL summed over the tokens."""
    total = sum(imp.flip_factor * imp.eps_fisher[t][e] ** 2 for imp in layers
                for e, t in enumerate(plan.layers[imp.layer]))
    by_name = {ti.name: ti for ti in tensors}
    return total + sum(by_name[n].flip_factor * by_name[n].eps_fisher[t] ** 2 for n, t in plan.tensor_types.items())


def out_of_fold_cost(layers: list[LayerImportance], bpw: float, tensors=(), **solve_kw) -> float:
    """Two-fold cross-validated cost of a planning rule: plan on fold A's costs, price the plan with fold B's,
    and the other way round; the sum estimates the true cost of the rule's plans without the optimism of
    pricing a plan with the same noisy numbers that chose it."""
    folds = {f: fold_importance(layers, tensors, f) for f in ("a", "b")}
    total = 0.0
    for f, other in (("a", "b"), ("b", "a")):
        plan = solve_bit_plan(folds[f][0], bpw, tensors=folds[f][1], **solve_kw)
        total += plan_cost(plan, *folds[other])
    return total


def choose_shrinkage(layers: list[LayerImportance], bpw: float, tensors=(), grid: tuple[float, ...] = SHRINK_GRID,
                     **solve_kw) -> tuple[float, dict[str, float]]:
    """The mixed plan's cost shrinkage with the lowest out-of-fold cost on ``grid`` (ties: the larger one),
    and the out-of-fold cost of each."""
    cv = {f"{s:g}": out_of_fold_cost(layers, bpw, tensors, mode="mixed", metric="fisher", shrink=s, **solve_kw)
          for s in grid}
    best = min(grid, key=lambda s: (cv[f"{s:g}"], -s))
    return float(best), cv


def format_plan_table(plan: BitPlan) -> str:
    """Readable table: one row per layer, one column per expert (recipe target)."""
    n_e = max(len(v) for v in plan.layers.values())
    head = "layer | " + " ".join(f"e{e:<5d}" for e in range(n_e))
    rows = [f"{plan.mode} plan: {plan.achieved_bpw:.3f} bpw achieved (target {plan.target_bpw}), "
            f"{plan.expert_bytes / 1e6:.2f} MB of expert weights", head, "-" * len(head)]
    for layer in sorted(plan.layers):
        rows.append(f"{layer:5d} | " + " ".join(f"{t:<6s}" for t in plan.layers[layer]))
    if plan.coverage:
        rows.append(format_coverage(plan.coverage))
    if plan.cv_costs:
        rows.append(f"per-expert costs shrunk toward the layer mean: shrink {plan.shrink:g}, chosen by two-fold "
                    "cross-validation (out-of-fold cost per shrink: "
                    + ", ".join(f"{k} {v:.4g}" for k, v in plan.cv_costs.items()) + ")")
    if plan.tensor_types:
        rows.append(f"non-expert tensors: {len(plan.tensor_types)}, {plan.dense_bytes / 1e6:.2f} MB, "
                    f"{8 * plan.dense_bytes / max(plan.dense_weights, 1):.3f} bpw; whole file plan at "
                    f"{plan.target_bpw:.3f} bpw over experts and these")
        by_group: dict[str, list[str]] = {}
        for name, t in sorted(plan.tensor_types.items(), key=lambda kv: _layer_key(kv[0])):
            group, _, local = name.removesuffix(".weight").rpartition(".")
            by_group.setdefault(group or "-", []).append(f"{local}={t}")
        rows += [f"{g:>7s} | " + " ".join(v) for g, v in by_group.items()]
    return "\n".join(rows)


def format_coverage(coverage: dict[int, dict]) -> str:
    """One line on how well the calibration tokens covered the experts, and which fall back to RTN."""
    toks = np.concatenate([np.asarray(c["tokens"]) for c in coverage.values()])
    n_in = sum(int((np.asarray(c["tokens"]) < c["d_model"]).sum()) for c in coverage.values())
    n_ff = sum(int((np.asarray(c["tokens"]) < c["d_ff"]).sum()) for c in coverage.values())
    starved = [f"{lay}:{e}" for lay, c in sorted(coverage.items()) for e, t in enumerate(c["tokens"])
               if t < c["d_model"]]
    shown = ", ".join(starved[:12]) + (f", … ({len(starved)} in all)" if len(starved) > 12 else "")
    return (f"calibration tokens per expert: min {int(toks.min())}, median {int(np.median(toks))}, max "
            f"{int(toks.max())}; fewer than the input width (RTN instead of GPTQ): gate/up of {n_in}, down of "
            f"{n_ff} of {toks.size} experts" + (f" [layer:expert {shown}]" if starved else ""))


def _layer_key(name: str) -> tuple[int, str]:
    """Sort key for GGUF names: blk.N.* by N, the rest (token_embd, output) first."""
    parts = name.split(".")
    return (int(parts[1]) if parts[0] == "blk" else -1, name)


def plot_plan(plan: BitPlan, path) -> None:
    """PNG heatmap: layers × experts → true bits per weight of each expert's recipe target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted(plan.layers)
    grid = np.array([[bits_per_weight(t) for t in plan.layers[layer]] for layer in layers])
    fig, ax = plt.subplots(figsize=(1 + 0.5 * grid.shape[1], 1 + 0.25 * grid.shape[0]))
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_yticks(range(len(layers)), [str(x) for x in layers])
    ax.set_title(f"PMQ {plan.mode}: {plan.achieved_bpw:.2f} bpw")
    fig.colorbar(im, ax=ax, label="bits per weight")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


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


def _dense_fisher(w: torch.Tensor, x: torch.Tensor, g: torch.Tensor, types: tuple[str, ...], in_a: torch.Tensor,
                  gptq: bool = False, scale: float = 1.0) -> tuple[dict[str, float], dict[str, float]]:
    """Fisher error of a linear ``w`` (out, in) per storable type, over all tokens and over fold A's (``in_a``):
    x (tokens, in) its inputs, g (tokens, out) the gradient of log p(ŷ) at its output; the output change of
    quantising it is x·ΔWᵀ. ``gptq``: ΔW of GPTQ on x's Hessian (as convert quantises the tensor), else of RTN.
    ``scale``: (all tokens / tapped tokens)^½, so that eps² is summed over as many tokens as the experts' (the
    taps see only the first sequences)."""
    from .gptq import HessianAccumulator, gptq_quantize

    h = None
    if gptq and x.shape[0] > 0:
        h = HessianAccumulator(w.shape[1])
        h.add(x)
    out, out_a = {}, {}
    for t in dict.fromkeys(storable_type(t, w.shape[1]) for t in types):
        dw = (gptq_quantize(w, h.H, t) if h is not None else quantize_rtn(w, t)).dequant - w
        per_token = ((g @ dw) * x).sum(1).square()  # (gᵀΔW)·x == gᵀ(ΔW x), cheaper
        out[t], out_a[t] = (scale * e for e in fisher_error_split(per_token, in_a))
    return out, out_a


def fold_a_mask(n_tokens: int, seq_len: int) -> torch.Tensor:
    """Calibration fold A: the tokens of the even-numbered sequences (tokens are sequence-major)."""
    return (torch.arange(n_tokens) // seq_len) % 2 == 0


@dataclass
class _Measure:
    """What every item of one importance pass shares (see measure_importance)."""

    stream: object  # calib.LayerStream
    token_ids: torch.Tensor
    targets: tuple[str, ...]
    dense_types: tuple[str, ...]
    gptq: bool
    tap_scale: float
    flip_probe: str | None
    in_a: torch.Tensor  # fold A mask over all calibration tokens
    tied: bool  # the LM head is the token embedding (GGUF then has no output.weight)


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
    ids = m.token_ids.flatten()
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


def _layer_record(m: _Measure, item, names) -> dict:
    """One decoder layer: its tapped non-expert linears' Fisher errors and, for an MoE layer, phi, w and every
    (expert, recipe)'s eps (plain and Fisher, all tokens and fold A)."""
    from .calib import capture_moe
    from .quantize import checkpoint_name, dense_linears, expert_hessians, quantize_expert

    stream, i, layer = m.stream, item.index, item.layer
    tensors = []
    for n, (cls, mod) in dense_linears(layer, stream.arch).items():
        gname = names.get_name(checkpoint_name(stream.arch, i, n), try_suffixes=(".weight",))
        if gname is not None and n in item.taps:
            w, (x, g) = mod.weight.detach(), item.taps[n]
            eps_t, eps_t_a = _dense_fisher(w, x, g, m.dense_types, m.in_a[:x.shape[0]], gptq=m.gptq,
                                           scale=m.tap_scale)
            tensors.append(asdict(TensorImportance(gname, cls, *w.shape, eps_t, eps_fisher_a=eps_t_a)))
    block = stream.moe_block(layer)
    if block is None:
        return {"tensors": tensors, "layer": None}
    h_in, g_out = item.h_in, item.g_out
    cap, h_out = capture_moe(block, stream.arch, stream.n_expert, stream.runner(layer, h_in.shape[1]), h_in)
    grad = g_out.reshape(-1, g_out.shape[-1])
    experts = getattr(block, stream.arch.experts)
    gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
    d_model, d_ff = gate_up.shape[2], down.shape[2]
    eps: dict[str, list[float]] = {t: [] for t in m.targets}
    eps_fisher: dict[str, list[float]] = {t: [] for t in m.targets}
    eps_fisher_a: dict[str, list[float]] = {t: [] for t in m.targets}
    probe = []  # RTN Fisher error at flip_probe: what the flip probe's real KL is compared with
    for e in range(stream.n_expert):
        tok, slot = torch.where(cap.top_k_index == e)
        x, w = cap.x[tok], cap.top_k_weights[tok, slot]
        g, u, d = gate_up[e, :d_ff], gate_up[e, d_ff:], down[e]
        hessians = expert_hessians(g, u, x, experts.act_fn) if m.gptq else (None, None)
        for t in m.targets:
            if x.shape[0] == 0:
                for acc in (eps, eps_fisher, eps_fisher_a):
                    acc[t].append(0.0)
                continue
            r = Recipe.for_shapes(t, d_model, d_ff)
            q = None
            if m.gptq:
                res = quantize_expert(g, u, d, {"gate": r.gate, "up": r.up, "down": r.down}, hessians)
                q = (res["gate"].dequant, res["up"].dequant, res["down"].dequant)
            delta = expert_output_delta(gate_up[e], down[e], x, w, r, act=experts.act_fn, quantised=q)
            eps[t].append(float(delta.norm()))
            e_all, e_a = fisher_error_split((delta * grad[tok]).sum(1).square(), m.in_a[tok])
            eps_fisher[t].append(e_all)
            eps_fisher_a[t].append(e_a)
            if t == m.flip_probe:
                probe.append(e_all if not m.gptq else fisher_error(
                    expert_output_delta(gate_up[e], down[e], x, w, r, act=experts.act_fn), grad[tok]))
    phi, wmass = cap.stats.normalised()
    imp = LayerImportance(i, d_model, d_ff, phi.tolist(), wmass.tolist(), eps, out_norm=float(h_out.float().norm()),
                          eps_fisher=eps_fisher, eps_fisher_a=eps_fisher_a, tokens=[int(f) for f in cap.stats.freq])
    return {"tensors": tensors, "layer": asdict(imp), "probe": probe}


def _importance_state(work_dir, key: str, n_layer: int, head_needed: bool) -> tuple[Path | None, dict, int | None]:
    """(state dir, finished item records, layer to resume below) of an importance pass kept in ``work_dir``.
    A state of other inputs (``key``) or one that cannot be continued is cleared."""
    import shutil

    from .sensitivity import resumable_from

    if work_dir is None:
        return None, {}, None
    state = Path(work_dir) / "importance"
    if (state / "key.txt").exists() and (state / "key.txt").read_text() != key:
        shutil.rmtree(state)
    records = {int(p.stem.split("-")[1]): json.loads(p.read_text()) for p in sorted(state.glob("item-*.json"))}
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
    import hashlib

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
                       work_dir=None) -> ModelImportance:
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

    ``work_dir``: keep the pass's state (spilled layer inputs, gradients, each finished layer's results) in
    ``work_dir/importance``, so a run stopped at layer N continues there with the same result.
    """
    from tqdm import tqdm

    from .calib import LayerStream
    from .quantize import dense_linears, gguf_name_map
    from .sensitivity import reverse_layers

    if eps_source not in ("rtn", "gptq"):
        raise McsharpError(f"eps source {eps_source} is not one of rtn, gptq")
    if flip_probe is not None and flip_probe not in targets:
        raise McsharpError(f"--flip-probe {flip_probe} is not one of the candidate types {', '.join(targets)}")
    stream = LayerStream.open(model_dir)
    m = _Measure(stream, token_ids, tuple(targets), tuple(dense_types), eps_source == "gptq",
                 (token_ids.shape[0] / min(tap_seqs, token_ids.shape[0])) ** 0.5, flip_probe,
                 fold_a_mask(token_ids.numel(), token_ids.shape[1]), stream.lm_head_name() != "lm_head.weight")
    names = gguf_name_map(stream.arch, stream.n_layer)
    key = _importance_key(model_dir, token_ids, targets=m.targets, dense=dense, dense_types=m.dense_types,
                          tap_seqs=tap_seqs, seed=seed, eps_source=eps_source, flip_probe=flip_probe, version=1)
    state, records, resume = _importance_state(work_dir, key, stream.n_layer, dense)

    def taps(layer):
        return {n: mod for n, (_, mod) in dense_linears(layer, stream.arch).items()}

    bar = tqdm(total=stream.n_layer, initial=stream.n_layer - (stream.n_layer if resume is None else resume),
               desc="importance: measure", unit="layer", disable=not progress)
    for item in reverse_layers(stream, token_ids, seed=seed, taps=taps if dense else None, tap_seqs=tap_seqs,
                               state_dir=state, resume_at=resume, progress=progress):
        i = item.index
        if item.layer is None and i >= 0:
            rec = _head_record(m, item)
        elif item.layer is None:
            rec = _embedding_record(m, item, records.get(stream.n_layer, {})) if dense else {"tensors": []}
        else:
            rec = _layer_record(m, item, names)
            bar.update()
        records[i] = rec
        if state is not None:
            tmp = state / f"item-{i:05d}.tmp"
            tmp.write_text(json.dumps(rec))
            tmp.replace(state / f"item-{i:05d}.json")
    bar.close()
    out = sorted((LayerImportance(**r["layer"]) for r in records.values() if r.get("layer")), key=lambda x: x.layer)
    tensors = [TensorImportance(**t) for r in records.values() for t in r["tensors"]]
    if not out:
        raise McsharpError(f"{model_dir} has no MoE layers; PMQ needs a Mixture-of-Experts checkpoint")
    if flip_probe is not None:
        n_probe = min(probe_seqs, token_ids.shape[0])
        _measure_flip_factors(stream, token_ids[:n_probe], out, flip_probe, token_ids.shape[0] / n_probe,
                              {i: r["probe"] for i, r in records.items() if r.get("layer")})
        by_layer = {imp.layer: imp.flip_factor for imp in out}
        moe = sorted(by_layer)
        for ti in tensors:
            ti.flip_factor = _feeding_factor(ti, by_layer, moe)
    return ModelImportance(out, sorted(tensors, key=lambda t: t.name), eps_source)


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
    from .sensitivity import perturbation_kl

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
