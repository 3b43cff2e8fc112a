"""The ``"native"`` backend: the op layer's stages in C++ (CPU tensors, OpenMP) and CUDA (CUDA tensors), from ``csrc/``.

The kernels register themselves for ``ik_fast::native_conv``, ``native_conv_backward`` and ``native_trunk_moments``
(``TORCH_LIBRARY_IMPL`` per dispatch key) when the extension is imported; the schemas, fakes and autograd are the op
layer's (:mod:`ik_fast.ops`), defined by :func:`~ik_fast.ops.register_implementation` before the loader runs. The
host side is the one every fused backend shares (:mod:`ik_fast.backends.fused`). Loading: :mod:`ik_fast._native`
(the prebuilt ``ik_fast._C``, else compiled on first use).
"""

from __future__ import annotations

import torch

from .. import ops
from .fused import fused_backend

__all__ = ["NATIVE", "implicit_conv_native", "native_available"]

NATIVE = "native"


def _load_native():
    from .. import _native

    _native.load()


def _native_runs_on(device: torch.device):
    from .. import _native

    return _native.runs_on(device)


ops.register_implementation(NATIVE, _load_native, _native_runs_on)


def native_available(device) -> bool:
    """Whether the native kernels run on ``device``: CPU wherever the extension loads, CUDA when it was built with
    its CUDA part."""
    return ops.status(NATIVE, str(torch.device(device))) is None


implicit_conv_native = fused_backend(NATIVE)
