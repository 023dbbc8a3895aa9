"""The specialised fixture (#22): the sliced fixture's experts and router trained, layer by layer, to the dense FFN.

Recipe (deterministic on one machine and thread count; docs/fixture.md "Second study"):
  * start from the sliced fixture's layer (dev.upcycle.upcycle_layer: shared top-512 neurons, 8 × 128 routed
    neurons by balanced k-means, a flat least-squares router), top-6 routing as there;
  * per layer, train every routed expert's gate, up and down and the router jointly by Adam (one-cycle
    learning rate, peak 5e-3, 8 epochs of 1,024-token batches) to the dense FFN's routed output (the dense output
    minus the shared neurons' part, which stays exact), under the top-k softmax weights as the MoE applies them;
    no load-balancing term, so training is free to starve experts — which is what makes their bits matter
    unequally (est. planner gain of mixed over stock 11.7% out-of-fold against the sliced fixture's 0.3%);
  * the dense model's FFN inputs come from training text disjoint from the held-out text and from the pipeline's
    default calibration range (pydoc characters 100,000-220,000), captured one decoder layer at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ..text import calibration_text
from . import upcycle as up

SPECIALISED_VERSION = "1"  # bump when the recipe changes: cached fixtures are keyed by it
TRAIN_OFFSET = 100_000
TRAIN_CHARS = 120_000
EPOCHS = 8
PEAK_LR = 5e-3
BATCH = 1024
HOLDOUT = 0.1  # the last 10% of a layer's training tokens score it and are never trained on


@dataclass
class TrainedLayer:
    """One layer of the specialised fixture: the sliced layer it started from and its trained routed weights."""

    plan: up.UpcycledLayer  # shared neurons (exact, untrained) and the init's neuron assignment
    router: torch.Tensor  # (8, 576)
    gate_up: torch.Tensor  # (8, 2·128, 576): gate rows, then up rows
    down: torch.Tensor  # (8, 576, 128)
    error: float  # routed-output error relative to the dense FFN output, on the unseen tokens, after training
    init_error: float  # the same of the sliced initialisation


def capture_layers(dense, token_ids: torch.Tensor) -> Iterator[up.LayerCapture]:
    """The dense model's FFN captures, one decoder layer at a time: the residual stream of every sequence is
    carried from layer to layer, so only one layer's activations are ever held (246 MB at 29k tokens)."""
    model = dense.model
    pos = torch.arange(token_ids.shape[1])[None]
    with torch.no_grad():
        h = model.embed_tokens(token_ids)
        rope = model.rotary_emb(h, pos)
    for layer in model.layers:
        seen: dict[str, list[torch.Tensor]] = {"x": [], "h": []}
        # the MLP's input and down_proj's input, which is exactly silu(gate x) * up x
        hooks = [mod.register_forward_pre_hook(
            lambda m, a, out=seen[key]: out.append(a[0].reshape(-1, a[0].shape[-1])))
            for key, mod in (("x", layer.mlp), ("h", layer.mlp.down_proj))]
        try:
            with torch.no_grad():  # not around the yield: grad mode is global, the caller trains
                out = [layer(h[s:s + 1], position_ids=pos, position_embeddings=rope) for s in range(h.shape[0])]
        finally:
            for hook in hooks:
                hook.remove()
        h = torch.cat([o[0] if isinstance(o, tuple) else o for o in out])
        yield up.LayerCapture(torch.cat(seen["x"]), torch.cat(seen["h"]))


def train_layer(cap: up.LayerCapture, mlp, seed: int, top_k: int = up.TOP_K, epochs: int = EPOCHS,
                lr: float = PEAK_LR) -> TrainedLayer:
    """The sliced layer of ``cap`` (dev.upcycle.upcycle_layer) with its routed experts and router trained to the
    dense FFN ``mlp``'s routed output (see the module docstring)."""
    x, h = cap.x, cap.h
    wd = mlp.down_proj.weight.detach()
    plan = up.upcycle_layer(cap, wd, seed=seed)
    n_e = len(plan.experts)
    s = torch.as_tensor(plan.shared)
    full = h @ wd.T
    routed = full - h[:, s] @ wd[:, s].T
    wg, wu = mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach()
    g = torch.stack([wg[e] for e in plan.experts]).clone().requires_grad_()
    u = torch.stack([wu[e] for e in plan.experts]).clone().requires_grad_()
    d = torch.stack([wd[:, e] * up.ROUTED_DOWN_SCALE for e in plan.experts]).clone().requires_grad_()
    r = torch.from_numpy(plan.router).clone().requires_grad_()
    n_train = int(x.shape[0] * (1 - HOLDOUT))

    def moe(xb: torch.Tensor) -> torch.Tensor:
        top_w, top_i = torch.softmax(xb @ r.T, dim=1).topk(top_k, dim=1)
        out = torch.zeros(xb.shape[0], x.shape[1])
        for j in range(n_e):
            tok, slot = (top_i == j).nonzero(as_tuple=True)
            if tok.numel():
                xe = xb[tok]
                he = torch.nn.functional.silu(xe @ g[j].T) * (xe @ u[j].T)
                out = out.index_add(0, tok, (he @ d[j].T) * top_w[tok, slot, None])
        return out

    def unseen_error() -> float:
        with torch.no_grad():
            return ((moe(x[n_train:]) - routed[n_train:]).norm() / full[n_train:].norm()).item()

    init_error = unseen_error()
    opt = torch.optim.Adam([g, u, d, r], lr=lr / 25)  # OneCycleLR starts at max_lr / 25 and sets it anyway
    steps_per_epoch = n_train // BATCH
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch,
                                                pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    scale = routed[:n_train].pow(2).mean()
    for _ in range(epochs):
        perm = torch.randperm(n_train, generator=gen)
        for b in range(steps_per_epoch):
            idx = perm[b * BATCH:(b + 1) * BATCH]
            loss = (moe(x[idx]) - routed[idx]).pow(2).mean() / scale
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return TrainedLayer(plan=plan, router=r.detach(), gate_up=torch.cat([g, u], dim=1).detach(), down=d.detach(),
                        error=unseen_error(), init_error=init_error)


def specialised_model(dense, layers: list[TrainedLayer]):
    """The Qwen2-MoE model of the sliced recipe's geometry (dev.upcycle.upcycle) carrying the trained weights."""
    moe = up.upcycle(dense, [t.plan for t in layers])
    d = dense.config.hidden_size
    with torch.no_grad():
        for block, t in zip((lay.mlp for lay in moe.model.layers), layers, strict=True):
            block.gate.weight.zero_()
            block.gate.weight[:, :d] = t.router
            block.experts.gate_up_proj.zero_()
            block.experts.gate_up_proj[:, :, :d] = t.gate_up
            block.experts.down_proj.zero_()
            block.experts.down_proj[:, :d, :] = t.down
    return moe


def train_specialised(dense, tok, log: Callable[[str], None] = print) -> tuple[object, dict]:
    """(model, stamp facts): the whole recipe on the dense SmolLM2 ``dense``."""
    from tqdm import tqdm

    text = calibration_text(TRAIN_CHARS, offset=TRAIN_OFFSET)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    ids = torch.tensor(ids[: len(ids) // up.CALIB_SEQ * up.CALIB_SEQ]).reshape(-1, up.CALIB_SEQ)
    log(f"[fixture] training every layer's routed experts and router on {ids.numel()} tokens "
        f"({EPOCHS} epochs, about 25 s a layer on two threads)")
    layers = []
    bar = tqdm(capture_layers(dense, ids), total=len(dense.model.layers), desc="train layers", unit="layer")
    for i, cap in enumerate(bar):
        layers.append(train_layer(cap, dense.model.layers[i].mlp, seed=i))
        bar.set_postfix_str(f"unseen error {layers[-1].init_error:.3f} → {layers[-1].error:.3f}")
    return specialised_model(dense, layers), {
        "train_tokens": int(ids.numel()),
        "recipe": {"init": "sliced", "top_k": up.TOP_K, "epochs": EPOCHS, "peak_lr": PEAK_LR, "batch": BATCH,
                   "train_chars": [TRAIN_OFFSET, TRAIN_OFFSET + TRAIN_CHARS]},
        "unseen_error": [{"init": t.init_error, "trained": t.error} for t in layers]}
