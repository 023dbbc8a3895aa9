"""A plan for people: the table (layers × experts, coverage, shrinkage, non-expert types) and the PNG heatmap."""

from __future__ import annotations

import numpy as np

from ..ggml.types import bits_per_weight
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
