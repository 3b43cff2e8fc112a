"""Shared fixtures: the groups and field types every test runs over, and the tolerance table."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

# Without a GPU the Triton backend's tests run its kernels in the Triton interpreter (numpy, on CPU tensors). The flag
# must be set before the kernels are imported (triton.jit reads it when it decorates them).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# cuBLAS's workspace for PyTorch's deterministic mode (the conformance suite's determinism test), set before the
# first CUDA call
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

warnings.filterwarnings("ignore", message=".*py3nj.*")

# Under pytest-xdist (scripts/run.sh test runs one worker per core), each worker takes its share of the cores for
# PyTorch's intra-op threads instead of every worker taking them all
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 0)
if _WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))

from escnn import gspaces  # noqa: E402
from escnn import nn as enn  # noqa: E402

from ik_fast.testing import tolerance  # noqa: E402

# The tolerance table lives in ik_fast.testing (tolerance(kind, dtype, family, backend)); TOL is its dtype view for
# the backend-agreement tests: "agree" (outputs), "grad" (gradients), "exact_equiv" (exact elements).
TOL = {
    dt: {"agree": tolerance("forward", dt), "grad": tolerance("backward", dt), "exact_equiv": tolerance("exact", dt)}
    for dt in (torch.float32, torch.float64)
}

# name -> (gspace builder, exact?)   — exact: finite group, pointwise ELU on the regular representation
GSPACES = {
    "O3": (lambda: gspaces.flipRot3dOnR3(), False),
    "SO3": (lambda: gspaces.rot3dOnR3(), False),
    "Ih": (lambda: gspaces.fullIcoOnR3(), True),
    "I": (lambda: gspaces.icoOnR3(), True),
    "Oh": (lambda: gspaces.fullOctaOnR3(), True),
    "O": (lambda: gspaces.octaOnR3(), True),
    "D4_R3": (lambda: gspaces.dihedralOnR3(4), True),
    "C6_R3": (lambda: gspaces.rot2dOnR3(6), True),
    "SO2_R3": (lambda: gspaces.rot2dOnR3(), False),
    "cone_O2": (lambda: gspaces.conicalOnR3(), False),
    "cylinder": (lambda: gspaces.cylindricalOnR3(), False),
    "full_cylinder": (lambda: gspaces.fullCylindricalOnR3(), False),
    "mirror": (lambda: gspaces.mirOnR3(), True),
    "inversion": (lambda: gspaces.invOnR3(), True),
    "trivial_R3": (lambda: gspaces.trivialOnR3(), True),
    "SO2": (lambda: gspaces.rot2dOnR2(-1), False),
    "O2": (lambda: gspaces.flipRot2dOnR2(-1), False),
    "C8": (lambda: gspaces.rot2dOnR2(8), True),
    "D6": (lambda: gspaces.flipRot2dOnR2(6), True),
    "flip": (lambda: gspaces.flip2dOnR2(), True),
}

_GS_CACHE = {}


def get_gspace(name):
    if name not in _GS_CACHE:
        _GS_CACHE[name] = GSPACES[name][0]()
    return _GS_CACHE[name]


def _odd_scalar(G):
    """A non-trivial one-dimensional irrep (pseudoscalar, sign, ...) if the group has one."""
    odd = [irr for irr in G.irreps() if irr.size == 1 and not irr.is_trivial()]
    return odd[:1]


def field_types(gs, kind: str):
    """(in_type, out_type, attr_type) for a gspace. kinds: "uniform", "mixed", "uniform_attr", "mixed_attr"."""
    from escnn.group import directsum

    G = gs.fibergroup
    std = gs.basespace_action
    if hasattr(G, "bl_sphere_representation"):
        base = G.bl_sphere_representation(L=1)
    elif G.continuous:
        try:
            base = G.bl_regular_representation(L=1)
        except Exception:
            base = directsum([G.trivial_representation, std])
    else:
        base = G.regular_representation if G.order() <= 8 else std
    if kind.startswith("uniform"):
        in_t = enn.FieldType(gs, [base] * 2)
        out_t = enn.FieldType(gs, [base] * 2)
    else:
        in_t = enn.FieldType(gs, [G.trivial_representation, std, base])
        out_t = enn.FieldType(gs, [base, std, G.trivial_representation] + _odd_scalar(G))
    attr = None
    if kind.endswith("attr"):
        attr = enn.FieldType(gs, [G.trivial_representation, std] + _odd_scalar(G))
    return in_t, out_t, attr


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def so2_layer(n_layers):
    """A small ImplicitPointConv of SO(2) on R^2 (two scalar and two frequency-1 fields, two scalar attributes, torch
    backend, seed 0): cheap enough for torch.compile and for soak tests."""
    import ik_fast

    gs = gspaces.rot2dOnR2(-1, maximum_frequency=4)
    G = gs.fibergroup
    ft = enn.FieldType(gs, [G.irrep(0), G.irrep(1)] * 2)
    at = enn.FieldType(gs, [G.trivial_representation] * 2)
    torch.manual_seed(0)
    return ik_fast.ImplicitPointConv(ft, ft, at, n_layers=n_layers, n_channels=4, backend="torch")


def small_graph(n_nodes=12, n_edges=40, dim=3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    pos = torch.randn(n_nodes, dim, generator=g, dtype=dtype)
    ei = torch.randint(0, n_nodes, (2, n_edges), generator=g)
    return pos, ei


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.hookimpl(tryfirst=True)  # before -m selects
def pytest_collection_modifyitems(config, items):
    """Tests marked ``soak``, ``slow`` or ``install`` run only when selected with -m (e.g. ``pytest -m soak``).

    The GPU run's selection (``-m gpu``): in its CPU rehearsal (``IK_FAST_TEST_DEVICE=cpu``) the tests a module's
    ``rehearsed(item)`` picks (test_conformance's CPU stand-ins for its CUDA cases) are marked ``gpu``; and the tests
    of the Triton backend run last (the first call of each configuration compiles), so that a GPU run cut short by its
    time limit has the most answers."""
    markexpr = config.getoption("markexpr")
    if GPU_TEST_DEVICE == "cpu":
        for item in items:
            picks = getattr(item.module, "rehearsed", None)
            if picks is not None and picks(item):
                item.add_marker(pytest.mark.gpu)
    if markexpr:
        if GPU_TEST_DEVICE is not None and "gpu" in markexpr:
            items.sort(key=lambda item: "triton" in item.name)  # (stable: the files' order otherwise)
        return
    skip = pytest.mark.skip(reason="marked soak/slow/install: select with -m")
    for item in items:
        if any(m in item.keywords for m in ("soak", "slow", "install")):
            item.add_marker(skip)


# ---------------------------------------------------------------------------------------------------------------
# The device of the tests marked gpu, and the time limits of benchmarks/run_gpu.sh (environment variables)
# ---------------------------------------------------------------------------------------------------------------
def _gpu_test_device():
    """$IK_FAST_TEST_DEVICE when set (``cpu``: ``run_gpu.sh --rehearse`` runs the gpu-marked tests on the CPU, at
    their small rehearsal sizes, Triton in its interpreter), else ``cuda`` where there is a GPU, else None (the
    gpu-marked tests are then skipped)."""
    dev = os.environ.get("IK_FAST_TEST_DEVICE", "").strip()
    if not dev:
        return "cuda" if torch.cuda.is_available() else None
    if dev != "cpu" and dev != "cuda" and not dev.startswith("cuda:"):
        raise pytest.UsageError(f"IK_FAST_TEST_DEVICE must be cpu, cuda or cuda:N, got {dev!r}")
    return dev


GPU_TEST_DEVICE = _gpu_test_device()


# IK_FAST_TEST_TIMEOUT (seconds per test), IK_FAST_TEST_DEADLINE (no test starts after it), IK_FAST_TEST_PROGRESS (a
# log of the tests started and done): benchmarks/run_gpu.sh's limits, in tests/_time_limits.py
import _time_limits  # noqa: E402

pytest_runtest_protocol = _time_limits.pytest_runtest_protocol
pytest_runtest_setup = _time_limits.pytest_runtest_setup
pytest_runtest_call = _time_limits.pytest_runtest_call
pytest_runtest_teardown = _time_limits.pytest_runtest_teardown
pytest_runtest_logreport = _time_limits.pytest_runtest_logreport
