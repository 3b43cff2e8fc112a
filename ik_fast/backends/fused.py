"""The ``triton`` backend: the fused kernels of :mod:`ik_fast.kernels_triton.conv` behind registered PyTorch ops.

Host side of the fused path:

* **tiling** (cached per graph): edges in receiver order cut into tiles of ``BE`` edges; a *segment* is the part of one
  receiver's edge list inside one tile. The forward op returns one row per segment and the host sums each receiver's
  segments with ``torch.segment_reduce`` (deterministic, no atomics).
* **packing**: the lowered program becomes padded dense tensors with every batch norm folded into the Linear after it
  (differentiable, so gradients reach escnn's parameters through autograd). In training, a statistics pass per batch
  norm runs first (op ``ik_fast::fused_stats``, trunk recomputed up to that layer), detached as escnn does.
* **ops**: ``ik_fast::fused_conv`` (forward) with ``register_fake`` and ``register_autograd``; its backward is the op
  ``ik_fast::fused_conv_bwd`` (fused, trunk recomputed on chip). When a double backward is asked for
  (``create_graph=True``), the backward instead evaluates the same packed computation in plain PyTorch
  (:func:`packed_conv_torch`) and differentiates it, so forces and other second derivatives work.
* **precision**: float64 runs in IEEE arithmetic; float32 follows ``torch.get_float32_matmul_precision()`` ("highest"
  -> IEEE, otherwise TF32); under ``torch.autocast(dtype=torch.bfloat16)`` the GEMM operands are bfloat16 and
  accumulation stays float32.
* **backward memory**: the last layer's weight gradient is ``sum_i Z_i (x) dout_i``; the backward kernel writes the Z
  rows of its segments one chunk of tiles at a time (``Z_CHUNK_BUDGET``) and each chunk is contracted in one GEMM.
* **determinism**: the forward has no atomics; the small parameter gradients are summed per program and then over
  programs in a fixed order, the last layer's chunk by chunk; the gradient to the source features goes through
  ``index_add``, which PyTorch makes deterministic under ``torch.use_deterministic_algorithms(True)``.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..graph import Graph
from ..program import KernelProgram

__all__ = ["implicit_conv_triton", "triton_available", "packed_conv_torch"]

PREC_NAMES = ("ieee", "tf32", "bf16", "bf16-emulated")


# ----------------------------------------------------------------------------------------------------------------
# availability
# ----------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _kernels():
    """The kernel module, or None when Triton cannot be imported."""
    try:
        from ik_fast.kernels_triton import conv
    except Exception:  # ImportError, or a Triton that fails to initialise
        return None
    return conv


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available(device) -> bool:
    """Whether the fused kernels run on ``device``: CUDA with Triton installed, or CPU under ``TRITON_INTERPRET=1``."""
    dev = torch.device(device)
    if _kernels() is None:
        return False
    if dev.type == "cuda":
        return torch.cuda.is_available()
    return dev.type == "cpu" and _interpreting()


def _require(device) -> None:
    if triton_available(device):
        return
    dev = torch.device(device)
    if _kernels() is None:
        raise RuntimeError("backend 'triton' needs the triton package (pip install 'ik_fast[triton]')")
    raise RuntimeError(f"backend 'triton' runs on CUDA devices (or on CPU tensors under TRITON_INTERPRET=1, the "
                       f"Triton interpreter, for tests); the inputs are on {dev}")


# ----------------------------------------------------------------------------------------------------------------
# tiling
# ----------------------------------------------------------------------------------------------------------------
def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << max(0, int(n) - 1).bit_length())


@dataclass(frozen=True)
class Tiling:
    perm: Tensor       # (E,) edge ids in receiver order
    src: Tensor        # (E,) int64 source of each edge, receiver order
    loc: Tensor        # (E,) int32 segment of each edge within its tile
    base: Tensor       # (n_tiles,) int32 global index of each tile's first segment
    seg_recv: Tensor   # (n_seg,) receiver of each segment (non-decreasing)
    lengths: Tensor    # (n_dst,) segments per receiver
    n_tiles: int
    BE: int
    BR: int


def _tile_size(device, hidden: int = 0) -> int:
    """Edges per tile: 32 on GPUs (16 when the padded hidden width is above 512, to bound the register tiles); 16 in
    the interpreter."""
    if torch.device(device).type != "cuda":
        return 16
    return 32 if hidden <= 512 else 16


def tiling(graph: Graph, BE: Optional[int] = None) -> Tiling:
    """Edge-balanced tiles of ``BE`` edges over the receiver-sorted edges, cached on the graph."""
    BE = BE or _tile_size(graph.src.device)
    cache = graph.__dict__.setdefault("_chunk_cache", {})
    key = ("tiling", BE)
    if key in cache:
        return cache[key]
    E = graph.num_edges
    dst = graph.dst[graph.perm]
    pos = torch.arange(E, device=dst.device)
    tile = pos // BE
    new = torch.ones(E, dtype=torch.bool, device=dst.device)
    if E > 1:
        new[1:] = (dst[1:] != dst[:-1]) | (tile[1:] != tile[:-1])
    segid = torch.cumsum(new.long(), 0) - 1
    base = segid[::BE]
    loc = segid - base[tile]
    BR = _pow2(int(loc.max()) + 1) if E else 16
    seg_recv = dst[new]
    t = Tiling(graph.perm, graph.src[graph.perm].contiguous(), loc.to(torch.int32).contiguous(),
               base.to(torch.int32).contiguous(), seg_recv,
               torch.bincount(seg_recv, minlength=graph.n_dst), (E + BE - 1) // BE, BE, BR)
    cache[key] = t
    return t


def _num_programs(n_tiles: int, device, per_program_floats: int) -> int:
    """Persistent programs of the backward and statistics kernels (each owns an accumulator row)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        sms = torch.cuda.get_device_properties(dev).multi_processor_count
        budget = 2**28  # floats of accumulators (1 GiB in float32)
        n = min(4 * sms, max(1, budget // max(1, per_program_floats)))
    else:
        n = 4
    return max(1, min(n, n_tiles))


# ----------------------------------------------------------------------------------------------------------------
# packing the program
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """Padded sizes (see the kernel module) and where each hidden unit sits in the padded layout."""

    NDIM: int
    P0: int
    P0P: int
    NL: int
    CP: int
    DP: int
    GP: int
    GW: int            # width of the hidden blocks the GEMMs work on (a multiple of DP dividing CP * DP)
    FOURIER: bool
    hmap: Tensor       # (H,) padded column of each hidden unit

    @property
    def HP(self) -> int:
        return self.CP * self.DP


# no GEMM operand above this many elements (32 KB in float32): TF32 and bf16 dots stage more in shared memory
OPERAND_BUDGET = 8192


def _block_width(DP: int, HP: int, RP: int) -> int:
    gw = DP
    while 2 * gw <= HP and 2 * gw * max(2 * gw, RP) <= OPERAND_BUDGET:
        gw *= 2
    return gw


def layout(program: KernelProgram) -> Layout:
    cache = program.meta.setdefault("_triton_layout", {})
    dev = program.sigma.device
    if dev in cache:
        return cache[dev]
    P0 = program.dim + program.attr_size
    P0P = _pow2(P0)
    NL = len(program.hidden)
    RP = _pow2(program.out_size)
    if NL == 0:
        CP, DP, GP, fourier, hmap = 1, P0P, 16, False, torch.arange(P0, device=dev)
    else:
        last = program.hidden[-1]
        C, D = last.channels, last.dim
        if any(h.channels != C or h.dim != D or (h.A is None) != (last.A is None) for h in program.hidden):
            raise NotImplementedError("backend 'triton' needs every hidden layer of the kernel MLP to have the same "
                                      "field type (as ImplicitKernel builds them)")
        fourier = last.A is not None
        if fourier:  # channel-major, each channel padded to DP components (the Fourier ELU's GEMM view)
            CP, DP, GP = _pow2(C, 1), _pow2(D), _pow2(last.A.shape[0])
            hmap = (torch.arange(C, device=dev)[:, None] * DP + torch.arange(D, device=dev)[None, :]).reshape(-1)
        else:  # a pointwise ELU: any split of the padded width will do
            total = _pow2(C * D)
            DP = min(total, 64)
            CP, GP, hmap = total // DP, 16, torch.arange(C * D, device=dev)
    lay = Layout(program.dim, P0, P0P, NL, CP, DP, GP, _block_width(DP, CP * DP, RP), fourier, hmap)
    cache[dev] = lay
    return lay


def _fold_into(weight: Tensor, bias: Optional[Tensor], affine, inner: int = 1):
    """Linear (weight (R, H * inner), bias) applied after h -> h * scale + shift on its input."""
    if affine is None:
        return weight, bias
    scale, shift = affine
    R = weight.shape[0]
    w3 = weight.reshape(R, -1, inner)
    extra = torch.einsum("rhk,h->rk", w3, shift).reshape(-1)
    return (w3 * scale[None, :, None]).reshape(R, -1), (extra if bias is None else bias + extra)


def _folded_layers(program: KernelProgram, stats, upto: int):
    """Dense (weight, bias) of hidden layers 1..upto with the batch norm before each folded in, and the affine map
    of the batch norm after layer ``upto`` (None without one)."""
    out = []
    pending = None
    k = 0
    for layer in program.hidden[:upto]:
        out.append(_fold_into(layer.linear.weight, layer.linear.bias, pending))
        pending = None
        if layer.bn is not None:
            if not program.training or k < len(stats):  # (the statistics pass of layer k has none yet)
                pending = layer.bn.affine(stats[k] if program.training else None)
            k += 1
    return out, pending


def _zeros_bias(weight: Tensor) -> Tensor:
    return weight.new_zeros(weight.shape[0])


def _pack_hidden(program: KernelProgram, lay: Layout, layers, dtype, device):
    HP, P0, P0P = lay.HP, lay.P0, lay.P0P
    hm = lay.hmap
    w1 = torch.zeros(P0P, HP, dtype=dtype, device=device)
    b1 = torch.zeros(HP, dtype=dtype, device=device)
    nh = max(len(program.hidden) - 1, 1)
    wh = torch.zeros(nh, HP, HP, dtype=dtype, device=device)
    bh = torch.zeros(nh, HP, dtype=dtype, device=device)
    for k, (w, b) in enumerate(layers):
        # (under autocast the lowered program may hold bfloat16 tensors: the kernels take float32/float64 buffers)
        w = w.to(dtype)
        b = _zeros_bias(w) if b is None else b.to(dtype)
        if k == 0:
            w1 = w1.index_put((torch.arange(P0, device=device)[:, None], hm[None, :]), w.t())
            b1 = b1.index_put((hm,), b)
        else:
            wh = wh.index_put((torch.full_like(hm, k - 1)[:, None], hm[:, None], hm[None, :]), w.t())
            bh = bh.index_put((torch.full_like(hm, k - 1), hm), b)
    na = max(len(program.hidden), 1)
    at = torch.zeros(na, lay.DP, lay.GP, dtype=dtype, device=device)
    ait = torch.zeros(na, lay.GP, lay.DP, dtype=dtype, device=device)
    if lay.FOURIER:
        for k, layer in enumerate(program.hidden):
            G, D = layer.A.shape
            at[k, :D, :G] = layer.A.detach().t()
            ait[k, :G, :D] = layer.Ainv.detach().t()
    return w1, b1, wh, bh, at, ait


@dataclass(frozen=True)
class Packed:
    tensors: Tuple[Tensor, ...]   # w1, b1, wh, bh, at, ait, wf, bf, coef
    has_bias: bool


def pack(program: KernelProgram, stats, dtype, device) -> Packed:
    """The program as the fused kernels read it, every batch norm folded (differentiable)."""
    lay = layout(program)
    NL = len(program.hidden)
    layers, pending = _folded_layers(program, stats, NL)
    w1, b1, wh, bh, at, ait = _pack_hidden(program, lay, layers, dtype, device)
    C_in, R = program.in_size, program.out_size
    wfin, bfin = _fold_into(program.final.weight, program.final.bias, pending, inner=C_in)
    w3 = wfin.to(dtype).reshape(R, -1, C_in).permute(2, 1, 0)  # (C_in, H, R)
    wf = _scatter_hidden(w3, lay)
    has_bias = bfin is not None
    bf = bfin.to(dtype).reshape(R, C_in).t().contiguous() if has_bias else w3.new_zeros(C_in, R)
    coef = (0.5 / (program.sigma * program.sigma)).reshape(1).to(dtype)
    return Packed((w1, b1, wh, bh, at, ait, wf.contiguous(), bf, coef), has_bias)


def _scatter_hidden(w3: Tensor, lay: Layout) -> Tensor:
    """(C_in, H, R) -> (C_in, HP, R) with hidden unit h at padded row hmap[h]."""
    C_in, _, R = w3.shape
    out = w3.new_zeros(C_in, lay.HP, R)
    return out.index_copy(1, lay.hmap, w3)


# ----------------------------------------------------------------------------------------------------------------
# the ops
# ----------------------------------------------------------------------------------------------------------------
# cfg (a list of ints, so that the ops' schema stays fixed):
#   [NDIM, NL, CP, DP, GP, GW, FOURIER, HAS_BIAS, BE, BR, PREC, NPROG]
def make_cfg(lay: Layout, has_bias: bool, tiles: Tiling, prec: int, nprog: int) -> List[int]:
    """The ops' integer configuration for a layout, a tiling, a precision (index into PREC_NAMES) and a number of
    persistent programs."""
    return [lay.NDIM, lay.NL, lay.CP, lay.DP, lay.GP, lay.GW, int(lay.FOURIER), int(has_bias), tiles.BE, tiles.BR,
            int(prec), int(nprog)]


def _unpack_cfg(cfg):
    NDIM, NL, CP, DP, GP, GW, FOURIER, HAS_BIAS, BE, BR, PREC, NPROG = cfg
    return dict(NDIM=NDIM, NL=NL, CP=CP, DP=DP, GP=GP, GW=GW, FOURIER=bool(FOURIER), HAS_BIAS=bool(HAS_BIAS), BE=BE,
                BR=BR, PREC=PREC_NAMES[PREC]), NPROG


def _common(x, inp, cfg):
    k, nprog = _unpack_cfg(cfg)
    P0 = inp.shape[1]
    return k, nprog, dict(CIN=x.shape[1], CINP=_pow2(x.shape[1]), P0=P0, P0P=_pow2(P0), CB=16)


@torch.library.custom_op("ik_fast::fused_conv", mutates_args=())
def fused_conv(x: Tensor, inp: Tensor, src: Tensor, loc: Tensor, base: Tensor, seg_recv: Tensor, lengths: Tensor,
               w1: Tensor, b1: Tensor, wh: Tensor, bh: Tensor, at: Tensor, ait: Tensor, wf: Tensor, bf: Tensor,
               coef: Tensor, cfg: List[int], norm: float) -> Tensor:
    """out (n_dst, R): per receiver, the sum over its edges of K(d_e, a_e) x_src (see the kernel module).

    ``inp``, ``src``: MLP inputs and sources of the edges in receiver order; ``loc``, ``base``, ``seg_recv``,
    ``lengths``: the tiling (see :class:`Tiling`)."""
    k, _, sizes = _common(x, inp, cfg)
    R = wf.shape[2]
    seg = x.new_zeros(seg_recv.shape[0], R)
    E = inp.shape[0]
    n_tiles = base.shape[0]
    if E > 0:
        _kernels().fused_forward_kernel[(n_tiles,)](
            x.contiguous(), inp.contiguous(), src, loc, base, w1.contiguous(), b1.contiguous(), wh.contiguous(),
            bh.contiguous(), at.contiguous(), ait.contiguous(), wf.contiguous(), bf.contiguous(), coef, seg, E, norm,
            R=R, RP=_pow2(R), **sizes, **k)
    # a receiver's segments are consecutive rows: a segmented sum, deterministic (no atomics)
    return torch.segment_reduce(seg, "sum", lengths=lengths)


@fused_conv.register_fake
def _(x, inp, src, loc, base, seg_recv, lengths, w1, b1, wh, bh, at, ait, wf, bf, coef, cfg, norm):
    return x.new_empty(lengths.shape[0], wf.shape[2])


@torch.library.custom_op("ik_fast::fused_conv_bwd", mutates_args=())
def fused_conv_bwd(grad: Tensor, x: Tensor, inp: Tensor, src: Tensor, loc: Tensor, base: Tensor, w1: Tensor,
                   b1: Tensor, wh: Tensor, bh: Tensor, at: Tensor, ait: Tensor, wf: Tensor, bf: Tensor, coef: Tensor,
                   cfg: List[int], norm: float) -> List[Tensor]:
    """Gradients of (grad * fused_conv(...)).sum() for x, inp, w1, b1, wh, bh, wf, bf, coef; ``grad`` per segment."""
    k, nprog, sizes = _common(x, inp, cfg)
    R = wf.shape[2]
    E = inp.shape[0]
    CIN, P0P, HP = sizes["CIN"], sizes["P0P"], k["CP"] * k["DP"]
    nh = wh.shape[0]
    acc = lambda *shape: x.new_zeros(nprog, *shape)  # noqa: E731
    gw1, gb1, gwh, gbh, gbf, gcoef = acc(P0P, HP), acc(HP), acc(nh, HP, HP), acc(nh, HP), acc(CIN, R), acc()
    gwf = x.new_zeros(CIN * HP, R)
    dxe = x.new_zeros(E, CIN)
    dinp = torch.zeros_like(inp)
    if E > 0:
        n_seg = grad.shape[0]
        for t0, t1, s0, s1 in _z_chunks(base, n_seg, CIN * HP):
            z = x.new_empty(s1 - s0, CIN * HP)
            _kernels().fused_backward_kernel[(min(nprog, t1 - t0),)](
                grad.contiguous(), x.contiguous(), inp.contiguous(), src, loc, base, w1.contiguous(), b1.contiguous(),
                wh.contiguous(), bh.contiguous(), at.contiguous(), ait.contiguous(), wf.contiguous(),
                bf.contiguous(), coef, dxe, dinp, gw1, gb1, gwh, gbh, z, gbf, gcoef, E, t0, t1, s0, norm,
                R=R, RP=_pow2(R), NH=nh, **sizes, **k)
            gwf.addmm_(z.t(), grad[s0:s1].to(z.dtype))  # sum over the chunk's segments of Z (x) d out
    dx = torch.zeros_like(x).index_add_(0, src, dxe)
    return [dx, dinp, gw1.sum(0), gb1.sum(0), gwh.sum(0), gbh.sum(0), gwf.reshape(CIN, HP, R), gbf.sum(0),
            gcoef.sum(0).reshape(1)]


Z_CHUNK_BUDGET = 2**26  # floats of Z per chunk of tiles in the backward (256 MB in float32)


def _z_chunks(base: Tensor, n_seg: int, row: int):
    """Ranges (t0, t1, seg0, seg1) of tiles whose segments' Z rows (``row`` floats each) fit the chunk budget."""
    starts = base.tolist() + [n_seg]
    cap = max(1, Z_CHUNK_BUDGET // max(1, row))
    out, t0 = [], 0
    n_tiles = len(starts) - 1
    while t0 < n_tiles:
        t1 = t0 + 1
        while t1 < n_tiles and starts[t1 + 1] - starts[t0] <= cap:
            t1 += 1
        out.append((t0, t1, starts[t0], starts[t1]))
        t0 = t1
    return out


@fused_conv_bwd.register_fake
def _(grad, x, inp, src, loc, base, w1, b1, wh, bh, at, ait, wf, bf, coef, cfg, norm):
    return [torch.empty_like(t) for t in (x, inp, w1, b1, wh, bh, wf, bf, coef)]


STATS_TILE = 16  # edges per tile of the statistics kernel (its column reductions are the shared-memory-hungry part)


@torch.library.custom_op("ik_fast::fused_stats", mutates_args=())
def fused_stats(inp: Tensor, w1: Tensor, b1: Tensor, wh: Tensor, bh: Tensor, at: Tensor, ait: Tensor, coef: Tensor,
                cfg: List[int], layer: int) -> Tensor:
    """(NPROG, 1 + 2 HP): per program, count, mean and M2 of hidden layer ``layer``'s activation over its tiles."""
    k, nprog = _unpack_cfg(cfg)
    HP = k["CP"] * k["DP"]
    out = inp.new_zeros(nprog, 1 + 2 * HP)
    E, P0 = inp.shape
    _kernels().fused_stats_kernel[(nprog,)](
        inp.contiguous(), w1.contiguous(), b1.contiguous(), wh.contiguous(), bh.contiguous(), at.contiguous(),
        ait.contiguous(), coef, out, E, (E + STATS_TILE - 1) // STATS_TILE, K=layer, P0=P0, P0P=_pow2(P0),
        NDIM=k["NDIM"], CP=k["CP"], DP=k["DP"], GP=k["GP"], GW=k["GW"], FOURIER=k["FOURIER"], BE=STATS_TILE,
        PREC=k["PREC"])
    return out


@fused_stats.register_fake
def _(inp, w1, b1, wh, bh, at, ait, coef, cfg, layer):
    _, nprog = _unpack_cfg(cfg)
    return inp.new_empty(nprog, 1 + 2 * cfg[2] * cfg[3])


_GRAD_INPUTS = ("x", "inp", "w1", "b1", "wh", "bh", "wf", "bf", "coef")
_ALL_INPUTS = ("x", "inp", "src", "loc", "base", "seg_recv", "lengths", "w1", "b1", "wh", "bh", "at", "ait", "wf", "bf",
               "coef")


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:16])
    ctx.cfg, ctx.norm = inputs[16], inputs[17]


def _backward(ctx, grad):
    saved = dict(zip(_ALL_INPUTS, ctx.saved_tensors))
    if torch.is_grad_enabled():  # create_graph=True: differentiate the plain-PyTorch form of the same computation
        grads = _backward_torch(saved, ctx.cfg, ctx.norm, grad)
    else:
        args = [saved[n] for n in _ALL_INPUTS if n not in ("seg_recv", "lengths")]
        gseg = grad.index_select(0, saved["seg_recv"])  # each segment's rows of the output gradient
        grads = dict(zip(_GRAD_INPUTS, fused_conv_bwd(gseg, *args, ctx.cfg, ctx.norm)))
    return tuple(grads.get(n) if ctx.needs_input_grad[i] else None for i, n in enumerate(_ALL_INPUTS)) + (None, None)


def _backward_torch(saved, cfg, norm, grad):
    with torch.enable_grad():
        leaves = {n: saved[n] for n in _GRAD_INPUTS}
        wanted = [n for n in _GRAD_INPUTS if leaves[n].requires_grad]
        if not wanted:
            return {}
        out = packed_conv_torch(**saved, cfg=cfg, norm=norm)
        gs = torch.autograd.grad(out, [leaves[n] for n in wanted], grad, create_graph=True, allow_unused=True)
    return {n: (torch.zeros_like(leaves[n]) if g is None else g) for n, g in zip(wanted, gs)}


fused_conv.register_autograd(_backward, setup_context=_setup_context)


def packed_conv_torch(x, inp, src, loc, base, seg_recv, lengths, w1, b1, wh, bh, at, ait, wf, bf, coef, cfg, norm):
    """``fused_conv`` in plain PyTorch, edge by edge (for double backward and tests; holds (E, hidden) tensors)."""
    k, _ = _unpack_cfg(cfg)
    E, P0 = inp.shape
    BE, NL, CP, DP = k["BE"], k["NL"], k["CP"], k["DP"]
    segid = base.long()[torch.arange(E, device=inp.device) // BE] + loc.long()
    r2 = inp[:, :k["NDIM"]].square().sum(1)
    s = torch.exp(-r2 * coef) * norm
    h = F.pad(inp, (0, w1.shape[0] - P0))

    def act(y, j):
        if not k["FOURIER"]:
            return F.elu(y)
        u = y.reshape(E * CP, DP) @ at[j]
        return (F.elu(u) @ ait[j]).reshape(E, CP * DP)

    if NL > 0:
        y = h @ w1 + b1
        for j in range(1, NL):
            y = act(y, j - 1) @ wh[j - 1] + bh[j - 1]
        h = act(y, NL - 1)
    xe = x[src]
    msg = torch.einsum("eh,ec,chr->er", h * s[:, None], xe, wf)
    if k["HAS_BIAS"]:
        msg = msg + (xe * s[:, None]) @ bf
    return msg.new_zeros(lengths.shape[0], wf.shape[2]).index_add(0, seg_recv[segid], msg)


# ----------------------------------------------------------------------------------------------------------------
# the backend
# ----------------------------------------------------------------------------------------------------------------
def _precision(dtype, device) -> int:
    if dtype == torch.float64:
        return 0
    dev = torch.device(device).type
    if torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev) == torch.bfloat16:
        return 3 if dev == "cpu" else 2
    return 0 if torch.get_float32_matmul_precision() == "highest" else 1


def _batch_stats(program: KernelProgram, lay: Layout, inp, tiles: Tiling, cfg_of) -> list:
    """Batch statistics of every batch norm (training), layer after layer, detached (escnn's rule)."""
    stats = []
    with torch.no_grad():
        for k, layer in enumerate(program.hidden, start=1):
            if layer.bn is None:
                continue
            layers, _ = _folded_layers(program, stats, k)
            w1, b1, wh, bh, at, ait = _pack_hidden(program, lay, [(w.detach(), None if b is None else b.detach())
                                                                 for w, b in layers], inp.dtype, inp.device)
            coef = inp.new_zeros(1)
            parts = fused_stats(inp, w1, b1, wh, bh, at, ait, coef, cfg_of(1 + 2 * lay.HP), k)
            count, mean, m2 = parts[:, 0], parts[:, 1:1 + lay.HP], parts[:, 1 + lay.HP:]
            # merge the programs' partial moments (Chan et al.), in a fixed order
            n_a, mu, M2 = count[0], mean[0], m2[0]
            for i in range(1, parts.shape[0]):
                n = n_a + count[i]
                delta = mean[i] - mu
                mu = mu + delta * (count[i] / n)
                M2 = M2 + m2[i] + delta * delta * (n_a * count[i] / n)
                n_a = n
            C, D = layer.channels, layer.dim
            mu = mu[lay.hmap].reshape(C, D)
            var = (M2[lay.hmap] / (inp.shape[0] - 1)).reshape(C, D)
            stats.append((mu @ layer.bn.avg.t().to(mu.dtype), var.mean(-1)))
    return stats


def implicit_conv_triton(program: KernelProgram, x_src, graph: Graph, delta, attr):
    """Same contract as :func:`~ik_fast.backends.reference.implicit_conv_reference`."""
    _require(x_src.device)
    if x_src.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"backend 'triton' computes in float32 or float64 (bfloat16 through torch.autocast), but the "
                        f"layer and its inputs are {x_src.dtype}; use backend='torch' for other dtypes")
    out_size = program.out_size
    if graph.num_edges == 0:
        return x_src.new_zeros(graph.n_dst, out_size), []
    lay = layout(program)
    tiles = tiling(graph, _tile_size(x_src.device, lay.HP))
    inp = program.mlp_input(delta, attr)[tiles.perm].contiguous()
    prec = _precision(x_src.dtype, x_src.device)

    def cfg_of(per_program_floats):
        nprog = _num_programs(tiles.n_tiles, x_src.device, per_program_floats)
        return make_cfg(lay, program.final.bias is not None, tiles, prec, nprog)

    stats = _batch_stats(program, lay, inp, tiles, cfg_of) if program.needs_batch_stats else []
    p = pack(program, stats, x_src.dtype, x_src.device)
    w1, b1, wh, bh, at, ait, wf, bf, coef = p.tensors
    per_program = w1.numel() + b1.numel() + wh.numel() + bh.numel() + bf.numel() + 1
    out = fused_conv(x_src.contiguous(), inp, tiles.src, tiles.loc, tiles.base, tiles.seg_recv, tiles.lengths,
                     *p.tensors, cfg_of(per_program), float(program.norm))
    return out, stats
