"""ik_fast.models, ik_fast.models.qm9 and ik_fast.models.nbody: shapes, invariance/equivariance of whole models, data
handling."""

import importlib.util

import numpy as np
import pytest
import torch
from escnn import gspaces

from ik_fast.models import NBodyModel, QM9Model, field_activation
from ik_fast.models.nbody import nbody_dataset, nbody_graph, simulate
from ik_fast.models.qm9 import collate, edge_attr_size, load_qm9, qm9_splits
from ik_fast.testing import group_family, tolerance

if importlib.util.find_spec("qm9pack") is None:  # its __init__ needs pkg_resources: look it up without importing
    pytest.skip("QM9 needs the qm9pack package", allow_module_level=True)


@pytest.fixture(scope="module")
def qm9_small(tmp_path_factory):
    return load_qm9(limit=200, cache_dir=str(tmp_path_factory.mktemp("qm9cache")))


def _rotate(pos, g, gspace):
    R = torch.tensor(gspace.basespace_action(g), dtype=pos.dtype)
    return pos @ R.T


def test_qm9_data_and_splits(qm9_small, tmp_path):
    d = qm9_small
    assert len(d) == 200 and d.offsets[-1] == d.pos.shape[0] == d.z.shape[0]
    assert set(np.unique(d.z)) <= set(range(5))
    # molecule 1 is methane: HOMO -0.3877 Hartree = -10,549.85 meV, 5 atoms C H H H H
    assert abs(d.targets["homo"][0] - (-10549.85)) < 0.01 and list(d.z[:5]) == [1, 0, 0, 0, 0]
    assert -13_000 < d.targets["homo"].min() and d.targets["homo"].max() < -3_000
    # the cache is read back identically
    d2 = load_qm9(limit=200, cache_dir=str(tmp_path))
    d3 = load_qm9(limit=200, cache_dir=str(tmp_path))
    assert np.array_equal(d2.pos, d3.pos) and np.array_equal(d2.targets["gap"], d3.targets["gap"])
    s1, s2 = qm9_splits(200, seed=3), qm9_splits(200, seed=3)
    assert all(np.array_equal(s1[k], s2[k]) for k in s1)
    allidx = np.concatenate(list(s1.values()))
    assert len(allidx) == 200 and len(np.unique(allidx)) == 200
    assert not np.array_equal(qm9_splits(200, seed=4)["train"], s1["train"])
    assert np.array_equal(qm9_splits(200, seed=3, n_train=10)["train"], s1["train"][:10])
    with pytest.raises(ValueError, match="n_val"):
        qm9_splits(200, n_val=10_000)


@pytest.mark.parametrize("kind", ["none", "bond", "atom"])
def test_collate(qm9_small, kind):
    b = collate(qm9_small, np.arange(20, 30), "homo", cutoff=1.6, edge_attrs=kind)
    n = int(qm9_small.offsets[30] - qm9_small.offsets[20])
    assert b.x.shape == (n, 5) and b.pos.shape == (n, 3) and b.n_graphs == 10
    src, dst = b.edge_index
    assert bool((b.batch[src] == b.batch[dst]).all()), "edges must stay inside a molecule"
    assert bool((src != dst).all())
    assert (b.edge_attr is None) == (kind == "none")
    if kind != "none":
        assert b.edge_attr.shape == (b.edge_index.shape[1], edge_attr_size(kind))


def test_collate_errors(qm9_small):
    with pytest.raises(ValueError, match="edge_attrs"):
        collate(qm9_small, [0], "homo", edge_attrs="bonds")
    with pytest.raises(ValueError, match="target"):
        collate(qm9_small, [0], "energy")


@pytest.mark.parametrize("gs_name,kind", [("o3", "bond"), ("trivial", "atom")])
def test_qm9_model_invariant(qm9_small, gs_name, kind):
    """The prediction is invariant under the group acting on the positions (eval mode); a model whose kernel ignored
    the geometry's equivariance would fail this."""
    torch.manual_seed(0)
    gs = {"o3": gspaces.flipRot3dOnR3, "so3": gspaces.rot3dOnR3, "trivial": gspaces.trivialOnR3}[gs_name]()
    m = QM9Model(
        gs,
        num_layers=1,
        num_features=2,
        num_inv_features=4,
        edge_attr_size=edge_attr_size(kind),
        kernel_n_layers=2,
        kernel_n_channels=2,
        backend="reference",
    )
    b = collate(qm9_small, np.arange(40, 46), "homo", cutoff=2.0, edge_attrs=kind)
    m.train()
    out = m(b.x, b.pos, b.edge_index, b.edge_attr, b.batch, b.n_graphs)
    out.sum().backward()
    assert out.shape == (6,)
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)
    m.eval()
    with torch.no_grad():
        y0 = m(b.x, b.pos, b.edge_index, b.edge_attr, b.batch, b.n_graphs)
        g = gs.fibergroup.sample() if gs_name != "trivial" else gs.fibergroup.identity
        y1 = m(b.x, _rotate(b.pos, g, gs), b.edge_index, b.edge_attr, b.batch, b.n_graphs)
        # a rigid change that is not a symmetry (anisotropic scaling) must change the output
        y2 = m(b.x, b.pos * torch.tensor([1.0, 1.3, 0.8]), b.edge_index, b.edge_attr, b.batch, b.n_graphs)
    scale = (y0 - y0.mean()).abs().max()  # the spread between molecules (an untrained model adds a large offset)
    assert float((y1 - y0).abs().max() / scale) <= tolerance("equivariance", y0.dtype, group_family(gs))
    assert float((y2 - y0).abs().max() / scale) > 5e-2


def test_qm9_model_errors():
    with pytest.raises(ValueError, match="num_features"):
        QM9Model(num_features=0)
    m = QM9Model(num_layers=0, num_features=2, num_inv_features=2, edge_attr_size=0, kernel_n_layers=1)
    with pytest.raises(ValueError, match="edge_attr"):
        m(
            torch.zeros(3, 5),
            torch.zeros(3, 3),
            torch.zeros(2, 1, dtype=torch.long),
            torch.zeros(1, 4),
            torch.zeros(3, dtype=torch.long),
            1,
        )
    with pytest.raises(ValueError, match="x must have shape"):
        m(
            torch.zeros(3, 4),
            torch.zeros(3, 3),
            torch.zeros(2, 1, dtype=torch.long),
            None,
            torch.zeros(3, dtype=torch.long),
            1,
        )


def test_field_activation_groups():
    for gs in (gspaces.flipRot3dOnR3(), gspaces.rot2dOnR3(-1), gspaces.dihedralOnR3(4)):
        act = field_activation(gs, 1, 2)
        assert act.in_type == act.out_type and len(act.in_type) == 2
    with pytest.raises(ValueError, match="channels"):
        field_activation(gspaces.rot3dOnR3(), 1, 0)


def test_simulation_physics():
    # two opposite charges at rest attract, two equal charges repel; positions move by about v*t when far apart
    pos = torch.tensor([[[-0.5, 0.0, 0.0], [0.5, 0.0, 0.0]]], dtype=torch.float64)
    vel = torch.zeros_like(pos)
    x_att, _ = simulate(pos, vel, torch.tensor([[1.0, -1.0]]), 200)
    x_rep, _ = simulate(pos, vel, torch.tensor([[1.0, 1.0]]), 200)
    assert float(x_att[0, 1, 0] - x_att[0, 0, 0]) < 1.0 < float(x_rep[0, 1, 0] - x_rep[0, 0, 0])
    far = torch.tensor([[[-500.0, 0, 0], [500.0, 0, 0]]], dtype=torch.float64)
    v = torch.tensor([[[0.0, 1.0, 0.0], [0.0, 0.0, 2.0]]], dtype=torch.float64)
    x, _ = simulate(far, v, torch.tensor([[1.0, 1.0]]), 1000)  # (time 1000 steps x 1e-3 = 1)
    pull = 1 / 1000**2  # their repulsion at distance 1000: in time 1 it moves each by pull / 2
    assert float((x - (far + v)).abs().max()) <= pull
    s = nbody_dataset(4, horizon=50, seed=1)
    assert s["pos"].shape == (4, 5, 3) and s["charge"].abs().eq(1).all()
    assert torch.equal(nbody_dataset(4, horizon=50, seed=1)["target"], s["target"])
    g = nbody_graph(2)
    assert g.shape == (2, 50) and int(g.max()) == 9


def test_nbody_model_equivariant():
    torch.manual_seed(0)
    gs = gspaces.flipRot3dOnR3()
    m = NBodyModel(gs, num_layers=2, num_features=2, kernel_n_layers=2, kernel_n_channels=2, backend="reference")
    s = nbody_dataset(3, horizon=10, seed=0)
    pos, vel, q = s["pos"].reshape(-1, 3), s["vel"].reshape(-1, 3), s["charge"].reshape(-1)
    g_idx = nbody_graph(3)
    m.train()
    m(pos, vel, q, g_idx).sum().backward()
    m.eval()
    g = gs.fibergroup.sample()
    R = torch.tensor(gs.basespace_action(g), dtype=pos.dtype)
    with torch.no_grad():
        y0 = m(pos, vel, q, g_idx)
        y1 = m(pos @ R.T, vel @ R.T, q, g_idx)
    err = (y1 - y0 @ R.T).norm() / y0.norm()
    assert float(err) <= tolerance("equivariance", y0.dtype, group_family(gs))


@pytest.mark.parametrize("kind", ["gated", "norm"])
def test_models_pass_the_nonlinearity_to_every_kernel(kind):
    """``nonlinearity=`` (the trainer's ``--nonlinearity``) reaches every implicit convolution of both models."""
    from ik_fast.nn.layers import ImplicitPointConv

    gs = gspaces.flipRot3dOnR3()
    small = dict(kernel_n_layers=2, kernel_n_channels=2, backend="reference", nonlinearity=kind)
    for model in (
        QM9Model(gs, num_layers=1, num_features=2, num_inv_features=2, **small),
        NBodyModel(gs, num_layers=2, num_features=2, **small),
    ):
        convs = [m for m in model.modules() if isinstance(m, ImplicitPointConv)]
        assert len(convs) == 3  # QM9: the block's two and the invariant one; N-body: two and the readout
        assert all(c.kernel.nonlinearity == kind for c in convs)
        # the norm nonlinearity learns a bias per hidden layer; the others none
        assert all((len(c.kernel.act_bias) > 0) == (kind == "norm") for c in convs)
