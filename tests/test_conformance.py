"""The conformance suite of the op layer: every registered implementation of the ops (``ik_fast::<impl>_conv``,
``_conv_backward``, ``_trunk_moments``), on every device it runs on here, against the ops' plain-PyTorch statement
(:func:`ik_fast.ops.conv_reference_form`, :func:`~ik_fast.ops.trunk_reference_form`) and, through the layer, against
the ``reference`` backend.

What an implementation promises, tested here once for all of them: the statement in forward, every gradient and
double backward; the mask semantics of ``final_weight``; the statistics op; the tape (the same numbers with and
without one); graphs without edges, receivers without edges and hubs; float32 against float64; dtype errors; the
registration (``opcheck``, ``torch.compile`` with one compilation for several edge counts); bitwise determinism of a
training step. Every bound comes from the tolerance table (:func:`ik_fast.testing.tolerance`).

What is particular to one implementation (its build and loader, its thread pool, its tiling and precision switches)
stays in its own file (``test_native.py``, ``test_triton.py``); what is particular to CUDA (GPU sizes, TF32, bfloat16,
peak memory) in ``test_gpu.py``. Implementations that do not run here skip with their reason;
``IK_FAST_REQUIRE_NATIVE=1`` (CI) turns native's skip on CPU into a failure.

The GPU run's conformance check: the CUDA cases carry the ``gpu`` marker, so ``pytest -m gpu`` (the test step of
``benchmarks/run_gpu.sh``) runs the whole suite on CUDA; its CPU rehearsal (``IK_FAST_TEST_DEVICE=cpu``) runs the
first case of each test on the CPU instead (:func:`rehearsed`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import List

import pytest
import torch
from conftest import GPU_TEST_DEVICE, field_types, get_gspace, rel, small_graph

import ik_fast
from ik_fast import ops
from ik_fast import structure as st
from ik_fast.backends import FUSED
from ik_fast.graph import prepare_graph
from ik_fast.testing import tolerance

REQUIRE_NATIVE = os.environ.get("IK_FAST_REQUIRE_NATIVE", "") == "1"
# the implementations the package declares (ik_fast.ops.Implementation; a test may register others at run time)
IMPLEMENTATIONS = list(FUSED)
# the CPU, and CUDA where there is a GPU or where the GPU run names it (IK_FAST_TEST_DEVICE=cuda[:N]; there a CUDA that
# does not work fails these tests instead of skipping them)
_NAMED_CUDA = GPU_TEST_DEVICE if (GPU_TEST_DEVICE or "").startswith("cuda") else None
CUDA = _NAMED_CUDA or ("cuda" if torch.cuda.is_available() else None)
DEVICES = ["cpu"] + ([CUDA] if CUDA else [])


def _params():
    """(impl, device) for every declared implementation and device; CUDA's marked ``gpu`` (the GPU run's selection,
    ``pytest -m gpu``); skipped with its reason where an implementation does not run on a device."""
    out = []
    for impl in IMPLEMENTATIONS:
        for device in DEVICES:
            on_cuda = device != "cpu"
            why = ops.status(impl, device)
            required = (REQUIRE_NATIVE and impl == "native" and not on_cuda) or (
                on_cuda and device == _NAMED_CUDA and not torch.cuda.is_available()
            )
            marks = [pytest.mark.gpu] if on_cuda else []
            if why is not None and not required:
                marks.append(pytest.mark.skip(reason=f"{impl} on {device}: {why}"))
            kind = torch.device(device).type
            out.append(pytest.param(impl, device, id=f"{impl}-{kind}", marks=marks))
    return out


# Triton's cases that take 9-20 s each in its interpreter (a fifth of the rehearsal's time for tests): the rehearsal
# runs these tests' code through native only
_NOT_REHEARSED = {
    ("test_opcheck", "triton"),
    ("test_hub_receivers_without_edges_and_wide_features", "triton"),
    ("test_training_step_is_bitwise_deterministic", "triton"),
}


def rehearsed(item) -> bool:
    """Whether a CPU test stands in for the suite's CUDA cases in the GPU run's CPU rehearsal
    (``benchmarks/run_gpu.sh --rehearse``: ``IK_FAST_TEST_DEVICE=cpu``, where ``tests/conftest.py`` marks these
    ``gpu``): the first case of each test, for each implementation (but :data:`_NOT_REHEARSED`) — every test's code
    on the GPU run's path in half a minute; the CPU suite runs every case."""
    spec = getattr(item, "callspec", None)
    if spec is None or spec.params.get("device") != "cpu":
        return False
    if (item.originalname, spec.params.get("impl")) in _NOT_REHEARSED:
        return False
    for mark in item.iter_markers("parametrize"):
        names, values = mark.args[0], mark.args[1]
        names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
        first = values[0]
        first = first.values if hasattr(first, "marks") else (first,) if len(names) == 1 else tuple(first)
        if "impl" not in names and any(spec.params[n] != v for n, v in zip(names, first)):
            return False
    return True


IMPL = pytest.mark.parametrize("impl,device", _params())
# group cases: Fourier ELUs on the sphere and on the circle, a finite group's pointwise ELU, mixed and uniform types
CASES = [("O3", "mixed_attr"), ("O2", "mixed"), ("Ih", "uniform_attr"), ("SO2_R3", "mixed_attr")]
F64 = torch.float64


def _tol(kind, dtype, impl):
    return tolerance(kind, dtype, backend=impl)


def _close(got, want, bound) -> bool:
    return (got is None and want is None) or rel(got, want) <= bound or float(want.norm()) == float(got.norm()) == 0


# ----------------------------------------------------------------------------------------------------------------
# the ops' inputs for a layer and a graph, built the way the fused backends build them
# ----------------------------------------------------------------------------------------------------------------
def _layer(name="O3", kind="mixed_attr", dtype=F64, device="cpu", n_layers=3, n_channels=2, **kw):
    gs = get_gspace(name)
    in_t, out_t, attr_t = field_types(gs, kind)
    torch.manual_seed(0)
    conv = ik_fast.ImplicitPointConv(in_t, out_t, attr_t, n_layers=n_layers, n_channels=n_channels, **kw)
    return ik_fast.testing.randomize_(conv).to(device=device, dtype=dtype), gs, attr_t


def _graph(conv, gs, attr_t, n=12, e=50, dtype=F64, device="cpu", seed=0):
    pos, ei = small_graph(n, e, gs.dimensionality, seed=seed, dtype=dtype)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, conv.in_type.size, generator=g, dtype=dtype)
    a = None if attr_t is None else torch.randn(e, attr_t.size, generator=g, dtype=dtype)
    mv = lambda t: None if t is None else t.to(device)  # noqa: E731
    return mv(pos), mv(ei), mv(x), mv(a)


@dataclass
class OpInputs:
    """``conv``'s inputs as the fused host builds them: the program of a layer (every batch norm folded with the
    running statistics, as in eval mode) on a prepared graph."""

    x: torch.Tensor
    inp: torch.Tensor
    src: torch.Tensor
    rowptr: torch.Tensor
    program: ops.OpProgram

    @classmethod
    def of(cls, conv, pos, ei, x, a, grad=True) -> "OpInputs":
        """The program of ``conv``'s kernel with its running statistics (randomised: every batch norm a non-trivial
        affine map), whatever the layer's mode."""
        was = conv.kernel.training
        conv.kernel.eval()
        try:
            prog = conv.kernel.program()
            with torch.no_grad():
                p = prog.op_program([], x.dtype)
        finally:
            conv.kernel.train(was)
        g = prepare_graph(ei, x.shape[0], x.shape[0], x.device)
        inp = prog.mlp_input(pos[g.src] - pos[g.dst], a)[g.perm].contiguous()
        leaf = (lambda t: t.detach().clone().requires_grad_()) if grad else (lambda t: t.detach().clone())  # noqa
        p = replace(
            p,
            weights=[leaf(w) for w in p.weights],
            biases=[leaf(b) for b in p.biases],
            act_bias=[leaf(b) for b in p.act_bias],
            bn_factor=[leaf(f) for f in p.bn_factor],
            bn_shift=[leaf(s) for s in p.bn_shift],
            final_weight=leaf(p.final_weight),
            final_bias=leaf(p.final_bias),
            coef=leaf(p.coef),
        )
        return cls(leaf(x), leaf(inp), g.src[g.perm].contiguous(), g.rowptr, p)

    def args(self, hidden=None, tape=None) -> list:
        """The op's positional arguments (the one place that knows their order)."""
        return [self.x, self.inp, self.src, self.rowptr, *self.program.args(), hidden, tape]

    def leaves(self) -> List[torch.Tensor]:
        return [t for t in (self.x, self.inp, *self.program.grad_inputs()) if t.requires_grad and t.numel()]

    def detached(self) -> list:
        """The arguments of ``conv_backward`` after ``grad`` (no hidden), without autograd."""
        d = lambda t: t.detach() if torch.is_tensor(t) else [u.detach() for u in t] if isinstance(t, list) else t  # noqa
        return [d(t) for t in self.args()[:-2]]

    def plain(self) -> ops.OpProgram:
        """The program without autograd (for the statistics op)."""
        p = self.program
        d = lambda ts: [t.detach() for t in ts]  # noqa: E731
        return replace(
            p,
            weights=d(p.weights),
            biases=d(p.biases),
            act_bias=d(p.act_bias),
            bn_factor=d(p.bn_factor),
            bn_shift=d(p.bn_shift),
        )

    def out_shape(self):
        return (self.rowptr.shape[0] - 1, self.program.final_weight.shape[0])


def _op(impl, stage):
    return getattr(torch.ops.ik_fast, f"{impl}_{stage}")


def _statement(inputs: OpInputs):
    return ops.conv_reference_form(*inputs.args()[:-1])


def _grads(out, leaves, w, create_graph=False):
    return torch.autograd.grad((out * w).sum(), leaves, create_graph=create_graph, allow_unused=True)


# ----------------------------------------------------------------------------------------------------------------
# the op against its statement
# ----------------------------------------------------------------------------------------------------------------
@IMPL
@pytest.mark.parametrize("name,kind", CASES)
def test_op_matches_its_statement_in_forward_backward_and_double_backward(impl, device, name, kind):
    conv, gs, attr_t = _layer(name, kind, device=device)
    _statement_check(impl, conv, _graph(conv, gs, attr_t, device=device))


# the exactly equivariant nonlinearities: sphere, circle, cylinder (mixed types, attributes) and a finite group
EXACT_CASES = [("O3", "mixed_attr"), ("SO2", "mixed"), ("cylinder", "mixed_attr"), ("D6", "uniform")]


@IMPL
@pytest.mark.parametrize("nonlinearity", ["gated", "norm"])
@pytest.mark.parametrize("name,kind", EXACT_CASES)
def test_exact_nonlinearities_match_their_statement(impl, device, name, kind, nonlinearity):
    """conv with the gated and norm nonlinearities against its statement (forward, every gradient, double backward)
    and the layer's training and eval steps against the reference; an implementation that does not evaluate the
    kind yet raises NotImplementedError naming it from the op, and the layer refuses the backend by name."""
    conv, gs, attr_t = _layer(name, kind, device=device, nonlinearity=nonlinearity)
    graph = _graph(conv, gs, attr_t, device=device)
    if not ops.implementation(impl).evaluates(nonlinearity, torch.device(device).type):
        inputs = OpInputs.of(conv, *graph)
        with pytest.raises(NotImplementedError, match=nonlinearity):
            _op(impl, "conv")(*inputs.args())
        with pytest.raises(ValueError, match=nonlinearity):
            _agree(conv.train(), impl, *graph)
        return
    _statement_check(impl, conv, graph)
    for mode in ("train", "eval"):
        getattr(conv, mode)()
        _agree(conv, impl, *graph)


def _statement_check(impl, conv, graph):
    conv.eval()
    inputs = OpInputs.of(conv, *graph)
    out = _op(impl, "conv")(*inputs.args())
    ref = _statement(inputs)
    assert rel(out, ref) <= _tol("forward", F64, impl)
    w = torch.randn_like(out)
    leaves = inputs.leaves()
    g1 = _grads(out, leaves, w, create_graph=True)
    g2 = _grads(ref, leaves, w, create_graph=True)
    for i, (a, b) in enumerate(zip(g1, g2)):
        assert _close(a, b, _tol("backward", F64, impl)), i
    v = [torch.randn_like(g) for g in g1]
    s1 = torch.autograd.grad(sum((g * u).sum() for g, u in zip(g1, v)), leaves, allow_unused=True)
    s2 = torch.autograd.grad(sum((g * u).sum() for g, u in zip(g2, v)), leaves, allow_unused=True)
    for i, (a, b) in enumerate(zip(s1, s2)):
        assert _close(a, b, _tol("double_backward", F64, impl)), i


@IMPL
def test_structure_semantics_on_a_weight_outside_the_structure(impl, device):
    """The op computes with ``final_weight * mask(structure)``: W''s gradient is zero outside the structure's blocks;
    without a structure the whole dense weight is used."""
    conv, gs, attr_t = _layer(device=device)
    conv.eval()
    inputs = OpInputs.of(conv, *_graph(conv, gs, attr_t, device=device))
    structure = inputs.program.structure
    assert isinstance(structure, str)
    mask = ops.structure_mask(structure, inputs.program.final_weight.shape, device)
    assert not bool(mask.all())
    W = torch.randn_like(inputs.program.final_weight).requires_grad_()
    for given in (structure, None):
        inputs.program = replace(inputs.program, final_weight=W, structure=given)
        out = _op(impl, "conv")(*inputs.args())
        ref = _statement(inputs)
        assert rel(out, ref) <= _tol("forward", F64, impl)
        w = torch.randn_like(out)
        (g1,) = torch.autograd.grad((out * w).sum(), W)
        (g2,) = torch.autograd.grad((ref * w).sum(), W)
        assert rel(g1, g2) <= _tol("backward", F64, impl)
        if given is not None:
            assert bool((g1[~mask] == 0).all())
        else:
            assert bool((g1[~mask] != 0).any())


# ----------------------------------------------------------------------------------------------------------------
# the statistics op and the tape
# ----------------------------------------------------------------------------------------------------------------
def _trunk_inputs(device, name="SO3", n_channels=2):
    conv, gs, attr_t = _layer(name, "mixed_attr", device=device, n_channels=n_channels)
    pos, ei, x, a = _graph(conv, gs, attr_t, n=12, e=70, device=device)
    inputs = OpInputs.of(conv, pos, ei, x, a, grad=False)
    return conv, inputs.inp, inputs.plain()


def _moments_statement(inp, p, upto, start=0):
    """trunk_moments' statement for hidden layers start+1 .. upto of ``p`` (their batch norms between them, and the
    one of layer ``start`` on ``inp`` when the pass starts from its activation)."""
    empty = inp.new_empty(0)
    first = (p.bn_factor[start - 1], p.bn_shift[start - 1]) if start else (empty, empty)
    return ops.trunk_moments_reference_form(
        inp,
        p.weights[start:upto],
        p.biases[start:upto],
        p.fourier[start:upto],
        p.fourier_inv[start:upto],
        p.act_bias[start:upto],
        [first[0], *p.bn_factor[start : upto - 1]],
        [first[1], *p.bn_shift[start : upto - 1]],
        p.structure,
        start,
    )


@IMPL
@pytest.mark.parametrize("upto", [1, 2])
def test_moments_and_activation_match_the_trunk(impl, device, upto):
    """The statistics pass of hidden layer ``upto``: its activation before its batch norm, the batch norms of the
    layers before it applied; chained from the previous layer's activation where the implementation chains."""
    _, inp, p = _trunk_inputs(device)
    m, act, _ = ops.trunk_moments(impl, inp, p, upto, with_activation=True)
    want_m, h = _moments_statement(inp, p, upto)
    bound = _tol("forward", F64, impl)
    assert rel(m[0], want_m[0]) <= bound
    assert rel(m[1], want_m[1]) <= bound
    assert rel(act, h) <= bound
    assert ops.trunk_moments(impl, inp, p, upto).activation.numel() == 0
    if upto > 1 and ops.implementation(impl).chained_statistics:  # from the previous layer's activation
        _, prev = _moments_statement(inp, p, upto - 1)
        m2, act2, _ = ops.trunk_moments(impl, prev, p, upto, with_activation=True, start=upto - 1)
        assert rel(act2, h) <= bound and rel(m2[1], m[1]) <= bound


def _grids_or_none(impl, inp, p, upto):
    """trunk_moments' grid output, or None where the implementation declares no grids (and then says so)."""
    if ops.implementation(impl).grids:
        return ops.trunk_moments(impl, inp, p, upto, with_activation=True, with_grid=True)
    with pytest.raises(NotImplementedError, match="grid"):
        ops.trunk_moments(impl, inp, p, upto, with_activation=True, with_grid=True)
    return None


@IMPL
@pytest.mark.parametrize("upto", [1, 2])
def test_grid_matches_its_statement(impl, device, upto):
    """The grid output (the tape's): ELU(y A^T) of the last layer, as (G, C, E); an implementation without grids
    raises NotImplementedError saying so."""
    _, inp, p = _trunk_inputs(device, "O3", n_channels=3)
    res = _grids_or_none(impl, inp, p, upto)
    if res is None:
        return
    _, act, grid = res
    h = ops.trunk_reference_form(
        inp, p.weights[: upto - 1], p.biases[: upto - 1], p.fourier[: upto - 1], p.fourier_inv[: upto - 1],
        p.bn_factor, p.bn_shift, act_bias=p.act_bias, layouts=st.layers_of(p.structure, p.fourier[: upto - 1]),
    )  # fmt: skip
    y = ops.linear_reference_form(h, p.weights[upto - 1], p.biases[upto - 1])
    A = p.fourier[upto - 1]
    u = torch.nn.functional.elu(y.reshape(y.shape[0], -1, A.shape[1]) @ A.t())  # (E, C, G)
    assert tuple(grid.shape) == ops.grid_shape(p.fourier[:upto], act.shape[1], inp.shape[0])
    assert rel(grid, u.permute(2, 1, 0)) <= _tol("forward", F64, impl)


@IMPL
def test_tape_gives_what_recomputation_gives(impl, device):
    """conv and conv_backward given a tape (every layer's activation, and its grid where the implementation keeps
    them) give what they give without one; a double backward through a taped conv matches the untaped one."""
    conv, gs, attr_t = _layer("SO3", device=device)
    conv.train()
    inputs = OpInputs.of(conv, *_graph(conv, gs, attr_t, n=12, e=70, device=device))
    p = inputs.program
    plain = inputs.plain()
    tape = []
    for k in range(1, len(p.weights) + 1):
        res = _grids_or_none(impl, inputs.inp.detach(), plain, k)
        if res is None:
            act = ops.trunk_moments(impl, inputs.inp.detach(), plain, k, with_activation=True).activation
            tape += [act, act.new_empty(0)]
        else:
            tape += [res[1], res[2]]
    grad = torch.randn(inputs.out_shape(), dtype=F64, device=device)
    with_tape = _op(impl, "conv_backward")(grad, *inputs.detached(), tape)
    without = _op(impl, "conv_backward")(grad, *inputs.detached())
    bound = _tol("backward", F64, impl)
    for u, v in zip(with_tape, without):
        assert _close(u, v, bound)
    second = {}
    for name, t in (("tape", tape), ("none", None)):
        out = ops.conv(impl, inputs.x, inputs.inp, inputs.src, inputs.rowptr, p, tape[-2], t)
        leaves = inputs.leaves()
        g1 = torch.autograd.grad((out * out).sum(), leaves, create_graph=True)
        second[name] = [*g1, *torch.autograd.grad(sum((g * g).sum() for g in g1), leaves)]
    for u, v in zip(second["tape"], second["none"]):
        assert _close(u, v, _tol("double_backward", F64, impl))


# ----------------------------------------------------------------------------------------------------------------
# through the layer, against the reference backend
# ----------------------------------------------------------------------------------------------------------------
def _layer_step(conv, backend, pos, ei, x, a):
    conv.backend = backend
    conv.zero_grad()
    xg, pg = x.clone().requires_grad_(), pos.clone().requires_grad_()
    ag = None if a is None else a.clone().requires_grad_()
    out = conv(xg, ei, edge_attr=ag, pos=pg)
    w = torch.cos(torch.arange(out.numel(), dtype=out.dtype, device=out.device)).reshape(out.shape)
    (out * w).sum().backward()
    res = [out.detach(), xg.grad, pg.grad] + ([] if a is None else [ag.grad])
    return res + [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in conv.parameters()]


def _agree(conv, impl, pos, ei, x, a, dtype=F64):
    """A training or eval step of ``impl`` against the reference backend from the same state (buffers included)."""
    state = {k: v.clone() for k, v in conv.state_dict().items()}
    ref = _layer_step(conv, "reference", pos, ei, x, a)
    ref_state = {k: v.clone() for k, v in conv.state_dict().items()}
    conv.load_state_dict(state)
    got = _layer_step(conv, impl, pos, ei, x, a)
    scale = max(float(r.norm()) for r in ref[1:])
    for i, (g, r) in enumerate(zip(got, ref)):
        bound = _tol("forward" if i == 0 else "backward", dtype, impl)
        # a gradient at rounding level where the others are of order one (a training batch norm's scale on a
        # field whose normalised values the loss barely sees) is compared against the largest gradient
        assert _close(g, r, bound) or float((g - r).norm()) <= bound * 1e-6 * scale, i
    for k, v in conv.state_dict().items():  # running statistics updated identically
        assert _close(v.double(), ref_state[k].double(), _tol("forward", dtype, impl)), k


VARIANTS = {
    "one_layer": dict(n_layers=1),
    "no_bias": dict(bias=False),
    "no_attr": dict(kind="mixed"),
    "pointwise": dict(name="Oh"),
    "planar": dict(name="SO2"),
    "no_batch_norm": dict(batch_norm=False),
    "four_layers": dict(n_layers=4),
}


@IMPL
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_layer_variants_match_the_reference(impl, device, variant, mode):
    conv, gs, attr_t = _layer(device=device, **VARIANTS[variant])
    getattr(conv, mode)()
    _agree(conv, impl, *_graph(conv, gs, attr_t, device=device))


@IMPL
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_hub_receivers_without_edges_and_wide_features(impl, device, mode):
    """Wide features (21 input components, 6 channels), a receiver with 150 in-edges beside receivers with 0 and 1
    in-edges, and 40 nodes receiving nothing (their output is the bias alone)."""
    gs = get_gspace("O3")
    G = gs.fibergroup
    sphere = G.bl_sphere_representation(L=1)
    in_t = gs.type(*[sphere] * 5 + [G.irrep(1, 0)])
    out_t = gs.type(*[sphere] * 2 + [G.irrep(0, 0)] * 3)
    attr_t = gs.type(G.irrep(0, 0), G.irrep(1, 1))
    torch.manual_seed(0)
    conv = ik_fast.ImplicitPointConv(in_t, out_t, attr_t, n_layers=3, n_channels=6)
    conv = ik_fast.testing.randomize_(conv).to(device=device, dtype=F64)
    getattr(conv, mode)()
    n = 200
    g = torch.Generator().manual_seed(0)
    pos = torch.randn(n, 3, generator=g, dtype=F64)
    hub = torch.stack([torch.arange(1, 151), torch.zeros(150, dtype=torch.long)])
    single = torch.stack([torch.arange(0, 60), torch.arange(100, 160)])
    ei = torch.cat([hub, single], 1)
    x = torch.randn(n, in_t.size, generator=g, dtype=F64)
    a = torch.randn(ei.shape[1], attr_t.size, generator=g, dtype=F64)
    args = [t.to(device) for t in (pos, ei, x, a)]
    _agree(conv, impl, *args)
    conv.backend = impl
    with torch.no_grad():
        out = conv(args[2], args[1], edge_attr=args[3], pos=args[0])
    assert torch.equal(out[160:], conv.expanded_bias().expand(40, -1))


@IMPL
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", ["O3", "SO2", "Oh", "O3:gated", "SO2:norm"])
def test_float32_against_the_float64_reference(impl, device, name, mode):
    """float32 within the table's float32 bounds of the float64 reference, forward and every gradient — or, where a
    sum with cancellation puts even the float32 reference further off, within ``tolerance("own_error", float32)``
    times that reference's error. ``GROUP:KIND``: with that hidden nonlinearity."""
    name, _, kind = name.partition(":")
    conv, gs, attr_t = _layer(name, device=device, n_channels=3, nonlinearity=kind or "fourier_elu")
    getattr(conv, mode)()
    pos, ei, x, a = _graph(conv, gs, attr_t, n=16, e=80, device=device)
    state = {k: v.clone() for k, v in conv.state_dict().items()}
    ref = _layer_step(conv, "reference", pos, ei, x, a)
    c32 = conv.float()
    args32 = (pos.float(), ei, x.float(), a.float())
    c32.load_state_dict(state)
    got = _layer_step(c32, impl, *args32)
    c32.load_state_dict(state)
    own = _layer_step(c32, "reference", *args32)
    for i, (g, r, o) in enumerate(zip(got, ref, own)):
        if float(r.norm()) == float(g.norm()) == 0:
            continue
        err = rel(g.double(), r)
        own = tolerance("own_error", torch.float32) * rel(o.double(), r)
        assert err <= _tol("forward" if i == 0 else "backward", torch.float32, impl) or err <= own, (i, err)


# ----------------------------------------------------------------------------------------------------------------
# corner cases and errors
# ----------------------------------------------------------------------------------------------------------------
@IMPL
def test_empty_graph_through_the_raw_ops(impl, device):
    """No edges: conv returns zeros (n_dst, R), its backward zeros of the inputs' shapes, and the statistics op an
    empty activation."""
    conv, gs, attr_t = _layer(device=device)
    conv.eval()
    inputs = OpInputs.of(conv, *_graph(conv, gs, attr_t, device=device), grad=False)
    inputs.inp, inputs.src = inputs.inp[:0], inputs.src[:0]
    inputs.rowptr = torch.zeros_like(inputs.rowptr)
    out = _op(impl, "conv")(*inputs.args())
    assert tuple(out.shape) == inputs.out_shape() and not out.any()
    grads = _op(impl, "conv_backward")(torch.randn_like(out), *inputs.detached())
    assert all(not g.any() for g in grads)
    assert grads[1].shape == inputs.inp.shape
    act = ops.trunk_moments(impl, inputs.inp, inputs.program, 1, with_activation=True).activation
    assert act.shape[0] == 0


@IMPL
def test_unsupported_dtype_is_a_clear_error(impl, device):
    conv, gs, attr_t = _layer(dtype=torch.bfloat16, device=device)
    conv.eval()
    pos, ei, x, a = _graph(conv, gs, attr_t, dtype=torch.bfloat16, device=device)
    conv.backend = impl
    with pytest.raises(TypeError, match="float32 or float64"):
        conv(x, ei, edge_attr=a, pos=pos)


@IMPL
def test_float16_falls_back_to_torch_with_a_warning(impl, device):
    conv, gs, attr_t = _layer(dtype=torch.float16, device=device, n_channels=1)
    conv.eval()
    pos, ei, x, a = _graph(conv, gs, attr_t, dtype=torch.float16, device=device)
    conv.backend = impl
    with pytest.warns(RuntimeWarning, match="no float16 path; using 'torch'"):
        out = conv(x, ei, edge_attr=a, pos=pos)
    conv.backend = "torch"
    assert torch.equal(out, conv(x, ei, edge_attr=a, pos=pos))


@IMPL
def test_training_step_is_bitwise_deterministic(impl, device):
    """Two training steps from the same state give the same bits (receiver-sorted reductions, no atomics). PyTorch's
    own operators on the host run in their deterministic mode (on CUDA, index_add and the backward of index_select
    use atomics otherwise; tests/conftest.py sets the cuBLAS workspace that the mode asks for)."""
    conv, gs, attr_t = _layer(dtype=torch.float32, device=device, n_channels=3)
    conv.train()
    pos, ei, x, a = _graph(conv, gs, attr_t, n=20, e=300, dtype=torch.float32, device=device)
    state = {k: v.clone() for k, v in conv.state_dict().items()}
    runs = []
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for _ in range(2):
            conv.load_state_dict(state)
            runs.append(_layer_step(conv, impl, pos, ei, x, a))
    finally:
        torch.use_deterministic_algorithms(was)
    for u, v in zip(*runs):
        assert torch.equal(u, v)


# ----------------------------------------------------------------------------------------------------------------
# the registration: opcheck and torch.compile
# ----------------------------------------------------------------------------------------------------------------
@IMPL
@pytest.mark.parametrize("nonlinearity", ["fourier_elu", "norm"])
def test_opcheck(impl, device, nonlinearity):
    if not ops.implementation(impl).evaluates(nonlinearity, torch.device(device).type):
        pytest.skip(f"{impl} does not evaluate {nonlinearity!r} on {device}")
    if nonlinearity != "fourier_elu" and impl == "triton" and device == "cpu":
        pytest.skip(
            "the registration (schemas, fakes, autograd) is the op layer's for every kind; the norm kernel's "
            "opcheck runs on native here (28 s in Triton's interpreter) and on CUDA in the GPU run"
        )
    conv, gs, attr_t = _layer(device=device, nonlinearity=nonlinearity)
    conv.eval()
    inputs = OpInputs.of(conv, *_graph(conv, gs, attr_t, device=device))
    torch.library.opcheck(_op(impl, "conv"), inputs.args())
    grad = torch.randn(inputs.out_shape(), dtype=F64, device=device, requires_grad=True)
    torch.library.opcheck(_op(impl, "conv_backward"), (grad, *inputs.args()[:-2]))
    p = inputs.plain()
    L = len(p.weights)
    empty = inputs.inp.new_empty(0)
    in_factor, in_shift = [empty, *p.bn_factor[: L - 1]], [empty, *p.bn_shift[: L - 1]]
    for with_act in (False, True):
        args = (
            inputs.inp.detach(), p.weights, p.biases, p.fourier, p.fourier_inv, p.act_bias, in_factor, in_shift,
            p.structure, 0, with_act,
        )  # fmt: skip
        torch.library.opcheck(_op(impl, "trunk_moments"), args)
    act = ops.trunk_moments(impl, inputs.inp.detach(), p, len(p.weights), with_activation=True).activation
    torch.library.opcheck(_op(impl, "conv"), inputs.args(hidden=act))


@IMPL
def test_ops_compile_fullgraph_with_one_compilation_for_several_edge_counts(impl, device):
    """The op traces without graph breaks, and its fake kernel serves every edge count without recompiling."""
    from torch._dynamo.testing import CompileCounterWithBackend

    conv, gs, attr_t = _layer(dtype=torch.float32, device=device)
    conv.eval()
    cnt = CompileCounterWithBackend("aot_eager")

    def step(*args):
        return _op(impl, "conv")(*args).square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, backend=cnt, fullgraph=True, dynamic=True)
    frames = []
    for e in (61, 73):  # (edge counts unlike any hidden size, so that duck sizing does not tie them)
        inputs = OpInputs.of(conv, *_graph(conv, gs, attr_t, e=e, dtype=torch.float32, device=device, seed=e))
        args = inputs.args()
        loss = compiled(*args)
        assert rel(loss, step(*args)) <= _tol("forward", torch.float32, impl)
        loss.backward()
        assert inputs.x.grad is not None and bool(torch.isfinite(inputs.x.grad).all())
        frames.append(cnt.frame_count)
    assert frames[0] >= 1 and frames[1] == frames[0]
