"""Models built from ik_fast layers: the paper's QM9 architecture and an N-body model.

:class:`QM9Model` follows the research code's ``SteerableCNN_QM9`` (Zhdanov, Hoffmann & Cesa, NeurIPS 2023):
embedding of the one-hot atom types into ``num_features`` band-limited fields followed by the group's ELU, residual
blocks ``act(x + BN(conv2(act(BN(conv1(x))))))`` of implicit point convolutions, an implicit convolution to
``num_inv_features`` invariant fields, mean pooling per molecule and an MLP readout. It is built for any gspace the
layer supports (see :func:`field_activation`).
"""

from __future__ import annotations

from typing import Optional

import torch
from escnn import gspaces
from escnn import nn as enn
from escnn.group import O2, O3, SO2, SO3, CyclicGroup, DihedralGroup

from ik_fast.nn.layers import ImplicitPointConv, _bias_expansion

__all__ = ["field_activation", "QM9Model", "NBodyModel", "build_gspace", "GSPACES"]

# command-line names of gspaces (any escnn gspace object may be passed to the models directly)
GSPACES = {
    "o3": gspaces.flipRot3dOnR3,
    "so3": gspaces.rot3dOnR3,
    "so2": lambda: gspaces.rot2dOnR3(-1),
    "o2": lambda: gspaces.conicalOnR3(-1),
    "ico": gspaces.icoOnR3,
    "trivial": gspaces.trivialOnR3,
}


def build_gspace(name: str):
    if name not in GSPACES:
        raise ValueError(f"gspace must be one of {sorted(GSPACES)}, got {name!r}")
    return GSPACES[name]()


def field_activation(gspace, L: int, channels: int, grid: Optional[dict] = None) -> enn.EquivariantModule:
    """The group's ELU on ``channels`` fields of band limit ``L`` (frequencies 0..L, as the research code's
    ``get_elu``):

    - SO(3), O(3): quotient Fourier ELU on the sphere (fields of ``bl_sphere_representation(L)``), icosahedral grid;
    - SO(2), O(2): Fourier ELU on ``N`` rotations (N = 40 if L = 3 else 125, as the research code);
    - finite groups: the regular representation with a pointwise ELU (exactly equivariant);
    - other compact groups: Fourier ELU on the group's band-limited regular representation, with ``grid``
      (keyword arguments of ``G.grid``) required.
    """
    if L < 0:
        raise ValueError(f"L must be a non-negative band limit, got {L}")
    if channels < 1:
        raise ValueError(f"channels must be positive, got {channels}")
    G = gspace.fibergroup
    N = 40 if L == 3 else 125
    if isinstance(G, (SO3, O3)):
        sg = (False, -1) if isinstance(G, SO3) else (False, False, -1)
        irreps = sorted(set(G.bl_sphere_representation(L=L).irreps))
        kw = grid or {"type": "ico"}
        return enn.QuotientFourierELU(gspace, sg, channels, irreps, inplace=False, **kw)
    if isinstance(G, (SO2, O2)):
        irreps = sorted(set(G.bl_regular_representation(L=L).irreps))
        kw = grid or {"type": "regular", "N": N}
        return enn.FourierELU(gspace, channels, irreps, inplace=False, **kw)
    if G.order() > 0 or isinstance(G, (CyclicGroup, DihedralGroup)):
        ftype = enn.FieldType(gspace, [G.regular_representation] * channels)
        return enn.ELU(ftype, inplace=False)
    if grid is None:
        raise ValueError(f"grid is required for the group {G.name}: pass keyword arguments of G.grid")
    irreps = sorted(set(G.bl_regular_representation(L=L).irreps))
    return enn.FourierELU(gspace, channels, irreps, inplace=False, **grid)


def _trivial_expansion(field_type) -> torch.Tensor:
    """(field_type.size, #trivial irreps): places one scalar on each trivial irrep of each field (invariant)."""
    emb = _bias_expansion(field_type)
    if emb is None:
        raise ValueError(f"the field type {field_type} has no trivial irrep to embed scalars into")
    return emb


class _ScalarEmbedding(torch.nn.Module):
    """Invariant scalars (N, n_in) -> a field type: a Linear onto the trivial irreps of its fields."""

    def __init__(self, n_in: int, out_type):
        super().__init__()
        self.out_type = out_type
        self.register_buffer("expansion", _trivial_expansion(out_type), persistent=False)
        self.linear = torch.nn.Linear(n_in, self.expansion.shape[1])

    def forward(self, x: torch.Tensor, coords: torch.Tensor) -> enn.GeometricTensor:
        return enn.GeometricTensor(self.linear(x) @ self.expansion.T, self.out_type, coords=coords)


def _scatter_mean(x: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    out = x.new_zeros(n, x.shape[1]).index_add_(0, index, x)
    cnt = x.new_zeros(n).index_add_(0, index, torch.ones_like(index, dtype=x.dtype))
    return out / cnt.clamp(min=1)[:, None]


class _ResidualBlock(torch.nn.Module):
    def __init__(self, act_factory, edge_attr_type, kernel_kwargs):
        super().__init__()
        self.act1, self.act2 = act_factory(), act_factory()
        t_in, t_out = self.act1.out_type, self.act1.in_type
        self.conv1 = ImplicitPointConv(t_in, t_out, edge_attr_type, **kernel_kwargs)
        self.conv2 = ImplicitPointConv(t_in, t_out, edge_attr_type, **kernel_kwargs)
        self.bn1 = enn.IIDBatchNorm1d(t_out)
        self.bn2 = enn.IIDBatchNorm1d(t_out)

    def forward(self, x: enn.GeometricTensor, edge_index, edge_attr) -> enn.GeometricTensor:
        h = self.act1(self.bn1(self.conv1(x, edge_index, edge_attr=edge_attr)))
        h = self.bn2(self.conv2(h, edge_index, edge_attr=edge_attr))
        return self.act2(h + x)


class QM9Model(torch.nn.Module):
    """The paper's QM9 model (research ``SteerableCNN_QM9``) from ik_fast layers, for any gspace on R^3.

    Args:
        gspace: escnn gspace (default O(3) on R^3, as the paper).
        num_layers: residual blocks (paper: 4).
        num_features: band-limited fields per layer (paper: 8).
        num_inv_features: invariant fields before pooling (paper: 32).
        L: band limit of the fields (paper: 1).
        edge_attr_size: number of scalar edge attributes (0 = none).
        kernel_n_layers, kernel_n_channels: the implicit kernels' MLP (paper: 3 x 8).
        n_atom_types: size of the one-hot atom input (QM9: 5).
        backend: the layers' backend ("auto", "torch", "reference").
        kernel_kwargs: further options of :class:`ik_fast.ImplicitPointConv` (``grid``, ``band_limit``, ...).

    ``forward(x (N, n_atom_types), pos (N, 3), edge_index (2, E), edge_attr (E, A) or None, batch (N,), n_graphs)``
    returns one scalar per graph, (n_graphs,).
    """

    def __init__(
        self,
        gspace=None,
        num_layers: int = 4,
        num_features: int = 8,
        num_inv_features: int = 32,
        L: int = 1,
        edge_attr_size: int = 4,
        kernel_n_layers: int = 3,
        kernel_n_channels: int = 8,
        n_atom_types: int = 5,
        backend: Optional[str] = "auto",
        grid: Optional[dict] = None,
        **kernel_kwargs,
    ):
        super().__init__()
        gspace = gspace if gspace is not None else gspaces.flipRot3dOnR3()
        for name, v in (("num_layers", num_layers), ("edge_attr_size", edge_attr_size)):
            if v < 0:
                raise ValueError(f"{name} must be >= 0, got {v}")
        for name, v in (
            ("num_features", num_features),
            ("num_inv_features", num_inv_features),
            ("n_atom_types", n_atom_types),
        ):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        self.gspace = gspace
        G = gspace.fibergroup
        self.config = dict(
            num_layers=num_layers,
            num_features=num_features,
            num_inv_features=num_inv_features,
            L=L,
            edge_attr_size=edge_attr_size,
            kernel_n_layers=kernel_n_layers,
            kernel_n_channels=kernel_n_channels,
            n_atom_types=n_atom_types,
        )

        def act():
            return field_activation(gspace, L, num_features, grid)

        self.act0 = act()
        self.feat_type = self.act0.in_type
        self.n_atom_types = n_atom_types
        self.embed = _ScalarEmbedding(n_atom_types, self.act0.in_type)
        self.edge_attr_type = (
            enn.FieldType(gspace, [G.trivial_representation] * edge_attr_size) if edge_attr_size else None
        )
        kk = dict(n_layers=kernel_n_layers, n_channels=kernel_n_channels, backend=backend, **kernel_kwargs)
        self.blocks = torch.nn.ModuleList([_ResidualBlock(act, self.edge_attr_type, kk) for _ in range(num_layers)])
        self.inv_type = enn.FieldType(gspace, [G.trivial_representation] * num_inv_features)
        self.invariant = ImplicitPointConv(self.act0.out_type, self.inv_type, self.edge_attr_type, **kk)
        self.head = torch.nn.Sequential(
            torch.nn.BatchNorm1d(num_inv_features),
            torch.nn.ELU(),
            torch.nn.Linear(num_inv_features, num_inv_features),
            torch.nn.BatchNorm1d(num_inv_features),
            torch.nn.ELU(),
            torch.nn.Linear(num_inv_features, 1),
        )

    def set_backend(self, backend: Optional[str]) -> None:
        for m in self.modules():
            if isinstance(m, ImplicitPointConv):
                m.backend = backend

    def forward(self, x, pos, edge_index, edge_attr, batch, n_graphs: int) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.n_atom_types:
            raise ValueError(f"x must have shape (N, {self.n_atom_types}), got {tuple(x.shape)}")
        if (edge_attr is None) != (self.edge_attr_type is None):
            raise ValueError(
                f"edge_attr must be {'None' if self.edge_attr_type is None else 'given'}: the model was "
                f"built with edge_attr_size={self.config['edge_attr_size']}"
            )
        h = self.act0(self.embed(x, pos))
        for blk in self.blocks:
            h = blk(h, edge_index, edge_attr)
        inv = self.invariant(h, edge_index, edge_attr=edge_attr)
        pooled = _scatter_mean(inv.tensor, batch, n_graphs)
        return self.head(pooled).squeeze(1)


class NBodyModel(torch.nn.Module):
    """Predicts each particle's displacement over a time span from its velocity (a vector field), its charge and the
    pairwise geometry, for any gspace on R^3 whose group acts on velocities by the standard representation.

    Node input: charge (scalar) ⊕ velocity (vector). Edge attributes: the product of the two charges (scalar) and the
    source's velocity (vector), so the kernel depends on the relative position, the interaction sign and the motion.
    Layers: ``num_layers`` implicit convolutions with the group's ELU in between (residual after the first), then a
    convolution to one vector field; the output is the displacement, added to the input position.
    """

    def __init__(
        self,
        gspace=None,
        num_layers: int = 3,
        num_features: int = 8,
        L: int = 1,
        kernel_n_layers: int = 2,
        kernel_n_channels: int = 8,
        backend: Optional[str] = "auto",
        grid: Optional[dict] = None,
        **kernel_kwargs,
    ):
        super().__init__()
        gspace = gspace if gspace is not None else gspaces.flipRot3dOnR3()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.gspace = gspace
        G = gspace.fibergroup
        vec = gspace.basespace_action
        triv = G.trivial_representation
        self.in_type = enn.FieldType(gspace, [triv, vec])
        self.out_type = enn.FieldType(gspace, [vec])
        self.edge_attr_type = enn.FieldType(gspace, [triv, vec])
        kk = dict(n_layers=kernel_n_layers, n_channels=kernel_n_channels, backend=backend, **kernel_kwargs)
        self.acts = torch.nn.ModuleList([field_activation(gspace, L, num_features, grid) for _ in range(num_layers)])
        feat_in, feat_out = self.acts[0].out_type, self.acts[0].in_type
        self.convs = torch.nn.ModuleList(
            [
                ImplicitPointConv(self.in_type if i == 0 else feat_in, feat_out, self.edge_attr_type, **kk)
                for i in range(num_layers)
            ]
        )
        self.bns = torch.nn.ModuleList([enn.IIDBatchNorm1d(feat_out) for _ in range(num_layers)])
        self.readout = ImplicitPointConv(feat_in, self.out_type, self.edge_attr_type, **kk)
        # the velocity passes straight to the displacement through a learnable gain (an equivariant linear map)
        self.vel_gain = torch.nn.Parameter(torch.zeros(()))

    def forward(self, pos, vel, charge, edge_index) -> torch.Tensor:
        """pos, vel (N, 3), charge (N,), edge_index (2, E) -> predicted positions (N, 3)."""
        src, dst = edge_index
        x = enn.GeometricTensor(torch.cat([charge[:, None], vel], 1), self.in_type, coords=pos)
        attr = torch.cat([(charge[src] * charge[dst])[:, None], vel[src]], 1)
        h = x
        for i, (conv, bn, act) in enumerate(zip(self.convs, self.bns, self.acts)):
            out = act(bn(conv(h, edge_index, edge_attr=attr)))
            h = out if i == 0 else out + h
        disp = self.readout(h, edge_index, edge_attr=attr).tensor + self.vel_gain * vel
        return pos + disp
