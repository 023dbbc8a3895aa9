"""How well a sample of an expert's neurons estimates its quantisation error (docs/planner.md).

The importance pass measures experts wider than 2 × NEURON_SAMPLE (Mixtral-8x7B's 14,336) on NEURON_SAMPLE of
their intermediate neurons (``pmq.measure.sample_neurons``) and scales the error by sqrt(d_ff / sample). This
builds one expert of a real shape with random weights (``--heavy``: each neuron's gate row and down column scaled
by exp(N(0, 1)), a few loud neurons as in trained models), routes random inputs to it, and prints, per candidate
type, the expert's error measured on all its neurons and estimated from the sample: eps (block output) and
its Fisher error (random per-token gradients), with the relative difference, and how each type's error compares
to Q4_K's — what a plan compares.

    python scripts/study_neuron_sample.py --shape mixtral-8x7b [--tokens 1024] [--heavy]
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="mixtral-8x7b")
    ap.add_argument("--tokens", type=int, default=1024, help="calibration tokens routed to the expert")
    ap.add_argument("--heavy", action="store_true", help="heavy-tailed neuron scales")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch

    from mcsharp_gguf.dev.scale import real_shape
    from mcsharp_gguf.pmq.candidates import EXPERT_TYPES, Recipe
    from mcsharp_gguf.pmq.eps import expert_output_delta, fisher_error
    from mcsharp_gguf.pmq.measure import NEURON_SAMPLE, neuron_energy, sample_neurons

    cfg = real_shape(args.shape).config
    d_model = cfg["hidden_size"]
    d_ff = cfg.get("moe_intermediate_size") or cfg["intermediate_size"]
    gen = torch.Generator().manual_seed(args.seed)
    gate_up = torch.randn(2 * d_ff, d_model, generator=gen) * 0.02
    down = torch.randn(d_model, d_ff, generator=gen) * 0.02
    if args.heavy:
        s = torch.randn(d_ff, generator=gen).exp()
        gate_up[:d_ff] *= s[:, None]
        down *= s[None, :]
    x = torch.randn(args.tokens, d_model, generator=gen)
    w = torch.rand(args.tokens, generator=gen)
    grad = torch.randn(args.tokens, d_model, generator=gen)
    act = torch.nn.functional.silu
    energy = neuron_energy(gate_up[:d_ff], gate_up[d_ff:], down, x, w, act)
    neurons, factor = sample_neurons(energy, NEURON_SAMPLE)
    if neurons is None:
        raise SystemExit(f"{args.shape}: experts of width {d_ff} are measured on all their neurons")
    scale = factor ** 0.5
    plain = (d_ff / len(neurons)) ** 0.5  # the neuron-count ratio instead of the energy ratio
    gu_s = torch.cat([gate_up[:d_ff][neurons], gate_up[d_ff:][neurons]])
    d_s = down[:, neurons]
    print(f"{args.shape}: d_model {d_model}, d_ff {d_ff}, {len(neurons)} neurons sampled, {args.tokens} tokens, "
          f"{'heavy-tailed' if args.heavy else 'gaussian'} neurons; energy ratio {factor:.2f} (neuron count "
          f"ratio {plain ** 2:.2f})\n")
    print("| type | eps all | eps sample | diff | diff by count ratio | Fisher all | Fisher sample | diff | "
          "eps/Q4_K all | sample |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows, t_all, t_s = {}, 0.0, 0.0
    for t in EXPERT_TYPES:
        r = Recipe.for_shapes(t, d_model, d_ff)
        t0 = time.time()
        full = expert_output_delta(gate_up, down, x, w, r)
        t1 = time.time()
        est = expert_output_delta(gu_s, d_s, x, w, r) * scale
        t_all, t_s = t_all + t1 - t0, t_s + time.time() - t1
        rows[t] = (float(full.norm()), float(est.norm()), fisher_error(full, grad), fisher_error(est, grad))
    for t, (ea, es, fa, fs) in rows.items():
        by_count = es * plain / scale / ea - 1
        print(f"| {t} | {ea:.4g} | {es:.4g} | {es / ea - 1:+.1%} | {by_count:+.1%} | {fa:.4g} | "
              f"{fs:.4g} | {fs / fa - 1:+.1%} | "
              f"{ea / rows['Q4_K'][0]:.3f} | {es / rows['Q4_K'][1]:.3f} |")
    print(f"\ntime: all neurons {t_all:.0f} s, sample {t_s:.0f} s ({t_all / t_s:.1f}×)")


if __name__ == "__main__":
    main()
