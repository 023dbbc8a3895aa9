"""The BitPlan stage: one recipe per expert (``mixed``) or per layer (``stock``), and with a whole-file scope one
type per non-expert tensor, minimising the total cost under a byte budget, solved as an integer program.

Mixed plans on the Fisher metric choose how far to trust per-expert differences by two-fold cross-validation over
the calibration folds (choose_shrinkage: plan on one fold's costs, price the plan with the other's). It calls the
solver, and the solver calls it, so both live here.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from ..errors import McsharpError
from .candidates import EXPERT_TYPES, Recipe
from .importance import LayerImportance, TensorImportance
from .speed import MAX_SLOWDOWN, PHASES, plan_time, recipe_cost, run_rate, tensor_rate, type_cost

# Cost exponents and budget scope (see solve_bit_plan): measured on the fixture, scripts/bench_quality.py.
ALPHA, BETA, GAMMA, SCOPE, METRIC = 1.0, 1.5, 2.0, "global", "fisher"
# How far above the best bound a plan may stop (HiGHS' default relative MIP gap; 10^-4 of the objective).
MIP_GAP = 1e-4


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
    # calibration coverage: layer → {"tokens": per-expert routed tokens, "d_model", "d_ff", "layer_tokens"}; an
    # expert with fewer tokens than a projection's input width borrows the layer's pooled Hessian there, and gets
    # RTN where the layer's tokens are fewer too (quant.experts.expert_hessians)
    coverage: dict[int, dict] = field(default_factory=dict)
    # the checkpoint it was made for (model.checkpoint.model_identity: its config and tensor shapes; "" unknown)
    model: str = ""
    # mixed: time per token of what it types over the stock plan's at the same budget, per phase (pmq.speed);
    # max_slowdown: the bound it was planned under (None: bytes only)
    time_vs_stock: dict[str, float] = field(default_factory=dict)
    max_slowdown: float | None = None

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
            plan = cls(**d)
            if plan.mode not in ("stock", "mixed"):
                raise ValueError(f"mode {plan.mode!r}")
            for layer, targets in plan.layers.items():
                if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets) or not targets:
                    raise ValueError(f"layer {layer} has no list of expert types")
            if not (plan.expert_weights > 0 and plan.expert_bytes > 0 and 0 < plan.target_bpw <= 32):
                raise ValueError("its sizes are not positive")
            return plan
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise McsharpError(f"not a plan of this mcsharp version ({type(e).__name__}: {e}); recompute it with "
                               "`mcsharp plan`") from None


@dataclass(frozen=True)
class Time:
    """A time budget over the MILP's items: each option's time per token in each phase (pmq.speed; an array of
    options × phases an item) and the most the chosen options may take together in each phase (inf: none)."""

    items: list[np.ndarray]
    budget: np.ndarray

    @classmethod
    def none(cls, items_cost: list[np.ndarray]) -> Time:
        return cls([np.zeros((len(c), len(PHASES))) for c in items_cost], np.full(len(PHASES), np.inf))

    def left(self, choice: np.ndarray) -> np.ndarray:
        return self.budget - sum(t[k] for t, k in zip(self.items, choice, strict=True))


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
                    budget: float, members: list[int] | None = None, time: Time | None = None) -> np.ndarray:
    """Give the bytes the MILP left unused to items whose cost is zero for every recipe.

    An expert no calibration token reached has phi = 0 and eps = 0, so every recipe costs it nothing and the
    solver leaves it at an arbitrary (often the smallest) type even when the budget would allow more, yet
    inference will route tokens to it. Upgrading such items one size step at a time, round-robin, while the
    budget holds leaves the optimal cost unchanged and stops unseen experts from being starved for nothing.
    With time budgets (``time``) an upgrade must fit them too.
    """
    choice = choice.copy()
    members = list(range(len(items_cost))) if members is None else members
    spent = float(sum(items_bytes[i][choice[i]] for i in members))
    time = time or Time.none(items_cost)
    left_t = time.left(choice)
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
            dt = time.items[i][nxt] - time.items[i][k]
            if spent + b[nxt] - b[k] <= budget and np.all(dt <= left_t):
                spent += b[nxt] - b[k]
                left_t -= dt
                choice[i] = nxt
                upgraded = True
    return choice


def _spend_global_leftover(choice: np.ndarray, items_cost: list[np.ndarray], items_bytes: list[np.ndarray],
                           budget: float, time: Time | None = None) -> np.ndarray:
    """Give what the plan leaves of the overall budget back greedily, to the upgrade with the largest cost
    reduction per byte that still fits (bytes, and the time budgets ``time`` if any), until none fits."""
    choice = choice.copy()
    left = budget - float(sum(b[k] for b, k in zip(items_bytes, choice, strict=True)))
    time = time or Time.none(items_cost)
    left_t = time.left(choice)
    while True:
        best = None
        for i, (c, b) in enumerate(zip(items_cost, items_bytes, strict=True)):
            k, t = choice[i], time.items[i]
            fits = (b > b[k]) & (b - b[k] <= left) & (c <= c[k]) & np.all(t - t[k] <= left_t, axis=1)
            for k2 in np.flatnonzero(fits):  # more bits never hurt
                gain = (c[k] - c[k2]) / (b[k2] - b[k])
                if best is None or gain > best[0]:
                    best = (gain, i, int(k2))
        if best is None:
            return choice
        _, i, k2 = best
        left -= items_bytes[i][k2] - items_bytes[i][choice[i]]
        left_t -= time.items[i][k2] - time.items[i][choice[i]]
        choice[i] = k2


def solve_bit_plan(layers: list[LayerImportance], bpw: float, mode: str = "mixed",
                   targets: tuple[str, ...] = EXPERT_TYPES, alpha: float = ALPHA, beta: float = BETA,
                   gamma: float = GAMMA, scope: str = SCOPE, metric: str = METRIC,
                   tensors: tuple[TensorImportance, ...] | list[TensorImportance] = (),
                   shrink: float | str = "cv", max_slowdown: float | None = MAX_SLOWDOWN) -> BitPlan:
    """Choose one recipe per expert (``mixed``) or per layer (``stock``) minimising total cost under a budget
    of ``bpw`` true bits per expert weight: one budget all layers share (``scope="global"``) or one per layer
    (``"layer"``, MC's formulation; what the layers leave unspent is then handed out greedily, so the file
    still uses the whole budget).

    ``max_slowdown`` (mixed mode): the plan's time per token in decode and in prefill (pmq.speed: each option's
    kernel time per weight × how often a token runs it) may each exceed that of the stock plan at the same budget
    by at most this fraction, so that per-expert types do not make the file slower than a stock one of its size;
    None: bytes only.

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

    (Twelve parameters: the planning rule's knobs, each defaulting to what the quality tables chose.)
    """
    _check_plan_args(layers, mode, scope, metric, tensors, max_slowdown)
    if scope != "file":
        tensors = ()
    targets = tuple(targets)
    time_budget, t_stock = np.full(len(PHASES), np.inf), None
    if mode == "mixed":  # the stock plan at this budget: the time a mixed plan is held to and reported against
        stock = solve_bit_plan(layers, bpw, mode="stock", targets=targets, alpha=alpha, beta=beta, gamma=gamma,
                               scope=scope, metric=metric, tensors=tensors)
        t_stock = plan_time(stock, layers, tensors)
        if max_slowdown is not None:
            time_budget = (1.0 + max_slowdown) * t_stock * (1.0 + 1e-9)
    shrink, cv_costs = _resolve_shrink(layers, bpw, mode, metric, shrink, targets, scope, tensors, max_slowdown)
    if shrink < 1.0:
        layers = [shrunk_costs(imp, float(shrink)) for imp in layers]
    items_cost, items_bytes, items_time, owners, n_expert_items, n_weights, layer_weights = _plan_items(
        layers, tensors, targets, mode, (alpha, beta, gamma, metric))
    n_items = len(owners)
    n_planned = n_weights + sum(ti.rows * ti.cols for ti in tensors)
    budget = bpw * n_planned / 8.0
    groups = _budget_groups(owners, items_bytes, layers, layer_weights, bpw, budget, scope)
    start = None if t_stock is None else _stock_choice(stock, owners, n_expert_items, targets, tensors)
    if start is not None and scope == "layer":
        groups = _admit_stock(groups, start, items_bytes, budget)
    choice = _milp_choice(items_cost, items_bytes, groups, budget, Time(items_time, time_budget), start)
    plan_layers, recipes, spent = _plan_layers(owners, choice, items_bytes, n_expert_items, layers, targets)
    tensor_types = {ti.name: ti.types[choice[n_expert_items + j]] for j, ti in enumerate(tensors)}
    dense_bytes = sum(items_bytes[i][choice[i]] for i in range(n_expert_items, n_items))
    time_vs_stock = {}
    if t_stock is not None:
        t_plan = sum(t[k] for t, k in zip(items_time, choice, strict=True))
        time_vs_stock = {ph: float(t_plan[i] / t_stock[i]) for i, ph in enumerate(PHASES) if t_stock[i] > 0}
    return BitPlan(mode=mode, target_bpw=bpw, achieved_bpw=8 * spent / n_weights,
                   expert_bytes=int(spent), expert_weights=n_weights, layers=plan_layers, recipes=recipes,
                   alpha=alpha, beta=beta, gamma=gamma, scope=scope, metric=metric, tensor_types=tensor_types,
                   dense_bytes=int(dense_bytes), dense_weights=n_planned - n_weights, shrink=float(shrink),
                   cv_costs=cv_costs, coverage={imp.layer: {"tokens": imp.tokens, "d_model": imp.d_model,
                                                            "d_ff": imp.d_ff, "layer_tokens": imp.layer_tokens}
                                                for imp in layers if imp.tokens},
                   time_vs_stock=time_vs_stock, max_slowdown=max_slowdown if mode == "mixed" else None)


def _stock_choice(stock: BitPlan, owners: list, n_expert_items: int, targets: tuple[str, ...],
                  tensors) -> np.ndarray:
    """The stock plan as the mixed MILP's items' options (every expert of a layer at the layer's type)."""
    experts = [targets.index(stock.layers[layer][e]) for layer, e in owners[:n_expert_items]]
    return np.array(experts + [ti.types.index(stock.tensor_types[ti.name]) for ti in tensors], dtype=int)


def _check_plan_args(layers: list[LayerImportance], mode: str, scope: str, metric: str, tensors,
                     max_slowdown: float | None) -> None:
    """solve_bit_plan's one-line errors for settings that cannot be planned."""
    if max_slowdown is not None and not max_slowdown >= 0.0:
        raise McsharpError(f"max_slowdown {max_slowdown}: a mixed plan can be held to at most its stock plan's time "
                           "(0) or more, not less; give a number >= 0 or None")
    if mode not in ("mixed", "stock"):
        raise McsharpError(f"--mode {mode} is not one of mixed, stock")
    if scope not in ("global", "layer", "file"):
        raise McsharpError(f"budget scope {scope} is not one of layer, global, file")
    if metric not in ("fisher", "mc"):
        raise McsharpError(f"cost metric {metric} is not one of fisher, mc")
    if not layers:
        raise McsharpError("the model has no MoE layers to plan; PMQ needs a Mixture-of-Experts checkpoint")
    if mode == "mixed" and any(imp.sampled for imp in layers):
        raise McsharpError("this importance measured every candidate type on a sample of each layer's experts "
                           "(enough for a stock plan); a mixed plan needs every expert measured: re-measure it "
                           "with --mode mixed")
    if scope == "file" and (not tensors or metric != "fisher"):
        raise McsharpError("a whole-file plan needs the non-expert tensors' importance and the fisher metric")


def _resolve_shrink(layers: list[LayerImportance], bpw: float, mode: str, metric: str, shrink: float | str,
                    targets: tuple[str, ...], scope: str, tensors, max_slowdown: float | None
                    ) -> tuple[float | str, dict[str, float]]:
    """(the cost shrinkage solve_bit_plan applies, the out-of-fold cost per shrink when cross-validation chose it):
    1 outside mixed mode on the fisher metric, and for ``"cv"`` without calibration folds."""
    cv_costs: dict[str, float] = {}
    if mode != "mixed" or metric != "fisher":
        shrink = 1.0
    elif shrink == "cv":
        if all(imp.eps_fisher_a for imp in layers) and all(ti.eps_fisher_a for ti in tensors):
            shrink, cv_costs = choose_shrinkage(layers, bpw, targets=targets, scope=scope, tensors=tensors,
                                                max_slowdown=max_slowdown)
        else:
            shrink = 1.0
    if isinstance(shrink, str) or not 0.0 <= float(shrink) <= 1.0:
        raise McsharpError(f"cost shrinkage {shrink!r} is neither 'cv' nor a number in [0, 1]")
    return shrink, cv_costs


def _plan_items(layers: list[LayerImportance], tensors, targets: tuple[str, ...], mode: str, cost_args: tuple):
    """The MILP's items, each picking one option: an expert (mixed) or a layer's experts (stock), then each
    non-expert tensor. Returns (cost per option, bytes per option, time per option and phase (pmq.speed), owner,
    number of expert items, expert weights, weights per layer); an owner is (layer, expert), (layer, -1) or
    (tensor name, -2). ``cost_args``: costs' (alpha, beta, gamma, metric)."""
    items_cost, items_bytes, items_time, owners = [], [], [], []
    n_weights = 0
    layer_weights: list[int] = []
    for imp in layers:
        rec_bytes = np.array([Recipe.for_shapes(t, imp.d_model, imp.d_ff).n_bytes(imp.d_model, imp.d_ff)
                              for t in targets], dtype=np.float64)
        c = costs(imp, targets, *cost_args)
        rec_time = np.array([recipe_cost(t, imp.d_model, imp.d_ff) for t in targets])  # options × phases
        rate = run_rate(imp)
        layer_weights.append(imp.n_expert * 3 * imp.d_model * imp.d_ff)
        n_weights += layer_weights[-1]
        if mode == "mixed":
            for e in range(imp.n_expert):
                items_cost.append(c[e])
                items_bytes.append(rec_bytes)
                items_time.append(rate[e] * rec_time)
                owners.append((imp.layer, e))
        else:
            items_cost.append(c.sum(0))
            items_bytes.append(rec_bytes * imp.n_expert)
            items_time.append(rate.sum() * rec_time)
            owners.append((imp.layer, -1))
    n_expert_items = len(owners)
    for ti in tensors:
        items_cost.append(np.array([ti.eps_fisher[t] ** 2 * ti.flip_factor for t in ti.types]))
        items_bytes.append(np.array([ti.n_bytes(t) for t in ti.types], dtype=np.float64))
        items_time.append(np.array([tensor_rate(ti) * ti.rows * ti.cols * type_cost(t) for t in ti.types]))
        owners.append((ti.name, -2))
    return items_cost, items_bytes, items_time, owners, n_expert_items, n_weights, layer_weights


def _budget_groups(owners: list, items_bytes: list[np.ndarray], layers: list[LayerImportance],
                   layer_weights: list[int], bpw: float, budget: float, scope: str) -> list[tuple[list[int], float]]:
    """(member items, bytes) of each budget: all items (global, file) or each layer's items; an error when the
    smallest options already exceed one."""
    n_items = len(owners)
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
    return groups


def _admit_stock(groups: list[tuple[list[int], float]], start: np.ndarray, items_bytes: list[np.ndarray],
                 budget: float) -> list[tuple[list[int], float]]:
    """Per-layer budgets raised to the bytes the stock plan ``start`` gives each layer, with the overall budget
    as one more group. The stock plan's leftover is handed out over all layers (_spend_global_leftover), so it
    can exceed a layer's budget; its time is what a mixed plan is held to, and without this that time could be
    out of the mixed MILP's reach (an infeasible plan, e.g. 2 × 4 experts at 4.13 bpw)."""
    raised = [(members, max(b, float(sum(items_bytes[i][start[i]] for i in members)))) for members, b in groups]
    if all(r == b for (_, r), (_, b) in zip(raised, groups, strict=True)):
        return groups
    return raised + [(list(range(len(items_bytes))), budget)]


def _milp_choice(items_cost: list[np.ndarray], items_bytes: list[np.ndarray], groups: list[tuple[list[int], float]],
                 budget: float, time: Time, start: np.ndarray | None = None) -> np.ndarray:
    """The option each item takes: the MILP's optimum (HiGHS) under every group's byte budget and the time budgets
    (if any), then what it leaves unspent handed out (_spend_leftover per group, _spend_global_leftover overall).
    ``start``: an option per item known to fit the budgets (the stock plan), which bounds the search."""
    from scipy import sparse
    from scipy.optimize import Bounds, LinearConstraint, milp

    n_items = len(items_cost)
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
    coupling = [(rows.tocsr(), 0, np.array([b for _, b in groups]))]  # (rows, lower bound, caps)
    if np.all(np.isfinite(time.budget)):
        t_rows = np.concatenate(time.items).T  # phases × variables
        t_scale = np.maximum(t_rows.max(axis=1), 1e-30)  # O(1) numbers for HiGHS, as for the costs
        coupling.append((sparse.csr_matrix(t_rows / t_scale[:, None]), -np.inf, time.budget / t_scale))

    item_of = np.repeat(np.arange(n_items), np.diff(offsets))

    def solve(cols: np.ndarray):  # the MILP on the options ``cols`` (every item keeping at least one)
        a_eq = one_each[:, cols][np.unique(item_of[cols])]
        cons = [LinearConstraint(a_eq, 1, 1), *(LinearConstraint(m[:, cols], lo, cap) for m, lo, cap in coupling)]
        return milp(c=cost[cols] / scale, integrality=np.ones(len(cols)), bounds=Bounds(0, 1), constraints=cons,
                    options={"disp": False, "mip_rel_gap": MIP_GAP})

    # HiGHS' branch and bound on the whole MILP is slow at real sizes (94 s at 48 × 128 experts on bytes alone; a
    # time row made it minutes at 58 × 256), so the options that cannot be in an optimum are removed first
    # (reduced-cost fixing): any plan costs at least the LP relaxation's optimum plus the reduced costs of the
    # options it takes, so an option whose reduced cost exceeds what a known plan (one near the LP, or ``start``)
    # costs over that bound is in no better plan. At real sizes the known plan is usually within MIP_GAP of the
    # bound already (then taken); where not (small problems) the MILP on the options left finds the optimum.
    res = _lp_relaxation(cost / scale, one_each, coupling)
    if res.x is None:
        raise McsharpError(f"the bit-plan MILP failed ({res.message}); try a slightly larger --bpw")
    known = [x for x in [_near_lp(res, solve)] if x is not None]  # a MILP solution: fits by construction
    if start is not None:
        x = np.zeros(n_var)
        x[offsets[:-1] + start] = 1.0
        if all(np.all(m @ x <= cap + 1e-9 * np.maximum(1.0, np.abs(cap))) for m, _, cap in coupling):
            known.append(x)
    best = min(known, key=lambda x: cost @ x, default=None)
    slack = np.inf if best is None else cost @ best / scale - res.fun
    if slack <= MIP_GAP * abs(res.fun):  # as close to the bound as HiGHS itself would stop
        res.x = best
    else:
        keep = res.lower.marginals <= slack + 1e-9 * max(1.0, abs(res.fun))
        if best is not None:
            keep |= best > 0.5
        cols = np.flatnonzero(keep)
        sub = solve(cols)
        if sub.x is None:
            raise McsharpError(f"the bit-plan MILP failed ({sub.message}); try a slightly larger --bpw")
        full = np.zeros(n_var)
        full[cols] = np.round(sub.x)
        res.x = full if best is None or cost @ full <= cost @ best else best
    x = np.round(res.x)
    choice = np.array([int(np.argmax(x[offsets[i]:offsets[i + 1]])) for i in range(n_items)])
    for members, b in groups:
        choice = _spend_leftover(choice, items_cost, items_bytes, b, members, time)
    # per-layer budgets each leave up to a step unspent; a global MILP stops within HiGHS' relative gap
    return _spend_global_leftover(choice, items_cost, items_bytes, budget, time)


def _near_lp(lp, solve) -> np.ndarray | None:
    """A plan near the LP relaxation's optimum ``lp``: the MILP restricted to the options the LP takes (in part)
    and those whose reduced cost is below a threshold, raised (to include 1/64, 1/16, 1/4 and then all of the
    others) until the restricted MILP has a solution; None if even the whole MILP has none."""
    taken = lp.x > 1e-9
    others = np.sort(lp.lower.marginals[~taken])
    for share in (0, 64, 16, 4, 1):
        delta = -np.inf if share == 0 else others[len(others) // share - 1] if len(others) else np.inf
        cols = np.flatnonzero(taken | (lp.lower.marginals <= delta))
        sub = solve(cols)
        if sub.x is not None:
            x = np.zeros(len(lp.x))
            x[cols] = np.round(sub.x)
            return x
    return None


def _lp_relaxation(cost: np.ndarray, one_each, coupling: list):
    """The MILP's LP relaxation (HiGHS), with the reduced cost of every option (``.lower.marginals``)."""
    from scipy import sparse
    from scipy.optimize import linprog

    a_ub = sparse.vstack([m for m, _, _ in coupling]).tocsr()
    b_ub = np.concatenate([cap for _, _, cap in coupling])
    return linprog(cost, A_ub=a_ub, b_ub=b_ub, A_eq=one_each, b_eq=np.ones(one_each.shape[0]), bounds=(0, 1),
                   method="highs")


def _plan_layers(owners: list, choice: np.ndarray, items_bytes: list[np.ndarray], n_expert_items: int,
                 layers: list[LayerImportance], targets: tuple[str, ...]
                 ) -> tuple[dict[int, list[str]], dict[str, dict[str, str]], float]:
    """The plan's layer → per-expert targets, the projection types of every (layer, target) used, and the bytes
    the experts take."""
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
    return plan_layers, recipes, spent


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


@dataclass(frozen=True)
class PlannerCeiling:
    """What per-expert types can gain at one budget, by the planner's own numbers: the fisher-metric cost (2× the
    estimated output KL summed over the calibration tokens) of three plans, each priced in-sample (by the costs
    that chose it) and out-of-fold (planned on one calibration fold, priced on the other, both ways):

    * ``stock``: one expert type per layer;
    * ``mixed_mean``: one type per expert on costs shrunk to the layer's mean (the experts differ only in how
      often they run);
    * ``mixed``: one type per expert on the costs as measured."""

    stock: tuple[float, float]
    mixed_mean: tuple[float, float]
    mixed: tuple[float, float]

    def gain(self, over: str = "mixed_mean", out_of_fold: bool = True) -> float:
        """1 − cost(mixed) / cost(``over``): the share of the estimated KL the per-expert costs remove."""
        i = int(out_of_fold)
        return 1.0 - self.mixed[i] / getattr(self, over)[i]


def planner_ceiling(layers: list[LayerImportance], bpw: float, tensors=(), **solve_kw) -> PlannerCeiling:
    """:class:`PlannerCeiling` of the importance ``layers`` (measured for a mixed plan: every expert at every type,
    with calibration folds) at ``bpw``; ``solve_kw`` as for :func:`solve_bit_plan` (scope, targets)."""
    if not all(imp.eps_fisher_a for imp in layers):
        raise McsharpError("the importance has no calibration folds (eps_fisher_a); measure it again with this "
                           "version to get out-of-fold costs")
    if any(imp.sampled for imp in layers):
        raise McsharpError("the importance was measured for a stock plan (a sample of experts at every type); "
                           "measure it with --mode mixed")

    def priced(**kw) -> tuple[float, float]:
        plan = solve_bit_plan(layers, bpw, tensors=tensors, metric="fisher", **solve_kw, **kw)
        return (plan_cost(plan, layers, tensors),
                out_of_fold_cost(layers, bpw, tensors, metric="fisher", **solve_kw, **kw))

    return PlannerCeiling(stock=priced(mode="stock"), mixed_mean=priced(mode="mixed", shrink=0.0),
                          mixed=priced(mode="mixed", shrink=1.0))
