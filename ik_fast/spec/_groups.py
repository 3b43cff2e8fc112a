"""Per-group choices of the implicit kernel's MLP: band limit, hidden representation, nonlinearity, grid.

This is the only place that knows which subgroup of O(n) a gspace carries. The table (also in the docs' semantics page):

=======================  ===================  ================================  ===============================
group (escnn class)      frequency of irrep   hidden field per channel          nonlinearity and default grid
=======================  ===================  ================================  ===============================
SO(3)                    l                    sphere S^2 = SO(3)/SO(2), l <= L  quotient Fourier ELU, 60m-pt ico orbits
O(3)                     l                    S^2 x {+-1} = O(3)/SO(2), l <= L  quotient Fourier ELU, 120m-pt ico orbits
SO(2) (R^2, R^3 axis)    k                    regular, k < L                    Fourier ELU, N regular rotations
O(2) (R^2, cone)         k                    regular, k < L                    Fourier ELU, N rotations x 2 flips
cylinder C2 x SO(2)/O(2) k of the 2nd factor  regular of the product, k < L     Fourier ELU, 2 x N (x 2) elements
finite (C_N, D_N, I,     --                   regular representation            pointwise ELU (exactly equivariant)
  Ih, O, Oh, inversion,
  mirror, trivial, ...)
=======================  ===================  ================================  ===============================

L is the hidden band limit: (max frequency of Hom(F_in, F_out) = F_out (x) F_in) + 1, as in the paper, unless the
user passes ``band_limit``. The default N for the circle is the research code's: 40 when L = 3, else 125. On the
sphere the default grid is the union of the fewest (m) generic icosahedral orbits whose sampling matrix has full column
rank and condition number <= MAX_GRID_CONDITION (m = 1 up to L = 5); ``grid="paper"`` gives the research code's grids.
On O(3) the research code keeps only the "sphere" irreps (l % 2, l); every other irrep that the inputs, attributes
or outputs need (a pseudoscalar attribute, the pseudovector part of vector (x) vector) is added to the hidden field,
which the quotient by SO(2) allows. Any irrep that still cannot be carried raises ``ValueError``.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import sys
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple

import numpy as np
import torch
from escnn import group, gspaces
from escnn import nn as enn

__all__ = [
    "HiddenSpec",
    "irrep_frequency",
    "max_frequency",
    "build_hidden",
    "instantiate_irreps",
    "sampling_quality",
    "MAX_GRID_CONDITION",
    "escnn_build",
]

# escnn's debug output while ik_fast builds a kernel (see escnn_build): `logging.getLogger("ik_fast.escnn")` at
# DEBUG level shows it
log = logging.getLogger("ik_fast.escnn")


def _escnn_print(*args, sep=" ", end="\n", file=None, flush=False):
    """escnn's ``print`` inside :func:`escnn_build`: what it writes to stdout (debug lines such as ``O(2) (1, 0)
    (1, 1) (1, 1) 4``: a Clebsch-Gordan system that needed more random samples than the group has generators) goes
    to the ``ik_fast.escnn`` logger at DEBUG level; output to another file is printed as usual."""
    if file is not None and file is not sys.stdout:
        builtins.print(*args, sep=sep, end=end, file=file, flush=flush)
    else:
        log.debug("escnn: %s", sep.join(str(a) for a in args))


def sylvester_constraint(rho_1, rho_2):
    """escnn's Sylvester constraint (``escnn.group._numerical.build_sylvester_constraint``: the rows
    ``kron(I, rho_1(g)) - kron(rho_2(g)^T, I)`` of every sample g, stacked) computed with dense arrays in one pass.

    escnn builds it with ``scipy.sparse.kronsum`` per sample and its callers densify it at once; for the small
    irreps of a Clebsch-Gordan system (sizes 1-2 on O(2)) the sparse constructors' overhead was 80% of building the
    first O(2) layer (11.8 of 14.7 s). The values are bit for bit escnn's (every zero is +0.0, as
    ``todense()`` gives), so the numerical solutions, and what escnn caches on disk, are unchanged."""
    from scipy import sparse

    assert len(rho_1) == len(rho_2) and len(rho_1) > 0
    a = np.stack([np.asarray(r) for r in rho_1])  # (S, d1, d1)
    b = np.stack([np.asarray(r) for r in rho_2])  # (S, d2, d2)
    S, d1, d2 = a.shape[0], a.shape[1], b.shape[1]
    dt = np.result_type(a.dtype, b.dtype)  # scipy's kronsum: identities of the operands' common type
    # row (i, k), column (j, l): delta_ij a[k, l] - b[j, i] delta_kl   (i, j < d2; k, l < d1)
    c = np.einsum("ij,skl->sikjl", np.eye(d2, dtype=dt), a) - np.einsum("sji,kl->sikjl", b, np.eye(d1, dtype=dt))
    c = c.reshape(S * d2 * d1, d2 * d1)
    c[c == 0] = 0.0  # no -0.0: scipy drops zero entries and sums x + (-x) to +0.0
    return sparse.csc_matrix(c)


_scope_lock = threading.Lock()
_scope_depth = 0
_scope_saved: list = []


def _escnn_patches():
    """(module, name, replacement) of what :func:`escnn_build` substitutes; only names that escnn has, in the form
    this was written for (escnn 1.0.11), so that another escnn version is left as it is."""
    try:
        from escnn.group import _clebsh_gordan as cg
        from escnn.group import _numerical as num
    except ImportError:
        return []
    out = []
    if callable(getattr(cg, "_clebsh_gordan_tensor", None)):
        out.append((cg, "print", _escnn_print))
    original = getattr(num, "build_sylvester_constraint", None)
    if callable(original) and getattr(original, "__module__", None) == num.__name__:
        for mod in (num, cg):
            if getattr(mod, "build_sylvester_constraint", None) is original:
                out.append((mod, "build_sylvester_constraint", sylvester_constraint))
    return out


@contextlib.contextmanager
def escnn_build():
    """While ik_fast builds a kernel with escnn: escnn's debug prints go to the ``ik_fast.escnn`` logger (DEBUG)
    instead of stdout, and escnn's numerical Clebsch-Gordan solver builds its constraint matrices densely
    (:func:`sylvester_constraint`, same values). Warnings are untouched. Re-entrant and thread-safe: the substitutions
    are made by the outermost scope and undone when the last one exits."""
    global _scope_depth
    with _scope_lock:
        if _scope_depth == 0:
            for mod, name, repl in _escnn_patches():
                _scope_saved.append((mod, name, mod.__dict__.get(name, _MISSING)))
                setattr(mod, name, repl)
        _scope_depth += 1
    try:
        yield
    finally:
        with _scope_lock:
            _scope_depth -= 1
            if _scope_depth == 0:
                while _scope_saved:
                    mod, name, old = _scope_saved.pop()
                    if old is _MISSING:
                        delattr(mod, name)
                    else:
                        setattr(mod, name, old)


_MISSING = object()


def _family(G) -> str:
    if isinstance(G, group.SO3):
        return "SO3"
    if isinstance(G, group.O3):
        return "O3"
    if isinstance(G, group.SO2):
        return "SO2"
    if isinstance(G, group.O2):
        return "O2"
    if not G.continuous:
        return "finite"
    if isinstance(G, group.DirectProductGroup):
        return "product"
    raise NotImplementedError(f"ik_fast has no nonlinearity for the group {G.name}")


def irrep_frequency(G, irrep_id) -> Optional[int]:
    """Angular frequency of an irrep of ``G``; ``None`` for finite groups (no band limit)."""
    fam = _family(G)
    if fam in ("SO3", "SO2"):
        return int(irrep_id[0])
    if fam in ("O3", "O2"):
        return int(irrep_id[1])
    if fam == "product":
        freqs = [
            irrep_frequency(G.G1, irrep_id[0]) if G.G1.continuous else None,
            irrep_frequency(G.G2, irrep_id[1]) if G.G2.continuous else None,
        ]
        freqs = [f for f in freqs if f is not None]
        return max(freqs) if freqs else None
    return None


def instantiate_irreps(G, K: int) -> None:
    """Build every irrep of ``G`` (and of the factors of a product group) up to frequency ``K``.

    escnn decomposes tensor products and builds equivariant bases numerically over the irreps a group has
    instantiated, and fails deep inside (``InsufficientIrrepsException``) when a needed one is missing: a gspace made
    with a small ``maximum_frequency`` (``flipRot2dOnR2(-1, maximum_frequency=4)``) has too few for the kernel MLP."""
    fam = _family(G)
    if fam == "finite":
        return
    if fam == "SO2":
        for k in range(K + 1):
            G.irrep(k)
    elif fam == "O2":
        G.irrep(0, 0)
        G.irrep(1, 0)
        for k in range(1, K + 1):
            G.irrep(1, k)
    elif fam == "SO3":
        for l in range(K + 1):
            G.irrep(l)
    elif fam == "O3":
        for l in range(K + 1):
            G.irrep(0, l)
            G.irrep(1, l)
    else:
        for H in (G.G1, G.G2):
            if H.continuous:
                instantiate_irreps(H, K)
        f1 = [irr.id for irr in G.G1.irreps()] if not G.G1.continuous else G.G1.bl_irreps(K)
        f2 = [irr.id for irr in G.G2.irreps()] if not G.G2.continuous else G.G2.bl_irreps(K)
        for a in f1:
            for b in f2:
                G.irrep(a, b)


def max_frequency(G, reps) -> Optional[int]:
    freqs = [irrep_frequency(G, irr) for rep in reps for irr in rep.irreps]
    freqs = [f for f in freqs if f is not None]
    return max(freqs) if freqs else None


@dataclass
class HiddenSpec:
    """What the MLP's hidden layers use: the field type of one layer and the nonlinearity's sampling matrices."""

    hidden_type: Any  # escnn FieldType on no_base_space(G): channels x rho
    rho_size: int
    A: Optional[torch.Tensor]  # (grid, rho_size) inverse Fourier transform, None for a pointwise ELU
    Ainv: Optional[torch.Tensor]  # (rho_size, grid) Fourier transform
    description: str
    make_module: Any  # () -> the escnn module of the nonlinearity (for tests against escnn)
    grid_symmetries: List[Any] = field(default_factory=list)  # elements of G under which the ELU is exact
    grid_rank: Optional[int] = None
    grid_condition: Optional[float] = None


# Largest condition number of the sampling matrix A (grid x hidden dimension) accepted for a default grid. A
# rank-deficient A loses the hidden components in its null space (Ainv A != 1), an ill-conditioned one amplifies
# rounding; user grids (and grid="paper") beyond it only warn.
MAX_GRID_CONDITION = 100.0
MAX_SYMMETRIES = 24  # grid symmetries kept per kernel (for the tests' exact elements)


def sampling_quality(A) -> Tuple[int, float]:
    """(rank, condition number) of a sampling matrix ``A`` (grid points x hidden dimension); the condition number
    is infinite when A is rank-deficient."""
    sv = np.linalg.svd(np.asarray(A, dtype=np.float64), compute_uv=False)
    if sv.size == 0 or sv[0] == 0:
        return 0, float("inf")
    rank = int((sv > sv[0] * 1e-10).sum())
    full = min(A.shape) == A.shape[1]
    return rank, float(sv[0] / sv[-1]) if full and rank == A.shape[1] else float("inf")


def _circle_n(L: int) -> int:
    return 40 if L == 3 else 125


def build_hidden(gspace0, needed_irreps, band_limit: Optional[int], channels: int, grid=None) -> HiddenSpec:
    """Hidden field type and nonlinearity for the group of ``gspace0`` (a ``no_base_space`` gspace).

    ``needed_irreps``: ids of every irrep of the MLP's input and output, which the hidden field must carry.
    ``grid``: None (the default grid: the smallest well-conditioned one, see the docs' semantics page), ``"paper"``
    (the research code's grids) or keyword arguments for ``G.grid`` to sample the Fourier nonlinearity on another grid.
    """
    G = gspace0.fibergroup
    fam = _family(G)
    needed = set(needed_irreps)
    if fam == "finite":
        rho = G.regular_representation
        htype = gspace0.type(*[rho] * channels)
        return HiddenSpec(
            htype,
            rho.size,
            None,
            None,
            f"regular representation of {G.name} ({rho.size}), pointwise ELU",
            lambda: enn.ELU(htype),
            list(G.elements),
        )

    L = band_limit
    user = grid if isinstance(grid, dict) else None
    if fam in ("SO3", "O3"):
        if fam == "SO3":
            sg, base, what = (False, -1), [(l,) for l in range(L + 1)], "sphere SO(3)/SO(2)"
        else:
            sg, base, what = (False, False, -1), [(l % 2, l) for l in range(L + 1)], "O(3)/SO(2) = sphere x {+-1}"
        irreps = sorted(set(base) | needed)
        symmetries = G.grid("ico")  # the icosahedral group (I for SO(3), I x {+-1} for O(3))
        if user is not None or grid == "paper":
            return _quotient(
                gspace0, sg, irreps, needed, channels, user or {"type": "ico"}, what, symmetries, strict=False
            )
        for m in range(1, 9):  # unions of m generic orbits of the icosahedral group: 60 m (SO(3)), 120 m (O(3))
            spec = _quotient(
                gspace0, sg, irreps, needed, channels, {"grid": _ico_orbits(G, m)}, what, symmetries, strict=None
            )
            if spec is not None:
                return spec
        raise ValueError(f"no well-conditioned default grid for {G.name} at band_limit={L}; pass grid= explicitly")
    if fam in ("SO2", "O2"):
        base = list(G.bl_regular_representation(L=L).irreps)
        kw = user or {"type": "regular", "N": _circle_n(L)}
        return _fourier(gspace0, base, needed, channels, kw, strict=user is None and grid != "paper")
    # product groups (cylinders): finite or continuous factors, band limit on the continuous one
    f1 = _factor_irreps(G.G1, L)
    f2 = _factor_irreps(G.G2, L)
    base = [G.irrep(a, b).id for a in f1 for b in f2]
    kw = user or {
        "G1_type": "regular",
        "G1_N": _circle_n(L) if G.G1.continuous else G.G1.order(),
        "G2_type": "regular",
        "G2_N": _circle_n(L) if G.G2.continuous else G.G2.order(),
    }
    return _fourier(gspace0, base, needed, channels, kw, strict=user is None and grid != "paper")


def _factor_irreps(H, L):
    if not H.continuous:
        return [irr.id for irr in H.irreps()]
    return sorted(set(H.bl_regular_representation(L=L).irreps))


def _check_carried(G, rho, needed):
    have = set(rho.irreps)
    missing = sorted(needed - have, key=str)
    if missing:
        raise ValueError(
            f"the hidden field of the kernel MLP for {G.name} cannot carry the irreps {missing} that the inputs, "
            f"attributes or outputs need; pass a larger band_limit or other field types"
        )


_ICO_POINTS = {}


def _ico_orbit_points(m: int) -> np.ndarray:
    """m points of the sphere whose icosahedral orbits (60 points each) together spread as evenly as a greedy
    search over 512 fixed candidates finds (largest smallest distance between any two points of the union)."""
    if m in _ICO_POINTS:
        return _ICO_POINTS[m]
    from escnn import group as _group

    so3 = _group.so3_group()
    R = np.stack([g.to("MAT") for g in so3.grid("ico")])  # (60, 3, 3)
    cand = np.random.RandomState(0).randn(512, 3)
    cand /= np.linalg.norm(cand, axis=1, keepdims=True)
    orbits = np.einsum("gij,cj->cgi", R, cand)  # (512, 60, 3)
    chosen = []
    union = np.zeros((0, 3))
    for _ in range(m):
        best, best_d = None, -1.0
        for c in range(cand.shape[0]):
            pts = np.concatenate([union, orbits[c]])
            d = np.linalg.norm(pts[:, None] - pts[None], axis=-1)
            d[np.diag_indices_from(d)] = np.inf
            if d.min() > best_d:
                best, best_d = c, d.min()
        chosen.append(cand[best])
        union = np.concatenate([union, orbits[best]])
    _ICO_POINTS[m] = np.stack(chosen)
    return _ICO_POINTS[m]


def _rotation_to(p: np.ndarray) -> np.ndarray:
    """A rotation matrix mapping e_z to the unit vector p."""
    z = np.array([0.0, 0.0, 1.0])
    v = np.cross(z, p)
    c = float(z @ p)
    if np.linalg.norm(v) < 1e-12:
        return np.eye(3) if c > 0 else np.diag([1.0, -1.0, -1.0])
    vx = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]])
    return np.eye(3) + vx + vx @ vx / (1 + c)


def _ico_orbits(G, m: int) -> list:
    """Grid of G (SO(3) or O(3)) whose cosets of SO(2) are m generic orbits of the icosahedral group (both signs for
    O(3)): left multiplication by an icosahedral element (with the inversion for O(3)) permutes it, so the quotient
    Fourier ELU is exactly equivariant there."""
    from escnn import group as _group

    so3 = _group.so3_group()
    ico = so3.grid("ico")
    grid = []
    for p in _ico_orbit_points(m):
        q = so3.element(_rotation_to(p), "MAT")
        grid += [g @ q for g in ico]
    if _family(G) == "SO3":
        return grid
    quats = [g.to("Q") for g in grid]
    return [G.element((s, q), "Q") for s in (0, 1) for q in quats]


def _exact_symmetries(rho, A, candidates) -> list:
    """The candidates h for which sampling rho(h) x on the grid permutes the samples of x (A rho(h) has the rows of
    A): the Fourier ELU is then exactly equivariant under h."""
    A = np.asarray(A, dtype=np.float64)
    tol = 1e-5 * np.abs(A).max()
    v = np.random.RandomState(0).randn(A.shape[1])

    def covers(X, Y):  # every row of Y is (within tol) a row of X
        kx, ky = X @ v, Y @ v
        order = np.argsort(kx)
        pos = np.clip(np.searchsorted(kx[order], ky), 1, len(kx) - 1)
        near = np.where(np.abs(kx[order][pos] - ky) < np.abs(kx[order][pos - 1] - ky), pos, pos - 1)
        return np.abs(Y - X[order[near]]).max() <= tol

    # at most MAX_SYMMETRIES candidates, spread over the list (each costs a rho(h)); a grid whose points repeat, as
    # escnn's 60-element "ico" grid on the sphere with each coset twice, is compared as a set
    candidates = list(candidates)
    if len(candidates) > MAX_SYMMETRIES:
        candidates = [candidates[i] for i in np.linspace(0, len(candidates) - 1, MAX_SYMMETRIES).round().astype(int)]
    return [h for h in candidates if covers(A, A @ rho(h)) and covers(A @ rho(h), A)]


def _grid_spec(G, act, needed, what_desc, candidates, strict) -> Optional[HiddenSpec]:
    """HiddenSpec from an escnn Fourier ELU module; checks the sampling matrix (see MAX_GRID_CONDITION).

    strict: True raises on a bad grid, None returns None (to try a larger one), False warns."""
    rho = act.rho
    _check_carried(G, rho, needed)
    A = act.A.detach().double().numpy()
    rank, cond = sampling_quality(A)
    if not cond <= MAX_GRID_CONDITION:
        msg = (
            f"the sampling grid of the Fourier ELU for {G.name} ({A.shape[0]} points) gives a sampling matrix of "
            f"rank {rank} for a hidden field of dimension {A.shape[1]} (condition number {cond:.3g} > "
            f"{MAX_GRID_CONDITION:g}): the nonlinearity loses part of the hidden field; pass a larger grid="
        )
        if strict is None:
            return None
        if strict:
            raise ValueError(msg)
        warnings.warn(msg, stacklevel=4)
    sym = _exact_symmetries(rho, A, candidates)
    desc = f"{what_desc}, {A.shape[0]} grid points (rank {rank}, condition {cond:.3g})"
    return HiddenSpec(
        act.in_type, rho.size, act.A.detach().clone(), act.Ainv.detach().clone(), desc, None, sym, rank, cond
    )


def _quotient(gspace0, sg_id, irreps, needed, channels, grid, what, candidates, strict) -> Optional[HiddenSpec]:
    G = gspace0.fibergroup

    def make():
        return enn.QuotientFourierELU(gspace0, sg_id, channels, irreps=irreps, inplace=False, **grid)

    try:
        act = make()
    except Exception as exc:  # an irrep without vectors fixed by the subgroup
        raise ValueError(f"cannot build the quotient Fourier ELU of {G.name} on irreps {irreps}: {exc}") from exc
    spec = _grid_spec(G, act, needed, f"{what}, irreps {irreps}, quotient Fourier ELU", candidates, strict)
    if spec is not None:
        spec.make_module = make
    return spec


def _fourier(gspace0, base, needed, channels, grid, strict) -> HiddenSpec:
    G = gspace0.fibergroup
    irreps = sorted(set(base) | needed, key=str)

    def make():
        return enn.FourierELU(gspace0, channels, irreps=irreps, inplace=False, **grid)

    act = make()
    candidates = G.grid(**grid)
    spec = _grid_spec(
        G,
        act,
        needed,
        f"band-limited regular representation, irreps {irreps}, Fourier ELU",
        candidates,
        True if strict else False,
    )
    spec.make_module = make
    return spec


def kernel_gspace(gspace):
    """The gspace without base space on which the kernel MLP is built: O(n) restricted to the layer's subgroup."""
    n = gspace.dimensionality
    full = gspaces.no_base_space(group.o3_group() if n == 3 else group.o2_group())
    G = gspace.fibergroup
    if G == full.fibergroup:
        return full
    g0 = full.restrict(gspace._sg_id)[0]
    if g0.fibergroup != G:  # escnn caches groups, so this does not happen for its own gspaces
        g0 = gspaces.no_base_space(G)
    return g0
