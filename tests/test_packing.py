"""The fused ops' packing straight from the kernel's learnable tensors (ik_fast/packing.py: one autograd node with a
written-out vector-Jacobian product) against the plain path (the program's own expansion and the folds' operators,
differentiated by autograd): the same packed tensors and the same gradients for every learnable tensor, in training
(batch statistics) and eval mode (running ones), for dense and componentwise hidden Linears, with and without batch
norms, one to four layers; its double backward; and that a fused backend's program never expands the
dense lowering it does not read. Both forms of the entry passes: the native extension's C++ loops and their PyTorch
statement."""

import pytest
import torch
from conftest import field_types, get_gspace, rel

import ik_fast
from ik_fast import packing, testing
from ik_fast.testing import tolerance

CASES = [  # (gspace, field kind, layer options)
    ("O3", "mixed_attr", {}),
    ("SO3", "uniform", dict(n_layers=2)),
    ("Oh", "mixed", {}),
    ("D6", "mixed_attr", dict(n_layers=4)),
    ("SO2", "uniform_attr", dict(batch_norm=False)),
    ("cylinder", "mixed", dict(n_layers=1)),
    ("Ih", "uniform", dict(bias=False)),
]


def _layer(name, kind, kw):
    gs = get_gspace(name)
    in_t, out_t, attr_t = field_types(gs, kind)
    torch.manual_seed(0)
    conv = ik_fast.ImplicitPointConv(in_t, out_t, attr_t, n_channels=3, **kw).double()
    testing.randomize_(conv)
    return conv


def _stats(prog):
    g = torch.Generator().manual_seed(1)
    return (
        [
            (
                torch.randn(h.channels, h.dim, generator=g, dtype=torch.float64),
                torch.rand(h.channels, generator=g, dtype=torch.float64) + 0.5,
            )
            for h in prog.hidden
            if h.bn is not None
        ]
        if prog.training
        else []
    )


def _outputs(p):
    return [*p.weights, *p.biases, p.final_weight, p.final_bias, p.coef]


def _packings(conv, mode):
    conv.train(mode == "train")
    prog = conv.kernel.program()
    stats = _stats(prog)
    fast = prog.packed(stats, torch.float64)
    plain = prog.packed_from(prog.parts(), stats, torch.float64, None, "program")
    return conv, prog, fast, plain


# the packing against the plain path: the same sums in another order, float64
REORDER = tolerance("reorder", torch.float64)


@pytest.fixture(params=["native", "torch"])
def passes(request, monkeypatch):
    """The entry passes of the packing: the native extension's (CPU, when it loads) or their PyTorch form."""
    if request.param == "native" and ik_fast.ops.status("native", "cpu") is not None:
        pytest.skip("native extension unavailable")
    monkeypatch.setattr(packing, "NATIVE_PASSES", request.param == "native")
    return request.param


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name,kind,kw", CASES)
def test_packing_matches_the_plain_path(name, kind, kw, mode, passes):
    conv, prog, fast, plain = _packings(_layer(name, kind, kw), mode)
    assert prog.packing is not None
    params = [p for p in conv.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(2)
    seeds = [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in _outputs(plain)]
    grads = []
    for outs in (_outputs(fast), _outputs(plain)):
        loss = sum((o * s).sum() for o, s in zip(outs, seeds) if o.requires_grad)
        grads.append(torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True))
    for a, b in zip(_outputs(fast), _outputs(plain)):
        assert a.shape == b.shape
        assert rel(a, b) <= REORDER
    for p, a, b in zip(params, *grads):
        assert (a is None) == (b is None), p.shape
        if a is not None:
            assert rel(a, b) <= REORDER, p.shape
    # the packing is one autograd node over the learnable tensors
    assert type(fast.final_weight.grad_fn).__name__ == "_FromSourcesBackward"


@pytest.mark.parametrize("name,kind,kw", CASES)
def test_finished_statistics_and_their_fold(name, kind, kw, passes):
    """A statistics pass's moments finished by the program (the native extension's pack_bn, which also makes the
    fold's factor and shift for the next packing) against BatchNorm.finish and BatchNorm.factors."""
    conv = _layer(name, kind, kw).train()
    prog = conv.kernel.program()
    g = torch.Generator().manual_seed(5)
    stats = []
    for k, h in enumerate(prog.hidden):
        if h.bn is None:
            continue
        moments = torch.randn(2, h.channels * h.dim, generator=g, dtype=torch.float64)
        moments[1] = moments[1].abs() * 40
        got = prog.finish_stats(k, moments, 41)
        want = h.bn.finish(moments, 41)
        for a, b in zip(got, want):
            assert a.shape == b.shape and rel(a, b) <= REORDER
        stats.append(got)
    # the packing with them: the folds made from the memoised factors equal the plain path's
    fast = prog.packed(stats, torch.float64)
    plain = prog.packed_from(prog.parts(), stats, torch.float64, None, "program")
    for a, b in zip(_outputs(fast), _outputs(plain)):
        assert rel(a, b) <= REORDER


@pytest.mark.parametrize("name,kind,kw", [CASES[0], CASES[3]])
def test_packing_double_backward(name, kind, kw, passes):
    conv, prog, fast, plain = _packings(_layer(name, kind, kw), "train")
    params = [p for p in conv.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(3)
    seeds = [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in _outputs(plain)]
    second = []
    for outs in (_outputs(fast), _outputs(plain)):
        loss = sum((o * s).sum() + (o * o).sum() for o, s in zip(outs, seeds) if o.requires_grad)
        first = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True, retain_graph=True)
        total = sum((f * f).sum() for f in first if f is not None)
        second.append(torch.autograd.grad(total, params, allow_unused=True, retain_graph=True))
    for a, b in zip(*second):
        assert (a is None) == (b is None)
        if a is not None:
            assert rel(a, b) <= REORDER


def test_fused_backend_does_not_expand_the_dense_lowering():
    """The program defers its expansion (the reference's dense weights): a training step of a fused backend packs
    from the learnable tensors only; reading a weight of the program expands it then."""
    from ik_fast.program import Deferred

    made = []
    orig = Deferred.parts

    def parts(self):
        if self._parts is None:
            made.append(1)
        return orig(self)

    conv = _layer("O3", "mixed_attr", {})
    g = torch.Generator().manual_seed(4)
    pos = torch.randn(12, 3, generator=g, dtype=torch.float64)
    ei = torch.randint(0, 12, (2, 60), generator=g)
    x = torch.randn(12, conv.in_type.size, generator=g, dtype=torch.float64)
    a = torch.randn(60, conv.kernel.edge_attr_type.size, generator=g, dtype=torch.float64)
    conv.train()
    Deferred.parts = parts
    try:
        if ik_fast.ops.status("native", "cpu") is None:
            conv.backend = "native"
            conv(x, ei, edge_attr=a, pos=pos).sum().backward()
            assert not made
        prog = conv.kernel.program()
        prog.hidden[0].linear.weight  # noqa: B018
        assert made
    finally:
        Deferred.parts = orig


def test_native_passes_reject_indices_out_of_range():
    """The C++ entry passes check every index against its range before the loops that use it unchecked: a negative
    one or one past the end is an error naming the index vector, never a read or write outside the tensors."""
    if ik_fast.ops.status("native", "cpu") is not None:
        pytest.skip("native extension unavailable")
    from ik_fast._native import module

    m = module()
    src = torch.randn(10)
    ok = torch.tensor([0, 3, 9])
    vals = torch.ones(3)
    pieces = ([[5]], [0])
    m.pack_expand([src], ok, vals, torch.tensor([0, 1, 4]), 5, ok, vals, *pieces)  # in range: runs
    for bad in (torch.tensor([0, -1, 2]), torch.tensor([0, 10, 2])):
        with pytest.raises(RuntimeError, match="cols has an index outside"):
            m.pack_expand([src], bad, vals, torch.tensor([0, 1, 4]), 5, ok, vals, *pieces)
    with pytest.raises(RuntimeError, match="targets has an index outside"):
        m.pack_expand([src], ok, vals, torch.tensor([0, 1, 5]), 5, ok, vals, *pieces)
    with pytest.raises(RuntimeError, match="piece 0 outside"):
        m.pack_expand([src], ok, vals, torch.tensor([0, 1, 4]), 5, ok, vals, [[6]], [0])
    # the final weight's entries: t in [0, R H C), h in [0, H), ch in [0, channels), rc in [0, R C)
    R, H, C, D = 2, 4, 3, 2
    contrib = torch.randn(3)
    t, h, ch, rc = torch.tensor([0, 5, 23]), torch.tensor([0, 1, 3]), torch.tensor([0, 0, 1]), torch.tensor([0, 2, 5])
    m.pack_final(contrib, t, h, ch, rc, None, None, None, R, H, C, H // D)
    with pytest.raises(RuntimeError, match="t has an index outside"):
        m.pack_final(contrib, torch.tensor([0, 5, 24]), h, ch, rc, None, None, None, R, H, C, H // D)
    # the whole backward (no hidden layer: the final fold, then the transpose over 10 sources)
    grads, sigma = [torch.randn(R, H, C), None, None], torch.ones(1)
    vjp = (grads, [], [], [], [], [], [], [], [], [], [-1], [], 0, contrib)
    tail = (R, H, C, H // D, torch.zeros(0, dtype=torch.long), ok, vals, [[10]], sigma, sigma)
    (g, g_sigma) = m.pack_vjp(*vjp, t, h, ch, rc, *tail)
    assert g.shape == (10,) and g_sigma is None
    with pytest.raises(RuntimeError, match="rc has an index outside"):
        m.pack_vjp(*vjp, t, h, ch, torch.tensor([-3, 2, 5]), *tail)
    with pytest.raises(RuntimeError, match="cols has an index outside"):
        m.pack_vjp(*vjp, t, h, ch, rc, R, H, C, H // D, torch.zeros(0, dtype=torch.long), ok, vals, [[9]], sigma, sigma)
