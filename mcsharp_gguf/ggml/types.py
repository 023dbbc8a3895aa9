"""The ggml types MC# writes: one small table per type (block size, sub-block size, integer levels, whether blocks
carry an additive min, quantised sub-scale width) and the sizes that follow from it.

Layouts were derived from ggml-common.h / ggml-quants.c (pinned llama.cpp); nothing is copied from there.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf

from ..errors import McsharpError

QUANT_TYPES: tuple[str, ...] = (
    "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q1_0", "Q2_0",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS",
)

QK_K = 256
KVALUES_IQ4NL = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


@dataclass(frozen=True)
class _Spec:
    """Static description of one ggml type: dequantised value = scale[sub] * levels[code] + offset[sub]."""

    block: int  # elements per packed ggml block (super-block for K-quants)
    sub: int  # elements sharing one effective scale/offset
    levels: tuple[int, ...]  # code -> integer multiplier, ascending
    asym: bool  # blocks carry an additive min (Q4_1, Q5_1, Q2_K, Q4_K, Q5_K)
    sub_bits: int = 0  # K-quant/IQ4_XS quantised sub-block scale width (0: scale is plain fp16)


def _rng(lo: int, hi: int) -> tuple[int, ...]:
    return tuple(range(lo, hi + 1))


_SPECS: dict[str, _Spec] = {
    "Q8_0": _Spec(32, 32, _rng(-128, 127), False),
    "Q4_0": _Spec(32, 32, _rng(-8, 7), False),
    "Q4_1": _Spec(32, 32, _rng(0, 15), True),
    "Q5_0": _Spec(32, 32, _rng(-16, 15), False),
    "Q5_1": _Spec(32, 32, _rng(0, 31), True),
    "Q1_0": _Spec(128, 128, (-1, 1), False),
    "Q2_0": _Spec(64, 64, _rng(-1, 2), False),
    "Q2_K": _Spec(QK_K, 16, _rng(0, 3), True, 4),
    "Q3_K": _Spec(QK_K, 16, _rng(-4, 3), False, 6),
    "Q4_K": _Spec(QK_K, 32, _rng(0, 15), True, 6),
    "Q5_K": _Spec(QK_K, 32, _rng(0, 31), True, 6),
    "Q6_K": _Spec(QK_K, 16, _rng(-32, 31), False, 8),
    "IQ4_NL": _Spec(32, 32, KVALUES_IQ4NL, False),
    "IQ4_XS": _Spec(QK_K, 32, KVALUES_IQ4NL, False, 6),
}
assert tuple(_SPECS) == QUANT_TYPES


def _spec(type_name: str) -> _Spec:
    try:
        return _SPECS[type_name]
    except KeyError:
        raise McsharpError(f"unknown quant type {type_name!r}: use one of {', '.join(QUANT_TYPES)}") from None


def ggml_type(type_name: str) -> gguf.GGMLQuantizationType:
    """The gguf/ggml enum member of a type name (same numbering as ``enum ggml_type``)."""
    _spec(type_name)
    return gguf.GGMLQuantizationType[type_name]


def block_size(type_name: str) -> int:
    """Elements per ggml block; a row length must be a multiple of it."""
    return _spec(type_name).block


def type_size(type_name: str) -> int:
    """Bytes per ggml block."""
    return gguf.GGML_QUANT_SIZES[ggml_type(type_name)][1]


def bits_per_weight(type_name: str) -> float:
    """True storage cost in bits per weight, scales and mins included (e.g. Q4_K: 144·8/256 = 4.5)."""
    return 8.0 * type_size(type_name) / block_size(type_name)


def tensor_bytes(type_name: str, n_elements: int) -> int:
    """Bytes of ``n_elements`` weights stored as ``type_name`` (whole blocks; rows must fit them)."""
    return n_elements // block_size(type_name) * type_size(type_name)


def check_shape(shape: tuple[int, ...], type_name: str) -> None:
    """Raise a one-line McsharpError unless a (rows, cols) matrix can be stored as ``type_name``."""
    bs = block_size(type_name)
    if len(shape) != 2 or shape[1] % bs != 0:
        fits = [t for t in QUANT_TYPES if len(shape) == 2 and shape[1] % block_size(t) == 0]
        raise McsharpError(
            f"cannot store a {tuple(shape)} matrix as {type_name}: the row length (last dim) must be a multiple of "
            f"its block size {bs}; pick a type with a smaller block ({', '.join(fits) or 'none fits'})"
        )


def storable_type(type_name: str, row_len: int) -> str:
    """``type_name`` if a row of ``row_len`` fits its blocks, else the fitting type of nearest true bpw
    (ties go to the larger type, so a fallback never silently loses precision)."""
    if row_len % block_size(type_name) == 0:
        return type_name
    want = bits_per_weight(type_name)
    fits = [t for t in QUANT_TYPES if row_len % block_size(t) == 0]
    if not fits:
        raise McsharpError(f"no ggml quant type fits rows of {row_len} elements; such tensors must stay F16")
    return min(fits, key=lambda t: (abs(bits_per_weight(t) - want), -bits_per_weight(t)))
