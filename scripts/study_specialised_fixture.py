"""Study (not a test): can the fixture's upcycled experts be made to differ without gradient training?

Two closed-form recipes on SmolLM2-135M's FFNs, each layer fitted to the dense FFN's output on training text
(pydoc characters 100,000 onwards, disjoint from the held-out text and from the pipeline's default calibration
range):

* ``refit``: the sliced fixture's experts (dev.fixture.upcycle_layer: shared top-512 neurons, 8 × 128 by balanced
  k-means on co-activation) with a router fitted by least squares to each expert's log output norm, times
  ``--temp``, and the routed down projections refitted by ridge regression to the dense output under that
  router's top-k weights;
* ``clusters``: the training tokens clustered (k-means on the direction of the MoE input), one expert per
  cluster made of the 128 non-shared neurons most active on its tokens (experts may share neurons), a router
  fitted by least squares to the cluster labels, times ``--temp``, and the down projections refitted as above.

Prints per layer the relative error of the fitted MoE output on the training tokens, and for the whole model
held-out PPL (4096 tokens, transformers) of dense SmolLM2, the sliced fixture's recipe and the recipe, with the
held-out routing statistics (mean top-1 routing weight, expert activation frequency max / min). ``--oracle``
instead prints, for the sliced experts, the error of keeping each token's k experts of largest output norm.

    OMP_NUM_THREADS=1 python scripts/study_specialised_fixture.py --recipe refit --top-k 6 --temp 1
    OMP_NUM_THREADS=1 python scripts/study_specialised_fixture.py --recipe clusters --top-k 4 --temp 5
    OMP_NUM_THREADS=1 python scripts/study_specialised_fixture.py --oracle
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch

from mcsharp_gguf.dev import fixture as fx
from mcsharp_gguf.text import calibration_text, heldout_text

TRAIN_OFFSET = 100_000
HELDOUT_TOKENS = 4096


def ridge(a: torch.Tensor, b: torch.Tensor, lam: float) -> torch.Tensor:
    """argmin_W |a W − b|² + lam · mean diag(aᵀa) · |W|²."""
    g = a.T @ a
    g += lam * g.diagonal().mean() * torch.eye(g.shape[0], dtype=g.dtype)
    return torch.linalg.solve(g, a.T @ b)


def token_clusters(x: torch.Tensor, k: int, seed: int, iters: int = 20) -> torch.Tensor:
    """k-means labels of the rows' directions (cosine)."""
    xn = x / x.norm(dim=1, keepdim=True)
    c = xn[torch.randperm(xn.shape[0], generator=torch.Generator().manual_seed(seed))[:k]].clone()
    for _ in range(iters):
        lab = (xn @ c.T).argmax(1)
        for j in range(k):
            if (lab == j).any():
                c[j] = xn[lab == j].mean(0)
                c[j] /= c[j].norm()
    return lab


def fit_layer(recipe: str, cap: fx.LayerCapture, mlp, top_k: int, temp: float, seed: int):
    """(plan with the experts' neurons, router (8, 576), routed downs (8·128, 576), relative error) of the layer
    whose FFN saw ``cap``."""
    x, h = cap.x, cap.h
    wd = mlp.down_proj.weight.detach().double()
    hd, xd = h.double(), x.double()
    if recipe == "refit":
        plan = fx.upcycle_layer(cap, mlp.down_proj.weight.detach(), seed=seed)
        norms = torch.stack([(hd[:, e] @ wd[:, e].T).norm(dim=1) for e in plan.experts], dim=1)
        target = torch.log(norms + 1e-6)
    else:
        order = np.argsort(-h.abs().mean(0).numpy(), kind="stable")
        shared, rest = np.sort(order[:fx.N_SHARED]), np.sort(order[fx.N_SHARED:])
        lab = token_clusters(x, fx.N_EXPERTS, seed)
        experts = []
        for j in range(fx.N_EXPERTS):
            score = h[lab == j][:, rest].abs().mean(0) if (lab == j).any() else h[:, rest].abs().mean(0)
            experts.append(np.sort(rest[np.argsort(-score.numpy(), kind="stable")[:fx.EXPERT_WIDTH]]))
        plan = fx.UpcycledLayer(shared=shared, experts=experts, router=np.zeros((fx.N_EXPERTS, x.shape[1])))
        target = torch.nn.functional.one_hot(lab, fx.N_EXPERTS).double()
    target = target - target.mean(dim=1, keepdim=True)  # softmax ignores a per-token shift
    router = ridge(xd, target, 1e-3).T * temp
    probs = torch.softmax(xd @ router.T, dim=1)
    top_w, top_i = probs.topk(top_k, dim=1)
    gate = torch.zeros_like(probs).scatter_(1, top_i, top_w)
    feats = torch.cat([hd[:, e] * gate[:, j:j + 1] for j, e in enumerate(plan.experts)], dim=1)
    full = hd @ wd.T
    s = torch.as_tensor(plan.shared)
    routed = full - hd[:, s] @ wd[:, s].T
    downs = ridge(feats, routed, 1e-4)
    rel = ((routed - feats @ downs).norm() / full.norm()).item()
    return plan, router.float(), downs.float(), rel


def heldout(model, tok, top_k: int | None) -> tuple[float, list[tuple[float, float]]]:
    """(PPL, per MoE layer (mean top-1 routing weight, activation frequency max / min)) on held-out text."""
    ids = tok(heldout_text(), add_special_tokens=False)["input_ids"][:HELDOUT_TOKENS]
    ids = torch.tensor(ids[: len(ids) // 512 * 512]).reshape(-1, 512)
    nll, logits = 0.0, []
    with torch.no_grad():
        for row in ids:
            out = model(row[None], output_router_logits=top_k is not None)
            # (from the logits: with router logits requested, transformers' loss adds the load-balancing term)
            nll += torch.nn.functional.cross_entropy(out.logits[0, :-1].float(), row[1:], reduction="sum").item()
            if top_k is not None:
                logits.append([lg.float() for lg in out.router_logits])
    stats = []
    for layer in zip(*logits, strict=True):
        p = torch.softmax(torch.cat(layer), dim=-1)
        freq = torch.bincount(p.topk(top_k, dim=-1).indices.flatten(), minlength=p.shape[-1]).double()
        stats.append((p.max(-1).values.mean().item(), (freq.max() / freq.min()).item()))
    return math.exp(nll / (511 * len(ids))), stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", choices=("refit", "clusters"), default="refit")
    ap.add_argument("--top-k", type=int, default=6)
    ap.add_argument("--temp", type=float, default=1.0)
    ap.add_argument("--train-chars", type=int, default=120_000)
    ap.add_argument("--oracle", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    dense, tok = fx.load_dense_smollm2()
    ids = tok(calibration_text(args.train_chars, offset=TRAIN_OFFSET), add_special_tokens=False)["input_ids"]
    ids = torch.tensor(ids[: len(ids) // 512 * 512]).reshape(-1, 512)
    xs = fx.capture_ffn_activations(dense, ids)  # (x, h) of every layer
    print(f"{ids.numel()} training tokens", flush=True)
    if args.oracle:
        for i, cap in enumerate(xs):
            mlp = dense.model.layers[i].mlp
            plan = fx.upcycle_layer(cap, mlp.down_proj.weight.detach(), seed=i)
            with torch.no_grad():
                outs = torch.stack([cap.h[:, e] @ mlp.down_proj.weight[:, e].T for e in plan.experts], 1)
            routed, order = outs.sum(1), outs.norm(dim=2).argsort(1, descending=True)
            errs = []
            for k in (1, 2, 4, 6):
                keep = torch.zeros(outs.shape[:2]).scatter_(1, order[:, :k], 1.0)
                errs.append(f"k={k} {((outs * keep[..., None]).sum(1) - routed).norm() / routed.norm():.3f}")
            print(f"layer {i:2d}: error of the routed output keeping the k largest experts: {', '.join(errs)}")
        return

    layers = []
    for i, cap in enumerate(xs):
        with torch.no_grad():
            layers.append(fit_layer(args.recipe, cap, dense.model.layers[i].mlp, args.top_k, args.temp, seed=i))
        print(f"layer {i:2d}: relative error of the MoE output {layers[-1][3]:.4f}", flush=True)
    sliced = fx.upcycle(dense, [fx.upcycle_layer(cap, dense.model.layers[i].mlp.down_proj.weight.detach(), seed=i)
                                for i, cap in enumerate(xs)])
    del xs
    moe = fx.upcycle(dense, [plan for plan, *_ in layers])
    d = dense.config.hidden_size
    with torch.no_grad():
        for i, (_, router, downs, _) in enumerate(layers):
            block = moe.model.layers[i].mlp
            block.gate.top_k = args.top_k
            block.gate.weight.zero_()
            block.gate.weight[:, :d] = router
            for j in range(fx.N_EXPERTS):
                block.experts.down_proj[j].zero_()
                block.experts.down_proj[j][:d, :] = downs[j * fx.EXPERT_WIDTH:(j + 1) * fx.EXPERT_WIDTH].T
    ppl_dense, _ = heldout(dense, tok, None)
    ppl_sliced, st_sliced = heldout(sliced, tok, fx.TOP_K)
    ppl_moe, st_moe = heldout(moe, tok, args.top_k)
    print(f"held-out PPL: dense {ppl_dense:.3f}, sliced {ppl_sliced:.3f}, {args.recipe} (top-{args.top_k}, "
          f"temp {args.temp:g}) {ppl_moe:.3f} ({ppl_moe / ppl_dense:.2f}× dense)")
    for name, st in (("sliced", st_sliced), (args.recipe, st_moe)):
        top1, ratio = np.array(st).T
        print(f"{name}: mean top-1 weight {top1.mean():.3f} (layers {top1.min():.3f}-{top1.max():.3f}), "
              f"frequency max/min median {np.median(ratio):.2f} (layers {ratio.min():.2f}-{ratio.max():.2f})")


if __name__ == "__main__":
    main()
