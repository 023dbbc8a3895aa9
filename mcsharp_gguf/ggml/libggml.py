"""libggml's own quantiser and dequantiser through ctypes (``libggml-base`` of the built patched runtime).

``ggml_dequantize`` decodes packed bytes exactly as llama.cpp will (the sequential GPTQ pass loads finished layers
back with it); both serve as independent references for tests and benchmarks.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import torch

from ..runtime.llama import ensure_runtime
from .types import block_size, check_shape, ggml_type, type_size


class _Traits(ctypes.Structure):
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)
_LIB: ctypes.CDLL | None = None


def _libggml() -> ctypes.CDLL:
    global _LIB
    if _LIB is None:
        lib_dir = ensure_runtime(log=lambda *a, **k: None).lib_dir
        lib = ctypes.CDLL(str(Path(lib_dir) / "libggml-base.so"))
        lib.ggml_get_type_traits.restype = ctypes.POINTER(_Traits)
        lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                            ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        _LIB = lib
    return _LIB


def ggml_dequantize(packed: np.ndarray, type_name: str, shape: tuple[int, int], out: np.ndarray | None = None
                    ) -> np.ndarray:
    """Decode packed bytes with libggml's own ``to_float`` (the CPU reference dequantiser), into ``out`` (a
    contiguous float32 array of ``shape``) when given."""
    tr = _libggml().ggml_get_type_traits(int(ggml_type(type_name))).contents
    assert tr.blck_size == block_size(type_name) and tr.type_size == type_size(type_name)
    src = np.ascontiguousarray(packed, dtype=np.uint8)
    if out is None:
        out = np.empty(shape, np.float32)
    elif out.shape != tuple(shape) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"ggml_dequantize: out must be a contiguous float32 array of shape {tuple(shape)}")
    if src.size * tr.blck_size != out.size * tr.type_size:
        raise ValueError(f"ggml_dequantize: {src.size} bytes of {type_name} do not decode to shape {tuple(shape)}")
    _TO_FLOAT(tr.to_float)(src.ctypes.data, out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), out.size)
    return out


def ggml_quantize(W: torch.Tensor | np.ndarray, type_name: str, imatrix: torch.Tensor | np.ndarray | None = None
                  ) -> np.ndarray:
    """llama.cpp's own quantiser (``ggml_quantize_chunk``, optionally with an importance matrix per column)."""
    check_shape(tuple(W.shape), type_name)
    x = np.ascontiguousarray(np.asarray(W, dtype=np.float32))
    rows, cols = x.shape
    out = np.zeros((rows, cols // block_size(type_name) * type_size(type_name)), np.uint8)
    im = None if imatrix is None else np.ascontiguousarray(np.asarray(imatrix, dtype=np.float32).reshape(cols))
    _libggml().ggml_quantize_chunk(int(ggml_type(type_name)), x.ctypes.data, out.ctypes.data, 0, rows, cols,
                                   None if im is None else im.ctypes.data)
    return out
