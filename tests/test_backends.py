"""Backends agree with the reference in forward and in every gradient, in train and eval mode."""

import warnings

import pytest
import torch
from conftest import TOL, field_types, get_gspace, rel

import ik_fast
from ik_fast.testing import kernel_graph, randomize_, tolerance

GROUPS = ["O3", "SO3", "Ih", "D4_R3", "SO2_R3", "full_cylinder", "O2", "C8"]
# the fast backends, each checked against the reference; "triton" runs in the Triton interpreter without a GPU,
# "native" wherever its extension loads (tests/test_native.py says why it does not)
_CPU = ik_fast.available_backends("cpu")
FAST = ["torch"] + [b for b in ("triton", "native") if b in _CPU]
# finite differences need fast float64 backends: not the Triton interpreter
GRADCHECK = ["reference", "torch"] + [b for b in ("native",) if b in _CPU]


def _setup(name, kind="mixed_attr", dtype=torch.float32, n=14, e=60, seed=0, n_channels=3, **kw):
    gs = get_gspace(name)
    in_t, out_t, attr_t = field_types(gs, kind)
    torch.manual_seed(seed)
    conv = ik_fast.ImplicitPointConv(in_t, out_t, attr_t, n_layers=3, n_channels=n_channels, **kw)
    conv = randomize_(conv, seed).to(dtype)  # random biases, batch-norm parameters and running statistics
    # about e edges inside the radial shell (k nearest neighbours, a quarter of the nodes with a self-loop)
    g = kernel_graph(conv, n_nodes=n, k=max(1, round(0.75 * e / n)), seed=seed, dtype=dtype)
    return conv, g.pos, g.edge_index, g.x, g.edge_attr


def _run(conv, backend, pos, ei, x, a, grads=True):
    conv.backend = backend
    conv.zero_grad()
    x = x.clone().requires_grad_(grads)
    pos = pos.clone().requires_grad_(grads)
    a = None if a is None else a.clone().requires_grad_(grads)
    out = conv(x, ei, edge_attr=a, pos=pos)
    res = {"out": out.detach()}
    if grads:
        # drawn in float32 whatever the dtype, so that a float64 run weights its outputs the same
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
        (out * w).sum().backward()
        res["x"], res["pos"] = x.grad, pos.grad
        if a is not None:
            res["attr"] = a.grad
        for name, p in conv.named_parameters():
            res[name] = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
    return res


def _compare(r1, r2, dtype, exact=None):
    """r2 agrees with r1 (the reference) within the tolerance table's bounds. A sum with cancellation (the gradient
    of a scalar such as sigma over every edge and output) can miss a fixed relative bound in float32 whichever
    backend computes it: where ``exact`` (a callable giving the float64 reference run) is given, such a key passes
    only if the backend is within ``tolerance("own_error", float32)`` times the float32 reference's own error against
    float64."""
    tol = TOL[dtype]
    for key in r1:
        bound = tol["agree"] if key == "out" else tol["grad"]
        if r1[key].norm() == 0:
            assert r2[key].norm() <= bound, key
            continue
        err = rel(r2[key], r1[key])
        if err > bound and exact is not None:
            r64 = exact()[key]
            own = rel(r1[key].double(), r64)
            assert rel(r2[key].double(), r64) <= max(bound, tolerance("own_error", dtype) * own), (key, err, own)
            continue
        assert err <= bound, (key, err)


def _exact_run(conv, state, pos, ei, x, a):
    """A lazily computed float64 reference run of ``conv`` from ``state`` (for :func:`_compare`)."""
    memo = {}

    def run():
        if "r" not in memo:
            import copy

            c64 = copy.deepcopy(conv).double()
            c64.load_state_dict(state)
            memo["r"] = _run(c64, "reference", pos.double(), ei, x.double(), None if a is None else a.double())
        return memo["r"]

    return run


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", GROUPS)
def test_backend_matches_reference(name, mode, backend):
    conv, pos, ei, x, a = _setup(name)
    getattr(conv, mode)()
    state = {k: v.clone() for k, v in conv.state_dict().items()}
    ref = _run(conv, "reference", pos, ei, x, a)
    conv.load_state_dict(state)  # same running statistics for both
    got = _run(conv, backend, pos, ei, x, a)
    _compare(ref, got, torch.float32, exact=_exact_run(conv, state, pos, ei, x, a))


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("kind", ["uniform_attr", "mixed"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_backend_matches_reference_float64(mode, kind, backend):
    conv, pos, ei, x, a = _setup("O3", kind, torch.float64)
    getattr(conv, mode)()
    state = {k: v.clone() for k, v in conv.state_dict().items()}
    ref = _run(conv, "reference", pos, ei, x, a)
    conv.load_state_dict(state)
    got = _run(conv, backend, pos, ei, x, a)
    _compare(ref, got, torch.float64)


@pytest.mark.parametrize("backend", FAST)
def test_running_stats_updated_identically(backend):
    conv, pos, ei, x, a = _setup("O3")
    conv.train()
    init = {k: v.clone() for k, v in conv.state_dict().items()}
    _run(conv, "reference", pos, ei, x, a, grads=False)
    after_ref = {k: v.clone() for k, v in conv.state_dict().items()}
    conv.load_state_dict(init)
    _run(conv, backend, pos, ei, x, a, grads=False)
    for k, v in conv.state_dict().items():
        if "running" in k:
            assert not torch.equal(v, init[k]), k
            assert rel(v, after_ref[k]) <= tolerance("forward", torch.float32, backend=backend), k
        if "num_batches" in k:
            assert int(v) == int(init[k]) + 1


def test_batch_stats_are_detached():
    """escnn's IIDBatchNorm1d detaches the batch statistics: the gradient treats them as constants."""
    conv, pos, ei, x, a = _setup("O3")
    conv.train()
    prog = conv.kernel.program()
    d = torch.randn(40, 3)
    h, stats = prog.trunk(d, torch.randn(40, conv.kernel.edge_attr_type.size))
    for m, v in stats:
        assert not m.requires_grad and not v.requires_grad


# "triton" is left out of the finite-difference checks (the interpreter makes them minutes long); its gradients are
# checked against the reference's in float64 to 1e-9 above, which gradcheck validates here
@pytest.mark.parametrize("backend", GRADCHECK)
def test_gradcheck_float64(backend):
    conv, pos, ei, x, a = _setup("O3", "mixed_attr", torch.float64, n=6, e=14)
    conv.eval()
    conv.backend = backend

    inputs = tuple(t.clone().requires_grad_() for t in (x, pos, a))
    # (gradcheck's own step and bounds, here and below)
    assert torch.autograd.gradcheck(lambda x, p, a: conv(x, ei, edge_attr=a, pos=p), inputs)


@pytest.mark.parametrize("backend", GRADCHECK)
def test_gradcheck_parameters(backend):
    """d out / d (sigma, first and last Linear's escnn weights, batch-norm affine) by finite differences."""
    conv, pos, ei, x, a = _setup("D4_R3", "mixed_attr", torch.float64, n=6, e=14, n_channels=2)
    conv.eval()
    conv.backend = backend
    names = ["kernel.sigma", "kernel.mlp.0.weights", "kernel.mlp.2.weights", "kernel.bn.0.weight", "bias"]
    params = dict(conv.named_parameters())
    vals = tuple(params[n].detach().clone().requires_grad_() for n in names)

    def f(*vs):
        return torch.func.functional_call(conv, dict(zip(names, vs)), (x, ei), {"edge_attr": a, "pos": pos})

    assert torch.autograd.gradcheck(f, vals)


@pytest.mark.parametrize("backend", ["reference"] + FAST)
def test_forces_train(backend):
    """A loss that contains the gradient of an energy with respect to positions (forces) trains: double backward."""
    conv, pos, ei, x, a = _setup("O3", "uniform_attr", n=10, e=40)
    conv.train()
    conv.backend = backend
    pos = pos.clone().requires_grad_()
    out = conv(x, ei, edge_attr=a, pos=pos)
    energy = out.square().sum()
    forces = -torch.autograd.grad(energy, pos, create_graph=True)[0]
    loss = forces.square().sum()
    loss.backward()
    grads = [p.grad for p in conv.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


@pytest.mark.parametrize("backend", FAST)
def test_forces_agree_between_backends(backend):
    conv, pos, ei, x, a = _setup("O3", "uniform_attr", n=10, e=40)
    conv.eval()
    res = {}
    for b in ("reference", backend):
        conv.backend = b
        conv.zero_grad()
        p = pos.clone().requires_grad_()
        out = conv(x, ei, edge_attr=a, pos=p)
        f = torch.autograd.grad(out.square().sum(), p, create_graph=True)[0]
        f.square().sum().backward()
        res[b] = (f.detach(), conv.kernel.mlp[0].weights.grad.clone())
    assert rel(res[backend][0], res["reference"][0]) <= tolerance("backward", torch.float32, backend=backend)
    assert rel(res[backend][1], res["reference"][1]) <= tolerance("double_backward", torch.float32, backend=backend)


@pytest.mark.parametrize("backend", ["reference"] + FAST)
def test_empty_graph_eval_returns_bias(backend):
    conv, pos, ei, x, a = _setup("O3")
    conv.eval()
    conv.backend = backend
    with torch.no_grad():
        conv.bias.normal_()
    out = conv(x, torch.zeros(2, 0, dtype=torch.long), edge_attr=a[:0], pos=pos)
    assert torch.allclose(out, conv.expanded_bias().expand_as(out))


@pytest.mark.parametrize("n_edges", [0, 1])
def test_training_needs_two_edges(n_edges):
    conv, pos, ei, x, a = _setup("O3")
    conv.train()
    with pytest.raises(ValueError, match="at least two edges"):
        conv(x, ei[:, :n_edges], edge_attr=a[:n_edges], pos=pos)


@pytest.mark.parametrize("backend", FAST)
def test_isolated_nodes_duplicate_edges_and_skew(backend):
    conv, pos, _, x, a = _setup("O3", n=40)
    # node 0 is a hub receiving from everyone, nodes 30..39 are isolated, edge (1 -> 2) appears three times
    src = torch.cat([torch.arange(30), torch.tensor([1, 1, 1, 5, 6]), torch.randint(0, 30, (30,))])
    dst = torch.cat([torch.zeros(30, dtype=torch.long), torch.tensor([2, 2, 2, 7, 7]), torch.randint(1, 30, (30,))])
    ei = torch.stack([src, dst])
    a = torch.randn(ei.shape[1], conv.kernel.edge_attr_type.size)
    for mode in ("train", "eval"):
        getattr(conv, mode)()
        state = {k: v.clone() for k, v in conv.state_dict().items()}
        ref = _run(conv, "reference", pos, ei, x, a)
        conv.load_state_dict(state)
        got = _run(conv, backend, pos, ei, x, a)
        _compare(ref, got, torch.float32)
        assert torch.allclose(got["out"][30:], conv.expanded_bias().detach().expand(10, -1))


@pytest.mark.parametrize("backend", FAST)
def test_bipartite_downsampling(backend):
    conv, pos, ei, x, a = _setup("O3", n=20)
    conv.eval()
    idx = torch.arange(0, 20, 4)  # 5 receivers
    src = torch.randint(0, 20, (30,))
    dst = torch.randint(0, 5, (30,))
    ei2 = torch.stack([src, dst])
    a2 = torch.randn(30, a.shape[1])
    outs = {}
    for b in ("reference", backend):
        conv.backend = b
        outs[b] = conv((x, x[idx]), ei2, edge_attr=a2, pos=(pos, pos[idx]))
    assert outs[backend].shape == (5, conv.out_type.size)
    assert rel(outs[backend], outs["reference"]) <= tolerance("forward", torch.float32, backend=backend)
    # explicit edge vectors give the same answer
    d = pos[src] - pos[idx][dst]
    again = conv((x, x[idx]), ei2, edge_delta=d, edge_attr=a2)
    assert torch.equal(again, outs[backend])  # (the vectors the layer forms from the positions, bit for bit)


def test_geometric_tensor_in_and_out():
    from escnn import nn as enn

    conv, pos, ei, x, a = _setup("O3")
    conv.eval()
    gt = enn.GeometricTensor(x, conv.in_type, coords=pos)
    out = conv(gt, ei, edge_attr=a)
    assert isinstance(out, enn.GeometricTensor) and out.type == conv.out_type
    assert torch.equal(out.coords, pos)
    assert torch.allclose(out.tensor, conv(x, ei, edge_attr=a, pos=pos))


def test_backend_selection(monkeypatch):
    assert set(ik_fast.available_backends()) >= {"reference", "torch"}
    conv, pos, ei, x, a = _setup("C8")
    conv.eval()
    conv.backend = None
    monkeypatch.setenv("IK_FAST_BACKEND", "reference")
    r = conv(x, ei, edge_attr=a, pos=pos)
    monkeypatch.setenv("IK_FAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="backend"):
        conv(x, ei, edge_attr=a, pos=pos)
    monkeypatch.delenv("IK_FAST_BACKEND")
    conv.backend = "auto"
    import ik_fast.backends as B

    B._warned.clear()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = conv(x, ei, edge_attr=a, pos=pos)
        conv(x, ei, edge_attr=a, pos=pos)
    # one warning when "auto" falls back from the fused backends; none where it takes one ("native" on CPU)
    assert sum("backend 'auto'" in str(m.message) for m in w) == (0 if "native" in _CPU else 1)
    assert rel(out, r) <= tolerance("forward", torch.float32)
    with pytest.raises(ValueError, match="backend"):
        ik_fast.ImplicitPointConv(conv.in_type, conv.out_type, backend="nope")
