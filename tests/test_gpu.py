"""GPU tests (marker ``gpu``; ``pytest -m gpu``): what is particular to CUDA. On CUDA where there is a GPU; skipped
without one, except under ``IK_FAST_TEST_DEVICE=cpu`` (``benchmarks/run_gpu.sh --rehearse``): the same tests then run
on the CPU at small sizes, one group each, Triton in its interpreter, so that an error in them shows here rather than
on a lent GPU.

The implementations' agreement with the reference, their gradients, double backward, determinism, ``opcheck`` and
compilation on CUDA are the conformance suite's (``tests/test_conformance.py``, whose CUDA cases carry the ``gpu``
marker too). Here: the torch backend and equivariance on the device, the native extension's CUDA part, the
implementations at GPU sizes (a receiver with thousands of edges, H's width) and at GPU precisions (TF32, bfloat16
under autocast), and Triton's peak memory. Every bound comes from the tolerance table
(:func:`ik_fast.testing.tolerance`); TF32 and bfloat16 are bounded by a factor of the error the reference backend itself
makes at that precision.

Order: within ``-m gpu`` the tests of the Triton backend run last (its first call of each configuration compiles; see
``tests/conftest.py``), so that a run cut short by its time limit has the most answers."""

import copy
import functools

import pytest
import torch
from conftest import GPU_TEST_DEVICE, field_types, get_gspace, rel

import ik_fast
from ik_fast import ops
from ik_fast.backends import FUSED
from ik_fast.testing import group_family, tolerance

DEV = GPU_TEST_DEVICE or "cuda"
ON_CUDA = torch.device(DEV).type == "cuda"
F64 = torch.float64
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        GPU_TEST_DEVICE is None,
        reason="needs a CUDA device (IK_FAST_TEST_DEVICE=cpu runs these tests on the CPU at "
        "small sizes: the rehearsal of benchmarks/run_gpu.sh)",
    ),
]


def size(cuda, rehearsal):
    """A size on CUDA, and its small stand-in in the CPU rehearsal (Triton's interpreter is slow)."""
    return cuda if ON_CUDA else rehearsal


def _impl_or_skip(impl):
    why = ops.status(impl, DEV)
    if why is not None:
        pytest.skip(f"{impl} unavailable on {DEV}: {why}")


def _layer_and_graph(name="O3", n=None, e=None, channels=4, dtype=torch.float32, seed=0):
    n, e = n or size(400, 12), e or size(6000, 48)
    gs = get_gspace(name)
    in_t, out_t, attr_t = field_types(gs, "mixed_attr")
    torch.manual_seed(seed)
    conv = ik_fast.ImplicitPointConv(in_t, out_t, attr_t, n_layers=3, n_channels=channels).to(DEV, dtype)
    pos = torch.randn(n, gs.dimensionality, device=DEV, dtype=dtype)
    ei = torch.randint(0, n, (2, e), device=DEV)
    x = torch.randn(n, in_t.size, device=DEV, dtype=dtype)
    a = torch.randn(e, attr_t.size, device=DEV, dtype=dtype)
    return conv, pos, ei, x, a


def _fwd_bwd(conv, backend, pos, ei, x, a):
    conv.backend = backend
    conv.zero_grad()
    xs, ps = x.clone().requires_grad_(), pos.clone().requires_grad_()
    out = conv(xs, ei, edge_attr=a, pos=ps)
    (out * torch.linspace(-1, 1, out.numel(), device=out.device, dtype=out.dtype).reshape(out.shape)).sum().backward()
    return [out.detach()] + [
        torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in (xs, ps, *conv.parameters())
    ]


# matmul precision of each precision case: float64, IEEE float32, float32 with TF32 matmuls
PRECISIONS = {"float64": (F64, "highest"), "ieee": (torch.float32, "highest"), "tf32": (torch.float32, "high")}


# ---------------------------------------------------------------------------------------------------------------
# the torch backend and equivariance on the device
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", ["O3", "Ih", "O2"] if ON_CUDA else ["O3"])
def test_torch_backend_on_cuda_matches_reference(name, mode):
    gs = get_gspace(name)
    in_t, out_t, attr_t = field_types(gs, "mixed_attr")
    conv = ik_fast.ImplicitPointConv(in_t, out_t, attr_t, n_layers=3, n_channels=4).to(DEV)
    getattr(conv, mode)()
    n, e = size(300, 30), size(4000, 200)
    pos = torch.randn(n, gs.dimensionality, device=DEV)
    ei = torch.randint(0, n, (2, e), device=DEV)
    x = torch.randn(n, in_t.size, device=DEV, requires_grad=True)
    a = torch.randn(e, attr_t.size, device=DEV)
    state = {k: v.clone() for k, v in conv.state_dict().items()}
    outs, grads = {}, {}
    for b in ("reference", "torch"):
        conv.load_state_dict(state)
        conv.backend = b
        x.grad = None
        out = conv(x, ei, edge_attr=a, pos=pos)
        out.square().sum().backward()
        outs[b], grads[b] = out.detach(), x.grad.clone()
    # (TF32 is off by default: matmul precision "highest")
    assert rel(outs["torch"], outs["reference"]) <= tolerance("forward", torch.float32, backend="torch")
    assert rel(grads["torch"], grads["reference"]) <= tolerance("backward", torch.float32, backend="torch")


def test_cuda_equivariance():
    gs = get_gspace(size("Ih", "Oh"))  # exact groups; in the rehearsal the one whose escnn build takes 3 s, not 28
    in_t, out_t, attr_t = field_types(gs, "mixed_attr")
    conv = ik_fast.ImplicitPointConv(in_t, out_t, attr_t, n_layers=3, n_channels=4, backend="torch").to(DEV).eval()
    n, e = size(50, 12), size(400, 48)
    pos = torch.randn(n, 3, device=DEV)
    ei = torch.randint(0, n, (2, e), device=DEV)
    x = torch.randn(n, in_t.size, device=DEV)
    a = torch.randn(e, attr_t.size, device=DEV)
    bound = tolerance("equivariance", torch.float32, group_family(conv), backend="torch")
    ik_fast.assert_equivariant(conv, pos, x, ei, a, n_samples=size(3, 1), rtol=bound)


# ---------------------------------------------------------------------------------------------------------------
# the native backend's CUDA part (csrc/cuda), built through the package (ik_fast._native: the prebuilt module or the
# first-use build); its CPU part's own checks are in test_native.py
# ---------------------------------------------------------------------------------------------------------------
def test_native_cuda_part_is_built_and_registered():
    """Where CUDA is the device, the extension the package loaded has its CUDA part and a CUDA kernel for each op."""
    _impl_or_skip("native")
    from ik_fast import _native

    mod = _native.load()
    if ON_CUDA:
        assert mod.cuda_built()
        for op in ("native_conv", "native_conv_backward", "native_trunk_moments"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ik_fast::{op}", "CUDA"), op
    assert _native.runs_on(torch.device(DEV)) is None


# ---------------------------------------------------------------------------------------------------------------
# every implementation at GPU sizes and precisions
# ---------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _corner_case(case):
    """(conv, pos, edge_index, x, attr) of a graph or layer shape that the kernels treat apart: a layer without
    hidden layers, a receiver with thousands of edges beside receivers with none, a wide layer (H's 144-dimensional
    fields, 16 channels), a graph without edges. Built once per case (the wide layer's basis takes seconds); callers
    copy the layer."""
    gs = get_gspace("O3")
    G = gs.fibergroup
    sphere = G.bl_sphere_representation(L=1)
    in_t = out_t = gs.type(*[sphere] * 2)
    attr_t = gs.type(G.trivial_representation, gs.basespace_action)
    layers, channels, n = 3, 4, size(400, 40)
    hub = size(10000, 100)
    if case == "no_hidden_layer":
        layers = 1
    elif case == "wide":
        in_t = out_t = gs.type(*[G.bl_sphere_representation(L=2)] * 16)
        channels = 16
    torch.manual_seed(0)
    conv = ik_fast.ImplicitPointConv(in_t, out_t, attr_t, n_layers=layers, n_channels=channels).to(DEV, F64)
    g = torch.Generator().manual_seed(1)
    if case == "no_edges":
        ei = torch.zeros(2, 0, dtype=torch.long)
    elif case == "hub_and_isolated_receivers":
        # receiver 0 gets `hub` edges, receivers 1..9 one or three each, the others none
        hub_edges = torch.stack([torch.randint(0, n, (hub,), generator=g), torch.zeros(hub, dtype=torch.long)])
        few = torch.stack([torch.randint(0, n, (20,), generator=g), torch.arange(1, 21) % 10])
        ei = torch.cat([hub_edges, few], 1)
    else:
        ei = torch.randint(0, n, (2, size(3000, 60)), generator=g)
    pos = torch.randn(n, 3, generator=g, dtype=F64)
    x = torch.randn(n, in_t.size, generator=g, dtype=F64)
    a = torch.randn(ei.shape[1], attr_t.size, generator=g, dtype=F64)
    return conv, pos.to(DEV), ei.to(DEV), x.to(DEV), a.to(DEV)


def _corner_step(case, mode, backend, precision):
    """A training or eval step (output and every gradient) of a copy of a corner case's layer, in ``precision``."""
    conv, pos, ei, x, a = _corner_case(case)
    dtype, matmul = PRECISIONS[precision]
    conv = copy.deepcopy(conv).to(dtype)
    getattr(conv, mode)()
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(matmul)
    try:
        return _fwd_bwd(conv, backend, pos.to(dtype), ei, x.to(dtype), a.to(dtype))
    finally:
        torch.set_float32_matmul_precision(old)


@functools.lru_cache(maxsize=None)
def _reference_step(case, mode, precision):
    """The reference backend's step of a corner case (the same for every implementation: computed once)."""
    return _corner_step(case, mode, "reference", precision)


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("case", ["no_hidden_layer", "hub_and_isolated_receivers", "wide", "no_edges"])
@pytest.mark.parametrize("impl", FUSED)
def test_corner_cases_match_reference_on_cuda(impl, case, precision):
    """The cases the former csrc/cuda/gpu_check.py ran through the raw ops, now through the layer, in train mode (the
    statistics pass) and eval mode, against the float64 reference backend: float64 and IEEE float32 within the
    table's bounds (float32 where a gradient cancels: within ``tolerance("own_error", float32)`` times the reference
    backend's own float32 error); TF32 within the float32 bounds or ``tolerance("own_error", "tf32")`` times the
    largest error of the reference backend's own TF32 step over the output and gradients (TF32 rounds the matmuls'
    operands, an error that each output inherits unevenly; a wrong fragment layout would give O(1) errors)."""
    _impl_or_skip(impl)
    if not ON_CUDA and case == "wide":
        pytest.skip("rehearsal: the wide layer runs the other cases' code at H's width, 15 s a step on CPU")
    if not ON_CUDA and impl == "triton" and precision != "ieee":
        pytest.skip("rehearsal: one precision in Triton's interpreter")
    dtype = PRECISIONS[precision][0]
    # (train mode needs two edges for the batch statistics: a graph without edges is an eval-mode case)
    for mode in ("eval",) if case == "no_edges" else ("train", "eval"):
        ref = _reference_step(case, mode, "float64")
        got = _corner_step(case, mode, impl, precision)
        own = [0.0] * len(ref)
        if precision != "float64":
            own = [rel(o.double(), r) for o, r in zip(_reference_step(case, mode, precision), ref)]
        assert len(got) == len(ref)
        errs = []
        for i, (r, g) in enumerate(zip(ref, got)):
            bound = tolerance("forward" if i == 0 else "backward", dtype, backend=impl)
            if precision == "ieee":
                bound = max(bound, tolerance("own_error", torch.float32) * own[i])
            elif precision == "tf32":
                bound = max(bound, tolerance("own_error", "tf32") * max(own))
            err = rel(g.double(), r)
            errs.append(err)
            assert err <= bound or r.norm() == g.norm() == 0, (mode, i, err, bound)
        print(f"{impl} {case} {precision} {mode}: largest error {max(errs):.2e}, the reference's own {max(own):.2e}")
        if case == "no_edges" and mode == "eval":
            bias = _corner_case(case)[0].expanded_bias().detach().expand_as(ref[0])
            assert rel(got[0].double(), bias) <= tolerance("forward", dtype, backend=impl)


@pytest.mark.parametrize("impl", FUSED)
def test_bfloat16_autocast_within_a_factor_of_the_references_own_error(impl):
    """Under ``torch.autocast(dtype=torch.bfloat16)`` (Triton: bfloat16 operands, float32 accumulation; native: no
    bfloat16 path, float32) the output in eval mode against the float64 reference within
    ``tolerance("own_error", torch.bfloat16)`` times the error of the reference backend under the same autocast (which
    must be a bfloat16 error: coarser than float32's bound)."""
    _impl_or_skip(impl)
    conv, pos, ei, x, a = _layer_and_graph("O3", dtype=F64)
    conv.eval().backend = "reference"
    with torch.no_grad():
        ref = conv(x, ei, edge_attr=a, pos=pos)
        c32 = copy.deepcopy(conv).float()
        args, kw = (x.float(), ei), dict(edge_attr=a.float(), pos=pos.float())
        errs = {}
        for b in ("reference", impl):
            c32.backend = b
            with torch.autocast(torch.device(DEV).type, dtype=torch.bfloat16):
                errs[b] = rel(c32(*args, **kw).double(), ref)
    print(f"bfloat16 autocast, error against float64: {impl} {errs[impl]:.2e}, reference {errs['reference']:.2e}")
    assert errs["reference"] > tolerance("forward", torch.float32)
    assert errs[impl] <= tolerance("own_error", torch.bfloat16) * errs["reference"], errs


# ---------------------------------------------------------------------------------------------------------------
# the fused Triton backend's peak memory
# ---------------------------------------------------------------------------------------------------------------
def test_triton_never_allocates_edges_times_hidden():
    """A training step's peak memory grows with the edge count by one (E x hidden) float32 tensor at most, never two
    (the design bound): the kernels keep the last hidden activation (forward) or its gradient (backward), one at a
    time, besides (E x small) tensors (edge inputs, their gradients). The fixed part (weights, the per-program
    gradient accumulators) does not depend on E."""
    if not ON_CUDA:
        pytest.skip("measures the peak of the CUDA caching allocator")
    _impl_or_skip("triton")
    extra = {}
    for e in (200_000, 400_000):
        conv, pos, ei, x, a = _layer_and_graph("O3", n=20000, e=e, channels=8)
        conv.train()
        _fwd_bwd(conv, "triton", pos, ei, x, a)  # warm-up: compilation, graph preparation (cached per graph)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        _fwd_bwd(conv, "triton", pos, ei, x, a)
        torch.cuda.synchronize()
        extra[e] = torch.cuda.max_memory_allocated() - base
    hidden = conv.kernel.program().hidden_size
    per_edge = (extra[400_000] - extra[200_000]) / 200_000
    print(f"peak memory per edge {per_edge:.0f} B; one hidden row is {hidden * 4} B")
    assert per_edge < hidden * 4 * 1.5, (per_edge, hidden)
