"""PMQ: per-expert bit budgets from expert importance, solved as an integer program.

An expert's *recipe* is one target type applied to its gate/up/down projections; a projection whose row
length does not fit that type's block (e.g. 128-wide down_proj rows and 256-blocks of K-quants) falls back
to the closest type that fits, and the recipe's byte count is computed from the real shapes. Costs follow
MC: c(e, r) = phi_e^alpha · w_e^beta · eps(e, r), with eps the MoE-block output error when only expert e
is quantised with recipe r.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .errors import McsharpError
from .formats import QUANT_TYPES, bits_per_weight, block_size, quantize_rtn

# Expert candidates (DESIGN §3): scalar grids with CPU/CUDA mul_mat_id support, ascending size.
# Cost exponents and budget scope (see solve_bit_plan): measured on the fixture, scripts/bench_quality.py.
ALPHA, BETA, GAMMA, SCOPE = 1.0, 1.5, 2.0, "layer"

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
        def nb(t: str, rows: int, cols: int) -> int:
            return int(round(rows * cols * bits_per_weight(t) / 8))

        return nb(self.gate, d_ff, d_model) + nb(self.up, d_ff, d_model) + nb(self.down, d_model, d_ff)


def expert_output_error(gate_up: torch.Tensor, down: torch.Tensor, x: torch.Tensor, weights: torch.Tensor,
                        recipe: Recipe, act=torch.nn.functional.silu) -> float:
    """eps: ||ΔZ||_F of the MoE-block output when only this expert is quantised (RTN on ``recipe``).

    ``gate_up`` (2·ff, d), ``down`` (d, ff); ``x`` the inputs routed to the expert, ``weights`` their routing
    weights. Other experts and the router are untouched, so ΔZ is this expert's weighted output change.
    """
    if x.shape[0] == 0:
        return 0.0
    ff = down.shape[1]
    gq = quantize_rtn(gate_up[:ff], recipe.gate).dequant
    uq = quantize_rtn(gate_up[ff:], recipe.up).dequant
    dq = quantize_rtn(down, recipe.down).dequant

    def ffn(g, u, d):
        return (act(x @ g.T) * (x @ u.T)) @ d.T

    delta = (ffn(gq, uq, dq) - ffn(gate_up[:ff], gate_up[ff:], down)) * weights[:, None]
    return float(delta.norm())


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

    @property
    def n_expert(self) -> int:
        return len(self.phi)


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

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> BitPlan:
        d = json.loads(text)
        d["layers"] = {int(k): v for k, v in d["layers"].items()}
        return cls(**d)


def costs(imp: LayerImportance, targets: tuple[str, ...], alpha: float, beta: float, gamma: float = 1.0
          ) -> np.ndarray:
    """c(e, r) = phi^alpha · w^beta · eps^gamma, shape (n_expert, n_targets)."""
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
    """Per-layer budgets each leave up to one recipe step unspent; give the summed leftover back greedily, to the
    upgrade with the largest cost reduction per byte that still fits the overall budget, until none fits."""
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
                   gamma: float = GAMMA, scope: str = SCOPE) -> BitPlan:
    """Choose one recipe per expert (``mixed``) or per layer (``stock``) minimising total cost under a budget
    of ``bpw`` true bits per expert weight: one budget all layers share (``scope="global"``) or one per layer
    (``"layer"``, MC's formulation; what the layers leave unspent is then handed out greedily, so the file
    still uses the whole budget).

    A global budget trades error between layers on the strength of eps alone, but eps is measured at each layer's
    own output and says nothing about how an error there grows or fades downstream: on the fixture a global plan
    (absolute or layer-normalised eps) sent whole layers to Q1_0 and doubled the KLD of the per-layer plan at the
    same size. ``gamma`` = 2 makes costs additive in squared output error (errors of different experts add
    like independent vectors), so one huge error is never bought with many small savings.
    """
    from scipy import sparse
    from scipy.optimize import Bounds, LinearConstraint, milp

    if mode not in ("mixed", "stock"):
        raise McsharpError(f"--mode {mode} is not one of mixed, stock")
    if scope not in ("global", "layer"):
        raise McsharpError(f"budget scope {scope} is not one of global, layer")
    if not layers:
        raise McsharpError("the model has no MoE layers to plan; PMQ needs a Mixture-of-Experts checkpoint")
    targets = tuple(targets)
    n_t = len(targets)
    items_cost, items_bytes, owners = [], [], []  # one item = an expert (mixed) or a layer (stock)
    n_weights = 0
    layer_weights: list[int] = []
    for imp in layers:
        rec_bytes = np.array([Recipe.for_shapes(t, imp.d_model, imp.d_ff).n_bytes(imp.d_model, imp.d_ff)
                              for t in targets], dtype=np.float64)
        c = costs(imp, targets, alpha, beta, gamma)
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
    cost = np.concatenate(items_cost)
    n_items = len(owners)
    budget = bpw * n_weights / 8.0
    # budget groups: all items (global) or each layer's items
    if scope == "global":
        groups = [(list(range(n_items)), budget)]
    else:
        by_layer: dict[int, list[int]] = {}
        for i, (layer, _) in enumerate(owners):
            by_layer.setdefault(layer, []).append(i)
        groups = [(by_layer[imp.layer], bpw * nw / 8.0) for imp, nw in zip(layers, layer_weights, strict=True)]
    min_bpw = max(bpw * sum(items_bytes[i].min() for i in members) / b for members, b in groups)
    if min_bpw > bpw + 1e-9:
        raise McsharpError(f"--bpw {bpw} is below what the candidate types can reach; the minimum achievable "
                           f"is {min_bpw:.3f} bpw over the expert weights")
    # Scale costs so HiGHS sees O(1) numbers; the argmin is unchanged.
    scale = cost.max() if cost.max() > 0 else 1.0
    one_each = sparse.kron(sparse.identity(n_items), np.ones((1, n_t)), format="csr")  # DeepSeek: 10^4 items
    rows = sparse.lil_matrix((len(groups), n_items * n_t))
    for g, (members, _) in enumerate(groups):
        for i in members:
            rows[g, i * n_t:(i + 1) * n_t] = items_bytes[i]
    res = milp(c=cost / scale, integrality=np.ones_like(cost), bounds=Bounds(0, 1),
               constraints=[LinearConstraint(one_each, 1, 1),
                            LinearConstraint(rows.tocsr(), 0, [b for _, b in groups])],
               options={"disp": False})
    if res.x is None:
        raise McsharpError(f"the bit-plan MILP failed ({res.message}); try a slightly larger --bpw")
    choice = np.round(res.x).reshape(n_items, n_t).argmax(1)
    for members, b in groups:
        choice = _spend_leftover(choice, items_cost, items_bytes, b, members)
    if scope == "layer":
        choice = _spend_global_leftover(choice, items_cost, items_bytes, budget)
    plan_layers: dict[int, list[str]] = {}
    recipes: dict[str, dict[str, str]] = {}
    spent = 0.0
    for i, ((layer, e), k) in enumerate(zip(owners, choice, strict=True)):
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
    return BitPlan(mode=mode, target_bpw=bpw, achieved_bpw=8 * spent / n_weights, expert_bytes=int(spent),
                   expert_weights=n_weights, layers=plan_layers, recipes=recipes, alpha=alpha, beta=beta,
                   gamma=gamma, scope=scope)


def format_plan_table(plan: BitPlan) -> str:
    """Readable table: one row per layer, one column per expert (recipe target)."""
    n_e = max(len(v) for v in plan.layers.values())
    head = "layer | " + " ".join(f"e{e:<5d}" for e in range(n_e))
    rows = [f"{plan.mode} plan: {plan.achieved_bpw:.3f} bpw achieved (target {plan.target_bpw}), "
            f"{plan.expert_bytes / 1e6:.2f} MB of expert weights", head, "-" * len(head)]
    for layer in sorted(plan.layers):
        rows.append(f"{layer:5d} | " + " ".join(f"{t:<6s}" for t in plan.layers[layer]))
    return "\n".join(rows)


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


def measure_importance(model_dir, token_ids: torch.Tensor, targets: tuple[str, ...] = EXPERT_TYPES,
                       progress: bool = True) -> list[LayerImportance]:
    """Stream the model layer by layer over ``token_ids`` and measure phi, w and eps(e, r) for every
    MoE layer (eps with the fast RTN proxy on each recipe)."""
    from tqdm import tqdm

    from .calib import LayerStream, capture_moe

    stream = LayerStream.open(model_dir)
    hidden = stream.embed(token_ids)
    out: list[LayerImportance] = []
    bar = tqdm(total=stream.n_layer, desc="importance", unit="layer", disable=not progress)
    for i, layer, run in stream.layers(hidden):
        block = stream.moe_block(layer)
        if block is None:
            hidden = run(hidden)
            bar.update()
            continue
        cap, hidden = capture_moe(block, stream.arch, stream.n_expert, run, hidden)
        experts = getattr(block, stream.arch.experts)
        gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
        d_model, d_ff = gate_up.shape[2], down.shape[2]
        eps: dict[str, list[float]] = {t: [] for t in targets}
        for e in range(stream.n_expert):
            tok, slot = torch.where(cap.top_k_index == e)
            x, w = cap.x[tok], cap.top_k_weights[tok, slot]
            for t in targets:
                eps[t].append(expert_output_error(gate_up[e], down[e], x, w, Recipe.for_shapes(t, d_model, d_ff),
                                                  act=experts.act_fn))
        phi, wmass = cap.stats.normalised()
        out.append(LayerImportance(i, d_model, d_ff, phi.tolist(), wmass.tolist(), eps,
                                   out_norm=float(hidden.float().norm())))
        bar.update()
    bar.close()
    if not out:
        raise McsharpError(f"{model_dir} has no MoE layers; PMQ needs a Mixture-of-Experts checkpoint")
    return out
