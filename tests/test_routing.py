"""Routing statistics (dev.routing) against the model's own router logits, from transformers' full forward."""

import pytest
import torch

from mcsharp_gguf.dev.routing import LayerRouting, routing_statistics
from mcsharp_gguf.dev.tiny_models import load_hf


@pytest.mark.parametrize("arch", ["qwen2moe", "mixtral"])
def test_routing_statistics_match_the_router_logits_of_a_whole_model_forward(tiny_model, arch):
    model_dir = tiny_model(arch)
    ids = torch.randint(0, 49152, (3, 24), generator=torch.Generator().manual_seed(1))
    stats = routing_statistics(model_dir, ids, progress=False)

    model = load_hf(model_dir)
    with torch.no_grad():
        out = model(ids, output_router_logits=True)
    k = model.config.num_experts_per_tok
    assert [s.layer for s in stats] == list(range(len(out.router_logits)))
    for s, logits in zip(stats, out.router_logits, strict=True):
        probs = torch.softmax(logits.float(), dim=-1)
        top1 = probs.max(dim=-1).values.mean().item()
        counts = torch.bincount(probs.topk(k, dim=-1).indices.flatten(), minlength=probs.shape[-1])
        freq = counts.double() / probs.shape[0]
        assert s.top1_weight == pytest.approx(top1, rel=1e-5)
        assert s.freq == pytest.approx(freq.tolist(), abs=1e-9)
        assert sum(s.freq) == pytest.approx(k)


def test_frequency_ratio_of_a_layer():
    assert LayerRouting(0, 0.5, [0.5, 0.25, 1.0]).freq_ratio == 4.0
    assert LayerRouting(0, 0.5, [0.5, 0.0]).freq_ratio == float("inf")
