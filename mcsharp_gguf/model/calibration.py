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
    cfg = cfg.get("text_config", cfg)
    n_expert = cfg.get("num_experts") or cfg.get("num_local_experts") or cfg.get("n_routed_experts")
    top_k = cfg.get("num_experts_per_tok")
    if not n_expert or not top_k:
        return MIN_CALIB_SEQS
    need = 2 * int(cfg["hidden_size"]) * int(n_expert) / int(top_k)
    return int(min(max(math.ceil(need / recipe.calib_len), MIN_CALIB_SEQS), MAX_CALIB_SEQS))


def calibration_ids(recipe: Recipe, model_dir: str | Path) -> torch.Tensor:
    """The recipe's calibration token ids, (calibration_seqs, calib_len): the built-in text (Python's own
    documentation, streamed; never the held-out text `eval` scores), a text file, or 'self' (text sampled from
    the model itself; loads the whole model)."""
    n_seq = calibration_seqs(recipe, model_dir)
    n = n_seq * recipe.calib_len
    if recipe.calib == "builtin":
        text = calibration_text(min(calibration_text_limit(), n * 6))  # ~4 characters a token, with room
    elif recipe.calib == "self":
        text = self_generated_text(model_dir, n * 2)
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
