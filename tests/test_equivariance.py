"""Equivariance of the kernel constraint and of the point convolution, for every group and field-type mix."""

import pytest
import torch
from conftest import FOURIER_EQUIV, GSPACES, TOL, field_types, get_gspace, small_graph

import ik_fast
from ik_fast.testing import equivariance_error

KINDS = ["uniform", "mixed", "uniform_attr", "mixed_attr"]


def _bound(name, dtype):
    return TOL[dtype]["exact_equiv"] if GSPACES[name][1] else FOURIER_EQUIV


def _elements(G, n=4):
    return [G.sample() for _ in range(n)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", list(GSPACES))
def test_kernel_constraint(name, kind):
    gs = get_gspace(name)
    in_t, out_t, attr_t = field_types(gs, kind)
    k = ik_fast.ImplicitKernel(in_t, out_t, attr_t, n_layers=3, n_channels=2).eval()
    d = torch.randn(64, gs.dimensionality) * 0.7
    a = None if attr_t is None else torch.randn(64, attr_t.size)
    errs = [equivariance_error(k, g, d, edge_attr=a) for g in _elements(gs.fibergroup)]
    assert max(errs) <= _bound(name, torch.float32), errs
    assert k(d, a).abs().max() > 0


@pytest.mark.parametrize("name", list(GSPACES))
@pytest.mark.parametrize("backend", ["reference", "torch"] + [b for b in ["triton"]
                                                              if b in ik_fast.available_backends("cpu")])
def test_layer_equivariance(name, backend):
    gs = get_gspace(name)
    in_t, out_t, attr_t = field_types(gs, "mixed_attr")
    conv = ik_fast.ImplicitPointConv(in_t, out_t, attr_t, n_layers=3, n_channels=3, backend=backend)
    pos, ei = small_graph(10, 50, gs.dimensionality)
    x = torch.randn(10, in_t.size)
    a = torch.randn(50, attr_t.size)
    for mode in ("train", "eval"):
        getattr(conv, mode)()
        err = ik_fast.assert_equivariant(conv, pos, x, ei, a, n_samples=3, rtol=_bound(name, torch.float32))
        assert err >= 0


@pytest.mark.parametrize("name", ["Ih", "D4_R3", "C8", "flip", "inversion"])
def test_exact_groups_float64(name):
    gs = get_gspace(name)
    in_t, out_t, attr_t = field_types(gs, "mixed_attr")
    conv = ik_fast.ImplicitPointConv(in_t, out_t, attr_t, n_layers=3, n_channels=3, backend="torch").double().eval()
    pos, ei = small_graph(10, 50, gs.dimensionality, dtype=torch.float64)
    x = torch.randn(10, in_t.size, dtype=torch.float64)
    a = torch.randn(50, attr_t.size, dtype=torch.float64)
    ik_fast.assert_equivariant(conv, pos, x, ei, a, elements=list(gs.testing_elements)[:6] + _elements(gs.fibergroup),
                               rtol=TOL[torch.float64]["exact_equiv"])


def test_finer_grid_is_more_equivariant():
    gs = get_gspace("SO2")
    in_t, out_t, _ = field_types(gs, "uniform")
    errs = []
    for N in (16, 128):
        torch.manual_seed(0)
        k = ik_fast.ImplicitKernel(in_t, out_t, n_layers=3, n_channels=4, grid={"type": "regular", "N": N}).eval()
        d = torch.randn(200, 2)
        errs.append(max(equivariance_error(k, g, d) for g in _elements(gs.fibergroup, 6)))
    assert errs[1] < errs[0] / 4, errs


def test_pseudoscalar_attribute_is_used():
    """An O(3) pseudoscalar attribute must reach the kernel (the sphere type alone has no parity-odd scalars)."""
    from escnn import nn as enn

    gs = get_gspace("O3")
    G = gs.fibergroup
    ft = enn.FieldType(gs, [G.bl_sphere_representation(L=1)] * 2)
    attr = enn.FieldType(gs, [G.irrep(1, 0)])
    k = ik_fast.ImplicitKernel(ft, ft, attr, n_layers=3, n_channels=4, batch_norm=False).eval()
    d = torch.randn(32, 3)
    a = torch.randn(32, 1)
    assert ik_fast.testing._rel(k(d, a), k(d, -a)) > 1e-3


def test_pseudovector_part_of_kernel_is_produced():
    """vector (x) vector contains a pseudovector (0, 1): the hidden field must carry it, so K has that component.

    With the edge vector d alone that part vanishes by symmetry (no pseudovector function of one vector); with a
    pseudoscalar attribute a it can be a * c(|d|) * d, which only a hidden field carrying (0, 1) produces."""
    gs = get_gspace("O3")
    G = gs.fibergroup
    from escnn import nn as enn

    vec = enn.FieldType(gs, [G.irrep(1, 1)])
    pseudo = enn.FieldType(gs, [G.irrep(1, 0)])
    k = ik_fast.ImplicitKernel(vec, vec, pseudo, n_layers=3, n_channels=4, batch_norm=False).eval()
    K = k(torch.randn(64, 3), torch.randn(64, 1))
    antisym = 0.5 * (K - K.transpose(1, 2))  # the (0, 1) part of a 3x3 kernel is its antisymmetric part
    assert antisym.norm() > 1e-3 * K.norm()
