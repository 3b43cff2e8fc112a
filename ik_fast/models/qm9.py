"""QM9 for training: the molecules of ``qm9pack`` parsed once into NumPy arrays (cached under ``build/``), fixed
splits by seed, graphs and edge attributes for :class:`ik_fast.models.QM9Model`.

qm9pack's ``__init__`` needs ``pkg_resources`` and pandas; only its CSV files are read here (csv + NumPy).
Targets are converted to the paper's units: meV for ``homo``, ``lumo`` and ``gap`` (1 Hartree = 27,211.386 meV).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from ik_fast.models.data import ELEMENTS, _qm9_files, radius_graph

__all__ = [
    "QM9Data",
    "load_qm9",
    "qm9_splits",
    "QM9Batch",
    "qm9_batches",
    "collate",
    "EDGE_ATTRS",
    "edge_attr_size",
    "TARGETS",
]

HARTREE_MEV = 27211.386245988
# target name -> (CSV column, factor to the paper's unit, unit)
TARGETS: Dict[str, Tuple[str, float, str]] = {
    "homo": ("HOMO_au", HARTREE_MEV, "meV"),
    "lumo": ("LUMO_au", HARTREE_MEV, "meV"),
    "gap": ("HOMO_LUMO_gap_au", HARTREE_MEV, "meV"),
    "mu": ("Dipole_debye", 1.0, "D"),
    "alpha": ("Polarizability_bohr3", 1.0, "bohr^3"),
    "r2": ("R2_bohr2", 1.0, "bohr^2"),
    "zpve": ("ZPVE_au", HARTREE_MEV, "meV"),
    "cv": ("Heatcapacity_Cv_cal_mol_K", 1.0, "cal/mol K"),
}
EDGE_ATTRS = ("none", "bond", "atom")
# covalent radii (Angstrom) of H, C, N, O, F: a pair closer than 1.2 x the sum of radii is taken as bonded
COVALENT_RADII = np.array([0.31, 0.76, 0.71, 0.66, 0.57])
_CACHE_VERSION = 1


@dataclass
class QM9Data:
    """All molecules as flat arrays: molecule m has atoms ``offsets[m]:offsets[m+1]``."""

    pos: np.ndarray  # (atoms, 3) float32, Angstrom
    z: np.ndarray  # (atoms,) int8, index into ELEMENTS
    offsets: np.ndarray  # (molecules + 1,) int64
    targets: Dict[str, np.ndarray]  # name -> (molecules,) float64 in the paper's units

    def __len__(self) -> int:
        return len(self.offsets) - 1


def _parse_floats(s: str) -> np.ndarray:
    # Python/Mathematica literals: "0." occurs and small numbers may be written 1.2*^-6
    return np.array(s.replace("[", "").replace("]", "").replace("*^", "e").split(","), dtype=np.float64)


def _parse_csvs(limit: Optional[int]) -> QM9Data:
    csv.field_size_limit(1 << 24)
    pos, z, counts = [], [], []
    cols = {k: [] for k in TARGETS}
    el_index = {e: i for i, e in enumerate(ELEMENTS)}
    for path in _qm9_files():
        with open(path, newline="") as f:
            reader = csv.reader(f)
            header = next(reader)
            ix, ie = header.index("XYZ_Ang"), header.index("Elements")
            it = {k: header.index(c) for k, (c, _, _) in TARGETS.items()}
            for row in reader:
                p = _parse_floats(row[ix]).reshape(-1, 3)
                els = row[ie].strip("[]").replace("'", "").split(",")
                if len(els) != p.shape[0]:
                    raise ValueError(f"{path}: molecule {row[1]} has {len(els)} elements but {p.shape[0]} positions")
                pos.append(p)
                z.append([el_index[e.strip()] for e in els])
                counts.append(len(els))
                for k, j in it.items():
                    cols[k].append(float(row[j].replace("*^", "e")))
                if limit is not None and len(counts) >= limit:
                    break
        if limit is not None and len(counts) >= limit:
            break
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    targets = {k: np.asarray(v) * TARGETS[k][1] for k, v in cols.items()}
    return QM9Data(
        np.concatenate(pos).astype(np.float32), np.concatenate([np.asarray(a, np.int8) for a in z]), offsets, targets
    )


def default_cache_dir() -> str:
    return os.environ.get("IK_FAST_CACHE", os.path.join(os.path.dirname(os.path.dirname(__file__)), "build"))


def load_qm9(limit: Optional[int] = None, cache_dir: Optional[str] = None) -> QM9Data:
    """Every QM9 molecule of qm9pack (130,831), or the first ``limit``; parsed once and cached as
    ``<cache_dir>/qm9_v1[_N].npz`` (default ``build/`` beside the package, or $IK_FAST_CACHE)."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of molecules, got {limit}")
    cache_dir = cache_dir or default_cache_dir()
    name = f"qm9_v{_CACHE_VERSION}" + (f"_{limit}" if limit is not None else "") + ".npz"
    path = os.path.join(cache_dir, name)
    if os.path.exists(path):
        with np.load(path) as f:
            return QM9Data(f["pos"], f["z"], f["offsets"], {k: f["t_" + k] for k in TARGETS})
    data = _parse_csvs(limit)
    os.makedirs(cache_dir, exist_ok=True)
    tmp = path + f".{os.getpid()}.tmp.npz"
    np.savez(tmp, pos=data.pos, z=data.z, offsets=data.offsets, **{"t_" + k: v for k, v in data.targets.items()})
    os.replace(tmp, path)  # atomic: concurrent processes (torchrun) never read a half-written cache
    return data


def qm9_splits(
    n: int, seed: int = 0, n_train: Optional[int] = None, n_val: Optional[int] = None, n_test: Optional[int] = None
) -> Dict[str, np.ndarray]:
    """A fixed random split of ``range(n)`` by ``seed``: by default the research code's proportions (100,000 of
    130,831 for training, 10% for testing, the rest for validation), scaled to ``n``. Smaller ``n_*`` take the first
    indices of each part, so a reduced budget uses subsets of the same split."""
    perm = np.random.default_rng(seed).permutation(n)
    tr = int(round(n * 100_000 / 130_831))
    te = int(0.1 * n)
    parts = {"train": perm[:tr], "val": perm[tr : n - te], "test": perm[n - te :]}
    for k, m in (("train", n_train), ("val", n_val), ("test", n_test)):
        if m is not None:
            if m < 1 or m > len(parts[k]):
                raise ValueError(f"n_{k}={m} is out of range: the {k} part has {len(parts[k])} molecules")
            parts[k] = parts[k][:m]
    return parts


def edge_attr_size(kind: str) -> int:
    if kind not in EDGE_ATTRS:
        raise ValueError(f"edge_attrs must be one of {EDGE_ATTRS}, got {kind!r}")
    return {"none": 0, "bond": 4, "atom": 2 * len(ELEMENTS)}[kind]


@dataclass
class QM9Batch:
    x: torch.Tensor  # (N, 5) one-hot atom types
    pos: torch.Tensor  # (N, 3), scaled by 1 / pos_scale
    edge_index: torch.Tensor  # (2, E), source -> receiver
    edge_attr: Optional[torch.Tensor]  # (E, A) or None
    batch: torch.Tensor  # (N,) molecule of each atom
    y: torch.Tensor  # (B,) target in the paper's units
    n_graphs: int

    def to(self, device) -> "QM9Batch":
        return QM9Batch(
            self.x.to(device),
            self.pos.to(device),
            self.edge_index.to(device),
            None if self.edge_attr is None else self.edge_attr.to(device),
            self.batch.to(device),
            self.y.to(device),
            self.n_graphs,
        )


def collate(
    data: QM9Data, idx, target: str, cutoff: float = 2.0, edge_attrs: str = "bond", pos_scale: float = 1.7415
) -> QM9Batch:
    """Disjoint union of the molecules ``idx``: a radius graph per molecule (every ordered pair of distinct atoms
    within ``cutoff`` Angstrom, :func:`ik_fast.models.data.radius_graph`) and edge attributes of kind ``edge_attrs``:

    - ``none``: no attributes (the kernel sees only the edge vector);
    - ``bond``: 4 scalars: covalent-bond indicator (distance < 1.2 x sum of covalent radii) and 3 Gaussian
      radial-basis functions of the distance (centres 1, 1.5, 2 Angstrom);
    - ``atom``: 10 scalars: the one-hot element of the source and of the receiver.

    Positions are divided by ``pos_scale`` (the research code's position standard deviation, 1.74 Angstrom) so that
    bonds fall inside the kernel's Gaussian shell (sigma 0.5 at initialisation).
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {sorted(TARGETS)}, got {target!r}")
    edge_attr_size(edge_attrs)
    idx = np.asarray(idx)
    starts, ends = data.offsets[idx], data.offsets[idx + 1]
    counts = ends - starts
    atom_idx = np.concatenate([np.arange(s, e) for s, e in zip(starts, ends)])
    pos = torch.from_numpy(data.pos[atom_idx].astype(np.float32))
    z = torch.from_numpy(data.z[atom_idx].astype(np.int64))
    batch = torch.repeat_interleave(torch.arange(len(idx)), torch.from_numpy(counts))
    # the radius graph of each molecule (a k-d tree pair query, ik_fast.models.data.radius_graph), in (source, receiver)
    # order within the batch
    ei = radius_graph(pos, cutoff, batch=batch, self_loops=False)
    ei = ei[:, torch.argsort(ei[0] * max(len(pos), 1) + ei[1])]
    src, dst = ei[0], ei[1]
    dist = (pos[src] - pos[dst]).norm(dim=1)
    if edge_attrs == "none":
        attr = None
    elif edge_attrs == "bond":
        r = torch.from_numpy(COVALENT_RADII.astype(np.float32))
        bonded = (dist < 1.2 * (r[z[src]] + r[z[dst]])).float()
        centres = torch.tensor([1.0, 1.5, 2.0])
        rbf = torch.exp(-((dist[:, None] - centres) ** 2) / (2 * 0.25**2))
        attr = torch.cat([bonded[:, None], rbf], 1)
    else:
        eye = torch.eye(len(ELEMENTS))
        attr = torch.cat([eye[z[src]], eye[z[dst]]], 1)
    x = torch.nn.functional.one_hot(z, len(ELEMENTS)).float()
    y = torch.from_numpy(data.targets[target][idx].astype(np.float32))
    return QM9Batch(x, pos / pos_scale, torch.stack([src, dst]), attr, batch, y, len(idx))


def qm9_batches(
    data: QM9Data,
    indices: np.ndarray,
    batch_size: int,
    target: str,
    shuffle: bool,
    generator: Optional[np.random.Generator] = None,
    **collate_kwargs,
) -> Iterator[QM9Batch]:
    """Batches of ``batch_size`` molecules from ``indices`` (shuffled with ``generator`` when ``shuffle``)."""
    order = np.asarray(indices)
    if shuffle:
        order = order[(generator or np.random.default_rng()).permutation(len(order))]
    for s in range(0, len(order), batch_size):
        yield collate(data, order[s : s + batch_size], target, **collate_kwargs)


def split_sizes(splits: Dict[str, np.ndarray]) -> List[str]:
    return [f"{k} {len(v)}" for k, v in splits.items()]
