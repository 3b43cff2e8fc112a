"""Backends: the algorithms that evaluate a lowered kernel program on a graph.

Each backend is a function ``(program, x_src, graph, edge_delta, edge_attr) -> (out (n_dst, C_out), batch_stats)``.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable, Dict, List

import torch

from .. import ops
from .factorized import implicit_conv_torch
from .fused import TRITON, implicit_conv_triton
from .reference import implicit_conv_reference

__all__ = ["available_backends", "get_backend", "resolve_backend", "unavailable_reason", "BACKENDS"]

BACKENDS: Dict[str, Callable] = {"reference": implicit_conv_reference, "torch": implicit_conv_torch,
                                  TRITON: implicit_conv_triton}
_FUSED = (TRITON,)
# "auto" picks a fused backend on a device only where a committed benchmark (benchmarks/results/) measured it faster
# than "torch" on that kind of device. No GPU has run the fused kernels yet, so today "auto" is "torch" everywhere.
_MEASURED_FASTER: Dict[str, tuple] = {"cuda": (), "cpu": ()}
_warned = set()


def unavailable_reason(name: str, device) -> str:
    """Why backend ``name`` does not run on ``device`` ("" when it does)."""
    if name not in _FUSED:
        return ""
    return ops.status(name, str(torch.device(device))) or ""


def available_backends(device=None) -> List[str]:
    """Names of the backends that run here (on ``device`` when given)."""
    dev = torch.device("cuda" if device is None and torch.cuda.is_available() else (device or "cpu"))
    return [name for name in BACKENDS if not unavailable_reason(name, dev)]


def resolve_backend(name, device) -> str:
    """The backend to run: ``name``, else $IK_FAST_BACKEND, else "auto" (the fastest available, warning once
    when it falls back from a fused backend)."""
    if name is None:
        name = os.environ.get("IK_FAST_BACKEND", "auto")
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, got {type(name).__name__}")
    if name == "auto":
        dev = torch.device(device)
        fast = [n for n in _MEASURED_FASTER.get(dev.type, ()) if not unavailable_reason(n, dev)]
        choice = fast[0] if fast else "torch"
        key = (choice, dev.type)
        if not fast and key not in _warned:
            _warned.add(key)
            unmeasured = "runs here, but no committed benchmark measured it faster than 'torch' on this device"
            reasons = "; ".join(f"{n}: {unavailable_reason(n, dev) or unmeasured}" for n in _FUSED)
            warnings.warn(f"ik_fast: backend 'auto' uses 'torch' on {dev.type} ({reasons})", RuntimeWarning,
                          stacklevel=3)
        return choice
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {['auto'] + list(BACKENDS)}, got {name!r}")
    return name


def get_backend(name: str) -> Callable:
    return BACKENDS[name]
