"""Bad input gets a clear error that names the argument."""

import pytest
import torch
from conftest import field_types, get_gspace, small_graph
from escnn import nn as enn
from test_native import _conv, _inputs, _op_args, needs_native

import ik_fast
from ik_fast import ops

ERRORS = (RuntimeError, ValueError, TypeError, IndexError)  # what TORCH_CHECK and its variants raise


@pytest.fixture(scope="module")
def conv():
    gs = get_gspace("O3")
    in_t, out_t, attr_t = field_types(gs, "uniform_attr")
    return ik_fast.ImplicitPointConv(in_t, out_t, attr_t, n_layers=2, n_channels=2, backend="torch").eval()


@pytest.fixture
def data(conv):
    pos, ei = small_graph(8, 20)
    x = torch.randn(8, conv.in_type.size)
    a = torch.randn(20, conv.kernel.edge_attr_type.size)
    return x, ei, a, pos


def test_constructor_errors():
    gs = get_gspace("O3")
    in_t, out_t, attr_t = field_types(gs, "uniform_attr")
    with pytest.raises(TypeError, match="in_type"):
        ik_fast.ImplicitPointConv("not a type", out_t)
    other = field_types(get_gspace("SO3"), "uniform")[0]
    with pytest.raises(ValueError, match="out_type"):
        ik_fast.ImplicitPointConv(in_t, other)
    with pytest.raises(ValueError, match="edge_attr_type"):
        ik_fast.ImplicitPointConv(in_t, out_t, field_types(get_gspace("SO3"), "uniform_attr")[2])
    with pytest.raises(ValueError, match="n_layers"):
        ik_fast.ImplicitPointConv(in_t, out_t, n_layers=0)
    with pytest.raises(ValueError, match="n_channels"):
        ik_fast.ImplicitPointConv(in_t, out_t, n_channels=-1)
    with pytest.raises(ValueError, match="init_scheme"):
        ik_fast.ImplicitPointConv(in_t, out_t, init_scheme="xavier")
    with pytest.raises(ValueError, match="backend"):
        ik_fast.ImplicitPointConv(in_t, out_t, backend="cuda-magic")
    with pytest.raises(ValueError, match="kernel_size"):
        ik_fast.ImplicitConv(in_t, out_t, kernel_size=0)


def test_wrong_field_type(conv, data):
    x, ei, a, pos = data
    other = enn.FieldType(conv.in_type.gspace, [conv.in_type.fibergroup.trivial_representation] * conv.in_type.size)
    with pytest.raises(ValueError, match="field type"):
        conv(enn.GeometricTensor(x, other, coords=pos), ei, edge_attr=a)


def test_wrong_shapes(conv, data):
    x, ei, a, pos = data
    with pytest.raises(ValueError, match="x must have shape"):
        conv(x[:, :-1], ei, edge_attr=a, pos=pos)
    with pytest.raises(ValueError, match="edge_index must have shape"):
        conv(x, ei[0], edge_attr=a, pos=pos)
    with pytest.raises(ValueError, match="edge_index must have shape"):
        conv(x, ei.t(), edge_attr=a, pos=pos)
    with pytest.raises(ValueError, match="pos must have shape"):
        conv(x, ei, edge_attr=a, pos=pos[:, :2])
    with pytest.raises(ValueError, match="edge_attr must have shape"):
        conv(x, ei, edge_attr=a[:-1], pos=pos)
    with pytest.raises(ValueError, match="edge_delta must have shape"):
        conv(x, ei, edge_delta=torch.randn(19, 3), edge_attr=a)
    with pytest.raises(ValueError, match="edge_attr is required"):
        conv(x, ei, pos=pos)
    with pytest.raises(ValueError, match="edge_delta is required"):
        conv(x, ei, edge_attr=a)


def test_edge_index_values(conv, data):
    x, ei, a, pos = data
    bad = ei.clone()
    bad[1, 3] = 8
    with pytest.raises(ValueError, match=r"edge_index\[1\]"):
        conv(x, bad, edge_attr=a, pos=pos)
    bad = ei.clone()
    bad[0, 0] = -1
    with pytest.raises(ValueError, match="negative"):
        conv(x, bad, edge_attr=a, pos=pos)
    with pytest.raises(TypeError, match="integer"):
        conv(x, ei.float(), edge_attr=a, pos=pos)
    with pytest.raises(TypeError, match="edge_index"):
        conv(x, ei.tolist(), edge_attr=a, pos=pos)


def test_dtype_device_mismatch(conv, data):
    x, ei, a, pos = data
    with pytest.raises(TypeError, match="x has dtype"):
        conv(x.double(), ei, edge_attr=a, pos=pos)
    with pytest.raises(TypeError, match="edge_attr has dtype"):
        conv(x, ei, edge_attr=a.double(), pos=pos)
    with pytest.raises(TypeError, match="edge_delta has dtype"):
        conv(x, ei, edge_attr=a, pos=pos.double())
    meta = torch.device("meta")
    with pytest.raises(ValueError, match="on meta"):
        conv(x, ei.to(meta), edge_attr=a, pos=pos)


def test_non_finite_inputs(conv, data):
    x, ei, a, pos = data
    p = pos.clone()
    p[2, 1] = float("nan")
    with pytest.raises(ValueError, match="pos contains NaN"):
        conv(x, ei, edge_attr=a, pos=p)
    p[2, 1] = float("inf")
    with pytest.raises(ValueError, match="pos contains NaN or infinite"):
        conv(x, ei, edge_attr=a, pos=p)
    d = pos[ei[0]] - pos[ei[1]]
    d[0, 0] = float("nan")
    with pytest.raises(ValueError, match="edge_delta contains NaN"):
        conv(x, ei, edge_delta=d, edge_attr=a)
    a2 = a.clone()
    a2[0, 0] = float("inf")
    with pytest.raises(ValueError, match="edge_attr contains NaN"):
        conv(x, ei, edge_attr=a2, pos=pos)


def test_bad_containers(conv, data):
    x, ei, a, pos = data
    with pytest.raises(TypeError, match="x must be"):
        conv(x.numpy(), ei, edge_attr=a, pos=pos)
    with pytest.raises(ValueError, match="two entries"):
        conv((x, x, x), ei, edge_attr=a, pos=pos)


def test_kernel_call_errors(conv):
    k = conv.kernel
    with pytest.raises(ValueError, match="edge_delta must have shape"):
        k(torch.randn(5, 2), torch.randn(5, k.edge_attr_type.size))
    with pytest.raises(ValueError, match="edge_attr is required"):
        k(torch.randn(5, 3))


def test_unsupported_pseudo_irrep_raises_clear_error():
    """A hidden field that cannot carry a needed irrep is an error, not a silent drop."""
    from ik_fast.spec import _groups

    G = get_gspace("O3").fibergroup
    with pytest.raises(ValueError, match=r"cannot carry the irreps \[\(1, 0\)\]"):
        _groups._check_carried(G, G.bl_sphere_representation(L=1), {(1, 0)})


def test_kernel_without_parameters_is_a_clear_error():
    """One layer from the edge vector (O(2)'s standard representation) straight to a kernel between fields of that
    representation: no equivariant Linear exists (escnn's basis is empty). A clear error naming n_layers, not an
    IndexError from inside escnn; with a hidden layer the same types work."""
    gs = get_gspace("O2")
    G = gs.fibergroup
    ft = enn.FieldType(gs, [G.irrep(1, 1)] * 2)
    with pytest.raises(ValueError, match=r"no equivariant linear map exists .* n_layers >= 2"):
        ik_fast.ImplicitKernel(ft, ft, n_layers=1)
    assert ik_fast.ImplicitKernel(ft, ft, n_layers=2, n_channels=1) is not None


# ----------------------------------------------------------------------------------------------------------------
# the native backend: through the layer (checked in Python before any kernel) and through the raw ops (its kernels'
# own checks, TORCH_CHECK)
# ----------------------------------------------------------------------------------------------------------------
@needs_native
def test_layer_errors_name_the_argument():
    conv, gs, attr_t = _conv("O3", "mixed_attr", dtype=torch.float32, backend="native")
    conv.eval()
    pos, ei, x, a = _inputs(conv, gs, attr_t, dtype=torch.float32)
    with pytest.raises(ValueError, match="x must have shape"):
        conv(x[:, :-1], ei, edge_attr=a, pos=pos)
    bad = ei.clone()
    bad[1, 3] = x.shape[0]
    with pytest.raises(ValueError, match=r"edge_index\[1\]"):
        conv(x, bad, edge_attr=a, pos=pos)
    with pytest.raises(ValueError, match="edge_attr must have shape"):
        conv(x, ei, edge_attr=a[:-1], pos=pos)
    p = pos.clone()
    p[0, 0] = float("nan")
    with pytest.raises(ValueError, match="pos contains NaN"):
        conv(x, ei, edge_attr=a, pos=p)
    with pytest.raises(TypeError, match="x has dtype"):
        conv(x.double(), ei, edge_attr=a, pos=pos)


_AT = {name: i for i, name in enumerate((*ops.CONV_ARGS, "hidden"))}  # conv's arguments by name


def _bad_args():
    """(argument name, a function that breaks a copy of the op's arguments)."""

    def setitem(name, f):
        def g(args):
            args[_AT[name]] = f(args[_AT[name]], args)

        return g

    cases = [
        ("x", setitem("x", lambda t, a: t[:, :-1])),  # columns != final_weight's C_in
        ("x", setitem("x", lambda t, a: t.float())),  # dtype != the program's
        (r"inp|weights\[0\]", setitem("inp", lambda t, a: t[:, :-1])),  # width != first weight's H_in
        ("src", setitem("src", lambda t, a: t[:-1])),  # length != inp's rows
        ("src", setitem("src", lambda t, a: t.int())),  # not int64
        ("rowptr", setitem("rowptr", lambda t, a: t[:-1].clone().fill_(0))),  # does not end at E
        ("biases", setitem("biases", lambda t, a: t[:-1])),  # one list shorter
        ("bn_factor", setitem("bn_factor", lambda t, a: t[:-1])),  # one list shorter
        ("bn_shift", setitem("bn_shift", lambda t, a: [u[:-1] for u in t])),  # not C * D entries
        ("bn_factor", setitem("bn_factor", lambda t, a: [u.float() for u in t])),  # dtype != the program's
        ("final_weight", setitem("final_weight", lambda t, a: t[:, :-1])),  # H != last hidden width
        ("final_bias", setitem("final_bias", lambda t, a: t[:-1])),  # R != final_weight's
        ("structure", setitem("structure", lambda t, a: t.replace("ik2 ", "ik2 1", 1))),  # R != final_weight's
        ("structure", setitem("structure", lambda t, a: t.rsplit(" ", 1)[0])),  # truncated
        ("hidden", setitem("hidden", lambda t, a: torch.zeros(3, 2, dtype=a[0].dtype))),  # shape != (E, H)
    ]
    return [(name, f) for name, f in cases]


def _no_hidden(args):
    """conv_backward's arguments after ``grad``: conv's but ``hidden``."""
    return args[: _AT["hidden"]]


def _moments_args(args, upto=None):
    """trunk_moments' lists for the first ``upto`` hidden layers of conv's arguments ``args``: each layer's input
    batch norm (none on the MLP input)."""
    L = len(args[_AT["weights"]]) if upto is None else upto
    lists = [args[_AT[n]][:L] for n in ("weights", "biases", "fourier", "fourier_inv", "act_bias")]
    empty = args[_AT["inp"]].new_empty(0)
    bn = [[empty, *args[_AT["bn_factor"]][: L - 1]], [empty, *args[_AT["bn_shift"]][: L - 1]]]
    return [*lists, *bn, args[_AT["structure"]], 0]


@needs_native
@pytest.mark.parametrize("which", range(15))
def test_raw_op_errors_name_the_argument(which):
    """The kernels check what Python does not (they are reachable as torch.ops.ik_fast.native_*): each faulty
    argument gives an error (a TORCH_CHECK) whose message names it (or, for a mismatch between two arguments, the
    other one), instead of a crash, a silent conversion or a wrong result."""
    name, breaker = _bad_args()[which]
    conv, gs, attr_t = _conv()
    conv.eval()
    args = _op_args(conv, *_inputs(conv, gs, attr_t), grad=False)
    breaker(args)
    with pytest.raises(ERRORS, match=rf"\b({name})"):
        torch.ops.ik_fast.native_conv(*args)
    if name != "hidden":
        grad = torch.randn(args[3].shape[0] - 1, args[_AT["final_weight"]].shape[0], dtype=torch.float64)
        with pytest.raises(ERRORS, match=rf"\b({name})"):
            torch.ops.ik_fast.native_conv_backward(grad, *_no_hidden(args))


@needs_native
def test_raw_moments_op_errors_name_the_argument():
    conv, gs, attr_t = _conv()
    conv.eval()
    args = _op_args(conv, *_inputs(conv, gs, attr_t), grad=False)
    inp = args[_AT["inp"]]
    ws, bs, A, Ai, ab, f, s, st, k0 = _moments_args(args)
    with pytest.raises(ERRORS, match=r"\binp\b|\bweights\[0\]"):  # the width of inp against the first weight
        torch.ops.ik_fast.native_trunk_moments(inp[:, :-1], ws, bs, A, Ai, ab, f, s, st, k0, False)
    with pytest.raises(ERRORS, match=r"\bbiases\b"):
        torch.ops.ik_fast.native_trunk_moments(inp, ws, bs[:-1], A, Ai, ab, f, s, st, k0, False)
    with pytest.raises(ERRORS, match=r"\bin_factor\b"):
        torch.ops.ik_fast.native_trunk_moments(inp, ws, bs, A, Ai, ab, f[:-1], s, st, k0, False)
    with pytest.raises(ERRORS, match=r"\bin_shift\b"):
        torch.ops.ik_fast.native_trunk_moments(inp, ws, bs, A, Ai, ab, f, [u[:-1] for u in s], st, k0, False)


@needs_native
def test_raw_moments_op_checks_dtypes():
    conv, gs, attr_t = _conv()
    conv.eval()
    args = _op_args(conv, *_inputs(conv, gs, attr_t), grad=False)
    ws, bs, A, Ai, ab, f, s, st, k0 = _moments_args(args)
    with pytest.raises(ERRORS, match=r"\bweights\b"):
        torch.ops.ik_fast.native_trunk_moments(args[1], [w.float() for w in ws], bs, A, Ai, ab, f, s, st, k0, False)
    with pytest.raises(ERRORS, match=r"\bin_factor\b"):
        torch.ops.ik_fast.native_trunk_moments(args[1], ws, bs, A, Ai, ab, [u.float() for u in f], s, st, k0, False)


@needs_native
def test_raw_op_tape_errors_name_the_tape():
    """A tape (ik_fast.ops) of the wrong length, shape or dtype is an error naming it, in conv and conv_backward."""
    conv, gs, attr_t = _conv()
    conv.train()
    args = _op_args(conv, *_inputs(conv, gs, attr_t), grad=False)
    inp = args[_AT["inp"]]
    L = len(args[_AT["weights"]])
    tape = []
    for k in range(1, L + 1):
        _, act, grid = torch.ops.ik_fast.native_trunk_moments(inp, *_moments_args(args, k), True, True)
        tape += [act, grid]
    grad = torch.randn(args[3].shape[0] - 1, args[_AT["final_weight"]].shape[0], dtype=torch.float64)
    bad = {
        "length": tape[:-1],
        "activation shape": [tape[0][:-1]] + tape[1:],
        "grid shape": tape[:1] + [tape[1][:, :, :-1]] + tape[2:],
        "dtype": [t.float() for t in tape],
    }
    for what, t in bad.items():
        with pytest.raises(ERRORS, match=r"\btape\b"):
            torch.ops.ik_fast.native_conv_backward(grad, *_no_hidden(args), t)
            pytest.fail(f"a tape with the wrong {what} passed conv_backward")
        with pytest.raises(ERRORS, match=r"\btape\b"):
            torch.ops.ik_fast.native_conv(*args[: _AT["hidden"] + 1], t)
            pytest.fail(f"a tape with the wrong {what} passed conv")
