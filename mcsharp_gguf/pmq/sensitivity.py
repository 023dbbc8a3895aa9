"""Output sensitivity: how much a change in one decoder layer's output moves the model's next-token distribution.

For a small change δ of the residual stream after layer l, KL(p ‖ p_δ) ≈ ½ δᵀ F_l δ per token, with F_l the
Fisher information of the output distribution w.r.t. that residual, F_l = E_{y~p}[g gᵀ], g = ∇ log p(y).
One label ŷ per token sampled from the model's own distribution makes g_l = ∇_{h_l} log p(ŷ) an unbiased
one-sample estimate: (g_l · δ)² estimates δᵀ F_l δ. Unlike the error measured at the layer's own output, that
is in the same units (nats of output KL) in every layer, so errors can be traded between layers.

Layer-streamed like calibration: a forward pass keeps each layer's input hidden states (not weights), then a
reverse pass loads one layer at a time, recomputes it with autograd and carries the gradient back.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from ..files import write_atomically
from ..model.stream import LayerStream, MoeCapture, MoeRecorder


def output_grad(stream: LayerStream, hidden: torch.Tensor, seed: int = 0, tap_seqs: int = 0
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """∇_h log p(ŷ | h) for the last hidden states ``hidden`` (n_seq, seq, d), ŷ sampled per token from the
    model's own next-token distribution (seeded); with ``tap_seqs``, also the LM head's input (the normed
    hidden states) and the gradient at its output (onehot(ŷ) − p) on the first ``tap_seqs`` sequences."""
    norm = stream.final_norm_module()
    head = stream.lm_head()
    gen = torch.Generator().manual_seed(seed)
    grads, head_x, head_g = [], [], []
    for s in range(hidden.shape[0]):  # one sequence at a time: logits are seq × vocab
        h = hidden[s].detach().clone().requires_grad_(True)
        with torch.enable_grad():
            x = norm(h)
            logp = torch.log_softmax(x @ head.T, dim=-1)
            p = logp.detach().exp()
            # sampled on the CPU from one seeded generator: the same labels whatever the compute device
            y = torch.multinomial(p.cpu(), 1, generator=gen).to(p.device)
            logp.gather(1, y).sum().backward()
        grads.append(h.grad)
        if s < tap_seqs:
            head_x.append(x.detach())
            head_g.append(torch.zeros_like(p).scatter_(1, y, 1.0) - p)
    tap = (torch.cat(head_x), torch.cat(head_g)) if head_x else None
    return torch.stack(grads), tap


@dataclass
class LayerGrads:
    """One decoder layer in the reverse pass, with what the planner needs from it."""

    index: int
    layer: torch.nn.Module  # materialised; unloaded after the caller's turn
    h_in: torch.Tensor  # (n_seq, seq, d) its input hidden states, from the full-precision forward
    g_out: torch.Tensor  # (n_seq, seq, d) ∇ log p(ŷ) w.r.t. its output
    taps: dict[str, tuple[torch.Tensor, torch.Tensor]]  # linear name → (input x, ∇ at its output), tokens × ·
    moe: MoeCapture | None = None  # with reverse_layers(moe=True), what its MoE block saw (None: no MoE block)
    out_norm: float | None = None  # ||its output||_F over every token, alongside ``moe``


def _layer_vjp(layer: torch.nn.Module, h_in: torch.Tensor, g_out: torch.Tensor, pos, rope,
               taps: dict[str, torch.nn.Module], tap_seqs: int, out_norm: bool = False):
    """gᵀ ∂layer(h)/∂h at ``h_in`` one sequence at a time (weights take no gradient); for the first
    ``tap_seqs`` sequences also each tapped linear's input and the gradient at its output; with ``out_norm``, the
    Frobenius norm of the layer's output too (else None)."""
    for p in layer.parameters():
        p.requires_grad_(False)
    seen: dict[str, tuple[list, list]] = {n: ([], []) for n in taps}
    active = [False]

    def tap(name):
        def hook(mod, args, out):
            if active[0]:
                seen[name][0].append(args[0].detach().reshape(-1, args[0].shape[-1]))
                out.register_hook(lambda g: seen[name][1].append(g.detach().reshape(-1, g.shape[-1])))
        return hook

    hooks = [m.register_forward_hook(tap(n)) for n, m in taps.items()]
    out, ys = [], []
    try:
        for s in range(h_in.shape[0]):
            active[0] = s < tap_seqs
            h = h_in[s:s + 1].detach().clone().requires_grad_(True)
            with torch.enable_grad():
                y = layer(h, position_ids=pos, position_embeddings=rope)
                y = y[0] if isinstance(y, tuple) else y
                y.backward(g_out[s:s + 1])
            out.append(h.grad[0])
            if out_norm:
                ys.append(y.detach())
    finally:
        for hk in hooks:
            hk.remove()
    return (torch.stack(out), {n: (torch.cat(x), torch.cat(g)) for n, (x, g) in seen.items() if x},
            float(torch.cat(ys).float().norm()) if out_norm else None)


def reverse_layers(stream: LayerStream, token_ids: torch.Tensor, seed: int = 0,
                   taps: Callable[[torch.nn.Module], dict[str, torch.nn.Module]] | None = None,
                   tap_seqs: int = 8, state_dir: str | Path | None = None, resume_at: int | None = None,
                   progress: bool = False, moe: bool = False) -> Iterator[LayerGrads]:
    """Each decoder layer from the last to the first, as :class:`LayerGrads`; ``taps(layer)`` names the linears
    whose inputs and output gradients to record (on the first ``tap_seqs`` sequences). With ``taps``, an item
    with ``index`` n_layer (layer None) comes first, tapping the LM head ("lm_head"); after the first layer, an
    item with ``index`` -1 (layer None) carries ∇ w.r.t. the token embeddings' output in ``g_out``.

    Memory: weights one layer at a time; every layer's input hidden states (n_layer × tokens × d floats, 6 GB
    for 48 layers of 16k tokens at d = 2048) go to disk and are mapped back one layer at a time in the reverse
    pass. ``state_dir`` keeps them there (default: a temporary directory) together with ``g{i}.pt``, the
    gradient at layer i's input, saved before layer i is yielded: a run stopped after the caller finished layer
    r can continue with ``resume_at=r`` (see :func:`resumable_from`) — no forward pass, layers r-1 … 0 and the
    embedding item, bit-identical to an uninterrupted run. ``progress``: a bar over the forward sweep.

    ``moe``: also record what each layer's MoE block saw in the reverse pass's forward (its outputs aside), and
    the norm of the layer's output (LayerGrads.moe, .out_norm): the same bits as a forward of its own
    (capture_moe), which this saves.
    """
    with tempfile.TemporaryDirectory(prefix="mcsharp-inputs-") as tmp:
        spill = Path(state_dir) if state_dir is not None else Path(tmp)
        spill.mkdir(parents=True, exist_ok=True)
        if resume_at is None:
            def spill_input(i: int, layer, run, hidden: torch.Tensor) -> torch.Tensor:
                _save(hidden, spill / f"h{i:04d}.pt")  # (kept on the CPU's disk whatever the device)
                return run(hidden)

            hidden = stream.sweep(token_ids, spill_input, "importance: forward", progress)
            g, head_tap = output_grad(stream, hidden, seed, tap_seqs if taps else 0)
            del hidden
            if head_tap is not None:
                yield LayerGrads(stream.n_layer, None, None, g, {"lm_head": head_tap})
            # (the LM head's taps hold tokens × vocab gradients: 2.5 GB at Qwen3's vocab and 4,096 tokens;
            # a local left bound would keep them through the whole reverse pass)
            del head_tap
            top = stream.n_layer
        else:
            g, top = torch.load(spill / f"g{resume_at:04d}.pt").to(stream.device), resume_at
        pos, rope = stream.rotary(token_ids.shape[1])
        for i in reversed(range(top)):
            layer = stream.load_layer(i)
            h_in = torch.load(spill / f"h{i:04d}.pt", mmap=True).to(stream.device)  # (on the CPU: still mapped)
            block = stream.moe_block(layer) if moe else None
            with MoeRecorder(block, stream.arch, outputs=False) if block is not None else nullcontext() as rec:
                g_in, tapped, out_norm = _layer_vjp(layer, h_in, g, pos, rope, taps(layer) if taps else {},
                                                    tap_seqs, out_norm=block is not None)
            stream.release_expert_buffers(layer)  # (the backward's, 0.7 GB at Mixtral-8x7B's shape)
            _save(g_in, spill / f"g{i:04d}.pt")
            yield LayerGrads(i, layer, h_in, g, tapped, rec.capture(stream.n_expert) if rec else None, out_norm)
            del tapped, rec  # (not held while the next layer loads)
            g = g_in
            stream.unload_layer(i)
            del h_in
            (spill / f"h{i:04d}.pt").unlink()  # free the disk as we go
            (spill / f"g{i + 1:04d}.pt").unlink(missing_ok=True)
        yield LayerGrads(-1, None, None, g, {})


def resumable_from(state_dir: str | Path, done: set[int], n_layer: int) -> int | None:
    """The layer a reverse pass kept in ``state_dir`` can continue below, given the layers whose items the caller
    finished (``done``): the lowest r with every layer r … n_layer-1 done, its input gradient saved and every input
    below it kept; None when nothing can be reused."""
    state_dir = Path(state_dir)
    r = None
    while (n_layer - 1 if r is None else r - 1) in done:
        r = n_layer - 1 if r is None else r - 1
    if r is None or not (state_dir / f"g{r:04d}.pt").exists():
        return None
    if not all((state_dir / f"h{i:04d}.pt").exists() for i in range(r)):
        return None
    return r


def _save(t: torch.Tensor, path: Path) -> None:
    """torch.save through a temporary name: a killed run never leaves a half-written state file."""
    write_atomically(path, lambda tmp: torch.save(t.cpu(), tmp))


def perturbation_kl(stream: LayerStream, token_ids: torch.Tensor,
                    perturb: Callable[[int, torch.nn.Module], Callable[[], None] | None]) -> dict[int, float]:
    """The real output KL, summed over tokens, of perturbing one decoder layer at a time: layer → Σ KL(p ‖ p_l).

    ``perturb(i, layer)`` changes the materialised layer in place and returns an undo callable (None: layer
    ``i`` is not probed). All probed copies of the hidden states are carried forward together, so each layer is
    loaded once; cost ≈ n_layer²/2 layer passes over ``token_ids`` (keep it short).
    """
    probed: dict[int, torch.Tensor] = {}

    def probe(i: int, layer, run, clean: torch.Tensor) -> torch.Tensor:
        for k in probed:
            probed[k] = run(probed[k])
        undo = perturb(i, layer)
        if undo is not None:
            probed[i] = run(clean)
            undo()
        return run(clean)

    clean = stream.sweep(token_ids, probe, "flip probe", progress=False)
    ref = torch.log_softmax(stream.logits(clean).double(), -1)
    out = {}
    for k, h in probed.items():
        logp = torch.log_softmax(stream.logits(h).double(), -1)
        out[k] = float((ref.exp() * (ref - logp)).sum())
    return out
