"""Per-group choices of the implicit kernel's MLP: band limit, hidden representation, nonlinearity, grid.

This is the only place that knows which subgroup of O(n) a gspace carries. The table (also in the README):

=======================  ===================  ================================  ===============================
group (escnn class)      frequency of irrep   hidden field per channel          nonlinearity and default grid
=======================  ===================  ================================  ===============================
SO(3)                    l                    sphere S^2 = SO(3)/SO(2), l < L   quotient Fourier ELU, 60-pt ico
O(3)                     l                    S^2 x {+-1} = O(3)/SO(2), l < L   quotient Fourier ELU, 120-pt ico
SO(2) (R^2, R^3 axis)    k                    regular, k < L                    Fourier ELU, N regular rotations
O(2) (R^2, cone)         k                    regular, k < L                    Fourier ELU, N rotations x 2 flips
cylinder C2 x SO(2)/O(2) k of the 2nd factor  regular of the product, k < L     Fourier ELU, 2 x N (x 2) elements
finite (C_N, D_N, I,     --                   regular representation            pointwise ELU (exactly equivariant)
  Ih, O, Oh, inversion,
  mirror, trivial, ...)
=======================  ===================  ================================  ===============================

L is the hidden band limit: (max frequency of Hom(F_in, F_out) = F_out (x) F_in) + 1, as in the paper, unless the
user passes ``band_limit``. The default N for the circle is the research code's: 40 when L = 3, else 125.
On O(3) the research code keeps only the "sphere" irreps (l % 2, l); every other irrep that the inputs, attributes
or outputs need (a pseudoscalar attribute, the pseudovector part of vector (x) vector) is added to the hidden field,
which the quotient by SO(2) allows. Any irrep that still cannot be carried raises ``ValueError``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from escnn import group, gspaces
from escnn import nn as enn

__all__ = ["HiddenSpec", "irrep_frequency", "max_frequency", "build_hidden", "instantiate_irreps"]


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
        freqs = [irrep_frequency(G.G1, irrep_id[0]) if G.G1.continuous else None,
                 irrep_frequency(G.G2, irrep_id[1]) if G.G2.continuous else None]
        freqs = [f for f in freqs if f is not None]
        return max(freqs) if freqs else None
    return None


def instantiate_irreps(G, K: int) -> None:
    """Build every irrep of a product group up to frequency K: escnn decomposes tensor products of a direct product
    numerically over the irreps it has instantiated and fails when a needed one is missing."""
    if _family(G) != "product":
        return
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

    hidden_type: Any          # escnn FieldType on no_base_space(G): channels x rho
    rho_size: int
    A: Optional[torch.Tensor]     # (grid, rho_size) inverse Fourier transform, None for a pointwise ELU
    Ainv: Optional[torch.Tensor]  # (rho_size, grid) Fourier transform
    description: str
    make_module: Any              # () -> the escnn module of the nonlinearity (for tests against escnn)


def _circle_n(L: int) -> int:
    return 40 if L == 3 else 125


def build_hidden(gspace0, needed_irreps, band_limit: Optional[int], channels: int,
                 grid: Optional[dict] = None) -> HiddenSpec:
    """Hidden field type and nonlinearity for the group of ``gspace0`` (a ``no_base_space`` gspace).

    ``needed_irreps``: ids of every irrep of the MLP's input and output, which the hidden field must carry.
    ``grid``: optional keyword arguments for ``G.grid`` to sample the Fourier nonlinearity on another grid.
    """
    G = gspace0.fibergroup
    fam = _family(G)
    needed = set(needed_irreps)
    if fam == "finite":
        rho = G.regular_representation
        htype = gspace0.type(*[rho] * channels)
        return HiddenSpec(htype, rho.size, None, None,
                          f"regular representation of {G.name} ({rho.size}), pointwise ELU", lambda: enn.ELU(htype))

    L = band_limit
    if fam == "SO3":
        base = [(l,) for l in range(L + 1)]
        return _quotient(gspace0, (False, -1), base, needed, channels, grid or {"type": "ico"}, "sphere SO(3)/SO(2)")
    if fam == "O3":
        base = [(l % 2, l) for l in range(L + 1)]
        return _quotient(gspace0, (False, False, -1), base, needed, channels, grid or {"type": "ico"},
                         "O(3)/SO(2) = sphere x {+-1}")
    if fam in ("SO2", "O2"):
        base = list(G.bl_regular_representation(L=L).irreps)
        return _fourier(gspace0, base, needed, channels, grid or {"type": "regular", "N": _circle_n(L)})
    # product groups (cylinders): finite or continuous factors, band limit on the continuous one
    f1 = _factor_irreps(G.G1, L)
    f2 = _factor_irreps(G.G2, L)
    base = [G.irrep(a, b).id for a in f1 for b in f2]
    kw = grid or {"G1_type": "regular", "G1_N": _circle_n(L) if G.G1.continuous else G.G1.order(),
                  "G2_type": "regular", "G2_N": _circle_n(L) if G.G2.continuous else G.G2.order()}
    return _fourier(gspace0, base, needed, channels, kw)


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
            f"attributes or outputs need; pass a larger band_limit or other field types")


def _quotient(gspace0, sg_id, base, needed, channels, grid, what) -> HiddenSpec:
    G = gspace0.fibergroup
    irreps = sorted(set(base) | needed)
    def make():
        return enn.QuotientFourierELU(gspace0, sg_id, channels, irreps=irreps, inplace=False, **grid)

    try:
        act = make()
    except Exception as exc:  # an irrep without vectors fixed by the subgroup
        raise ValueError(f"cannot build the quotient Fourier ELU of {G.name} on irreps {irreps}: {exc}") from exc
    rho = act.rho
    _check_carried(G, rho, needed)
    desc = f"{what}, irreps {irreps}, quotient Fourier ELU on {act.A.shape[0]} grid points"
    return HiddenSpec(act.in_type, rho.size, act.A.detach().clone(), act.Ainv.detach().clone(), desc, make)


def _fourier(gspace0, base, needed, channels, grid) -> HiddenSpec:
    G = gspace0.fibergroup
    irreps = sorted(set(base) | needed, key=str)
    def make():
        return enn.FourierELU(gspace0, channels, irreps=irreps, inplace=False, **grid)

    act = make()
    rho = act.rho
    _check_carried(G, rho, needed)
    desc = f"band-limited regular representation, irreps {irreps}, Fourier ELU on {act.A.shape[0]} grid points"
    return HiddenSpec(act.in_type, rho.size, act.A.detach().clone(), act.Ainv.detach().clone(), desc, make)


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
