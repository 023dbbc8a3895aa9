"""How a checkpoint routes text: per MoE layer, how peaked its router is and how unevenly its experts are used.

What makes per-expert bits and learned pruning worth anything is experts that differ: a router that commits to
one expert per token, and experts used at very different rates. These statistics compare fixtures on that.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..model.stream import LayerStream, MoeRecorder


@dataclass
class LayerRouting:
    """One MoE layer's routing over some tokens."""

    layer: int
    top1_weight: float  # mean over tokens of the largest softmax routing probability
    freq: list[float]  # per expert: the fraction of tokens that select it

    @property
    def freq_ratio(self) -> float:
        """Most-used expert's activation frequency over the least-used one's (inf where one is never used)."""
        lo = min(self.freq)
        return max(self.freq) / lo if lo > 0 else float("inf")


def routing_statistics(model_dir: str | Path, token_ids: torch.Tensor, progress: bool = True) -> list[LayerRouting]:
    """Route ``token_ids`` (n_seq, seq) through the checkpoint, one decoder layer at a time, and return every MoE
    layer's routing statistics."""
    stream = LayerStream.open(model_dir)
    out: list[LayerRouting] = []

    def step(i: int, layer, run, hidden: torch.Tensor) -> torch.Tensor:
        block = stream.moe_block(layer)
        if block is None:
            return run(hidden)
        with MoeRecorder(block, stream.arch, outputs=False) as rec:
            hidden = run(hidden)
        cap = rec.capture(stream.n_expert)
        probs = torch.softmax(cap.router_logits, dim=-1)
        out.append(LayerRouting(i, float(probs.max(dim=-1).values.mean()),
                                (cap.stats.freq / cap.stats.n_tokens).tolist()))
        return hidden

    stream.sweep(token_ids, step, "routing", progress)
    return out
