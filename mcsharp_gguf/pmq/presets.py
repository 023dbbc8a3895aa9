"""The ggml type ``llama-quantize`` gives every tensor of a model for a preset (ftype), without running it.

``mcsharp convert --preset Q3_K_M`` means "spend the bytes llama-quantize would spend on this model for Q3_K_M".
This module re-implements, in Python and from names and shapes alone, the type choice of the pinned llama.cpp's
``src/llama-quant.cpp``:

* the ftype -> default type table (``llama_ftype_get_default_type``);
* which tensors are quantized at all (``tensor_allows_quantization``: 2-D/3-D tensors whose name ends in
  ``weight``, minus norms, routers, ...); the others keep their source type;
* the tensor categories (substring tests on the name) and the per-category / per-ftype / per-layer mixture rules
  (``llama_tensor_get_type_impl``): ``use_more_bits``, the ``n_attention_wv`` / ``n_ffn_down`` counters, the
  ``n_expert == 8`` and ``n_gqa >= 4`` bumps, layer numbers parsed from ``blk.N.`` for expert models, the falcon
  and glm5-next special cases;
* the fallback for rows not divisible by the block size (``tensor_type_fallback``: a 256-block type falls back
  to a 32-block one, then to F16).

Tensors are visited in llama.cpp's order (layer number, then name), because the counters depend on it. The model
facts llama.cpp reads from the GGUF metadata are derived from the inventory: ``n_layer`` = highest ``blk.N`` + 1,
``n_expert`` = leading dim of the ``*_exps`` tensors, ``n_gqa`` = rows of ``blk.0.attn_q`` / rows of
``blk.0.attn_k`` (deepseek2 with split MLA tensors: the converter writes ``n_head_kv = 1``, so ``n_gqa = n_head``;
a legacy deepseek2 file with only ``attn_kv_b`` is taken as ``n_head_kv = n_head``), tied embeddings = no
``output.weight``, and llama's ``LLM_TYPE_70B`` (80 layers, GQA, not 8 experts).

The modelled run is ``llama-quantize [--imatrix F] in.gguf out.gguf PRESET`` with no ``--pure``, no
``--output-tensor-type`` / ``--token-embedding-type`` / ``--tensor-type`` overrides and no layer pruning. An
imatrix changes some choices (IQ3_XXS: attn_v and ffn_down; IQ4_NL / IQ4_XS: the first eighth of ffn_down;
Q4_0 / Q5_0: the first eighth of ffn_down becomes Q4_1 / Q5_1), so ``imatrix`` defaults to what a normal run does:
given for the IQ presets (the low-bit ones require it), absent for the others.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..errors import McsharpError
from ..llama_src import import_gguf

TensorInventory = dict[str, tuple[tuple[int, ...], str]]


@dataclass(frozen=True)
class Preset:
    """One ``llama-quantize`` ftype: its name and the ggml type most tensors get (the mixture rules bump some)."""

    name: str
    default_type: str

    @property
    def imatrix_by_default(self) -> bool:
        """Whether the modelled run passes ``--imatrix`` (the IQ presets)."""
        return self.name.startswith("IQ")


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("Q2_K", "Q2_K"), Preset("Q2_K_S", "Q2_K"),
    Preset("Q3_K_S", "Q3_K"), Preset("Q3_K_M", "Q3_K"), Preset("Q3_K_L", "Q3_K"),
    Preset("Q4_K_S", "Q4_K"), Preset("Q4_K_M", "Q4_K"),
    Preset("Q5_K_S", "Q5_K"), Preset("Q5_K_M", "Q5_K"),
    Preset("Q6_K", "Q6_K"), Preset("Q8_0", "Q8_0"),
    Preset("Q4_0", "Q4_0"), Preset("Q4_1", "Q4_1"), Preset("Q5_0", "Q5_0"), Preset("Q5_1", "Q5_1"),
    Preset("IQ1_S", "IQ1_S"), Preset("IQ1_M", "IQ1_M"),
    Preset("IQ2_XXS", "IQ2_XXS"), Preset("IQ2_XS", "IQ2_XS"), Preset("IQ2_S", "IQ2_XS"), Preset("IQ2_M", "IQ2_S"),
    Preset("IQ3_XXS", "IQ3_XXS"), Preset("IQ3_XS", "IQ3_S"), Preset("IQ3_S", "IQ3_S"), Preset("IQ3_M", "IQ3_S"),
    Preset("IQ4_NL", "IQ4_NL"), Preset("IQ4_XS", "IQ4_XS"),
    Preset("MXFP4_MOE", "MXFP4"),
)}
"""Preset name as llama-quantize spells it -> :class:`Preset`. ``Q3_K`` / ``Q4_K`` / ``Q5_K`` are accepted as
llama-quantize's aliases of the ``_M`` presets, and names are matched case-insensitively as llama-quantize does."""

_ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}

# ftypes whose non-output tensors take the "very low bit" branch of llama_tensor_get_type_impl
_IQ_LOW = frozenset({"IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M"})
# a 256-block target whose row length does not fit falls back to (then to F16 if that does not fit either)
_FALLBACK = {
    "IQ1_S": "IQ4_NL", "IQ1_M": "IQ4_NL", "IQ2_XXS": "IQ4_NL", "IQ2_XS": "IQ4_NL", "IQ2_S": "IQ4_NL",
    "IQ3_XXS": "IQ4_NL", "IQ3_S": "IQ4_NL", "IQ4_XS": "IQ4_NL",
    "Q2_0": "Q4_0", "Q2_K": "Q4_0", "Q3_K": "Q4_0", "TQ1_0": "Q4_0", "TQ2_0": "Q4_0",
    "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0",
}
# substrings that keep a tensor unquantized (tensor_allows_quantization), for every arch
_KEEP_SUBSTRINGS = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel", "per_layer_model_proj",
    "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight", "indexer.q_proj.weight",
    "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight", "time_mix_w2.weight",
    "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight", "time_mix_a0.weight", "time_mix_a1.weight",
    "time_mix_a2.weight", "time_mix_g1.weight", "time_mix_g2.weight", "time_mix_decay_w1.weight",
    "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight", "attn_rel_b.weight",
    ".position_embd", "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger",
    "a.rvq.codebook", "mm.a.code_embd",
)
_KEEP_SUBSTRINGS_GLM5_NEXT = (
    "hc_", "indexer.attn_q_b", "indexer.attn_k", "indexer.proj", "indexer_compressor_gate",
    "indexer_compressor_ape", "ssm_f_a.weight", "ssm_f_b.weight", "ssm_g_a.weight", "ssm_g_b.weight",
    "ssm_beta.weight", "attn_kv_a_mqa.weight", "attn_k_b.weight", "attn_v_b.weight",
)
_KEEP_NAMES = frozenset({"position_embd.weight", "token_types.weight"})  # LLM_TENSOR_POS_EMBD / TOKEN_TYPES
# name substring -> category, first match wins (tensor_get_category); exact names are tested before
_CATEGORIES = (
    ("attn_qkv.weight", "attn_qkv"), ("attn_kv_b.weight", "attn_kv_b"), ("attn_v.weight", "attn_v"),
    ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
    ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down"),
)
_ATTN_V_LIKE = frozenset({"attn_v", "attn_qkv", "attn_kv_b"})
# attn_output of an 8-expert model becomes Q5_K for these ftypes
_ATTN_OUT_8X = frozenset({"Q2_K", "IQ3_XS", "IQ3_XXS", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M", "IQ3_S",
                          "IQ3_M", "IQ4_XS"})
_LAYER_RE = re.compile(r"blk\.\s*([+-]?\d+)\.?")
_70B_ARCHS = frozenset({"llama", "qwen2", "olmo", "deci"})


def resolve_preset(preset: str) -> Preset:
    """The :class:`Preset` called ``preset`` (case-insensitive, llama-quantize's aliases accepted); a one-line
    :class:`McsharpError` listing the valid presets otherwise."""
    key = str(preset).upper()
    key = _ALIASES.get(key, key)
    if key not in PRESETS:
        raise McsharpError(f"unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    return PRESETS[key]


def _gguf():
    return import_gguf()


def _block(type_name: str) -> tuple[int, int]:
    """(elements per block, bytes per block) of a ggml type name."""
    gguf = _gguf()
    try:
        return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    except KeyError:
        raise McsharpError(f"unknown ggml type {type_name!r}") from None


def _layer(name: str) -> int | None:
    """``N`` of a ``blk.N.`` name (``sscanf(name, "blk.%d.")``), else None."""
    m = _LAYER_RE.match(name)
    return int(m.group(1)) if m else None


def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for sub, cat in _CATEGORIES:
        if sub in name:
            return cat
    return "other"


def _n_dims(ne: tuple[int, ...]) -> int:
    """ggml_n_dims: trailing size-1 dims do not count; at least 1."""
    n = len(ne)
    while n > 1 and ne[n - 1] == 1:
        n -= 1
    return max(n, 1)


def _allows_quantization(name: str, ne: tuple[int, ...], arch: str) -> bool:
    """tensor_allows_quantization with llama-quantize's defaults (quantize_output_tensor, no only_copy)."""
    if _n_dims(ne) < 2:
        return False
    # rfind("weight") == size() - 6: also true for a 5-character name without "weight" (size_t wrap-around)
    if not (name.endswith("weight") or len(name) == 5):
        return False
    if name in _KEEP_NAMES or any(s in name for s in _KEEP_SUBSTRINGS):
        return False
    return not (arch == "glm5-next" and any(s in name for s in _KEEP_SUBSTRINGS_GLM5_NEXT))


@dataclass(frozen=True)
class _Model:
    """The hparams llama_tensor_get_type_impl reads, derived from the inventory."""

    arch: str
    n_layer: int  # n_layer_all (block_count)
    n_expert: int
    n_gqa: int
    is_70b: bool
    tied_embeddings: bool
    n_attention_wv: int


def _rows(tensors: TensorInventory, name: str) -> int | None:
    shape = tensors.get(name, ((),))[0]
    return int(shape[0]) if len(shape) >= 2 else None


def _model(tensors: TensorInventory, arch: str) -> _Model:
    layers = [i for i in map(_layer, tensors) if i is not None]
    n_layer = max(layers) + 1 if layers else 0
    n_expert = max((int(s[0]) for n, (s, _) in tensors.items() if "_exps" in n and len(s) == 3), default=0)
    q, k = _rows(tensors, "blk.0.attn_q.weight"), _rows(tensors, "blk.0.attn_k.weight")
    k_b = tensors.get("blk.0.attn_k_b.weight", ((),))[0]  # (n_head, kv_lora_rank, qk_nope) for split MLA
    if arch == "deepseek2" and len(k_b) == 3:
        n_gqa = int(k_b[0])  # MLA written as MQA: n_head_kv = 1
    elif q and k:
        n_gqa = q // k  # n_head / n_head_kv with equal q / k head sizes
    else:
        n_gqa = 1
    is_70b = arch in _70B_ARCHS and n_layer == 80 and (arch != "llama" or (n_expert != 8 and q != k))
    n_wv = sum(_category(n) in _ATTN_V_LIKE for n in tensors)
    return _Model(arch, n_layer, n_expert, n_gqa, is_70b, "output.weight" not in tensors, n_wv)


def _use_more_bits(i_layer: int, n_layer: int) -> bool:
    return i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2


@dataclass
class _State:
    """The quantize_state_impl counters, advanced in llama.cpp's tensor order."""

    i_attention_wv: int = 0
    i_ffn_down: int = 0
    i_ffn_gate: int = 0
    i_ffn_up: int = 0


def _layer_info(m: _Model, counter: int, name: str) -> tuple[int, int]:
    """(layer, n_layer) of an FFN tensor: the running counter, or for expert models the ``blk.N.`` number."""
    if max(1, m.n_expert) > 1:
        i = _layer(name)
        if i is None:
            raise McsharpError(f"cannot determine the layer of tensor {name!r} (expected a blk.N. prefix)")
        if not 0 <= i < m.n_layer:
            raise McsharpError(f"bad layer {i} for tensor {name!r}: must be in [0, {m.n_layer})")
        return i, m.n_layer
    return counter, m.n_layer


def _mixture_type(m: _Model, st: _State, new: str, name: str, ne: tuple[int, ...], ftype: str, cat: str,
                  imatrix: bool) -> str:
    """llama_tensor_get_type_impl: the preset's mixture rule for one quantizable tensor (before the fallback).

    (Long, with eight arguments: it follows llama.cpp's llama_tensor_get_type_impl branch for branch, so the two
    can be compared side by side.)
    """
    falcon = m.arch == "falcon"
    if m.arch == "glm5-next" and any(s in name for s in ("attn_q_a", "attn_q_b", "nextn.eh_proj")) \
            and new not in ("F32", "BF16", "F16"):
        return "Q8_0"
    if cat == "output" or (m.tied_embeddings and cat == "token_embd"):
        if ftype == "MXFP4_MOE" or falcon or ne[0] % _block(new)[0] != 0:
            return "Q8_0"
        if ftype in ("IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M"):
            return "Q5_K"
        return "Q6_K" if new != "Q8_0" else new
    if ftype == "MXFP4_MOE":
        expert_role = cat in ("ffn_up", "ffn_gate", "ffn_down")
        is_3d = len(ne) > 2 and ne[2] > 1
        return "MXFP4" if is_3d and (m.arch != "bailingmoe3" or expert_role) else "Q8_0"
    if cat == "token_embd":
        if ftype in ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M"):
            return "Q2_K"
        if ftype in ("IQ2_S", "IQ2_M", "IQ3_XXS"):
            return "IQ3_S"
        if ftype in ("TQ1_0", "TQ2_0", "Q2_0"):
            return "Q4_K"
        return new
    if ftype in _IQ_LOW:
        iq2_sm = ftype in ("IQ2_S", "IQ2_M")
        if cat in _ATTN_V_LIKE:
            if m.n_gqa >= 4 or m.n_expert >= 4:
                new = "Q4_K"
            else:
                new = "IQ3_S" if iq2_sm else "Q2_K"
            st.i_attention_wv += 1
        elif m.n_expert == 8 and cat == "attn_k":
            new = "Q4_K"
        elif cat == "ffn_down":
            if st.i_ffn_down < m.n_layer // 8:  # counts ffn_down tensors, not layers
                new = "IQ3_S" if iq2_sm else "Q2_K"
            st.i_ffn_down += 1
        elif cat == "attn_output":
            if m.n_expert == 8:
                new = "Q5_K"
            elif ftype in ("IQ1_S", "IQ1_M"):
                new = "IQ2_XXS"
            elif iq2_sm:
                new = "IQ3_S"
        return new
    if cat in _ATTN_V_LIKE:
        i, n = st.i_attention_wv, m.n_attention_wv
        if ftype == "Q2_K":
            new = "Q4_K" if m.n_gqa >= 4 else "Q3_K"
        elif ftype == "Q2_K_S" and m.n_gqa >= 4:
            new = "Q4_K"
        elif ftype == "IQ3_XXS":
            new = "Q4_K" if m.n_gqa >= 4 else "IQ3_XXS" if imatrix else "IQ3_S"
        elif ftype in ("IQ3_XS", "IQ3_S") and m.n_gqa >= 4:
            new = "Q4_K"
        elif ftype == "IQ3_M":
            new = "Q4_K"
        elif ftype == "Q3_K_M":
            new = "Q5_K" if i < 2 else "Q4_K"
        elif ftype == "Q3_K_L":
            new = "Q5_K"
        elif ftype in ("IQ4_NL", "IQ4_XS") and m.n_gqa >= 4:
            new = "Q5_K"
        elif ftype in ("Q4_K_M", "Q5_K_M") and _use_more_bits(i, n):
            new = "Q6_K"
        elif ftype == "Q4_K_S" and i < 4:
            new = "Q5_K"
        if m.is_70b and new in ("Q3_K", "Q4_K"):
            new = "Q5_K"
        if m.n_expert == 8:
            new = "Q8_0"
        st.i_attention_wv += 1
        return new
    if cat == "attn_k":
        if m.n_expert == 8:
            return "Q8_0"
        return {"IQ3_XS": "IQ3_XXS", "IQ3_XXS": "IQ2_S"}.get(ftype, new)
    if cat == "attn_q":
        return {"IQ3_XS": "IQ3_XXS", "IQ3_XXS": "IQ2_S"}.get(ftype, new)
    if cat == "ffn_down":
        i, n = _layer_info(m, st.i_ffn_down, name)
        if ftype == "Q2_K":
            new = "Q3_K"
        elif ftype == "Q2_K_S":
            if i < n // 8:
                new = "Q4_K"
        elif ftype == "IQ3_XXS" and not imatrix:
            new = "Q4_K" if i < n // 8 else "Q3_K"
        elif ftype == "Q3_K_M":
            new = "Q5_K" if i < n // 16 else "Q4_K" if not falcon or _use_more_bits(i, n) else "Q3_K"
        elif ftype == "IQ3_M" and (i < n // 8 or (m.n_expert == 8 and _use_more_bits(i, n))):
            new = "Q4_K"
        elif ftype == "Q3_K_L":
            new = "Q4_K" if falcon else "Q5_K"
        elif ftype == "Q4_K_M":
            if falcon:
                new = "Q6_K" if i < n // 16 else "Q5_K" if _use_more_bits(i, n) else "Q4_K"
            elif _use_more_bits(i, n):
                new = "Q6_K"
        elif i < n // 8 and ftype in ("IQ4_NL", "IQ4_XS") and not imatrix:
            new = "Q5_K"
        elif ftype == "Q5_K_M" and _use_more_bits(i, n):
            new = "Q6_K"
        elif ftype == "Q4_K_S" and not falcon and i < n // 8:
            new = "Q5_K"
        elif ftype in ("Q4_0", "Q5_0") and imatrix and i < n // 8:
            new = "Q4_1" if ftype == "Q4_0" else "Q5_1"
        st.i_ffn_down += 1
        return new
    if cat == "attn_output":
        if falcon:
            return "Q4_K" if ftype == "Q3_K_L" else new
        if m.n_expert == 8:
            return "Q5_K" if ftype in _ATTN_OUT_8X else new
        return {"Q2_K": "Q3_K", "IQ3_XXS": "IQ3_S", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K", "IQ3_M": "Q4_K"}.get(ftype, new)
    # (the attn_qkv rule of llama.cpp is unreachable: attn_qkv is attn_v-like and handled above)
    if cat in ("ffn_gate", "ffn_up"):
        counter = st.i_ffn_gate if cat == "ffn_gate" else st.i_ffn_up
        i, n = _layer_info(m, counter, name)
        if ftype == "IQ3_XS" and n // 8 <= i < 7 * n // 8:
            new = "IQ3_XXS"
        if cat == "ffn_gate":
            st.i_ffn_gate += 1
        else:
            st.i_ffn_up += 1
    return new


def _fallback(name: str, ne: tuple[int, ...], target: str) -> str:
    """tensor_type_fallback: a type whose block does not divide the row length -> a 32-block type -> F16."""
    qk = _block(target)[0]
    if ne[0] % qk == 0:
        return target
    if target in _FALLBACK:
        out = _FALLBACK[target]
    elif qk <= 32:
        out = target
    else:
        raise McsharpError(f"{name}: row length {ne[0]} does not fit {target} and llama.cpp defines no fallback")
    return out if ne[0] % _block(out)[0] == 0 else "F16"


def preset_types(tensors: TensorInventory, arch: str, preset: str, imatrix: bool | None = None) -> dict[str, str]:
    """The ggml type ``llama-quantize`` writes for every tensor of a model quantized with ``preset``.

    ``tensors``: GGUF tensor name -> (shape in numpy order as gguf-py's GGUFWriter records it, e.g.
    ``'blk.0.ffn_down_exps.weight': ((8, 768, 128), 'F16')`` = 8 experts of 768 rows of 128, ggml ne =
    (128, 768, 8); source ggml type name 'F16' / 'BF16' / 'F32'). ``arch``: llama.cpp arch name ('qwen2moe',
    'qwen3moe', 'llama', 'deepseek2', 'olmoe', ...). ``preset``: a :data:`PRESETS` name. ``imatrix``: whether the
    run passes ``--imatrix`` (None: yes for the IQ presets, no otherwise; it changes IQ3_XXS, IQ4_NL, IQ4_XS,
    Q4_0 and Q5_0 mixtures). Returns name -> ggml type name (a ``gguf.GGMLQuantizationType`` member name such
    as 'Q4_K'; unquantized tensors keep their source type), in the input's order."""
    p = resolve_preset(preset)
    has_imatrix = p.imatrix_by_default if imatrix is None else bool(imatrix)
    m = _model(tensors, arch)
    st = _State()
    out: dict[str, str] = {}

    def order(name: str) -> tuple[int, str]:
        layer = _layer(name)
        return (-1 if layer is None else layer), name

    for name in sorted(tensors, key=order):
        shape, src = tensors[name]
        ne = tuple(int(x) for x in reversed(shape))
        if not ne or not _allows_quantization(name, ne, arch):
            out[name] = src
            continue
        new = _mixture_type(m, st, p.default_type, name, ne, p.name, _category(name), has_imatrix)
        out[name] = _fallback(name, ne, new)
    return {name: out[name] for name in tensors}


def tensor_data_bytes(shape: tuple[int, ...], type_name: str) -> int:
    """Bytes of one tensor's data (numpy-order ``shape``) stored as ``type_name`` (no alignment padding)."""
    blk, size = _block(type_name)
    n_per_row = int(shape[-1]) if shape else 1
    if n_per_row % blk:
        raise McsharpError(f"a row of {n_per_row} does not fit {type_name} blocks of {blk}")
    return math.prod(int(x) for x in shape[:-1]) * (n_per_row // blk) * size


def preset_bytes(tensors: TensorInventory, arch: str, preset: str, imatrix: bool | None = None) -> int:
    """Bytes of all tensor data (alignment padding excluded) of the model quantized with ``preset``
    (:func:`preset_types` for the arguments)."""
    types = preset_types(tensors, arch, preset, imatrix)
    return sum(tensor_data_bytes(shape, types[name]) for name, (shape, _) in tensors.items())
