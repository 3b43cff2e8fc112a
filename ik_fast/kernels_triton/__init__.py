"""The ``"triton"`` implementation of the op layer (:mod:`ik_fast.ops`): fused Triton kernels and their launchers.

``conv`` (the trunk kernels), ``contract`` (the per-receiver contraction), ``blocks`` (W''s block plan) and ``launch``
(padding, precision and the registration of the kernels for the ``ik_fast::triton_*`` ops). Importing this package
declares the implementation (:data:`DECLARATION`); its kernels are imported on first use, which needs Triton. Without
a GPU they run in Triton's interpreter (``TRITON_INTERPRET=1``, CPU tensors).
"""

from __future__ import annotations

import torch

from ik_fast import ops

__all__ = ["DECLARATION"]


def _load() -> None:
    from ik_fast.kernels_triton import launch  # noqa: F401  (registers the kernels)


def _runs_on(device: torch.device):
    from ik_fast.kernels_triton import launch

    return launch.runs_on(device)


# The statistics passes of Fourier and pointwise ELU trunks chain (each starts from the previous pass's activation),
# and the trunk's backward reads their tape (every layer's activation, within the host's budget; no grids) instead of
# evaluating the trunk again; no GPU has measured it faster than "torch" yet. The gated and norm nonlinearities have
# kernels of their own (irreps.py), whose passes start from the MLP input.
DECLARATION = ops.register_implementation(
    ops.Implementation(
        name="triton",
        load=_load,
        runs_on=_runs_on,
        summary="fused Triton kernels (CUDA; CPU only in Triton's interpreter)",
        chained_statistics=("elu", "fourier_elu"),
        tape_devices=("cpu", "cuda"),
        activations=(
            ("cpu", ("elu", "fourier_elu", "gated", "norm")),
            ("cuda", ("elu", "fourier_elu", "gated", "norm")),
        ),
    )
)
