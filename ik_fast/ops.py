"""The op layer: the stages of the fused computation as registered PyTorch ops, defined once for every backend.

A fused backend evaluates the implicit convolution without materialising per-edge kernels. Whatever its kernels
(Triton, C++ or CUDA), it implements the same stages, whose schemas, fake (meta) implementations and autograd formulas
live here and nowhere else:

``conv(x, inp, src, rowptr, weights, biases, fourier, fourier_inv, final_weight, final_bias, coef, norm, ndim,
final_mask, hidden, tape) -> out`` (n_dst, R)
    For every receiver i, ``sum_{e in rowptr[i]:rowptr[i+1]} K_e x[src_e]`` with
    ``K_e = norm * exp(-coef |d_e|^2) * (W_F . h_e + B_F)`` and ``h_e`` the trunk of the kernel MLP on
    ``inp_e = [d_e, a_e]`` (``d_e`` its first ``ndim`` columns). Edges come in receiver order (the graph's CSR:
    ``rowptr`` (n_dst + 1,), ``src`` (E,)). ``hidden`` (optional, never differentiated) is the last hidden
    activation of this program on ``inp``, given by the statistics pass, so that the trunk is not evaluated twice.
``conv_backward(grad, <the inputs of conv but hidden>) -> [dx, dinp, *dweights, *dbiases, dfinal_weight,
dfinal_bias, dcoef]``
    The vector-Jacobian product of ``conv`` (the Fourier matrices are constants and get no gradient).
``trunk_moments(inp, weights, biases, fourier, fourier_inv, with_activation=False, with_grid=False) -> ((2, H_k),
(E, H_k), (G_k, C_k, E))``
    Column means and sums of squared deviations of the last given layer's activation over all edges (the batch
    statistics of the batch norm after that layer; the program finishes them, :meth:`BatchNorm.finish`); with
    ``with_activation`` also the activation, with ``with_grid`` also its Fourier ELU output on the grid,
    ``ELU(y_k A_k^T)`` (empty otherwise, and for a pointwise layer). An implementation that keeps no grids raises
    ``NotImplementedError`` when asked for one.

**The tensors** are the lowered program's with every batch norm folded (:meth:`KernelProgram.packed`), unpadded:
hidden layer ``k`` is ``h_k = act_k(h_{k-1} W_k^T + b_k)`` with ``W_k`` (H_k, H_{k-1}), or (D, C, C) for a Linear
that only mixes the channels' equal components (:func:`linear_reference_form`: the program states that structure
through the shape; it is never found from the data); ``act_k`` is the Fourier ELU ``ELU(y A_k^T) A_k^+^T`` on each
channel of ``D_k = A_k.shape[1]`` components (``fourier[k]`` = A_k (G, D), ``fourier_inv[k]`` = A_k^+ (D, G)) or a
pointwise ELU when ``fourier[k]`` is empty; ``final_weight`` W_F (R, H, C_in), ``final_bias`` B_F (R, C_in) (zeros
without bias), ``coef`` = 1 / (2 sigma^2) (shape (1,)). ``final_mask`` (optional, bool (R, H, C_in), on the CPU) is
W_F's structure: the op computes with ``W_F * final_mask``, so entries outside it are ignored and get a zero gradient.
For an equivariant layer it is the last Linear's structural non-zero pattern, so nothing changes numerically and an
implementation may skip everything outside it; on the CPU it can be planned without a device sync, and the plan
cached for the tensor. No tile size, precision mode or other implementation detail appears in a schema.

**The tape** (optional, never differentiated): ``[act_1, grid_1, ..., act_L, grid_L]``, every hidden layer's
activation and grid as ``trunk_moments(..., with_activation=True, with_grid=True)`` gives them (the statistics passes
of training compute them anyway). An implementation may read it in ``conv_backward`` instead of evaluating the trunk
again, or ignore it; the result is the same to rounding. It holds E x (H_k + G_k C_k) numbers per layer from the
forward to the backward, so the host passes one only to implementations that use it and within
:data:`ik_fast.backends.fused.TAPE_LIMIT_BYTES`.

**One op per implementation.** Several implementations run on one device (Triton and native CUDA on CUDA tensors),
so :func:`define` instantiates the schemas as ``ik_fast::<impl>_conv``, ``ik_fast::<impl>_conv_backward`` and
``ik_fast::<impl>_trunk_moments`` with their fakes and autograd; the implementation adds kernels per dispatch key,
from Python (``torch.library.register_kernel``) or C++ (``TORCH_LIBRARY_IMPL(ik_fast, CUDA, m)``).

**Autograd** is registered on the forward op (its backward is ``conv_backward``) and on the backward op, so a double
backward (forces) goes through registered ops; the backward op's derivative differentiates :func:`conv_reference_form`,
the op's plain-PyTorch statement (the reference backend's memory: one (E, R, C_in) kernel tensor, never
(E, H, C_in)).

**Availability.** :func:`register_implementation` takes a loader; :func:`status` imports it once and keeps the reason
of a failure (the exception text), which ``ik_fast.available_backends`` and the ``auto`` warning report.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .program import PackedProgram

__all__ = [
    "define",
    "Implementation",
    "register_implementation",
    "implementations",
    "implementation",
    "status",
    "implementation_names",
    "conv",
    "trunk_moments",
    "conv_reference_form",
    "PackedProgram",
]

_LIB = torch.library.Library("ik_fast", "FRAGMENT")

_PROGRAM = (
    "Tensor[] weights, Tensor[] biases, Tensor[] fourier, Tensor[] fourier_inv, Tensor final_weight, "
    "Tensor final_bias, Tensor coef, float norm, int ndim, Tensor? final_mask"
)
SCHEMAS = {
    "conv": f"(Tensor x, Tensor inp, Tensor src, Tensor rowptr, {_PROGRAM}, Tensor? hidden, Tensor[]? tape=None) "
    "-> Tensor",
    "conv_backward": (
        f"(Tensor grad, Tensor x, Tensor inp, Tensor src, Tensor rowptr, {_PROGRAM}, Tensor[]? tape=None) -> Tensor[]"
    ),
    "trunk_moments": (
        "(Tensor inp, Tensor[] weights, Tensor[] biases, Tensor[] fourier, Tensor[] fourier_inv, "
        "bool with_activation=False, bool with_grid=False) -> (Tensor, Tensor, Tensor)"
    ),
}


# ----------------------------------------------------------------------------------------------------------------
# the ops' semantics in plain PyTorch
# ----------------------------------------------------------------------------------------------------------------
def _act(y: Tensor, A: Tensor, Ainv: Tensor) -> Tensor:
    if A.numel() == 0:
        return F.elu(y)
    D = A.shape[1]
    u = y.reshape(y.shape[0], -1, D) @ A.t()
    return (F.elu(u) @ Ainv.t()).reshape(y.shape[0], -1)


def linear_reference_form(h: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """``h W^T + b`` for a dense W (H_out, H_in), or for a componentwise one (D, C_out, C_in) on the channel-major
    (C_in, D) view of h: ``y[:, c, a] = sum_c' W[a, c, c'] h[:, c', a]``."""
    if w.dim() == 2:
        return h @ w.t() + b
    D, C_out, C_in = w.shape
    y = torch.bmm(h.reshape(-1, C_in, D).permute(2, 0, 1), w.transpose(1, 2))  # (D, E, C_out)
    return y.permute(1, 2, 0).reshape(h.shape[0], C_out * D) + b


def hidden_width(w: Tensor) -> int:
    """H_out of a hidden Linear's weight, dense or componentwise."""
    return w.shape[0] if w.dim() == 2 else w.shape[0] * w.shape[1]


def trunk_reference_form(inp, weights, biases, fourier, fourier_inv) -> Tensor:
    """The activation of the last given hidden layer (the input itself without layers)."""
    h = inp
    for w, b, A, Ainv in zip(weights, biases, fourier, fourier_inv):
        h = _act(linear_reference_form(h, w, b), A.to(h.dtype), Ainv.to(h.dtype))
    return h


def receivers(rowptr: Tensor, num_edges: int) -> Tensor:
    """Receiver of each edge (E,) from the CSR row pointer, without a host synchronisation."""
    n_dst = rowptr.shape[0] - 1
    return torch.repeat_interleave(torch.arange(n_dst, device=rowptr.device), rowptr.diff(), output_size=num_edges)


def conv_reference_form(
    x,
    inp,
    src,
    rowptr,
    weights,
    biases,
    fourier,
    fourier_inv,
    final_weight,
    final_bias,
    coef,
    norm,
    ndim,
    final_mask=None,
    hidden=None,
) -> Tensor:
    """``conv`` as plain differentiable PyTorch (per-edge kernels, the reference backend's memory). ``hidden`` is
    ignored: it only spares an implementation recomputing the trunk (see the module docstring)."""
    E = inp.shape[0]
    R, H, C = final_weight.shape
    if final_mask is not None:
        final_weight = final_weight * final_mask.to(final_weight.device)
    h = trunk_reference_form(inp, weights, biases, fourier, fourier_inv)
    s = torch.exp(-coef * inp[:, :ndim].square().sum(1)) * norm
    k = (h @ final_weight.permute(1, 0, 2).reshape(H, R * C) + final_bias.reshape(-1)) * s[:, None]
    msg = torch.bmm(k.reshape(E, R, C), x[src].unsqueeze(-1)).squeeze(-1)
    return msg.new_zeros(rowptr.shape[0] - 1, R).index_add(0, receivers(rowptr, E), msg)


# ----------------------------------------------------------------------------------------------------------------
# fakes and autograd, written once for every implementation
# ----------------------------------------------------------------------------------------------------------------
def _fake_conv(
    x,
    inp,
    src,
    rowptr,
    weights,
    biases,
    fourier,
    fourier_inv,
    final_weight,
    final_bias,
    coef,
    norm,
    ndim,
    final_mask=None,
    hidden=None,
    tape=None,
):
    return x.new_empty(rowptr.shape[0] - 1, final_weight.shape[0])


def _fake_conv_backward(
    grad,
    x,
    inp,
    src,
    rowptr,
    weights,
    biases,
    fourier,
    fourier_inv,
    final_weight,
    final_bias,
    coef,
    norm,
    ndim,
    final_mask=None,
    tape=None,
):
    return [torch.empty_like(t) for t in (x, inp, *weights, *biases, final_weight, final_bias, coef)]


def grid_shape(fourier: Sequence[Tensor], H: int, E: int) -> tuple:
    """Shape of ``trunk_moments``' grid output: (G, C, E) for a Fourier ELU last layer, else empty."""
    if not fourier or fourier[-1].numel() == 0:
        return (0,)
    G, D = fourier[-1].shape
    return (G, H // D, E)


def _fake_trunk_moments(inp, weights, biases, fourier, fourier_inv, with_activation=False, with_grid=False):
    H = hidden_width(weights[-1]) if weights else inp.shape[1]
    grid = grid_shape(fourier, H, inp.shape[0]) if with_grid else (0,)
    return inp.new_empty(2, H), inp.new_empty(inp.shape[0] if with_activation else 0, H), inp.new_empty(grid)


_CONV_ARGS = (
    "x",
    "inp",
    "src",
    "rowptr",
    "weights",
    "biases",
    "fourier",
    "fourier_inv",
    "final_weight",
    "final_bias",
    "coef",
    "norm",
    "ndim",
    "final_mask",
)


def _split_grads(flat: Sequence[Optional[Tensor]], n_layers: int) -> dict:
    """[dx, dinp, *dweights, *dbiases, dfinal_weight, dfinal_bias, dcoef] -> by argument name."""
    L = n_layers
    return dict(
        x=flat[0],
        inp=flat[1],
        weights=list(flat[2 : 2 + L]),
        biases=list(flat[2 + L : 2 + 2 * L]),
        final_weight=flat[2 + 2 * L],
        final_bias=flat[3 + 2 * L],
        coef=flat[4 + 2 * L],
    )


def _save_conv_inputs(ctx, inputs, tape, *extra) -> None:
    """Save conv's inputs and its tape (``hidden`` is not saved: without a tape the backward recomputes the trunk,
    keeping one (E, H) tensor less alive; with one, the tape holds it)."""
    tensors = [t for t in inputs[:13] if isinstance(t, Tensor)]
    mask = inputs[13]
    ctx.n_layers = len(inputs[4])
    ctx.has_mask = mask is not None
    ctx.tape_given = tape is not None  # (autograd wants a list of Nones back for a list)
    tape = list(tape) if tape else []
    ctx.n_tape = len(tape)
    ctx.save_for_backward(
        *tensors, *inputs[4], *inputs[5], *inputs[6], *inputs[7], *([mask] if ctx.has_mask else []), *tape, *extra
    )
    ctx.norm, ctx.ndim = inputs[11], inputs[12]


def _no_grads(ctx) -> tuple:
    """The tape's gradient: none, in the structure it was given (a list of Nones for a list; nothing when it was not
    given: the dispatcher leaves a trailing default argument out of the inputs autograd sees)."""
    return ([None] * ctx.n_tape,) if ctx.tape_given else ()


def _conv_setup_context(ctx, inputs, output):
    _save_conv_inputs(ctx, inputs, inputs[15] if len(inputs) > 15 else None)


def _saved_conv_inputs(ctx) -> list:
    """conv_backward's arguments after ``grad``: conv's inputs but ``hidden``, then the tape (None without one)."""
    t = ctx.saved_tensors
    x, inp, src, rowptr, final_weight, final_bias, coef = t[:7]
    L = ctx.n_layers
    lists = [list(t[7 + i * L : 7 + (i + 1) * L]) for i in range(4)]
    m = 7 + 4 * L
    mask = t[m] if ctx.has_mask else None
    m += int(ctx.has_mask)
    tape = list(t[m : m + ctx.n_tape]) if ctx.n_tape else None
    return [x, inp, src, rowptr, *lists, final_weight, final_bias, coef, ctx.norm, ctx.ndim, mask, tape]


def _conv_grads(impl: str, ctx, grad) -> dict:
    """conv's gradients by argument name: the conv_backward op on what the forward saved."""
    return _split_grads(
        _below_autograd(_op(impl, "conv_backward"), grad.contiguous(), *_saved_conv_inputs(ctx)), ctx.n_layers
    )


def _conv_backward_formula(impl: str):
    def backward(ctx, grad):
        g = _conv_grads(impl, ctx, grad)
        L = ctx.n_layers
        return (
            g["x"],
            g["inp"],
            None,
            None,
            g["weights"],
            g["biases"],
            [None] * L,
            [None] * L,
            g["final_weight"],
            g["final_bias"],
            g["coef"],
            None,
            None,
            None,
            None,
        ) + _no_grads(ctx)

    return backward


def _bwd_setup_context(ctx, inputs, output):
    _save_conv_inputs(ctx, inputs[1:15], inputs[15] if len(inputs) > 15 else None, inputs[0])


def _double_backward(ctx, grads):
    """Derivative of the backward op: the plain-PyTorch form of conv, differentiated twice."""
    saved = ctx.saved_tensors
    grad = saved[-1]
    ctx_tensors = saved[:-1]

    class _View:  # what _saved_conv_inputs reads
        saved_tensors = ctx_tensors
        n_layers = ctx.n_layers
        has_mask = ctx.has_mask
        n_tape = ctx.n_tape
        norm = ctx.norm
        ndim = ctx.ndim

    args = _saved_conv_inputs(_View)
    L = ctx.n_layers
    with torch.enable_grad():
        x, inp = args[0].detach().requires_grad_(), args[1].detach().requires_grad_()
        ws = [w.detach().requires_grad_() for w in args[4]]
        bs = [b.detach().requires_grad_() for b in args[5]]
        fw, fb, coef = (t.detach().requires_grad_() for t in args[8:11])
        g0 = grad.detach().requires_grad_()
        leaves = [x, inp, *ws, *bs, fw, fb, coef]
        out = conv_reference_form(
            x, inp, args[2], args[3], ws, bs, args[6], args[7], fw, fb, coef, ctx.norm, ctx.ndim, args[13]
        )
        first = torch.autograd.grad(out, leaves, g0, create_graph=True, allow_unused=True)
        pairs = [(f, v) for f, v in zip(first, grads) if f is not None and v is not None]
        if not pairs:
            second = [None] * (len(leaves) + 1)
        else:
            total = sum((f * v).sum() for f, v in pairs)
            second = torch.autograd.grad(total, [g0, *leaves], allow_unused=True)
    dgrad, rest = second[0], second[1:]
    g = _split_grads(list(rest), L)
    return (
        dgrad,
        g["x"],
        g["inp"],
        None,
        None,
        g["weights"],
        g["biases"],
        [None] * L,
        [None] * L,
        g["final_weight"],
        g["final_bias"],
        g["coef"],
        None,
        None,
        None,
    ) + _no_grads(ctx)


# ----------------------------------------------------------------------------------------------------------------
# implementations
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Implementation:
    """One implementation of the ops, declared once in its own room (``ik_fast/kernels_triton/__init__.py``,
    ``ik_fast/backends/native.py``); the op layer, :mod:`ik_fast.backends` (``available_backends``, ``"auto"``), the
    shared fused host, the tests and the benchmarks read it from :func:`implementations`.

    ``load`` imports the kernels (they register themselves for ``ik_fast::<name>_*``) and raises when they cannot be
    loaded; ``runs_on(device)`` is None where they run on ``device``, else the reason. Capabilities the shared host
    uses: ``chained_statistics`` (``trunk_moments`` with ``start`` > 0: a statistics pass from the previous pass's
    activation), ``tape_devices`` (device types where ``conv`` uses a tape, bounded by
    :data:`ik_fast.backends.fused.TAPE_LIMIT_BYTES`) and ``grids`` (``trunk_moments(..., with_grid=True)``).
    ``measured_faster_on``: device types where a committed benchmark (``benchmarks/results/``) measured it faster than
    the ``"torch"`` backend, which is where ``"auto"`` picks it."""

    name: str
    load: Callable[[], object]
    runs_on: Callable[[torch.device], Optional[str]]
    summary: str = ""
    chained_statistics: bool = False
    tape_devices: Tuple[str, ...] = ()
    grids: bool = False
    measured_faster_on: Tuple[str, ...] = ()


_IMPLS: Dict[str, Implementation] = {}


@functools.lru_cache(maxsize=None)
def define(impl: str) -> None:
    """Define ``ik_fast::<impl>_conv``, ``..._conv_backward`` and ``..._trunk_moments`` with their fakes and
    autograd. Idempotent; the implementation registers its kernels afterwards."""
    for stage, schema in SCHEMAS.items():
        _LIB.define(f"{impl}_{stage}{schema}")
    torch.library.register_fake(f"ik_fast::{impl}_conv", _fake_conv, lib=_LIB)
    torch.library.register_fake(f"ik_fast::{impl}_conv_backward", _fake_conv_backward, lib=_LIB)
    torch.library.register_fake(f"ik_fast::{impl}_trunk_moments", _fake_trunk_moments, lib=_LIB)
    torch.library.register_autograd(
        f"ik_fast::{impl}_conv", _conv_backward_formula(impl), setup_context=_conv_setup_context, lib=_LIB
    )
    torch.library.register_autograd(
        f"ik_fast::{impl}_conv_backward", _double_backward, setup_context=_bwd_setup_context, lib=_LIB
    )


def register_implementation(decl: Implementation) -> Implementation:
    """Define the ops of ``decl.name`` and record the declaration (the kernels are loaded on first use, by
    :func:`status`). Returns ``decl``."""
    if not isinstance(decl, Implementation):
        raise TypeError(f"register_implementation takes an ik_fast.ops.Implementation, got {type(decl).__name__}")
    define(decl.name)
    _IMPLS[decl.name] = decl
    return decl


def _declare_implementations() -> None:
    """Import the backends, which import the rooms that declare the implementations: ``import ik_fast`` loads its
    names on first use, so a caller that imported only this module still sees every implementation."""
    from . import backends  # noqa: F401


def implementations() -> List[Implementation]:
    """Every declared implementation, in declaration order."""
    _declare_implementations()
    return list(_IMPLS.values())


def implementation(name: str) -> Implementation:
    """The declaration of implementation ``name``."""
    _declare_implementations()
    if name not in _IMPLS:
        raise ValueError(f"no implementation named {name!r} (known: {list(_IMPLS)})")
    return _IMPLS[name]


def implementation_names() -> List[str]:
    return [d.name for d in implementations()]


@functools.lru_cache(maxsize=None)
def _load(impl: str) -> Optional[str]:
    try:
        _IMPLS[impl].load()
    except Exception as e:  # ImportError, a toolkit that fails to initialise, a failed build: keep the reason
        return f"{type(e).__name__}: {e}"
    return None


def status(impl: str, device: str = "cpu") -> Optional[str]:
    """None when implementation ``impl`` runs on ``device``, else the reason it does not."""
    _declare_implementations()
    if impl not in _IMPLS:
        return f"no implementation named {impl!r} (known: {implementation_names()})"
    why = _load(impl)
    if why is not None:
        return f"its kernels failed to load ({why})"
    return _IMPLS[impl].runs_on(torch.device(device))


def _op(impl: str, stage: str):
    return getattr(torch.ops.ik_fast, f"{impl}_{stage}")


_BELOW_AUTOGRAD = getattr(torch._C, "_AutoDispatchBelowAutograd", None)


def _below_autograd(fn, *args):
    """``fn(*args)`` past the autograd dispatch key when autograd is off: what the registered autograd's no-grad path
    does (torch._library.autograd), without its Python layer (keyset metadata, redispatch; ~0.1 ms a call), for calls
    whose gradient the caller forms itself. With autograd on (a double backward), the registered autograd runs."""
    if _BELOW_AUTOGRAD is None or torch.is_grad_enabled():
        return fn(*args)
    with _BELOW_AUTOGRAD():
        return fn(*args)


class _EagerConv(torch.autograd.Function):
    """``conv`` with autograd in eager mode: the op called below autograd, its inputs saved and its backward the
    ``conv_backward`` op, exactly as the op's registered autograd does (the same functions). The registered path
    flattens and rebuilds every nested list of arguments with pytree in Python on each call and in the backward
    (0.5 ms a training step, a twentieth of one at 400 edges); this one takes the lists flat. ``torch.compile`` and
    direct calls of the op keep the registered autograd (see :func:`conv`); a double backward goes through the
    ``conv_backward`` op's own registered derivative, called here with autograd on."""

    @staticmethod
    def forward(
        ctx, impl, L, n_tape, x, inp, src, rowptr, final_weight, final_bias, coef, norm, ndim, final_mask, hidden, *flat
    ):
        lists = [list(flat[i * L : (i + 1) * L]) for i in range(4)]
        tape = list(flat[4 * L : 4 * L + n_tape]) if n_tape >= 0 else None
        inputs = [x, inp, src, rowptr, *lists, final_weight, final_bias, coef, norm, ndim, final_mask, hidden, tape]
        out = _below_autograd(_op(impl, "conv"), *inputs)
        _save_conv_inputs(ctx, inputs, tape)
        ctx.impl = impl
        return out

    @staticmethod
    def backward(ctx, grad):
        g = _conv_grads(ctx.impl, ctx, grad)
        L = ctx.n_layers
        return (
            None,
            None,
            None,
            g["x"],
            g["inp"],
            None,
            None,
            g["final_weight"],
            g["final_bias"],
            g["coef"],
            None,
            None,
            None,
            None,
            *g["weights"],
            *g["biases"],
            *([None] * (2 * L + max(ctx.n_tape, 0))),
        )


def conv(
    impl: str,
    x: Tensor,
    inp: Tensor,
    src: Tensor,
    rowptr: Tensor,
    program: PackedProgram,
    hidden: Optional[Tensor] = None,
    tape: Optional[List[Tensor]] = None,
) -> Tensor:
    args = (x, inp, src, rowptr, *program.args(), hidden, tape)
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return _op(impl, "conv")(*args)
    L = len(program.weights)
    return _EagerConv.apply(
        impl,
        L,
        -1 if tape is None else len(tape),
        x,
        inp,
        src,
        rowptr,
        program.final_weight,
        program.final_bias,
        program.coef,
        program.norm,
        program.ndim,
        program.final_mask,
        hidden,
        *program.weights,
        *program.biases,
        *program.fourier,
        *program.fourier_inv,
        *(tape or ()),
    )


def trunk_moments(
    impl: str,
    inp: Tensor,
    program: PackedProgram,
    upto: int,
    with_activation: bool = False,
    start: int = 0,
    with_grid: bool = False,
):
    """(moments (2, H_k), the activation (E, H_k) when ``with_activation`` else an empty tensor) of hidden layer
    ``upto``, and with ``with_grid`` its grid as a third element (see the module docstring); with ``start``, ``inp``
    is the activation of hidden layer ``start`` and only the layers after it run."""
    out = _op(impl, "trunk_moments")(
        inp,
        program.weights[start:upto],
        program.biases[start:upto],
        program.fourier[start:upto],
        program.fourier_inv[start:upto],
        with_activation,
        with_grid,
    )
    return tuple(out) if with_grid else tuple(out[:2])
