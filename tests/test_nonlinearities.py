"""The kernel MLP's exactly equivariant nonlinearities (``nonlinearity="gated"`` and ``"norm"``): their statement,
exact equivariance on random elements of every group, the backends against the reference, their errors and where
``"auto"`` sends them."""

import math

import pytest
import torch
from conftest import GSPACES, field_types, get_gspace, rel, small_graph

import ik_fast
from ik_fast import ops
from ik_fast import structure as ST
from ik_fast.backends import FUSED, resolve_backend
from ik_fast.testing import check_equivariance, kernel_graph, randomize_, tolerance

KINDS = ("gated", "norm")
CONTINUOUS = [n for n, (_, exact) in GSPACES.items() if not exact]
F64 = torch.float64


def _kernel(name, nonlinearity, kind="mixed_attr", n_layers=3, n_channels=2, **kw):
    gs = get_gspace(name)
    in_t, out_t, attr_t = field_types(gs, kind)
    torch.manual_seed(0)
    k = ik_fast.ImplicitKernel(
        in_t, out_t, attr_t, n_layers=n_layers, n_channels=n_channels, nonlinearity=nonlinearity, **kw
    )
    return randomize_(k).double()


# ----------------------------------------------------------------------------------------------------------------
# the statement, irrep by irrep
# ----------------------------------------------------------------------------------------------------------------
def _by_irrep(y, layout, bias):
    """The activation written out irrep by irrep and channel by channel (the docstring's definition)."""
    E, D, G = y.shape[0], layout.components, layout.gates
    y = y.reshape(E, -1, D + G)
    out = torch.empty(E, y.shape[1], D, dtype=y.dtype)
    for c in range(y.shape[1]):
        p, g = 0, 0
        for size, trivial in layout.irreps:
            v = y[:, c, p : p + size]
            if trivial:
                out[:, c, p : p + size] = torch.nn.functional.elu(v)
            else:
                if layout.activation == "gated":
                    m = torch.sigmoid(y[:, c, D + g])
                else:
                    m = torch.sigmoid(v.norm(dim=1) - bias[c * layout.nontrivial + g])
                out[:, c, p : p + size] = v * m[:, None]
                g += 1
            p += size
    return out.reshape(E, -1)


@pytest.mark.parametrize("kind", KINDS)
def test_activation_statement_irrep_by_irrep(kind):
    irreps = ((1, True), (3, False), (1, False), (5, False), (2, False))
    layout = ST.HiddenLayout(3, 12, 0, False, False, kind, irreps)
    g = torch.Generator().manual_seed(0)
    y = torch.randn(7, 3 * layout.linear_components, generator=g, dtype=F64)
    bias = torch.randn(layout.bias_size, generator=g, dtype=F64) if kind == "norm" else None
    empty = y.new_zeros(0, 0)
    got = ops.activation_reference_form(y, empty, empty, bias, layout)
    assert rel(got, _by_irrep(y, layout, bias)) <= 1e-14
    assert layout.gates == (4 if kind == "gated" else 0) and layout.bias_size == (12 if kind == "norm" else 0)


def test_norm_gradient_where_an_irrep_is_zero():
    """An irrep that the Linear cannot reach is exactly zero: the norm's derivative there is taken as 0, so the
    activation's Jacobian is sigmoid(-bias) * I and no gradient is NaN (double backward included)."""
    layout = ST.HiddenLayout(1, 4, 0, False, False, "norm", ((1, True), (3, False)))
    y = torch.zeros(2, 4, dtype=F64, requires_grad=True)
    bias = torch.tensor([0.7], dtype=F64, requires_grad=True)
    empty = y.new_zeros(0, 0)
    out = ops.activation_reference_form(y, empty, empty, bias, layout)
    (gy, gb) = torch.autograd.grad(out.sum(), (y, bias), create_graph=True)
    want = torch.sigmoid(torch.tensor(-0.7, dtype=F64))
    assert torch.allclose(gy[:, 1:], want.expand(2, 3)) and torch.allclose(gy[:, 0], torch.ones(2, dtype=F64))
    assert float(gb.detach()) == 0.0
    (gg,) = torch.autograd.grad(gy.sum(), y)
    assert torch.isfinite(gg).all()


# ----------------------------------------------------------------------------------------------------------------
# exact equivariance, every group of the suite
# ----------------------------------------------------------------------------------------------------------------
# continuous groups with both kinds; finite groups (exact with any nonlinearity, and both kinds in every fused
# backend below) with one, alternating
_EXACT = [(n, k) for n in CONTINUOUS for k in KINDS] + [
    (n, KINDS[i % 2]) for i, n in enumerate(n for n in GSPACES if n not in CONTINUOUS)
]


@pytest.mark.parametrize("name,kind", _EXACT)
def test_kernel_is_exactly_equivariant(name, kind):
    """On random elements of continuous groups the exact bound holds (the Fourier ELU's is the grid's sampling
    error); on finite groups on every element."""
    k = _kernel(name, kind).eval()
    assert k.exactly_equivariant and k.grid_quality == (None, None)
    graph = kernel_graph(k, n_nodes=10, k=3)
    res = check_equivariance(k, graph, n_exact=2, n_random=3)
    assert res["random_bound"] == res["exact_bound"] == tolerance("exact", F64)
    assert res["passed"], res
    assert k(graph.delta, graph.edge_attr).abs().max() > 0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["SO3", "O3", "SO2", "O2", "cylinder", "full_cylinder"])
def test_layer_is_exactly_equivariant_in_train_and_eval(name, kind):
    gs = get_gspace(name)
    in_t, out_t, attr_t = field_types(gs, "mixed_attr")
    torch.manual_seed(0)
    conv = ik_fast.ImplicitPointConv(in_t, out_t, attr_t, n_layers=3, n_channels=2, nonlinearity=kind)
    conv = randomize_(conv).double()
    graph = kernel_graph(conv, n_nodes=10, k=4)
    for mode in ("train", "eval"):
        getattr(conv, mode)()
        res = check_equivariance(conv, graph, n_exact=2, n_random=2)
        assert res["random_bound"] == tolerance("exact", F64) and res["passed"], (mode, res)


def test_float32_meets_the_finite_groups_bound():
    gs = get_gspace("O3")
    in_t, out_t, attr_t = field_types(gs, "mixed_attr")
    torch.manual_seed(0)
    conv = randomize_(ik_fast.ImplicitPointConv(in_t, out_t, attr_t, n_layers=3, n_channels=3, nonlinearity="gated"))
    graph = kernel_graph(conv, n_nodes=10, k=4, dtype=torch.float32)
    res = check_equivariance(conv.eval(), graph, n_exact=0, n_random=3)
    assert res["random_bound"] == tolerance("exact", torch.float32) and res["passed"], res


# ----------------------------------------------------------------------------------------------------------------
# the unfused backends against the reference (the fused ones run in the conformance suite)
# ----------------------------------------------------------------------------------------------------------------
def _step(conv, backend, pos, ei, x, a, w):
    conv.backend = backend
    params = [p for p in conv.parameters() if p.requires_grad]
    xl = x.detach().clone().requires_grad_()
    out = conv(xl, ei, edge_attr=a, pos=pos)
    grads = torch.autograd.grad((out * w).sum(), [xl, *params], allow_unused=True)
    return out, grads


def _inputs(gs, conv, n, e, seed=1):
    pos, ei = small_graph(n, e, gs.dimensionality, dtype=F64)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, conv.in_type.size, generator=g, dtype=F64)
    attr_t = conv.kernel.edge_attr_type
    a = None if attr_t is None else torch.randn(e, attr_t.size, generator=g, dtype=F64)
    return pos, ei, x, a, g


def _agree(conv, impl, pos, ei, x, a, g, inference=False):
    """A training and an eval step of ``impl`` against the reference from the same state: the output, the input and
    every parameter gradient (one at rounding level, as a training batch norm's scale can be, against the largest
    gradient) and the running statistics; with ``inference`` also the eval output without autograd."""
    for mode in ("train", "eval"):
        getattr(conv, mode)()
        state = {k: v.clone() for k, v in conv.state_dict().items()}
        w = torch.randn(x.shape[0], conv.out_type.size, generator=g, dtype=F64)
        ref, gref = _step(conv, "reference", pos, ei, x, a, w)
        after = {k: v.clone() for k, v in conv.state_dict().items()}
        conv.load_state_dict(state)
        got, ggot = _step(conv, impl, pos, ei, x, a, w)
        assert rel(got, ref) <= tolerance("forward", F64, backend=impl), mode
        scale = max(float(v.norm()) for v in gref if v is not None)
        for i, (u, v) in enumerate(zip(ggot, gref)):
            assert (u is None) == (v is None), (mode, i)
            if u is not None:
                err = float((u - v).norm())
                assert err <= tolerance("backward", F64, backend=impl) * max(float(v.norm()), 1e-6 * scale), (mode, i)
        for k, v in conv.state_dict().items():
            assert torch.allclose(v.double(), after[k].double(), rtol=1e-9, atol=1e-12), k
        if inference and mode == "eval":  # (the torch and reference backends go over edge chunks)
            with torch.no_grad():
                assert rel(conv(x, ei, edge_attr=a, pos=pos), got) <= tolerance("forward", F64, backend=impl)
        conv.load_state_dict(state)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "name,types", [("O3", "mixed_attr"), ("SO2", "mixed"), ("cylinder", "mixed_attr"), ("Ih", "uniform")]
)
def test_torch_backend_matches_the_reference(name, types, kind):
    gs = get_gspace(name)
    in_t, out_t, attr_t = field_types(gs, types)
    torch.manual_seed(0)
    conv = randomize_(
        ik_fast.ImplicitPointConv(in_t, out_t, attr_t, n_layers=3, n_channels=2, nonlinearity=kind)
    ).double()
    _agree(conv, "torch", *_inputs(gs, conv, 12, 60), inference=True)
    if kind == "norm":  # the norm's biases learn
        assert all(b.numel() > 0 for b in conv.kernel.act_bias)


# ----------------------------------------------------------------------------------------------------------------
# structure, errors, routing
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_structure_states_the_activation(kind):
    k = _kernel("O3", kind)
    spec = ST.decode(k.structure)
    assert spec.encode() == k.structure
    for h in spec.layers:
        assert h.activation == kind and h.grid == 0
        assert sum(size for size, _ in h.irreps) == h.components
        assert sum(1 for _, t in h.irreps if t) >= 1
    # the gated Linear makes the gates after each channel's components; the last Linear reads the field alone
    lin0 = k.mlp[0]
    h = spec.layers[0]
    assert lin0.shape[0] == h.channels * h.linear_components
    assert k.mlp[-1].shape[1] == h.channels * h.components


def test_componentwise_gated_linear_reads_the_trivial_component():
    """With many channels the hidden Linears are componentwise: the gate rows read the field's trivial component, and
    the (D + gates, C, C) form gives what the dense weight gives."""
    k = _kernel("SO3", "gated", kind="mixed", n_channels=8)
    p = k.program()
    assert k.spec.layers[1].componentwise and p.componentwise(1)
    prog = p.op_program([], F64)
    dense = p.op_program([], F64, dense=True)
    h = torch.randn(5, dense.weights[1].shape[1], dtype=F64)
    lay = k.spec.layers
    src = ops.linear_source(lay[1], lay[0], "cpu")
    y1 = ops.linear_reference_form(h, prog.weights[1], prog.biases[1], src)
    y2 = ops.linear_reference_form(h, dense.weights[1], dense.biases[1])
    assert rel(y1, y2) <= 1e-13


def test_bad_arguments_name_them():
    gs = get_gspace("SO3")
    in_t, out_t, _ = field_types(gs, "uniform")
    with pytest.raises(ValueError, match="nonlinearity"):
        ik_fast.ImplicitKernel(in_t, out_t, nonlinearity="relu")
    with pytest.raises(ValueError, match="grid"):
        ik_fast.ImplicitKernel(in_t, out_t, nonlinearity="gated", grid={"type": "thomson", "N": 100})
    spec = ST.decode(_kernel("SO3", "norm").structure)
    h = spec.layers[0]
    wrong = spec.__class__(
        spec.out_size, spec.in_size, spec.channels, spec.components,
        (ST.HiddenLayout(h.channels, h.components, 0, h.componentwise, h.batch_norm, "norm", h.irreps[:-1]),) * 2,
        spec.out_groups, spec.in_groups, spec.blocks,
    )  # fmt: skip
    with pytest.raises(ValueError, match="structure"):
        ST.decode(wrong.encode())


@pytest.mark.parametrize("kind", KINDS)
def test_auto_goes_around_an_implementation_without_the_kind(kind):
    for name in FUSED:
        decl = ops.implementation(name)
        if not decl.evaluates(kind, "cpu"):
            assert resolve_backend("auto", "cpu", 100_000, kind) != name
            with pytest.raises(ValueError, match=kind):
                resolve_backend(name, "cpu", 100_000, kind)


@pytest.mark.parametrize("kind", KINDS)
def test_layer_runs_by_default(kind):
    """What a user gets by default (backend "auto") trains and stays exactly equivariant."""
    gs = get_gspace("O3")
    in_t, out_t, attr_t = field_types(gs, "mixed_attr")
    torch.manual_seed(0)
    conv = ik_fast.ImplicitPointConv(in_t, out_t, attr_t, n_layers=3, n_channels=2, nonlinearity=kind).double()
    graph = kernel_graph(conv, n_nodes=10, k=4)
    out = conv(graph.x, graph.edge_index, edge_attr=graph.edge_attr, pos=graph.pos)
    out.square().sum().backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in conv.parameters())
    assert math.isfinite(float(out.sum()))


# ----------------------------------------------------------------------------------------------------------------
# the fused backends on every group (the conformance suite checks them in depth on four)
# ----------------------------------------------------------------------------------------------------------------
# Triton's interpreter takes seconds a case: a spread of groups; native runs every gspace of the suite
_TRITON_GROUPS = ("SO3", "O2", "C8")


def _fused_cases():
    out = []
    for impl in FUSED:
        names = list(GSPACES) if impl != "triton" else list(_TRITON_GROUPS)
        for name in names:
            for kind in KINDS:
                why = ops.status(impl, "cpu")
                marks = [pytest.mark.skip(reason=f"{impl}: {why}")] if why else []
                out.append(pytest.param(impl, name, kind, id=f"{impl}-{name}-{kind}", marks=marks))
    return out


@pytest.mark.parametrize("impl,name,kind", _fused_cases())
def test_fused_backend_matches_the_reference_on_every_group(impl, name, kind):
    """A training step (output, input and parameter gradients, running statistics) and an eval step of ``impl``
    against the reference, mixed field types with attributes, float64."""
    assert ops.implementation(impl).evaluates(kind, "cpu")
    gs = get_gspace(name)
    in_t, out_t, attr_t = field_types(gs, "mixed_attr")
    torch.manual_seed(0)
    conv = randomize_(
        ik_fast.ImplicitPointConv(in_t, out_t, attr_t, n_layers=3, n_channels=2, nonlinearity=kind)
    ).double()
    _agree(conv, impl, *_inputs(gs, conv, 10, 40))


VARIANTS = {
    "one_hidden": dict(n_layers=2),
    "four_layers": dict(n_layers=4),
    "no_batch_norm": dict(batch_norm=False),
    "one_channel": dict(n_channels=1),
    "paper_hidden": dict(hidden="paper"),
    "no_bias_no_attr": dict(bias=False, types="mixed"),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("impl", ["torch", *FUSED])
def test_variants_match_the_reference(impl, variant):
    """The layer's options with the gated (and, alternating, norm) nonlinearity: train and eval steps against the
    reference."""
    if impl in FUSED and ops.status(impl, "cpu"):
        pytest.skip(ops.status(impl, "cpu"))
    kw = dict(VARIANTS[variant])
    types = kw.pop("types", "mixed_attr")
    kind = "norm" if list(VARIANTS).index(variant) % 2 else "gated"
    gs = get_gspace("SO3")
    in_t, out_t, attr_t = field_types(gs, types)
    kw = {"n_layers": 3, "n_channels": 3, **kw}
    torch.manual_seed(0)
    conv = randomize_(ik_fast.ImplicitPointConv(in_t, out_t, attr_t, nonlinearity=kind, **kw)).double()
    _agree(conv, impl, *_inputs(gs, conv, 10, 40, seed=2), inference=True)


def test_compiled_layer_on_the_default_backend():
    """What a user gets by default: torch.compile of a gated layer on backend "auto", one compilation for two graph
    sizes, equal to the eager layer."""
    gs = get_gspace("O3")
    in_t, out_t, attr_t = field_types(gs, "mixed_attr")
    torch.manual_seed(0)
    conv = randomize_(ik_fast.ImplicitPointConv(in_t, out_t, attr_t, n_layers=3, n_channels=2, nonlinearity="gated"))
    conv = conv.double().eval()
    compiled = torch.compile(conv, fullgraph=True, dynamic=True)
    for n, e in ((10, 40), (14, 70)):
        pos, ei = small_graph(n, e, 3, dtype=F64)
        x = torch.randn(n, in_t.size, dtype=F64)
        a = torch.randn(e, attr_t.size, dtype=F64)
        with torch.no_grad():
            want = conv(x, ei, edge_attr=a, pos=pos)
            got = compiled(x, ei, edge_attr=a, pos=pos)
        assert rel(got, want) <= tolerance("forward", F64)


def test_grid_convolution_takes_the_nonlinearity():
    """ImplicitConv (a kernel sampled on the filter grid) with the norm nonlinearity: its kernel is exactly
    equivariant and it runs forward and backward."""
    gs = get_gspace("SO2")
    in_t, out_t, _ = field_types(gs, "mixed")
    conv = ik_fast.ImplicitConv(in_t, out_t, kernel_size=5, n_layers=3, n_channels=2, nonlinearity="norm")
    assert conv.kernel.nonlinearity == "norm" and conv.kernel.exactly_equivariant
    from escnn import nn as enn

    x = enn.GeometricTensor(torch.randn(2, in_t.size, 9, 9), in_t)
    y = conv(x)
    y.tensor.square().sum().backward()
    assert all(b.grad is not None for b in conv.kernel.act_bias)
