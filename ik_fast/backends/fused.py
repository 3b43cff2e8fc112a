"""The host side of every fused backend: the program through the op layer's stages (:mod:`ik_fast.ops`).

A fused backend is an implementation of the ops, declared in its own room (:class:`ik_fast.ops.Implementation`:
``"triton"`` in :mod:`ik_fast.kernels_triton`, ``"native"`` in :mod:`ik_fast.backends.native`). This module
does what every implementation shares, on the lowered program and the prepared graph:

1. the MLP inputs ``[d, a]`` and the sources in receiver order (the graph's CSR);
2. in training, the batch statistics layer after layer: ``trunk_moments`` of layer k with the batch norms before it
   as affine maps (:meth:`KernelProgram.op_program` with the statistics known so far), finished by
   :meth:`BatchNorm.finish`, detached (escnn's rule); the last layer's pass also returns its activation;
3. ``conv`` on the MLP as written, every batch norm an affine map from its statistics (and, in training, that
   activation, so the trunk is not evaluated again, and for the implementations that declare a tape on the device the
   tape: every pass's activation and, within a budget, its Fourier grid, so that the backward does not evaluate the
   trunk again either); its autograd (:func:`ik_fast.ops.conv`) reaches escnn's parameters through the program's
   expansion and the batch norms' affine maps. The host folds nothing.
"""

from __future__ import annotations

import warnings

import torch

from ik_fast import ops
from ik_fast.graph import Graph
from ik_fast.spec.program import KernelProgram

__all__ = [
    "implicit_conv_fused",
    "fused_backend",
    "TAPE_LIMIT_BYTES",
    "TAPE_GRID_LIMIT_BYTES",
    "TAPE_LIMIT_BYTES_CUDA",
]

# The most bytes of activations a tape keeps alive to the backward (those of the last layer are kept anyway); above
# it, no tape. 256 MiB: problem `cpu` (32,768 edges, 144 dims) keeps 107 MB more (its backward op measured 1.43 s
# against 1.49 s without, interleaved runs on 2 threads); config H (197k edges, 643 MB) goes without: the saving
# there is not worth that memory.
TAPE_LIMIT_BYTES = 256 << 20
# The most bytes of Fourier grids (G C numbers an edge and layer, 6x the activation at problem P) a tape takes; above
# it, the backward re-evaluates each grid from the layer's input (half the layer's forward work) rather than write
# and read the grids through memory: 16 MiB, about what stays in the caches between the passes and the backward
# (measured on 2 cores: grids at problem P, 100 MB, cost more in page faults and memory traffic than they save).
TAPE_GRID_LIMIT_BYTES = 16 << 20
# On CUDA devices: 2 GiB of activations (configs M and H keep one E x H activation, 637 and 642 MB in float32, beside
# the one the forward keeps anyway: a few percent of a 80 GB device), so that the trunk's backward reads them instead
# of evaluating the trunk again from the input (a third of the counted work at config M).
TAPE_LIMIT_BYTES_CUDA = 2 << 30


def _tape_plan(program: KernelProgram, num_edges: int, dtype: torch.dtype, device: torch.device):
    """(whether to tape, whether the tape takes the grids)."""
    size = dtype.itemsize * num_edges
    acts = sum(h.channels * h.dim for h in program.hidden[:-1]) * size
    grids = sum(0 if h.A is None or h.A.numel() == 0 else h.A.shape[0] * h.channels for h in program.hidden) * size
    limit = TAPE_LIMIT_BYTES_CUDA if device.type == "cuda" else TAPE_LIMIT_BYTES
    return acts <= limit, grids <= TAPE_GRID_LIMIT_BYTES


def _chains(decl, program: KernelProgram) -> bool:
    """Whether the implementation's statistics passes chain for this program (``chained_statistics``: every kind, or
    the activation kinds named)."""
    chain = decl.chained_statistics
    return chain if isinstance(chain, bool) else program.activation in chain


def _receiver_order(graph: Graph):
    """Sources in receiver order, cached on the graph."""
    if torch.compiler.is_compiling():  # (a graph prepared while tracing lives for one call)
        return graph.src[graph.perm]
    cache = graph.__dict__.setdefault("_chunk_cache", {})
    if "src_by_receiver" not in cache:
        cache["src_by_receiver"] = graph.src[graph.perm].contiguous()
    return cache["src_by_receiver"]


def implicit_conv_fused(impl: str, program: KernelProgram, x_src, graph: Graph, delta, attr):
    """Same contract as :func:`~ik_fast.backends.reference.implicit_conv_reference`, through implementation
    ``impl`` of the op layer."""
    # (inside torch.compile the backend was checked when the call was traced: ik_fast.backends.compiled_backend)
    why = None if torch.compiler.is_compiling() else ops.status(impl, str(x_src.device))
    if why is not None:
        raise RuntimeError(f"backend {impl!r} does not run here: {why}")
    if x_src.dtype not in (torch.float32, torch.float64):
        raise TypeError(
            f"backend {impl!r} computes in float32 or float64 (bfloat16 through torch.autocast), but the "
            f"layer and its inputs are {x_src.dtype}; use backend='torch' for other dtypes"
        )
    if graph.num_edges == 0:
        return x_src.new_zeros(graph.n_dst, program.out_size), []
    dtype = x_src.dtype
    inp = program.mlp_input(delta, attr)[graph.perm]  # (a gather: contiguous)
    if inp.dtype != dtype:
        inp = inp.to(dtype)
    src = _receiver_order(graph)
    stats = []
    hidden = None
    tape = None
    base, affines = None, []
    if program.needs_batch_stats:
        # the MLP's tensors once, and each batch norm's map once its statistics are known (with autograd): the
        # passes and conv take them from there
        base = program.op_program([], dtype)
        last = len(program.hidden)
        decl = ops.implementation(impl)
        chain = _chains(decl, program)
        # a tape needs every layer to be a pass of its own (a batch norm after each hidden layer, as in every
        # ImplicitKernel with batch norms) and the chained passes
        taped, grids = False, False
        if chain and x_src.device.type in decl.tape_devices and all(h.bn is not None for h in program.hidden):
            taped, grids = _tape_plan(program, graph.num_edges, dtype, x_src.device)
            grids = grids and taped and decl.grids
        tape = [] if taped else None
        prev, prev_act = 0, None
        for k, layer in enumerate(program.hidden, start=1):
            if layer.bn is None:
                continue
            with torch.no_grad():
                packed = program.op_program(stats, dtype, base=base, affines=affines)
                # the last layer's statistics pass also gives the activation that conv contracts; a chaining
                # implementation starts each pass from the previous one's activation (and its batch norm)
                keep = k == last or chain
                start_from = (prev_act, prev) if chain and prev_act is not None else (inp, 0)
                res = ops.trunk_moments(
                    impl, start_from[0], packed, k, with_activation=keep, start=start_from[1], with_grid=grids
                )
                act = res.activation
                if taped:
                    tape += [act, res.grid]
                stats.append(layer.bn.finish(res.moments, graph.num_edges))
            affines.append(program.bn_affine(layer, stats[-1], dtype))
            prev, prev_act = k, (act if chain else None)
            hidden = act if k == last else None
    x_src = x_src if x_src.is_contiguous() else x_src.contiguous()
    out = ops.conv(
        impl, x_src, inp, src, graph.rowptr, program.op_program(stats, dtype, base=base, affines=affines), hidden, tape
    )
    return out, stats


def fused_backend(impl: str):
    """The backend function of implementation ``impl``."""

    def backend(program, x_src, graph, delta, attr):
        if x_src.dtype == torch.float16:
            warnings.warn(
                f"ik_fast: backend {impl!r} has no float16 path; using 'torch' for this call",
                RuntimeWarning,
                stacklevel=4,
            )
            from ik_fast.backends.factorized import implicit_conv_torch

            return implicit_conv_torch(program, x_src, graph, delta, attr)
        return implicit_conv_fused(impl, program, x_src, graph, delta, attr)

    backend.__name__ = f"implicit_conv_{impl}"
    return backend
