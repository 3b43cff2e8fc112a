"""The fused Triton backend beyond agreement with the reference (that is in test_backends / test_equivariance):
its registered ops (the op layer's ``ik_fast::triton_*``: opcheck, torch.compile, double backward), precision
modes, determinism, tiling corner cases and errors.

Without a GPU the kernels run in the Triton interpreter (conftest sets TRITON_INTERPRET=1), on small graphs."""

import pytest
import torch
from conftest import field_types, get_gspace, rel, small_graph

import ik_fast
from ik_fast import ops
from ik_fast.testing import tolerance

pytest.importorskip("triton")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from ik_fast.kernels_triton import contract as KK  # noqa: E402
from ik_fast.kernels_triton import conv as KC  # noqa: E402
from ik_fast.kernels_triton import launch  # noqa: E402

pytestmark = pytest.mark.skipif(
    "triton" not in ik_fast.available_backends("cpu"), reason="Triton not importable or TRITON_INTERPRET not set"
)


def _conv(name="O3", kind="mixed_attr", dtype=torch.float64, n_layers=3, n_channels=2, **kw):
    gs = get_gspace(name)
    in_t, out_t, attr_t = field_types(gs, kind)
    torch.manual_seed(0)
    conv = ik_fast.ImplicitPointConv(in_t, out_t, attr_t, n_layers=n_layers, n_channels=n_channels, **kw)
    return conv.to(dtype), gs, attr_t


def _inputs(conv, gs, attr_t, n=10, e=40, dtype=torch.float64, seed=0):
    pos, ei = small_graph(n, e, gs.dimensionality, seed=seed, dtype=dtype)
    x = torch.randn(n, conv.in_type.size, dtype=dtype)
    a = None if attr_t is None else torch.randn(e, attr_t.size, dtype=dtype)
    return pos, ei, x, a


def test_block_plan_covers_exactly_the_structure():
    """W''s block plan (kernels_triton/blocks.py), derived from the kernel's structure: its compact blocks hold
    exactly the structural entries at their permuted positions (a round trip through gather and scatter is the
    identity on masked weights), the blocks are few for an equivariant layer, and without a structure every block is
    listed."""
    from ik_fast import structure as ST
    from ik_fast.kernels_triton import blocks as KB

    conv, _, _ = _conv("O3", "mixed_attr")
    kern = conv.kernel
    mask = torch.from_numpy(ST.mask(kern.structure).copy())
    R, H, C = mask.shape
    plan = KB.blocks(kern.structure, mask.shape, kern._rho_size, "cpu")
    assert plan is KB.blocks(str(kern.structure), mask.shape, kern._rho_size, "cpu")  # cached by content
    W = torch.randn(R, H, C, dtype=torch.float64).reshape(-1)
    compact = torch.where(plan.w_idx >= 0, W[plan.w_idx.clamp(min=0)], 0.0)  # what the kernels read
    back = torch.zeros_like(W).index_copy_(0, plan.w_src, compact[plan.w_dst])  # how the gradient goes back
    assert torch.equal(back, W * mask.reshape(-1))  # entries outside the structure are never read
    assert int((plan.w_idx >= 0).sum()) == int(mask.sum())
    B = torch.randn(R * C, dtype=torch.float64)
    padded = torch.where(plan.b_idx >= 0, B[plan.b_idx.clamp(min=0)], 0.0)
    assert torch.equal(torch.zeros_like(B).index_copy_(0, plan.b_src, padded[plan.b_dst]), B)
    dense = KB.blocks(None, (R, H, C), kern._rho_size, "cpu")
    n = lambda k: -(-k // 16)  # noqa: E731
    assert dense.n_blocks == n(R) * n(H) * n(C) and plan.n_blocks < dense.n_blocks
    for p in (plan.perm_h[:H], plan.perm_c[:C], plan.perm_r[:R]):
        assert torch.equal(p.sort().values, torch.arange(p.numel(), dtype=p.dtype))
    with pytest.raises(ValueError, match="structure describes"):
        KB.blocks(kern.structure, (R, H - 1, C), kern._rho_size, "cpu")


def test_float32_and_bfloat16_errors_against_float64():
    conv, gs, attr_t = _conv("O3", "mixed_attr", n_channels=3)
    conv.eval()
    pos, ei, x, a = _inputs(conv, gs, attr_t, n=16, e=80)
    conv.backend = "triton"
    with torch.no_grad():
        ref = conv(x, ei, edge_attr=a, pos=pos)
        c32 = conv.float()
        args32 = (x.float(), ei)
        kw = dict(edge_attr=a.float(), pos=pos.float())
        out32 = c32(*args32, **kw)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out16 = c32(*args32, **kw)
    assert out32.dtype == torch.float32 and out16.dtype == torch.float32
    e32, e16 = rel(out32.double(), ref), rel(out16.double(), ref)
    assert e32 <= tolerance("forward", torch.float32)
    # bfloat16 operands: visibly coarser than float32, still the same layer
    assert tolerance("forward", torch.float32) < e16 <= tolerance("forward", torch.bfloat16)


def test_precision_follows_pytorch_switches():
    assert launch.precision(torch.float64, "cuda") == 0
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        # "highest" on CUDA: launch.HIGHEST_ON_CUDA (IEEE, or 3xTF32: test_tensorcore_emulation), IEEE on the CPU
        assert launch.PREC_NAMES[launch.precision(torch.float32, "cuda")] == launch.HIGHEST_ON_CUDA
        assert launch.precision(torch.float32, "cpu") == 0
        torch.set_float32_matmul_precision("high")
        assert launch.precision(torch.float32, "cuda") == 1
        assert launch.precision(torch.float64, "cuda") == 0
    finally:
        torch.set_float32_matmul_precision(old)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert launch.PREC_NAMES[launch.precision(torch.float32, "cpu")].startswith("bf16")


def _grid_in_reverse(monkeypatch):
    """Make Triton's interpreter run every launch's programs in reverse order (it runs them one after another, in
    order, so a determinism test that never changes the order cannot fail). Returns a counter of reversed grids."""
    import builtins
    import sys

    from triton.runtime import interpreter

    grid_call = interpreter.GridExecutor.__call__.__code__
    reversed_grids = []

    def grid_range(*args):
        r = builtins.range(*args)
        if sys._getframe(1).f_code is grid_call:
            reversed_grids.append(len(r))
            return r[::-1]
        return r

    monkeypatch.setattr(interpreter, "range", grid_range, raising=False)
    return reversed_grids


@triton.jit
def _order_dependent_sum(x_ptr, out_ptr):
    tl.atomic_add(out_ptr, tl.load(x_ptr + tl.program_id(0)))


def test_reversed_program_order_is_visible_to_an_order_dependent_kernel(monkeypatch):
    """The harness of the determinism test can fail: float atomics summed in the other order give other bits."""
    x = torch.tensor([1e8, 1.0, -1e8, 1.0], dtype=torch.float32)
    out = torch.zeros(1, dtype=torch.float32)
    _order_dependent_sum[(4,)](x, out)
    _grid_in_reverse(monkeypatch)
    out_rev = torch.zeros(1, dtype=torch.float32)
    _order_dependent_sum[(4,)](x, out_rev)
    assert float(out) == 1.0 and float(out_rev) == 0.0


def test_training_step_is_bitwise_deterministic_whatever_the_program_order(monkeypatch):
    """Forward, statistics and backward: the same bits when every kernel's programs run in reverse order (no atomics,
    per-program accumulators summed in a fixed order)."""
    conv, gs, attr_t = _conv(dtype=torch.float32)
    conv.train()
    conv.backend = "triton"
    pos, ei, x, a = _inputs(conv, gs, attr_t, n=14, e=90, dtype=torch.float32)
    state = {k: v.clone() for k, v in conv.state_dict().items()}

    def step():
        conv.load_state_dict(state)
        conv.zero_grad()
        xg = x.clone().requires_grad_()
        out = conv(xg, ei, edge_attr=a, pos=pos)
        out.square().sum().backward()
        return [out.detach(), xg.grad] + [p.grad.clone() for p in conv.parameters() if p.grad is not None]

    first = step()
    reversed_grids = _grid_in_reverse(monkeypatch)
    second = step()
    assert len(reversed_grids) >= 3 and max(reversed_grids) > 1  # forward, statistics and backward ran reversed
    for g1, g2 in zip(first, second):
        assert torch.equal(g1, g2)


def test_wide_features_span_several_blocks():
    """More than 16 input components (the bias term goes in blocks of 16) and a hidden layer wider than one GEMM
    block (NG > 1), against the reference in float64, forward and gradients, training mode."""
    gs = get_gspace("O3")
    G = gs.fibergroup
    sphere = G.bl_sphere_representation(L=1)
    in_t = gs.type(*[sphere] * 5 + [G.irrep(1, 0)])  # 21 components (5 x 4 + a pseudoscalar)
    out_t = gs.type(*[sphere] * 2 + [G.irrep(0, 0)] * 3)
    attr_t = gs.type(G.irrep(0, 0), G.irrep(1, 1))
    torch.manual_seed(0)
    conv = ik_fast.ImplicitPointConv(in_t, out_t, attr_t, n_layers=3, n_channels=6).double().train()
    pos, ei, x, a = _inputs(conv, gs, attr_t, n=12, e=50)
    p = conv.kernel.program().op_program([], x.dtype)
    lay = launch.layout(torch.zeros(1, 3 + attr_t.size), p.weights, p.fourier, out_t.size, 3)
    assert lay.HP // lay.GW > 1 and in_t.size > 16
    state = {k: v.clone() for k, v in conv.state_dict().items()}
    res = {}
    for b in ("reference", "triton"):
        conv.load_state_dict(state)
        conv.backend = b
        conv.zero_grad()
        xg = x.clone().requires_grad_()
        out = conv(xg, ei, edge_attr=a, pos=pos)
        (out * torch.cos(torch.arange(out.numel(), dtype=out.dtype)).reshape(out.shape)).sum().backward()
        res[b] = [out.detach(), xg.grad] + [p.grad for p in conv.parameters() if p.grad is not None]
    for r, f in zip(res["reference"], res["triton"]):
        assert rel(f, r) <= tolerance("backward", torch.float64)


def test_contraction_backward_stores_each_per_edge_gradient_once():
    """The contraction's backward sums d hs over a hidden block's pairs and d x over an input block's in registers
    (kernels_triton/contract.py): traced in the interpreter, its kernels store each per-edge gradient element once,
    whatever the number of pairs that share its block. d hs: every edge times every hidden column a pair covers, plus
    the bias term's d s once per input block; d x: every input column a pair covers, plus the bias term's
    read-modify-write of every padded column."""
    import numpy as np

    from ik_fast import structure as ST
    from ik_fast.kernels_triton import blocks as KB
    from ik_fast.tools.sectors import SectorCounter

    gs = get_gspace("O3")
    G = gs.fibergroup
    sphere = G.bl_sphere_representation(L=1)
    in_t = gs.type(*[sphere] * 5 + [G.irrep(1, 0)])  # 21 components: two input blocks
    out_t = gs.type(*[sphere] * 2 + [G.irrep(0, 0)] * 3)
    attr_t = gs.type(G.irrep(0, 0))
    torch.manual_seed(0)
    conv = ik_fast.ImplicitPointConv(in_t, out_t, attr_t, n_layers=3, n_channels=6, backend="triton").double().train()
    pos, ei, x, a = _inputs(conv, gs, attr_t, n=12, e=50)
    kern = conv.kernel
    shape = ST.mask(kern.structure).shape
    plan = KB.blocks(kern.structure, shape, kern._rho_size, "cpu")
    _, H, C = shape
    pairs = plan.pairs.numpy()
    assert np.bincount(pairs[:, 0]).max() >= 2 and np.bincount(pairs[:, 1]).max() >= 2  # blocks shared by pairs
    cover = lambda offsets, n: sum(min(16, n - o) for o in np.unique(offsets))  # noqa: E731
    with SectorCounter(sites=False) as sc:
        conv(x.clone().requires_grad_(), ei, edge_attr=a, pos=pos).sum().backward()
    stored = {name.rsplit(".", 1)[-1]: k["store"]["useful_bytes"] for name, k in sc.per_kernel().items()}
    E, b = ei.shape[1], x.element_size()
    assert stored["contract_dhs_kernel"] == b * E * (cover(pairs[:, 0], H) + plan.n_cblocks)
    assert stored["contract_dx_kernel"] == b * E * (cover(pairs[:, 1], C) + 16 * plan.n_cblocks)


def _sphere_conv(L):
    """An O(3) layer on band-limited sphere features of degree <= L (D = 19 at L = 1, as config M; 51 at L = 2, as
    H), 4 channels, 3 MLP layers, in float64, with its attribute type and inputs (pos, edge_index, x, edge_attr)."""
    gs = get_gspace("O3")
    G = gs.fibergroup
    in_t = gs.type(G.bl_sphere_representation(L=L), G.irrep(0, 0))
    out_t = gs.type(G.bl_sphere_representation(L=L), G.irrep(1, 0))
    attr_t = gs.type(G.irrep(0, 0))
    torch.manual_seed(0)
    conv = ik_fast.ImplicitPointConv(in_t, out_t, attr_t, n_layers=3, n_channels=4).double()
    return conv, attr_t, _inputs(conv, gs, attr_t, n=10, e=40)


@pytest.mark.parametrize(
    "L,matmul,highest", [(1, "high", None), (1, "highest", "tf32x3"), (2, "high", None)]
)  # D = 19 (DP = 32, as config M), D = 51 (DP = 64, as H)
def test_tensor_core_blocks_of_the_trunk_match_the_reference(monkeypatch, L, matmul, highest):
    """In TF32 the statistics and backward trunk kernels take wider hidden blocks than the layout's (so that their
    Fourier GEMMs have 16 rows per warp; the first Linear's blocks run transposed), in 3xTF32 the statistics kernel
    and, at 32 components per channel, the backward on its 2-warp blocks:
    forward and every gradient of a training step in float32 under matmul precision "high" (or "highest" as 3xTF32,
    the GPU's mapping) against the reference in float64 (the interpreter computes the dots in float32). With 64
    components per channel (config H's) the backward's blocks are 32 rows on 2 warps and its Fourier ELU runs in
    chunks of 16 grid points; there also in eval mode."""
    if highest:
        monkeypatch.setenv("IK_FAST_TARGET_DEVICE", "cuda")
        monkeypatch.setenv("IK_FAST_HIGHEST", highest)
    conv, attr_t, (pos, ei, x, a) = _sphere_conv(L)
    conv.train()
    out_t = conv.out_type
    p = conv.kernel.program().op_program([], x.dtype)
    lay = launch.layout(torch.zeros(1, 3 + attr_t.size), p.weights, p.fourier, out_t.size, 3)
    gw, nw = launch.backward_blocks(lay, "tf32")
    assert lay.FOURIER and lay.NL == 2 and lay.DP == 16 * 2**L and gw > lay.GW and (L == 1 or lay.HP // gw == 2)
    # 16 (edge x channel) rows per warp: no MMA computed on two warps
    assert launch.BACKWARD_TILE * (gw // lay.DP) == 16 * nw and nw == (4 if L == 1 else 2)
    assert launch.stats_blocks(lay, "tf32")[0] > lay.GW and launch.backward_blocks(lay, "ieee")[0] == lay.GW
    assert launch.stats_blocks(lay, "tf32x3")[0] > lay.GW
    # 3xTF32's backward: the narrow blocks where they fit (DP = 32), else the layout's
    x3 = launch.backward_blocks(lay, "tf32x3")
    assert x3 == (
        (16 * launch.BACKWARD_NARROW_WARPS * lay.DP // launch.BACKWARD_TILE, 2) if L == 1 else (lay.GW, x3[1])
    )
    state = {k: v.clone() for k, v in conv.state_dict().items()}
    # training (the backward reads the statistics passes' tape) and, at D = 51, eval mode (no tape: the last layer's
    # activation is evaluated apart from its backward on the 2-warp blocks)
    for train in (True, False) if L == 2 else (True,):
        res = {}
        for b in ("reference", "triton"):
            conv.load_state_dict(state)
            conv.backend = b
            dt = torch.float64 if b == "reference" else torch.float32
            conv.to(dt).train(train).zero_grad()
            xg = x.to(dt).clone().requires_grad_()
            old = torch.get_float32_matmul_precision()
            torch.set_float32_matmul_precision(matmul)
            try:
                out = conv(xg, ei, edge_attr=a.to(dt), pos=pos.to(dt))
                w = torch.cos(torch.arange(out.numel(), dtype=dt)).reshape(out.shape)
                (out * w).sum().backward()
            finally:
                torch.set_float32_matmul_precision(old)
            res[b] = [out.detach(), xg.grad] + [q.grad for q in conv.parameters() if q.grad is not None]
        assert len(res["reference"]) == len(res["triton"]) > 4
        for r, f in zip(res["reference"], res["triton"]):
            assert rel(f.double(), r) <= tolerance("backward", torch.float32)


def _raw_inputs(name, n_layers=4, dense=False, n=12, e=40):
    """The raw ops' inputs of a layer with randomised batch norms (their running statistics: eval mode):
    (x, inp, src, rowptr, program)."""
    from ik_fast.graph import prepare_graph

    conv, gs, attr_t = _conv(name, n_layers=n_layers)
    ik_fast.testing.randomize_(conv).eval()
    pos, ei, x, a = _inputs(conv, gs, attr_t, n=n, e=e)
    prog = conv.kernel.program()
    with torch.no_grad():
        p = prog.op_program([], x.dtype, dense=dense)
    g = prepare_graph(ei, n, n, x.device)
    inp = prog.mlp_input(pos[g.src] - pos[g.dst], a)[g.perm].contiguous()
    return x, inp, g.src[g.perm].contiguous(), g.rowptr, p


@pytest.mark.parametrize("name", ["O3", "Oh"])  # Fourier ELUs (componentwise Linears), pointwise ELUs
def test_batch_norm_on_some_layers_with_a_zero_factor(name):
    """The batch norms as the kernels apply them: three hidden layers, the middle one without batch norm (empty
    factor and shift: the identity, and empty gradients), a factor with a zero entry (its gradient is no division by
    it); forward (with and without the statistics pass's pre-batch-norm activation) and every gradient against the
    op's statement."""
    from dataclasses import replace

    x, inp, src, rowptr, p = _raw_inputs(name)
    f0 = p.bn_factor[0].clone()
    f0[0] = 0.0
    none = f0.new_empty(0)
    p = replace(p, bn_factor=[f0, none, p.bn_factor[2]], bn_shift=[p.bn_shift[0], none, p.bn_shift[2]])
    act = ops.trunk_moments("triton", inp, p, len(p.weights), with_activation=True)[1]
    leaf = lambda t: t.detach().clone().requires_grad_()  # noqa: E731
    x, inp = leaf(x), leaf(inp)
    p = replace(
        p,
        **{k: [leaf(t) for t in getattr(p, k)] for k in ("weights", "biases", "bn_factor", "bn_shift")},
        **{k: leaf(getattr(p, k)) for k in ("final_weight", "final_bias", "coef")},
    )
    leaves = [x, inp, *(t for t in p.grad_inputs() if t.numel())]
    ref = ops.conv_reference_form(x, inp, src, rowptr, *p.args())
    w = torch.randn_like(ref)
    want = torch.autograd.grad((ref * w).sum(), leaves)
    for hidden in (None, act):
        out = torch.ops.ik_fast.triton_conv(x, inp, src, rowptr, *p.args(), hidden, None)
        assert rel(out, ref) <= tolerance("forward", torch.float64)
        got = torch.autograd.grad((out * w).sum(), leaves)
        for i, (g, r) in enumerate(zip(got, want)):
            assert rel(g, r) <= tolerance("backward", torch.float64), i
    flat = torch.ops.ik_fast.triton_conv_backward(w, *(t.detach() if torch.is_tensor(t) else t for t in (x, inp)),
                                                  src, rowptr, *p.args())  # fmt: skip
    L = len(p.weights)
    dab, dfac, dshift = flat[2 + 2 * L : 2 + 3 * L], flat[2 + 3 * L : 2 + 4 * L], flat[2 + 4 * L : 2 + 5 * L]
    assert all(t.numel() == 0 for t in dab)  # (no norm layer: empty activation biases)
    assert [tuple(t.shape) for t in dfac] == [tuple(f.shape) for f in p.bn_factor] and dfac[1].numel() == 0
    assert [tuple(t.shape) for t in dshift] == [tuple(t.shape) for t in p.bn_shift] and dshift[1].numel() == 0


@pytest.mark.parametrize("middle_bn", [True, False])
def test_backward_from_the_tape_of_three_layers(middle_bn):
    """conv_backward given a tape (each of three hidden layers' activation before its batch norm, chained statistics
    passes as the host takes them; the middle layer with or without a batch norm) gives every gradient it gives
    without one, where it evaluates the trunk again from the input."""
    from dataclasses import replace

    x, inp, src, rowptr, p = _raw_inputs("O3")
    if not middle_bn:
        none = inp.new_empty(0)
        p = replace(p, bn_factor=[p.bn_factor[0], none, p.bn_factor[2]], bn_shift=[p.bn_shift[0], none, p.bn_shift[2]])
    tape, prev = [], (inp, 0)
    for k in range(1, len(p.weights) + 1):
        act = ops.trunk_moments("triton", prev[0], p, k, with_activation=True, start=prev[1]).activation
        tape += [act, act.new_empty(0)]
        prev = (act, k)
    w = torch.randn(rowptr.shape[0] - 1, p.final_weight.shape[0], dtype=x.dtype)
    without = torch.ops.ik_fast.triton_conv_backward(w, x, inp, src, rowptr, *p.args())
    with_tape = torch.ops.ik_fast.triton_conv_backward(w, x, inp, src, rowptr, *p.args(), tape)
    for i, (u, v) in enumerate(zip(with_tape, without)):
        assert rel(u, v) <= tolerance("backward", torch.float64), i
    tape[0] = tape[0] * 2.0  # (the tape is read: another first activation, other gradients)
    other = torch.ops.ik_fast.triton_conv_backward(w, x, inp, src, rowptr, *p.args(), tape)
    assert rel(other[1], without[1]) > 1e-3


@pytest.mark.parametrize("dense", [True, False])
def test_statistics_pass_from_a_previous_activation(dense):
    """trunk_moments' affine map on its input (in_factor[0], in_shift[0]: the batch norm of the layer that gave the
    input, as a chained statistics pass takes it) and on each given layer's input; dense and componentwise Linears."""
    _, inp, _, _, p = _raw_inputs("O3", dense=dense)
    empty = inp.new_empty(0)
    for start, upto in ((1, 3), (0, 3)):
        f = [p.bn_factor[start - 1] if start else empty, *p.bn_factor[start : upto - 1]]
        t = [p.bn_shift[start - 1] if start else empty, *p.bn_shift[start : upto - 1]]
        h = inp
        if start:
            _, h = ops.trunk_moments_reference_form(
                inp, p.weights[:start], p.biases[:start], p.fourier[:start], p.fourier_inv[:start],
                p.act_bias[:start], [empty, *p.bn_factor[: start - 1]], [empty, *p.bn_shift[: start - 1]],
                p.structure, 0,
            )  # fmt: skip
        layers = [getattr(p, k)[start:upto] for k in ("weights", "biases", "fourier", "fourier_inv", "act_bias")]
        want_m, want_a = ops.trunk_moments_reference_form(h, *layers, f, t, p.structure, start)
        m, act, _ = torch.ops.ik_fast.triton_trunk_moments(h, *layers, f, t, p.structure, start, True, False)
        assert rel(act, want_a) <= tolerance("forward", torch.float64)
        assert rel(m, want_m) <= tolerance("forward", torch.float64)


def test_fourier_padding_is_kept_for_aliases_of_the_same_matrices():
    """The padded Fourier matrices are kept per storage, view and version: a program that passes new aliases of its
    constant matrices each call (``A.detach()``) pads them once; other matrices, or the same ones changed in place,
    are padded again."""
    _, inp, _, _, p = _raw_inputs("O3", n_layers=3)
    none = inp.new_empty(0)
    lay = launch.layout(inp, p.weights, p.fourier, p.final_weight.shape[0], 3)
    args = (p.weights, p.biases, p.bn_factor, p.bn_shift, (none, none))
    pack = launch.packing(lay, *args, p.fourier, p.fourier_inv, "cpu")
    fourier, fourier_inv = [a.clone() for a in p.fourier], [a.clone() for a in p.fourier_inv]
    first = pack.pad_fourier(fourier, fourier_inv, inp.dtype, "cpu")
    alias = lambda ts: [t.detach() for t in ts]  # noqa: E731
    assert pack.pad_fourier(alias(fourier), alias(fourier_inv), inp.dtype, "cpu") is first
    other = pack.pad_fourier([a.clone() for a in fourier], fourier_inv, inp.dtype, "cpu")
    assert other is not first and torch.equal(other, first)
    with torch.no_grad():
        fourier[0].mul_(2.0)
    changed = pack.pad_fourier(alias(fourier), alias(fourier_inv), inp.dtype, "cpu")
    assert changed is not first and not torch.equal(changed, first)


def _step_results(conv, state, x, ei, a, pos, backend, dt):
    conv.load_state_dict(state)
    conv.backend = backend
    conv.to(dt).train().zero_grad()
    xg = x.to(dt).clone().requires_grad_()
    out = conv(xg, ei, edge_attr=a.to(dt), pos=pos.to(dt))
    w = torch.cos(torch.arange(out.numel(), dtype=dt)).reshape(out.shape)
    (out * w).sum().backward()
    return [out.detach(), xg.grad] + [q.grad for q in conv.parameters() if q.grad is not None]


@pytest.mark.parametrize("L", [1, 2])  # D = 19 (DP = 32, as config M), D = 51 (DP = 64, as H)
def test_fourier_matrices_stored_as_the_dots_read_them(monkeypatch, L):
    """The Fourier matrices are only dot operands, so the kernels read them with the bits the dot uses: float16 in TF32
    on tensor cores (here the interpreter under the tensor-core emulation), bfloat16 in bf16. Each copy is the float32
    matrices rounded to nearest, and a training step with it stays within its precision's bound against float64 (TF32:
    its own-error factor of the step with float32 matrices); elsewhere the compute dtype is kept, and matrices outside
    float16's range stay float32."""
    from ik_fast.tools.tensorcore_emulation import TensorCoreEmulation

    f16, bf16, f32, f64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
    assert launch.fourier_storage(f32, "tf32", "cpu") == f32  # the interpreter's dots are IEEE
    assert launch.fourier_storage(f32, "tf32", "cuda") == f16
    assert launch.fourier_storage(f32, "bf16", "cuda") == launch.fourier_storage(f32, "bf16-emulated", "cpu") == bf16
    assert all(launch.fourier_storage(f32, p, "cuda") == f32 for p in ("ieee", "tf32x3"))
    assert launch.fourier_storage(f64, "ieee", "cuda") == f64
    ok = torch.linspace(-3.0, 3.0, 97)
    assert launch._as_float16(ok).dtype == f16
    for scale in (1e5, 1e-6):  # beyond float16's range, or all of it below its normal numbers
        assert launch._as_float16(ok * scale).dtype == f32

    conv, _, (pos, ei, x, a) = _sphere_conv(L)
    state = {k: v.clone() for k, v in conv.state_dict().items()}
    ref = _step_results(conv, state, x, ei, a, pos, "reference", f64)

    def triton_step(store):
        launch._FOURIER.clear()
        if store is not None:  # force the matrices' storage
            monkeypatch.setattr(launch, "fourier_storage", lambda *args: store)
        try:
            res = _step_results(conv, state, x, ei, a, pos, "triton", f32)
        finally:
            monkeypatch.undo()
        return res, {v[1].dtype: v[1] for v in launch._FOURIER.values()}  # the matrices, per storage dtype

    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        with TensorCoreEmulation():
            half, bufs = triton_step(None)
            assert set(bufs) == {f16, f32}  # (the forward-only trunk kernel reads float32 ones)
            full, kinds = triton_step(f32)
            assert set(kinds) == {f32}
    finally:
        torch.set_float32_matmul_precision(old)
    # the float16 copy is the float32 matrices rounded to nearest (exactly), and the step with it is within TF32's
    # own-error factor of the step with float32 matrices (not a ratio of summed errors: that depends on how many of
    # the matrices' entries fall below float16's normal numbers, which escnn's numerical bases do not fix)
    assert torch.equal(bufs[f16], bufs[f32].to(f16))
    e_half = [rel(f.double(), r) for f, r in zip(half, ref)]
    e_full = [rel(f.double(), r) for f, r in zip(full, ref)]
    assert len(e_half) == len(ref) > 4
    assert max(e_half) <= tolerance("own_error", "tf32") * max(e_full), (e_half, e_full)
    assert any(h != f for h, f in zip(e_half, e_full))  # the float16 matrices were read
    if L == 1:  # bf16 (CPU autocast): the bfloat16 copy is the float32 matrices rounded to nearest, as a GPU's dot
        # rounds its float32 operands (so there the step is bitwise the same; the interpreter's conversion truncates,
        # so here it is not), and the step stays within bf16's bound
        with torch.autocast("cpu", dtype=torch.bfloat16):
            b16, bufs = triton_step(None)
            assert set(bufs) == {bf16, f32}
        assert torch.equal(bufs[bf16], bufs[f32].to(bf16))
        e16 = [rel(f.double(), r) for f, r in zip(b16, ref)]
        assert max(e16) <= tolerance("forward", torch.bfloat16), e16


def test_hub_over_many_edge_chunks_and_tile_sizes(monkeypatch):
    """A receiver with 150 in-edges (5 segments of 32 in the contraction kernels, in a block with degree-0 and
    degree-1 receivers), receivers without edges, and trunk tiles of 16 and 32 edges."""
    conv, gs, attr_t = _conv("C8", "mixed_attr")
    conv.train()
    n = 200
    pos = torch.randn(n, 2, dtype=torch.float64)
    hub = torch.stack([torch.arange(1, 151), torch.zeros(150, dtype=torch.long)])
    single = torch.stack([torch.arange(0, 60), torch.arange(100, 160)])
    ei = torch.cat([hub, single], 1)
    x = torch.randn(n, conv.in_type.size, dtype=torch.float64)
    a = torch.randn(ei.shape[1], attr_t.size, dtype=torch.float64)
    for be in (16, 32):
        monkeypatch.setattr(launch, "tile_size", lambda device, hidden=0, be=be: be)
        outs = {}
        for b in ("torch", "triton"):
            conv.backend = b
            xg = x.clone().requires_grad_()
            out = conv(xg, ei.clone(), edge_attr=a, pos=pos)
            conv.zero_grad()
            out.square().sum().backward()
            outs[b] = [out.detach(), xg.grad] + [p.grad for p in conv.parameters() if p.grad is not None]
        for r, f in zip(outs["torch"], outs["triton"]):
            assert rel(f, r) <= tolerance("backward", torch.float64)


def test_receiver_segments_cover_every_receiver_and_split_hubs():
    """The contraction's receiver segments (kernels_triton/contract.split_receivers_kernel): each receiver's edges
    exactly, in order, in pieces of at most SEGMENT (a hub over several programs), one empty segment per receiver
    without edges, the unused tail empty and masked."""
    deg = torch.tensor([0, 3, 150, 64, 65, 0, 1, 200, 0])
    rowptr = torch.cat([torch.zeros(1, dtype=torch.long), deg.cumsum(0)])
    E, S = int(rowptr[-1]), launch.SEGMENT
    vptr, rid, segptr, n_v = launch._segments(rowptr, E)
    assert n_v == deg.shape[0] + E // S and launch._segments(rowptr, E)[0] is vptr  # kept for the backward
    lengths = vptr.diff()
    for r, d in enumerate(deg.tolist()):
        a, b = int(segptr[r]), int(segptr[r + 1])
        assert b - a == max(1, -(-d // S))
        assert int(vptr[a]) == int(rowptr[r]) and int(vptr[b]) == int(rowptr[r + 1])
        assert bool((rid[a:b] == r).all()) and bool((lengths[a:b] <= S).all())
    tail = int(segptr[-1])
    assert bool((rid[tail:] == deg.shape[0]).all()) and bool((vptr[tail:] == E).all())


@triton.jit
def _offsets_probe(out_ptr, rowptr_ptr, rid_ptr, t, HC, CINC, RC, BE: tl.constexpr, BN: tl.constexpr):
    """The kernels' own index arithmetic, stored instead of dereferenced: trunk tile edges and their (E, H) row
    offsets, a receiver block's edge ids and their row offsets."""
    offs = KC._tile_edges(t, BE)
    tl.store(out_ptr + tl.arange(0, BE), offs)
    tl.store(out_ptr + BE + tl.arange(0, BE), offs * 1024)  # a row offset into an (E, 1024) buffer
    v, i, imask, start, deg, nmax = KK._segments(rowptr_ptr, rid_ptr, 0, 1, 1, BN)
    e, emask = KK._edges(start, deg, 0, BN)
    tl.store(out_ptr + 2 * BE + tl.arange(0, BN), tl.sum(tl.where(emask, e, 0), 0))
    tl.store(out_ptr + 2 * BE + BN + tl.arange(0, BN), tl.sum(tl.where(emask, e * HC, 0), 0))


def test_index_arithmetic_is_int64_past_2_31():
    """Offsets past 2^31 elements stay exact (the kernels compute edge ids and row offsets in int64): a tile whose
    edges start at 2^31, their rows of a 1,024-wide buffer, and a receiver whose edges start at 3 x 2^31."""
    BE, BN = 16, 16
    big = 3 * 2**31
    rowptr = torch.tensor([big, big + 5] + [big + 5] * BN, dtype=torch.int64)
    out = torch.zeros(2 * BE + 2 * BN, dtype=torch.int64)
    _offsets_probe[(1,)](out, rowptr, torch.zeros(BN, dtype=torch.int32), 2**31 // BE, 1024, 16, 16, BE=BE, BN=BN)
    first = torch.arange(BE, dtype=torch.int64) + 2**31
    assert torch.equal(out[:BE], first)
    assert torch.equal(out[BE : 2 * BE], first * 1024)
    k = torch.arange(BN, dtype=torch.int64)
    assert torch.equal(out[2 * BE : 2 * BE + BN], torch.where(k < 5, big + k, 0))  # receiver 0 has 5 edges
    assert torch.equal(out[2 * BE + BN :], torch.where(k < 5, (big + k) * 1024, 0))


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    conv, gs, attr_t = _conv(dtype=torch.float32)
    conv.eval()
    pos, ei, x, a = _inputs(conv, gs, attr_t, dtype=torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    conv.backend = "triton"
    with pytest.raises(RuntimeError, match="backend 'triton' does not run here: .*run on CUDA devices"):
        conv(x, ei, edge_attr=a, pos=pos)
    assert "triton" not in ik_fast.available_backends("cpu")
    assert ik_fast.backends.resolve_backend("auto", "cpu") in ("torch", "native")  # never triton on CPU


def test_failed_implementation_keeps_its_reason():
    def broken():
        raise ImportError("libfoo.so: cannot open shared object file")

    ops.register_implementation(ops.Implementation("broken_impl_for_test", broken, lambda device: None))
    why = ops.status("broken_impl_for_test", "cpu")
    assert "ImportError" in why and "libfoo.so" in why
    assert ops.status("no_such_impl", "cpu").startswith("no implementation named")


def test_auto_uses_torch_until_a_gpu_benchmark_shows_a_fused_backend_faster():
    import ik_fast.backends as B

    B._warned.clear()
    with pytest.warns(RuntimeWarning, match="'auto' uses 'torch' on cuda .*triton: "):
        assert B.resolve_backend("auto", "cuda") == "torch"
    assert B.resolve_backend("auto", "cpu") == ("native" if "native" in ik_fast.available_backends("cpu") else "torch")


# ----------------------------------------------------------------------------------------------------------------
# the gated and norm nonlinearities (kernels_triton/irreps.py)
# ----------------------------------------------------------------------------------------------------------------
def _irrep_inputs(kind, n_channels, dense=False, n_layers=4, n=12, e=40, dtype=torch.float64):
    """The raw ops' inputs of a gated or norm layer with randomised batch norms and norm biases: (x, inp, src,
    rowptr, program)."""
    from ik_fast.graph import prepare_graph

    conv, gs, attr_t = _conv("O3", n_layers=n_layers, n_channels=n_channels, nonlinearity=kind, dtype=dtype)
    ik_fast.testing.randomize_(conv).eval()
    if kind == "norm":
        with torch.no_grad():
            for b in conv.kernel.act_bias:
                b.copy_(torch.randn_like(b))
    pos, ei, x, a = _inputs(conv, gs, attr_t, n=n, e=e, dtype=dtype)
    prog = conv.kernel.program()
    with torch.no_grad():
        p = prog.op_program([], x.dtype, dense=dense)
    g = prepare_graph(ei, n, n, x.device)
    inp = prog.mlp_input(pos[g.src] - pos[g.dst], a)[g.perm].contiguous()
    return x, inp, g.src[g.perm].contiguous(), g.rowptr, p


def _check_conv_against_statement(x, inp, src, rowptr, p, hidden=None):
    """conv (given the last layer's activation or not) and every gradient of the op against its statement."""
    from dataclasses import replace

    leaf = lambda t: t.detach().clone().requires_grad_()  # noqa: E731
    x, inp = leaf(x), leaf(inp)
    p = replace(
        p,
        **{k: [leaf(t) for t in getattr(p, k)] for k in ("weights", "biases", "act_bias", "bn_factor", "bn_shift")},
        **{k: leaf(getattr(p, k)) for k in ("final_weight", "final_bias", "coef")},
    )
    leaves = [x, inp, *(t for t in p.grad_inputs() if t.numel())]
    ref = ops.conv_reference_form(x, inp, src, rowptr, *p.args())
    w = torch.randn_like(ref)
    want = torch.autograd.grad((ref * w).sum(), leaves)
    out = torch.ops.ik_fast.triton_conv(x, inp, src, rowptr, *p.args(), hidden, None)
    assert rel(out, ref) <= tolerance("forward", torch.float64)
    got = torch.autograd.grad((out * w).sum(), leaves)
    for i, (g, r) in enumerate(zip(got, want)):
        assert torch.isfinite(g).all() and rel(g, r) <= tolerance("backward", torch.float64), i
    return got


@pytest.mark.parametrize("kind", ["gated", "norm"])
@pytest.mark.parametrize("n_channels,dense", [(3, False), (16, False), (2, True)])
def test_gated_and_norm_kernels_match_the_statement(kind, n_channels, dense):
    """Three hidden layers, the middle one without batch norm and a zero batch-norm factor; componentwise Linears
    over 3 channels (padded to 4), 8 (two components per block-diagonal dot) and 16, and dense ones: the statistics
    pass of every layer, conv (with and without the last activation) and every gradient (the norm biases' included)
    against the op's statement."""
    from dataclasses import replace

    x, inp, src, rowptr, p = _irrep_inputs(kind, n_channels, dense=dense)
    layers = ik_fast.structure.decode(p.structure).layers
    assert all(h.activation == kind for h in layers) and all(w.dim() == (2 if dense else 3) for w in p.weights[1:])
    f0 = p.bn_factor[0].clone()
    f0[0] = 0.0
    none = f0.new_empty(0)
    p = replace(p, bn_factor=[f0, none, p.bn_factor[2]], bn_shift=[p.bn_shift[0], none, p.bn_shift[2]])
    for upto in (1, 2, 3):
        m, act, grid = ops.trunk_moments("triton", inp, p, upto, with_activation=True)
        want_m, want_a = ops.trunk_moments_reference_form(
            inp, *(getattr(p, k)[:upto] for k in ("weights", "biases", "fourier", "fourier_inv", "act_bias")),
            [none, *p.bn_factor[: upto - 1]], [none, *p.bn_shift[: upto - 1]], p.structure, 0,
        )  # fmt: skip
        assert rel(act, want_a) <= tolerance("forward", torch.float64)
        assert rel(m, want_m) <= tolerance("forward", torch.float64) and grid.numel() == 0
    for hidden in (None, act):
        grads = _check_conv_against_statement(x, inp, src, rowptr, p, hidden)
    if kind == "norm":  # the norm biases' gradients (after the weights' and biases': every one non-empty)
        L = len(p.weights)
        assert all(float(g.abs().sum()) > 0 for g in grads[2 + 2 * L : 2 + 3 * L])


def test_norm_of_an_unreachable_irrep_has_a_finite_gradient():
    """An irrep that the first Linear cannot reach is exactly zero: d|v|/dv is taken as 0 there (the Jacobian is
    sigmoid(-bias)), so no gradient is NaN and all agree with the statement."""
    x, inp, src, rowptr, p = _irrep_inputs("norm", 3)
    h = ik_fast.structure.decode(p.structure).layers[0]
    start = next(sum(s for s, _ in h.irreps[:i]) for i, (s, t) in enumerate(h.irreps) if not t)
    size = next(s for s, t in h.irreps if not t)
    rows = torch.cat([torch.arange(start, start + size) + c * h.components for c in range(h.channels)])
    w0, b0 = p.weights[0].clone(), p.biases[0].clone()
    w0[rows] = 0.0
    b0[rows] = 0.0
    from dataclasses import replace

    p = replace(p, weights=[w0, *p.weights[1:]], biases=[b0, *p.biases[1:]])
    _check_conv_against_statement(x, inp, src, rowptr, p)


def test_gated_and_norm_refusals_name_what_is_missing():
    _, inp, _, _, p = _irrep_inputs("gated", 2, n_layers=3)
    with pytest.raises(NotImplementedError, match="chained statistics.*'gated'"):
        ops.trunk_moments("triton", inp.new_zeros(inp.shape[0], p.bn_shift[0].numel()), p, 2, start=1)
    from dataclasses import replace

    bad = replace(p, act_bias=[inp.new_zeros(3), *p.act_bias[1:]])
    with pytest.raises(ValueError, match=r"act_bias\[0\] has 3 elements"):
        ops.trunk_moments("triton", inp, bad, 1)


@pytest.mark.parametrize("kind", ["gated", "norm"])
def test_gated_and_norm_training_steps_are_bitwise_deterministic(monkeypatch, kind):
    """As test_training_step_is_bitwise_deterministic_whatever_the_program_order, through the gated and norm
    kernels (componentwise Linears of 8 channels)."""
    conv, gs, attr_t = _conv(dtype=torch.float32, n_channels=8, nonlinearity=kind)
    conv.train()
    conv.backend = "triton"
    pos, ei, x, a = _inputs(conv, gs, attr_t, n=14, e=90, dtype=torch.float32)
    state = {k: v.clone() for k, v in conv.state_dict().items()}

    def step():
        conv.load_state_dict(state)
        conv.zero_grad()
        xg = x.clone().requires_grad_()
        out = conv(xg, ei, edge_attr=a, pos=pos)
        out.square().sum().backward()
        return [out.detach(), xg.grad] + [p.grad.clone() for p in conv.parameters() if p.grad is not None]

    first = step()
    reversed_grids = _grid_in_reverse(monkeypatch)
    second = step()
    assert len(reversed_grids) >= 3 and max(reversed_grids) > 1
    for g1, g2 in zip(first, second):
        assert torch.equal(g1, g2)
