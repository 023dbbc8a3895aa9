"""Environment repair done by ``mcsharp setup``: make the pinned gguf-py the installed ``gguf``."""

from __future__ import annotations

import subprocess
import sys

from .errors import McsharpError
from .native.build import pristine_source

_PROBE = "import gguf, sys; sys.stdout.write(str(hasattr(gguf.GGMLQuantizationType, 'Q2_0')))"


def ensure_pinned_gguf(log=print) -> None:
    """Install the pinned llama.cpp's gguf-py over PyPI's copy when needed (checked in a subprocess)."""
    probe = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True)
    if probe.stdout.strip() == "True":
        return
    src = pristine_source() / "gguf-py"
    log(f"[setup] installing the pinned gguf-py from {src}")
    res = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(src)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise McsharpError(f"could not install the pinned gguf-py from {src}: {res.stderr.strip()[-300:]}")
