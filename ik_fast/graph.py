"""Graph preparation in one place: input validation, receiver-sorted CSR, degree-bucketed chunks, caching."""

from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["Graph", "Chunk", "prepare_graph", "check_edge_inputs", "check_node_features"]

# edges per chunk of the factorised backend; bounds the per-chunk activations (E_chunk x hidden) and Z (n_r x H x C)
EDGE_BUDGET = 1024
Z_BUDGET = 2**22  # floats of Z per chunk (16 MB in float32: cache-sized)


@dataclass(frozen=True)
class Chunk:
    """Receivers with similar in-degree, their edges padded to ``degree`` each.

    ``eid`` (n_valid,): original edge ids in receiver-major order; ``slot`` (n_valid,): their positions in the
    padded (len(receivers) * degree) layout, or None when no padding is needed.
    """

    receivers: Tensor
    degree: int
    eid: Tensor
    slot: Optional[Tensor]


@dataclass(frozen=True)
class Graph:
    """A validated graph: ``src``/``dst`` (E,) int64, sizes, receiver-sorted CSR and chunks."""

    src: Tensor
    dst: Tensor
    n_src: int
    n_dst: int
    perm: Tensor      # (E,) edge ids sorted by receiver (stable)
    rowptr: Tensor    # (n_dst + 1,)
    degree: Tensor    # (n_dst,)

    @property
    def num_edges(self) -> int:
        return self.src.shape[0]

    def chunks(self, hidden: int, in_size: int):
        """Chunks sized for a hidden width and input size; computed once per (graph, sizes) and cached."""
        key = (hidden, in_size)
        cache = self.__dict__.setdefault("_chunk_cache", {})
        if key not in cache:
            cache[key] = _make_chunks(self, hidden, in_size)
        return cache[key]


    def chunk_order(self, hidden: int, in_size: int) -> Tensor:
        """All edge ids, chunk after chunk (each chunk's ``eid`` in turn)."""
        key = ("order", hidden, in_size)
        cache = self.__dict__.setdefault("_chunk_cache", {})
        if key not in cache:
            chunks = self.chunks(hidden, in_size)
            cache[key] = torch.cat([c.eid for c in chunks]) if chunks else self.src.new_zeros(0)
        return cache[key]


def _ladder(d: int) -> int:
    """Padded degree for a receiver of degree d: at most 25% padding."""
    if d <= 8:
        return d
    p = 1 << (d.bit_length() - 1)
    for m in (p, p * 5 // 4, p * 3 // 2, p * 7 // 4, 2 * p):
        if m >= d:
            return m
    return 2 * p


def _make_chunks(g: Graph, hidden: int, in_size: int):
    deg = g.degree.cpu()
    if g.num_edges == 0:
        return ()
    device = g.src.device
    padded = torch.tensor([_ladder(int(d)) for d in deg.tolist()], dtype=torch.long)
    rowptr = g.rowptr.cpu()
    perm = g.perm.cpu()
    chunks = []
    for D in torch.unique(padded[deg > 0]).tolist():
        recv = torch.nonzero((padded == D) & (deg > 0)).flatten()
        per = max(1, min(EDGE_BUDGET // D, Z_BUDGET // max(1, hidden * in_size)))
        for start in range(0, recv.numel(), per):
            r = recv[start:start + per]
            d = deg[r]
            starts = rowptr[r]
            # positions within each receiver's edge list
            within = torch.arange(int(d.sum())) - torch.repeat_interleave(torch.cumsum(d, 0) - d, d)
            owner = torch.repeat_interleave(torch.arange(r.numel()), d)
            eid = perm[torch.repeat_interleave(starts, d) + within]
            slot = None if bool((d == D).all()) else owner * D + within
            chunks.append(Chunk(r.to(device), D, eid.to(device), None if slot is None else slot.to(device)))
    return tuple(chunks)


_CACHE: "OrderedDict[tuple, Tuple[weakref.ref, Graph]]" = OrderedDict()
_CACHE_SIZE = 16


def prepare_graph(edge_index: Tensor, n_src: int, n_dst: int, device=None) -> Graph:
    """Validate ``edge_index`` (2, E) (row 0 = source j, row 1 = receiver i) and build its CSR.

    The result is cached for the same tensor object (same version) and sizes, so a graph reused across layers or
    steps is prepared once.
    """
    if not isinstance(edge_index, Tensor):
        raise TypeError(f"edge_index must be a torch.Tensor of shape (2, E), got {type(edge_index).__name__}")
    if edge_index.dim() != 2 or edge_index.shape[0] != 2:
        raise ValueError(f"edge_index must have shape (2, E), got {tuple(edge_index.shape)}")
    if edge_index.dtype.is_floating_point or edge_index.dtype.is_complex or edge_index.dtype == torch.bool:
        raise TypeError(f"edge_index must be an integer tensor, got dtype {edge_index.dtype}")
    if device is not None and edge_index.device != torch.device(device):
        raise ValueError(f"edge_index is on {edge_index.device} but the node features are on {device}")
    key = (edge_index.data_ptr(), edge_index._version, tuple(edge_index.shape), str(edge_index.device),
           edge_index.dtype, int(n_src), int(n_dst))
    hit = _CACHE.get(key)
    if hit is not None and hit[0]() is edge_index:
        _CACHE.move_to_end(key)
        return hit[1]
    ei = edge_index.long()
    E = ei.shape[1]
    if E > 0:
        lo = int(ei.min())
        hi_src, hi_dst = int(ei[0].max()), int(ei[1].max())
        if lo < 0:
            raise ValueError(f"edge_index has negative entries (min {lo})")
        if hi_src >= n_src:
            raise ValueError(f"edge_index[0] (sources) has entry {hi_src} but there are only {n_src} source nodes")
        if hi_dst >= n_dst:
            raise ValueError(f"edge_index[1] (receivers) has entry {hi_dst} but there are only {n_dst} receiver nodes")
    src, dst = ei[0].contiguous(), ei[1].contiguous()
    perm = torch.argsort(dst, stable=True)
    degree = torch.bincount(dst, minlength=n_dst)
    rowptr = torch.zeros(n_dst + 1, dtype=torch.long, device=ei.device)
    rowptr[1:] = torch.cumsum(degree, 0)
    g = Graph(src, dst, int(n_src), int(n_dst), perm, rowptr, degree)
    try:
        _CACHE[key] = (weakref.ref(edge_index), g)
        if len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    except TypeError:  # tensors that cannot be weakly referenced are simply not cached
        pass
    return g


def _check_float(t: Tensor, name: str, shape: tuple, device, dtype, finite: bool = True) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != len(shape) or any(s is not None and a != s for a, s in zip(t.shape, shape)):
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the layer's parameters are on {device}")
    if t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but the layer's parameters are {dtype}")
    if finite and t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or infinite values")


def check_node_features(x: Tensor, name: str, size: int, device, dtype) -> None:
    _check_float(x, name, (None, size), device, dtype, finite=False)


def check_edge_inputs(program, edge_delta: Tensor, edge_attr: Optional[Tensor], num_edges: Optional[int],
                      device, dtype) -> None:
    """Validate per-edge vectors (E, n) and attributes (E, A) against a kernel program."""
    _check_float(edge_delta, "edge_delta", (num_edges, program.dim), device, dtype)
    if program.attr_size:
        if edge_attr is None:
            raise ValueError(f"edge_attr is required: the kernel was built with an edge_attr_type of size "
                             f"{program.attr_size}")
        _check_float(edge_attr, "edge_attr", (num_edges, program.attr_size), device, dtype)
    elif edge_attr is not None and edge_attr.numel() and edge_attr.shape[-1] != 0:
        raise ValueError("edge_attr was given but the kernel was built without an edge_attr_type")
