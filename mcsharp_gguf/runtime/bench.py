"""Prompt-processing and decode speed of a GGUF under one or more runtime configurations, side by side.

Every configuration is a set of ``kv_overrides`` on the same file (e.g. OTP on vs off); all are loaded in
this process and timed in interleaved rounds, so a ratio between them is measured under the same load. The
tokens are consecutive tokens of the built-in held-out text.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import McsharpError
from ..text import heldout_text
from . import llama


@dataclass
class BenchResult:
    """What `mcsharp bench --json` prints for one configuration (best of the rounds)."""

    name: str
    prompt_tokens: int
    decode_tokens: int
    prefill_tok_s: float
    decode_tok_s: float
    executed_slot_frac: float | None

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def _tokens(llm, n: int, offset: int = 0) -> list[int]:
    """``n`` tokens of the built-in held-out text (real text: routers behave differently on random ids)."""
    ids = llm.tokenize(heldout_text().encode("utf-8"), add_bos=False, special=False)
    if len(ids) < offset + n:
        raise McsharpError(f"the held-out text has {len(ids)} tokens; ask for at most {len(ids) - offset}")
    return [int(t) for t in ids[offset:offset + n]]


def _time_prefill(llm, toks: list[int]) -> float:
    llm.reset()
    llm._ctx.kv_cache_clear()
    t0 = time.perf_counter()
    llm.eval(toks)
    return time.perf_counter() - t0


def _time_decode(llm, toks: list[int]) -> float:
    llm.reset()
    llm._ctx.kv_cache_clear()
    llm.eval(toks[:1])
    t0 = time.perf_counter()
    for t in toks[1:]:
        llm.eval([t])
    return time.perf_counter() - t0


def bench_gguf(path: str | Path, configs: dict[str, dict], prompt_tokens: int = 256, decode_tokens: int = 64,
               rounds: int = 3, n_threads: int | None = None, progress: bool = True) -> list[BenchResult]:
    """Best-of-``rounds`` prefill and decode tok/s of ``path`` under each named kv_overrides config."""
    from tqdm import tqdm

    llms = {name: llama.load_model(path, n_ctx=max(512, prompt_tokens + 8), logits_all=False,
                                     n_threads=n_threads, kv_overrides=kv or None) for name, kv in configs.items()}
    first = next(iter(llms.values()))
    prompt, decode = _tokens(first, prompt_tokens), _tokens(first, decode_tokens + 1, offset=prompt_tokens)
    best = {name: [float("inf"), float("inf")] for name in llms}
    fracs: dict[str, float | None] = {}
    for name, llm in llms.items():  # warm-up, and the executed fraction on the benchmark prompt
        llama.reset_slot_counter()
        _time_prefill(llm, prompt)
        sel, exe = llama.read_slot_counter()
        fracs[name] = exe / sel if sel else None
    for _ in tqdm(range(rounds), desc="bench rounds", unit="round", disable=not progress):
        for name, llm in llms.items():
            best[name][0] = min(best[name][0], _time_prefill(llm, prompt))
            best[name][1] = min(best[name][1], _time_decode(llm, decode))
    return [BenchResult(name, prompt_tokens, decode_tokens, prompt_tokens / b[0], decode_tokens / b[1], fracs[name])
            for name, b in best.items()]
