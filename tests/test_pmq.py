"""PMQ planning: the MILP finds the true optimum, respects the byte budget, and refuses the impossible."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from mcsharp_gguf.errors import McsharpError
from mcsharp_gguf.ggml.types import bits_per_weight, storable_type
from mcsharp_gguf.pmq import speed
from mcsharp_gguf.pmq.candidates import Recipe
from mcsharp_gguf.pmq.eps import expert_output_error
from mcsharp_gguf.pmq.importance import LayerImportance, TensorImportance
from mcsharp_gguf.pmq.plan import (
    BitPlan,
    choose_shrinkage,
    fold_importance,
    out_of_fold_cost,
    plan_cost,
    planner_ceiling,
    solve_bit_plan,
)
from mcsharp_gguf.pmq.report import expert_traffic, format_plan_table
from mcsharp_gguf.pmq.speed import plan_time, type_cost

TARGETS = ("Q2_K", "Q3_K", "Q4_K", "Q6_K")


def _layers(n_layer: int, n_expert: int, seed: int = 0, d_model: int = 256, d_ff: int = 256):
    rng = np.random.default_rng(seed)
    out = []
    for layer in range(n_layer):
        phi = rng.dirichlet(np.ones(n_expert))
        w = rng.dirichlet(np.ones(n_expert))
        base = rng.uniform(0.5, 2.0, n_expert)
        # error falls ~4x per extra bit, as for real weights
        eps = {t: list(base * 4.0 ** -bits_per_weight(t)) for t in TARGETS}
        # the Fisher error already weighs tokens by routing: here it is eps scaled by the expert's phi·w
        fisher = {t: list(np.asarray(v) * np.sqrt(phi * w)) for t, v in eps.items()}
        out.append(LayerImportance(layer, d_model, d_ff, list(phi), list(w), eps, eps_fisher=fisher))
    return out


# Decode costs under which smaller types are no faster (Q2_K/Q3_K/Q6_K as in one lock-step run, docs/runtime.md):
# the time budget then binds much harder than the bytes, where rounding the LP relaxation fell 50% short.
SLOW_SMALL_TYPES = {"Q2_K": (0.667, 1.36), "Q3_K": (1.297, 1.04), "Q6_K": (1.279, 1.96)}


@pytest.mark.parametrize("scope,gamma,max_slowdown,kernel_cost,seed", [
    ("global", 1.0, None, None, 1), ("layer", 2.0, None, None, 1), ("global", 1.0, 0.0, None, 1),
    ("layer", 2.0, 0.0, None, 1), ("global", 2.0, 0.05, None, 1), ("global", 1.0, 0.0, SLOW_SMALL_TYPES, 1),
    ("global", 2.0, 0.05, SLOW_SMALL_TYPES, 2), ("layer", 2.0, 0.0, SLOW_SMALL_TYPES, 3),
    ("global", 1.0, 0.02, SLOW_SMALL_TYPES, 4)])
def test_milp_matches_exhaustive_search(monkeypatch, scope, gamma, max_slowdown, kernel_cost, seed):
    """The MILP's plan is the exhaustive optimum under the byte budget and, with ``max_slowdown``, under the time
    budgets: Σ phi_e · weights · type_cost ≤ (1 + max_slowdown) × that of the best stock plan in decode and in
    prefill, by hand; also where the time budget binds harder than the bytes (``kernel_cost``)."""
    for t, c in (kernel_cost or {}).items():
        monkeypatch.setitem(speed.KERNEL_COST, t, c)
    layers = _layers(2, 3, seed=seed)
    plan = solve_bit_plan(layers, bpw=3.6, targets=TARGETS, scope=scope, gamma=gamma, metric="mc",
                          max_slowdown=max_slowdown)
    items = [(imp, e) for imp in layers for e in range(imp.n_expert)]
    nbytes = {t: Recipe.for_shapes(t, 256, 256).n_bytes(256, 256) for t in TARGETS}
    per_layer = 3.6 * plan.expert_weights / 8 / len(layers)

    def fits_bytes(combo) -> bool:
        if scope == "global":
            return sum(nbytes[t] for t in combo) <= per_layer * len(layers)
        return all(sum(nbytes[t] for (imp, _), t in zip(items, combo, strict=True) if imp.layer == lay.layer)
                   <= per_layer for lay in layers)

    def run_time(combo) -> np.ndarray:  # decode, prefill; no token counts here: an expert runs as often as its phi
        return sum(imp.phi[e] * 3 * 256 * 256 * type_cost(t) for (imp, e), t in zip(items, combo, strict=True))

    def cost(combo) -> float:
        return sum(imp.phi[e] * imp.w[e] ** 1.5 * imp.eps[t][e] ** gamma
                   for (imp, e), t in zip(items, combo, strict=True))

    stock = [c for c in itertools.product(TARGETS, repeat=len(items))
             if fits_bytes(c) and all(len({t for (imp, _), t in zip(items, c, strict=True) if imp.layer == lay.layer})
                                      == 1 for lay in layers)]
    t_max = np.inf if max_slowdown is None else (1 + max_slowdown) * run_time(min(stock, key=cost))

    def feasible(combo) -> bool:
        return fits_bytes(combo) and bool(np.all(run_time(combo) <= t_max * (1 + 1e-9)))

    best = min((cost(c), c) for c in itertools.product(TARGETS, repeat=len(items)) if feasible(c))
    got = tuple(plan.layers[imp.layer][e] for imp, e in items)
    assert feasible(got) and cost(got) <= best[0] * (1 + 1e-9)
    assert plan.achieved_bpw <= 3.6
    if max_slowdown is not None:
        free = solve_bit_plan(layers, bpw=3.6, targets=TARGETS, scope=scope, gamma=gamma, metric="mc",
                              max_slowdown=None)
        assert cost(got) >= plan_cost_mc(free, items, gamma) * (1 - 1e-9)  # the time budget only takes options away


def plan_cost_mc(plan: BitPlan, items, gamma: float) -> float:
    return sum(imp.phi[e] * imp.w[e] ** 1.5 * imp.eps[plan.layers[imp.layer][e]][e] ** gamma for imp, e in items)


@pytest.mark.parametrize("seed,bpw,scope", [(30, 4.1332, "global"), (7, 3.8, "global"), (11, 4.6, "global"),
                                            (30, 4.1332, "layer")])
def test_speed_priced_plan_is_never_worse_than_the_stock_plan(seed, bpw, scope):
    """The stock plan meets the time budget of max_slowdown 0 by definition, so the mixed plan costs at most as
    much. Seed 30: the stock plan and its mirror image (layers' types swapped) take the same time, both on the
    budget, and HiGHS with presolve returned the mirror image at 4x the cost; in layer scope the stock plan's
    leftover bytes go to one layer beyond its budget, and the mixed plan was infeasible until layers could take
    what the stock plan gives them."""
    layers = _layers(2, 4, seed=seed)
    items = [(imp, e) for imp in layers for e in range(imp.n_expert)]
    stock = solve_bit_plan(layers, bpw, mode="stock", targets=TARGETS, gamma=2.0, metric="mc", scope=scope)
    mixed = solve_bit_plan(layers, bpw, targets=TARGETS, gamma=2.0, metric="mc", max_slowdown=0.0, scope=scope)
    assert plan_cost_mc(mixed, items, 2.0) <= plan_cost_mc(stock, items, 2.0) * (1 + 1e-9)
    assert max(mixed.time_vs_stock.values()) <= 1 + 1e-9
    assert mixed.achieved_bpw <= bpw + 1e-9


def test_speed_priced_plan_keeps_to_the_stock_plans_time(monkeypatch):
    """A type that is cheap in bytes but slow in prefill (as Q1_0/Q2_0 are on the CPU) is what a bytes-only mixed
    plan buys; the default plan leaves it out where it would make prefill slower than the stock plan's by more
    than MAX_SLOWDOWN, and keeps to that in both phases (pmq.speed.plan_time, from token counts)."""
    monkeypatch.setitem(speed.KERNEL_COST, "Q3_K", (1.0, 6.0))
    layers = _layers(3, 8, seed=4)
    for imp in layers:
        imp.tokens, imp.layer_tokens = np.round(np.asarray(imp.phi) * 200).astype(int).tolist(), 100
    free = solve_bit_plan(layers, 4.6, targets=TARGETS, metric="mc", max_slowdown=None)
    assert any("Q3_K" in v for v in free.layers.values())
    stock = solve_bit_plan(layers, 4.6, mode="stock", targets=TARGETS, metric="mc")  # all Q4_K
    priced = solve_bit_plan(layers, 4.6, targets=TARGETS, metric="mc")
    t_stock, t_priced, t_free = (plan_time(p, layers) for p in (stock, priced, free))
    assert np.all(t_priced <= t_stock * (1 + speed.MAX_SLOWDOWN + 1e-9)) and t_free[1] > t_stock[1] * 1.1
    assert priced.time_vs_stock == pytest.approx(dict(zip(speed.PHASES, t_priced / t_stock, strict=True)))
    assert free.time_vs_stock["prefill"] == pytest.approx(t_free[1] / t_stock[1])
    assert f"prefill {t_free[1] / t_stock[1]:.3f}× (bytes only)" in format_plan_table(free)
    assert f"({1 + speed.MAX_SLOWDOWN:.2f}×" not in format_plan_table(free)
    assert BitPlan.from_json(priced.to_json()) == priced
    with pytest.raises(McsharpError, match="max_slowdown -0.1"):
        solve_bit_plan(layers, 4.6, targets=TARGETS, metric="mc", max_slowdown=-0.1)
    assert sum(v.count("Q3_K") for v in priced.layers.values()) < sum(v.count("Q3_K") for v in free.layers.values())
    assert plan_cost_mc(stock, [(i, e) for i in layers for e in range(8)], 2.0) >= plan_cost_mc(
        priced, [(i, e) for i in layers for e in range(8)], 2.0) * (1 - 1e-9)  # still no worse than stock


def test_file_scope_plans_tensors_and_experts_jointly():
    """One budget over experts and non-expert tensors: the MILP's choice is the exhaustive optimum of the summed
    Fisher costs, within the byte budget, and every tensor gets a type."""
    layers = _layers(2, 2, seed=3)
    for imp in layers:
        imp.eps_fisher = {t: [x * (1 + imp.layer) for x in v] for t, v in imp.eps.items()}
    dense_t = ("Q2_K", "Q4_K", "Q8_0")
    tensors = [TensorImportance(f"blk.{i}.attn_q.weight", "attn", 256, 256,
                                {t: s * 4.0 ** -bits_per_weight(t) for t in dense_t})
               for i, s in enumerate((0.3, 3.0))]
    plan = solve_bit_plan(layers, 4.0, targets=TARGETS, scope="file", metric="fisher", tensors=tensors)
    items = [(imp, e) for imp in layers for e in range(imp.n_expert)]
    nbytes = {t: Recipe.for_shapes(t, 256, 256).n_bytes(256, 256) for t in TARGETS}
    budget = 4.0 * (plan.expert_weights + 2 * 256 * 256) / 8

    def total(combo, dense):
        return (sum(nbytes[t] for t in combo) + sum(ti.n_bytes(t) for ti, t in zip(tensors, dense, strict=True)),
                sum(imp.eps_fisher[t][e] ** 2 for (imp, e), t in zip(items, combo, strict=True))
                + sum(ti.eps_fisher[t] ** 2 for ti, t in zip(tensors, dense, strict=True)))

    best = min(total(c, d)[1] for c in itertools.product(TARGETS, repeat=len(items))
               for d in itertools.product(dense_t, repeat=2) if total(c, d)[0] <= budget)
    got = (tuple(plan.layers[imp.layer][e] for imp, e in items), tuple(plan.tensor_types[t.name] for t in tensors))
    n_bytes, cost = total(*got)
    assert n_bytes <= budget and cost <= best * (1 + 1e-9)
    assert plan.dense_bytes + plan.expert_bytes == n_bytes
    assert bits_per_weight(got[1][1]) >= bits_per_weight(got[1][0])  # the 10x more sensitive tensor: more bits
    assert "non-expert tensors: 2" in format_plan_table(plan)
    assert BitPlan.from_json(plan.to_json()) == plan
    with pytest.raises(McsharpError, match="fisher metric"):
        solve_bit_plan(layers, 4.0, targets=TARGETS, scope="file", metric="mc", tensors=tensors)
    old = _layers(2, 2)
    for imp in old:
        imp.eps_fisher = {}  # importance measured before Fisher errors existed
    with pytest.raises(McsharpError, match="no Fisher errors"):
        solve_bit_plan(old, 4.0, targets=TARGETS, scope="global", metric="fisher")


def _two_folds(n_layer: int, n_expert: int, spread: float, noise: float, seed: int = 0) -> list[LayerImportance]:
    """Fisher errors measured on two calibration folds: each fold sees half of an expert's true cost
    (base_e · 4^-bits, base_e spread over [1, 1 + spread]) times its own lognormal estimation noise."""
    rng = np.random.default_rng(seed)
    out = []
    for layer in range(n_layer):
        base = (1.0 + spread * rng.uniform(0, 1, n_expert)) * (1 + layer)
        true = {t: base * 4.0 ** -bits_per_weight(t) for t in TARGETS}
        half = {f: {t: 0.5 * c * rng.lognormal(0, noise, n_expert) for t, c in true.items()} for f in "ab"}
        phi = [1 / n_expert] * n_expert
        out.append(LayerImportance(layer, 256, 256, phi, phi, {t: list(np.sqrt(c)) for t, c in true.items()},
                                   eps_fisher={t: list(np.sqrt(half["a"][t] + half["b"][t])) for t in TARGETS},
                                   eps_fisher_a={t: list(np.sqrt(half["a"][t])) for t in TARGETS}))
    return out


def test_folds_add_up_and_price_plans():
    layers = _two_folds(2, 8, spread=1.0, noise=0.3)
    (fa, _), (fb, _) = fold_importance(layers, [], "a"), fold_importance(layers, [], "b")
    for imp, a, b in zip(layers, fa, fb, strict=True):
        for t in TARGETS:
            np.testing.assert_allclose(np.square(a.eps_fisher[t]) + np.square(b.eps_fisher[t]),
                                       np.square(imp.eps_fisher[t]), rtol=1e-9)
    plan = solve_bit_plan(layers, 3.5, targets=TARGETS, shrink=1.0)
    assert plan.shrink == 1.0 and not plan.cv_costs
    np.testing.assert_allclose(plan_cost(plan, layers), plan_cost(plan, fa) + plan_cost(plan, fb), rtol=1e-9)
    assert plan_cost(plan, layers) == pytest.approx(sum(imp.eps_fisher[t][e] ** 2 for imp in layers
                                                        for e, t in enumerate(plan.layers[imp.layer])))


def test_cross_validation_shrinks_noise_and_keeps_real_differences():
    """Experts alike in truth, measured with noise: the plan that follows each expert's noisy cost is worse out
    of fold than the one that treats them alike, and cross-validation picks a strong shrinkage. Experts that
    really differ, measured precisely: it keeps the costs (nearly) as measured."""
    noisy = _two_folds(4, 8, spread=0.0, noise=0.5, seed=1)
    shrink, cv = choose_shrinkage(noisy, 3.5, targets=TARGETS)
    assert shrink <= 0.5 and cv[f"{shrink:g}"] < cv["1"], cv
    plan = solve_bit_plan(noisy, 3.5, targets=TARGETS)  # "cv" is the default where the folds exist
    assert plan.shrink == shrink and plan.cv_costs == cv and plan.achieved_bpw <= 3.5
    assert f"shrink {shrink:g}, chosen by two-fold cross-validation" in format_plan_table(plan)
    assert BitPlan.from_json(plan.to_json()) == plan
    real = _two_folds(4, 8, spread=3.0, noise=0.02, seed=2)
    shrink, cv = choose_shrinkage(real, 3.5, targets=TARGETS)
    assert shrink >= 0.75 and cv[f"{shrink:g}"] < 0.97 * cv["0"], cv
    # stock plans ignore the shrinkage: one type per layer prices the layer's summed cost either way
    stock = solve_bit_plan(noisy, 3.5, mode="stock", targets=TARGETS)
    assert stock.shrink == 1.0 and not stock.cv_costs
    assert out_of_fold_cost(noisy, 3.5, mode="stock", targets=TARGETS) > 0
    for bad in ("bogus", 1.5):
        with pytest.raises(McsharpError, match="neither 'cv' nor a number"):
            solve_bit_plan(noisy, 3.5, targets=TARGETS, shrink=bad)


def test_planner_ceiling_sees_only_real_differences_between_experts():
    """Experts alike (no noise): per-expert costs buy nothing over the layer mean (over stock only the finer
    budget granularity of a type per expert, never a loss). Experts that differ,
    measured precisely: the mixed plan is cheaper in-sample and out of fold. Uneven frequencies alone: the
    mean-cost mixed plan already beats stock (the experts differ in how often they run)."""
    alike = planner_ceiling(_two_folds(3, 8, spread=0.0, noise=0.0), 3.5, targets=TARGETS)
    for i in (0, 1):
        assert alike.mixed[i] == pytest.approx(alike.mixed_mean[i], rel=1e-9)
        assert alike.mixed[i] <= alike.stock[i] * (1 + 1e-9)
    assert abs(alike.gain()) < 1e-9
    differ = _two_folds(3, 8, spread=3.0, noise=0.02, seed=2)
    # bytes only: what per-expert differences are worth, not what this CPU's kernel costs let a plan spend of it
    ceiling = planner_ceiling(differ, 3.5, targets=TARGETS, max_slowdown=None)
    assert ceiling.gain(out_of_fold=False) > 0.05 and ceiling.gain() > 0.05, ceiling
    assert ceiling.mixed[0] <= ceiling.stock[0] and ceiling.gain("stock") > 0.05
    uneven = _two_folds(3, 8, spread=0.0, noise=0.0, seed=3)
    for imp in uneven:
        phi = np.asarray([0.4, 0.2, 0.1, 0.1, 0.08, 0.06, 0.04, 0.02])
        scale = np.sqrt(phi * imp.n_expert)  # an expert's error grows with the tokens it sees
        imp.phi = imp.w = list(phi)
        imp.eps_fisher = {t: list(np.asarray(v) * scale) for t, v in imp.eps_fisher.items()}
        imp.eps_fisher_a = {t: list(np.asarray(v) * scale) for t, v in imp.eps_fisher_a.items()}
    skew = planner_ceiling(uneven, 3.5, targets=TARGETS)
    assert skew.mixed_mean[1] < 0.95 * skew.stock[1] and abs(skew.gain()) < 1e-6, skew
    with pytest.raises(McsharpError, match="no calibration folds"):
        planner_ceiling(_layers(2, 8), 3.5, targets=TARGETS)


@pytest.mark.parametrize("bpw", [2.8, 3.2, 4.0, 5.0])
def test_budget_is_respected_and_nearly_used(bpw):
    # bytes only: with kernel time priced, a plan may leave bytes unspent where more bits would run slower
    plan = solve_bit_plan(_layers(4, 8), bpw=bpw, targets=TARGETS, max_slowdown=None)
    assert plan.achieved_bpw <= bpw + 1e-9
    assert plan.achieved_bpw >= bpw - 0.25  # small instances cannot always land closer
    assert "layer" in format_plan_table(plan)
    assert BitPlan.from_json(plan.to_json()) == plan


def test_stock_mode_gives_one_type_per_layer():
    plan = solve_bit_plan(_layers(4, 8), bpw=3.5, mode="stock", targets=TARGETS)
    assert all(len(set(v)) == 1 for v in plan.layers.values())
    assert plan.achieved_bpw <= 3.5


def test_more_important_experts_get_at_least_as_many_bits():
    layer = _layers(1, 8)[0]
    layer.eps = {t: [4.0 ** -bits_per_weight(t)] * 8 for t in TARGETS}  # same error curve for all
    layer.phi = list(np.linspace(0.01, 0.3, 8) / np.linspace(0.01, 0.3, 8).sum())
    layer.w = list(layer.phi)
    # bytes only: with time priced, a busier expert's bits also cost more time, and the order may break
    plan = solve_bit_plan([layer], bpw=3.5, targets=TARGETS, metric="mc", max_slowdown=None)
    bits = [bits_per_weight(t) for t in plan.layers[0]]
    assert bits == sorted(bits)


def test_infeasible_budget_names_the_minimum():
    with pytest.raises(McsharpError, match=r"minimum achievable is 2\.6\d* bpw"):
        solve_bit_plan(_layers(2, 4), bpw=2.0, targets=TARGETS)
    with pytest.raises(McsharpError, match="no MoE layers"):
        solve_bit_plan([], bpw=3.0)


def test_fallback_types_fit_odd_expert_widths():
    r = Recipe.for_shapes("Q4_K", d_model=768, d_ff=128)  # the fixture's routed experts
    assert (r.gate, r.up) == ("Q4_K", "Q4_K")
    assert r.down != "Q4_K" and 128 % 32 == 0 and abs(bits_per_weight(r.down) - 4.5) < 0.6
    assert storable_type("Q2_K", 1408) in ("Q2_0",)  # Qwen1.5-MoE's expert width


def test_expert_error_is_zero_for_unused_and_falls_with_bits():
    g = torch.Generator().manual_seed(0)
    gate_up, down = torch.randn(512, 256, generator=g) * 0.05, torch.randn(256, 256, generator=g) * 0.05
    x, w = torch.randn(64, 256, generator=g), torch.rand(64, generator=g)
    errs = [expert_output_error(gate_up, down, x, w, Recipe.for_shapes(t, 256, 256)) for t in TARGETS]
    assert all(a > b for a, b in itertools.pairwise(errs))
    assert expert_output_error(gate_up, down, x[:0], w[:0], Recipe.for_shapes("Q2_K", 256, 256)) == 0.0


def test_plan_cli_on_a_tiny_model(tiny_model, tmp_path):
    """`mcsharp plan` end to end: calibration text → importance → MILP → JSON, table, heatmap."""
    import subprocess
    import sys

    from mcsharp_gguf.text import calibration_text

    calib = tmp_path / "calib.txt"
    calib.write_text(calibration_text(20_000))
    out = tmp_path / "plan.json"
    res = subprocess.run([sys.executable, "-m", "mcsharp_gguf.cli", "plan", str(tiny_model("qwen2moe")),
                          "--bpw", "4.0", "--budget-scope", "global", "--mode", "mixed", "--calib", str(calib),
                          "--calib-seqs", "2", "--calib-len", "128", "-o", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    plan = BitPlan.from_json(out.read_text())
    assert sorted(plan.layers) == [0, 1] and all(len(v) == 8 for v in plan.layers.values())
    assert 3.5 <= plan.achieved_bpw <= 4.0
    assert out.with_suffix(".png").stat().st_size > 1000
    assert "mixed plan" in res.stdout
    gguf_out = tmp_path / "pmq.gguf"
    res = subprocess.run([sys.executable, "-m", "mcsharp_gguf.cli", "convert", str(tiny_model("qwen2moe")),
                          "--plan", str(out), "-o", str(gguf_out)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    from mcsharp_gguf.gguf.inspect import read_report
    from mcsharp_gguf.runtime import llama

    assert read_report(gguf_out).classes["experts"].n_bytes == plan.expert_bytes
    assert llama.logits_for(llama.load_model(gguf_out, n_ctx=32), [1, 2, 3]).shape == (3, 49152)
    res = subprocess.run([sys.executable, "-m", "mcsharp_gguf.cli", "plan", str(tiny_model("qwen2moe")),
                          "--bpw", "0.5", "--calib", str(calib), "--calib-seqs", "2", "--calib-len", "128",
                          "-o", str(tmp_path / "bad.json")], capture_output=True, text=True, timeout=600)
    assert res.returncode == 2 and "achievable" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "bad.json").exists()


def test_expert_sample_is_stratified_and_the_ratio_estimate_exact_for_proportional_errors():
    from mcsharp_gguf.pmq.measure import predict_unsampled, sample_experts

    cost = [0.0, 5.0, 1.0, 3.0, 2.0, 4.0, 0.0, 6.0]
    assert sample_experts(cost, 3) == [4, 5, 7]  # the 2nd, 4th and 6th of six live experts by cost
    assert sample_experts(cost, 10) == [1, 2, 3, 4, 5, 7]  # fewer live experts than k: all of them
    aux = [2.0, 4.0, 6.0, 8.0]  # (each expert's RTN error at the anchor: twice the errors, the ratio absorbs it)
    values = {"A": [1.0, None, 3.0, None], "B": [0.5, None, 1.5, None], "C": [4.0, None, 12.0, None]}
    out = predict_unsampled(values, aux, [0, 2])
    np.testing.assert_allclose(out["A"], [1.0, 2.0, 3.0, 4.0])
    np.testing.assert_allclose(out["B"], [0.5, 1.0, 1.5, 2.0])
    np.testing.assert_allclose(out["C"], [4.0, 8.0, 12.0, 16.0])


def test_neuron_sample_chunks_quantise_as_in_the_whole_expert():
    """sample_neurons picks whole NEURON_CHUNK-wide chunks, so the sampled rows of gate/up and columns of down
    quantise to exactly what they are in the whole expert, at every candidate type."""
    from mcsharp_gguf.ggml.packing import quantize_rtn
    from mcsharp_gguf.pmq.candidates import EXPERT_TYPES
    from mcsharp_gguf.pmq.measure import NEURON_CHUNK, sample_neurons

    assert sample_neurons(torch.ones(768), 2048) == (None, 1.0)  # narrow: all neurons
    assert sample_neurons(torch.ones(14336), None) == (None, 1.0)  # off
    assert sample_neurons(torch.ones(4000), 1024) == (None, 1.0)  # not whole chunks
    energy = torch.ones(14336)
    energy[3 * NEURON_CHUNK + 7] = 1000.0  # one loud neuron in chunk 3
    n, factor = sample_neurons(energy, 2048)
    assert len(n) == 2048 and len(set(n.tolist())) == 2048 and int(n.max()) < 14336
    chunks = sorted({int(j) // NEURON_CHUNK for j in n})
    assert len(chunks) == 8 and 3 not in chunks  # spread over the chunks' ranking: the top one is not sampled
    assert factor == pytest.approx(float(energy.sum()) / float(energy[n].sum()))  # the energy ratio, not 7
    d_ff, d_model = 4 * NEURON_CHUNK, 256
    idx, _ = sample_neurons(torch.arange(d_ff, dtype=torch.float32), 2 * NEURON_CHUNK)
    gen = torch.Generator().manual_seed(0)
    gate, down = torch.randn(d_ff, d_model, generator=gen), torch.randn(d_model, d_ff, generator=gen)
    for t in EXPERT_TYPES:
        r = Recipe.for_shapes(t, d_model, d_ff)
        assert torch.equal(quantize_rtn(gate[idx], r.gate).dequant, quantize_rtn(gate, r.gate).dequant[idx]), t
        assert torch.equal(quantize_rtn(down[:, idx], r.down).dequant,
                           quantize_rtn(down, r.down).dequant[:, idx]), t


def test_expert_traffic_weighs_each_experts_bytes_by_its_routed_tokens():
    """A token's expert read = Σ tokens_e · bytes_e / layer tokens, by hand from ggml's block sizes (Q4_K: 144 bytes
    per 256 weights, Q8_0: 34 per 32); a stock plan reads exactly what an even spread would; the plan table says it."""
    n = 256 * 256
    q4, q8 = 3 * n // 256 * 144, 3 * n // 32 * 34  # gate + up + down of one expert
    plan = BitPlan(mode="mixed", target_bpw=6.0, achieved_bpw=6.0, expert_bytes=q4 + q8, expert_weights=6 * n,
                   layers={0: ["Q4_K", "Q8_0"]},
                   recipes={f"0:{t}": {"gate": t, "up": t, "down": t} for t in ("Q4_K", "Q8_0")},
                   coverage={0: {"tokens": [3, 1], "d_model": 256, "d_ff": 256, "layer_tokens": 2}})
    t = expert_traffic(plan)
    assert t.bytes_per_token == (3 * q4 + 1 * q8) / 2
    assert t.vs_even == pytest.approx((3 * q4 + q8) / (4 * (q4 + q8) / 2))
    assert t.vs_even < 1  # the busier expert got the smaller type
    assert f"{t.bytes_per_token / 1e6:.2f} MB, {t.vs_even:.3f}×" in format_plan_table(plan)
    layers = _layers(2, 4, seed=5)
    for imp in layers:
        imp.tokens, imp.layer_tokens = [40, 10, 25, 5], 40
    stock = solve_bit_plan(layers, 3.6, mode="stock", targets=TARGETS, metric="mc")
    assert expert_traffic(stock).vs_even == pytest.approx(1.0)
    mixed = solve_bit_plan(layers, 3.6, mode="mixed", targets=TARGETS, metric="mc")
    assert expert_traffic(mixed).bytes_per_token > 0
