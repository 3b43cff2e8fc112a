"""The ``torch`` backend: the factorised algorithm in plain PyTorch (levers 1 and 2 of the design notes).

The last Linear of the kernel MLP is linear in the hidden activation h_e, so per receiver i

    out_i = W' vec(Z_i) + B' z_i,    Z_i = sum_{e: j -> i} s_e h_e (x) x_j  (H x C_in),   z_i = sum_e s_e x_j,

and no (E, C_out, C_in) kernel is ever formed. The MLP trunk (everything before the last Linear) runs once over all
edges, as in the reference, so batch norm sees the statistics of the whole call; every Linear uses its block plan
(the equivariant block structure) where the program has one. The contraction then goes over chunks of receivers of
similar in-degree (edges padded to a common degree, so Z is one batched GEMM per chunk, and a hub of high degree gets
a chunk of its own). Each chunk is checkpointed: its Z exists only while that chunk is computed, in forward and again
in backward. Without autograd and batch statistics (inference), the trunk too is evaluated chunk by chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ik_fast import ops
from ik_fast.graph import Graph
from ik_fast.spec.program import KernelProgram, Linear


def _apply(x, lin: Linear, _bias=None):
    """``x W^T + b`` through the block plan where there is one (``_bias``: unused, the Linear holds its own)."""
    if lin.plan is None:
        # x @ W^T with W^T materialised: autograd then forms the weight gradient as x^T @ grad, a GEMM shape that
        # BLAS runs ~15x faster than grad^T @ x when the input is narrow (the first layer's n + A columns)
        y = x @ lin.weight.t().contiguous()
    else:
        y = lin.plan.apply(x, lin.plan.gather(lin.weight))
    return y if lin.bias is None else y + lin.bias


class _FourierELU(torch.autograd.Function):
    """``ELU(x A^T) Ainv^T`` per channel, saving only its input x (E, C, d): the backward recomputes ``x A^T`` (one
    small GEMM) instead of keeping the activation on the grid, which is grid/d times larger (2.4x for O(3)'s
    120-point grid). Both directions go over edge chunks so that the grid activation exists for one chunk at a time.
    The backward is made of differentiable operations, so double backward works."""

    CHUNK = 8192

    @staticmethod
    def forward(ctx, x, A, Ainv):
        ctx.save_for_backward(x, A, Ainv)
        n = _FourierELU.CHUNK
        if x.shape[0] <= n:
            return F.elu(x @ A.t(), inplace=True) @ Ainv.t()
        out = x.new_empty(*x.shape[:-1], Ainv.shape[0])
        for s in range(0, x.shape[0], n):
            torch.matmul(F.elu(x[s : s + n] @ A.t(), inplace=True), Ainv.t(), out=out[s : s + n])
        return out

    @staticmethod
    def backward(ctx, grad):
        x, A, Ainv = ctx.saved_tensors
        # the backward runs outside autocast: compute in the dtype the forward saw (bfloat16 under autocast)
        A, Ainv, grad = A.to(x.dtype), Ainv.to(x.dtype), grad.to(x.dtype)
        parts = []
        for s in range(0, x.shape[0], _FourierELU.CHUNK):
            u = x[s : s + _FourierELU.CHUNK] @ A.t()
            g = grad[s : s + _FourierELU.CHUNK] @ Ainv
            g = torch.ops.aten.elu_backward(g, 1.0, 1, 1, False, u)  # g * ELU'(u), itself differentiable
            parts.append(g @ A)
        return (parts[0] if len(parts) == 1 else torch.cat(parts)), None, None


def _activate(y, A, Ainv, bias=None, layout=None):
    """Linear output -> activation (E, C * D): the Fourier ELU through :class:`_FourierELU`; the gated and norm
    nonlinearities (elementwise, no grid) as the op layer states them."""
    if layout is not None and layout.activation in ("gated", "norm"):
        return ops.activation_reference_form(y, A, Ainv, bias, layout)
    if A is None:
        return F.elu(y)
    x = y.reshape(y.shape[0], -1, A.shape[1])
    return _FourierELU.apply(x, A, Ainv).reshape(y.shape[0], -1)


def _trunk(program: KernelProgram, delta, attr):
    """(h, stats): the last hidden activation and the batch statistics used — the op layer's statement of the trunk
    (:func:`ik_fast.ops.trunk_reference_form`) with this backend's Linears (block plans) and Fourier ELU."""
    used: list = []
    hid = program.hidden
    h = ops.trunk_reference_form(
        program.mlp_input(delta, attr),
        [layer.linear for layer in hid],
        [None] * len(hid),
        [layer.A for layer in hid],
        [layer.Ainv for layer in hid],
        affines=program.batch_affines(None, used),
        linear=_apply,
        activation=_activate,
        act_bias=[layer.act_bias for layer in hid],
        layouts=program.layouts,
    )
    return h, used


def _input_groups(program: KernelProgram, x):
    """Source features (E, C_in) -> per input field group of the last layer's plan, (E, d_i * F_i) with columns in
    (component b, field f) order, so that Z computed from them is already component-major."""
    c_h, d_h = program.hidden_layout
    out = []
    for cg in program.final.plan.col_groups:
        f_i = cg.shape[0]
        d_i = cg.shape[1] // (c_h * d_h)
        g = cg[:, :d_i]  # (F_i, d_i): the group's input columns (hidden channel 0, component 0)
        if f_i * d_i == program.in_size:  # a single group of fields
            xg = x.reshape(x.shape[0], f_i, d_i).transpose(1, 2)
        else:
            xg = x[:, g.t()]
        out.append((xg.reshape(x.shape[0], -1), f_i))
    return out


def _contract(program: KernelProgram, final, blocks, chunk, h, s, x):
    """Outputs (n_r, C_out) of a chunk's receivers from its edges' hidden activations h, radial factors s and source
    features x, in the chunk's edge order."""
    n_r, D = chunk.receivers.numel(), chunk.degree
    hs = h * s[:, None]
    if chunk.slot is not None:
        hs = hs.new_zeros(n_r * D, hs.shape[1]).index_copy(0, chunk.slot, hs)
        x = x.new_zeros(n_r * D, x.shape[1]).index_copy(0, chunk.slot, x)
        s = s.new_zeros(n_r * D).index_copy(0, chunk.slot, s)
    x = x.reshape(n_r, D, -1)
    hsT = hs.reshape(n_r, D, -1).transpose(1, 2)  # (n_r, H, D)
    if final.plan is None:
        y = torch.bmm(hsT, x).reshape(n_r, -1) @ final.weight.t()  # Z (n_r, H, C_in), flattened
    else:
        zs = []  # per field group, Z (n_r, H * d_i, F_i): component-major as the plan expects
        for xg, f_i in _input_groups(program, x.reshape(n_r * D, -1)):
            zs.append(torch.bmm(hsT, xg.reshape(n_r, D, -1)).reshape(n_r, -1, f_i))
        y = final.plan.merge(final.plan.apply_split(zs, blocks))
    if final.bias is not None:
        z = torch.bmm(s.reshape(n_r, 1, D), x).squeeze(1)  # (n_r, C_in)
        y = y + z @ final.bias.reshape(program.out_size, program.in_size).t()
    return y


def _final_layer(program: KernelProgram):
    """The last Linear and its plan's blocks (gathered before a checkpointed region reads them: recomputation must
    see the same operations as the first pass)."""
    final = program.final
    return final, (None if final.plan is None else final.plan.gather(final.weight))


def _chunk_inference(program: KernelProgram, final, blocks, chunk, x_src, src, delta, attr):
    d = delta[chunk.eid]
    h, _ = _trunk(program, d, None if attr is None else attr[chunk.eid])
    s = program.shell(d)
    return _contract(program, final, blocks, chunk, h, s, x_src[src[chunk.eid]])


def implicit_conv_torch(program: KernelProgram, x_src, graph: Graph, delta, attr):
    """Same contract as :func:`~ik_fast.backends.reference.implicit_conv_reference`."""
    out = x_src.new_zeros(graph.n_dst, program.out_size)
    if graph.num_edges == 0:
        return out, []
    chunks = graph.chunks(program.hidden_size, program.in_size)
    grad = torch.is_grad_enabled()
    ys = []
    stats = []
    if grad or program.needs_batch_stats:
        # all edges in chunk order, so that each chunk's edges are one piece of a split (whose backward is one cat)
        order = graph.chunk_order(program.hidden_size, program.in_size)
        delta, attr = delta[order], None if attr is None else attr[order]
        h, stats = _trunk(program, delta, attr)
        final, blocks = _final_layer(program)
        s = program.shell(delta)
        sizes = chunks.sizes()
        pieces = zip(chunks, h.split(sizes), s.split(sizes), x_src[graph.src[order]].split(sizes))
        for chunk, h_c, s_c, x_c in pieces:
            if grad:
                ys.append(checkpoint(_contract, program, final, blocks, chunk, h_c, s_c, x_c, use_reentrant=False))
            else:
                ys.append(_contract(program, final, blocks, chunk, h_c, s_c, x_c))
    else:  # inference: the trunk too goes chunk by chunk; eval-mode batch norm is a fixed affine map
        final, blocks = _final_layer(program)
        ys = [_chunk_inference(program, final, blocks, chunk, x_src, graph.src, delta, attr) for chunk in chunks]
    recv = chunks.receivers  # every receiver with edges, chunk after chunk
    return out.index_copy(0, recv, torch.cat(ys).to(out.dtype)), stats  # (bfloat16 under autocast)
