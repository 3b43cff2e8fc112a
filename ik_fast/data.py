"""Graphs for demos, tests and benchmarks: random geometric k-NN graphs and real QM9 molecules (from qm9pack)."""

from __future__ import annotations

import ast
import csv
import importlib.util
import os
from typing import List, Tuple

import torch

__all__ = ["knn_graph", "random_geometric_graph", "skewed_graph", "qm9_molecules", "molecule_batch"]


def knn_graph(pos: torch.Tensor, k: int, block: int = 4096) -> torch.Tensor:
    """edge_index (2, N*k) of the k nearest neighbours of every node (itself included), source -> receiver."""
    n = pos.shape[0]
    k = min(k, n)
    nbrs = []
    for s in range(0, n, block):
        d = torch.cdist(pos[s:s + block], pos)
        nbrs.append(d.topk(k, dim=1, largest=False).indices)
    nb = torch.cat(nbrs)
    dst = torch.arange(n, device=pos.device).repeat_interleave(k)
    return torch.stack([nb.reshape(-1), dst])


def random_geometric_graph(n: int, k: int, dim: int = 3, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Positions normal with std n^(1/3)/2 and their k-NN graph, as in the design notes."""
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
    src, dst = [], []
    for s in range(0, n, 2048):
        d = torch.cdist(pos[s:s + 2048], pos)
        kmax = int(deg[s:s + 2048].max())
        nb = d.topk(kmax, dim=1, largest=False).indices
        for r in range(nb.shape[0]):
            k = int(deg[s + r])
            src.append(nb[r, :k])
            dst.append(torch.full((k,), s + r, dtype=torch.long))
    return pos, torch.stack([torch.cat(src), torch.cat(dst)])


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


def molecule_batch(molecules, n_rbf: int = 4, cutoff: float = 4.0):
    """Batch molecules into one graph: every pair of atoms of a molecule (self included) is an edge.

    Returns (pos (N, 3), atom types (N,), edge_index (2, E), edge_attr (E, n_rbf)) with Gaussian radial-basis
    features of the distance as scalar edge attributes.
    """
    pos, typ, edges = [], [], []
    off = 0
    for p, t in molecules:
        n = p.shape[0]
        i = torch.arange(n)
        src, dst = torch.meshgrid(i, i, indexing="ij")
        edges.append(torch.stack([src.reshape(-1), dst.reshape(-1)]) + off)
        pos.append(p)
        typ.append(t)
        off += n
    pos = torch.cat(pos).to(torch.get_default_dtype())
    ei = torch.cat(edges, 1)
    dist = (pos[ei[0]] - pos[ei[1]]).norm(dim=1, keepdim=True)
    centers = torch.linspace(0, cutoff, n_rbf)
    attr = torch.exp(-((dist - centers) ** 2) / (2 * (cutoff / n_rbf) ** 2))
    return pos, torch.cat(typ), ei, attr
