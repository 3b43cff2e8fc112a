"""The op layer: the stages of the fused computation as registered PyTorch ops, defined once for every backend.

A fused backend evaluates the implicit convolution without materialising per-edge kernels. Whatever its kernels
(Triton, C++ or CUDA), it implements the same stages, whose schemas, fake (meta) implementations and autograd formulas
live here and nowhere else. The ops take the kernel MLP **as written**: nothing is folded on the host.

``conv(x, inp, src, rowptr, weights, biases, fourier, fourier_inv, act_bias, bn_factor, bn_shift, final_weight,
final_bias, coef, norm, ndim, structure, hidden, tape) -> out`` (n_dst, R)
    For every receiver i, ``sum_{e in rowptr[i]:rowptr[i+1]} K_e x[src_e]`` with
    ``K_e = norm * exp(-coef |d_e|^2) * (W_F . h_e + B_F)`` and ``h_e`` the trunk of the kernel MLP on
    ``inp_e = [d_e, a_e]`` (``d_e`` its first ``ndim`` columns). Edges come in receiver order (the graph's CSR:
    ``rowptr`` (n_dst + 1,), ``src`` (E,)). ``hidden`` (optional, never differentiated) is the last hidden layer's
    activation *before its batch norm* on ``inp``, as the statistics pass gives it, so that the trunk is not
    evaluated twice.
``conv_backward(grad, <the inputs of conv but hidden>) -> [dx, dinp, *dweights, *dbiases, *dact_bias, *dbn_factor,
*dbn_shift, dfinal_weight, dfinal_bias, dcoef]``
    The vector-Jacobian product of ``conv`` (the Fourier matrices are constants and get no gradient; a layer without
    batch norm gets empty ``dbn_factor`` / ``dbn_shift``).
``trunk_moments(inp, weights, biases, fourier, fourier_inv, act_bias, in_factor, in_shift, structure, first_layer,
with_activation=False, with_grid=False) -> ((2, H_k), (E, H_k), (G_k, C_k, E))``
    The statistics pass of the batch norm after the last given layer: column means and sums of squared deviations of
    that layer's activation (before its batch norm) over all edges (the program finishes them,
    :meth:`~ik_fast.spec.program.BatchNorm.finish`); with ``with_activation`` also the activation, with ``with_grid``
    also its Fourier ELU output on the grid, ``ELU(y_k A_k^T)`` (empty otherwise, and for a pointwise layer). An
    implementation that keeps no grids raises ``NotImplementedError`` when asked for one. ``in_factor[i]`` /
    ``in_shift[i]`` is the batch norm applied to the *input* of given layer i: for i > 0 the batch norm after layer
    i - 1; for i = 0 empty when ``inp`` is the MLP input, or, when the pass starts from a previous pass's activation,
    that activation's batch norm. The given layers are the structure's hidden layers ``first_layer ..``.

**The tensors** are the kernel MLP's, unpadded. Hidden layer ``k`` is::

    y_k = h_{k-1} W_k^T + b_k
    a_k = act_k(y_k)
    h_k = a_k[:, c, i] * bn_factor[k][c] + bn_shift[k][c D_k + i]      (h_k = a_k where bn_factor[k] is empty)

with ``W_k`` (H_k, H_{k-1}), or (D, C, C) for a Linear that only mixes the channels' equal components
(:func:`linear_reference_form`: the program states that structure through the shape; it is never found from the
data); ``act_k`` the layer's activation, its kind stated by the structure (``HiddenLayout.activation``; without a
structure a Fourier ELU where ``fourier[k]`` is non-empty, else a pointwise ELU):

* ``fourier_elu``: ``ELU(y A_k^T) A_k^+^T`` on each channel of ``D_k = A_k.shape[1]`` components (``fourier[k]`` =
  A_k (G, D), ``fourier_inv[k]`` = A_k^+ (D, G)); ``elu``: a pointwise ELU;
* ``gated`` and ``norm`` act on each channel's field as a direct sum of irreps (``HiddenLayout.irreps``, in order):
  a trivial irrep's components go through an ELU; a non-trivial irrep's components ``v`` are scaled, for ``gated`` by
  ``sigmoid`` of its gate (the Linear into a gated layer makes ``D_k + g_k`` units per channel, the components then
  one gate per non-trivial irrep in order; its componentwise form (D_k + g_k, C, C) reads, for a gate, the first
  trivial component of the previous layer's field: :func:`linear_source`), for ``norm`` by
  ``sigmoid(|v| - act_bias[k][c g_k + j])`` (the j-th non-trivial irrep of channel c; the derivative of ``|v|`` taken
  as 0 where it is 0). ``act_bias[k]`` is empty for every other kind.

The batch norm's affine map (escnn's IIDBatchNorm1d with its statistics known: ``factor = weight / sqrt(var + eps)``
(C_k,), ``shift = bias - mean * factor`` flattened channel-major (H_k,); ``D_k = H_k / C_k``); ``final_weight`` W_F
(R, H, C_in), ``final_bias`` B_F (R, C_in) (zeros without bias), ``coef`` = 1 / (2 sigma^2) (shape (1,)).
``structure`` (optional) is the kernel's structure as one frozen value, a :class:`~ik_fast.structure.ConvSpec`
encoded as a string: the sizes, every hidden layer's layout, and W_F's blocks as escnn's basis knows them (output
field group x hidden component x input field group). The op computes with ``W_F * mask(structure)``, so entries
outside the blocks are ignored and get a zero gradient; without it W_F is dense. For an equivariant layer the blocks
are the last Linear's structural non-zeros, so nothing changes numerically and an implementation may skip everything
outside them. It is a structural constant (a string: constant to ``torch.compile``, known on the host without a
device sync, its content its hash): every implementation derives its own tiling from it and keys its caches on it.
No tile size, precision mode or other implementation detail appears in a schema.

**The tape** (optional, never differentiated): ``[act_1, grid_1, ..., act_L, grid_L]``, every hidden layer's
activation (before its batch norm) and grid as ``trunk_moments(..., with_activation=True, with_grid=True)`` gives them
(the statistics passes of training compute them anyway). An implementation may read it in ``conv_backward`` instead of
evaluating the trunk again, or ignore it; the result is the same to rounding. It holds E x (H_k + G_k C_k) numbers per
layer from the forward to the backward, so the host passes one only to implementations that use it and within
:data:`ik_fast.backends.fused.TAPE_LIMIT_BYTES`.

**One op per implementation.** Several implementations run on one device (Triton and native CUDA on CUDA tensors),
so :func:`define` instantiates the schemas as ``ik_fast::<impl>_conv``, ``ik_fast::<impl>_conv_backward`` and
``ik_fast::<impl>_trunk_moments`` with their fakes and autograd; the implementation adds kernels per dispatch key,
from Python (``torch.library.register_kernel``) or C++ (``TORCH_LIBRARY_IMPL(ik_fast, CUDA, m)``).

**Autograd** is registered on the forward op (its backward is ``conv_backward``) and on the backward op, so a double
backward (forces) goes through registered ops; the backward op's derivative differentiates :func:`conv_reference_form`,
the op's plain-PyTorch statement (the reference backend's memory: one (E, R, C_in) kernel tensor, never
(E, H, C_in)), which the ``reference`` backend runs.

**Availability.** :func:`register_implementation` takes a loader; :func:`status` imports it once and keeps the reason
of a failure (the exception text), which ``ik_fast.available_backends`` and the ``auto`` warning report.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ik_fast import structure as st

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
    "TrunkPass",
    "conv_reference_form",
    "messages_reference_form",
    "kernels_reference_form",
    "trunk_reference_form",
    "linear_reference_form",
    "activation_reference_form",
    "affine_reference_form",
    "OpProgram",
]

_LIB = torch.library.Library("ik_fast", "FRAGMENT")

_PROGRAM = (
    "Tensor[] weights, Tensor[] biases, Tensor[] fourier, Tensor[] fourier_inv, Tensor[] act_bias, "
    "Tensor[] bn_factor, Tensor[] bn_shift, Tensor final_weight, Tensor final_bias, Tensor coef, float norm, int ndim, "
    "str? structure"
)
SCHEMAS = {
    "conv": f"(Tensor x, Tensor inp, Tensor src, Tensor rowptr, {_PROGRAM}, Tensor? hidden, Tensor[]? tape=None) "
    "-> Tensor",
    "conv_backward": (
        f"(Tensor grad, Tensor x, Tensor inp, Tensor src, Tensor rowptr, {_PROGRAM}, Tensor[]? tape=None) -> Tensor[]"
    ),
    "trunk_moments": (
        "(Tensor inp, Tensor[] weights, Tensor[] biases, Tensor[] fourier, Tensor[] fourier_inv, Tensor[] act_bias, "
        "Tensor[] in_factor, Tensor[] in_shift, str? structure, int first_layer, bool with_activation=False, "
        "bool with_grid=False) -> (Tensor, Tensor, Tensor)"
    ),
}

# conv's arguments by name, in schema order; the lists of per-hidden-layer tensors; those that get gradients
CONV_ARGS = (
    "x",
    "inp",
    "src",
    "rowptr",
    "weights",
    "biases",
    "fourier",
    "fourier_inv",
    "act_bias",
    "bn_factor",
    "bn_shift",
    "final_weight",
    "final_bias",
    "coef",
    "norm",
    "ndim",
    "structure",
)
LAYER_LISTS = ("weights", "biases", "fourier", "fourier_inv", "act_bias", "bn_factor", "bn_shift")
GRAD_ARGS = ("x", "inp", "weights", "biases", "act_bias", "bn_factor", "bn_shift", "final_weight", "final_bias", "coef")


@dataclass(frozen=True)
class OpProgram:
    """The kernel MLP as the ops take it (see the module docstring), by name: per hidden layer its weight (dense or
    componentwise), bias, Fourier matrices and batch-norm affine (empty tensors without batch norm); the last Linear in
    kernel layout; the radial coefficient; ``structure`` the kernel's encoded
    :class:`~ik_fast.structure.ConvSpec`, or None (``final_weight`` dense)."""

    weights: List[Tensor]
    biases: List[Tensor]
    fourier: List[Tensor]
    fourier_inv: List[Tensor]
    act_bias: List[Tensor]
    bn_factor: List[Tensor]
    bn_shift: List[Tensor]
    final_weight: Tensor
    final_bias: Tensor
    coef: Tensor
    norm: float
    ndim: int
    structure: Optional[str] = None

    def args(self) -> tuple:
        """The program's arguments of ``conv`` in schema order (from ``weights`` to ``structure``)."""
        return tuple(getattr(self, name) for name in CONV_ARGS[4:])

    def grad_inputs(self) -> list:
        """The tensors that get gradients, in the order of ``conv_backward``'s outputs after dx and dinp."""
        return [
            *self.weights, *self.biases, *self.act_bias, *self.bn_factor, *self.bn_shift, self.final_weight,
            self.final_bias, self.coef,
        ]  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# the ops' semantics in plain PyTorch: the one statement of the layer
# ----------------------------------------------------------------------------------------------------------------
def _tracing() -> bool:
    return torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0


def _layout_tensors(layout: st.HiddenLayout, device) -> Tuple[Tensor, Tensor, Tensor]:
    """(trivial (D,) bool, irrep index (D,) long, membership (D, n_nt) of each component in its non-trivial irrep)
    of a gated or norm layer, on ``device`` (cached; made afresh while a trace runs)."""
    device = str(torch.device(device))
    return _new_layout_tensors(layout, device) if _tracing() else _cached_layout_tensors(layout, device)


def _new_layout_tensors(layout: st.HiddenLayout, device: str):
    triv, idx = layout.component_irreps()
    member = np.zeros((layout.components, layout.nontrivial))
    member[np.flatnonzero(~triv), idx[~triv]] = 1.0
    return (
        torch.from_numpy(triv).to(device),
        torch.from_numpy(idx).to(device),
        torch.from_numpy(member).to(device),
    )


_cached_layout_tensors = functools.lru_cache(maxsize=64)(_new_layout_tensors)


def linear_source(layout: st.HiddenLayout, prev: st.HiddenLayout, device) -> Optional[Tensor]:
    """For a componentwise Linear into ``layout`` from ``prev``'s field: the input component each output component
    reads (the components themselves, then every gate the first trivial component of ``prev``); None where they are
    the components themselves (not a gated layer)."""
    if layout.gates == 0:
        return None
    t0 = prev.trivial_source()
    if t0 < 0:
        raise ValueError("a componentwise Linear into a gated layer needs a trivial irrep in its input field")
    src = list(range(layout.components)) + [t0] * layout.gates
    return torch.tensor(src, dtype=torch.long, device=device)


def activation_reference_form(
    y: Tensor, A: Tensor, Ainv: Tensor, bias: Optional[Tensor] = None, layout: Optional[st.HiddenLayout] = None
) -> Tensor:
    """The hidden activation of the module docstring: the Fourier ELU ``ELU(y_c A^T) Ainv^T`` on each channel of
    ``A.shape[1]`` components, or a pointwise ELU when ``A`` is empty; for a ``layout`` of a ``"gated"`` or
    ``"norm"`` layer its irrep-wise map (``bias``: the norm layer's ``act_bias``)."""
    kind = layout.activation if layout is not None else ("fourier_elu" if A.numel() else "elu")
    if kind == "elu":
        return F.elu(y)
    if kind == "fourier_elu":
        A, Ainv = A.to(y.dtype), Ainv.to(y.dtype)
        D = A.shape[1]
        u = y.reshape(y.shape[0], -1, D) @ A.t()
        return (F.elu(u) @ Ainv.t()).reshape(y.shape[0], -1)
    E, D, G = y.shape[0], layout.components, layout.gates
    y = y.reshape(E, -1, D + G)
    v = y[..., :D] if G else y
    if layout.nontrivial == 0:
        return F.elu(v).reshape(E, -1)
    triv, idx, member = _layout_tensors(layout, y.device)
    if kind == "gated":
        m = torch.sigmoid(y[..., D:])
    else:
        # |v| per non-trivial irrep; its derivative taken as 0 where it is 0 (an irrep that the Linear cannot
        # reach is exactly zero): the inner where keeps sqrt's backward away from 0
        sq = (v * v) @ member.to(v.dtype)
        pos = sq > 0
        nrm = torch.where(pos, torch.where(pos, sq, 1).sqrt(), 0)
        m = torch.sigmoid(nrm - bias.to(v.dtype).view(1, -1, layout.nontrivial))
    return torch.where(triv, F.elu(v), v * m.index_select(2, idx)).reshape(E, -1)


def affine_reference_form(a: Tensor, factor: Optional[Tensor], shift: Optional[Tensor]) -> Tensor:
    """A batch norm with known statistics: ``a[:, c, i] * factor[c] + shift[c D + i]`` on the channel-major view
    (D = H / C); ``a`` itself where ``factor`` is None or empty."""
    if factor is None or factor.numel() == 0:
        return a
    C = factor.shape[0]
    return (a.reshape(a.shape[0], C, -1) * factor[:, None]).reshape(a.shape[0], -1) + shift


def linear_reference_form(h: Tensor, w: Tensor, b: Tensor, source: Optional[Tensor] = None) -> Tensor:
    """``h W^T + b`` for a dense W (H_out, H_in), or for a componentwise one (D_out, C_out, C_in) on the
    channel-major (C_in, D_in) view of h: ``y[:, c, a] = sum_c' W[a, c, c'] h[:, c', source[a]]`` (``source``
    (D_out,): :func:`linear_source`; None: ``a`` itself)."""
    if w.dim() == 2:
        return h @ w.t() + b
    D, C_out, C_in = w.shape
    hv = h.reshape(h.shape[0], C_in, -1)
    if source is not None:
        hv = hv.index_select(2, source)
    y = torch.bmm(hv.permute(2, 0, 1), w.transpose(1, 2))  # (D, E, C_out)
    return y.permute(1, 2, 0).reshape(h.shape[0], C_out * D) + b


def hidden_width(w: Tensor, layout: Optional[st.HiddenLayout] = None) -> int:
    """H_k, the width of a hidden layer's activation, from its Linear's weight (dense or componentwise) and, for a
    gated layer, its ``layout`` (the Linear also makes the gates)."""
    n = w.shape[0] if w.dim() == 2 else w.shape[0] * w.shape[1]
    if layout is not None and layout.gates:
        return n // layout.linear_components * layout.components
    return n


def _at(seq, k):
    return seq[k] if seq is not None and k < len(seq) else None


def trunk_reference_form(
    inp, weights, biases, fourier, fourier_inv, bn_factor=None, bn_shift=None, affines=None,
    linear=linear_reference_form, activation=activation_reference_form, act_bias=None, layouts=None,
):  # fmt: skip
    """The trunk of the kernel MLP on ``inp``: every hidden layer's Linear, activation and batch norm (see the module
    docstring); the input itself without layers. ``bn_factor`` / ``bn_shift`` shorter than the layers (or None):
    the layers past them without batch norm. ``affines``: ``(k, a_k) -> (factor, shift)`` in their place, for a
    caller that forms each batch norm from the batch's statistics of ``a_k`` (training). ``linear`` and
    ``activation``: the same maps computed another way (the ``torch`` backend's block plans and its Fourier ELU that
    keeps no grid for the backward). ``act_bias``: the norm layers' biases; ``layouts``: every layer's
    :class:`~ik_fast.structure.HiddenLayout` (:func:`ik_fast.structure.layers_of`; None: from ``fourier``)."""
    layouts = st.layers_of(None, fourier) if layouts is None else layouts
    h = inp
    for k, (w, b, A, Ainv) in enumerate(zip(weights, biases, fourier, fourier_inv)):
        src = None
        if k > 0 and getattr(w, "dim", lambda: 2)() == 3:
            src = linear_source(layouts[k], layouts[k - 1], w.device)
        y = linear(h, w, b) if src is None else linear(h, w, b, src)
        a = activation(y, A, Ainv, _at(act_bias, k), layouts[k])
        f, s = affines(k, a) if affines is not None else (_at(bn_factor, k), _at(bn_shift, k))
        h = affine_reference_form(a, f, s)
    return h


def structure_mask(structure: str, shape, device) -> Tensor:
    """The bool mask (R, H, C_in) of an encoded structure on ``device`` (:func:`ik_fast.structure.mask`, cached
    by the string's content); a ValueError naming ``structure`` when it does not describe a W' of ``shape``. While a
    trace runs (torch.compile, fake tensors), made afresh in it."""
    st.check_shape(structure, shape)
    device = str(torch.device(device))
    if _tracing():  # (fake tensors, AOT): made in the trace, never a cached one
        return _new_mask(structure, device)
    return _cached_mask(structure, device)


def _new_mask(structure: str, device: str) -> Tensor:
    return torch.from_numpy(st.mask(structure).copy()).to(device)


_cached_mask = functools.lru_cache(maxsize=64)(_new_mask)


def kernels_reference_form(
    inp, weights, biases, fourier, fourier_inv, act_bias, bn_factor, bn_shift, final_weight, final_bias, coef, norm,
    ndim, structure=None, affines=None, masked=True,
) -> Tensor:  # fmt: skip
    """The per-edge kernels (E, R, C_in) of the module docstring. ``masked=False``: ``final_weight`` is known to be
    zero outside the structure's blocks (a lowered program), so the product with the mask is skipped; the structure
    still states the layers' activations."""
    E = inp.shape[0]
    R, H, C = final_weight.shape
    if structure is not None and masked:
        final_weight = final_weight * structure_mask(structure, final_weight.shape, final_weight.device)
    h = trunk_reference_form(
        inp, weights, biases, fourier, fourier_inv, bn_factor, bn_shift, affines, act_bias=act_bias,
        layouts=st.layers_of(structure, fourier),
    )  # fmt: skip
    s = torch.exp(-coef * inp[:, :ndim].square().sum(1)) * norm
    k = (h @ final_weight.permute(1, 0, 2).reshape(H, R * C) + final_bias.reshape(-1)) * s[:, None]
    return k.reshape(E, R, C)


def messages_reference_form(x_src: Tensor, inp: Tensor, *program, affines=None, masked=True) -> Tensor:
    """Each edge's message ``K_e x_src[e]`` (E, R): :func:`kernels_reference_form` (its arguments after ``inp``)
    applied to the sources' features gathered per edge."""
    k = kernels_reference_form(inp, *program, affines=affines, masked=masked)
    return torch.bmm(k, x_src.unsqueeze(-1).to(k.dtype)).squeeze(-1)


def receivers(rowptr: Tensor, num_edges: int) -> Tensor:
    """Receiver of each edge (E,) from the CSR row pointer, without a host synchronisation."""
    n_dst = rowptr.shape[0] - 1
    return torch.repeat_interleave(torch.arange(n_dst, device=rowptr.device), rowptr.diff(), output_size=num_edges)


def conv_reference_form(
    x, inp, src, rowptr, weights, biases, fourier, fourier_inv, act_bias, bn_factor, bn_shift, final_weight,
    final_bias, coef, norm, ndim, structure=None, hidden=None,
) -> Tensor:  # fmt: skip
    """``conv`` as plain differentiable PyTorch (per-edge kernels, the reference backend's memory). ``hidden`` is
    ignored: it only spares an implementation recomputing the trunk (see the module docstring)."""
    msg = messages_reference_form(
        x[src], inp, weights, biases, fourier, fourier_inv, act_bias, bn_factor, bn_shift, final_weight, final_bias,
        coef, norm, ndim, structure,
    )  # fmt: skip
    return msg.new_zeros(rowptr.shape[0] - 1, final_weight.shape[0]).index_add(0, receivers(rowptr, inp.shape[0]), msg)


def trunk_moments_reference_form(
    inp, weights, biases, fourier, fourier_inv, act_bias, in_factor, in_shift, structure=None, first_layer=0
):
    """``trunk_moments``' statement: (moments (2, H), activation (E, H)) of the last given layer before its batch
    norm."""
    layouts = st.layers_of(structure, fourier, first_layer)
    prev = st.decode(structure).layers[first_layer - 1] if structure is not None and first_layer > 0 else None
    h = inp
    for k, (w, b, A, Ainv) in enumerate(zip(weights, biases, fourier, fourier_inv)):
        h = affine_reference_form(h, _at(in_factor, k), _at(in_shift, k))
        before = layouts[k - 1] if k > 0 else prev
        src = linear_source(layouts[k], before, w.device) if w.dim() == 3 and before is not None else None
        h = activation_reference_form(linear_reference_form(h, w, b, src), A, Ainv, _at(act_bias, k), layouts[k])
    mean = h.mean(0)
    return torch.stack([mean, (h - mean).square().sum(0)]), h


# ----------------------------------------------------------------------------------------------------------------
# fakes and autograd, written once for every implementation
# ----------------------------------------------------------------------------------------------------------------
def _fake_conv(x, inp, src, rowptr, *program_hidden_tape):
    final_weight = program_hidden_tape[CONV_ARGS.index("final_weight") - 4]
    return x.new_empty(rowptr.shape[0] - 1, final_weight.shape[0])


def _fake_conv_backward(grad, *args):
    a = dict(zip(CONV_ARGS, args))
    return [torch.empty_like(t) for t in _grad_inputs(a)]


def _grad_inputs(a: dict) -> list:
    """The tensors of conv's arguments ``a`` (by name) that get gradients, in conv_backward's output order."""
    out = []
    for name in GRAD_ARGS:
        out += list(a[name]) if name in LAYER_LISTS else [a[name]]
    return out


def grid_shape(fourier: Sequence[Tensor], H: int, E: int) -> tuple:
    """Shape of ``trunk_moments``' grid output: (G, C, E) for a Fourier ELU last layer, else empty."""
    if not fourier or fourier[-1].numel() == 0:
        return (0,)
    G, D = fourier[-1].shape
    return (G, H // D, E)


def _fake_trunk_moments(
    inp, weights, biases, fourier, fourier_inv, act_bias, in_factor, in_shift, structure, first_layer,
    with_activation=False, with_grid=False,
):  # fmt: skip
    H = hidden_width(weights[-1], st.layers_of(structure, fourier, first_layer)[-1]) if weights else inp.shape[1]
    grid = grid_shape(fourier, H, inp.shape[0]) if with_grid else (0,)
    return inp.new_empty(2, H), inp.new_empty(inp.shape[0] if with_activation else 0, H), inp.new_empty(grid)


def _split_grads(flat: Sequence[Optional[Tensor]], n_layers: int) -> dict:
    """conv_backward's outputs (or their gradients) by argument name (lists for the per-layer ones)."""
    out, i = {}, 0
    for name in GRAD_ARGS:
        if name in LAYER_LISTS:
            out[name] = list(flat[i : i + n_layers])
            i += n_layers
        else:
            out[name] = flat[i]
            i += 1
    return out


def _conv_input_grads(g: dict, n_layers: int) -> list:
    """Gradients by name -> one per conv argument in schema order (None for the non-differentiable ones)."""
    out = []
    for name in CONV_ARGS:
        if name in GRAD_ARGS:
            out.append(g[name])
        elif name in LAYER_LISTS:
            out.append([None] * n_layers)
        else:
            out.append(None)
    return out


def _save_conv_inputs(ctx, inputs, tape, *extra) -> None:
    """Save conv's inputs (``inputs``: its arguments in schema order up to ``structure``) and its tape (``hidden`` is
    not saved: without a tape the backward recomputes the trunk, keeping one (E, H) tensor less alive; with one, the
    tape holds it)."""
    a = dict(zip(CONV_ARGS, inputs))
    ctx.n_layers = len(a["weights"])
    ctx.tape_given = tape is not None  # (autograd wants a list of Nones back for a list)
    tape = list(tape) if tape else []
    ctx.n_tape = len(tape)
    tensors = []
    for name in CONV_ARGS:
        if name in LAYER_LISTS:
            tensors += list(a[name])
        elif name in ("norm", "ndim", "structure"):
            continue
        else:
            tensors.append(a[name])
    ctx.save_for_backward(*tensors, *tape, *extra)
    ctx.norm, ctx.ndim, ctx.structure = a["norm"], a["ndim"], a["structure"]


def _no_grads(ctx) -> tuple:
    """The tape's gradient: none, in the structure it was given (a list of Nones for a list; nothing when it was not
    given: the dispatcher leaves a trailing default argument out of the inputs autograd sees)."""
    return ([None] * ctx.n_tape,) if ctx.tape_given else ()


def _conv_setup_context(ctx, inputs, output):
    n = len(CONV_ARGS)
    _save_conv_inputs(ctx, inputs[:n], inputs[n + 1] if len(inputs) > n + 1 else None)


def _saved_conv_inputs(ctx, tensors=None) -> list:
    """conv_backward's arguments after ``grad``: conv's inputs but ``hidden``, then the tape (None without one)."""
    t = list(ctx.saved_tensors if tensors is None else tensors)
    L, i, out = ctx.n_layers, 0, []
    for name in CONV_ARGS:
        if name in LAYER_LISTS:
            out.append(t[i : i + L])
            i += L
        elif name == "norm":
            out.append(ctx.norm)
        elif name == "ndim":
            out.append(ctx.ndim)
        elif name == "structure":
            out.append(ctx.structure)
        else:
            out.append(t[i])
            i += 1
    out.append(t[i : i + ctx.n_tape] if ctx.n_tape else None)
    return out


def _conv_grads(impl: str, ctx, grad) -> dict:
    """conv's gradients by argument name: the conv_backward op on what the forward saved."""
    return _split_grads(
        _below_autograd(_op(impl, "conv_backward"), grad.contiguous(), *_saved_conv_inputs(ctx)), ctx.n_layers
    )


def _conv_backward_formula(impl: str):
    def backward(ctx, grad):
        g = _conv_grads(impl, ctx, grad)
        return (*_conv_input_grads(g, ctx.n_layers), None) + _no_grads(ctx)  # (None: hidden)

    return backward


def _bwd_setup_context(ctx, inputs, output):
    n = len(CONV_ARGS)
    _save_conv_inputs(ctx, inputs[1 : n + 1], inputs[n + 1] if len(inputs) > n + 1 else None, inputs[0])


def _double_backward(ctx, grads):
    """Derivative of the backward op: the plain-PyTorch form of conv, differentiated twice."""
    saved = ctx.saved_tensors
    grad = saved[-1]
    args = dict(zip(CONV_ARGS, _saved_conv_inputs(ctx, saved[:-1])))
    L = ctx.n_layers
    with torch.enable_grad():
        leaf = lambda t: t.detach().requires_grad_()  # noqa: E731
        for name in GRAD_ARGS:
            args[name] = [leaf(t) for t in args[name]] if name in LAYER_LISTS else leaf(args[name])
        g0 = leaf(grad)
        leaves = _grad_inputs(args)
        out = conv_reference_form(*(args[name] for name in CONV_ARGS))
        first = torch.autograd.grad(out, leaves, g0, create_graph=True, allow_unused=True)
        pairs = [(f, v) for f, v in zip(first, grads) if f is not None and v is not None]
        if not pairs:
            second = [None] * (len(leaves) + 1)
        else:
            total = sum((f * v).sum() for f, v in pairs)
            second = torch.autograd.grad(total, [g0, *leaves], allow_unused=True)
    dgrad, rest = second[0], second[1:]
    return (dgrad, *_conv_input_grads(_split_grads(list(rest), L), L)) + _no_grads(ctx)


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
    activation; True, or the activation kinds it chains for), ``tape_devices`` (device types where ``conv`` uses a
    tape, bounded by :data:`ik_fast.backends.fused.TAPE_LIMIT_BYTES`, on CUDA ``TAPE_LIMIT_BYTES_CUDA``) and
    ``grids`` (``trunk_moments(..., with_grid=True)``).
    ``measured_faster_on``: device types where a committed benchmark (``benchmarks/results/``) measured it faster than
    the ``"torch"`` backend, which is where ``"auto"`` picks it."""

    name: str
    load: Callable[[], object]
    runs_on: Callable[[torch.device], Optional[str]]
    summary: str = ""
    chained_statistics: Union[bool, Tuple[str, ...]] = False
    tape_devices: Tuple[str, ...] = ()
    grids: bool = False
    measured_faster_on: Tuple[str, ...] = ()
    # the hidden activations (:data:`ik_fast.structure.ACTIVATIONS`) its kernels evaluate, per device type; on
    # another it raises NotImplementedError naming the kind, and "auto" goes around it
    activations: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
        ("cpu", ("elu", "fourier_elu")),
        ("cuda", ("elu", "fourier_elu")),
    )

    def evaluates(self, activation: str, device_type: str) -> bool:
        """Whether its kernels evaluate hidden layers of kind ``activation`` on ``device_type``."""
        return activation in dict(self.activations).get(device_type, ())


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


def implementations() -> List[Implementation]:
    """Every declared implementation, in declaration order. The package's own are declared by their rooms, which
    :mod:`ik_fast.backends` imports (as does the first use of any public name of ``ik_fast``); the op layer imports
    no implementation."""
    return list(_IMPLS.values())


def implementation(name: str) -> Implementation:
    """The declaration of implementation ``name``."""
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
    def forward(ctx, impl, L, n_tape, hidden, *flat):
        # flat: conv's arguments in schema order with each per-layer list spliced in (L tensors), then the tape
        inputs, i = [], 0
        for name in CONV_ARGS:
            if name in LAYER_LISTS:
                inputs.append(list(flat[i : i + L]))
                i += L
            else:
                inputs.append(flat[i])
                i += 1
        tape = list(flat[i : i + n_tape]) if n_tape >= 0 else None
        out = _below_autograd(_op(impl, "conv"), *inputs, hidden, tape)
        _save_conv_inputs(ctx, inputs, tape)
        ctx.impl = impl
        return out

    @staticmethod
    def backward(ctx, grad):
        g = _conv_grads(ctx.impl, ctx, grad)
        flat = []
        for name, value in zip(CONV_ARGS, _conv_input_grads(g, ctx.n_layers)):
            flat += value if name in LAYER_LISTS else [value]
        return (None, None, None, None, *flat, *([None] * max(ctx.n_tape, 0)))


def conv(
    impl: str,
    x: Tensor,
    inp: Tensor,
    src: Tensor,
    rowptr: Tensor,
    program: OpProgram,
    hidden: Optional[Tensor] = None,
    tape: Optional[List[Tensor]] = None,
) -> Tensor:
    """``ik_fast::<impl>_conv`` on ``program`` (see the module docstring), with autograd."""
    args = (x, inp, src, rowptr, *program.args())
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return _op(impl, "conv")(*args, hidden, tape)
    flat = []
    for name, value in zip(CONV_ARGS, args):
        flat += value if name in LAYER_LISTS else [value]
    return _EagerConv.apply(impl, len(program.weights), -1 if tape is None else len(tape), hidden, *flat, *(tape or ()))


class TrunkPass(NamedTuple):
    """What a statistics pass returns (:func:`trunk_moments`): ``moments`` (2, H) (column means and sums of squared
    deviations of the activation before its batch norm), ``activation`` (E, H) (empty unless asked for) and ``grid``
    (G, C, E) (empty unless asked for, and for a pointwise layer)."""

    moments: Tensor
    activation: Tensor
    grid: Tensor


def trunk_moments(
    impl: str,
    inp: Tensor,
    program: OpProgram,
    upto: int,
    with_activation: bool = False,
    start: int = 0,
    with_grid: bool = False,
):
    """The statistics pass of hidden layer ``upto`` (1-based): a :class:`TrunkPass` of its activation before its batch
    norm (the activation itself with ``with_activation``, its grid with ``with_grid``; see the module docstring); with
    ``start``, ``inp`` is the activation of hidden layer ``start`` before its batch norm and only the layers after it
    run."""
    empty = inp.new_empty(0)
    first = program.bn_factor[start - 1] if start > 0 else empty
    first_shift = program.bn_shift[start - 1] if start > 0 else empty
    out = _op(impl, "trunk_moments")(
        inp,
        program.weights[start:upto],
        program.biases[start:upto],
        program.fourier[start:upto],
        program.fourier_inv[start:upto],
        program.act_bias[start:upto],
        [first, *program.bn_factor[start : upto - 1]],
        [first_shift, *program.bn_shift[start : upto - 1]],
        program.structure,
        start,
        with_activation,
        with_grid,
    )
    return TrunkPass(*out)
