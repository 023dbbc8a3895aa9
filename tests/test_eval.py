"""`mcsharp eval`: PPL against an independent computation, KLD of a file against itself is 0."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import log_softmax

from mcsharp_gguf.runtime import llama
from mcsharp_gguf.runtime.evaluate import chunk_tokens, evaluate_gguf
from mcsharp_gguf.text import heldout_text


@pytest.mark.slow  # the patched runtime
def test_ppl_matches_numpy_and_self_kld_is_zero(tiny_gguf):
    path = tiny_gguf("qwen2moe", "f32")
    text = heldout_text()[:6000]
    res = evaluate_gguf(path, text, base_path=path, ctx=128, max_tokens=512, progress=False)

    # Independent: same tokens, logits straight from the runtime, scipy's log-softmax.
    llm = llama.load_model(path, n_ctx=128)
    tokens = llm.tokenize(text.encode(), add_bos=False, special=False)
    nll = []
    for chunk in chunk_tokens(tokens, 128, 512):
        lp = log_softmax(llama.logits_for(llm, chunk).astype(np.float64), axis=-1)
        nll.append(-lp[np.arange(127), chunk[1:]])
    ppl = float(np.exp(np.concatenate(nll).mean()))

    assert res.n_chunks == 4 and res.n_tokens == 4 * 127
    assert abs(res.ppl - ppl) <= 1e-9 * ppl
    assert res.kld_mean == 0.0 and res.kld_p99 == 0.0
    assert res.top1_agree == 1.0


@pytest.mark.slow  # the patched runtime
def test_kld_detects_a_different_model(tiny_gguf):
    res = evaluate_gguf(tiny_gguf("qwen2moe", "f16"), heldout_text()[:3000], base_path=tiny_gguf("qwen2moe", "f32"),
                        ctx=128, max_tokens=256, progress=False)
    assert 0.0 < res.kld_mean < 0.05
    assert res.kld_p99 > 0.0


def test_token_kld_matches_scipy_entropy():
    from scipy.stats import entropy

    from mcsharp_gguf.runtime.evaluate import token_kld

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 40)), rng.normal(size=(5, 40))
    got = token_kld(log_softmax(a, axis=-1), log_softmax(b, axis=-1))
    want = [entropy(np.exp(log_softmax(x)), np.exp(log_softmax(y))) for x, y in zip(a, b, strict=True)]
    np.testing.assert_allclose(got, want, rtol=1e-10)
    assert token_kld(log_softmax(a, axis=-1), log_softmax(a, axis=-1)).max() == 0.0
