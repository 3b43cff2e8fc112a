"""Graphs for demos, tests and benchmarks: random geometric k-NN graphs and real QM9 molecules (from qm9pack)."""

from __future__ import annotations

import ast
import csv
import importlib.util
import os
from typing import List, Optional, Tuple

import numpy as np
import torch
from scipy.spatial import cKDTree

__all__ = ["knn_graph", "radius_graph", "random_geometric_graph", "skewed_graph", "qm9_molecules", "molecule_batch"]


def _tree_points(pos: torch.Tensor) -> np.ndarray:
    return pos.detach().to("cpu", torch.float64).numpy()


def knn_graph(pos: torch.Tensor, k: int) -> torch.Tensor:
    """edge_index (2, N*k) of the k nearest neighbours of every node (itself included), source -> receiver.

    A k-d tree query (``scipy.spatial.cKDTree``): O(N log N), no N x N distance matrix."""
    n = pos.shape[0]
    k = min(k, n)
    if n == 0 or k == 0:
        return torch.zeros(2, 0, dtype=torch.long, device=pos.device)
    _, nb = cKDTree(_tree_points(pos)).query(_tree_points(pos), k=k)
    nb = torch.from_numpy(np.asarray(nb, dtype=np.int64).reshape(n, k))
    dst = torch.arange(n).repeat_interleave(k)
    return torch.stack([nb.reshape(-1), dst]).to(pos.device)


def radius_graph(
    pos: torch.Tensor, cutoff: float, batch: Optional[torch.Tensor] = None, self_loops: bool = True
) -> torch.Tensor:
    """edge_index (2, E) of every ordered pair of nodes closer than ``cutoff`` (both directions), restricted to pairs
    in the same graph when ``batch`` (N,) gives each node's graph, with self-loops unless ``self_loops=False``.
    Edges are sorted by (receiver, source). A k-d tree pair query (``scipy.spatial.cKDTree.query_pairs``)."""
    if not cutoff > 0:
        raise ValueError(f"cutoff must be positive, got {cutoff!r}")
    n = pos.shape[0]
    pairs = (
        cKDTree(_tree_points(pos)).query_pairs(r=float(cutoff), output_type="ndarray")
        if n
        else np.zeros((0, 2), dtype=np.int64)
    )
    pairs = torch.from_numpy(pairs.astype(np.int64)).reshape(-1, 2)
    if batch is not None:
        b = batch.cpu()
        pairs = pairs[b[pairs[:, 0]] == b[pairs[:, 1]]]
    parts = [pairs.t(), pairs.t().flip(0)]
    if self_loops:
        parts.append(torch.arange(n).repeat(2, 1))
    ei = torch.cat(parts, 1)
    order = torch.argsort(ei[1] * max(n, 1) + ei[0])
    return ei[:, order].to(pos.device)


def random_geometric_graph(n: int, k: int, dim: int = 3, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Positions normal with std n^(1/3)/2 (a density that does not change with n) and their k-NN graph."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.randn(n, dim, generator=g) * (n ** (1 / 3) / 2)
    return pos, knn_graph(pos, k)


def skewed_graph(n: int, mean_degree: int, hub_degree: int = 10_000, seed: int = 0):
    """Positions as :func:`random_geometric_graph`; in-degrees Zipf-distributed (mean about ``mean_degree``) plus
    one hub receiving ``hub_degree`` edges; sources of each receiver are its nearest neighbours."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.randn(n, 3, generator=g) * (n ** (1 / 3) / 2)
    ranks = torch.arange(1, n + 1, dtype=torch.float64)
    w = 1.0 / ranks
    deg = torch.clamp((w / w.sum() * n * mean_degree).round().long(), min=1, max=min(n, hub_degree))
    deg = deg[torch.randperm(n, generator=g)]
    deg[0] = min(hub_degree, n)
    tree = cKDTree(_tree_points(pos))
    pts = _tree_points(pos)
    src, dst = [], []
    order = torch.argsort(deg)
    # blocks of receivers with similar degrees, each one k-d tree query of at most ~2^16 neighbours
    starts, s = [], 0
    while s < n:
        starts.append(s)
        s += max(1, min(2048, 2**16 // int(deg[order[min(s + 2047, n - 1)]])))
    for s, e in zip(starts, starts[1:] + [n]):
        r = order[s:e]
        kmax = int(deg[r].max())
        _, nb = tree.query(pts[r.numpy()], k=kmax)
        nb = torch.from_numpy(np.asarray(nb, dtype=np.int64).reshape(r.numel(), kmax))
        keep = torch.arange(kmax)[None, :] < deg[r][:, None]  # receiver r keeps its deg[r] nearest sources
        src.append(nb[keep])
        dst.append(r[:, None].expand(-1, kmax)[keep])
    src, dst = torch.cat(src), torch.cat(dst)
    order = torch.argsort(dst * n + src)  # receiver-major, as before
    return pos, torch.stack([src[order], dst[order]])


def _qm9_files() -> List[str]:
    spec = importlib.util.find_spec("qm9pack")  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("QM9 needs the qm9pack package: pip install --no-deps qm9pack")
    root = os.path.join(list(spec.submodule_search_locations)[0], "data")
    return [os.path.join(root, f"qm9_part{i}.csv") for i in (1, 2, 3)]


ELEMENTS = ("H", "C", "N", "O", "F")


def qm9_molecules(count: int, start: int = 0) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """``count`` QM9 molecules from index ``start``: (positions in Angstrom (n, 3), element ids (n,))."""
    out = []
    seen = 0
    csv.field_size_limit(1 << 24)
    for path in _qm9_files():
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                if seen >= start:
                    # Python literals, not JSON ("0." occurs); small numbers may be written the Mathematica way,
                    # 1.2*^-6
                    pos = torch.tensor(ast.literal_eval(row["XYZ_Ang"].replace("*^", "e")), dtype=torch.float64)
                    els = ast.literal_eval(row["Elements"])
                    out.append((pos, torch.tensor([ELEMENTS.index(e) for e in els])))
                    if len(out) == count:
                        return out
                seen += 1
    return out


def molecule_batch(molecules, n_rbf: int = 4, cutoff: Optional[float] = None, rbf_range: Optional[float] = None):
    """Batch molecules into one graph.

    Edges: every pair of atoms of a molecule, self included, when ``cutoff`` is None (config P); else the radius graph
    of each molecule (pairs closer than ``cutoff``, self-loops included; :func:`radius_graph`). Edge attributes are
    ``n_rbf`` Gaussian radial-basis features of the distance, centred on ``linspace(0, rbf_range, n_rbf)``
    (``rbf_range`` defaults to the cutoff, or 4 Angstrom without one).

    Returns (pos (N, 3), atom types (N,), edge_index (2, E), edge_attr (E, n_rbf)).
    """
    pos, typ, edges, batch = [], [], [], []
    off = 0
    for k, (p, t) in enumerate(molecules):
        n = p.shape[0]
        if cutoff is None:
            i = torch.arange(n)
            src, dst = torch.meshgrid(i, i, indexing="ij")
            edges.append(torch.stack([src.reshape(-1), dst.reshape(-1)]) + off)
        pos.append(p)
        typ.append(t)
        batch.append(torch.full((n,), k))
        off += n
    pos = torch.cat(pos).to(torch.get_default_dtype())
    ei = torch.cat(edges, 1) if cutoff is None else radius_graph(pos, cutoff, torch.cat(batch))
    dist = (pos[ei[0]] - pos[ei[1]]).norm(dim=1, keepdim=True)
    rng = rbf_range if rbf_range is not None else (cutoff if cutoff is not None else 4.0)
    centers = torch.linspace(0, rng, n_rbf)
    attr = torch.exp(-((dist - centers) ** 2) / (2 * (rng / n_rbf) ** 2))
    return pos, torch.cat(typ), ei, attr
