"""torch.compile of ImplicitPointConv on the torch backend: one compilation (fullgraph, dynamic shapes) serves graphs
of different sizes and matches eager in the output, every gradient and the running statistics. The native backend's
registered ops (``ik_fast::native_*``): opcheck, and torch.compile(fullgraph=True) with one compilation for several
edge counts (the layer itself compiles on the torch and reference backends only: on a fused backend it would trace
the graph preparation, which depends on the data; see README "torch.compile")."""

import pytest
import torch
from conftest import TOL, rel, so2_layer
from test_native import _conv, _inputs, _op_args, needs_native

from ik_fast import ops
from ik_fast.data import knn_graph


def _layer():
    return so2_layer(n_layers=2).double()


def _graph(n, k, seed, c):
    g = torch.Generator().manual_seed(seed)
    pos = (torch.randn(n, 2, generator=g) * 0.4).double()
    ei = knn_graph(pos, k)
    return (torch.randn(n, c, generator=g).double(), pos, ei,
            torch.randn(ei.shape[1], 2, generator=g).double())


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


@pytest.mark.parametrize("mode", ["train", pytest.param("eval", marks=pytest.mark.slow)])
def test_compile_fullgraph_dynamic_matches_eager(mode):
    torch._dynamo.reset()
    eager = _layer().train(mode == "train")
    comp = _layer().train(mode == "train")
    comp.load_state_dict(eager.state_dict())
    compiled = torch.compile(comp, fullgraph=True, dynamic=True)
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for n, k in ((30, 5), (41, 7)):  # two edge counts (150 and 287) and node counts
        x, pos, ei, a = _graph(n, k, n, eager.in_type.size)
        ye, gxe, gpe, gwe = _step(eager, x, pos, ei, a)
        yc, gxc, gpc, gwc = _step(compiled, x, pos, ei, a)
        tol = TOL[torch.float64]
        assert rel(yc, ye) <= tol["agree"]
        assert rel(gxc, gxe) <= tol["grad"] and rel(gpc, gpe) <= tol["grad"]
        assert gwc.keys() == gwe.keys()
        for name in gwe:
            assert rel(gwc[name], gwe[name]) <= tol["grad"], name
        for (name, b), (_, bc) in zip(eager.named_buffers(), comp.named_buffers()):
            assert rel(bc.double(), b.double()) <= tol["agree"], name
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - before == 1  # compiled once for both graphs


def test_compiled_layer_checks_values_and_shapes():
    """Inside the compiled region the data-dependent checks still run (in the op) and name the argument."""
    torch._dynamo.reset()
    layer = _layer().eval()
    compiled = torch.compile(layer, fullgraph=True, dynamic=True)
    x, pos, ei, a = _graph(20, 4, 0, layer.in_type.size)
    bad = ei.clone()
    bad[0, 3] = 20
    with pytest.raises(ValueError, match=r"edge_index\[0\]"):
        compiled(x, bad, edge_attr=a, pos=pos)
    p2 = pos.clone()
    p2[2, 1] = float("nan")
    with pytest.raises(ValueError, match="pos contains NaN"):
        compiled(x, ei, edge_attr=a, pos=p2)


@needs_native
def test_native_opcheck():
    conv, gs, attr_t = _conv()
    conv.eval()
    args = _op_args(conv, *_inputs(conv, gs, attr_t))
    torch.library.opcheck(torch.ops.ik_fast.native_conv, args)
    grad = torch.randn(args[3].shape[0] - 1, args[8].shape[0], dtype=args[0].dtype, requires_grad=True)
    torch.library.opcheck(torch.ops.ik_fast.native_conv_backward, (grad, *args[:14]))
    plain = [t.detach() for t in args[4]], [t.detach() for t in args[5]]
    for with_act in (False, True):
        torch.library.opcheck(torch.ops.ik_fast.native_trunk_moments,
                              (args[1].detach(), *plain, args[6], args[7], with_act))
    _, act = ops.trunk_moments("native", args[1].detach(), ops.PackedProgram(*plain, args[6], args[7], *args[8:14]),
                               len(args[4]), with_activation=True)
    torch.library.opcheck(torch.ops.ik_fast.native_conv, (*args[:14], act))


@needs_native
def test_native_ops_compile_fullgraph_dynamic_edges():
    """The op traces without graph breaks, and its fake kernel serves every edge count without recompiling."""
    from torch._dynamo.testing import CompileCounterWithBackend

    conv, gs, attr_t = _conv(dtype=torch.float32)
    conv.eval()
    cnt = CompileCounterWithBackend("aot_eager")

    def step(*args):
        return torch.ops.ik_fast.native_conv(*args).square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, backend=cnt, fullgraph=True, dynamic=True)
    frames = []
    for e in (61, 73):
        args = _op_args(conv, *_inputs(conv, gs, attr_t, n=12, e=e, dtype=torch.float32, seed=e))
        loss = compiled(*args)
        assert torch.allclose(loss, step(*args), rtol=1e-5)
        loss.backward()
        assert args[0].grad is not None and torch.isfinite(args[0].grad).all()
        frames.append(cnt.frame_count)
    assert frames[0] >= 1 and frames[1] == frames[0]
