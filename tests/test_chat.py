"""`mcsharp chat`: one non-interactive turn and an interactive session through the chat template."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from mcsharp_gguf.cli import cli
from mcsharp_gguf.runtime import llama
from mcsharp_gguf.runtime.chat import interactive, open_chat_model, reply

pytestmark = pytest.mark.slow  # the patched llama.cpp runtime and tiny GGUFs (pinned converter, cached tokenizer)

MAX_TOKENS = 8


def _greedy_continuation(path, prompt: str, max_tokens: int) -> tuple[str, list[int]]:
    """Independent of the chat path: tokenize ``prompt`` (special tokens parsed, no BOS added: the template
    carries its own markers), then take the argmax of fresh full-sequence logits one token at a time until an
    end-of-generation token; the text of the generated tokens only."""
    llama_cpp = llama.llama_cpp_module()
    llm = llama.load_model(path, n_ctx=256)
    ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    gen: list[int] = []
    for _ in range(max_tokens):
        nxt = int(llama.logits_for(llm, ids + gen)[-1].argmax())
        if llama_cpp.llama_vocab_is_eog(llm._model.vocab, nxt):
            break
        gen.append(nxt)
    return llm.detokenize(gen).decode("utf-8", errors="ignore"), gen


def test_reply_is_the_greedy_continuation_of_the_templated_prompt(tiny_model, tiny_gguf):
    """A turn renders the messages with the GGUF's own chat template (generation prompt included), decodes
    greedily and returns only the new tokens' text: equal to a continuation computed without the chat path."""
    from transformers import AutoTokenizer

    path = tiny_gguf("qwen2moe", "f32")
    tok = AutoTokenizer.from_pretrained(tiny_model("qwen2moe"))
    messages = [{"role": "user", "content": "Hello"}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nHello<|im_end|>\n" in prompt and prompt.endswith("<|im_start|>assistant\n")

    llm = open_chat_model(path, n_ctx=512)
    assert llm.metadata["tokenizer.chat_template"] == tok.chat_template  # the converter kept the template
    got = reply(llm, messages, max_tokens=MAX_TOKENS)
    want, gen = _greedy_continuation(path, prompt, MAX_TOKENS)
    assert gen, "the model ended the turn at once: the comparison would be vacuous"
    assert got == want
    assert reply(llm, messages, max_tokens=MAX_TOKENS) == got  # greedy: the same turn twice

    res = CliRunner().invoke(cli, ["chat", str(path), "--prompt", "Hello", "--max-tokens", str(MAX_TOKENS)],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert res.stdout == got + "\n"


class _Recorder:
    """Passes chat completions through to the model and keeps the messages each turn was asked with."""

    def __init__(self, llm):
        self.llm, self.asked = llm, []

    def create_chat_completion(self, messages, **kw):
        self.asked.append([dict(m) for m in messages])
        return self.llm.create_chat_completion(messages=messages, **kw)


def test_interactive_loop_keeps_history(tiny_gguf):
    llm = open_chat_model(tiny_gguf("qwen2moe", "f16"), n_ctx=512)

    def session() -> tuple[list[str], list[list[dict]]]:
        inputs = iter(["first question", "second question", ""])
        out: list[str] = []
        rec = _Recorder(llm)
        interactive(rec, read=lambda _: next(inputs), write=out.append, max_tokens=4)
        return out, rec.asked

    out, asked = session()
    assert len(out) == 2 and all(s.startswith("model> ") for s in out)
    first = out[0].removeprefix("model> ")
    # the second turn is asked with the whole conversation so far, the first answer as the assistant's
    assert asked == [[{"role": "user", "content": "first question"}],
                     [{"role": "user", "content": "first question"}, {"role": "assistant", "content": first},
                      {"role": "user", "content": "second question"}]]
    assert session() == (out, asked)  # sampled (temperature 0.7) with a fixed seed: the same session again
