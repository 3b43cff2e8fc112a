"""The ``"native"`` backend: the op layer's stages in C++ (CPU tensors, OpenMP) and CUDA (CUDA tensors), from ``csrc/``.

The kernels register themselves for ``ik_fast::native_conv``, ``native_conv_backward`` and ``native_trunk_moments``
(``TORCH_LIBRARY_IMPL`` per dispatch key) when the extension is imported; the schemas, fakes and autograd are the op
layer's (:mod:`ik_fast.ops`), defined by :func:`~ik_fast.ops.register_implementation` before the loader runs. The
host side is the one every fused backend shares (:mod:`ik_fast.backends.fused`). Loading: :mod:`ik_fast._native`
(the prebuilt ``ik_fast._C``, else compiled on first use).
"""

from __future__ import annotations

import torch

from ik_fast import ops

__all__ = ["NATIVE", "DECLARATION", "native_available"]

NATIVE = "native"


def _load_native():
    from ik_fast import _native

    _native.load()


def _native_runs_on(device: torch.device):
    from ik_fast import _native

    return _native.runs_on(device)


# The statistics passes chain (the trunk is its largest cost on CPU, and host memory holds the previous activation);
# on CPU the backward reads a tape of the passes' activations and, within a budget, their grids; measured faster than
# "torch" on every problem of the committed CPU benchmark, not yet on a GPU.
DECLARATION = ops.register_implementation(
    ops.Implementation(
        name=NATIVE,
        load=_load_native,
        runs_on=_native_runs_on,
        summary="C++ kernels (CPU, OpenMP) and CUDA kernels, csrc/",
        chained_statistics=True,
        tape_devices=("cpu",),
        activations=(
            ("cpu", ("elu", "fourier_elu", "gated", "norm")),
            ("cuda", ("elu", "fourier_elu", "gated", "norm")),
        ),
        grids=True,
        measured_faster_on=("cpu",),
    )
)


def native_available(device) -> bool:
    """Whether the native kernels run on ``device``: CPU wherever the extension loads, CUDA when it was built with
    its CUDA part."""
    return ops.status(NATIVE, str(torch.device(device))) is None
