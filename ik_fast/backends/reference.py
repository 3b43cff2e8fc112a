"""The reference backend: evaluate the kernel of every edge, then contract it with the source features.

This is the research code's algorithm in plain PyTorch, the oracle of every test and the baseline of every benchmark.
It holds an (E, C_out, C_in) tensor of kernels; only in eval mode without gradients does it go over the edges in
chunks to bound memory (never in training, where chunks would change the batch statistics).
"""

from __future__ import annotations

import torch

from ik_fast import ops
from ik_fast.graph import Graph
from ik_fast.spec.program import KernelProgram

EVAL_CHUNK = 16384


def implicit_conv_reference(program: KernelProgram, x_src, graph: Graph, delta, attr):
    """out (n_dst, C_out) = sum over edges j -> i of K(delta_e, attr_e) x_j, and the batch statistics used: the op
    layer's statement of the layer (:func:`ik_fast.ops.messages_reference_form`)."""
    out = x_src.new_zeros(graph.n_dst, program.out_size)
    E = graph.num_edges
    if E == 0:
        return out, []
    chunked = not torch.is_grad_enabled() and not program.needs_batch_stats
    step = EVAL_CHUNK if chunked else E
    stats: list = []
    args = program.op_program([], dense=True).args()
    inp = program.mlp_input(delta, attr)
    for start in range(0, E, step):
        sl = slice(start, start + step)
        msg = ops.messages_reference_form(
            x_src[graph.src[sl]], inp[sl], *args, affines=program.batch_affines(None, stats), masked=False
        )
        out = out.index_add(0, graph.dst[sl], msg.to(out.dtype))  # (bfloat16 under autocast)
    return out, stats
