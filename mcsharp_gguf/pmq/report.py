"""A plan for people: the table (layers × experts, coverage, shrinkage, non-expert types) and the PNG heatmap."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..ggml.types import bits_per_weight
from .candidates import Recipe
from .plan import BitPlan


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
        rows.append(format_expert_traffic(expert_traffic(plan)))
    if plan.time_vs_stock:
        bound = ("bytes only" if plan.max_slowdown is None
                 else f"held to at most {1 + plan.max_slowdown:.2f}× by the planner")
        rows.append("kernel time per token against the stock plan of the same bytes (pmq.speed, CPU kernel costs, "
                    "calibration routing): " + ", ".join(f"{ph} {r:.3f}×" for ph, r in plan.time_vs_stock.items())
                    + f" ({bound})")
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
    """One line on how well the calibration tokens covered the experts: which borrow their layer's pooled
    Hessian for lack of tokens, and which fall back to RTN (the layer's tokens too few as well)."""
    toks = np.concatenate([np.asarray(c["tokens"]) for c in coverage.values()])
    counts = {}
    for proj, width in (("gate/up", "d_model"), ("down", "d_ff")):
        few = [(np.asarray(c["tokens"]) < c[width], c.get("layer_tokens", 0) >= c[width]) for c in coverage.values()]
        counts[proj] = (sum(int(f.sum()) for f, ok in few if ok), sum(int(f.sum()) for f, ok in few if not ok))
    starved = [f"{lay}:{e}" for lay, c in sorted(coverage.items()) for e, t in enumerate(c["tokens"])
               if t < c["d_model"]]
    shown = ", ".join(starved[:12]) + (f", … ({len(starved)} in all)" if len(starved) > 12 else "")
    parts = ", ".join(f"{proj} of {pooled} pooled / {rtn} RTN" for proj, (pooled, rtn) in counts.items())
    return (f"calibration tokens per expert: min {int(toks.min())}, median {int(np.median(toks))}, max "
            f"{int(toks.max())}; fewer than the input width (GPTQ on the layer's pooled Hessian, or RTN where the "
            f"layer's tokens are fewer too): {parts} of {toks.size} experts"
            + (f" [layer:expert {shown}]" if starved else ""))


@dataclass(frozen=True)
class ExpertTraffic:
    """What the planned experts cost a decoded token, on the calibration tokens' routing."""

    bytes_per_token: float  # expert weight bytes one token reads, all layers (0: layers' token counts unknown)
    vs_even: float  # that over the same layers' expert bytes spread evenly over their experts (stock plan: 1)


def expert_traffic(plan: BitPlan) -> ExpertTraffic:
    """Expert bytes a token reads under the plan (each expert's bytes × how often calibration routed to it), and
    that against the same bytes spread evenly within each layer. Equal file bytes need not mean equal decode
    traffic: a mixed plan that gives frequent experts more bits makes every token read more (memory-bound decode
    slows about in proportion, on top of each type's own kernel speed)."""
    read = even = per_token = 0.0
    for layer, cov in plan.coverage.items():
        size = {t: Recipe(t, **plan.recipes[f"{layer}:{t}"]).n_bytes(cov["d_model"], cov["d_ff"])
                for t in set(plan.layers[layer])}
        b = np.array([size[t] for t in plan.layers[layer]], dtype=float)
        tok = np.asarray(cov["tokens"], dtype=float)
        read += float(tok @ b)
        even += float(tok.sum() * b.mean())
        per_token += float(tok @ b) / cov["layer_tokens"] if cov.get("layer_tokens") else 0.0
    return ExpertTraffic(bytes_per_token=per_token, vs_even=read / even if even else 1.0)


def format_expert_traffic(t: ExpertTraffic) -> str:
    """One line for :func:`expert_traffic`."""
    mb = f"{t.bytes_per_token / 1e6:.2f} MB, " if t.bytes_per_token else ""
    return (f"expert weights a token reads (calibration routing): {mb}{t.vs_even:.3f}× the same bytes spread evenly "
            "over each layer's experts (1 in a stock plan; above 1, frequent experts got more bits and decode "
            "reads more than the file size suggests)")


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
