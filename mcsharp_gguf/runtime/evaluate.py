"""Perplexity and KL divergence of a GGUF (optionally against a base GGUF) over fixed-length chunks."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import McsharpError
from . import llama


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64."""
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def token_kld(base_logp: np.ndarray, logp: np.ndarray) -> np.ndarray:
    """KL(base ‖ model) per row from both log-softmaxes (clamped at 0 against rounding)."""
    return np.maximum((np.exp(base_logp) * (base_logp - logp)).sum(axis=-1), 0.0)


@dataclass
class ChunkScore:
    """Per-token quantities of one chunk (predictions for tokens 1..n-1)."""

    nll: np.ndarray
    kld: np.ndarray | None = None
    top1_same: np.ndarray | None = None


def score_chunk(logits: np.ndarray, tokens: np.ndarray, base_logits: np.ndarray | None = None) -> ChunkScore:
    """NLL of each next token, and KLD(base ‖ model) / top-1 agreement when a base is given."""
    tokens = np.asarray(tokens)
    lp = log_softmax(logits[:-1])
    nll = -lp[np.arange(len(tokens) - 1), tokens[1:]]
    if base_logits is None:
        return ChunkScore(nll)
    same = logits[:-1].argmax(-1) == base_logits[:-1].argmax(-1)
    return ChunkScore(nll, token_kld(log_softmax(base_logits[:-1]), lp), same)


@dataclass
class EvalResult:
    """What `mcsharp eval --json` prints."""

    ppl: float
    n_tokens: int
    n_chunks: int
    ctx: int
    kld_mean: float | None = None
    kld_p99: float | None = None
    top1_agree: float | None = None
    executed_slot_frac: float | None = None
    # KL per scored token, in order (for paired comparisons of two files on the same text; not in the JSON)
    kld_tokens: np.ndarray | None = field(default=None, repr=False, compare=False)

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None and k != "kld_tokens"}


def summarize(scores: Iterable[ChunkScore], ctx: int) -> EvalResult:
    """Aggregate chunk scores into PPL, mean / 99th-percentile KLD and top-1 agreement."""
    scores = list(scores)
    nll = np.concatenate([s.nll for s in scores])
    res = EvalResult(ppl=float(np.exp(nll.mean())), n_tokens=int(nll.size), n_chunks=len(scores), ctx=ctx)
    if scores and scores[0].kld is not None:
        kld = np.concatenate([s.kld for s in scores])
        res.kld_tokens = kld
        res.kld_mean = float(kld.mean())
        res.kld_p99 = float(np.percentile(kld, 99))
        res.top1_agree = float(np.concatenate([s.top1_same for s in scores]).mean())
    return res


def chunk_tokens(tokens: list[int], ctx: int, max_tokens: int | None = None) -> list[np.ndarray]:
    """Non-overlapping chunks of exactly ``ctx`` tokens (the remainder is dropped)."""
    if max_tokens:
        tokens = tokens[:max_tokens]
    n = len(tokens) // ctx
    if n == 0:
        raise McsharpError(f"the text has {len(tokens)} tokens, fewer than one chunk of {ctx}; "
                           "pass a longer --text file or a smaller --ctx")
    return [np.asarray(tokens[i * ctx:(i + 1) * ctx]) for i in range(n)]


def reference_logits(base_path: str | Path, text: str, ctx: int = 512, max_tokens: int | None = 4096,
                     progress: bool = True) -> list[np.ndarray]:
    """The base model's logits for every chunk of ``text`` (to score many variants against one reference)."""
    from tqdm import tqdm

    base = llama.load_model(base_path, n_ctx=ctx)
    chunks = chunk_tokens(base.tokenize(text.encode("utf-8"), add_bos=False, special=False), ctx, max_tokens)
    return [llama.logits_for(base, c) for c in tqdm(chunks, desc="reference chunks", disable=not progress)]


def evaluate_gguf(model_path: str | Path, text: str, base_path: str | Path | None = None, ctx: int = 512,
                  max_tokens: int | None = 4096, kv_overrides: dict | None = None, progress: bool = True,
                  base_logits: list[np.ndarray] | None = None) -> EvalResult:
    """PPL of ``model_path`` on ``text``; with ``base_path`` also KLD and top-1 agreement vs the base.

    Both models see the same token ids (from the evaluated model's tokenizer), one chunk at a time.
    ``base_logits`` (from :func:`reference_logits` on the same text and ctx) replaces ``base_path``.
    """
    from tqdm import tqdm

    llm = llama.load_model(model_path, n_ctx=ctx, kv_overrides=kv_overrides)
    tokens = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    chunks = chunk_tokens(tokens, ctx, max_tokens)
    base = llama.load_model(base_path, n_ctx=ctx) if base_path else None
    if base is not None and base.n_vocab() != llm.n_vocab():
        raise McsharpError(f"--base {base_path} has {base.n_vocab()} tokens in its vocabulary, {model_path} has "
                           f"{llm.n_vocab()}; compare files converted from the same model")
    if base_logits is not None and (len(base_logits) != len(chunks) or base_logits[0].shape[1] != llm.n_vocab()):
        raise McsharpError(f"the reference logits do not match {model_path}'s chunks or vocabulary")
    scores = []
    selected = executed = 0
    for i, chunk in enumerate(tqdm(chunks, desc="eval chunks", unit="chunk", disable=not progress)):
        llama.reset_slot_counter()
        logits = llama.logits_for(llm, chunk)
        sel, exe = llama.read_slot_counter()
        selected, executed = selected + sel, executed + exe
        ref = llama.logits_for(base, chunk) if base is not None else None
        scores.append(score_chunk(logits, chunk, base_logits[i] if base_logits is not None else ref))
    res = summarize(scores, ctx)
    if selected:
        res.executed_slot_frac = executed / selected
    return res
