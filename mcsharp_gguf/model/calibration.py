"""Calibration tokens: the recipe's text (the built-in text, a file, or text sampled from the model itself) cut
into consecutive windows of token ids."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import McsharpError
from ..text import calibration_text, calibration_text_limit, read_text_file
from .checkpoint import moe_counts

if TYPE_CHECKING:  # used in annotations only; no run-time import against the pipeline's direction
    from ..recipe import Recipe


# Default calibration size (calibration_seqs): at least today's fixture default, at most 4× it (the time budget: the
# forwards, the reverse pass and the Hessians grow with the tokens; docs/scale.md measures it)
MIN_CALIB_SEQS, MAX_CALIB_SEQS = 8, 32


def calibration_seqs(recipe: Recipe, model_dir: str | Path) -> int:
    """The recipe's number of calibration sequences: as given, or scaled to the model so that the median expert
    sees twice the hidden size in tokens (2 · d_model · n_expert / top_k tokens: every token reaches top_k of
    n_expert experts), within [MIN_CALIB_SEQS, MAX_CALIB_SEQS]. An expert that still sees fewer tokens than a
    projection's input width borrows its layer's Hessian (quant.experts.expert_hessians)."""
    if recipe.calib_seqs is not None:
        return recipe.calib_seqs
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    n_expert, top_k = moe_counts(cfg)
    if not n_expert or not top_k:
        return MIN_CALIB_SEQS
    need = 2 * int(cfg.get("text_config", cfg)["hidden_size"]) * int(n_expert) / int(top_k)
    return int(min(max(math.ceil(need / recipe.calib_len), MIN_CALIB_SEQS), MAX_CALIB_SEQS))


def calibration_ids(recipe: Recipe, model_dir: str | Path, work_dir: str | Path | None = None) -> torch.Tensor:
    """The recipe's calibration token ids, (calibration_seqs, calib_len): the built-in text (Python's own
    documentation, streamed; never the held-out text `eval` scores), a text file, or 'self' (text sampled from
    the model itself by the llama.cpp runtime, from a temporary Q8_0 file in ``work_dir``:
    self_generated_text)."""
    n_seq = calibration_seqs(recipe, model_dir)
    n = n_seq * recipe.calib_len
    if recipe.calib == "builtin":
        text = calibration_text(min(calibration_text_limit(), n * 6))  # ~4 characters a token, with room
    elif recipe.calib == "self":  # the tokenizer may cut the sampled text slightly differently: a margin
        text = self_generated_text(model_dir, int(n * 1.05) + 64, work_dir=work_dir)
    else:
        text = read_text_file(recipe.calib, what="--calib")
    return calibration_token_ids(model_dir, text, n_seq, recipe.calib_len)


def _tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def calibration_token_ids(model_dir: str | Path, text: str, n_seq: int, seq_len: int) -> torch.Tensor:
    """``n_seq`` consecutive windows of ``seq_len`` tokens from ``text`` (error if the text is too short)."""
    ids = _tokenizer(Path(model_dir))(text, add_special_tokens=False)["input_ids"]
    need = n_seq * seq_len
    if len(ids) < need:
        raise McsharpError(f"calibration text has {len(ids)} tokens, {need} are needed ({n_seq} × {seq_len}); "
                           "pass a longer --calib file or fewer/shorter sequences")
    return torch.tensor(ids[:need]).reshape(n_seq, seq_len)


SELF_PIECE = 1024  # tokens per sampled piece of --calib self: a short context keeps each token cheap


def self_generated_text(model_dir: str | Path, n_tokens: int, prompts: tuple[str, ...] | None = None,
                        seed: int = 0, work_dir: str | Path | None = None) -> str:
    """Calibration text sampled from the model itself (``--calib self``): at least ``n_tokens`` tokens in pieces
    of at most SELF_PIECE, each continuing one of ``prompts`` in turn, deterministic for ``seed``.

    The checkpoint is streamed tensor by tensor into a temporary Q8_0 GGUF (in ``work_dir``, else the system's
    temporary directory) and sampled by the llama.cpp runtime, which maps the file and reads the weights the
    tokens use: the model is never in this process's memory. End-of-text is masked, so pieces rarely end early."""
    import tempfile

    from ..gguf.convert import convert_checkpoint
    from ..runtime.llama import load_model

    prompts = prompts or ("The", "In this chapter we", "def main():", "Once upon a time", "The results show")
    n_pieces = max(1, math.ceil(n_tokens / SELF_PIECE))
    per = math.ceil(n_tokens / n_pieces)
    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="calib-self-") as tmp:
        gguf = convert_checkpoint(model_dir, Path(tmp) / "q8_0.gguf", outtype="q8_0")
        llm = load_model(gguf, n_ctx=per + 64, logits_all=False, n_threads=torch.get_num_threads())
        pieces, sampled, i = [], 0, 0
        while sampled < n_tokens:  # another end-of-generation token may still end a piece early: sample on
            p = prompts[i % len(prompts)]
            out = llm.create_completion(p, max_tokens=per, temperature=1.0, top_p=0.95, top_k=0,
                                        seed=seed * 100_003 + i, logit_bias={llm.token_eos(): -1e9})
            pieces.append(p + out["choices"][0]["text"])
            sampled, i = sampled + max(1, out["usage"]["completion_tokens"]), i + 1
        llm.close()
    return "\n\n".join(pieces)
