"""Layer-streaming calibration: same logits as the whole transformers model, consistent routing stats."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mcsharp_gguf.dev.tiny_models import load_hf
from mcsharp_gguf.errors import McsharpError
from mcsharp_gguf.model.calibration import calibration_token_ids
from mcsharp_gguf.model.stream import LayerStream, capture_moe

pytestmark = pytest.mark.slow  # tiny models carry the cached SmolLM2 tokenizer


@pytest.mark.parametrize("arch", ["qwen2moe", "mixtral", "qwen3moe", "olmoe", "deepseek2"])
def test_streamed_forward_matches_transformers(arch, tiny_model):
    d = tiny_model(arch)
    stream = LayerStream.open(d)
    ids = torch.tensor(np.random.default_rng(0).integers(0, 49152, (2, 24)))
    h = stream.embed(ids)
    caps = []
    for _, layer, run in stream.layers(h.shape[1]):
        block = stream.moe_block(layer)
        if block is None:
            h = run(h)
            continue
        cap, h = capture_moe(block, stream.arch, stream.n_expert, run, h)
        caps.append(cap)
        # the captured output is the block applied to the captured input
        with torch.no_grad():
            assert torch.allclose(block(cap.x[None])[0], cap.y, atol=1e-5)
        assert cap.stats.freq.sum() == ids.numel() * cap.stats.top_k
        phi, w = cap.stats.normalised()
        assert abs(phi.sum() - 1) < 1e-9 and abs(w.sum() - 1) < 1e-9
        # the layer's weights are released again
    assert all(p.device.type == "meta" for p in stream.model.model.layers.parameters())
    assert caps
    with torch.no_grad():
        ref = load_hf(d)(ids).logits
    assert (stream.logits(h) - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_sweep_holds_only_the_current_layers_input(tiny_model):
    """LayerStream.sweep lets each layer's input go once the next one has it: no frame of the loop keeps the
    embedding (or an earlier layer's output) alive for the rest of the sweep (0.27 GB a state at Mixtral-8x7B's
    width and 16k tokens), and it computes what the layers run one after another compute."""
    import weakref

    stream = LayerStream.open(tiny_model("mixtral"))
    ids = torch.tensor(np.random.default_rng(0).integers(0, 49152, (2, 24)))
    seen: list[weakref.ref] = []
    alive_at: list[list[bool]] = []

    def step(i, layer, run, hidden):
        alive_at.append([r() is not None for r in seen])  # (this layer's input is passed in: it is held)
        out = run(hidden)
        seen.append(weakref.ref(hidden))
        return out

    out = stream.sweep(ids, step, "test", progress=False)
    # at layer i, the inputs of layers 0 .. i - 1 (the embedding first) are gone
    assert stream.n_layer >= 2 and len(alive_at) == stream.n_layer
    assert not any(any(a) for a in alive_at), alive_at
    h = stream.embed(ids)
    for _, _, run in stream.layers(h.shape[1]):
        h = run(h)
    assert torch.equal(out, h)


def test_short_calibration_text_is_refused(tiny_model):
    with pytest.raises(McsharpError, match="tokens, 4096 are needed"):
        calibration_token_ids(tiny_model("qwen2moe"), "too short", n_seq=8, seq_len=512)


def test_self_calibration_is_deterministic_and_long_enough(tiny_model):
    """`--calib self`: text sampled from the model itself, the same for the same seed, never cut short."""
    from mcsharp_gguf.model.calibration import self_generated_text

    model_dir = tiny_model("qwen2moe")
    text = self_generated_text(model_dir, 320)
    assert text == self_generated_text(model_dir, 320)
    assert text != self_generated_text(model_dir, 320, seed=1)
    ids = calibration_token_ids(model_dir, text, 2, 128)
    assert ids.shape == (2, 128)
