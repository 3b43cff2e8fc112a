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
from torch.utils.checkpoint import checkpoint

from ..graph import Graph
from ..program import KernelProgram


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


def _contract(program: KernelProgram, final, chunk, h, s, x):
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
        y = final.plan.merge(final.plan.apply_split(zs, final.blocks))
    if final.bias is not None:
        z = torch.bmm(s.reshape(n_r, 1, D), x).squeeze(1)  # (n_r, C_in)
        y = y + z @ final.bias.reshape(program.out_size, program.in_size).t()
    return y


def _final_layer(program: KernelProgram, pending):
    """The last Linear, with the last hidden layer's batch norm folded in."""
    if pending is None:
        return program.final.with_blocks()
    return program.final.fold(*pending, inner=program.in_size).with_blocks()


def _chunk_inference(program: KernelProgram, final, chunk, x_src, src, delta, attr):
    d = delta[chunk.eid]
    h, _, _ = program.trunk(d, None if attr is None else attr[chunk.eid], structured=True)
    s = program.shell(d)
    return _contract(program, final, chunk, h, s, x_src[src[chunk.eid]])


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
        h, stats, pending = program.trunk(delta, attr, structured=True)
        final = _final_layer(program, pending)
        s = program.shell(delta)
        sizes = chunks.sizes()
        pieces = zip(chunks, h.split(sizes), s.split(sizes), x_src[graph.src[order]].split(sizes))
        for chunk, h_c, s_c, x_c in pieces:
            if grad:
                ys.append(checkpoint(_contract, program, final, chunk, h_c, s_c, x_c, use_reentrant=False))
            else:
                ys.append(_contract(program, final, chunk, h_c, s_c, x_c))
    else:  # inference: the trunk too goes chunk by chunk; eval-mode batch norm is a fixed affine map
        last_bn = program.hidden[-1].bn if program.hidden else None
        final = _final_layer(program, None if last_bn is None else last_bn.affine(None))
        ys = [_chunk_inference(program, final, chunk, x_src, graph.src, delta, attr) for chunk in chunks]
    recv = chunks.receivers  # every receiver with edges, chunk after chunk
    return out.index_copy(0, recv, torch.cat(ys).to(out.dtype)), stats  # (bfloat16 under autocast)
