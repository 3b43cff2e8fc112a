"""What a first use shows: escnn's debug output while a kernel is built, its first-build cost, the backend list in
the docstrings, non-finite node features."""

from __future__ import annotations

import logging
import sys
import warnings

import numpy as np
import pytest
import torch
from escnn import group

import ik_fast
from ik_fast.spec import _groups

cg = pytest.importorskip("escnn.group._clebsh_gordan")
num = pytest.importorskip("escnn.group._numerical")


def _o2():
    G = group.o2_group()
    for k in range(1, 4):
        G.irrep(1, k)
    return G


def _cg_uncached(J, l, j, seed):
    """escnn's numerical Clebsch-Gordan solver for O(2), past its disk cache (the undecorated function), with the
    global NumPy seed its random group samples come from."""
    np.random.seed(seed)
    return cg._clebsh_gordan_tensor.func(J, l, j, "O2")


def test_escnn_debug_print_goes_to_the_logger(capsys, caplog):
    # with seed 2 the solver needs more samples than O(2) has generators and escnn prints "O(2) (1, 1) (1, 1) (1, 2) 4"
    _o2()
    _cg_uncached((1, 1), (1, 1), (1, 2), seed=2)
    assert "O(2) (1, 1) (1, 1) (1, 2)" in capsys.readouterr().out  # escnn's own behaviour, outside ik_fast
    with caplog.at_level(logging.DEBUG, logger="ik_fast.escnn"), _groups.escnn_build():
        _cg_uncached((1, 1), (1, 1), (1, 2), seed=2)
    assert capsys.readouterr().out == ""
    assert any("O(2) (1, 1) (1, 1) (1, 2)" in r.getMessage() for r in caplog.records)
    assert "print" not in vars(cg)  # restored on exit


def test_escnn_build_leaves_warnings_and_other_files_alone(capsys):
    with pytest.warns(UserWarning, match="a real warning"), _groups.escnn_build():
        warnings.warn("a real warning", UserWarning, stacklevel=1)
        _groups._escnn_print("to stderr", file=sys.stderr)
    assert "to stderr" in capsys.readouterr().err


def test_escnn_build_is_reentrant():
    original = num.build_sylvester_constraint
    with _groups.escnn_build():
        with _groups.escnn_build():
            assert num.build_sylvester_constraint is _groups.sylvester_constraint
        assert num.build_sylvester_constraint is _groups.sylvester_constraint  # the outer scope still holds
        assert cg.build_sylvester_constraint is _groups.sylvester_constraint
    assert num.build_sylvester_constraint is original and cg.build_sylvester_constraint is original


@pytest.mark.parametrize("d1,d2", [(1, 1), (1, 2), (2, 1), (2, 2), (4, 2), (3, 5)])
def test_dense_sylvester_constraint_is_escnns_bit_for_bit(d1, d2):
    rng = np.random.default_rng(d1 * 10 + d2)
    r1 = [rng.standard_normal((d1, d1)) for _ in range(6)]
    r2 = [rng.standard_normal((d2, d2)) for _ in range(6)]
    # exact zeros and negative zeros, as irreps of O(2) have (escnn drops them: every zero is +0.0 after todense)
    r1[0][...] = 0.0
    r1[1] = np.where(rng.random((d1, d1)) < 0.5, -0.0, r1[1])
    r2[1] = np.where(rng.random((d2, d2)) < 0.5, -0.0, r2[1])
    r2[2] = r2[2].round()
    ours = _groups.sylvester_constraint(r1, r2).todense()
    theirs = num.build_sylvester_constraint(r1, r2).todense()
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    assert np.array_equal(ours, theirs)
    assert np.array_equal(np.signbit(ours), np.signbit(theirs))


@pytest.mark.parametrize(
    "J,l,j", [((1, 1), (1, 1), (1, 2)), ((1, 1), (1, 2), (1, 1)), ((1, 0), (1, 3), (1, 3)), ((0, 0), (1, 0), (0, 0))]
)
def test_clebsh_gordan_coefficients_unchanged(J, l, j):
    _o2()
    for seed in (0, 2):
        theirs = _cg_uncached(J, l, j, seed)
        with _groups.escnn_build():
            ours = _cg_uncached(J, l, j, seed)
        assert np.array_equal(ours, theirs)


def test_kernel_is_built_inside_the_scope(monkeypatch):
    from escnn import gspaces
    from escnn import nn as enn

    seen = []
    real = _groups.instantiate_irreps

    def spy(G, K):
        seen.append((cg.__dict__.get("print"), num.build_sylvester_constraint))
        return real(G, K)

    monkeypatch.setattr(_groups, "instantiate_irreps", spy)
    gs = gspaces.flipRot2dOnR2(-1)
    ft = enn.FieldType(gs, [gs.fibergroup.irrep(1, 1)])
    ik_fast.ImplicitKernel(ft, ft, n_layers=2, n_channels=1)
    assert seen == [(_groups._escnn_print, _groups.sylvester_constraint)]
    assert "print" not in vars(cg) and num.build_sylvester_constraint is not _groups.sylvester_constraint


def test_stable_order_is_torchs():
    from ik_fast.spec.kernel import _stable_order

    keys = torch.randint(0, 50, (5000,))
    assert torch.equal(_stable_order(keys), torch.argsort(keys, stable=True))


# ---- non-finite node features: rejected on every backend, eager and compiled, naming the argument ----

EAGER = ["auto", *ik_fast.available_backends("cpu")]


def _small_layer(backend):
    from escnn import gspaces
    from escnn import nn as enn

    gs = gspaces.rot2dOnR2(4)
    ft = enn.FieldType(gs, [gs.fibergroup.regular_representation] * 2)
    torch.manual_seed(0)
    conv = ik_fast.ImplicitPointConv(ft, ft, n_layers=2, n_channels=2, backend=backend)
    g = torch.Generator().manual_seed(0)
    pos, x = torch.randn(10, 2, generator=g), torch.randn(10, ft.size, generator=g)
    edge_index = torch.randint(0, 10, (2, 40), generator=g)
    return conv, ft, x, pos, edge_index


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("backend", EAGER)
def test_nonfinite_node_features_rejected(backend, bad):
    from escnn import nn as enn

    conv, ft, x, pos, ei = _small_layer(backend)
    x[3, 5] = bad
    msg = rf"^x contains NaN or infinite values \(first at node 3, channel 5: {bad}\)$"
    with pytest.raises(ValueError, match=msg):
        conv(x, ei, pos=pos)
    with pytest.raises(ValueError, match=msg):
        conv(enn.GeometricTensor(x, ft, coords=pos), ei)
    with pytest.raises(ValueError, match=msg):  # the functional form names its argument x as well
        ik_fast.implicit_point_conv(conv.kernel.program(), x, ei, pos[ei[0]] - pos[ei[1]], backend=backend)


@pytest.mark.parametrize("backend", EAGER)
def test_bipartite_source_features_named_x0_receivers_unread(backend):
    conv, ft, x, pos, ei = _small_layer(backend)
    recv, pos_r = x[:4].clone(), pos[:4]
    ei = torch.stack([ei[0], ei[1] % 4])
    recv[1, 2] = float("nan")  # the receivers' features are not read (only their number and positions)
    assert torch.isfinite(conv((x, recv), ei, pos=(pos, pos_r))).all()
    x[7, 0] = float("nan")
    with pytest.raises(ValueError, match=r"^x\[0\] contains NaN or infinite values \(first at node 7, channel 0"):
        conv((x, recv), ei, pos=(pos, pos_r))


def test_large_finite_node_features_pass():
    # the sum overflows to inf in float32: the check then looks at the elements, which are finite
    conv, ft, x, pos, ei = _small_layer("reference")
    x[:] = 3e38
    conv.eval()(x, ei, pos=pos)


def _compilable(backend) -> bool:
    """Whether this tree compiles ``backend`` in ImplicitPointConv: "torch" and "reference" as one registered op;
    the fused backends (and "auto", which picks "native" on CPU) with the traced graph preparation."""
    from ik_fast.backends import resolve_backend

    if resolve_backend(backend, "cpu") in ("torch", "reference"):
        return True
    return hasattr(torch.ops.ik_fast, "graph_csr")


@pytest.mark.parametrize("backend", ["auto", "reference"])  # the two routes: traced graph op / one registered op
def test_nonfinite_node_features_rejected_compiled(backend):
    if not _compilable(backend):
        pytest.skip(f"backend {backend!r} is not compiled by this tree")
    conv, ft, x, pos, ei = _small_layer(backend)
    conv.eval()
    compiled = torch.compile(conv, fullgraph=True, dynamic=True)
    torch.testing.assert_close(compiled(x, ei, pos=pos), conv(x, ei, pos=pos))
    x[3, 5] = float("nan")
    with pytest.raises(ValueError, match=r"^x contains NaN or infinite values"):
        compiled(x, ei, pos=pos)


# ---- the backend list in the docstrings is the registry's ----


def _quoted_names(text: str) -> set:
    import re

    return set(re.findall(r'"([a-z_]+)"', text))


def test_docstrings_list_every_registered_backend():
    import inspect

    from ik_fast.backends import BACKENDS

    want = set(BACKENDS) | {"auto"}
    layer = inspect.getdoc(ik_fast.ImplicitPointConv)
    para = layer[layer.index("``backend``") : layer.index("``forward(")]
    assert _quoted_names(para) == want, para
    func = inspect.getdoc(ik_fast.implicit_point_conv)
    arg = func[func.index("backend:") : func.index("Returns:")]
    assert _quoted_names(arg) == want, arg
    assert "available_backends()" in para and "available_backends()" in arg


# ---- the learning curve's axes ----


def _history(train, val):
    return dict(
        train_step=list(range(1, len(train) + 1)),
        train_metric=list(train),
        val_step=[len(train) * (i + 1) // len(val) for i in range(len(val))],
        val_metric=list(val),
    )


def test_learning_curve_log_scale_and_zoom_where_curves_overlap():
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from ik_fast.models.train import learning_curve_figure

    # N-body-like: the first steps' MSE ~100x the last; validation between the two baselines' neighbourhood
    train = np.geomspace(30, 0.18, 240)
    fig = learning_curve_figure(
        _history(train, [0.57, 0.27, 0.2, 0.19, 0.18]), "N-body", "MSE", 0.496, {"position + velocity x time": 0.24}
    )
    try:
        full, zoom = fig.axes
        assert full.get_yscale() == "log" and zoom.get_yscale() == "linear"
        lo, hi = zoom.get_ylim()
        assert lo < 0.18 and 0.57 < hi < 1.0  # the zoom spans validation and baselines, not the training transient
    finally:
        plt.close(fig)
    # QM9-like: values within a factor of 3, one linear panel as before
    fig = learning_curve_figure(_history(np.linspace(580, 300, 128), [420, 342]), "QM9", "MAE (meV)", 463.4)
    try:
        assert len(fig.axes) == 1 and fig.axes[0].get_yscale() == "linear"
    finally:
        plt.close(fig)
