"""Where the torch stages run (importance, GPTQ, OTP training): ``--device auto|cpu|cuda[:N]``.

Packing into ggml's bytes always runs on the CPU (ggml.packing.finish); a GPU computes the same float32 decisions
up to rounding (its matmuls sum in another order), so a file made on a GPU is deterministic run to run on that
GPU but not byte-identical to the CPU's (tests/test_devices.py states the tolerance).
"""

from __future__ import annotations

import torch

from .errors import McsharpError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` → the first CUDA GPU when torch sees one, else the CPU; ``cpu``; ``cuda`` / ``cuda:N`` → that GPU,
    or a one-line error naming why it cannot be used."""
    if name == "cpu":
        return torch.device("cpu")
    if name != "auto" and name != "cuda" and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise McsharpError(f"--device {name}: expected auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        if name == "auto":
            return torch.device("cpu")
        why = "this torch is built without CUDA" if torch.version.cuda is None else "torch sees no CUDA GPU"
        raise McsharpError(f"--device {name}: {why} (torch {torch.__version__}); use --device cpu, or install a "
                           "CUDA build of torch on a machine with an NVIDIA GPU")
    dev = torch.device("cuda" if name == "auto" else name)
    index = dev.index or 0
    if index >= torch.cuda.device_count():
        raise McsharpError(f"--device {name}: torch sees {torch.cuda.device_count()} CUDA GPU(s), numbered from 0")
    return torch.device("cuda", index)


def describe_device(device: torch.device) -> str:
    """One line for the log: 'cuda:0 (NVIDIA H200, 140 GB)' or 'cpu (2 threads)'."""
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{device} ({p.name}, {p.total_memory / 1e9:.0f} GB)"
    return f"cpu ({torch.get_num_threads()} threads)"
