"""Python code from the pinned llama.cpp source: its gguf-py and its ``conversion`` package.

The CLI's ``setup`` installs the pinned gguf-py as the ``gguf`` distribution, so every importer
(transformers included) sees one copy; ``conversion`` is imported from the extracted source tree.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

from .errors import McsharpError
from .native import build as native_build


def llama_cpp_dir() -> Path:
    """Root of the pristine vendored llama.cpp (downloaded and extracted on first use)."""
    return native_build.pristine_source()


def gguf_py_dir() -> Path:
    return llama_cpp_dir() / "gguf-py"


def import_gguf() -> ModuleType:
    """The pinned gguf-py; refuses PyPI's older copy (it lacks Q2_0 and breaks the converter's checks)."""
    import gguf

    if not hasattr(gguf.GGMLQuantizationType, "Q2_0"):
        raise McsharpError(
            f"the installed gguf ({Path(gguf.__file__).parent}) is not the pinned llama.cpp gguf-py; "
            "run `mcsharp setup` to install it")
    return gguf


def import_conversion() -> ModuleType:
    """llama.cpp's ``conversion`` package from the pinned source tree."""
    import_gguf()
    root = str(llama_cpp_dir())
    if root not in sys.path:
        sys.path.insert(0, root)
    mod = importlib.import_module("conversion")
    if not str(Path(mod.__file__).resolve()).startswith(str(Path(root).resolve())):
        raise McsharpError(f"`conversion` was imported from {mod.__file__}, not the pinned {root}; "
                           "remove the other copy from sys.path")
    return mod
