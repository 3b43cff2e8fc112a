"""The reference backend: evaluate the kernel of every edge, then contract it with the source features.

This is the research code's algorithm in plain PyTorch, the oracle of every test and the baseline of every benchmark.
It holds an (E, C_out, C_in) tensor of kernels; only in eval mode without gradients does it go over the edges in
chunks to bound memory (never in training, where chunks would change the batch statistics).
"""

from __future__ import annotations

import torch

from ..graph import Graph
from ..program import KernelProgram

EVAL_CHUNK = 16384


def _messages(program: KernelProgram, x_src, graph: Graph, delta, attr, sl=slice(None)):
    h, stats = program.trunk(delta[sl], None if attr is None else attr[sl])
    k = program.kernel_from_hidden(h, program.shell(delta[sl]))  # (E, C_out, C_in)
    msg = torch.bmm(k, x_src[graph.src[sl]].unsqueeze(-1)).squeeze(-1)
    return msg, stats


def implicit_conv_reference(program: KernelProgram, x_src, graph: Graph, delta, attr):
    """out (n_dst, C_out) = sum over edges j -> i of K(delta_e, attr_e) x_j, and the batch statistics used."""
    out = x_src.new_zeros(graph.n_dst, program.out_size)
    E = graph.num_edges
    if E == 0:
        return out, []
    chunked = not torch.is_grad_enabled() and not program.needs_batch_stats
    step = EVAL_CHUNK if chunked else E
    stats = []
    for start in range(0, E, step):
        sl = slice(start, start + step)
        msg, stats = _messages(program, x_src, graph, delta, attr, sl)
        out = out.index_add(0, graph.dst[sl], msg.to(out.dtype))  # (bfloat16 under autocast)
    return out, stats
