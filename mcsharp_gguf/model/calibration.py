"""Calibration tokens: the recipe's text (the built-in text, a file, or text sampled from the model itself) cut
into consecutive windows of token ids."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import McsharpError
from ..text import calibration_text, calibration_text_limit, read_text_file

if TYPE_CHECKING:  # used in annotations only; no run-time import against the pipeline's direction
    from ..recipe import Recipe


def calibration_ids(recipe: Recipe, model_dir: str | Path) -> torch.Tensor:
    """The recipe's calibration token ids, (calib_seqs, calib_len): the built-in text (Python's own
    documentation, streamed; never the held-out text `eval` scores), a text file, or 'self' (text sampled from
    the model itself; loads the whole model)."""
    n = recipe.calib_seqs * recipe.calib_len
    if recipe.calib == "builtin":
        text = calibration_text(min(calibration_text_limit(), n * 6))  # ~4 characters a token, with room
    elif recipe.calib == "self":
        text = self_generated_text(model_dir, n * 2)
    else:
        text = read_text_file(recipe.calib, what="--calib")
    return calibration_token_ids(model_dir, text, recipe.calib_seqs, recipe.calib_len)


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


def self_generated_text(model_dir: str | Path, n_tokens: int, prompts: tuple[str, ...] | None = None,
                        seed: int = 0) -> str:
    """Calibration text sampled from the model itself (``--calib self``), deterministic for ``seed``."""
    from transformers import AutoModelForCausalLM

    prompts = prompts or ("The", "In this chapter we", "def main():", "Once upon a time", "The results show")
    tok = _tokenizer(Path(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    torch.manual_seed(seed)
    per = max(16, n_tokens // len(prompts))
    pieces = []
    with torch.no_grad():
        for p in prompts:
            ids = tok(p, return_tensors="pt", add_special_tokens=False)["input_ids"]
            # min_new_tokens: an early end-of-text must not leave the calibration short
            out = model.generate(ids, max_new_tokens=per, min_new_tokens=per, do_sample=True, top_p=0.95,
                                 temperature=1.0)
            pieces.append(tok.decode(out[0], skip_special_tokens=True))
    return "\n\n".join(pieces)
