"""Offline English text: the stdlib's pydoc topics, split into disjoint calibration and held-out ranges."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from .errors import McsharpError

# The corpus is ~465K characters; the last HELDOUT_CHARS are never used for calibration.
HELDOUT_CHARS = 40_000


@lru_cache(maxsize=1)
def pydoc_corpus() -> str:
    """All pydoc topics, in sorted key order (deterministic)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k].strip() for k in sorted(topics))


def calibration_text(n_chars: int = 60_000, offset: int = 0) -> str:
    """``n_chars`` of calibration text from the start of the corpus (never overlaps the held-out range)."""
    corpus = pydoc_corpus()
    limit = len(corpus) - HELDOUT_CHARS
    if offset + n_chars > limit:
        raise McsharpError(f"calibration range {offset}+{n_chars} overlaps the held-out text (max {limit} chars)")
    return corpus[offset: offset + n_chars]


def calibration_text_limit() -> int:
    """How many characters of calibration text there are (everything before the held-out range)."""
    return len(pydoc_corpus()) - HELDOUT_CHARS


def heldout_text() -> str:
    """The held-out evaluation text (last HELDOUT_CHARS of the corpus)."""
    return pydoc_corpus()[-HELDOUT_CHARS:]


def read_text_file(path: str | Path, what: str = "--text") -> str:
    """Read a UTF-8 text file, refusing a missing or empty one with a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise McsharpError(f"{what} file {path} does not exist; pass a UTF-8 text file")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise McsharpError(f"{what} file {path} is empty; pass a file with some text in it")
    bad = text.count("\ufffd")
    if bad > 0.01 * len(text):  # a few stray bytes are replaced; a binary or other-encoding file is refused
        raise McsharpError(f"{what} file {path} is not UTF-8 text ({bad / len(text):.0%} of it does not decode); "
                           "pass a UTF-8 text file")
    return text
