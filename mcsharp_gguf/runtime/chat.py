"""Chat with a GGUF through its own chat template (llama-cpp-python reads it from the file)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from . import llama


def open_chat_model(path: str | Path, n_ctx: int = 2048, kv_overrides: dict | None = None):
    return llama.load_model(path, n_ctx=n_ctx, logits_all=False, kv_overrides=kv_overrides)


def reply(llm, messages: list[dict], max_tokens: int = 128, temperature: float = 0.0) -> str:
    """One assistant turn for ``messages`` (greedy by default, so a turn is reproducible)."""
    out = llm.create_chat_completion(messages=messages, max_tokens=max_tokens, temperature=temperature,
                                     seed=0)
    return out["choices"][0]["message"]["content"] or ""


def interactive(llm, read: Callable[[str], str] = input, write: Callable[[str], None] = print,
                max_tokens: int = 256) -> None:
    """Read-eval-print chat loop; an empty line, EOF or /exit ends it."""
    messages: list[dict] = []
    while True:
        try:
            line = read("you> ")
        except EOFError:
            break
        if not line.strip() or line.strip() == "/exit":
            break
        messages.append({"role": "user", "content": line})
        answer = reply(llm, messages, max_tokens=max_tokens, temperature=0.7)
        messages.append({"role": "assistant", "content": answer})
        write(f"model> {answer}")
