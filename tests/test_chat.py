"""`mcsharp chat`: one non-interactive turn and an interactive session through the chat template."""

from __future__ import annotations

import subprocess
import sys

from mcsharp_gguf.chat import interactive, open_chat_model


def test_prompt_turn_via_cli(tiny_gguf):
    res = subprocess.run([sys.executable, "-m", "mcsharp_gguf.cli", "chat", str(tiny_gguf("qwen2moe", "f16")),
                          "--prompt", "Hello", "--max-tokens", "8"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip()


def test_interactive_loop_keeps_history(tiny_gguf):
    llm = open_chat_model(tiny_gguf("qwen2moe", "f16"), n_ctx=512)
    inputs = iter(["first question", "second question", ""])
    out: list[str] = []
    interactive(llm, read=lambda _: next(inputs), write=out.append, max_tokens=4)
    assert len(out) == 2 and all(s.startswith("model> ") for s in out)
