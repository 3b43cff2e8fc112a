"""The one list of benchmark problems, shared by the benchmark suite, the command-line benchmark and the tests.

Each :class:`Problem` is frozen: it names the field types, the kernel MLP and the graph. Configs P, M and H are those
of the design notes; ``cpu`` is the foundation's CPU problem (16 fields of O(3) L <= 2, 144 dims, N=2048, k=16).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Dict, Optional

if TYPE_CHECKING:
    import torch

# torch and escnn are imported inside the functions that build layers and graphs: the problem list itself (names,
# sizes, descriptions) imports in milliseconds, for the command-line tools' help

__all__ = [
    "Problem",
    "PROBLEMS",
    "SWEEPS",
    "get_problem",
    "sweep_problems",
    "build_layer",
    "build_escnn_layer",
    "build_inputs",
]


@dataclass(frozen=True)
class Problem:
    name: str
    group: str = "O3"  # "O3": O(3) on R^3; "O2": O(2) on R^2
    L: int = 1  # fields: band-limited sphere representation up to L
    fields: int = 8
    n_layers: int = 3
    channels: int = 8
    n_attr: int = 4  # scalar edge attributes
    nodes: int = 2048
    k: int = 16
    graph: str = "knn"  # "knn" (random geometric graph), "qm9" (batches of real molecules), "skew" (hubs)
    molecules: int = 32
    description: str = ""
    nonlinearity: str = (
        "fourier_elu"  # the kernel MLP's (ImplicitKernel's nonlinearity); "M+gated" names M with "gated"
    )

    def with_nodes(self, nodes: int) -> "Problem":
        return replace(self, name=f"{self.name}@{nodes}", nodes=nodes)

    @property
    def dim(self) -> int:
        return 2 if self.group == "O2" else 3

    @property
    def field_dim(self) -> int:
        """Size of the feature field: fields x (sphere type (L+1)^2 on O(3); band-limited regular 2 + 4L on O(2))."""
        return self.fields * ((self.L + 1) ** 2 if self.group == "O3" else 2 + 4 * self.L)

    @property
    def approx_edges(self) -> int:
        return self.nodes * self.k


PROBLEMS: Dict[str, Problem] = {
    p.name: p
    for p in [
        Problem(
            "cpu",
            L=2,
            fields=16,
            channels=16,
            nodes=2048,
            k=16,
            description="foundation CPU problem: 16 x O(3) L<=2 (144 dims), MLP 3x16, 4 attrs, N=2048, k=16",
        ),
        Problem(
            "P",
            L=1,
            fields=8,
            channels=8,
            graph="qm9",
            molecules=32,
            nodes=0,
            k=0,
            description="QM9: 32 real molecules, all atom pairs, 8 x O(3) L<=1 (32 dims), MLP 3x8, 4 RBF attrs",
        ),
        Problem(
            "qm9-400",
            L=1,
            fields=8,
            channels=8,
            graph="qm9",
            molecules=1,
            nodes=0,
            k=0,
            description="QM9: one molecule (20 atoms, 400 edges: all atom pairs), P's layer; the small-graph case "
            "where 'torch' is slower than 'reference'",
        ),
        Problem(
            "M",
            L=1,
            fields=8,
            channels=8,
            nodes=32768,
            k=32,
            description="M: 8 x O(3) L<=1 (32 dims), MLP 3x8, 4 attrs, N=32768, k=32 (~1M edges)",
        ),
        Problem(
            "H",
            L=2,
            fields=16,
            channels=16,
            nodes=8192,
            k=24,
            description="H: 16 x O(3) L<=2 (144 dims), MLP 3x16, 4 attrs, N=8192, k=24 (~197k edges)",
        ),
        Problem(
            "skew",
            L=1,
            fields=8,
            channels=8,
            nodes=16384,
            k=16,
            graph="skew",
            description="degree skew: M's fields, 16384 nodes, one hub receiving 10^4 edges, Zipf in-degrees (mean 16)",
        ),
        Problem(
            "planar",
            group="O2",
            L=1,
            fields=8,
            channels=8,
            nodes=4096,
            k=16,
            description="2D: 8 x O(2) band-limited regular L<=1 (32 dims), MLP 3x8, 4 attrs, N=4096, k=16",
        ),
        Problem(
            "tiny",
            L=1,
            fields=2,
            channels=4,
            nodes=64,
            k=8,
            description="smoke test: 2 x O(3) L<=1, MLP 3x4, 4 attrs, N=64, k=8",
        ),
    ]
}

# Edge sweeps of configs M and H: target edge counts; nodes = edges / k. The CPU default is small enough to finish
# in minutes on 2 cores; the GPU sweep goes past the point where `reference` and escnn run out of memory.
SWEEPS = {
    "cpu": {"M": [10_000, 30_000, 100_000], "H": [2_500, 10_000]},
    "gpu": {
        "M": [10_000, 30_000, 100_000, 300_000, 1_000_000, 3_000_000, 10_000_000],
        "H": [10_000, 30_000, 100_000, 300_000, 1_000_000, 3_000_000, 10_000_000],
    },
}


def sweep_problems(kind: str = "cpu"):
    """Problem names of an edge sweep, e.g. ``["M@313", ...]``."""
    out = []
    for base, edges in SWEEPS[kind].items():
        k = PROBLEMS[base].k
        out += [f"{base}@{max(k, round(e / k))}" for e in edges]
    return out


def get_problem(name: str) -> Problem:
    """A problem by name: ``BASE``, ``BASE+NONLINEARITY`` (the kernel MLP's, e.g. ``H+gated``), either with
    ``@NODES``."""
    base, _, nodes = name.partition("@")
    base, _, kind = base.partition("+")
    if base not in PROBLEMS:
        raise ValueError(f"unknown problem {name!r}; known: {sorted(PROBLEMS)}")
    p = PROBLEMS[base]
    if kind:
        from ik_fast.spec.kernel import NONLINEARITIES

        if kind not in NONLINEARITIES:
            raise ValueError(f"unknown nonlinearity {kind!r} in problem {name!r}; known: {list(NONLINEARITIES)}")
        p = replace(p, name=f"{base}+{kind}", nonlinearity=kind)
    return p.with_nodes(int(nodes)) if nodes else p


def field_types(p: Problem):
    from escnn import gspaces
    from escnn import nn as enn

    if p.group == "O3":
        gs = gspaces.flipRot3dOnR3()
        rep = gs.fibergroup.bl_sphere_representation(L=p.L)
    elif p.group == "O2":
        gs = gspaces.flipRot2dOnR2(-1)
        rep = gs.fibergroup.bl_regular_representation(L=p.L)
    else:
        raise ValueError(f"problem group {p.group!r} is not supported")
    G = gs.fibergroup
    ft = enn.FieldType(gs, [rep] * p.fields)
    attr = enn.FieldType(gs, [G.trivial_representation] * p.n_attr) if p.n_attr else None
    return ft, attr


def build_layer(p: Problem, backend: str = "auto", device="cpu", seed: int = 0):
    """The ImplicitPointConv of a problem (same weights for the same seed, whatever the backend)."""
    import torch

    from ik_fast.nn.layers import ImplicitPointConv

    ft, attr = field_types(p)
    torch.manual_seed(seed)
    return ImplicitPointConv(
        ft, ft, attr, n_layers=p.n_layers, n_channels=p.channels, backend=backend, nonlinearity=p.nonlinearity
    ).to(device)


def build_escnn_layer(p: Problem, device="cpu", seed: int = 0):
    """escnn's analytic point convolution (R3PointConv / R2PointConv) on the same field types, with a receptive
    field matching the problem's graph (rings up to the 90th percentile of the edge length); no edge attributes."""
    import torch
    from escnn import nn as enn

    ft, _ = field_types(p)
    _, pos, ei, _ = build_inputs(p, seed=seed)
    lengths = (pos[ei[0]] - pos[ei[1]]).norm(dim=1)
    width = float(lengths.quantile(0.9)) if lengths.numel() else 1.0
    torch.manual_seed(seed)
    cls = enn.R3PointConv if p.dim == 3 else enn.R2PointConv
    return cls(ft, ft, width=max(width, 1e-3), n_rings=3).to(device)


def build_inputs(p: Problem, device="cpu", seed: int = 0, dtype: Optional[torch.dtype] = None):
    """(x (N, C), pos (N, 3), edge_index (2, E), edge_attr (E, A)) of a problem."""
    import torch

    from ik_fast.models.data import molecule_batch, qm9_molecules, random_geometric_graph, skewed_graph

    dtype = dtype or torch.get_default_dtype()
    g = torch.Generator().manual_seed(seed)
    if p.graph == "qm9":
        # from the middle of QM9, where molecules have the dataset's typical size (~18 atoms; the first entries are
        # CH4, NH3, H2O, ...)
        start = 60_000 + seed * p.molecules
        pos, _, ei, attr = molecule_batch(qm9_molecules(p.molecules, start=start), n_rbf=p.n_attr)
    else:
        if p.graph == "skew":
            pos, ei = skewed_graph(p.nodes, p.k, seed=seed)
        else:
            pos, ei = random_geometric_graph(p.nodes, p.k, dim=p.dim, seed=seed)
        d = pos[ei[0]] - pos[ei[1]]
        attr = torch.cat([d.norm(dim=1, keepdim=True), torch.rand(ei.shape[1], p.n_attr - 1, generator=g)], 1)
        attr = attr[:, : p.n_attr]
    x = torch.randn(pos.shape[0], p.field_dim, generator=g)
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(x), cast(pos), ei.to(device), cast(attr)
