"""Study (not a test): can the fixture's upcycled experts be made to differ, by closed-form fits or by training?

Two closed-form recipes on SmolLM2-135M's FFNs, each layer fitted to the dense FFN's output on training text
(pydoc characters 100,000 onwards, disjoint from the held-out text and from the pipeline's default calibration
range):

* ``refit``: the sliced fixture's experts (dev.fixture.upcycle_layer: shared top-512 neurons, 8 × 128 by balanced
  k-means on co-activation) with a router fitted by least squares to each expert's log output norm, times
  ``--temp``, and the routed down projections refitted by ridge regression to the dense output under that
  router's top-k weights;
* ``clusters``: the training tokens clustered (k-means on the direction of the MoE input), one expert per
  cluster made of the 128 non-shared neurons most active on its tokens (experts may share neurons), a router
  fitted by least squares to the cluster labels, times ``--temp``, and the down projections refitted as above;
* ``distil``: layer-wise gradient training from either (``--init clusters|sliced``): every routed expert's gate,
  up and down and the router trained by Adam (``--epochs``, one-cycle ``--lr``) to the dense FFN's routed output
  under top-k routing, plus ``--lb`` × a load-balancing term; per layer the error and routing statistics on the
  10% of the training tokens it did not train on, before and after (``--layers N``: only the first N layers).

Prints per layer the relative error of the fitted MoE output on the training tokens, and for the whole model
held-out PPL (4096 tokens, transformers) of dense SmolLM2, the sliced fixture's recipe and the recipe, with the
held-out routing statistics (mean top-1 routing weight, expert activation frequency max / min). ``--oracle``
instead prints, for the sliced experts, the error of keeping each token's k experts of largest output norm.

    OMP_NUM_THREADS=1 python scripts/study_specialised_fixture.py --recipe refit --top-k 6 --temp 1
    OMP_NUM_THREADS=1 python scripts/study_specialised_fixture.py --recipe clusters --top-k 4 --temp 5
    OMP_NUM_THREADS=1 python scripts/study_specialised_fixture.py --oracle
    OMP_NUM_THREADS=1 python scripts/study_specialised_fixture.py --recipe distil --init sliced --top-k 6 \
        --lb 0 --lr 5e-3
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch

from mcsharp_gguf.dev import upcycle as fx
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


def distil_layer(cap: fx.LayerCapture, mlp, top_k: int, temp: float, seed: int, epochs: int, lb: float,
                 lr: float = 2e-3, init: str = "clusters", entropy: float = 0.0, k_drop: int = 0):
    """Initialised by the clusters recipe or the sliced fixture's experts and router (``init``), the routed experts
    (gate, up, down) and the router trained jointly by Adam to the dense FFN's routed output (dense minus the
    shared neurons' part, which stays exact), top-k softmax weights as the MoE applies them, plus ``lb`` × the
    Switch load-balancing term, plus ``entropy`` × the routing distribution's mean entropy (in units of log 8: a
    peaked router drops its tail slots more cheaply); with ``k_drop`` > 0 each batch keeps only its top-k' slots,
    k' uniform in [k − k_drop, k] (no renormalisation, as static pruning runs), so the tail slots learn to matter
    least. Returns (plan, router (8, 576), gate/up (8, 256, 576), downs
    (8, 576, 128), and on the last 10% of the tokens (not trained on) the routed output's relative error and
    routing statistics after training and of the initialisation)."""
    x, h = cap.x, cap.h
    wd = mlp.down_proj.weight.detach()
    if init == "clusters":
        plan, router, downs, _ = fit_layer("clusters", cap, mlp, top_k, temp, seed)
    else:  # the sliced fixture's experts and router (flat: weights ≈ 1/8, downs × 8)
        plan = fx.upcycle_layer(cap, wd, seed=seed)
        router = torch.from_numpy(plan.router) * temp
        downs = torch.cat([wd[:, e].T * fx.ROUTED_DOWN_SCALE for e in plan.experts])
    s = torch.as_tensor(plan.shared)
    routed = h @ wd.T - h[:, s] @ wd[:, s].T
    wg, wu = mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach()
    g = torch.stack([wg[e] for e in plan.experts]).clone().requires_grad_()
    u = torch.stack([wu[e] for e in plan.experts]).clone().requires_grad_()
    d = torch.stack([downs[j * fx.EXPERT_WIDTH:(j + 1) * fx.EXPERT_WIDTH].T
                     for j in range(fx.N_EXPERTS)]).clone().requires_grad_()
    r = router.clone().requires_grad_()
    n_train = int(x.shape[0] * 0.9)

    def moe(xb: torch.Tensor, k: int = top_k):
        probs = torch.softmax(xb @ r.T, dim=1)
        top_w, top_i = probs.topk(k, dim=1)
        out = torch.zeros(xb.shape[0], x.shape[1])
        for j in range(fx.N_EXPERTS):
            tok, slot = (top_i == j).nonzero(as_tuple=True)
            if tok.numel():
                xe = xb[tok]
                he = torch.nn.functional.silu(xe @ g[j].T) * (xe @ u[j].T)
                out = out.index_add(0, tok, (he @ d[j].T) * top_w[tok, slot, None])
        return out, probs, top_i

    def rel_error() -> str:
        """Relative error (at top-k and, as static pruning would, top-(k-1) and top-(k-2) without renormalising),
        mean top-1 weight and activation frequency max / min on the unseen tokens."""
        with torch.no_grad():
            full = (h[n_train:] @ wd.T).norm()
            out, probs, top_i = moe(x[n_train:])
            freq = torch.bincount(top_i.flatten(), minlength=fx.N_EXPERTS).double()
            err = ((out - routed[n_train:]).norm() / full).item()
            drops = [((moe(x[n_train:], k)[0] - routed[n_train:]).norm() / full).item()
                     for k in (top_k - 1, top_k - 2)]
            ratio = freq.max() / freq.min().clamp_min(1)
            return (f"error {err:.4f} (top-{top_k - 1} {drops[0]:.4f}, top-{top_k - 2} {drops[1]:.4f}), top-1 "
                    f"weight {probs.max(1).values.mean():.3f}, frequency max/min {ratio:.2f}")

    err0 = rel_error()
    opt = torch.optim.Adam([g, u, d, r], lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    scale = routed[:n_train].pow(2).mean()
    batch = 1024
    steps = epochs * (n_train // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    for _ in range(epochs):
        perm = torch.randperm(n_train, generator=gen)
        for b in range(n_train // batch):
            idx = perm[b * batch:(b + 1) * batch]
            k_b = top_k - int(torch.randint(k_drop + 1, (1,), generator=gen)) if k_drop else top_k
            out, probs, top_i = moe(x[idx], k_b)
            loss = (out - routed[idx]).pow(2).mean() / scale
            frac = torch.bincount(top_i.flatten(), minlength=fx.N_EXPERTS).float() / top_i.numel()
            loss = loss + lb * fx.N_EXPERTS * (frac * probs.mean(0)).sum()
            if entropy:
                ent = -(probs * probs.clamp_min(1e-12).log()).sum(1).mean() / math.log(fx.N_EXPERTS)
                loss = loss + entropy * ent
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return plan, r.detach(), torch.cat([g, u], dim=1).detach(), d.detach(), rel_error(), err0


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
    ap.add_argument("--recipe", choices=("refit", "clusters", "distil"), default="refit")
    ap.add_argument("--epochs", type=int, default=8, help="distil: passes over the layer's training tokens")
    ap.add_argument("--lr", type=float, default=2e-3, help="distil: peak learning rate (one-cycle)")
    ap.add_argument("--init", choices=("clusters", "sliced"), default="clusters", help="distil: initialisation")
    ap.add_argument("--lb", type=float, default=0.01, help="distil: weight of the load-balancing term")
    ap.add_argument("--entropy", type=float, default=0.0,
                    help="distil: weight of the routing entropy term (> 0 peaks the router)")
    ap.add_argument("--k-drop", type=int, default=0,
                    help="distil: train each batch at top-k' with k' uniform in [k - K, k]")
    ap.add_argument("--layers", type=int, default=None, help="distil: train only the first N layers, no PPL")
    ap.add_argument("--save", type=Path, default=None, help="distil: write the trained MoE checkpoint here")
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

    if args.recipe == "distil":
        t0 = time.time()
        trained = []
        for i, cap in enumerate(xs[:args.layers]):
            trained.append(distil_layer(cap, dense.model.layers[i].mlp, args.top_k, args.temp, i, args.epochs,
                                        args.lb, args.lr, args.init, args.entropy,
                                        args.k_drop))
            print(f"layer {i:2d} on unseen tokens: trained {trained[-1][4]}; closed-form init {trained[-1][5]}; "
                  f"{time.time() - t0:.0f} s", flush=True)
        if args.layers is not None:
            return
        sliced = fx.upcycle(dense, [fx.upcycle_layer(c, dense.model.layers[i].mlp.down_proj.weight.detach(),
                                                     seed=i) for i, c in enumerate(xs)])
        del xs
        moe = fx.upcycle(dense, [t[0] for t in trained])
        d = dense.config.hidden_size
        with torch.no_grad():
            for i, (_, router, gate_up, downs, *_) in enumerate(trained):
                block = moe.model.layers[i].mlp
                block.gate.top_k = args.top_k
                block.gate.weight.zero_()
                block.gate.weight[:, :d] = router
                block.experts.gate_up_proj.zero_()
                block.experts.gate_up_proj[:, :, :d] = gate_up
                block.experts.down_proj.zero_()
                block.experts.down_proj[:, :d, :] = downs
        report(dense, sliced, moe, tok, args)
        if args.save is not None:  # a checkpoint the pipeline and scripts/fixture_stats.py take
            moe.config.num_experts_per_tok = args.top_k
            moe.save_pretrained(args.save, safe_serialization=True)
            tok.save_pretrained(args.save)
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
    report(dense, sliced, moe, tok, args)


def report(dense, sliced, moe, tok, args) -> None:
    """Held-out PPL of the three models and the routing statistics of the two MoEs."""
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
