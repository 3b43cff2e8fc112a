"""Functional entry point: one implicit point convolution given a lowered kernel program."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ik_fast.backends import compiled_backend, get_backend, resolve_backend
from ik_fast.graph import Graph, check_edge_inputs, check_node_features, prepare_graph
from ik_fast.spec.program import KernelProgram

__all__ = ["implicit_point_conv"]


def implicit_point_conv(
    program: KernelProgram,
    x_src: Tensor,
    edge_index,
    edge_delta: Tensor,
    edge_attr: Optional[Tensor] = None,
    n_dst: Optional[int] = None,
    backend: Optional[str] = None,
):
    """``out_i = sum_{e: j -> i} K(edge_delta_e, edge_attr_e) x_j`` for every receiver i (no bias).

    Args:
        program: the lowered kernel (:meth:`ImplicitKernel.program`).
        x_src: source node features (N_src, C_in).
        edge_index: (2, E) integer tensor, row 0 = source j, row 1 = receiver i; or a prepared :class:`Graph`.
        edge_delta: (E, n) edge vectors (pos_j - pos_i by convention).
        edge_attr: (E, A) edge attributes when the kernel has an attribute type.
        n_dst: number of receivers (default: N_src).
        backend: "auto" (the fastest available for this device and graph size:
            :func:`ik_fast.backends.resolve_backend`), one of the registry ``ik_fast.backends.BACKENDS``
            ("reference", "torch", "triton", "native"; described in :class:`~ik_fast.ImplicitPointConv`), or None
            ($IK_FAST_BACKEND, else "auto"). ``ik_fast.available_backends()`` lists those that run here.

    Returns:
        (out (n_dst, C_out), batch statistics) — the statistics (one (mean, var) per batch-norm layer) are non-empty in
        training mode, for the caller to update running statistics.
    """
    device, dtype = program.sigma.device, program.sigma.dtype
    check_node_features(x_src, "x", program.in_size, device, dtype)
    compiling = torch.compiler.is_compiling()
    n_dst = x_src.shape[0] if n_dst is None else (n_dst if compiling else int(n_dst))
    if isinstance(edge_index, Graph):
        graph = edge_index
    else:  # (inside torch.compile the values are checked in the graph preparation's op)
        finite = [
            (nm, t)
            for nm, t in (("x", x_src), ("edge_delta", edge_delta), ("edge_attr", edge_attr))
            if compiling and isinstance(t, Tensor)
        ]
        graph = prepare_graph(edge_index, x_src.shape[0], n_dst, device, finite=finite)
    check_edge_inputs(program, edge_delta, edge_attr, graph.num_edges, device, dtype, finite=not compiling)
    if program.needs_batch_stats and graph.num_edges < 2:
        raise ValueError(
            f"in training mode the kernel's batch norm needs at least two edges for batch statistics, "
            f"got {graph.num_edges} (as torch.nn.BatchNorm1d with a batch of one); call .eval() or "
            f"build the layer with batch_norm=False"
        )
    if edge_attr is not None and program.attr_size == 0:
        edge_attr = None
    if compiling:
        name = compiled_backend(backend, str(device), dtype, traced=True, activation=program.activation)
    else:
        name = resolve_backend(backend, x_src.device, graph.num_edges, program.activation)
    return get_backend(name)(program, x_src, graph, edge_delta, edge_attr)
