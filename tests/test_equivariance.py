"""Equivariance of the kernel constraint and of the point convolution, for every group and field-type mix.

Every check runs ik_fast.testing.check_equivariance (the same check tests/test_mutations.py shows failing on broken
layers) on a graph whose edges lie inside the radial shell, with random biases, batch-norm parameters and running
statistics, against the bounds of ik_fast.testing.tolerance."""

import warnings

import numpy as np
import pytest
import torch
from conftest import GSPACES, field_types, get_gspace
from escnn import gspaces
from escnn import nn as enn

import ik_fast
from ik_fast.spec import _groups
from ik_fast.testing import check_equivariance, equivariance_error, group_family, kernel_graph, randomize_, tolerance

KINDS = ["uniform", "mixed", "uniform_attr", "mixed_attr"]


def _assert_passes(res):
    assert res["passed"], res


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", list(GSPACES))
def test_kernel_constraint(name, kind):
    gs = get_gspace(name)
    in_t, out_t, attr_t = field_types(gs, kind)
    k = ik_fast.ImplicitKernel(in_t, out_t, attr_t, n_layers=3, n_channels=2)
    k = randomize_(k).double().eval()
    graph = kernel_graph(k, n_nodes=10, k=3)
    _assert_passes(check_equivariance(k, graph, n_exact=2, n_random=2))
    assert k(graph.delta, graph.edge_attr).abs().max() > 0


@pytest.mark.parametrize("name", list(GSPACES))
@pytest.mark.parametrize(
    "backend", ["reference", "torch"] + [b for b in ["triton", "native"] if b in ik_fast.available_backends("cpu")]
)
def test_layer_equivariance(name, backend):
    gs = get_gspace(name)
    in_t, out_t, attr_t = field_types(gs, "mixed_attr")
    conv = ik_fast.ImplicitPointConv(in_t, out_t, attr_t, n_layers=3, n_channels=3, backend=backend)
    conv = randomize_(conv).double()
    graph = kernel_graph(conv, n_nodes=10, k=4)
    for mode in ("train", "eval"):
        getattr(conv, mode)()
        _assert_passes(check_equivariance(conv, graph, n_exact=3, n_random=2))


@pytest.mark.parametrize("name", ["O3", "SO2", "C8"])
def test_layer_equivariance_float32(name):
    gs = get_gspace(name)
    in_t, out_t, attr_t = field_types(gs, "mixed_attr")
    conv = randomize_(ik_fast.ImplicitPointConv(in_t, out_t, attr_t, n_layers=3, n_channels=3, backend="torch"))
    graph = kernel_graph(conv, n_nodes=10, k=4, dtype=torch.float32)
    for mode in ("train", "eval"):
        getattr(conv, mode)()
        _assert_passes(check_equivariance(conv, graph, n_exact=3, n_random=2))


def test_test_graph_exercises_the_kernel():
    """Median radial shell >= 0.1 and self-loops a minority of the edges and of the output."""
    gs = get_gspace("O3")
    in_t, out_t, attr_t = field_types(gs, "mixed_attr")
    conv = randomize_(ik_fast.ImplicitPointConv(in_t, out_t, attr_t, n_layers=3, n_channels=3)).double().eval()
    g = kernel_graph(conv)
    shell = torch.exp(-0.5 * g.delta.square().sum(1) / conv.kernel.sigma.detach().double() ** 2)
    assert shell.median() >= 0.1
    loops = g.edge_index[0] == g.edge_index[1]
    assert 0 < loops.sum() < 0.25 * loops.numel()
    with torch.no_grad():
        full = conv(g.x, g.edge_index, edge_attr=g.edge_attr, pos=g.pos) - conv.expanded_bias()
        only_loops = conv(g.x, g.edge_index[:, loops], edge_attr=g.edge_attr[loops], pos=g.pos) - conv.expanded_bias()
    assert only_loops.norm() < 0.5 * full.norm()


@pytest.mark.parametrize("name", ["O3", "SO3", "SO2", "O2", "full_cylinder"])
def test_grid_symmetries_are_exact(name):
    """A continuous group's default grid has non-trivial symmetries (icosahedral on SO(3)/O(3), rotations by 2 pi / N
    on the circle) and the kernel is equivariant on them to the finite groups' bound."""
    gs = get_gspace(name)
    G = gs.fibergroup
    in_t, out_t, attr_t = field_types(gs, "mixed_attr")
    k = randomize_(ik_fast.ImplicitKernel(in_t, out_t, attr_t, n_layers=3, n_channels=2)).double().eval()
    assert len(k.grid_symmetries) >= 8
    graph = kernel_graph(k, n_nodes=10, k=3)
    errs = [equivariance_error(k, g, graph.delta, edge_attr=graph.edge_attr) for g in k.grid_symmetries[1:6]]
    assert max(errs) <= tolerance("exact", torch.float64), errs
    # and a random element is visibly less exact: the exact elements are what makes the bound tight
    rnd = max(equivariance_error(k, G.sample(), graph.delta, edge_attr=graph.edge_attr) for _ in range(3))
    assert rnd > 10 * max(errs)


def test_finer_grid_is_more_equivariant():
    gs = get_gspace("SO2")
    in_t, out_t, _ = field_types(gs, "uniform")
    errs = []
    for N in (16, 128):
        torch.manual_seed(0)
        k = ik_fast.ImplicitKernel(in_t, out_t, n_layers=3, n_channels=4, grid={"type": "regular", "N": N}).eval()
        d = torch.randn(200, 2)
        errs.append(max(equivariance_error(k, gs.fibergroup.sample(), d) for _ in range(6)))
    assert errs[1] < errs[0] / 4, errs


# ----------------------------------------------------------------------------------------------------------------
# construction on every gspace; default grids
# ----------------------------------------------------------------------------------------------------------------
# every escnn gspace constructor that takes a maximum_frequency, and those on R^2 without one; the finite groups on
# R^3 without one (icoOnR3, fullIcoOnR3, octaOnR3, fullOctaOnR3, mirOnR3, invOnR3, trivialOnR3) are in GSPACES and
# tested by test_kernel_constraint and test_layer_equivariance
CONSTRUCTORS = {  # name -> (constructor, takes maximum_frequency)
    "rot2dOnR2": (lambda **kw: gspaces.rot2dOnR2(-1, **kw), True),
    "rot2dOnR2_C5": (lambda **kw: gspaces.rot2dOnR2(5, **kw), True),
    "flipRot2dOnR2": (lambda **kw: gspaces.flipRot2dOnR2(-1, **kw), True),
    "flipRot2dOnR2_D3": (lambda **kw: gspaces.flipRot2dOnR2(3, **kw), True),
    "flip2dOnR2": (lambda **kw: gspaces.flip2dOnR2(), False),
    "trivialOnR2": (lambda **kw: gspaces.trivialOnR2(), False),
    "rot3dOnR3": (lambda **kw: gspaces.rot3dOnR3(**kw), True),
    "flipRot3dOnR3": (lambda **kw: gspaces.flipRot3dOnR3(**kw), True),
    "dihedralOnR3": (lambda **kw: gspaces.dihedralOnR3(-1, **kw), True),
    "dihedralOnR3_D4": (lambda **kw: gspaces.dihedralOnR3(4, **kw), True),
    "rot2dOnR3": (lambda **kw: gspaces.rot2dOnR3(-1, **kw), True),
    "conicalOnR3": (lambda **kw: gspaces.conicalOnR3(-1, **kw), True),
    "cylindricalOnR3": (lambda **kw: gspaces.cylindricalOnR3(-1, **kw), True),
    "fullCylindricalOnR3": (lambda **kw: gspaces.fullCylindricalOnR3(-1, **kw), True),
}


@pytest.mark.parametrize("max_freq", ["small", "default"])
@pytest.mark.parametrize("ctor", list(CONSTRUCTORS))
def test_every_gspace_constructor(ctor, max_freq):
    """Each escnn gspace constructor, with maximum_frequency=1 (fewer irreps than the kernel MLP's hidden band limit
    3 needs: escnn's InsufficientIrrepsException before) and with its default, gives an equivariant kernel."""
    make, has_mf = CONSTRUCTORS[ctor]
    if max_freq == "small" and not has_mf:
        pytest.skip("constructor has no maximum_frequency")
    gs = make(maximum_frequency=1) if max_freq == "small" else make()
    ft = enn.FieldType(gs, [gs.fibergroup.trivial_representation, gs.basespace_action])
    k = randomize_(ik_fast.ImplicitKernel(ft, ft, n_layers=2, n_channels=1)).double().eval()
    graph = kernel_graph(k, n_nodes=8, k=2)
    _assert_passes(check_equivariance(k, graph, n_exact=2, n_random=1))


def test_o2_small_maximum_frequency():
    gs = gspaces.flipRot2dOnR2(N=-1, maximum_frequency=4)
    G = gs.fibergroup
    ft = enn.FieldType(gs, [G.irrep(0, 0), G.irrep(1, 1), G.irrep(1, 2)])
    k = ik_fast.ImplicitKernel(ft, ft, n_layers=3, n_channels=2).double().eval()
    _assert_passes(check_equivariance(k, kernel_graph(k, n_nodes=8, k=2), n_exact=2, n_random=1))


GRID_GROUPS = {
    "SO3": lambda: gspaces.rot3dOnR3(),
    "O3": lambda: gspaces.flipRot3dOnR3(),
    "SO2": lambda: gspaces.rot2dOnR2(-1),
    "O2": lambda: gspaces.flipRot2dOnR2(-1),
    "SO2_R3": lambda: gspaces.rot2dOnR3(-1),
    "cone_O2": lambda: gspaces.conicalOnR3(-1),
    "cylinder": lambda: gspaces.cylindricalOnR3(-1),
    "full_cylinder": lambda: gspaces.fullCylindricalOnR3(-1),
}


GRID_CASES = [("SO3", 5), ("SO3", 6), ("O3", 5), ("O3", 6), ("SO2", 3), ("SO2", 6), ("O2", 6), ("full_cylinder", 6)]


@pytest.mark.parametrize("name,L", GRID_CASES)
def test_default_grids_have_full_rank(name, L):
    """The default grid's sampling matrix has full column rank and condition number <= 100 (with the irreps a
    pseudoscalar attribute and a pseudovector output add on O(3)).

    These cases cover every band limit up to 6: the default grid is the smallest well-conditioned one of its family
    and the hidden irreps at a lower band limit are a subset of those at a higher one, so the sampling matrix at a
    lower band limit is a column subset, whose condition number is no larger (singular values interlace): SO(3)/O(3)
    switch to 2 icosahedral orbits at L = 6 only; the circle's grid has N = 125 points except N = 40 at L = 3, the
    cylinders the same circle grid times a finite factor. scripts/measure_tolerances.py --grids sweeps all of them."""
    gs = GRID_GROUPS[name]()
    G = gs.fibergroup
    g0 = _groups.kernel_gspace(gs)
    _groups.instantiate_irreps(G, 2 * L + 2)
    needed = {irr for irr in gs.basespace_action.irreps}
    if name == "O3":
        needed |= {(1, 0), (0, 1)}
    spec = _groups.build_hidden(g0, needed, L, 1, None)
    rank, cond = _groups.sampling_quality(spec.A.numpy())
    assert rank == spec.rho_size and cond <= _groups.MAX_GRID_CONDITION, (L, rank, spec.rho_size, cond)


def test_paper_grid_warns_when_rank_deficient():
    """grid="paper" keeps the research code's 60-point SO(3) grid, which is rank-deficient at band limit 5."""
    gs = get_gspace("SO3")
    ft = enn.FieldType(gs, [gs.fibergroup.bl_sphere_representation(L=2)])
    with pytest.warns(UserWarning, match="rank 30"):
        k = ik_fast.ImplicitKernel(ft, ft, n_layers=2, n_channels=1, grid="paper")
    assert k.act_A.shape == (60, 36)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        k = ik_fast.ImplicitKernel(ft, ft, n_layers=2, n_channels=1)
    assert k.act_A.shape[0] == 60 and k.grid_quality[0] == 36
    with pytest.raises(ValueError, match="grid"):
        ik_fast.ImplicitKernel(ft, ft, grid="fine")


def test_pseudoscalar_attribute_is_used():
    """An O(3) pseudoscalar attribute must reach the kernel (the sphere type alone has no parity-odd scalars)."""
    gs = get_gspace("O3")
    G = gs.fibergroup
    ft = enn.FieldType(gs, [G.bl_sphere_representation(L=1)] * 2)
    attr = enn.FieldType(gs, [G.irrep(1, 0)])
    k = ik_fast.ImplicitKernel(ft, ft, attr, n_layers=3, n_channels=4, batch_norm=False).eval()
    d = torch.randn(32, 3) * 0.3
    a = torch.randn(32, 1)
    assert ik_fast.testing._rel(k(d, a), k(d, -a)) > 1e-3


def test_pseudovector_part_of_kernel_is_produced():
    """vector (x) vector contains a pseudovector (0, 1): the hidden field must carry it, so K has that component.

    With the edge vector d alone that part vanishes by symmetry (no pseudovector function of one vector); with a
    pseudoscalar attribute a it can be a * c(|d|) * d, which only a hidden field carrying (0, 1) produces."""
    gs = get_gspace("O3")
    G = gs.fibergroup
    vec = enn.FieldType(gs, [G.irrep(1, 1)])
    pseudo = enn.FieldType(gs, [G.irrep(1, 0)])
    k = ik_fast.ImplicitKernel(vec, vec, pseudo, n_layers=3, n_channels=4, batch_norm=False).eval()
    K = k(torch.randn(64, 3) * 0.3, torch.randn(64, 1))
    antisym = 0.5 * (K - K.transpose(1, 2))  # the (0, 1) part of a 3x3 kernel is its antisymmetric part
    assert antisym.norm() > 1e-3 * K.norm()


def test_group_family():
    assert [group_family(get_gspace(n)) for n in ("O3", "SO3", "O2", "cylinder", "Ih", "trivial_R3")] == [
        "SO3",
        "SO3",
        "SO2",
        "SO2",
        "finite",
        "finite",
    ]
    assert np.isclose(tolerance("equivariance", torch.float64, "finite"), tolerance("exact", torch.float64))
    with pytest.raises(ValueError, match="family"):
        tolerance("equivariance", torch.float64)
    with pytest.raises(ValueError, match="kind"):
        tolerance("sideways", torch.float64)
