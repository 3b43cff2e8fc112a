"""A CPU emulation of the CUDA kernels of csrc/cuda, block by block, with the kernels' own index expressions, checked
against the op layer's plain-PyTorch statements (ik_fast.ops.conv_reference_form and autograd: conv with and without
``hidden``, conv_backward's 5L + 5 gradients; ik_fast.ops.trunk_moments_reference_form: trunk_moments from the MLP
input and chained from each layer's activation).

No GPU was available when the kernels were written, so this is how their *index arithmetic and host orchestration*
were checked: every shared-memory tile is a NumPy array of exactly the size the host code allocates (an index out of
range raises), every ``block_mm`` call is replayed with the same ``aoff`` / ``boff`` / strides / store, and the host
steps (receiver chunks, tile prefix sums and the binary search, the block plan of W' as the device holds it: groups,
column permutations, Z tiles, the packed W' gathered through widx, one GEMM per pair, the pairs' rows summed into out,
dW' scattered back through widx; the trunk's backward through ATen-equivalent calls with the batch norms' gradients,
the radial term, the trunk's launches of at most kMaxLayers layers) are repeated, with the batch norms' affine maps
where the kernels apply them (in the tile after each activation, on the input tile, in the Z kernel for ``hidden``,
on the loaded gradient in the activations' backward), through both tilings of the block GEMMs (IEEE register tiles
and the TF32 path's warp fragments, in exact arithmetic). Buffers the host leaves uninitialised (``at::empty``: Z, the
pairs' slots) start as NaN, and the Z tiles must write each element of a receiver's compact Z exactly once. The cases
use random structures (``ik_fast.structure.ConvSpec``: field groups, blocks, components that reach no output, no
blocks at all) and none (a dense plan), and each of the Z kernel's tile shapes. Every hidden activation kind: the
Fourier and pointwise ELU, and the gated and norm nonlinearities (the structure's fields of irreps: mixed sizes,
one-dimensional non-trivial irreps, the first trivial component elsewhere than first, fields of scalars only, irreps
that are exactly zero so that |v| = 0; dense and componentwise Linears, a gated one's gates reading the previous
field's first trivial component, between fields of different sizes; batch norm on and off; attributes in the MLP
input; chained launches), on random programs and on ik_fast's own ImplicitPointConv on O(3) and SO(2) (escnn's
field types and basis); the elementwise kernels' outputs start as NaN too. What it cannot check: races and
barriers, the device's own arithmetic (TF32 rounding included), launch configuration, anything CUDA-runtime. The
plan itself is derived here from the structure's mask with the fields of csrc/cpu/program.h's Plan; the C++
derivation (from the blocks) may order groups otherwise, which the CUDA code does not depend on. Run with ik_fast
importable (float64, about a minute)::

    PYTHONPATH=. python tests/tools/emulate_check.py [--only irreps]
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from ik_fast import ops
from ik_fast.structure import Block, ConvSpec, FieldGroup, HiddenLayout, decode
from ik_fast.structure import mask as structure_mask

# the kernels' constants (common.cuh / trunk_cuda.cu / conv_cuda.cu)
Z_THREADS, Z_TILE_AREA, Z_EDGES = 128, 2048, 16
FORCE_TH = None  # the Z kernel's tile rows when set (main() runs a case with each of 16, 32, 64)
GRID_CHUNK, MAX_SCRATCH_ROWS = 32, 256
EDGE_ROWS = 32
SMEM_LIMIT = 227 * 1024
ELEM = 8  # bytes per element the host sizes its tiles for (float64 here; --count sizes them as float32 does)

# --count: the multiply-adds the replayed kernels and host GEMMs execute, per stage (COUNT[stage] = [IEEE, TF32]:
# block_mm's padded micro-tiles / block_mm_tf32's padded 16 x 16 x 8 warp tiles; the Z kernel's 16-edge batches
# and warps; cuBLAS's GEMMs at their exact shapes). None: not counting.
COUNT = None
STAGE = "?"


def count(ieee, tf32=None):
    if COUNT is not None:
        c = COUNT.setdefault(STAGE, [0, 0])
        c[0] += int(ieee)
        c[1] += int(ieee if tf32 is None else tf32)


def stage(name):
    global STAGE
    STAGE = name


def up(n, m):
    return -(-n // m) * m


def gemm(a, b):
    """A host GEMM (cuBLAS through ATen, or ik_gemm_kernel): a @ b, counted at its shape ((batched) M N K)."""
    count(np.prod(a.shape[:-1]) * b.shape[-1] * a.shape[-1])
    return a @ b


def odd(n):
    return n | 1


TC = False  # emulate the TF32 path's tiling (block_mm_tf32) instead of block_mm's (in exact arithmetic)


def block_mm(nb, M, N, K, A, aoff, aks, B, boff, bks, store, tile=(4, 4)):
    """common.cuh's block_mm, vectorised: C[bi, m, n] = sum_k A[aoff(bi, m) + k aks] B[boff(bi, n) + k bks]; tile:
    the call's (TM, TN) micro-tile (what the IEEE path computes, padding included, for --count)."""
    count(nb * up(M, tile[0]) * up(N, tile[1]) * K, nb * up(M, 16) * up(N, 16) * up(K, 8))
    if GEMM_PREC is not None:
        return block_mm_prec(nb, M, N, K, A, aoff, aks, B, boff, bks, store)
    if TC:
        return block_mm_tf32(nb, M, N, K, A, aoff, aks, B, boff, bks, store)
    k = np.arange(K)
    for bi in range(nb):
        ao = np.array([aoff(bi, m) for m in range(M)], dtype=np.int64)
        bo = np.array([boff(bi, n) for n in range(N)], dtype=np.int64)
        ia = ao[:, None] + k[None, :] * aks
        ib = bo[None, :] + k[:, None] * bks
        assert (ia >= 0).all() and (ib >= 0).all()
        C = A[ia] @ B[ib] if K > 0 else np.zeros((M, N))
        m, n = np.meshgrid(np.arange(M), np.arange(N), indexing="ij")
        store(bi, m.reshape(-1), n.reshape(-1), C.reshape(-1))


def block_mm_tf32(nb, M, N, K, A, aoff, aks, B, boff, bks, store):
    """common.cuh's block_mm_tf32, lane by lane: the loads each lane makes, placed into the m16n8k8 fragments by the
    PTX ISA's .tf32 layout (a0 (g, t), a1 (g + 8, t), a2 (g, t + 4), a3 (g + 8, t + 4); b0 (t, g), b1 (t + 4, g);
    c0 (g, 2t), c1 (g, 2t + 1), c2 (g + 8, 2t), c3 (g + 8, 2t + 1)), multiplied exactly (no TF32 rounding)."""
    mt, nt = -(-M // 16), -(-N // 16)
    for w in range(nb * mt * nt):  # (the warps' tiles, in any order)
        ni, rest = w % nt, w // nt
        mi, bi = rest % mt, rest // mt
        acc = np.zeros((2, 16, 8))
        for k0 in range(0, K, 8):
            fa = np.zeros((16, 8))
            fb = np.zeros((2, 8, 8))
            for lane in range(32):
                g, t = lane >> 2, lane & 3
                r0, r1 = mi * 16 + g, mi * 16 + g + 8
                ao0, ao1 = aoff(bi, r0 if r0 < M else 0), aoff(bi, r1 if r1 < M else 0)
                ka, kb = k0 + t, k0 + t + 4
                va, vb = ka < K, kb < K
                fa[g, t] = A[ao0 + ka * aks] if va else 0.0
                fa[g + 8, t] = A[ao1 + ka * aks] if va else 0.0
                fa[g, t + 4] = A[ao0 + kb * aks] if vb else 0.0
                fa[g + 8, t + 4] = A[ao1 + kb * aks] if vb else 0.0
                for j in range(2):
                    n = ni * 16 + 8 * j + g
                    bo = boff(bi, n if n < N else 0)
                    fb[j, t, g] = B[bo + ka * bks] if va else 0.0
                    fb[j, t + 4, g] = B[bo + kb * bks] if vb else 0.0
            for j in range(2):
                acc[j] += fa @ fb[j]
        ms, ns, vs = [], [], []
        for lane in range(32):
            g, t = lane >> 2, lane & 3
            r0 = mi * 16 + g
            for j in range(2):
                c0 = ni * 16 + 8 * j + 2 * t
                for q, (fm, fn) in enumerate(((g, 2 * t), (g, 2 * t + 1), (g + 8, 2 * t), (g + 8, 2 * t + 1))):
                    m, n = (r0 if q < 2 else r0 + 8), c0 + (q & 1)
                    assert (m - mi * 16, n - ni * 16 - 8 * j) == (fm, fn)
                    if m < M and n < N:
                        ms.append(m)
                        ns.append(n)
                        vs.append(acc[j, fm, fn])
        if ms:
            store(bi, np.array(ms), np.array(ns), np.array(vs))


# ------------------------------------------------------------------------------------------------------------------
# the float32 GEMM modes' rounding (--precision): the block GEMMs in IEEE float32, TF32 or 3xTF32, everything else in
# exact (float64) arithmetic, so that the modes' errors against float64 compare the GEMMs' arithmetic alone
# ------------------------------------------------------------------------------------------------------------------
GEMM_PREC = None  # None: exact arithmetic (the checks above); "ieee", "tf32", "tf32x3": block_mm_prec


def block_mm_prec(nb, M, N, K, A, aoff, aks, B, boff, bks, store):
    """common.cuh's block GEMMs in a float32 mode, on the float32 operands the kernels hold (the float64 values rounded
    to float32): ``ieee`` block_mm (float32 products and sums); ``tf32`` / ``tf32x3`` block_mm_tf32 / its Split variant,
    k-step by k-step of 8 as each m16n8k8 fragment runs them (every output element lies in one fragment, so the
    fragment's k-steps are its arithmetic): operands hi = cvt.rna(x), lo = cvt.rna(x - hi); TF32 one mma (hi hi) per
    step, 3xTF32 hi hi into acc and lo hi, then hi lo, into accs, stored acc + accs in float32. Each mma is modelled as
    its exact products added to the accumulator and rounded once to float32 (the tensor core's internal alignment of
    the addends is not modelled)."""
    from ik_fast.tools.tensorcore_emulation import tf32_rna

    f32 = np.float32
    k = np.arange(K)
    for bi in range(nb):
        ao = np.array([aoff(bi, m) for m in range(M)], dtype=np.int64)
        bo = np.array([boff(bi, n) for n in range(N)], dtype=np.int64)
        a = A[ao[:, None] + k[None, :] * aks].astype(f32) if K else np.zeros((M, 0), f32)
        b = B[bo[None, :] + k[:, None] * bks].astype(f32) if K else np.zeros((0, N), f32)
        if GEMM_PREC == "ieee":
            C = a @ b
        else:
            ah, bh = tf32_rna(a).astype(np.float64), tf32_rna(b).astype(np.float64)
            al = tf32_rna(a - ah.astype(f32)).astype(np.float64)
            bl = tf32_rna(b - bh.astype(f32)).astype(np.float64)
            acc = np.zeros((M, N), f32)
            accs = np.zeros((M, N), f32)
            for k0 in range(0, K, 8):
                s_ = slice(k0, k0 + 8)
                acc = (acc + ah[:, s_] @ bh[s_]).astype(f32)
                if GEMM_PREC == "tf32x3":
                    accs = (accs + al[:, s_] @ bh[s_]).astype(f32)
                    accs = (accs + ah[:, s_] @ bl[s_]).astype(f32)
            C = (acc + accs) if GEMM_PREC == "tf32x3" else acc
        m, n = np.meshgrid(np.arange(M), np.arange(N), indexing="ij")
        store(bi, m.reshape(-1), n.reshape(-1), C.reshape(-1))


def frob(a, b) -> float:
    """|a - b|_F / |b|_F."""
    a, b = np.asarray(a, dtype=np.float64).reshape(-1), np.asarray(b, dtype=np.float64).reshape(-1)
    return float(np.linalg.norm(a - b) / max(1e-300, np.linalg.norm(b)))


class _Float32Numpy:
    """numpy with float32 as the default dtype of new arrays (zeros, empty, ones, full): the replay, given float32
    inputs, then computes in float32 throughout, as the kernels do for float32 tensors (float32 operands stay float32
    in NumPy's arithmetic and in torch's)."""

    def __getattr__(self, name):
        return getattr(_numpy, name)

    @staticmethod
    def _f32(fn):
        return lambda shape, dtype=None, **kw: fn(shape, dtype=_numpy.float32 if dtype is None else dtype, **kw)

    def __init__(self):
        for name in ("zeros", "empty", "ones"):
            setattr(self, name, self._f32(getattr(_numpy, name)))

    @staticmethod
    def full(shape, fill, dtype=None, **kw):
        return _numpy.full(shape, fill, dtype=_numpy.float32 if dtype is None else dtype, **kw)


_numpy = np


def problem_case(name, dtype, seed=0):
    """The op arguments of a benchmark problem's layer (ik_fast.tools.problems: build_layer, build_inputs; eval mode,
    the batch norms as affine maps) in ``dtype``, the MLP input formed from the positions in that dtype as the layer
    does (so a float32 run carries float32's rounding of the edge vectors, as on the device)."""
    from ik_fast.graph import prepare_graph
    from ik_fast.tools.problems import build_inputs, build_layer, get_problem

    p = get_problem(name)
    conv = build_layer(p, backend="reference", seed=seed).double().eval()
    x, pos, ei, attr = build_inputs(p, seed=seed, dtype=torch.float64)
    conv, x, pos, attr = conv.to(dtype), x.to(dtype), pos.to(dtype), attr.to(dtype)
    n = x.shape[0]
    prog = conv.kernel.program()
    gr = prepare_graph(ei, n, n)
    inp = prog.mlp_input(pos[ei[0]] - pos[ei[1]], attr)[gr.perm].contiguous()
    q = prog.op_program([], dtype)
    leaf = lambda t: t.detach().clone().requires_grad_()  # noqa: E731
    return [
        leaf(x), leaf(inp), gr.src[gr.perm].contiguous(), gr.rowptr, [leaf(w) for w in q.weights],
        [leaf(b) for b in q.biases], q.fourier, q.fourier_inv, [leaf(t) for t in q.act_bias],
        [leaf(f) for f in q.bn_factor], [leaf(t) for t in q.bn_shift], leaf(q.final_weight), leaf(q.final_bias),
        leaf(q.coef), q.norm, q.ndim, q.structure,
    ]  # fmt: skip


def precision_errors(ref_args, run_args, nr):
    """Relative errors (Frobenius) against the float64 statement (``ref_args``) of the replay in float32 (``run_args``
    float32 tensors; every array of the replay float32): the forward and conv_backward's gradients (x, the MLP input,
    the parameters concatenated), for each GEMM mode."""
    global GEMM_PREC, np
    L = len(ref_args[4])
    ref = ops.conv_reference_form(*ref_args)
    grad = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    leaves = [ref_args[0], ref_args[1], *ref_args[4], *ref_args[5], *ref_args[8], *ref_args[9], *ref_args[10]]
    leaves += list(ref_args[11:14])
    ref_g = [
        torch.zeros_like(leaf) if g is None else g
        for g, leaf in zip(torch.autograd.grad(ref, leaves, grad, allow_unused=True), leaves)
    ]
    cat = lambda ts: np.concatenate([np.asarray(t, dtype=np.float64).reshape(-1) for t in ts])  # noqa: E731
    out = {}
    try:
        np = _Float32Numpy()
        for mode in ("ieee", "tf32", "tf32x3"):
            GEMM_PREC = mode
            fwd = conv(*run_args, nr=nr)
            gs = conv_backward(grad.float(), *run_args, nr=nr)
            assert len(gs) == 5 * L + 5 and np.asarray(fwd).dtype == np.float32
            out[mode] = {
                "out": frob(fwd, ref.detach().numpy()),
                "grad_x": frob(gs[0], ref_g[0].numpy()),
                "grad_inp": frob(gs[1], ref_g[1].numpy()),
                "grad_params": frob(cat(gs[2:]), cat([g.numpy() for g in ref_g[2:]])),
            }
    finally:
        GEMM_PREC, np = None, _numpy
    return out


PRECISION_BOUND = 2.0  # 3xTF32's error at most this many times IEEE float32's
PRECISION_PROBLEMS = ("tiny@16", "tiny+gated@16", "tiny+norm@16", "planar@8")


def precision_cases(json_out=None, names=PRECISION_PROBLEMS):
    """--precision: the native kernels replayed in float32 with the block GEMMs in each mode, against float64, on
    benchmark problems' layers (several groups, field types and nonlinearities; small graphs); fails where 3xTF32's
    error exceeds PRECISION_BOUND times IEEE float32's. TF32's errors beside."""
    ok, rows = True, []
    for name in names:
        errs = precision_errors(problem_case(name, torch.float64), problem_case(name, torch.float32), nr=4)
        for metric in errs["ieee"]:
            e = {m: errs[m][metric] for m in errs}
            ratio = e["tf32x3"] / max(e["ieee"], 1e-300)
            good = ratio <= PRECISION_BOUND
            ok &= good
            rows.append(dict(case=name, metric=metric, **e, ratio=ratio))
            print(
                f"{name:14s} {metric:11s} ieee {e['ieee']:.2e}  tf32 {e['tf32']:.2e}  tf32x3 {e['tf32x3']:.2e}  "
                f"3xTF32/IEEE {ratio:.2f}  {'ok' if good else f'OVER {PRECISION_BOUND}x'}",
                flush=True,
            )
    if json_out:
        write_precision_records(rows, json_out)
    return ok


def write_precision_records(rows, path):
    """The --precision rows as ik_fast.records (kind precision, provider native, device '<CPU>, native CUDA kernels
    emulated in NumPy'): one record per case, metric and mode."""
    from ik_fast import records

    prov = records.provenance("cpu")
    prov = dict(prov, device={**prov["device"], "name": prov["device"]["name"] + ", native CUDA kernels emulated"})
    recs = []
    for r in rows:
        for mode in ("ieee", "tf32", "tf32x3"):
            extra = {
                "case": r["case"],
                "against": "float64 evaluation of the op's statement (ik_fast.ops.conv_reference_form, autograd) "
                "on the same layer and graph",
                "emulated": "csrc/cuda's kernels and host steps replayed in float32 NumPy "
                "(tests/tools/emulate_check.py), the block GEMMs in this mode (block_mm_prec: operand rounding "
                "per fragment, each mma rounded once to float32); ATen's GEMMs as NumPy float32 matmuls",
                "command": "python tests/tools/emulate_check.py --precision --json PATH",
            }
            recs.append(
                records.record(
                    "precision",
                    r["case"],
                    "native",
                    "rel_error_" + r["metric"],
                    r[mode],
                    "1",
                    mode="eval",
                    precision=mode,
                    extra=extra,
                    prov=prov,
                )
            )
    records.write(path, recs)
    print(f"records: {path}")


def elu(u):
    return np.where(u > 0, u, np.expm1(np.minimum(u, 0)))


def elu_grad(u):
    return np.where(u > 0, 1.0, np.exp(np.minimum(u, 0)))


def fast_expm1(u, expf_ulps=None):
    """common.cuh's fast_expm1_nonpositive (float32's ELU below zero) in float32 arithmetic, u <= 0: the degree-6
    Taylor polynomial by Horner with fmaf (one rounding per step) above -1/4, else __expf(u) - 1, with __expf modelled
    as e^u rounded to float32 and then off by ``expf_ulps(u)`` ulps (the CUDA guide's bound for __expf is
    2 + floor(1.173 |u|) ulps: pass it with a sign to put the error at its worst). (The device's own rounding of the
    fmaf chain cannot be replayed exactly; float64 fma rounded to float32 per step is the same as fmaf.)"""
    f32 = np.float32
    u = np.asarray(u, dtype=f32)
    p = f32(1.0 / 720.0)
    for c in (1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0):
        p = (u.astype(np.float64) * p + f32(c)).astype(f32)  # fmaf(u, p, c)
    p = (u * p).astype(f32)
    e = np.exp(u.astype(np.float64)).astype(f32)
    if expf_ulps is not None:
        e = (e.astype(np.float64) + expf_ulps(u) * np.spacing(e).astype(np.float64)).astype(f32)
    e = (e - f32(1)).astype(f32)
    return np.where(u > f32(-0.25), p, e)


def pick_tile(bytes_for):
    be = 16
    while be > 4 and bytes_for(be) > SMEM_LIMIT // 2 - 1024:
        be //= 2
    while be > 1 and bytes_for(be) > SMEM_LIMIT:
        be //= 2
    assert bytes_for(be) <= SMEM_LIMIT
    return be


# ------------------------------------------------------------------------------------------------------------------
# trunk_cuda.cu
# ------------------------------------------------------------------------------------------------------------------
def prepare_affine(factor, shift, width):
    """trunk_cuda.cu's prepare_affine: None for an empty factor (its shift ignored), else dict(f, s, d)."""
    if factor is None or factor.numel() == 0:
        return None
    C = factor.shape[0]
    assert factor.dim() == 1 and width % C == 0 and tuple(shift.shape) == (width,)
    return dict(f=factor.detach().numpy().copy(), s=shift.detach().numpy().copy(), d=width // C)


ELU, FOURIER, GATED, NORM = 0, 1, 2, 3  # common.cuh's ActKind (the structure's activation codes)
KINDS = {"elu": ELU, "fourier_elu": FOURIER, "gated": GATED, "norm": NORM}


def irrep_table(h):
    """trunk_cuda.cu's irrep_table: per component its non-trivial irrep's number (-1: trivial), then per non-trivial
    irrep (first component, size)."""
    tab, irr, p, g = [], [], 0, 0
    for size, trivial in h.irreps:
        tab += [-1 if trivial else g] * size
        if not trivial:
            irr += [p, size]
            g += 1
        p += size
    return np.array(tab + irr, dtype=np.int64)


def trivial_source(h):
    p = 0
    for size, trivial in h.irreps:
        if trivial:
            return p
        p += size
    return -1


def prepare_trunk(weights, biases, fourier, fourier_inv, act_bias, structure, first, p0):
    """trunk_cuda.cu's prepare_trunk: each layer's kind from the structure's layers[first ..] (without one: Fourier
    ELU where fourier[k] is non-empty, else ELU), a gated / norm layer's table and act_bias, a componentwise Linear's
    source components."""
    L = len(weights)
    assert len(biases) == len(fourier) == len(fourier_inv) == len(act_bias) == L
    lay = decode(structure).layers if structure is not None else None
    if lay is not None:
        assert 0 <= first and first + L <= len(lay)
    layers, hin = [], p0
    for k, (w, b, A, Ai, ab) in enumerate(zip(weights, biases, fourier, fourier_inv, act_bias)):
        h = lay[first + k] if lay is not None else None
        prev = lay[first + k - 1] if lay is not None and first + k > 0 else None
        act = KINDS[h.activation] if h is not None else (FOURIER if A.numel() else ELU)
        irreps = act in (GATED, NORM)
        assert act == NORM or ab.numel() == 0
        w = w.detach().numpy()
        t = dict(w=w, act=act, hin=hin, cw_d=0, cw_din=0, cw_dm=0, cw_t0=0, fd=0, g=0, id=0, dl=0, nnt=0, bn=None)
        if irreps:
            t.update(id=h.components, nnt=h.nontrivial, dl=h.linear_components)
        if w.ndim == 2:
            assert w.shape[1] == hin
            t["lout"] = w.shape[0]
            t["wk"] = np.ascontiguousarray(w.T).reshape(-1)
        else:
            t["cw_d"], cin = w.shape[0], w.shape[2]
            if act == GATED and t["nnt"] > 0 and prev is not None:
                t0 = trivial_source(prev)
                assert t0 >= 0
                din = hin // cin
                assert t["cw_d"] == t["dl"] and din * cin == hin and din > t0 and din >= t["id"]
                t.update(cw_t0=t0, cw_din=din, cw_dm=t["id"])
            else:
                assert cin * t["cw_d"] == hin
                t.update(cw_din=t["cw_d"], cw_dm=t["cw_d"])
            t["lout"] = w.shape[0] * w.shape[1]
            t["wk"] = np.ascontiguousarray(w.transpose(0, 2, 1)).reshape(-1)
        assert tuple(b.shape) == (t["lout"],)
        t["b"] = b.detach().numpy().copy()
        t["hout"] = t["lout"]
        if irreps:
            assert t["lout"] % t["dl"] == 0
            C = t["lout"] // t["dl"]
            t["hout"] = C * t["id"]
            t["tab"] = irrep_table(h)
            if act == NORM:
                assert tuple(ab.shape) == (C * t["nnt"],)
                t["ab"] = ab.detach().numpy().copy()
        elif act == FOURIER:
            assert A.numel() > 0
            A, Ai = A.numpy(), Ai.numpy()
            t.update(
                g=A.shape[0],
                fd=A.shape[1],
                A=A.reshape(-1).copy(),
                Ainv=Ai.reshape(-1).copy(),
                At=np.ascontiguousarray(A.T).reshape(-1),
                Ainvt=np.ascontiguousarray(Ai.T).reshape(-1),
            )
        hin = t["hout"]
        layers.append(t)
    return layers, hin


def linear_tile(L, X, Y, be, ld):
    w, b, hin, lout = L["wk"], L["b"], L["hin"], L["lout"]
    if L["cw_d"] == 0:

        def st(bi, m, n, v):
            Y[m * ld + n] = v + b[n]

        block_mm(1, be, lout, hin, X, lambda bi, m: m * ld, 1, w, lambda bi, n: n, lout, st)
    else:
        D, Din, dm, t0 = L["cw_d"], L["cw_din"], L["cw_dm"], L["cw_t0"]
        cin, cout = hin // Din, lout // D

        def st(a, m, n, v):
            Y[m * ld + n * D + a] = v + b[n * D + a]

        def aoff(a, m):
            return m * ld + (a if a < dm else t0)

        block_mm(D, be, cout, cin, X, aoff, Din, w, lambda a, n: a * cin * cout + n, cout, st)


def sigmoid(u):
    return 1.0 / (1.0 + np.exp(-u))


def irrep_act(L, Y, yr, j):
    """common.cuh's irrep_act, vectorised over the elements (yr: each one's row offset into Y, j its unit)."""
    tab, D, dl, nnt = L["tab"], L["id"], L["dl"], L["nnt"]
    c = j // D
    a = j - c * D
    yc = yr + c * dl
    g = tab[a]
    v = Y[yc + a]
    out = np.empty_like(v)
    triv = g < 0
    out[triv] = elu(v[triv])
    nt = ~triv
    if L["act"] == GATED:
        out[nt] = v[nt] * sigmoid(Y[yc[nt] + D + g[nt]])
        return out
    gi = g[nt]
    s0, sz = tab[D + 2 * gi], tab[D + 2 * gi + 1]
    sq = np.zeros(nt.sum())
    for i in range(int(sz.max(initial=0))):
        live = i < sz
        sq[live] += Y[yc[nt][live] + s0[live] + i] ** 2
    n = np.where(sq > 0, np.sqrt(np.where(sq > 0, sq, 1.0)), 0.0)
    out[nt] = v[nt] * sigmoid(n - L["ab"][c[nt] * nnt + gi])
    return out


def fourier_elu_tile(L, Y, X, U, be, ld, gc, su):
    at, ainvt, fd, G = L["At"], L["Ainvt"], L["fd"], L["g"]
    C = L["hout"] // fd
    M = be * C
    mr = su // gc
    for m0 in range(0, M, mr):
        mc = min(mr, M - m0)
        row = lambda bi, m, m0=m0: ((m0 + m) // C) * ld + ((m0 + m) % C) * fd  # noqa: E731
        for g0 in range(0, G, gc):
            gcc = min(gc, G - g0)

            def st1(bi, m, n, v):
                U[m * gc + n] = elu(v)

            block_mm(1, mc, gcc, fd, Y, row, 1, at, lambda bi, n, g0=g0: g0 + n, G, st1)

            def st2(bi, m, n, v, m0=m0, g0=g0):
                r = m0 + m
                p = (r // C) * ld + (r % C) * fd + n
                X[p] = (0.0 if g0 == 0 else X[p]) + v

            block_mm(1, mc, fd, gcc, U, lambda bi, m: m * gc, 1, ainvt, lambda bi, n, g0=g0: g0 * fd + n, fd, st2)


def load_rows(S, ld, src, e0, ne, be, width, f=None, s=None, d=1):
    """trunk_cuda.cu's load_rows: src flat (E * width), each value mapped to v f[j / d] + s[j] when f is given (v f[j /
    d] when s is None); rows ne .. be - 1 zero."""
    idx = np.arange(be * width)
    e, j = idx // width, idx % width
    live = e < ne
    v = np.zeros(be * width)
    v[live] = src[(e0 + e[live]) * width + j[live]]
    if f is not None:
        v[live] = v[live] * f[j[live] // d] + (s[j[live]] if s is not None else 0.0)
    S[e * ld + j] = v


def trunk_forward_kernel(inp, in_map, layers, out, saves, be, ld, gc, su, part=None):
    """ik_trunk_forward_kernel, block by block. inp / out / saves: flat global arrays ((E, width) row-major); part
    (blocks, 2, width) or None: each tile's column sums and squared deviations about its mean."""
    E, hin0 = inp.shape
    inp, outf = inp.reshape(-1), out.reshape(-1)
    fi, si, di = (in_map["f"], in_map["s"], in_map["d"]) if in_map is not None else (None, None, 1)
    for blk in range(-(-E // be)):
        X, Y, U = np.zeros(be * ld), np.zeros(be * ld), np.zeros(su)
        e0 = blk * be
        ne = min(be, E - e0)
        load_rows(X, ld, inp, e0, ne, be, hin0, fi, si, di)
        width = hin0
        for L, (save_y, save_a) in zip(layers, saves):
            linear_tile(L, X, Y, be, ld)
            lout = L["lout"]
            if save_y is not None:
                save_y.reshape(-1)[e0 * lout : (e0 + ne) * lout] = Y.reshape(be, ld)[:ne, :lout].reshape(-1)
            width = L["hout"]
            fourier = L["act"] == FOURIER
            if fourier:
                fourier_elu_tile(L, Y, X, U, be, ld, gc, su)
            bn = L["bn"]
            if not fourier or save_a is not None or bn is not None:
                idx = np.arange(be * width)
                e, j = idx // width, idx % width
                p = e * ld + j
                if fourier:
                    v = X[p]
                elif L["act"] == ELU:
                    v = elu(Y[p])
                else:
                    v = irrep_act(L, Y, e * ld, j)
                if save_a is not None:
                    live = e < ne
                    save_a.reshape(-1)[(e0 + e[live]) * width + j[live]] = v[live]
                X[p] = v * bn["f"][j // bn["d"]] + bn["s"][j] if bn is not None else v
        idx = np.arange(ne * width)
        e, j = idx // width, idx % width
        outf[(e0 + e) * width + j] = X[e * ld + j]
        if part is not None:  # one thread per column j, over the tile's ne rows of X
            rows = X[(np.arange(ne)[:, None] * ld + np.arange(width)[None, :])]
            sums = rows.sum(0)
            part[blk, 0, :width] = sums
            part[blk, 1, :width] = ((rows - sums / ne) ** 2).sum(0)


MAX_LAYERS = 16  # common.cuh's kMaxLayers (main() also runs the chained launches with a smaller value)


def launch_trunk_group(cur, in_map, out, layers, k0, k1, saves, moments=None):
    hmax = max([cur.shape[1]] + [max(L["lout"], L["hout"]) for L in layers[k0:k1]])
    rows = max([1] + [L["hout"] // L["fd"] for L in layers[k0:k1] if L["fd"] > 0])
    ld = odd(hmax)
    su_for = lambda be: GRID_CHUNK * min(be * rows, MAX_SCRATCH_ROWS)  # noqa: E731
    be = pick_tile(lambda be: (2 * be * ld + su_for(be)) * ELEM)
    group = []
    for k in range(k0, k1):
        save_y = saves[0][k] if saves is not None else None
        # (the last layer's activation is the output itself when no affine map follows it)
        keep_a = saves is not None and (k + 1 < len(layers) or layers[k]["bn"] is not None)
        group.append((save_y, saves[1][k] if keep_a else None))
    part = None
    if moments is not None:  # at::empty
        part = np.full((-(-cur.shape[0] // be), 2, layers[k1 - 1]["hout"]), np.nan)
    trunk_forward_kernel(cur, in_map, layers[k0:k1], out, group, be, ld, GRID_CHUNK, su_for(be), part)
    if moments is not None:
        moments.append(merge_moments(part, cur.shape[0], be))


def merge_moments(part, E, be):
    """trunk_cuda.cu's merge_moments: (2, H) mean and sum of squared deviations from the tiles' partials."""
    nb = part.shape[0]
    n = np.full((nb, 1), float(be))
    n[nb - 1] = E - (nb - 1) * be
    sums = part[:, 0]
    mean = sums.sum(0) / E
    return np.stack([mean, part[:, 1].sum(0) + ((sums / n - mean) ** 2 * n).sum(0)])


def trunk_forward(inp, in_map, layers, save=False, moments=None):
    """trunk_cuda.cu's trunk_forward: (h after the last layer's affine map, (ys, as) or None); moments: a list that
    receives h's (2, H) moments from the last launch's partials (left empty without layers or edges)."""
    E = inp.shape[0]
    if not layers:
        return inp, None
    saves = ([np.zeros((E, L["lout"])) for L in layers], [np.zeros((E, L["hout"])) for L in layers]) if save else None
    cur = inp
    for k0 in range(0, len(layers), MAX_LAYERS):
        k1 = min(len(layers), k0 + MAX_LAYERS)
        into_as = save and k1 == len(layers) and layers[-1]["bn"] is None
        out = saves[1][-1] if into_as else np.zeros((E, layers[k1 - 1]["hout"]))
        last = moments if k1 == len(layers) and E > 0 else None
        launch_trunk_group(cur, in_map if k0 == 0 else None, out, layers, k0, k1, saves, last)
        cur = out
    return cur, saves


def fourier_backward_kernel(y, dh, L):
    E, H = y.shape
    fd, G = L["fd"], L["g"]
    ld = odd(H)
    rows = H // fd
    su_for = lambda be: GRID_CHUNK * min(be * rows, MAX_SCRATCH_ROWS)  # noqa: E731
    be = pick_tile(lambda be: (3 * be * ld + su_for(be)) * ELEM)
    gc, su = GRID_CHUNK, su_for(be)
    at, ainv, A = L["At"], L["Ainv"], L["A"]
    bn = L["bn"]
    dy = np.zeros(E * H)
    yf, dhf = y.reshape(-1), dh.reshape(-1)
    for blk in range(-(-E // be)):
        e0 = blk * be
        ne = min(be, E - e0)
        Yt, dAt, dYt, U = np.zeros(be * ld), np.zeros(be * ld), np.zeros(be * ld), np.zeros(su)
        load_rows(Yt, ld, yf, e0, ne, be, H)
        load_rows(dAt, ld, dhf, e0, ne, be, H, *((bn["f"], None, bn["d"]) if bn is not None else ()))
        C = H // fd
        M = be * C
        mr = su // gc
        for m0 in range(0, M, mr):
            mc = min(mr, M - m0)
            row = lambda bi, m, m0=m0: ((m0 + m) // C) * ld + ((m0 + m) % C) * fd  # noqa: E731
            for g0 in range(0, G, gc):
                gcc = min(gc, G - g0)

                def s1(bi, m, n, v):
                    U[m * gc + n] = v

                block_mm(1, mc, gcc, fd, Yt, row, 1, at, lambda bi, n, g0=g0: g0 + n, G, s1)

                def s2(bi, m, n, v):
                    U[m * gc + n] = v * elu_grad(U[m * gc + n])

                block_mm(1, mc, gcc, fd, dAt, row, 1, ainv, lambda bi, n, g0=g0: g0 + n, G, s2)

                def s3(bi, m, n, v, m0=m0, g0=g0):
                    r = m0 + m
                    p = (r // C) * ld + (r % C) * fd + n
                    dYt[p] = (0.0 if g0 == 0 else dYt[p]) + v

                block_mm(1, mc, fd, gcc, U, lambda bi, m: m * gc, 1, A, lambda bi, n, g0=g0: g0 * fd + n, fd, s3)
        idx = np.arange(ne * H)
        e, j = idx // H, idx % H
        dy[(e0 + e) * H + j] = dYt[e * ld + j]
    return dy.reshape(E, H)


def elu_backward_kernel(y, dh, L):
    """ik_elu_backward_kernel: one element per i of the flat (E, H) arrays."""
    E, H = y.shape
    i = np.arange(E * H)
    da = dh.reshape(-1)[i]
    if L["bn"] is not None:
        da = da * L["bn"]["f"][(i % H) // L["bn"]["d"]]
    return (da * elu_grad(y.reshape(-1)[i])).reshape(E, H)


def irrep_act_backward_kernel(y, dh, L):
    """ik_irrep_act_backward_kernel: one element i of dy (E, C dl) per thread; (dy, dab (E, C nnt) or None)."""
    E = y.shape[0]
    tab, D, dl, nnt, act = L["tab"], L["id"], L["dl"], L["nnt"], L["act"]
    C = L["hout"] // D
    bn = L["bn"]
    yf, dhf = y.reshape(-1), dh.reshape(-1)
    n = E * C * dl
    dy = np.full(n, np.nan)  # (at::empty)
    dab = np.full(E * C * nnt, np.nan) if act == NORM and C * nnt > 0 else None
    i = np.arange(n)
    e = i // (C * dl)
    r = i - e * (C * dl)
    c = r // dl
    u = r - c * dl
    yc = e * (C * dl) + c * dl
    dc = e * (C * D) + c * D

    def da(a, sel):
        v = dhf[dc[sel] + a]
        return v * bn["f"][(c[sel] * D + a) // bn["d"]] if bn is not None else v

    g = np.where(u < D, tab[np.minimum(u, D - 1)], u - D)
    triv = g < 0
    dy[triv] = da(u[triv], triv) * elu_grad(yf[yc[triv] + u[triv]])
    rest = ~triv
    s0, sz = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)  # (read by the non-trivial elements only)
    s0[rest], sz[rest] = tab[D + 2 * g[rest]], tab[D + 2 * g[rest] + 1]
    if act == GATED:
        comp = rest & (u < D)
        dy[comp] = da(u[comp], comp) * sigmoid(yf[yc[comp] + D + g[comp]])
        rest = rest & ~comp
    dot, sq = np.zeros(n), np.zeros(n)
    for k in range(int(sz[rest].max(initial=0))):
        live = rest & (k < sz)
        v = yf[yc[live] + s0[live] + k]
        dot[live] += da(s0[live] + k, live) * v
        sq[live] += v * v
    if act == GATED:  # the gates
        sg = sigmoid(yf[yc[rest] + u[rest]])
        dy[rest] = dot[rest] * sg * (1 - sg)
    elif rest.any():
        nrm = np.where(sq > 0, np.sqrt(np.where(sq > 0, sq, 1.0)), 0.0)[rest]
        sg = sigmoid(nrm - L["ab"][c[rest] * nnt + g[rest]])
        sp = dot[rest] * sg * (1 - sg)
        safe = np.where(nrm > 0, nrm, 1.0)
        dy[rest] = da(u[rest], rest) * sg + np.where(nrm > 0, sp * yf[yc[rest] + u[rest]] / safe, 0.0)
        first = u[rest] == s0[rest]
        er, cr, gr = e[rest][first], c[rest][first], g[rest][first]
        idx = er * (C * nnt) + cr * nnt + gr
        assert len(np.unique(idx)) == len(idx)
        dab[idx] = -sp[first]
    assert not np.isnan(dy).any(), "an element of dy is not written"
    assert dab is None or not np.isnan(dab).any(), "an edge's act_bias term is not written"
    return dy.reshape(E, C * dl), (dab.reshape(E, C * nnt) if dab is not None else None)


def trunk_backward(inp, layers, ys, as_, dh):
    """trunk_cuda.cu's trunk_backward with torch in place of ATen: (dinp, dweights, dbiases, dact_bias, dbn_factor,
    dbn_shift), None for a layer that is not norm (dact_bias) or has no affine map (dbn_*)."""
    n = len(layers)
    dws, dbs, das, dfs, dss = [None] * n, [None] * n, [None] * n, [None] * n, [None] * n
    dh = torch.from_numpy(dh)
    E = inp.shape[0]
    for k in reversed(range(n)):
        L = layers[k]
        bn = L["bn"]
        if bn is not None:
            dfs[k] = (dh * torch.from_numpy(as_[k])).sum(0).view(L["hout"] // bn["d"], bn["d"]).sum(1)
            dss[k] = dh.sum(0)
        stage("activation backward kernels")
        if L["act"] in (GATED, NORM):
            dy, dab = irrep_act_backward_kernel(ys[k], dh.numpy(), L)
            dy = torch.from_numpy(dy)
            if L["act"] == NORM:
                das[k] = torch.from_numpy(dab).sum(0) if dab is not None else torch.zeros(0, dtype=torch.float64)
        elif L["fd"] > 0:
            dy = torch.from_numpy(fourier_backward_kernel(ys[k], dh.numpy(), L))
        else:
            dy = torch.from_numpy(elu_backward_kernel(ys[k], dh.numpy(), L))
        assert tuple(dy.shape) == (E, L["lout"])
        stage("trunk Linear gradients (cuBLAS)")
        ain = torch.from_numpy(inp if k == 0 else as_[k - 1])
        pm = layers[k - 1]["bn"] if k > 0 else None
        db = dy.sum(0)
        dbs[k] = db
        hin = L["hin"]
        if pm is not None:
            pf, ps = torch.from_numpy(pm["f"]), torch.from_numpy(pm["s"])
            fexp = pf.unsqueeze(1).expand(hin // pm["d"], pm["d"]).reshape(hin)
        w = torch.from_numpy(L["w"])
        if L["cw_d"] == 0:
            dw = gemm(dy.t(), ain)
            if pm is not None:
                dw = (dw * fexp.unsqueeze(0)).addr(db, ps)
            dws[k] = dw
            dh = gemm(dy, w)
        else:
            D, Din, dm, t0 = L["cw_d"], L["cw_din"], L["cw_dm"], L["cw_t0"]
            cout, cin = L["lout"] // D, hin // Din
            dyv = dy.view(E, cout, D)

            def sel(m, D=D, dm=dm, t0=t0):
                if dm == D:
                    return m
                return torch.cat([m.narrow(0, 0, dm), m.narrow(0, t0, 1).expand(D - dm, *m.shape[1:])], 0)

            def by_component(v, c, Din=Din, sel=sel):
                return sel(v.view(c, Din).t())

            av = sel(ain.view(E, cin, Din).permute(2, 0, 1))
            dw = gemm(dyv.permute(2, 1, 0), av)
            if pm is not None:
                outer = db.view(cout, D).t().unsqueeze(2) * by_component(ps, cin).unsqueeze(1)
                dw = dw * by_component(fexp, cin).unsqueeze(1) + outer
            dws[k] = dw
            dsel = gemm(dyv.permute(2, 0, 1), w)  # (D, E, cin)
            if dm == D:
                dh = dsel.permute(1, 2, 0).reshape(E, hin)
            else:
                d3 = torch.zeros(E, cin, Din, dtype=dy.dtype)
                d3.narrow(2, 0, dm).copy_(dsel.narrow(0, 0, dm).permute(1, 2, 0))
                d3.select(2, t0).add_(dsel.narrow(0, dm, D - dm).sum(0))
                dh = d3.view(E, hin)
    return dh.numpy(), dws, dbs, das, dfs, dss


def trunk_moments(inp, weights, biases, fourier, fourier_inv, act_bias, in_factor, in_shift, structure, first_layer):
    """conv_cuda.cu's native_trunk_moments_cuda: (moments (2, H), the last activation before its batch norm)."""
    layers, H = prepare_trunk(weights, biases, fourier, fourier_inv, act_bias, structure, first_layer, inp.shape[1])
    assert len(in_factor) == len(layers) and len(in_shift) == len(layers)
    in_map = None
    for k in range(len(layers)):
        m = prepare_affine(in_factor[k], in_shift[k], inp.shape[1] if k == 0 else layers[k - 1]["hout"])
        if k == 0:
            in_map = m
        else:
            layers[k - 1]["bn"] = m
    stage("trunk forward (statistics passes)")
    mom = []
    h, _ = trunk_forward(inp.detach().numpy(), in_map, layers, moments=mom)
    if not mom:  # no layers (or no edges): ATen on h
        mean = h.mean(0)
        mom = [np.stack([mean, ((h - mean) ** 2).sum(0)])]
    return mom[0], h


# ------------------------------------------------------------------------------------------------------------------
# conv_cuda.cu
# ------------------------------------------------------------------------------------------------------------------
def build_plan(m):
    """The block plan of W' from its structural mask (R, H, C), with the fields of csrc/cpu/program.h's Plan: hidden
    units with equal (R x C) patterns form a group (units that reach no output are left out), within a group the
    columns with equal row sets a column group, each (group, column group) a pair whose block W'[rows, group,
    columns] is dense; a receiver's Z per group (columns x units), widx pair by pair (nr, nc, nh). The C++ plan may
    order groups and columns otherwise (program.cpp derives it from the structure's blocks): the CUDA code reads
    only this contract, which the emulation asserts (device_plan)."""
    R, H, C = m.shape
    groups, keys = [], {}
    for h in range(H):
        if m[:, h, :].any():
            k = keys.setdefault(m[:, h, :].tobytes(), len(groups))
            if k == len(groups):
                groups.append([])
            groups[k].append(h)
    plan = dict(hidden=[h for g in groups for h in g], perms=[], pairs=[], groups=[], rows=[], widx=[])
    perm_index = {}
    hoff = zoff = boff = 0
    for hs in groups:
        cgroups, ckeys = [], {}
        for c in range(C):
            col = m[:, hs[0], c]
            if col.any():
                k = ckeys.setdefault(col.tobytes(), len(cgroups))
                if k == len(cgroups):
                    cgroups.append([])
                cgroups[k].append(c)
        perm = tuple(c for cg in cgroups for c in cg)
        q = perm_index.setdefault(perm, len(plan["perms"]))
        if q == len(plan["perms"]):
            plan["perms"].append(perm)
        nh = len(hs)
        plan["groups"].append(dict(hoff=hoff, nh=nh, q=q, zoff=zoff))
        coff = 0
        for cg in cgroups:
            rs = [r for r in range(R) if m[r, hs[0], cg[0]]]
            nc = len(cg)
            plan["pairs"].append(
                dict(hoff=hoff, nh=nh, q=q, coff=coff, nc=nc, roff=len(plan["rows"]), nr=len(rs), zoff=zoff + coff * nh,
                     boff=boff)
            )  # fmt: skip
            plan["rows"] += rs
            plan["widx"] += [r * H * C + h * C + c for r in rs for c in cg for h in hs]
            boff += len(rs) * nc * nh
            coff += nc
        zoff += coff * nh
        hoff += nh
    plan["zsize"] = zoff
    plan["widx"] = np.array(plan["widx"], dtype=np.int64)
    return plan


def device_plan(plan, C):
    """conv_cuda.cu's device_plan: the flat column permutations (the identity last, for the bias row), the groups
    (hoff, nh, poff, lq, zoff) with the bias row's last, the Z kernel's tile rows th (the least padded area of 64,
    32, 16; FORCE_TH overrides) and its tiles (hrow, nh, ld, pcol, nc, zoff)."""
    perm, poffs = [], []
    for q in plan["perms"]:
        assert len(set(q)) == len(q) and all(0 <= c < C for c in q)  # a group's columns are distinct
        poffs.append(len(perm))
        perm += list(q)
    ident = len(perm)
    perm += list(range(C))
    gs = [(g["hoff"], g["nh"], poffs[g["q"]], len(plan["perms"][g["q"]]), g["zoff"]) for g in plan["groups"]]
    gs.append((-1, 1, ident, C, plan["zsize"]))

    def area(th):  # multiply-adds per edge: rows padded to th, columns to a warp's 512 / th
        wc = 32 * 16 // th
        return sum(-(-g[1] // th) * th * -(-g[3] // wc) * wc for g in gs)

    best, th = -1, 64
    for t in (64, 32, 16):
        if best < 0 or area(t) < best:
            best, th = area(t), t
    th = FORCE_TH or th
    tc = Z_TILE_AREA // th
    tiles = []
    for hoff, nh, poff, lq, zoff in gs:
        for h0 in range(0, nh, th):
            for c0 in range(0, lq, tc):
                hrow = hoff + h0 if hoff >= 0 else -1
                tiles.append((hrow, min(th, nh - h0), nh, poff + c0, min(tc, lq - c0), zoff + c0 * nh + h0))
    assert len(tiles) <= 65535
    return dict(
        plan=plan, zsize=plan["zsize"], zs=plan["zsize"] + C, S=len(plan["rows"]), th=th, tiles=tiles, groups=gs,
        perm=np.array(perm, dtype=np.int64), hidden=np.array(plan["hidden"], dtype=np.int64),
        rows=np.array(plan["rows"], dtype=np.int64), widx=plan["widx"],
    )  # fmt: skip


def z_kernel(h, h_map, s, x, src, rowptr, Z, r0, nr, H, C, dp):
    """ik_contract_z_kernel<T, th>, block (bx, tile); h_map (the last layer's affine map, for `hidden`) applied as h
    is staged, or None. Asserts that the tiles write every element of each receiver's Z exactly once."""
    h, x = h.reshape(-1), x.reshape(-1)
    TH = dp["th"]
    TC = Z_TILE_AREA // TH
    assert (TH // 4) * (TC // 4) == Z_THREADS
    hidden, perm = dp["hidden"], dp["perm"]
    for bx in range(nr):
        i = r0 + bx
        written = np.zeros(dp["zs"], dtype=np.int64)
        for hrow, nh, ld, pcol, nc, zoff in dp["tiles"]:
            acc = np.zeros((TH, TC))
            for eb in range(rowptr[i], rowptr[i + 1], Z_EDGES):
                nk = min(Z_EDGES, rowptr[i + 1] - eb)
                count(nk * TH * up(nc, 512 // TH))  # every warp with a live column, over the staged edges
                hs = np.zeros((Z_EDGES, TH))
                xs = np.zeros((Z_EDGES, TC))
                j, c = np.arange(nh), np.arange(nc)
                for k in range(nk):
                    e = eb + k
                    if hrow >= 0:
                        u = hidden[hrow + j]
                        hv = h[e * H + u]
                        if h_map is not None:
                            hv = hv * h_map["f"][u // h_map["d"]] + h_map["s"][u]
                        hs[k, j] = s[e] * hv
                    else:
                        hs[k, j] = s[e]
                    xs[k, c] = x[src[e] * C + perm[pcol + c]]
                # thread (th, tc) accumulates rows th * 4 + a and columns tc * 4 + b when live (tc * 4 < nc)
                live_c = (np.arange(TC) // 4) * 4 < nc
                acc[:, live_c] += hs[:nk].T @ xs[:nk, live_c]  # the products of the staged edges (k < nk)
            # and stores its micro-tile's rows < nh, columns < nc
            jj, cc = np.meshgrid(np.arange(TH), np.arange(TC), indexing="ij")
            live = (jj < nh) & (cc < nc)
            idx = zoff + cc[live] * ld + jj[live]
            Z[bx][idx] = acc[live]
            np.add.at(written, idx, 1)
        assert (written == 1).all(), "Z tiles do not cover the compact Z exactly once"


def edge_smem(te, C):
    ldc, ldh = odd(C), odd(EDGE_ROWS)
    return (3 * te * ldc + EDGE_ROWS * ldc + te * ldh) * ELEM


def edge_tile(C):
    te = 32
    while te > 1 and (edge_smem(te, C) > 96 * 1024 or edge_smem(te, C) > SMEM_LIMIT):
        te //= 2
    return te


def edge_kernel(dZ, h, s, x, src, rowptr, tile_ptr, dG, gz, dxe, r0, r1, H, C, te, hb, n_blocks, dp):
    h, x, dGf, dxef = h.reshape(-1), x.reshape(-1), dG.reshape(-1), dxe.reshape(-1)
    hidden, perm = dp["hidden"], dp["perm"]
    seen = 0
    for bx in range(n_blocks):
        t = tile_ptr[r0] + bx
        if t >= tile_ptr[r1]:
            continue
        seen += 1
        lo, hi = r0, r1 - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if tile_ptr[mid] <= t:
                lo = mid
            else:
                hi = mid - 1
        i = lo
        eb = rowptr[i] + (t - tile_ptr[i]) * te
        ne = min(te, rowptr[i + 1] - eb)
        assert ne >= 1
        ldc, ldh = C | 1, hb | 1
        xs, xg, dxa = np.zeros(te * ldc), np.zeros(te * ldc), np.zeros(te * ldc)
        dz, hr = np.zeros(hb * ldc), np.zeros(te * ldh)
        for k in range(ne):
            xs[k * ldc : k * ldc + C] = x[src[eb + k] * C : src[eb + k] * C + C]
        dZi = dZ[i - r0]
        dGt, gzt = eb * H, eb  # the tile's rows of dG, gz
        for hoff, nh, poff, lq, zoff in dp["groups"]:
            k, c = np.divmod(np.arange(ne * lq), lq)
            xg[k * ldc + c] = xs[k * ldc + perm[poff + c]]
            for j0 in range(0, nh, hb):
                hc = min(hb, nh - j0)
                c, j = np.divmod(np.arange(hc * lq), hc)
                dz[j * ldc + c] = dZi[zoff + c * nh + j0 + j]
                k, j = np.divmod(np.arange(ne * hc), hc)
                hr[k * ldh + j] = h[(eb + k) * H + hidden[hoff + j0 + j]] if hoff >= 0 else 1.0

                def st1(bi, m, n, v, hoff=hoff, j0=j0, dGt=dGt, gzt=gzt):
                    if hoff >= 0:
                        dGf[dGt + m * H + hidden[hoff + j0 + n]] = v
                    else:
                        gz[gzt + m] = v

                block_mm(1, ne, hc, lq, xg, lambda bi, m: m * ldc, 1, dz, lambda bi, n: n * ldc, 1, st1, tile=(2, 2))

                def st2(bi, m, n, v, poff=poff):
                    dxa[m * ldc + perm[poff + n]] += v  # (distinct (m, n), distinct columns: no repeated index)

                block_mm(1, ne, lq, hc, hr, lambda bi, m: m * ldh, 1, dz, lambda bi, n: n, ldc, st2, tile=(2, 2))
        for k in range(ne):
            for c in range(C):
                dxef[(eb + k) * C + c] = s[eb + k] * dxa[k * ldc + c]
    return seen


_PLANS = {}


def conv_inputs(x, inp, src, rowptr, weights, biases, fourier, fourier_inv, act_bias, bn_factor, bn_shift, fw, fb,
                coef, norm, ndim, structure):  # fmt: skip
    layers, H = prepare_trunk(weights, biases, fourier, fourier_inv, act_bias, structure, 0, inp.shape[1])
    assert len(bn_factor) == len(layers) and len(bn_shift) == len(layers)
    for L, f, sh in zip(layers, bn_factor, bn_shift):
        L["bn"] = prepare_affine(f, sh, L["hout"])
    R, _, C = fw.shape
    key = (structure, R, H, C)
    if key not in _PLANS:  # device_plan's cache (by the structure's content and the sizes)
        m = structure_mask(structure) if structure is not None else np.ones((R, H, C), dtype=bool)
        _PLANS[key] = build_plan(np.asarray(m, dtype=bool))
    dp = device_plan(_PLANS[key], C)
    B = fw.detach().numpy().reshape(-1)[dp["widx"]]  # packed_weight: gathered through widx
    inpn = inp.detach().numpy()
    r2 = (inpn[:, :ndim] ** 2).sum(1)
    s = np.exp(-float(coef.detach()) * r2) * norm
    return layers, H, R, C, dp, B, fb.detach().numpy(), inpn, r2, s


def pair_block(B, p):
    K = p["nc"] * p["nh"]
    return B[p["boff"] : p["boff"] + p["nr"] * K].reshape(p["nr"], K), K


def conv(x, inp, src, rowptr, *program, nr, hidden=None):
    """native_conv_cuda; ``hidden``: the last activation before its batch norm (the Z kernel applies the map)."""
    layers, H, R, C, dp, B, fb, inpn, r2, s = conv_inputs(x, inp, src, rowptr, *program)
    n_dst = rowptr.shape[0] - 1
    if hidden is not None:
        h, h_map = hidden, (layers[-1]["bn"] if layers else None)
    else:
        stage("trunk forward (conv)")
        h, h_map = trunk_forward(inpn, None, layers)[0], None
    out = np.zeros((n_dst, R))
    zsize, rows = dp["zsize"], dp["rows"]
    for r0 in range(0, n_dst, nr):
        n = min(nr, n_dst - r0)
        Z = np.full((n, dp["zs"]), np.nan)  # at::empty: a slot no tile writes poisons the result
        stage("Z kernel")
        z_kernel(h, h_map, s, x.detach().numpy(), src.numpy(), rowptr.numpy(), Z, r0, n, H, C, dp)
        stage("W' pair GEMMs + bias row")
        o = gemm(Z[:, zsize : zsize + C], fb.T)  # the bias row
        if dp["S"] > 0:
            T = np.full((n, dp["S"]), np.nan)
            for p in dp["plan"]["pairs"]:  # pairs_forward
                Bp, K = pair_block(B, p)
                T[:, p["roff"] : p["roff"] + p["nr"]] = gemm(Z[:, p["zoff"] : p["zoff"] + K], Bp.T)
            for slot, r in enumerate(rows):  # index_add_(1, rows, T)
                o[:, r] += T[:, slot]
        out[r0 : r0 + n] = o
    return out


def conv_backward(grad, x, inp, src, rowptr, *program, nr):
    """native_conv_backward_cuda: [dx, dinp, *dweights, *dbiases, *dact_bias, *dbn_factor, *dbn_shift, dfw, dfb,
    dcoef], empty arrays shaped as the act_bias of a layer that is not norm and the factor / shift of a layer without
    batch norm."""
    act_bias, bn_factor, bn_shift = program[4], program[5], program[6]
    layers, H, R, C, dp, B, fb, inpn, r2, s = conv_inputs(x, inp, src, rowptr, *program)
    coef = program[9]
    ndim = program[11]
    E, n_dst = inp.shape[0], rowptr.shape[0] - 1
    xn, srcn, rp = x.detach().numpy(), src.numpy(), rowptr.numpy()
    stage("trunk forward (backward's recompute)")
    h, saves = trunk_forward(inpn, None, layers, save=True)
    if saves is not None and layers[-1]["bn"] is None:
        assert h is saves[1][-1]  # the output went straight into as.back()
    te = edge_tile(C)
    deg = rp[1:] - rp[:-1]
    tile_ptr = np.concatenate([[0], np.cumsum((deg + te - 1) // te)])
    dh, ds, dxe = np.zeros((E, H)), np.zeros(E), np.zeros((E, C))
    dB, dfb = np.zeros(len(dp["widx"])), np.zeros((R, C))
    zsize = dp["zsize"]
    g = grad.detach().numpy()
    tiles = 0
    for r0 in range(0, n_dst, nr):
        n = min(nr, n_dst - r0)
        Z = np.full((n, dp["zs"]), np.nan)
        stage("Z kernel")
        z_kernel(h, None, s, xn, srcn, rp, Z, r0, n, H, C, dp)
        gc = g[r0 : r0 + n]
        stage("W' pair GEMMs + bias row")
        dfb += gemm(gc.T, Z[:, zsize:])  # dB_F += grad_c^T Z_c[bias]
        if dp["S"] > 0:  # pairs_backward
            Gp = gc[:, dp["rows"]]
            for p in dp["plan"]["pairs"]:
                Bp, K = pair_block(B, p)
                gp = Gp[:, p["roff"] : p["roff"] + p["nr"]]
                z = Z[:, p["zoff"] : p["zoff"] + K]
                dB[p["boff"] : p["boff"] + p["nr"] * K] += gemm(gp.T, z).reshape(-1)
                Z[:, p["zoff"] : p["zoff"] + K] = gemm(gp, Bp)  # dZ over the pair's own block
        Z[:, zsize:] = gemm(gc, fb)  # dZ_c[bias]
        stage("edge backward")
        tiles += edge_kernel(
            Z, h, s, xn, srcn, rp, tile_ptr, dh, ds, dxe, r0, r0 + n, H, C, te, EDGE_ROWS, -(-E // te) + n, dp
        )
    assert tiles == tile_ptr[-1], (tiles, tile_ptr[-1])
    ds = ds + (dh * h).sum(1)
    dh = dh * s[:, None]
    dx = np.zeros_like(xn)
    np.add.at(dx, srcn, dxe)
    if layers:
        stage("trunk backward")
        dinp, dws, dbs, das, dfs, dss = trunk_backward(inpn, layers, saves[0], saves[1], dh)
    else:
        dinp, dws, dbs, das, dfs, dss = dh, [], [], [], [], []
    wds = ds * s
    dcoef = -(wds * r2).sum()
    dinp = dinp.copy()
    dinp[:, :ndim] += inpn[:, :ndim] * wds[:, None] * (-2.0 * float(coef.detach()))
    dfw = np.zeros(R * H * C)
    dfw[dp["widx"]] = dB  # index_copy_(0, widx, dB): zero outside the structure
    dfs = [d.numpy() if d is not None else np.zeros(tuple(f.shape)) for d, f in zip(dfs, bn_factor)]
    dss = [d.numpy() if d is not None else np.zeros(tuple(t.shape)) for d, t in zip(dss, bn_shift)]
    das = [
        d.numpy().reshape(tuple(b.shape)) if d is not None else np.zeros(tuple(b.shape)) for d, b in zip(das, act_bias)
    ]
    return [
        dx, dinp, *[d.numpy() for d in dws], *[d.numpy() for d in dbs], *das, *dfs, *dss, dfw.reshape(R, H, C), dfb,
        np.array([dcoef]),
    ]  # fmt: skip


# ------------------------------------------------------------------------------------------------------------------
# a random program and graph
# ------------------------------------------------------------------------------------------------------------------
def random_case(
    seed, spec, P0=5, ndim=3, C=6, R=5, n_src=9, n_dst=11, degrees=None, with_structure=True, couple=0.5, uncoupled=(),
    zero=(),
):  # fmt: skip
    """spec: per hidden layer (kind, width args, activation[, batch-norm channels]); kind "dense" or "cw"
    (componentwise); activation None (pointwise ELU), (G, D) (Fourier ELU) or ("gated" | "norm", irreps) with irreps
    ((size, trivial), ...); width args: H_out (dense) or (D, C_out) (cw) for ELU and Fourier ELU, the channels C_out
    for gated and norm (a gated layer's Linear makes C_out (D + gates) units, a componentwise one reads the gates from
    the previous field's first trivial component); the batch norm's channels: 0 for none, by default one per channel
    (per unit for a pointwise ELU). The first ``ndim`` of the P0 MLP inputs are the edge vector, the others
    attributes. ``zero``: (layer, channel, non-trivial irrep) triples whose Linear rows and biases are zero, so that
    the irrep is exactly zero on every edge (|v| = 0)."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    empty = lambda: torch.zeros(0, dtype=torch.float64, requires_grad=True)  # noqa: E731
    weights, biases, fourier, fourier_inv, act_bias, bn_factor, bn_shift = [], [], [], [], [], [], []
    layouts = []  # the structure's hidden layers
    hin, prev_d = P0, P0
    for k, (kind, shape, act, *bn) in enumerate(spec):
        irreps = act is not None and isinstance(act[0], str)
        if irreps:
            name, irr = act
            D = sum(size for size, _ in irr)
            lay = HiddenLayout(shape, D, 0, kind == "cw", True, name, tuple(irr))
            dl, co = lay.linear_components, shape
            if kind == "dense":
                w = rnd(co * dl, hin) / hin**0.5
            else:
                w = rnd(dl, co, hin // prev_d) / (hin // prev_d) ** 0.5
            lout, hout = co * dl, co * D
        elif kind == "dense":
            w = rnd(shape, hin) / hin**0.5
            lout = hout = shape
        else:
            D, co = shape
            w = rnd(D, co, hin // D) / (hin // D) ** 0.5
            lout = hout = D * co
        b = 0.3 * rnd(lout)
        for kz, cz, gz in zero:
            if kz == k:  # the rows of non-trivial irrep gz of channel cz
                triv, idx = lay.component_irreps()
                rows = [cz * dl + a for a in range(D) if not triv[a] and idx[a] == gz]
                if w.dim() == 2:
                    w[rows] = 0.0
                else:
                    w[[r % dl for r in rows], cz] = 0.0
                b[rows] = 0.0
        weights.append(w.requires_grad_())
        biases.append(b.requires_grad_())
        if act is None or irreps:
            fourier.append(torch.zeros(0, dtype=torch.float64))
            fourier_inv.append(torch.zeros(0, dtype=torch.float64))
        else:
            G, D = act
            A = rnd(G, D) / D**0.5
            fourier.append(A)
            fourier_inv.append(torch.linalg.pinv(A))
        if irreps:
            channels = bn[0] if bn else shape
            layouts.append(HiddenLayout(shape, lay.components, 0, kind == "cw", bool(channels), name, lay.irreps))
            prev_d = lay.components
            if name == "norm":
                act_bias.append((0.5 * rnd(lay.bias_size)).requires_grad_())
            else:
                act_bias.append(empty())
        else:
            act_bias.append(empty())
            D_k = act[1] if act is not None else 1
            kind_k = "fourier_elu" if act is not None else "elu"
            grid = act[0] if act is not None else 0
            channels = bn[0] if bn else (hout // act[1] if act is not None else hout)
            layouts.append(HiddenLayout(hout // D_k, D_k, grid, kind == "cw", bool(channels), kind_k))
            prev_d = D_k
        if channels:
            bn_factor.append((1.0 + 0.5 * rnd(channels)).requires_grad_())
            bn_shift.append((0.3 * rnd(hout)).requires_grad_())
        else:
            bn_factor.append(empty())
            bn_shift.append(empty())
        hin = hout
    H = hin
    if degrees is None:
        degrees = torch.randint(0, 6, (n_dst,), generator=g)
    else:
        degrees = torch.as_tensor(degrees)
        n_dst = degrees.shape[0]
    E = int(degrees.sum())
    rowptr = torch.cat([torch.zeros(1, dtype=torch.long), degrees.cumsum(0)])
    src = torch.randint(0, n_src, (E,), generator=g)
    x = rnd(n_src, C).requires_grad_()
    inp = rnd(E, P0).requires_grad_()
    fw = rnd(R, H, C).requires_grad_()
    fb = rnd(R, C).requires_grad_()
    coef = torch.tensor([0.7], dtype=torch.float64, requires_grad=True)
    structure = random_structure(g, R, H, C, couple, uncoupled, layouts) if with_structure else None
    return [
        x, inp, src, rowptr, weights, biases, fourier, fourier_inv, act_bias, bn_factor, bn_shift, fw, fb, coef, 0.5,
        ndim, structure,
    ]  # fmt: skip


def random_structure(g, R, H, C, couple=0.5, uncoupled=(), layouts=()):
    """A random encoded structure of W' (R, H, C): fields of sizes 1 to 3 grouped by size (offsets interleaved), H as
    channels x components (D = 3, 2 or 1; a gated / norm last layer's own), a fraction ``couple`` of the (output
    group, component, input group) triples coupled (none of the components in ``uncoupled``: their units reach no
    output), each on a random non-empty set of its field pair's entries. ``layouts``: the hidden layers (the last
    one's layout set to H's unless it is gated / norm)."""
    rand = lambda: float(torch.rand(1, generator=g))  # noqa: E731

    def fields(n):
        sizes = []
        while sum(sizes) < n:
            sizes.append(min(int(torch.randint(1, 4, (1,), generator=g)), n - sum(sizes)))
        by_size = {}
        for d, o in zip(sizes, np.cumsum([0] + sizes[:-1])):
            by_size.setdefault(d, []).append(int(o))
        return tuple(FieldGroup(d, tuple(o)) for d, o in sorted(by_size.items()))

    layers = tuple(layouts)
    fixed = bool(layers) and layers[-1].activation in ("gated", "norm")
    D = layers[-1].components if fixed else next(d for d in (3, 2, 1) if H % d == 0)
    out_groups, in_groups = fields(R), fields(C)
    blocks = []
    for og, go in enumerate(out_groups):
        for a in range(D):
            for ig, gi in enumerate(in_groups):
                if rand() < couple and a not in uncoupled:
                    n = go.d * gi.d
                    entries = [e for e in range(n) if rand() < 0.6] or [int(torch.randint(0, n, (1,), generator=g))]
                    blocks.append(Block(og, a, ig, tuple(entries)))
    if layers and not fixed:
        last = layers[-1]
        last = HiddenLayout(H // D, D, last.grid, last.componentwise, last.batch_norm, last.activation)
        layers = layers[:-1] + (last,)
    return ConvSpec(R, C, H // D, D, layers, out_groups, in_groups, tuple(blocks)).encode()


def rel(a, b) -> float:
    """max |a - b| / max |b| (0 for empty tensors)."""
    b = b.detach()
    if b.numel() == 0:
        assert np.asarray(a).size == 0, np.asarray(a).shape
        return 0.0
    return float(np.abs(np.asarray(a).reshape(b.shape) - b.numpy()).max()) / max(1e-30, float(b.abs().max()))


def check(name, args, nr, tol=1e-10):
    """conv (without and with `hidden`), conv_backward and trunk_moments (from inp and chained from each layer's
    activation) of the emulation against the op layer's plain-PyTorch statements."""
    x, inp, src, rowptr, weights, biases, fourier, fourier_inv, act_bias, bn_factor, bn_shift, fw, fb, coef = args[:14]
    structure = args[16]
    L = len(weights)
    empty = torch.zeros(0, dtype=torch.float64)
    ref = ops.conv_reference_form(*args)
    errs = {"forward": rel(conv(*args, nr=nr), ref)}
    # trunk_moments from inp, and chained: from the activation a_j of layer j (before its batch norm), with its batch
    # norm as in_factor[0]
    moments = []
    acts = [inp.detach()]
    for upto in range(1, L + 1):
        lists = (weights[:upto], biases[:upto], fourier[:upto], fourier_inv[:upto], act_bias[:upto])
        in_f, in_s = [empty, *bn_factor[: upto - 1]], [empty, *bn_shift[: upto - 1]]
        with torch.no_grad():
            want = ops.trunk_moments_reference_form(inp.detach(), *lists, in_f, in_s, structure, 0)
        got = trunk_moments(inp, *lists, in_f, in_s, structure, 0)
        moments += [rel(got[0], want[0]), rel(got[1], want[1])]
        acts.append(want[1])
        for j in range(1, upto):  # from a_j (j = 1 .. upto - 1), through layers j + 1 .. upto
            rest = (weights[j:upto], biases[j:upto], fourier[j:upto], fourier_inv[j:upto], act_bias[j:upto])
            got = trunk_moments(acts[j], *rest, bn_factor[j - 1 : upto - 1], bn_shift[j - 1 : upto - 1], structure, j)
            moments += [rel(got[0], want[0]), rel(got[1], want[1])]
    errs["trunk_moments"] = max(moments, default=0.0)
    if L:
        errs["forward with hidden"] = rel(conv(*args, nr=nr, hidden=acts[-1].numpy()), ref)
    grad = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    leaves = [x, inp, *weights, *biases, *act_bias, *bn_factor, *bn_shift, fw, fb, coef]
    ref_g = torch.autograd.grad(ref, leaves, grad, allow_unused=True)
    ours = conv_backward(grad, *args, nr=nr)
    assert len(ours) == 5 * L + 5 == len(leaves)
    gerrs = [rel(a, torch.zeros_like(leaf) if b is None else b) for a, b, leaf in zip(ours, ref_g, leaves)]
    errs["gradients"] = max(gerrs)
    worst = max(errs.values())
    print(f"{name:44s} " + "  ".join(f"{k} {v:.1e}" for k, v in errs.items()) + f"  {'ok' if worst < tol else 'FAIL'}")
    return worst < tol


def main(argv=None):
    global TC, MAX_LAYERS, FORCE_TH
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--only",
        choices=("irreps",),
        help="irreps: only the gated and norm cases (random fields through both GEMM tilings, ik_fast's layers)",
    )
    parser.add_argument(
        "--count",
        metavar="PROBLEMS",
        help="instead of the checks: the multiply-adds per edge of a training step on these problems (e.g. M,H), "
        "stage by stage, counted from the replay",
    )
    parser.add_argument(
        "--precision",
        action="store_true",
        help="the block GEMMs' float32 modes (IEEE, TF32, 3xTF32) against float64 on ik_fast's layers; exit 1 where "
        f"3xTF32's error exceeds {PRECISION_BOUND}x IEEE float32's",
    )
    parser.add_argument("--json", help="with --count: the counts as work records; with --precision: its records")
    args = parser.parse_args(argv)
    if args.count:
        count_main(args.count.split(","), args.json)
        return 0
    if args.precision:
        ok = precision_cases(args.json)
        print("all ok" if ok else "FAILURES")
        return 0 if ok else 1
    ok = True
    if args.only == "irreps":
        for tc in (False, True):
            TC = tc
            ok &= irreps_cases()
        TC = False
        ok &= layer_cases()
        print("all ok" if ok else "FAILURES")
        return 0 if ok else 1
    for TC in (False, True):
        path = "block_mm_tf32 (TF32 path's tiling, exact arithmetic)" if TC else "block_mm (IEEE path)"
        print("block GEMMs as", path)
        ok &= cases()
        ok &= irreps_cases()
    ok &= layer_cases()
    TC = False
    for FORCE_TH in (16, 32, 64):
        print(f"Z kernel tiles of {FORCE_TH} hidden rows x {Z_TILE_AREA // FORCE_TH} columns")
        ok &= check("several tiles, groups of 35 units", several_tiles(), nr=3)
        ok &= check("several tiles, dense", several_tiles(with_structure=False), nr=3)
    FORCE_TH = None
    MAX_LAYERS = 2
    print(f"trunk launches of at most {MAX_LAYERS} layers (kMaxLayers lowered: the chained launches)")
    ok &= chained_cases()
    print("all ok" if ok else "FAILURES")
    return 0 if ok else 1


def cases():
    ok = True
    fourier_cw = [("dense", 12, (10, 3)), ("cw", (3, 4), (10, 3))]  # H = 12: 4 channels of 3 components
    ok &= check("fourier, dense + componentwise, structure", random_case(0, fourier_cw), nr=4)
    ok &= check(
        "structure: component 1 reaches no output", random_case(13, fourier_cw, couple=0.8, uncoupled=(1,)), nr=4
    )
    ok &= check("structure without blocks (W' zero)", random_case(14, fourier_cw, couple=0.0), nr=4)
    ok &= check("fourier, no structure (dense), one chunk", random_case(1, fourier_cw, with_structure=False), nr=100)
    ok &= check("pointwise, dense + dense", random_case(2, [("dense", 7, None), ("dense", 9, None)]), nr=3)
    # (a structure does not mix activation kinds: the mixed trunks go without one)
    ok &= check(
        "mixed: fourier, pointwise, 3 layers (dense)",
        random_case(3, [("dense", 8, (40, 4)), ("cw", (4, 2), (40, 4)), ("dense", 6, None)], with_structure=False),
        nr=5,
    )
    ok &= check("no hidden layer", random_case(4, []), nr=2)
    ok &= check("ndim = 0", random_case(5, fourier_cw, ndim=0), nr=4)
    ok &= check(
        "skew (one receiver with 70 edges), isolated", random_case(6, fourier_cw, degrees=[0, 70, 0, 3, 0, 33, 1]), nr=2
    )
    # batch norms: none at all; only on some layers (the last one's missing, or only the last one's); channels
    # other than the Fourier ELU's or the componentwise Linear's components (D = 6 before a componentwise Linear of
    # D = 3; D = 2 on a pointwise layer)
    ok &= check("no batch norm", random_case(8, [("dense", 12, (10, 3), 0), ("cw", (3, 4), (10, 3), 0)]), nr=4)
    ok &= check(
        "batch norm on the first layer only",
        random_case(9, [("dense", 12, (10, 3), 2), ("cw", (3, 4), (10, 3), 0)]),
        nr=4,
    )
    ok &= check(
        "batch norm on the last layer only, pointwise",
        random_case(10, [("dense", 7, None, 0), ("dense", 8, None, 4)]),
        nr=3,
    )
    # wide enough that the tiles, Fourier chunks and Z tiles have several pieces: H = 70 hidden (35 channels x 2
    # components: groups of 35 units, > 32 rows of the edge backward), C = 40 inputs (columns of a group up to 40, >
    # 32 Z columns), G = 70 grid points (> 32 per chunk); and the same without a structure (one group of 70 units,
    # > 64 Z rows)
    ok &= check("several tiles of every kind", several_tiles(), nr=3)
    ok &= check("several tiles, dense", several_tiles(with_structure=False), nr=3)
    return ok


# fields as direct sums of irreps (size, trivial): mixed sizes, a one-dimensional non-trivial irrep, the first trivial
# component not the first component (what a componentwise Linear's gates read), only trivial irreps (no gates / bias)
IRR_A = ((1, True), (3, False), (1, False), (2, False))  # D = 7, 3 non-trivial
IRR_B = ((2, False), (1, True), (3, False))  # D = 6, 2 non-trivial, first trivial component 2
IRR_T = ((1, True), (1, True))  # D = 2, no non-trivial irrep


def irreps_cases():
    """gated and norm: dense and componentwise Linears, batch norm on / off, attributes, an irrep that is exactly
    zero (|v| = 0), a componentwise Linear between fields of different sizes, fields without non-trivial irreps."""
    ok = True
    for k in ("gated", "norm"):
        ok &= check(
            f"{k}: dense + cw, batch norm, t0 = 2",
            random_case(20, [("dense", 3, (k, IRR_B)), ("cw", 2, (k, IRR_B))]),
            nr=4,
        )
        ok &= check(
            f"{k}: dense + dense, no batch norm, a zero irrep",
            random_case(21, [("dense", 2, (k, IRR_A), 0), ("dense", 3, (k, IRR_A), 0)], zero=[(0, 1, 1), (1, 0, 2)]),
            nr=3,
        )
        # (a componentwise Linear between different fields: a gated layer's, whose components read their own and
        # whose gates read t0; a norm layer's Linear into another field is dense)
        third = ("cw", 2, (k, IRR_B), 2) if k == "gated" else ("dense", 2, (k, IRR_B), 2)
        ok &= check(
            f"{k}: 3 layers, attributes, 7 then 6 components",
            random_case(22, [("dense", 3, (k, IRR_A), 3), ("cw", 3, (k, IRR_A), 0), third], P0=7, zero=[(1, 2, 0)]),
            nr=5,
        )
        ok &= check(
            f"{k}: only trivial irreps", random_case(23, [("dense", 3, (k, IRR_T)), ("cw", 4, (k, IRR_T))]), nr=4
        )
        # wide: Linear outputs past a micro-tile's and a warp tile's width (gated: 10 channels x 10 units), edge
        # tiles of 16, Z tiles of several pieces
        ok &= check(
            f"{k}: several tiles",
            random_case(25, [("dense", 10, (k, IRR_A)), ("cw", 10, (k, IRR_A), 5)], C=40, R=3, degrees=[20, 0, 35, 2]),
            nr=3,
        )
        ok &= check(
            f"{k}: no structure reaches component 1",
            random_case(24, [("dense", 2, (k, IRR_B)), ("cw", 2, (k, IRR_B))], couple=0.8, uncoupled=(1,)),
            nr=4,
        )
    return ok


def layer_case(group, nonlinearity, n_nodes=6, n_edges=16, seed=0):
    """The op arguments of an ik_fast.ImplicitPointConv (n_layers=3, n_channels=2, eval mode: every batch norm an
    affine map from random running statistics) with escnn's own field types (mixed fields in and out, scalar, vector
    and pseudoscalar attributes) and the structure its basis gives, on a small random graph."""
    import escnn.nn as enn
    from escnn import gspaces

    import ik_fast
    from ik_fast.graph import prepare_graph
    from ik_fast.testing import randomize_

    gs = {"O3": gspaces.flipRot3dOnR3, "SO2": gspaces.rot2dOnR3}[group]()
    G, std = gs.fibergroup, gs.basespace_action
    base = (
        G.bl_sphere_representation(L=1) if hasattr(G, "bl_sphere_representation") else G.bl_regular_representation(L=1)
    )
    odd = [irr for irr in G.irreps() if irr.size == 1 and not irr.is_trivial()][:1]
    in_t = enn.FieldType(gs, [G.trivial_representation, std, base])
    out_t = enn.FieldType(gs, [base, std, G.trivial_representation] + odd)
    attr_t = enn.FieldType(gs, [G.trivial_representation, std] + odd)
    torch.manual_seed(seed)
    conv = ik_fast.ImplicitPointConv(in_t, out_t, attr_t, n_layers=3, n_channels=2, nonlinearity=nonlinearity)
    conv = randomize_(conv, seed).double().eval()
    g = torch.Generator().manual_seed(seed)
    pos = torch.randn(n_nodes, 3, generator=g, dtype=torch.float64)
    ei = torch.randint(0, n_nodes, (2, n_edges), generator=g)
    a = torch.randn(n_edges, attr_t.size, generator=g, dtype=torch.float64)
    x = torch.randn(n_nodes, in_t.size, generator=g, dtype=torch.float64)
    prog = conv.kernel.program()
    gr = prepare_graph(ei, n_nodes, n_nodes)
    inp = prog.mlp_input(pos[ei[0]] - pos[ei[1]], a)[gr.perm].contiguous()
    p = prog.op_program([], torch.float64)
    leaf = lambda t: t.detach().clone().requires_grad_()  # noqa: E731
    return [
        leaf(x), leaf(inp), gr.src[gr.perm].contiguous(), gr.rowptr, [leaf(w) for w in p.weights],
        [leaf(b) for b in p.biases], p.fourier, p.fourier_inv, [leaf(t) for t in p.act_bias],
        [leaf(f) for f in p.bn_factor], [leaf(t) for t in p.bn_shift], leaf(p.final_weight), leaf(p.final_bias),
        leaf(p.coef), p.norm, p.ndim, p.structure,
    ]  # fmt: skip


def layer_cases():
    """gated and norm programs as ik_fast's layers make them: O(3) (a componentwise hidden Linear, irreps of sizes 1,
    3, 5, 7, pseudoscalars) and SO(2) on R^3 (dense)."""
    ok = True
    for group in ("O3", "SO2"):
        for k in ("gated", "norm"):
            args = layer_case(group, k)
            shapes = [tuple(w.shape) for w in args[4]]
            ok &= check(f"{k}: ImplicitPointConv {group} {shapes}", args, nr=4)
    return ok


def several_tiles(with_structure=True):
    spec = [("dense", 70, (70, 7)), ("cw", (7, 10), (70, 7))]
    return random_case(7, spec, C=40, R=3, degrees=[20, 0, 35, 2], with_structure=with_structure)


def chained_cases():
    ok = True
    spec = [("dense", 8, (12, 4)), ("dense", 6, None, 3), ("cw", (2, 3), None, 0), ("dense", 8, (12, 4))]
    # (mixed activation kinds: without a structure)
    ok &= check("4 layers in launches of 2 (dense)", random_case(11, spec, with_structure=False), nr=4)
    ok &= check(
        "3 layers, last without batch norm (dense)",
        random_case(12, spec[:2] + [("dense", 5, None, 0)], with_structure=False),
        nr=4,
    )
    for k in ("gated", "norm"):
        spec = [("dense", 2, (k, IRR_B), 2), ("cw", 2, (k, IRR_B), 0), ("cw", 3, (k, IRR_B)), ("dense", 2, (k, IRR_A))]
        ok &= check(f"{k}: 4 layers in launches of 2", random_case(26, spec, zero=[(0, 0, 1)]), nr=4)
    return ok


# ------------------------------------------------------------------------------------------------------------------
# --count: the multiply-adds of a training step per edge, from the replay
# ------------------------------------------------------------------------------------------------------------------
def step_args(problem, seed=0):
    """(lowered program, op arguments) of a problem's layer (ik_fast.tools.problems: field types, MLP, graph;
    ``H@32`` names its graph's nodes), float64; the batch norms' maps from the running statistics (only the sizes
    matter to a count)."""
    from ik_fast.graph import prepare_graph
    from ik_fast.tools.problems import build_inputs, build_layer, get_problem

    p = get_problem(problem)
    layer = build_layer(p, backend="torch", seed=seed).double().eval()
    x, pos, ei, attr = build_inputs(p, seed=seed, dtype=torch.float64)
    prog = layer.kernel.program()
    n = x.shape[0]
    gr = prepare_graph(ei, n, n)
    inp = prog.mlp_input(pos[ei[0]] - pos[ei[1]], attr)[gr.perm].contiguous()
    op = prog.op_program([], torch.float64)
    return prog, [
        x, inp, gr.src[gr.perm].contiguous(), gr.rowptr, list(op.weights), list(op.biases), list(op.fourier),
        list(op.fourier_inv), list(op.act_bias), list(op.bn_factor), list(op.bn_shift), op.final_weight,
        op.final_bias, op.coef, op.norm, op.ndim, op.structure,
    ]  # fmt: skip


def count_step(args):
    """The multiply-adds per stage ({stage: [IEEE, TF32]}) of one training step on the CUDA device as the native
    backend runs it (ik_fast.backends.fused: chained statistics passes, one per layer with a batch norm, no tape on
    CUDA; conv with the last pass's activation; conv_backward), replayed here with float32's tile sizes."""
    global COUNT, ELEM
    x, inp, src, rowptr, weights, biases, fourier, fourier_inv, act_bias, bn_factor, bn_shift = args[:11]
    structure = args[16]
    assert all(f.numel() > 0 for f in bn_factor), "a batch norm after every hidden layer (as in ik_fast's layers)"
    empty = torch.zeros(0, dtype=torch.float64)
    COUNT, ELEM = {}, 4
    try:
        cur = inp.detach()
        for k in range(len(weights)):  # the statistics passes, chained
            lists = [t[k : k + 1] for t in (weights, biases, fourier, fourier_inv, act_bias)]
            in_f = [empty] if k == 0 else [bn_factor[k - 1]]
            in_s = [empty] if k == 0 else [bn_shift[k - 1]]
            cur = torch.from_numpy(trunk_moments(cur, *lists, in_f, in_s, structure, k)[1])
        n_dst = rowptr.shape[0] - 1
        out = conv(*args, nr=n_dst, hidden=cur.numpy() if len(weights) else None)
        conv_backward(torch.ones(out.shape, dtype=torch.float64), *args, nr=n_dst)
        return COUNT
    finally:
        COUNT, ELEM = None, 8


def count_problem(problem):
    """The slope per edge of count_step between the two graphs ik_fast.tools.workcount.graph_sizes names for
    ``problem`` (the same degree: per-receiver work scales with the edges too), per stage, with the floor."""
    from ik_fast.tools.cases import floor_per_edge
    from ik_fast.tools.workcount import graph_sizes

    steps = []
    for name in graph_sizes(problem):
        prog, args = step_args(name)
        steps.append((int(args[1].shape[0]), count_step(args)))
    (e0, c0), (e1, c1) = steps
    per = {k: [(c1[k][i] - c0.get(k, [0, 0])[i]) / (e1 - e0) for i in (0, 1)] for k in c1}
    floor = floor_per_edge(prog)
    total = [sum(v[i] for v in per.values()) for i in (0, 1)]
    return dict(
        problem=problem, graphs=graph_sizes(problem), edges=[e0, e1], stages=per, ieee=total[0], tf32=total[1],
        floor=floor["floor"], counts=[c0, c1],
    )  # fmt: skip


def count_main(problems, json_out=None):
    rows = []
    for problem in problems:
        r = count_problem(problem)
        rows.append(r)
        print(f"{problem}: graphs {r['graphs']} ({r['edges'][0]:,} -> {r['edges'][1]:,} edges), multiply-adds per edge")
        for k, (a, b) in sorted(r["stages"].items(), key=lambda kv: -kv[1][0]):
            print(f"  {k:42s} {a:>12,.0f}  (TF32 tiles {b:,.0f})")
        print(
            f"  {'total':42s} {r['ieee']:>12,.0f}  (TF32 tiles {r['tf32']:,.0f});  floor {r['floor']:,}: "
            f"{r['ieee'] / r['floor']:.2f}x (TF32 {r['tf32'] / r['floor']:.2f}x)"
        )
    if json_out:
        from ik_fast import records

        prov = records.provenance("cpu")
        prov["device"] = {"type": "cpu", "name": "native CUDA kernels replayed in NumPy"}
        out = []
        for r in rows:
            extra = {
                "edges": r["edges"],
                "graphs": r["graphs"],
                "floor_per_edge": r["floor"],
                "ratio_to_floor": r["ieee"] / r["floor"],
                "tf32_macs_per_edge": r["tf32"],
                "stages_per_edge": {k: {"ieee": v[0], "tf32": v[1]} for k, v in r["stages"].items()},
                "counts": r["counts"],
                "what": "multiply-adds of a training step (chained statistics passes, conv, conv_backward) that the "
                "native CUDA kernels and their host GEMMs execute, counted while tests/tools/emulate_check.py replays "
                "every launch with the host's float32 tile choices: block_mm at its micro-tiles' padded shape (TF32: "
                "16 x 16 x 8 warp tiles), the Z kernel per warp and 16-edge batch, cuBLAS GEMMs at their shapes; the "
                "slope per edge between the two graphs",
                "command": "PYTHONPATH=. python tests/tools/emulate_check.py --count "
                + ",".join(x["problem"] for x in rows),
            }
            out.append(
                records.record(
                    "work",
                    r["problem"],
                    "native-cuda",
                    "macs_per_edge",
                    r["ieee"],
                    "MAC",
                    mode="train",
                    precision="ieee",
                    extra=extra,
                    prov=prov,
                )  # fmt: skip
            )
        records.write(json_out, out)
        print("wrote", json_out)
    return rows


if __name__ == "__main__":
    sys.exit(main())
