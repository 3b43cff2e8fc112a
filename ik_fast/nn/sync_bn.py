"""Batch statistics synchronised across processes (torch.distributed, any backend: gloo on CPU, NCCL on GPU).

``torch.nn.SyncBatchNorm`` refuses CPU tensors, and escnn has no synchronised ``IIDBatchNorm1d``;
:func:`convert_sync_batchnorm` swaps both kinds in a model for versions whose training statistics are the statistics
of the union of all processes' batches:

- ``torch.nn.BatchNorm1d`` -> :class:`SyncBatchNorm1d`: sums, sums of squares and counts all-reduced by a
  differentiable all-reduce (its backward all-reduces the gradient), so gradients flow through the statistics as in
  ``torch.nn.SyncBatchNorm``;
- ``escnn.nn.IIDBatchNorm1d`` -> :class:`SyncIIDBatchNorm1d`: escnn detaches its statistics from the gradient, so
  they are all-reduced without autograd.

The batch norms inside the implicit kernels' MLPs (``ImplicitKernel.bn``) are switched to synchronised statistics
too: every backend finishes its batch statistics in :meth:`ik_fast.spec.program.BatchNorm.finish`, which then
all-reduces the per-process moments (detached, as escnn's).
Without an initialised process group (or with one process) all behave exactly like the modules they replace.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from escnn import nn as enn

__all__ = ["SyncBatchNorm1d", "SyncIIDBatchNorm1d", "convert_sync_batchnorm"]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes; the gradient of every process's input is the sum of all processes' output gradients."""

    @staticmethod
    def forward(ctx, x):
        y = x.clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        dist.all_reduce(g)
        return g


class SyncBatchNorm1d(torch.nn.BatchNorm1d):
    """``BatchNorm1d`` on (N, C) inputs whose training statistics cover every process's batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and _distributed()):
            return super().forward(x)
        if x.dim() != 2:
            raise ValueError(f"SyncBatchNorm1d expects (N, C) inputs, got shape {tuple(x.shape)}")
        C = x.shape[1]
        n = x.new_full((1,), float(x.shape[0]))
        packed = _AllReduceSum.apply(torch.cat([n, x.sum(0), (x * x).sum(0)]))
        N = packed[0]
        mean = packed[1 : 1 + C] / N
        var = (packed[1 + C :] / N - mean * mean).clamp(min=0)
        if self.track_running_stats:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked + 1)
                self.running_mean.mul_(1 - m).add_(m * mean)
                self.running_var.mul_(1 - m).add_(m * var * N / (N - 1).clamp(min=1))
                self.num_batches_tracked += 1
        y = (x - mean) / torch.sqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        return y


class SyncIIDBatchNorm1d(enn.IIDBatchNorm1d):
    """escnn's ``IIDBatchNorm1d`` whose training statistics cover every process's batch (detached, as escnn's)."""

    def _estimate_stats(self, slice, name: str):
        if not _distributed():
            return super()._estimate_stats(slice, name)
        agg_axes = (0,) + tuple(range(3, len(slice.shape)))
        x = slice.detach()
        n_local = x.numel() // (x.shape[1] * x.shape[2])
        packed = torch.cat(
            [x.new_full((1,), float(n_local)), x.sum(dim=agg_axes).reshape(-1), (x * x).sum(dim=agg_axes).reshape(-1)]
        )
        dist.all_reduce(packed)
        N = packed[0]
        k = x.shape[1] * x.shape[2]
        mean = (packed[1 : 1 + k] / N).reshape(x.shape[1], x.shape[2])  # per field and component
        sq = (packed[1 + k :] / N).reshape(x.shape[1], x.shape[2])
        if self._has_trivial[name]:
            P = getattr(self, f"{self._escape_name(name)}_avg")
            means = mean @ P.t()  # projection on the trivial irreps
        else:
            means = None
        # unbiased variance per component (a shift by the means does not change it), averaged over the components
        var = ((sq - mean * mean) * N / (N - 1).clamp(min=1)).mean(dim=1, keepdim=True)
        return means, var


def convert_sync_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """Swap (in place) every ``torch.nn.BatchNorm1d`` and ``escnn.nn.IIDBatchNorm1d`` of ``module`` for its
    synchronised version (same parameters and buffers), and makes the implicit kernels' batch norms synchronise their
    statistics; returns ``module``."""
    from ik_fast.spec.kernel import _IIDBatchNormParams

    for m in module.modules():
        if isinstance(m, _IIDBatchNormParams):
            m.sync_stats = True
        if type(m) is torch.nn.BatchNorm1d:
            m.__class__ = SyncBatchNorm1d
        elif type(m) is enn.IIDBatchNorm1d:
            m.__class__ = SyncIIDBatchNorm1d
    return module
