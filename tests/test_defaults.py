"""What a first use shows: escnn's debug output while a kernel is built, its first-build cost, the backend list in
the docstrings, non-finite node features."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from escnn import group

import ik_fast
from ik_fast import _groups

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
        import warnings

        warnings.warn("a real warning", UserWarning)
        _groups._escnn_print("to stderr", file=__import__("sys").stderr)
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


@pytest.mark.parametrize("J,l,j", [((1, 1), (1, 1), (1, 2)), ((1, 1), (1, 2), (1, 1)), ((1, 0), (1, 3), (1, 3)),
                                   ((0, 0), (1, 0), (0, 0))])
def test_clebsh_gordan_coefficients_unchanged(J, l, j):
    _o2()
    for seed in (0, 2):
        theirs = _cg_uncached(J, l, j, seed)
        with _groups.escnn_build():
            ours = _cg_uncached(J, l, j, seed)
        assert np.array_equal(ours, theirs)


def test_kernel_is_built_inside_the_scope(monkeypatch):
    from escnn import gspaces, nn as enn

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
    from ik_fast.kernel import _stable_order

    keys = torch.randint(0, 50, (5000,))
    assert torch.equal(_stable_order(keys), torch.argsort(keys, stable=True))
