"""Walk the nested plain data that stages hand on (dicts, lists, tuples, dataclasses) down to its arrays."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import torch


def map_arrays(obj: Any, fn: Callable[[np.ndarray | torch.Tensor], Any]) -> Any:
    """``obj`` with every array leaf (numpy array or torch tensor, inside dicts, lists, tuples and dataclass
    instances) replaced by ``fn(leaf)``; everything else as it is."""
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: map_arrays(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_arrays(v, fn) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: map_arrays(getattr(obj, f.name), fn)
                                           for f in dataclasses.fields(obj) if f.init})
    return obj
