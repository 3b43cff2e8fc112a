"""The eager backends (``torch``, ``reference``) as one registered op, so that ``torch.compile`` can trace a layer that
runs them.

Their code cannot be traced with dynamic shapes and ``fullgraph=True``: the torch backend's chunk plan (how many
chunks, of which padded degree) depends on the graph's degrees, and the reference's Fourier ELU and inference go over
edge chunks in Python loops whose length depends on the edge count. (The fused backends are traced through their own
registered ops instead, with the data-dependent part of graph preparation in ``ik_fast::graph_csr``: see
``ImplicitPointConv._forward_compiled``.) Inside a compiled region :class:`~ik_fast.ImplicitPointConv` on these two
backends therefore calls ``torch.ops.ik_fast.eager_conv``: the compiler sees one op with a fake kernel (output
(n_dst, C_out) and the flat batch statistics), and the op runs the kernel's lowering, graph preparation, the checks
and the backend eagerly, whatever the edge count. The kernel's parameters and buffers are the op's inputs
(substituted into the module with ``torch.func.functional_call``), so gradients reach them through the op's
registered backward: a second op that recomputes the forward under autograd and returns the gradient of every input
(one more forward per step; double backward is not offered through this path).

The op finds the layer's kernel (for its structure: block plans, sizes) through a registry keyed by an integer that
each layer gets at construction.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["register_kernel", "tensor_slots", "kernel_tensors", "stats_size", "unflatten_stats", "eager_conv"]

_REGISTRY: Dict[int, "weakref.ref"] = {}
_KEYS = itertools.count()
_MUTATED = ("running_mean", "running_var", "num_batches_tracked")


class _Lower(torch.nn.Module):
    """Wraps a kernel so that ``functional_call`` can lower it with substituted parameters and buffers."""

    def __init__(self, kernel):
        super().__init__()
        self.kernel = kernel

    def forward(self):
        return self.kernel.program()  # (expanded now, while the substituted tensors are in place)


def register_kernel(kernel) -> int:
    """A key under which the ops find ``kernel`` (an :class:`~ik_fast.ImplicitKernel`)."""
    key = next(_KEYS)
    _REGISTRY[key] = weakref.ref(kernel)
    return key


def _names(kernel) -> List[str]:
    return [n for n, _ in kernel.named_parameters()] + [n for n, _ in kernel.named_buffers()]


def tensor_slots(kernel) -> Tuple[Tuple[torch.nn.Module, str], ...]:
    """(module, attribute) of every parameter and buffer of ``kernel``, in :func:`_names` order; collected eagerly
    (at construction) because walking escnn's module tree is not traceable."""
    slots = []
    for prefix, mod in kernel.named_modules():
        slots += [(prefix, mod, n) for n, _ in mod.named_parameters(recurse=False)]
    params = {f"{p}.{n}" if p else n: (m, n) for p, m, n in slots}
    slots = []
    for prefix, mod in kernel.named_modules():
        slots += [(prefix, mod, n) for n, _ in mod.named_buffers(recurse=False)]
    buffers = {f"{p}.{n}" if p else n: (m, n) for p, m, n in slots}
    return tuple(params[n] for n, _ in kernel.named_parameters()) + tuple(buffers[n] for n, _ in kernel.named_buffers())


def kernel_tensors(slots) -> List[Tensor]:
    """The tensors of :func:`tensor_slots`; copies of the running statistics, which the layer updates in place after
    the op (autograd must not see a saved input change)."""
    return [getattr(m, n).clone() if n in _MUTATED else getattr(m, n) for m, n in slots]


def stats_size(kernel) -> int:
    """Length of the flat batch statistics the op returns (0 outside training)."""
    if not (kernel.training and kernel.batch_norm):
        return 0
    return sum(bn.running_mean.numel() + bn.running_var.numel() for bn in kernel.bn)


def unflatten_stats(kernel, flat: Tensor) -> List[Tuple[Tensor, Tensor]]:
    out = []
    p = 0
    for bn in kernel.bn:
        m, v = bn.running_mean.numel(), bn.running_var.numel()
        out.append((flat[p : p + m].reshape(bn.running_mean.shape), flat[p + m : p + m + v]))
        p += m + v
    return out


def _program(key: int, training: bool, tensors: List[Tensor]):
    ref = _REGISTRY.get(key)
    kernel = None if ref is None else ref()
    if kernel is None:
        raise RuntimeError(f"ik_fast::eager_conv: the layer (key {key}) no longer exists")
    if kernel.training != training:
        raise RuntimeError("ik_fast::eager_conv: the kernel's training mode changed after tracing")
    names = _names(kernel)
    if len(names) != len(tensors):
        raise ValueError(f"ik_fast::eager_conv: got {len(tensors)} kernel tensors, the kernel has {len(names)}")
    return torch.func.functional_call(_Lower(kernel), {"kernel." + n: t for n, t in zip(names, tensors)}, ())


def _forward(tensors, x, edge_index, pos_src, pos_dst, delta, attr, n_dst, key, training, backend):
    from ik_fast.graph import check_positions, prepare_graph
    from ik_fast.nn.functional import implicit_point_conv

    program = _program(key, training, tensors)
    graph = prepare_graph(edge_index, x.shape[0], n_dst, x.device)
    if delta is None:
        check_positions(pos_src, "pos", x.shape[0], program.dim)
        check_positions(pos_dst, "pos (receivers)", n_dst, program.dim)
        delta = pos_src[graph.src] - pos_dst[graph.dst]
    out, stats = implicit_point_conv(program, x, graph, delta, attr, n_dst=n_dst, backend=backend)
    flat = [t.reshape(-1) for mv in stats for t in mv]
    return out, (torch.cat(flat) if flat else x.new_zeros(0)).detach().to(x.dtype)


@torch.library.custom_op("ik_fast::eager_conv", mutates_args=())
def eager_conv(
    tensors: List[Tensor],
    x: Tensor,
    edge_index: Tensor,
    pos_src: Optional[Tensor],
    pos_dst: Optional[Tensor],
    delta: Optional[Tensor],
    attr: Optional[Tensor],
    n_dst: int,
    key: int,
    training: bool,
    backend: str,
    out_size: int,
    n_stats: int,
) -> Tuple[Tensor, Tensor]:
    """(out (n_dst, out_size), flat batch statistics (n_stats,)) of the layer registered under ``key``."""
    with torch.no_grad():
        out, stats = _forward(tensors, x, edge_index, pos_src, pos_dst, delta, attr, n_dst, key, training, backend)
    return out.contiguous(), stats


@eager_conv.register_fake
def _(tensors, x, edge_index, pos_src, pos_dst, delta, attr, n_dst, key, training, backend, out_size, n_stats):
    return x.new_empty(n_dst, out_size), x.new_empty(n_stats)


def _inputs(tensors, x, pos_src, pos_dst, delta, attr):
    return list(tensors) + [x] + [t for t in (pos_src, pos_dst, delta, attr) if t is not None]


@torch.library.custom_op("ik_fast::eager_conv_bwd", mutates_args=())
def eager_conv_bwd(
    grad: Tensor,
    tensors: List[Tensor],
    x: Tensor,
    edge_index: Tensor,
    pos_src: Optional[Tensor],
    pos_dst: Optional[Tensor],
    delta: Optional[Tensor],
    attr: Optional[Tensor],
    n_dst: int,
    key: int,
    training: bool,
    backend: str,
) -> List[Tensor]:
    """Gradients of every floating input of :func:`eager_conv` (program tensors, x, then the optional inputs that
    were given), by recomputing the forward under autograd."""
    # an op's implementation runs below the autograd dispatch key: put autograd back for the recomputation
    exclude = torch._C._dispatch_tls_local_exclude_set().remove(torch._C.DispatchKey.AutogradFunctionality)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude), torch.enable_grad():
        leaves = [
            t.detach().requires_grad_(t.is_floating_point()) for t in _inputs(tensors, x, pos_src, pos_dst, delta, attr)
        ]
        it = iter(leaves)
        t2 = [next(it) for _ in tensors]
        x2 = next(it)
        opt = [None if t is None else next(it) for t in (pos_src, pos_dst, delta, attr)]
        out, _ = _forward(t2, x2, edge_index, *opt, n_dst, key, training, backend)
        diff = [t for t in leaves if t.requires_grad]
        grads = torch.autograd.grad(out, diff, grad.to(out.dtype), allow_unused=True, materialize_grads=True)
    g = iter(grads)
    # (an op's outputs must not alias each other: gradients may be views of one buffer, see kernel._Expand)
    return [_own(next(g)) if t.requires_grad else torch.zeros_like(t) for t in leaves]


def _own(t: Tensor) -> Tensor:
    return t.clone(memory_format=torch.contiguous_format) if t._base is not None else t.contiguous()


@eager_conv_bwd.register_fake
def _(grad, tensors, x, edge_index, pos_src, pos_dst, delta, attr, n_dst, key, training, backend):
    return [torch.empty_like(t) for t in _inputs(tensors, x, pos_src, pos_dst, delta, attr)]


def _setup_context(ctx, inputs, output):
    tensors, x, edge_index, pos_src, pos_dst, delta, attr, n_dst, key, training, backend, _, _ = inputs
    ctx.n_params = len(tensors)
    ctx.present = tuple(t is not None for t in (pos_src, pos_dst, delta, attr))
    ctx.args = (n_dst, key, training, backend)
    ctx.save_for_backward(*tensors, x, edge_index, *(t for t in (pos_src, pos_dst, delta, attr) if t is not None))


def _backward(ctx, grad_out, grad_stats):
    saved = list(ctx.saved_tensors)
    tensors, x, edge_index = saved[: ctx.n_params], saved[ctx.n_params], saved[ctx.n_params + 1]
    rest = iter(saved[ctx.n_params + 2 :])
    opt = [next(rest) if p else None for p in ctx.present]
    grads = eager_conv_bwd(grad_out.contiguous(), tensors, x, edge_index, *opt, *ctx.args)
    g = iter(grads)
    g_tensors = [next(g) for _ in tensors]
    g_x = next(g)
    g_opt = [next(g) if p else None for p in ctx.present]
    return (g_tensors, g_x, None, *g_opt, None, None, None, None, None, None)


eager_conv.register_autograd(_backward, setup_context=_setup_context)
