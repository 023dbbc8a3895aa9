"""Study (not a test): how cheap can dropping expert slots be on a fixture at all, whatever the router?

OTP decides which of a token's top-k slots to drop *before* the experts run. This study bounds what any such rule
can reach by giving the rule what OTP never has: every selected slot's actual contribution w_j · E_j(x). At a
target executed fraction f, each MoE layer keeps every token's first slot (as OTP and the threshold rule do) and,
of the other slots of the 512-token sequence, the share (f·k − 1) / (k − 1) with the largest score, so that
exactly f of the slots run in every layer; dropped slots are not renormalised (as the runtime drops them). Scores:

* ``oracle``: the norm of the slot's contribution ‖w_j · E_j(x)‖ — the output the drop removes;
* ``weight``: the routing weight w_j alone, with the same per-layer quantile (a calibrated global threshold: what a
  rule that sees only the router could do without learning anything);
* static top-k for reference (the first k' slots).

Prints held-out PPL (4,096 tokens, transformers, the same text and code as the other #22 studies) and the rise over
the unpruned model. If the oracle's rise at 0.75 is above 1%, #22's OTP target (≤ 1% at ≤ 0.75 executed) is out of
reach on that model for every rule that runs before the experts.

    OMP_NUM_THREADS=2 python scripts/study_prune_oracle.py [--model DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from study_lm_distil import moe_blocks  # (scripts/ is on sys.path when this script runs)
from study_specialised_fixture import heldout
from transformers import AutoModelForCausalLM, AutoTokenizer

from mcsharp_gguf.dev.fixture import cached_fixture

FRACTIONS = (0.9, 0.8, 0.75, 0.7)


def slot_outputs(experts, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """[tokens, k, d]: each selected slot's weighted output w_j · E_j(x) (Qwen2-MoE experts, fused gate_up)."""
    y = x.new_zeros(idx.shape[0], idx.shape[1], x.shape[1])
    for e in idx.unique().tolist():
        tok, slot = torch.where(idx == e)
        gate, up = torch.nn.functional.linear(x[tok], experts.gate_up_proj[e]).chunk(2, dim=-1)
        out = torch.nn.functional.linear(experts.act_fn(gate) * up, experts.down_proj[e])
        y[tok, slot] = out * w[tok, slot, None]
    return y


def keep_mask(score: torch.Tensor, frac: float) -> torch.Tensor:
    """Keep slot 0 and, of the other slots, the share (f·k − 1)/(k − 1) with the largest score."""
    k = score.shape[1]
    rest = score[:, 1:].flatten()
    n_keep = round((frac * k - 1) / (k - 1) * rest.numel())
    keep = torch.zeros_like(rest, dtype=torch.bool)
    keep[rest.topk(n_keep).indices] = True
    return torch.cat([torch.ones(score.shape[0], 1, dtype=torch.bool), keep.view(-1, k - 1)], dim=1)


class PruneRule:
    """Replaces every MoE layer's experts forward; ``set(rule, frac)`` picks what runs (``None``: nothing dropped)."""

    def __init__(self, model) -> None:
        self.rule, self.frac, self.kept, self.total = None, 1.0, 0, 0
        for block in moe_blocks(model):
            block.experts.forward = lambda x, idx, w, experts=block.experts: self.forward(experts, x, idx, w)

    def set(self, rule: str | None, frac: float = 1.0) -> None:
        self.rule, self.frac, self.kept, self.total = rule, frac, 0, 0

    def forward(self, experts, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        y = slot_outputs(experts, x, idx, w)
        if self.rule is None:
            keep = torch.ones(idx.shape, dtype=torch.bool)
        elif self.rule == "static":
            keep = (torch.arange(idx.shape[1]) < self.frac)[None].expand(idx.shape)
        else:
            keep = keep_mask(y.norm(dim=-1) if self.rule == "oracle" else w, self.frac)
        self.kept += int(keep.sum())
        self.total += keep.numel()
        return (y * keep[..., None]).sum(dim=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None,
                    help="MoE fixture checkpoint (default: the cached --kind specialised build)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args()
    src = args.model or cached_fixture("specialised")
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    k = model.config.num_experts_per_tok
    rules = PruneRule(model)
    rows = []

    def score(rule: str | None, frac: float) -> None:
        rules.set(rule, frac)
        ppl, _ = heldout(model, tok, None)
        executed = rules.kept / rules.total
        base = rows[0]["ppl"] if rows else ppl
        rows.append({"rule": rule or "none", "setting": frac, "executed": executed, "ppl": ppl,
                     "rise": ppl / base - 1})
        print(f"{rule or 'none':>7} {frac:>5}: executed {executed:.3f}, PPL {ppl:.3f} "
              f"(+{100 * (ppl / base - 1):.2f}%)", flush=True)

    score(None, 1.0)
    for kk in (k - 1, k - 2):
        score("static", kk)
    for frac in FRACTIONS:
        for rule in ("oracle", "weight"):
            score(rule, frac)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": str(src), "top_k": k, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
