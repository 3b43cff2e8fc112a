"""Backends: the algorithms that evaluate a lowered kernel program on a graph.

Each backend is a function ``(program, x_src, graph, edge_delta, edge_attr) -> (out (n_dst, C_out), batch_stats)``.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable, Dict, List

import torch

from .factorized import implicit_conv_torch
from .reference import implicit_conv_reference

__all__ = ["available_backends", "get_backend", "resolve_backend", "BACKENDS"]

BACKENDS: Dict[str, Callable] = {"reference": implicit_conv_reference, "torch": implicit_conv_torch}
# "auto" prefers the first of these that runs on the device; fused backends are added here as they land
_PREFERENCE = ("torch",)
_FUSED_PLANNED = ("triton", "cuda")
_warned = set()


def available_backends(device=None) -> List[str]:
    """Names of the backends that run here (on ``device`` when given)."""
    return [name for name in BACKENDS]


def resolve_backend(name, device) -> str:
    """The backend to run: ``name``, else $IK_FAST_BACKEND, else "auto" (the fastest available, warning once
    when it falls back from a fused backend)."""
    if name is None:
        name = os.environ.get("IK_FAST_BACKEND", "auto")
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, got {type(name).__name__}")
    if name == "auto":
        avail = available_backends(device)
        choice = next(n for n in _PREFERENCE if n in avail)
        key = (choice, torch.device(device).type)
        if key not in _warned:
            _warned.add(key)
            warnings.warn(f"ik_fast: backend 'auto' uses '{choice}' on {torch.device(device).type}: no fused backend "
                          f"({', '.join(_FUSED_PLANNED)}) is available in this build", RuntimeWarning, stacklevel=3)
        return choice
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {['auto'] + list(BACKENDS)}, got {name!r}")
    return name


def get_backend(name: str) -> Callable:
    return BACKENDS[name]
