"""A training step without host synchronisation, so that a CUDA graph can capture and replay it: the value checks
(the only reads of device values in a step) are optional, and skipped while a graph is captured. Without a GPU the
reads are observed at the PyTorch API (every ``item``, ``tolist``, ``__bool__``, ... on a tensor: each is a
synchronisation on a GPU), and a capture is simulated by making :func:`ik_fast.graph._capturing` answer yes."""

from __future__ import annotations

import collections

import pytest
import torch
from test_inputs import _inputs, _layer
from torch.overrides import TorchFunctionMode

import ik_fast
from ik_fast import graph as graph_mod

HOST_READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "nonzero"}


class _HostReads(TorchFunctionMode):
    """Counts the tensor methods that copy device values to the host."""

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            self.calls[name] += 1
        return func(*args, **(kwargs or {}))


def _step(layer, x, pos, ei, a):
    xs = x.clone().requires_grad_(True)
    out = layer(xs, ei, edge_attr=a, pos=pos)
    out.square().sum().backward()
    return out


def _reads(layer, x, pos, ei, a) -> collections.Counter:
    probe = _HostReads()
    with probe:
        _step(layer, x, pos, ei, a)
    return probe.calls


# "auto" is what a user gets; the fused backends are the ones a graph would replay
BACKENDS = ["auto", "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_training_step_reads_no_device_values_without_the_value_checks(backend):
    if backend not in ik_fast.available_backends() and backend != "auto":
        pytest.skip(f"{backend} unavailable")
    layer = _layer(backend, dtype=torch.float32).train()
    x, pos, ei, a = (t.float() if t.is_floating_point() else t for t in _inputs(12, 4))
    _step(layer, x, pos, ei, a)  # the warm-up: the graph is prepared and cached
    assert sum(_reads(layer, x, pos, ei, a).values()) > 0  # the checks read values by default (the probe sees them)
    with ik_fast.set_value_checks(False):
        assert _reads(layer, x, pos, ei, a) == {}
    assert graph_mod.value_checks_enabled()  # restored after the block


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_captured_step_reads_nothing_and_needs_a_prepared_graph(backend, monkeypatch):
    if backend not in ik_fast.available_backends() and backend != "auto":
        pytest.skip(f"{backend} unavailable")
    layer = _layer(backend, dtype=torch.float32).train()
    x, pos, ei, a = (t.float() if t.is_floating_point() else t for t in _inputs(12, 4))
    ref = _step(layer, x, pos, ei, a).detach()  # the warm-up, outside the capture
    monkeypatch.setattr(graph_mod, "_capturing", lambda: True)
    assert _reads(layer, x, pos, ei, a) == {}
    torch.testing.assert_close(_step(layer, x, pos, ei, a).detach(), ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="edge_index was not prepared before this CUDA graph capture"):
        _step(layer, x, pos, ei.clone(), a)


def test_value_checks_switch():
    layer = _layer("torch")
    x, pos, ei, a = _inputs(10, 3)
    x[3, 1] = float("nan")
    with pytest.raises(ValueError, match="x contains NaN"):
        layer(x, ei, edge_attr=a, pos=pos)
    ik_fast.set_value_checks(False)
    try:
        assert not graph_mod.value_checks_enabled()
        assert torch.isnan(layer(x, ei, edge_attr=a, pos=pos)).any()  # passed through, as torch.nn layers do
    finally:
        ik_fast.set_value_checks(True)
    with pytest.raises(ValueError, match="x contains NaN"):
        layer(x, ei, edge_attr=a, pos=pos)
    with pytest.raises(TypeError, match="enabled must be a bool"):
        ik_fast.set_value_checks(0)
