"""What a starved expert (fewer calibration tokens than a projection's input width) should be quantised with
(docs/planner.md, "Experts with few calibration tokens").

For one MoE layer of a checkpoint, captures the block's inputs on the built-in calibration text (A) and on the
held-out text (B), and quantises each expert's gate/up/down from A's tokens with each candidate fallback:

- ``rtn``: no Hessian (round to nearest on the ggml grid);
- ``own``: GPTQ on the expert's own Hessian (rank-deficient when starved; GPTQ's 1% damping);
- ``own-d10``: the same with 10% damping;
- ``pooled``: GPTQ on the Hessian of *every* calibration token of the layer (gate/up: the block's inputs; down:
  the expert's activations on them) — what the expert would see if every token were routed to it;
- ``blend``: the own Hessian and the pooled one weighted n : width (the pooled one a prior worth as many tokens
  as the projection's input width);
- ``pooled-Nw`` (N = 2, 4, 8): the pooled Hessian from N × the projection's input width of the layer's tokens,
  evenly spaced (quant.experts.LayerTokens takes the whole pool, which costs a forward of each starved expert
  over every token of the layer);
- ``own+4w``: the expert's own tokens topped up to 4 × the width with evenly spaced tokens of the layer.

Each is scored by its output error on B's tokens routed to the expert, ||(Ŵ − W) Zᵀ||² summed over the experts,
relative to RTN (lower is better). ``--starve`` limits every expert's own tokens to the given multiples of
d_model (the fixture's experts otherwise see enough); without it, every expert keeps what A routed to it.

    python scripts/study_starved_experts.py MODEL_DIR --layer 15 --starve 0.25,0.5,1,2
    python scripts/study_starved_experts.py out/bench-scale/ckpt-qwen3-30b-a3b-4 --layer 0 --experts 16
"""

from __future__ import annotations

import argparse
from pathlib import Path

VARIANTS = ("rtn", "own", "own-d10", "pooled", "blend", "pooled-2w", "pooled-4w", "pooled-8w", "own+4w")


def capture(model_dir: Path, layer: int, seqs: int, seq_len: int):
    """(MoE capture of ``layer`` over A's then B's sequences, number of A tokens, the experts module)."""
    import torch

    from mcsharp_gguf.model.calibration import calibration_token_ids
    from mcsharp_gguf.model.stream import LayerStream, capture_moe
    from mcsharp_gguf.text import calibration_text, heldout_text

    stream = LayerStream.open(model_dir)
    ids_a = calibration_token_ids(model_dir, calibration_text(seqs * seq_len * 6), seqs, seq_len)
    ids_b = calibration_token_ids(model_dir, heldout_text(), seqs, seq_len)
    hidden = stream.embed(torch.cat([ids_a, ids_b]))
    for i, lay, run in stream.layers(hidden.shape[1]):
        if i == layer:
            block = stream.moe_block(lay)
            cap, _ = capture_moe(block, stream.arch, stream.n_expert, run, hidden)
            return cap, ids_a.numel(), getattr(block, stream.arch.experts)
        hidden = run(hidden)
    raise SystemExit(f"{model_dir} has no layer {layer}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--layer", type=int, default=0)
    ap.add_argument("--seqs", type=int, default=8, help="512-token sequences of A and of B each")
    ap.add_argument("--starve", default="", help="own tokens per expert as multiples of d_model, e.g. 0.5,1")
    ap.add_argument("--types", default="Q2_K,Q4_K")
    ap.add_argument("--experts", type=int, default=0, help="study this many experts, spread over the ids (0: all)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="which fallbacks (rtn is always scored)")
    args = ap.parse_args()

    import torch

    from mcsharp_gguf.ggml.packing import quantize_rtn
    from mcsharp_gguf.pmq.candidates import Recipe
    from mcsharp_gguf.quant.gptq import HessianAccumulator, gptq_quantize

    torch.manual_seed(0)
    cap, n_a, experts = capture(args.model_dir, args.layer, args.seqs, 512)
    gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
    n_e, d_ff, d_model = gate_up.shape[0], down.shape[2], gate_up.shape[2]
    act = experts.act_fn
    ids = range(n_e) if not args.experts else sorted({int((j + 0.5) * n_e / args.experts)
                                                      for j in range(args.experts)})
    in_a = torch.arange(cap.x.shape[0]) < n_a
    x_all_a = cap.x[in_a]
    levels = [float(v) for v in args.starve.split(",") if v] or [None]
    types = args.types.split(",")
    variants = tuple(dict.fromkeys(["rtn", *args.variants.split(",")]))
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")

    def hessian(z: torch.Tensor) -> torch.Tensor:
        acc = HessianAccumulator(z.shape[1])
        acc.add(z)
        return acc.H

    def spaced(z: torch.Tensor, k: int) -> torch.Tensor:
        """``k`` evenly spaced rows of ``z`` (all of them when it has no more)."""
        return z if z.shape[0] <= k else z[torch.arange(k) * z.shape[0] // k]

    def quantise(w: torch.Tensor, h: dict, t: str, v: str) -> torch.Tensor:
        if v == "rtn":
            return quantize_rtn(w, t).dequant
        return gptq_quantize(w, h[v], t, damp=0.1 if v == "own-d10" else 0.01).dequant

    counts = []
    err = {(lv, t, p, v): 0.0 for lv in levels for t in types for p in ("gate/up", "down") for v in variants}
    for e in ids:
        routed = (cap.top_k_index == e).any(dim=1)
        xa_all, xb = cap.x[routed & in_a], cap.x[routed & ~in_a]
        g, u, d = gate_up[e, :d_ff], gate_up[e, d_ff:], down[e]
        ab = act(xb @ g.T) * (xb @ u.T)
        pooled_in = hessian(x_all_a)
        pooled_act = hessian(act(x_all_a @ g.T) * (x_all_a @ u.T))

        def act_of(z: torch.Tensor, g=g, u=u) -> torch.Tensor:
            return act(z @ g.T) * (z @ u.T)
        for lv in levels:
            xa = xa_all if lv is None else xa_all[:int(lv * d_model)]
            n = xa.shape[0]
            counts.append(n)
            aa = act(xa @ g.T) * (xa @ u.T)
            hs = {}
            for p, z, pooled, f in (("gate/up", xa, pooled_in, lambda z: z), ("down", aa, pooled_act, act_of)):
                own = hessian(z) if n else torch.zeros_like(pooled)
                width = z.shape[1]
                hs[p] = {"own": own, "own-d10": own, "pooled": pooled,
                         "blend": (n * own + width * pooled) / (n + width)}
                for m in (2, 4, 8):
                    if f"pooled-{m}w" in variants:
                        hs[p][f"pooled-{m}w"] = hessian(f(spaced(x_all_a, m * width)))
                if "own+4w" in variants:
                    hs[p]["own+4w"] = hessian(f(torch.cat([xa, spaced(x_all_a, max(0, 4 * width - n))])))
            for t in types:
                r = Recipe.for_shapes(t, d_model, d_ff)
                for v in variants:
                    if v.startswith("own") and n == 0:
                        continue  # no Hessian at all: the own variants are RTN
                    for w, tt, z in ((g, r.gate, xb), (u, r.up, xb)):
                        err[(lv, t, "gate/up", v)] += float(((quantise(w, hs["gate/up"], tt, v) - w) @ z.T)
                                                            .square().sum())
                    err[(lv, t, "down", v)] += float(((quantise(d, hs["down"], r.down, v) - d) @ ab.T)
                                                     .square().sum())
        print(f"expert {e}: {int(routed[in_a].sum())} calibration tokens, {int(xb.shape[0])} held-out", flush=True)
    print(f"\n{args.model_dir.name}, layer {args.layer}: {len(ids)} of {n_e} experts, d_model {d_model}, d_ff "
          f"{d_ff}; A {n_a} calibration tokens; own tokens per expert min {min(counts)}, median "
          f"{sorted(counts)[len(counts) // 2]}, max {max(counts)}\n")
    print("held-out output error relative to RTN (lower is better)\n")
    print("| own tokens | type | projection | " + " | ".join(variants) + " |")
    print("|---|---|---|" + "---|" * len(variants))
    for lv in levels:
        for t in types:
            for p in ("gate/up", "down"):
                base = err[(lv, t, p, "rtn")]
                cells = " | ".join(f"{err[(lv, t, p, v)] / base:.3f}" if err[(lv, t, p, v)] else "–"
                                   for v in variants)
                label = "as routed" if lv is None else f"{lv:g} × d_model"
                print(f"| {label} | {t} | {p} | {cells} |")


if __name__ == "__main__":
    main()
