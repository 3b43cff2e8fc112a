"""torch.compile of ImplicitPointConv on every backend that runs here, and "auto" (the default): one compilation
(fullgraph, dynamic shapes) serves graphs of different sizes and matches eager in the output, every gradient and the
running statistics; the data-dependent checks still run and name the argument; a backend that does not run, or that
cannot be traced, is a clear error at compile time. The fused backends are traced through their registered ops: the
compiled step calls them as often as the eager one, and a double backward goes through them. (Each implementation's
registered ops on their own, opcheck and compiled: tests/test_conformance.py.)"""

import pytest
import torch
from conftest import TOL, rel, so2_layer

import ik_fast
from ik_fast.backends import FUSED
from ik_fast.models.data import knn_graph
from ik_fast.testing import tolerance

# every backend that runs on this CPU (under the suite, TRITON_INTERPRET=1 puts "triton" here) and the default
BACKENDS = ik_fast.available_backends("cpu") + ["auto"]
FUSED_HERE = [b for b in BACKENDS if b in FUSED]


def _layer(backend):
    layer = so2_layer(n_layers=3).double()  # two hidden layers: two statistics passes and a batch norm folded between
    layer.backend = backend
    return layer


def _graph(n, k, seed, c):
    g = torch.Generator().manual_seed(seed)
    pos = (torch.randn(n, 2, generator=g) * 0.4).double()
    ei = knn_graph(pos, k)
    return (torch.randn(n, c, generator=g).double(), pos, ei, torch.randn(ei.shape[1], 2, generator=g).double())


GRAPHS = ((14, 3), (17, 4))  # two edge counts (42 and 68) and node counts; small for Triton's interpreter


def _step(layer, x, pos, ei, a):
    x = x.clone().requires_grad_()
    pos = pos.clone().requires_grad_()
    y = layer(x, ei, edge_attr=a, pos=pos)
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)).sum().backward()
    module = getattr(layer, "_orig_mod", layer)  # the compiled wrapper's module
    grads = {n: p.grad.clone() for n, p in module.named_parameters()}
    for p in module.parameters():
        p.grad = None
    return y.detach(), x.grad, pos.grad, grads


def _pair(backend, mode):
    eager = _layer(backend).train(mode == "train")
    comp = _layer(backend).train(mode == "train")
    comp.load_state_dict(eager.state_dict())
    return eager, comp


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["train", pytest.param("eval", marks=pytest.mark.slow)])
def test_compile_fullgraph_dynamic_matches_eager(backend, mode):
    torch._dynamo.reset()
    eager, comp = _pair(backend, mode)
    compiled = torch.compile(comp, fullgraph=True, dynamic=True)
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    tol = TOL[torch.float64]
    for n, k in GRAPHS:
        x, pos, ei, a = _graph(n, k, n, eager.in_type.size)
        ye, gxe, gpe, gwe = _step(eager, x, pos, ei, a)
        yc, gxc, gpc, gwc = _step(compiled, x, pos, ei, a)
        assert rel(yc, ye) <= tol["agree"]
        assert rel(gxc, gxe) <= tol["grad"] and rel(gpc, gpe) <= tol["grad"]
        assert gwc.keys() == gwe.keys() and len(gwe) > 0
        for name in gwe:
            assert rel(gwc[name], gwe[name]) <= tol["grad"], name
        buffers = dict(comp.named_buffers())
        for name, b in eager.named_buffers():  # the running statistics, updated as in eager
            assert rel(buffers[name].double(), b.double()) <= tol["agree"], name
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - before == 1  # compiled once for both graphs


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_inference_matches_eager(backend):
    """eval mode without autograd: the packing folds the running statistics without autograd (the path that runs
    the native packing passes in eager)."""
    torch._dynamo.reset()
    eager, comp = _pair(backend, "eval")
    compiled = torch.compile(comp, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for n, k in GRAPHS:
            x, pos, ei, a = _graph(n, k, n + 1, eager.in_type.size)
            assert (
                rel(compiled(x, ei, edge_attr=a, pos=pos), eager(x, ei, edge_attr=a, pos=pos))
                <= TOL[torch.float64]["agree"]
            )


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_layer_checks_values_and_shapes(backend):
    """Inside the compiled region the data-dependent checks still run (in an op) and name the argument."""
    torch._dynamo.reset()
    layer = _layer(backend).eval()
    compiled = torch.compile(layer, fullgraph=True, dynamic=True)
    x, pos, ei, a = _graph(12, 3, 0, layer.in_type.size)
    bad = ei.clone()
    bad[0, 3] = 12
    with pytest.raises(ValueError, match=r"edge_index\[0\]"):
        compiled(x, bad, edge_attr=a, pos=pos)
    p2 = pos.clone()
    p2[2, 1] = float("nan")
    with pytest.raises(ValueError, match="pos contains NaN"):
        compiled(x, ei, edge_attr=a, pos=p2)
    a2 = a.clone()
    a2[5, 0] = float("inf")
    with pytest.raises(ValueError, match="edge_attr contains NaN or infinite"):
        compiled(x, ei, edge_attr=a2, pos=pos)
    delta = pos[ei[0]] - pos[ei[1]]
    delta[1, 0] = float("nan")
    with pytest.raises(ValueError, match="edge_delta contains NaN"):
        compiled(x, ei, edge_delta=delta, edge_attr=a)
    assert torch.isfinite(compiled(x, ei, edge_attr=a, pos=pos)).all()  # the graph that passes the checks runs


def test_compile_error_names_an_unavailable_backend(monkeypatch):
    """A backend that does not run here fails when the call is compiled, with its name, its reason and the backends
    that run instead: not an internal error of Dynamo."""
    import ik_fast.backends as backends

    real = backends.unavailable_reason
    monkeypatch.setattr(
        backends,
        "unavailable_reason",
        lambda name, device: "no kernels (test)" if name == "native" else real(name, device),
    )
    torch._dynamo.reset()
    compiled = torch.compile(_layer("native").eval(), fullgraph=True, dynamic=True)
    x, pos, ei, a = _graph(12, 3, 0, compiled.in_type.size)
    with pytest.raises(
        RuntimeError,
        match=r"backend 'native' does not run here \(no kernels \(test\)\); use one of "
        r"\[.*'torch'",
    ) as err:
        compiled(x, ei, edge_attr=a, pos=pos)
    assert not isinstance(err.value, torch._dynamo.exc.InternalTorchDynamoError)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_functional_compile_names_an_untraceable_backend(backend):
    """ik_fast.implicit_point_conv traces its backend's code: for "torch" and "reference" (which the layer runs as
    one op) that is a clear error at compile time naming the backend and the alternatives."""
    layer = _layer(backend).eval()
    x, pos, ei, a = _graph(12, 3, 0, layer.in_type.size)

    def step(x, ei, a, pos):
        prog = layer.kernel.program()
        return ik_fast.implicit_point_conv(prog, x, ei, pos[ei[0]] - pos[ei[1]], a, backend=backend)[0]

    torch._dynamo.reset()
    with pytest.raises(
        RuntimeError,
        match=f"backend '{backend}' cannot be traced by torch.compile .*compile an ik_fast.ImplicitPointConv instead",
    ) as err:
        torch.compile(step, fullgraph=True, dynamic=True)(x, ei, a, pos)
    assert not isinstance(err.value, torch._dynamo.exc.InternalTorchDynamoError)


@pytest.mark.parametrize("backend", FUSED_HERE)
def test_functional_compile_fused_matches_eager(backend):
    layer = _layer(backend).eval()
    x, pos, ei, a = _graph(12, 3, 0, layer.in_type.size)

    def step(x, ei, a, pos):
        prog = layer.kernel.program()
        return ik_fast.implicit_point_conv(prog, x, ei, pos[ei[0]] - pos[ei[1]], a, backend=backend)[0]

    torch._dynamo.reset()
    with torch.no_grad():
        assert (
            rel(torch.compile(step, fullgraph=True, dynamic=True)(x, ei, a, pos), step(x, ei, a, pos))
            <= TOL[torch.float64]["agree"]
        )


def _op_calls(fn):
    """How often each ik_fast op ran in ``fn()`` (profiler events named ``ik_fast::...``)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    counts = {}
    for ev in prof.events():
        if ev.name.startswith("ik_fast::"):
            counts[ev.name] = counts.get(ev.name, 0) + 1
    return counts


@pytest.mark.parametrize("backend", FUSED_HERE)
def test_compiled_step_runs_the_ops_of_the_eager_step(backend):
    """A compiled training step of a fused backend evaluates what the eager one does: the same calls of its
    registered ops (statistics passes, conv, conv_backward), no second forward, and the graph's preparation once."""
    torch._dynamo.reset()
    eager, comp = _pair(backend, "train")
    compiled = torch.compile(comp, fullgraph=True, dynamic=True)
    x, pos, ei, a = _graph(14, 3, 0, eager.in_type.size)
    _step(compiled, x, pos, ei, a)  # (compiles)
    ce = _op_calls(lambda: _step(eager, x, pos, ei, a))
    cc = _op_calls(lambda: _step(compiled, x, pos, ei, a))
    conv = {f"ik_fast::{backend}_{s}" for s in ("conv", "conv_backward", "trunk_moments")}
    assert conv <= set(ce)
    assert {k: v for k, v in cc.items() if k in conv} == {k: v for k, v in ce.items() if k in conv}
    assert cc.get("ik_fast::graph_csr") == 1 and "ik_fast::eager_conv" not in cc


@pytest.mark.parametrize("backend", FUSED_HERE)
def test_compiled_fused_double_backward(backend):
    """Traced through the registered ops, the compiled layer keeps their double backward (forces): with Dynamo's
    graph run by autograd (backend="eager"; AOTAutograd's compiled backward has none, for any model), the gradient
    of a gradient matches eager."""
    torch._dynamo.reset()
    eager, comp = _pair(backend, "eval")
    compiled = torch.compile(comp, fullgraph=True, dynamic=True, backend="eager")
    x, pos, ei, a = _graph(14, 3, 0, eager.in_type.size)
    out = []
    for layer in (eager, compiled):
        p = pos.clone().requires_grad_()
        (g,) = torch.autograd.grad(layer(x, ei, edge_attr=a, pos=p).square().sum(), p, create_graph=True)
        (h,) = torch.autograd.grad(g.square().sum(), p)
        out.append((g.detach(), h))
    assert rel(out[1][0], out[0][0]) <= TOL[torch.float64]["grad"]
    assert rel(out[1][1], out[0][1]) <= tolerance("double_backward", torch.float64)
