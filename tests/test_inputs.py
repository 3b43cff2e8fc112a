"""Awkward inputs and sizes: many chunks, batched graphs, one node, int32 indices, wrong arguments, grid stride and
dilation, autocast, export, index arithmetic past 2^31, determinism, and (marked slow) 10^6 edges."""

import time

import pytest
import torch
import torch.nn.functional as F
from conftest import TOL, rel
from escnn import gspaces
from escnn import nn as enn

import ik_fast
from ik_fast.graph import INT32_LIMIT, check_int32_extents, padded_degrees, prepare_graph
from ik_fast.models.data import knn_graph
from ik_fast.testing import tolerance


def _types(attr=True):
    gs = gspaces.flipRot2dOnR2(-1, maximum_frequency=4)
    G = gs.fibergroup
    ft = enn.FieldType(gs, [G.irrep(0, 0), G.irrep(1, 1), G.irrep(1, 2)])
    at = enn.FieldType(gs, [G.trivial_representation] * 2) if attr else None
    return ft, at


def _layer(backend="torch", attr=True, dtype=torch.float64, seed=0, **kw):
    ft, at = _types(attr)
    torch.manual_seed(seed)
    layer = ik_fast.ImplicitPointConv(ft, ft, at, n_layers=2, n_channels=4, backend=backend, **kw).to(dtype)
    with torch.no_grad():  # a bias and batch-norm state that are not the identity
        layer.bias.normal_()
        for bn in layer.kernel.bn:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
    return layer


def _inputs(n, k, seed=0, dtype=torch.float64, c=5, skew=False):
    g = torch.Generator().manual_seed(seed)
    pos = (torch.randn(n, 2, generator=g) * 0.4).to(dtype)
    ei = knn_graph(pos, k)
    if skew:  # a hub receiving an edge from every node, so chunks of very different degrees exist
        hub = torch.stack([torch.arange(n), torch.zeros(n, dtype=torch.long)])
        ei = torch.cat([ei, hub], 1)
    x = torch.randn(n, c, generator=g).to(dtype)
    a = torch.randn(ei.shape[1], 2, generator=g).to(dtype)
    return x, pos, ei, a


def _run(layer, x, pos, ei, a, grad=True):
    x = x.clone().requires_grad_(grad)
    y = layer(x, ei, edge_attr=a, pos=pos)
    if not grad:
        return y, None
    (y * torch.cos(torch.arange(y.numel(), dtype=y.dtype)).reshape(y.shape)).sum().backward()
    return y.detach(), x.grad


def test_many_chunks_agree_with_reference():
    """~3,500 edges with a hub: many chunks of different padded degrees, padded slots, the hub in its own chunk;
    training (forward, input and parameter gradients), then eval with and without autograd (the inference path)."""
    x, pos, ei, a = _inputs(300, 11, skew=True)
    assert ei.shape[1] > 3000
    ref, fast = _layer("reference"), _layer("torch")
    g = prepare_graph(ei, 300, 300)
    plan = g.chunks(ref.kernel.program().hidden_size, 5)
    assert len(plan) > 3 and any(c.slot is not None for c in plan)
    tol = TOL[torch.float64]
    for mode in ("train", "eval"):
        ref.train(mode == "train")
        fast.train(mode == "train")
        y_r, gx_r = _run(ref, x, pos, ei, a)
        y_f, gx_f = _run(fast, x, pos, ei, a)
        assert rel(y_f, y_r) <= tol["agree"] and rel(gx_f, gx_r) <= tol["grad"], mode
        for (name, p_r), (_, p_f) in zip(ref.named_parameters(), fast.named_parameters()):
            assert rel(p_f.grad, p_r.grad) <= tol["grad"], (mode, name)
            p_r.grad = p_f.grad = None
    with torch.no_grad():
        assert rel(fast(x, ei, edge_attr=a, pos=pos), y_r) <= tol["agree"]


def test_several_graphs_in_one_batch():
    """Two graphs batched into one (indices offset) give each graph's own output (eval: no shared batch stats)."""
    layer = _layer().eval()
    x1, p1, e1, a1 = _inputs(25, 5, seed=1)
    x2, p2, e2, a2 = _inputs(40, 7, seed=2)
    with torch.no_grad():
        y1 = layer(x1, e1, edge_attr=a1, pos=p1)
        y2 = layer(x2, e2, edge_attr=a2, pos=p2)
        y = layer(
            torch.cat([x1, x2]), torch.cat([e1, e2 + 25], 1), edge_attr=torch.cat([a1, a2]), pos=torch.cat([p1, p2])
        )
    tol = TOL[torch.float64]["agree"]
    assert rel(y[:25], y1) <= tol and rel(y[25:], y2) <= tol


def test_one_node_graph():
    layer = _layer().eval()
    x, pos = torch.randn(1, 5, dtype=torch.float64), torch.zeros(1, 2, dtype=torch.float64)
    ei, a = torch.zeros(2, 1, dtype=torch.long), torch.randn(1, 2, dtype=torch.float64)
    y = layer(x, ei, edge_attr=a, pos=pos)
    y_ref = _layer("reference").eval()(x, ei, edge_attr=a, pos=pos)
    assert y.shape == (1, 5) and rel(y, y_ref) <= TOL[torch.float64]["agree"]
    with pytest.raises(ValueError, match="at least two edges"):
        layer.train()(x, ei, edge_attr=a, pos=pos)


def test_int32_edge_index_matches_int64():
    layer = _layer().eval()
    x, pos, ei, a = _inputs(30, 6)
    with torch.no_grad():
        y64 = layer(x, ei, edge_attr=a, pos=pos)
        y32 = layer(x, ei.int(), edge_attr=a, pos=pos)
    assert torch.equal(y32, y64)


def test_attributes_for_a_kernel_without_attributes():
    layer = _layer(attr=False).eval()
    x, pos, ei, a = _inputs(20, 4)
    with pytest.raises(ValueError, match="edge_attr was given but the kernel was built without an edge_attr_type"):
        layer(x, ei, edge_attr=a, pos=pos)


def test_batched_x_and_missing_coords_name_the_problem():
    layer = _layer().eval()
    x, pos, ei, a = _inputs(20, 4)
    with pytest.raises(ValueError, match=r"x must have shape \(N, 5\), got a batched tensor of shape \(2, 20, 5\)"):
        layer(torch.stack([x, x]), ei, edge_attr=a, pos=pos)
    # a GeometricTensor source with plain-tensor receivers: the output GeometricTensor would have no coords
    gt = enn.GeometricTensor(x, layer.in_type, coords=pos)
    d = pos[ei[0]] - pos[ei[1]]
    with pytest.raises(ValueError, match=r"x\[1\] \(the receivers\) has no coords"):
        layer((gt, x), ei, edge_delta=d, edge_attr=a)
    out = layer((gt, gt), ei, edge_delta=d, edge_attr=a)
    assert isinstance(out, enn.GeometricTensor) and torch.equal(out.coords, pos)


@pytest.mark.parametrize("stride,dilation", [(2, 1), (1, 2), (3, 2)])
def test_grid_conv_stride_and_dilation(stride, dilation):
    """Stride subsamples the stride-1 output; dilation equals a stride-1 convolution with the dilated filter."""
    ft, _ = _types(attr=False)
    torch.manual_seed(0)
    conv = ik_fast.ImplicitConv(ft, ft, 3, n_layers=2, n_channels=4, padding=2, stride=stride, dilation=dilation).eval()
    base = ik_fast.ImplicitConv(ft, ft, 3, n_layers=2, n_channels=4, padding=2).eval()
    base.load_state_dict(conv.state_dict())
    x = enn.GeometricTensor(torch.randn(2, ft.size, 13, 11), ft)
    with torch.no_grad():
        y = conv(x).tensor
        w = conv.filter()
        wd = w.new_zeros(*w.shape[:2], 2 * dilation + 1, 2 * dilation + 1)
        wd[..., ::dilation, ::dilation] = w
        full = F.conv2d(x.tensor, wd, conv.expanded_bias(), padding=2)
    # the same filter in another summation order (a strided or dilated convolution against a dense one)
    assert rel(y, full[..., ::stride, ::stride]) <= tolerance("reorder", torch.float32)
    if dilation == 1:
        with torch.no_grad():
            assert rel(y, base(x).tensor[..., ::stride, ::stride]) <= tolerance("reorder", torch.float32)


def test_torch_backend_under_autocast():
    """bfloat16 autocast on CPU: forward and backward run, and the output is within bfloat16's error of float32."""
    layer = _layer(dtype=torch.float32).train()
    x, pos, ei, a = _inputs(60, 8, dtype=torch.float32)
    y32 = layer(x, ei, edge_attr=a, pos=pos).detach()
    xg = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(xg, ei, edge_attr=a, pos=pos)
    y.float().square().sum().backward()
    assert torch.isfinite(xg.grad).all()
    assert rel(y.float(), y32) <= tolerance("forward", torch.bfloat16, backend="torch")


def test_export_of_a_model_using_the_layer():
    """torch.export of a small model (layer + linear readout) in eval mode, run on a graph of another size."""
    layer = _layer(dtype=torch.float32).eval()

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = layer
            self.head = torch.nn.Linear(5, 1)

        def forward(self, x, edge_index, edge_attr, pos):
            return self.head(self.conv(x, edge_index, edge_attr=edge_attr, pos=pos)).sum()

    model = Model().eval()
    x, pos, ei, a = _inputs(30, 5, dtype=torch.float32)
    E, N = torch.export.Dim("E", min=2), torch.export.Dim("N", min=2)
    ep = torch.export.export(model, (x, ei, a, pos), dynamic_shapes=({0: N}, {1: E}, {0: E}, {0: N}))
    x2, pos2, ei2, a2 = _inputs(45, 7, seed=3, dtype=torch.float32)
    with torch.no_grad():
        assert rel(ep.module()(x2, ei2, a2, pos2), model(x2, ei2, a2, pos2)) <= TOL[torch.float32]["agree"]


def test_index_arithmetic_past_2_31():
    """Indices and padded degrees beyond 2^31 stay exact (int64 throughout), without allocating such buffers."""
    big = 2**31 + 7
    ei = torch.tensor([[big - 1, 5, big - 3], [0, 1, 1]], dtype=torch.long)
    g = prepare_graph(ei, big, 2)
    assert g.src.dtype == torch.int64 and g.src.tolist() == [big - 1, 5, big - 3]
    assert g.perm.tolist() == [0, 1, 2] and g.rowptr.tolist() == [0, 1, 3]
    with pytest.raises(ValueError, match=r"edge_index\[0\] \(sources\) has entry 2147483654"):
        prepare_graph(ei, big - 1, 2)
    d = torch.tensor([2**31 - 1, 2**31, 2**31 + 1, 3 * 2**31 + 5, 2**40 + 1])
    p = padded_degrees(d)
    assert p.dtype == torch.int64
    assert p.tolist() == [2**31, 2**31, 5 * 2**29, 7 * 2**30, 5 * 2**38]


def test_int32_extent_guard():
    """The guard for 32-bit-offset kernels: extents up to 2^31 - 1 pass, one more raises naming the buffer."""
    check_int32_extents("fused", z_rows=INT32_LIMIT, edges=10)
    with pytest.raises(ValueError, match=r"fused: z_rows needs 2,147,483,648 elements"):
        check_int32_extents("fused", edges=10, z_rows=INT32_LIMIT + 1)
    # the products that feed such extents, in Python ints, do not wrap: 2^20 rows x 2^12 floats
    with pytest.raises(ValueError, match="hidden_x_rows"):
        check_int32_extents("fused", hidden_x_rows=(2**20) * (2**12))


def test_repeated_runs_are_bitwise_equal():
    """torch and reference backends promise run-to-run determinism on CPU: same input (and a freshly prepared graph
    each time), bitwise the same output and gradients."""
    x, pos, ei, a = _inputs(200, 9, skew=True)
    for backend in ("torch", "reference"):
        layer = _layer(backend).train()
        state = {k: v.clone() for k, v in layer.state_dict().items()}
        runs = []
        for _ in range(2):
            layer.load_state_dict(state)  # the same running statistics before each run
            y, gx = _run(layer, x, pos, ei.clone(), a)  # a new edge_index tensor: the plan is rebuilt
            runs.append((y, gx, [p.grad for p in layer.parameters()]))
            for p in layer.parameters():
                p.grad = None
        (y0, g0, p0), (y1, g1, p1) = runs
        assert torch.equal(y0, y1) and torch.equal(g0, g1), backend
        assert all(torch.equal(u, v) for u, v in zip(p0, p1)), backend


@pytest.mark.slow
def test_a_million_edges():
    """Cost at 10^6 edges (torch backend, float32, training step): runs, and prints time and peak memory."""
    import resource

    layer = _layer("torch", dtype=torch.float32).train()
    x, pos, ei, a = _inputs(2**16, 16, dtype=torch.float32)
    assert ei.shape[1] >= 10**6
    t = time.perf_counter()
    y, gx = _run(layer, x, pos, ei, a)
    dt = time.perf_counter() - t
    assert torch.isfinite(y).all() and torch.isfinite(gx).all()
    print(
        f"\n10^6 edges ({ei.shape[1]}): training step {dt:.1f} s, peak RSS "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB"
    )
