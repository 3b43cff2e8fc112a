"""Graph preparation in one place: input validation, receiver-sorted CSR, degree-bucketed chunks, caching."""

from __future__ import annotations

import math
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = [
    "Graph",
    "Chunk",
    "ChunkPlan",
    "prepare_graph",
    "check_edge_inputs",
    "check_node_features",
    "check_positions",
    "padded_degrees",
    "check_int32_extents",
    "INT32_LIMIT",
    "set_value_checks",
    "value_checks_enabled",
]

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
    perm: Tensor  # (E,) edge ids sorted by receiver (stable)
    rowptr: Tensor  # (n_dst + 1,)
    degree: Tensor  # (n_dst,)

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
        return self.chunks(hidden, in_size).eid


def _ladder(d: int) -> int:
    """Padded degree for a receiver of degree d: at most 25% padding (scalar version of :func:`padded_degrees`)."""
    return int(padded_degrees(torch.tensor([d]))[0])


def padded_degrees(deg: Tensor) -> Tensor:
    """Padded degree of every receiver (int64): d itself up to 8, else the smallest of p, 5p/4, 3p/2, 7p/4, 2p
    (p the largest power of two <= d) that is >= d, so padding is at most 25%."""
    deg = deg.long()
    p = torch.ones_like(deg)
    big = deg > 8
    if bool(big.any()):
        p = torch.where(big, torch.exp2(torch.floor(torch.log2(deg.clamp(min=1).double()))).long(), p)
        # log2 in float64 is exact at powers of two; repair any rounding below them
        p = torch.where(big & (2 * p <= deg), 2 * p, p)
        p = torch.where(big & (p > deg), p // 2, p)
    cand = torch.stack([p, p * 5 // 4, p * 3 // 2, p * 7 // 4, 2 * p], 1)
    first = (cand >= deg[:, None]).to(torch.int8).argmax(1)
    return torch.where(big, cand.gather(1, first[:, None]).squeeze(1), deg)


class ChunkPlan:
    """The torch backend's chunks, built with vectorised tensor code and materialised as views on access.

    Receivers with edges are ordered by (padded degree, id); within a padded degree ``D`` they go ``per`` at a time
    (``per`` from the edge and Z budgets). ``eid`` holds every edge id in that order; chunk k covers
    ``eid[edge_start[k]:edge_start[k + 1]]`` and ``receivers[recv_start[k]:recv_start[k + 1]]``. Only the bucket
    sizes (at most a few dozen distinct padded degrees) are looped over in Python, never the chunks or receivers.
    """

    def __init__(self, receivers, eid, slot, degree, recv_start, edge_start, full):
        self.receivers, self.eid, self.slot = receivers, eid, slot
        self._degree, self._recv_start, self._edge_start, self._full = degree, recv_start, edge_start, full

    def __len__(self) -> int:
        return len(self._degree)

    def __getitem__(self, k: int) -> Chunk:
        if k < 0:
            k += len(self)
        r0, r1 = self._recv_start[k], self._recv_start[k + 1]
        e0, e1 = self._edge_start[k], self._edge_start[k + 1]
        D = self._degree[k]
        slot = None if self._full[k] else self.slot[e0:e1]
        return Chunk(self.receivers[r0:r1], D, self.eid[e0:e1], slot)

    def __iter__(self):
        return (self[k] for k in range(len(self)))

    def __bool__(self) -> bool:
        return len(self) > 0

    def sizes(self):
        """Edges per chunk, in order."""
        return [b - a for a, b in zip(self._edge_start[:-1], self._edge_start[1:])]


def _make_chunks(g: Graph, hidden: int, in_size: int) -> ChunkPlan:
    """Vectorised: a few passes over the edges (one gather, two scatters), the rest per receiver or per bucket."""
    device = g.src.device
    deg = g.degree
    padded = padded_degrees(deg)
    active = torch.nonzero(deg > 0).flatten()
    # receivers by (padded degree, id): the id is the tie-break because the sort is stable and `active` ascending
    order = active[torch.argsort(padded[active], stable=True)]
    D_sorted, d_sorted = padded[order], deg[order]
    Ds, counts = torch.unique_consecutive(D_sorted, return_counts=True)
    budget_per = Z_BUDGET // max(1, hidden * in_size)
    per = torch.clamp(torch.minimum(EDGE_BUDGET // Ds, torch.full_like(Ds, budget_per)), min=1)
    # position q of each receiver inside its bucket; a receiver starts a chunk when q % per == 0
    bucket_start = torch.cumsum(counts, 0) - counts
    q = torch.arange(order.numel(), device=device) - torch.repeat_interleave(bucket_start, counts)
    starts = torch.nonzero(q % torch.repeat_interleave(per, counts) == 0).flatten()
    n_chunks = starts.numel()
    recv_start = torch.cat([starts, starts.new_tensor([order.numel()])])
    cum = torch.cumsum(d_sorted, 0)
    first = cum - d_sorted  # each receiver's first position in the new edge order
    edge_start = torch.cat([first.new_zeros(1), cum])[recv_start]
    is_start = torch.zeros(order.numel(), dtype=torch.long, device=device)
    is_start[starts] = 1
    rel_q = q - q[starts][torch.cumsum(is_start, 0) - 1]  # receiver's row in its chunk
    # per receiver (by id): the shift from its receiver-sorted (CSR) position p to its new position, and the shift
    # from p to its slot in the chunk's padded layout (row * D + position in the receiver's list)
    shift = torch.zeros(g.n_dst, 2, dtype=torch.long, device=device)
    shift[order, 0] = first - g.rowptr[order]
    shift[order, 1] = rel_q * D_sorted - g.rowptr[order]
    p = torch.arange(g.num_edges, device=device)
    sh = torch.repeat_interleave(shift, deg, dim=0)  # (E, 2): each CSR position's receiver's shifts
    new_pos = p + sh[:, 0]
    eid = torch.empty_like(p).index_copy_(0, new_pos, g.perm)
    slot = torch.empty_like(p).index_copy_(0, new_pos, p + sh[:, 1])
    chunk_D = D_sorted[starts]
    n_rows = recv_start[1:] - recv_start[:-1]
    full = (edge_start[1:] - edge_start[:-1]) == n_rows * chunk_D
    # one device-to-host copy of the per-chunk scalars (a few numbers per chunk, no per-chunk tensor work)
    meta = torch.stack([chunk_D, full.long()]).cpu().tolist() if n_chunks else [[], []]
    return ChunkPlan(
        order, eid, slot, meta[0], recv_start.cpu().tolist(), edge_start.cpu().tolist(), [bool(f) for f in meta[1]]
    )


class _ValueChecks(threading.local):
    enabled = True


_VALUE_CHECKS = _ValueChecks()


class set_value_checks:
    """Turn the checks that read input values on the host on or off (on by default; per thread), as a function or as
    a context manager, like ``torch.set_grad_enabled``::

        ik_fast.graph.set_value_checks(False)          # from here on
        with ik_fast.graph.set_value_checks(False):    # in this block only
            loss = model(batch).sum()

    The checks are: node features, positions, ``edge_delta`` and ``edge_attr`` finite, and ``edge_index``'s entries
    in range when a graph is first prepared. Each reads one number on the host, a synchronisation on a GPU (four per
    training step of a layer); shapes, dtypes and devices are always checked. Without the value checks a NaN passes
    through as it does in ``torch.nn`` layers, and an out-of-range ``edge_index`` is undefined behaviour.

    They are skipped by themselves where values cannot be read: while ``torch.compile`` traces (the compiled step
    checks them in its registered ops) and while a CUDA graph is being captured (``torch.cuda.graph``): a captured
    step replays with no host synchronisation. A graph is then taken from the cache of :func:`prepare_graph`, so the
    warm-up steps a capture needs anyway must have prepared it (the same ``edge_index`` tensor)."""

    def __init__(self, enabled: bool):
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
        self.prev = _VALUE_CHECKS.enabled
        _VALUE_CHECKS.enabled = enabled

    def __enter__(self) -> "set_value_checks":
        return self

    def __exit__(self, *exc) -> None:
        _VALUE_CHECKS.enabled = self.prev


def _capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (never on a machine without CUDA)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def value_checks_enabled() -> bool:
    """Whether the checks of input values run here: :class:`set_value_checks` is on, and neither ``torch.compile``
    is tracing nor a CUDA graph capturing."""
    return _VALUE_CHECKS.enabled and not torch.compiler.is_compiling() and not _capturing()


_CACHE: "OrderedDict[tuple, Tuple[weakref.ref, Graph]]" = OrderedDict()
_CACHE_SIZE = 16


def prepare_graph(
    edge_index: Tensor, n_src: int, n_dst: int, device=None, finite: Sequence[Tuple[str, Optional[Tensor]]] = ()
) -> Graph:
    """Validate ``edge_index`` (2, E) (row 0 = source j, row 1 = receiver i) and build its CSR.

    The result is cached for the same tensor object (same version) and sizes, so a graph reused across layers or
    steps is prepared once. ``finite``: (name, tensor) pairs whose values are checked to be finite first (None
    entries are skipped).

    Inside ``torch.compile`` the checks of values and the receiver sort run in the registered op
    ``ik_fast::graph_csr`` (they depend on the data; its outputs' sizes follow from ``edge_index``'s shape and
    ``n_dst``, so one compiled graph serves every edge count), the rest is traced; the result is then not cached.
    """
    _check_edge_index(edge_index, device)
    if torch.compiler.is_compiling():
        return _traced_graph(edge_index, n_src, n_dst, finite)
    _check_finite(finite)
    key = (
        edge_index.data_ptr(),
        edge_index._version,
        tuple(edge_index.shape),
        str(edge_index.device),
        edge_index.dtype,
        int(n_src),
        int(n_dst),
    )
    hit = _CACHE.get(key)
    if hit is not None and hit[0]() is edge_index:
        _CACHE.move_to_end(key)
        return hit[1]
    if _capturing():
        raise RuntimeError(
            "edge_index was not prepared before this CUDA graph capture: run the step once outside the capture with "
            "the same edge_index tensor (the warm-up a capture needs) so that its graph is cached"
        )
    ei = edge_index.long()
    E = ei.shape[1]
    if E > 0 and value_checks_enabled():
        # (one read on the host: amin and amax take 5 operators, aminmax 9 and its min and item 5 more)
        min_src, min_dst, hi_src, hi_dst = torch.cat([ei.amin(1), ei.amax(1)]).tolist()
        lo = min(min_src, min_dst)
        if lo < 0:
            raise ValueError(f"edge_index has negative entries (min {lo})")
        if hi_src >= n_src:
            raise ValueError(f"edge_index[0] (sources) has entry {hi_src} but there are only {n_src} source nodes")
        if hi_dst >= n_dst:
            raise ValueError(f"edge_index[1] (receivers) has entry {hi_dst} but there are only {n_dst} receiver nodes")
    src, dst = ei[0].contiguous(), ei[1].contiguous()
    # a stable sort of 32-bit keys is ~1.7x faster than of 64-bit ones on CPU
    keys, perm = torch.sort(dst.int() if n_dst <= 2**31 - 1 else dst, stable=True)
    # the CSR from the sorted receivers: rowptr[i] = #edges into receivers < i (19 operators, against 27 for
    # bincount, zeros, cumsum and a slice assignment)
    rowptr = torch.searchsorted(keys, torch.arange(n_dst + 1, dtype=keys.dtype, device=ei.device))
    degree = rowptr[1:] - rowptr[:-1]
    g = Graph(src, dst, int(n_src), int(n_dst), perm, rowptr, degree)
    try:
        _CACHE[key] = (weakref.ref(edge_index), g)
        if len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    except TypeError:  # tensors that cannot be weakly referenced are simply not cached
        pass
    return g


def _check_edge_index(edge_index, device) -> None:
    """What :func:`prepare_graph` checks of ``edge_index`` without reading its values."""
    if not isinstance(edge_index, Tensor):
        raise TypeError(f"edge_index must be a torch.Tensor of shape (2, E), got {type(edge_index).__name__}")
    if edge_index.dim() != 2 or edge_index.shape[0] != 2:
        raise ValueError(f"edge_index must have shape (2, E), got {tuple(edge_index.shape)}")
    if edge_index.dtype.is_floating_point or edge_index.dtype.is_complex or edge_index.dtype == torch.bool:
        raise TypeError(f"edge_index must be an integer tensor, got dtype {edge_index.dtype}")
    if device is not None and edge_index.device != torch.device(device):
        raise ValueError(f"edge_index is on {edge_index.device} but the node features are on {device}")


def _check_finite(finite) -> None:
    if not value_checks_enabled():
        return
    for name, t in finite:
        if t is not None and not all_finite(t):
            raise ValueError(f"{name} contains NaN or infinite values")


@torch.library.custom_op("ik_fast::graph_csr", mutates_args=())
def graph_csr(edge_index: Tensor, n_src: int, n_dst: int, finite: List[Tensor], names: str) -> Tuple[Tensor, Tensor]:
    """(perm (E,), rowptr (n_dst + 1,)) of :func:`prepare_graph` (int64), after its checks of the values of
    ``edge_index`` and of the tensors ``finite`` (named by the lines of ``names``): the part of graph preparation
    that depends on the data, as one op for ``torch.compile``."""
    _check_finite(zip(names.split("\n"), finite))
    g = prepare_graph(edge_index, n_src, n_dst)
    # (an op's outputs are its own: the cached graph keeps its tensors)
    return g.perm.clone(), g.rowptr.clone()


@graph_csr.register_fake
def _(edge_index, n_src, n_dst, finite, names):
    return (
        edge_index.new_empty(edge_index.shape[1], dtype=torch.long),
        edge_index.new_empty(n_dst + 1, dtype=torch.long),
    )


def _traced_graph(edge_index: Tensor, n_src, n_dst, finite) -> Graph:
    """:func:`prepare_graph` while torch.compile traces: the sort and the checks in ``ik_fast::graph_csr``."""
    given = [(name, t) for name, t in finite if t is not None]
    perm, rowptr = torch.ops.ik_fast.graph_csr(
        edge_index, n_src, n_dst, [t.detach() for _, t in given], "\n".join(name for name, _ in given)
    )
    ei = edge_index.long()
    return Graph(ei[0], ei[1], n_src, n_dst, perm, rowptr, rowptr[1:] - rowptr[:-1])


INT32_LIMIT = 2**31 - 1


def check_int32_extents(where: str, **extents: int) -> None:
    """For kernels that address buffers with 32-bit offsets: every buffer extent (number of elements, or largest
    offset + 1) must be at most 2^31 - 1. Raises a ValueError naming the buffer otherwise; the torch and reference
    backends index with int64 throughout and need no such check."""
    for name, n in extents.items():
        if int(n) > INT32_LIMIT:
            raise ValueError(
                f"{where}: {name} needs {int(n):,} elements, more than the 2^31 - 1 = {INT32_LIMIT:,} "
                f"that 32-bit offsets address; split the graph into parts or use backend='torch'"
            )


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
    if finite and value_checks_enabled() and not all_finite(t):
        raise ValueError(f"{name} contains NaN or infinite values")


def all_finite(t: Tensor) -> bool:
    """Whether every element of ``t`` is finite, in one reduction and one read on the host (5 operators, against 17
    for ``torch.isfinite(t).all()``): a NaN or an infinity makes the sum non-finite, and only a sum of finite values
    that overflows needs the element-wise check."""
    return t.numel() == 0 or math.isfinite(t.sum().item()) or bool(torch.isfinite(t).all())


def check_node_features(x: Tensor, name: str, size: int, device, dtype, finite: bool = True) -> None:
    """Node features (N, size) on the layer's device and dtype, and finite: a NaN or an infinity raises a
    ``ValueError`` naming ``name`` and the first bad entry (``finite=False``: shape, device and dtype only).

    PyTorch's and escnn's layers (``torch.nn.Linear``, escnn's ``R3PointConv``) pass non-finite values through; ik_fast
    rejects them, as it rejects non-finite positions, ``edge_delta`` and ``edge_attr``: one node's NaN reaches every
    receiver it feeds (a convolution cannot mask it: NaN * 0 and inf * 0 are NaN) and, through a batch norm after
    the layer, every feature of the batch and the running statistics, far from its cause. The check is one
    reduction and one read on the host (:func:`all_finite`). While ``torch.compile`` traces, the values are not read
    here (that would break the graph): the callers check them where the data is eager (the registered ops
    ``ik_fast::eager_conv`` and ``ik_fast::graph_csr``)."""
    if isinstance(x, Tensor) and x.dim() == 3:
        raise ValueError(
            f"{name} must have shape (N, {size}) (one graph; batch several graphs into one by offsetting "
            f"their node indices), got a batched tensor of shape {tuple(x.shape)}"
        )
    _check_float(x, name, (None, size), device, dtype, finite=False)
    if finite and value_checks_enabled() and not all_finite(x):
        node, channel = (~torch.isfinite(x)).nonzero()[0].tolist()
        raise ValueError(
            f"{name} contains NaN or infinite values (first at node {node}, channel {channel}: "
            f"{x[node, channel].item()})"
        )


def check_positions(pos, name: str, rows: int, dim: int, finite: bool = True) -> None:
    """Positions (rows, dim), finite (``finite=False``: the caller has checked the values of this tensor already)."""
    if not isinstance(pos, Tensor) or pos.dim() != 2 or tuple(pos.shape) != (rows, dim):
        got = tuple(pos.shape) if isinstance(pos, Tensor) else type(pos).__name__
        raise ValueError(f"{name} must have shape ({rows}, {dim}), got {got}")
    if finite and value_checks_enabled() and not all_finite(pos):
        raise ValueError(f"{name} contains NaN or infinite values")


def check_edge_inputs(
    program,
    edge_delta: Tensor,
    edge_attr: Optional[Tensor],
    num_edges: Optional[int],
    device,
    dtype,
    finite: bool = True,
) -> None:
    """Validate per-edge vectors (E, n) and attributes (E, A) against a kernel program (``finite=False``: their
    shapes, dtypes and devices only)."""
    _check_float(edge_delta, "edge_delta", (num_edges, program.dim), device, dtype, finite)
    if program.attr_size:
        if edge_attr is None:
            raise ValueError(
                f"edge_attr is required: the kernel was built with an edge_attr_type of size {program.attr_size}"
            )
        _check_float(edge_attr, "edge_attr", (num_edges, program.attr_size), device, dtype, finite)
    elif edge_attr is not None and edge_attr.numel() and edge_attr.shape[-1] != 0:
        raise ValueError("edge_attr was given but the kernel was built without an edge_attr_type")
