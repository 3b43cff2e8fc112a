"""Backends: the algorithms that evaluate a lowered kernel program on a graph.

Each backend is a function ``(program, x_src, graph, edge_delta, edge_attr) -> (out (n_dst, C_out), batch_stats)``.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable, Dict, List

import torch

from .factorized import implicit_conv_torch
from .fused import implicit_conv_triton, triton_available
from .reference import implicit_conv_reference

__all__ = ["available_backends", "get_backend", "resolve_backend", "BACKENDS"]

BACKENDS: Dict[str, Callable] = {"reference": implicit_conv_reference, "torch": implicit_conv_torch,
                                  "triton": implicit_conv_triton}
# "auto" prefers the first of these that runs on the device ("triton" only on CUDA: on CPU it is the interpreter)
_PREFERENCE = ("triton", "torch")
_FUSED = ("triton",)
_warned = set()


def available_backends(device=None) -> List[str]:
    """Names of the backends that run here (on ``device`` when given)."""
    dev = torch.device("cuda" if device is None and torch.cuda.is_available() else (device or "cpu"))
    return [name for name in BACKENDS if name != "triton" or triton_available(dev)]


def resolve_backend(name, device) -> str:
    """The backend to run: ``name``, else $IK_FAST_BACKEND, else "auto" (the fastest available, warning once
    when it falls back from a fused backend)."""
    if name is None:
        name = os.environ.get("IK_FAST_BACKEND", "auto")
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, got {type(name).__name__}")
    if name == "auto":
        dev = torch.device(device)
        avail = available_backends(dev) if dev.type == "cuda" else [n for n in BACKENDS if n not in _FUSED]
        choice = next(n for n in _PREFERENCE if n in avail)
        key = (choice, dev.type)
        if choice not in _FUSED and key not in _warned:
            _warned.add(key)
            why = "the fused kernels run on CUDA devices" if dev.type != "cuda" else "Triton is not installed"
            warnings.warn(f"ik_fast: backend 'auto' uses '{choice}' on {dev.type}: {why}", RuntimeWarning,
                          stacklevel=3)
        return choice
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {['auto'] + list(BACKENDS)}, got {name!r}")
    return name


def get_backend(name: str) -> Callable:
    return BACKENDS[name]
