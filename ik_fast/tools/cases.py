"""One benchmark case (a problem, a provider, a mode) built as a step function, with what it costs on paper: the
providers' modelled FLOPs and the structured floor of the layer (the multiply-adds the structured algorithm cannot
avoid). Shared by the benchmark harness (:mod:`ik_fast.tools.bench`) and the work counter
(:mod:`ik_fast.tools.workcount`); it imports neither, and nothing heavy at import (torch and escnn where a case is
built)."""

from __future__ import annotations

from typing import Dict

__all__ = ["MODES", "setup_case", "model_flops", "floor_terms", "program_sizes", "floor_per_edge"]

MODES = ("train", "eval", "inference")


# ----------------------------------------------------------------------------------------------------------------
# the structured floor
# ----------------------------------------------------------------------------------------------------------------
def floor_terms(
    C: int, D: int, G: int, C_in: int, n_layers: int, activation: str = "fourier_elu", gates: int = 0
) -> Dict[str, int]:
    """The structured floor per edge, term by term (multiply-adds): the structured algorithm's forward (hidden
    activations, componentwise hidden Linears, the last layer's contraction) and a backward of twice the forward's
    work. The activation's term ``felu`` (named for the Fourier ELU, whose two grid products cost 2 C D G) is C D for
    the gated nonlinearity (each component times its gate) and 2 C D for the norm one (the squares summed, each
    component scaled); the Linear into a gated layer also makes its ``gates`` per channel (D' = D + gates)."""
    if activation == "gated":
        felu = C * D
    elif activation == "norm":
        felu = 2 * C * D
    else:
        felu = 2 * C * D * G
    Dl = D + (gates if activation == "gated" else 0)
    trunk = (n_layers - 1) * felu + (n_layers - 2) * C * C * Dl + 8 * C * Dl
    fwd = trunk + C * D * C_in
    return {"felu": felu, "trunk": trunk, "fwd": fwd, "floor": 3 * fwd + trunk}


def program_sizes(program) -> Dict[str, int]:
    """(C, D, G, C_in, n_layers) of a lowered :class:`~ik_fast.spec.program.KernelProgram`, as built: C and D from the
    last hidden layer, G from its Fourier grid (``A.shape[0]``; 0 for a pointwise nonlinearity), C_in the layer's
    input size, n_layers = hidden layers + 1."""
    if not program.hidden:
        raise ValueError("the floor is defined for a kernel MLP with hidden layers")
    last = program.hidden[-1]
    shapes = {(h.channels, h.dim, 0 if h.A is None else int(h.A.shape[0])) for h in program.hidden}
    if len(shapes) != 1:
        raise ValueError(f"hidden layers of different sizes {sorted(shapes)}: the floor formula assumes one size")
    G = 0 if last.A is None else int(last.A.shape[0])
    lay = program.layouts[-1]
    return {
        "C": int(last.channels),
        "D": int(last.dim),
        "G": G,
        "C_in": int(program.in_size),
        "n_layers": len(program.hidden) + 1,
        "activation": lay.activation,
        "gates": lay.gates,
    }


def floor_per_edge(program) -> Dict[str, int]:
    """Sizes and floor terms of a program (see :func:`floor_terms`)."""
    s = program_sizes(program)
    return {**s, **floor_terms(s["C"], s["D"], s["G"], s["C_in"], s["n_layers"], s["activation"], s["gates"])}


# ----------------------------------------------------------------------------------------------------------------
# modelled FLOPs
# ----------------------------------------------------------------------------------------------------------------
def _escnn_flops(layer, num_edges: int, mode: str) -> float:
    """escnn's point convolution samples its basis and expands a dense filter for every edge: per edge, for each
    block of fields, (#basis elements) x d_out x d_in multiply-adds per field pair, then the filter-vector product."""
    R, C = layer.out_type.size, layer.in_type.size
    n_pairs = len(layer.out_type) * len(layer.in_type)
    expand = layer.weights.numel() * (R * C) / max(1, n_pairs)
    fwd = num_edges * (expand + R * C)
    return 2.0 * fwd if mode == "inference" else 6.0 * fwd


def model_flops(layer, num_edges: int, num_receivers: int, provider: str, mode: str) -> float:
    """FLOPs (2 x multiply-adds) of the algorithm a provider runs; backward counted as twice the forward's GEMMs,
    plus the recomputation the torch backend does. An estimate from the shapes, not a hardware count."""
    if provider == "escnn":
        return _escnn_flops(layer, num_edges, mode)
    prog = layer.kernel.program()
    if provider == "triton":
        return _triton_flops(prog, num_edges, num_receivers, mode)
    per_edge = 0
    for h in prog.hidden:
        lin = h.linear
        per_edge += lin.plan.macs_per_row if lin.plan is not None else lin.weight.numel()
        if h.A is not None:
            per_edge += 2 * h.channels * h.A.numel()
    R, C, H = prog.out_size, prog.in_size, prog.hidden_size
    if provider == "reference":
        contraction = num_edges * (R * C * H + R * C)
        recompute = 0
    else:
        fin = prog.final
        final_macs = fin.plan.macs_per_row if fin.plan is not None else fin.weight.numel()
        contraction = num_edges * H * C + num_receivers * (final_macs + R * C)
        recompute = contraction
    fwd = num_edges * per_edge + contraction
    if mode == "inference":
        return 2.0 * fwd
    return 2.0 * (3 * fwd + recompute)


def _triton_flops(prog, num_edges: int, num_receivers: int, mode: str, BE: int = 32, BR: int = 16) -> float:
    """Modelled FLOPs of the first (v1) fused kernels, not a count: padded dense GEMMs per edge tile (``BR`` segments
    of a tile of ``BE`` edges; 16 is the usual case when the mean degree is above 2), trunk recomputation in backward
    and the statistics passes of training mode. Stale since the v2 kernels (contraction per receiver block,
    componentwise hidden Linears, one trunk pass per direction), which execute fewer: ``--work`` counts what runs
    (M: 1.84x the floor against this model's v1 6x); records label this column ``flops_source: "model"``."""
    from ik_fast.kernels_triton.launch import _pow2, layout

    packed = prog.op_program([])
    lay = layout(
        prog.sigma.new_empty(0, prog.dim + prog.attr_size), packed.weights, packed.fourier, prog.out_size, prog.dim
    )
    HP, P0P, CP, DP, GP, NL = lay.HP, lay.P0P, lay.CP, lay.DP, lay.GP, lay.NL
    C, R = prog.in_size, prog.out_size
    RP, CINP = _pow2(R), _pow2(C)
    felu = 2 * CP * DP * GP if lay.FOURIER else 0

    def layers(k):  # per-edge multiply-adds of hidden layers 1..k
        return 0 if k == 0 else P0P * HP + (k - 1) * HP * HP + k * felu

    per_tile_contract = C * BR * HP * (BE + RP) + BR * CINP * (BE + RP)
    fwd = num_edges * layers(NL) + num_edges / BE * per_tile_contract
    if mode == "inference":
        return 2.0 * fwd
    stats = num_edges * sum(layers(k) for k in range(1, NL + 1) if prog.hidden[k - 1].bn is not None)
    # backward: trunk, then per layer from the last its recomputation (layers(k)) and two GEMMs as large as its own,
    # and the contraction's gradient (three GEMMs per component against the forward's two)
    bwd = num_edges * (layers(NL) + sum(layers(k) + 2 * (layers(k) - layers(k - 1)) for k in range(1, NL + 1)))
    # the contraction's gradient: d h per component and block, Z of the segments, and the host GEMM Z^T d out
    n_seg = num_receivers + num_edges / BE
    bwd += num_edges * C * HP * (RP + BR) + num_edges * BR * RP + n_seg * C * HP * R
    return 2.0 * (stats + fwd + bwd)


def _floor_macs(p, num_edges: int, mode: str, seed: int = 0, layer=None):
    """The structured floor of one step on ``num_edges`` edges, in multiply-adds: the training step's floor
    per edge (forward, backward, statistics), or the forward's for inference. None when the layer has no floor."""
    from ik_fast.tools.problems import build_layer

    try:
        f = floor_per_edge((layer or build_layer(p, backend="torch", seed=seed)).kernel.program())
    except ValueError:
        return None
    return num_edges * (f["fwd"] if mode == "inference" else f["floor"])


def setup_case(problem: str, provider: str, mode: str, device: str = "cpu", dtype: str = "float32", seed: int = 0):
    """Build one case: returns ``(step, record)`` where ``step()`` runs one forward (and backward unless ``mode`` is
    "inference") and returns the output, and ``record`` describes the case (sizes, model FLOPs)."""
    import torch
    from escnn import nn as enn

    from ik_fast.graph import prepare_graph
    from ik_fast.tools.problems import build_escnn_layer, build_inputs, build_layer, field_types, get_problem

    p = get_problem(problem)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    dt = getattr(torch, dtype)
    torch.manual_seed(seed)
    rec = {
        "problem": p.name,
        "provider": provider,
        "mode": mode,
        "device": device,
        "dtype": dtype,
        "description": p.description,
    }
    x, pos, ei, attr = build_inputs(p, device=device, seed=seed, dtype=dt)
    rec["nodes"], rec["edges"] = int(x.shape[0]), int(ei.shape[1])
    if provider == "escnn":
        layer = build_escnn_layer(p, device=device, seed=seed).to(dt)
        ft = field_types(p)[0]

        def call(xs, ps, at):
            return layer(enn.GeometricTensor(xs, ft, coords=ps), ei).tensor
    else:
        layer = build_layer(p, backend=provider, device=device, seed=seed).to(dt)

        def call(xs, ps, at):
            return layer(xs, ei, edge_attr=at, pos=ps)

    layer.train(mode == "train")
    g = prepare_graph(ei, x.shape[0], x.shape[0], x.device)
    rec["flops"] = model_flops(layer, g.num_edges, int((g.degree > 0).sum()), provider, mode)
    rec["flops_source"] = "model"
    rec["floor_macs"] = _floor_macs(p, g.num_edges, mode, seed, None if provider == "escnn" else layer)
    grad = mode != "inference"

    def step():
        xs, ps, at = (t.clone().requires_grad_(grad) for t in (x, pos, attr))
        if not grad:
            with torch.no_grad():
                return call(xs, ps, at)
        out = call(xs, ps, at)
        out.backward(torch.ones_like(out))
        return out

    step.call = call
    step.inputs = (x, pos, attr)
    return step, rec
