"""The Triton implementation of the op layer's stages (:mod:`ik_fast.ops`): ``ik_fast::triton_conv``,
``ik_fast::triton_conv_backward`` and ``ik_fast::triton_trunk_moments``, launching the kernels of :mod:`.conv`.

Everything Triton-specific happens here, behind the neutral schemas:

* **layout**: the op's dense, unpadded program tensors are padded to the kernels' power-of-two tiles (hidden layer as
  ``CP`` channels of ``DP`` components, channel-major; the Fourier grid to ``GP``; see :mod:`.conv`);
* **tiling**: the receiver-sorted edges (the op's CSR) are cut into tiles of ``BE`` edges; a *segment* is the part of
  one receiver's edge list inside one tile. The forward kernel writes one row per segment and a receiver's rows are
  summed with ``torch.segment_reduce`` (deterministic, no atomics). The tiling is built with tensor code and cached per
  ``rowptr`` tensor, so a step on a cached graph does not synchronise with the host;
* **precision**: float64 in IEEE arithmetic; float32 follows ``torch.get_float32_matmul_precision()`` ("highest" ->
  IEEE, otherwise TF32); under ``torch.autocast(dtype=torch.bfloat16)`` bfloat16 operands with float32 accumulation;
* **backward memory**: the last layer's weight gradient is ``sum_i Z_i (x) dout_i``; the backward kernel writes the Z
  rows of its segments one chunk of tiles at a time (``Z_CHUNK_BUDGET``) and each chunk is contracted in one GEMM;
* **determinism**: per-program accumulators summed in a fixed order, the statistics merged with tensor code in a fixed
  order, the gradient to the source features through ``index_add`` (deterministic under
  ``torch.use_deterministic_algorithms(True)``).
"""

from __future__ import annotations

import functools
import os
import weakref
from dataclasses import dataclass
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ik_fast.graph import check_int32_extents
from ik_fast.ops import receivers

from . import conv as K

PREC_NAMES = ("ieee", "tf32", "bf16", "bf16-emulated")
OPERAND_BUDGET = 8192  # no GEMM operand above this many elements (32 KB in float32)
Z_CHUNK_BUDGET = 2**26  # floats of Z per chunk of tiles in the backward (256 MB in float32)
STATS_TILE = 16  # edges per tile of the statistics kernel


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << max(0, int(n) - 1).bit_length())


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def runs_on(device: torch.device):
    """None when the kernels run on ``device``, else why not."""
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "CUDA is not available"
    if device.type == "cpu":
        return None if interpreting() else ("the Triton kernels run on CUDA devices (on CPU tensors only under "
                                            "TRITON_INTERPRET=1, Triton's interpreter, for tests)")
    return f"the Triton kernels do not run on {device.type} devices"


def precision(dtype, device) -> int:
    """Index into PREC_NAMES for a dtype on a device under the current PyTorch switches."""
    if dtype == torch.float64:
        return 0
    dev = torch.device(device).type
    if torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev) == torch.bfloat16:
        return 3 if dev == "cpu" else 2
    return 0 if torch.get_float32_matmul_precision() == "highest" else 1


# ----------------------------------------------------------------------------------------------------------------
# layout: the op's dense tensors -> the kernels' padded ones
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    NDIM: int
    P0: int
    P0P: int
    NL: int
    CP: int
    DP: int
    GP: int
    GW: int            # width of the hidden blocks the GEMMs work on (a multiple of DP dividing CP * DP)
    FOURIER: bool
    C: int             # the hidden width H as C real channels of D components, padded to PC x PD = HP
    D: int
    PC: int
    PD: int

    @property
    def HP(self) -> int:
        return self.CP * self.DP


@functools.lru_cache(maxsize=256)
def _hidden_index(lay: "Layout", device: str) -> Tensor:
    """(H,) padded position of each real hidden unit."""
    c = torch.arange(lay.C, device=device)[:, None] * lay.PD
    return (c + torch.arange(lay.D, device=device)[None, :]).reshape(-1)


@functools.lru_cache(maxsize=256)
def _scatter_index(lay: "Layout", device: str, lead: int, rows: int, rows_padded: int, hidden_rows: bool,
                   cols: int, cols_padded: int, hidden_cols: bool) -> Tensor:
    """Flat positions in a (lead, rows_padded, cols_padded) buffer of the entries of a (lead, rows, cols) tensor;
    a dimension flagged ``hidden_*`` is the hidden width (padded channel by channel), else padded at its end."""
    hm = _hidden_index(lay, device)
    r = hm if hidden_rows else torch.arange(rows, device=device)
    c = hm if hidden_cols else torch.arange(cols, device=device)
    k = torch.arange(lead, device=device)
    return ((k[:, None, None] * rows_padded + r[None, :, None]) * cols_padded + c[None, None, :]).reshape(-1)


def _scatter(t: Tensor, lay: "Layout", padded: Tuple[int, int, int], hidden: Tuple[bool, bool]) -> Tensor:
    """t (lead, rows, cols) -> zeros of shape ``padded`` with t's entries at their padded positions (one scatter)."""
    lead, rows, cols = t.shape
    idx = _scatter_index(lay, str(t.device), lead, rows, padded[1], hidden[0], cols, padded[2], hidden[1])
    return t.new_zeros(padded[0] * padded[1] * padded[2]).index_copy(0, idx, t.reshape(-1)).reshape(padded)


def unpad_h(t: Tensor, dim: int, lay: "Layout") -> Tensor:
    """The real hidden units of dimension ``dim`` of a padded tensor."""
    return t.index_select(dim, _hidden_index(lay, str(t.device)))


def _block_width(DP: int, HP: int, RP: int) -> int:
    gw = DP
    while 2 * gw <= HP and 2 * gw * max(2 * gw, RP) <= OPERAND_BUDGET:
        gw *= 2
    return gw


def layout(inp: Tensor, weights, fourier, R: int, ndim: int) -> Layout:
    P0 = inp.shape[1]
    NL = len(weights)
    if NL == 0:
        CP, DP, GP, fourier_act = 1, _pow2(P0), 16, False
        real = (1, P0, 1, DP)
    else:
        H = weights[-1].shape[0]
        fourier_act = fourier[-1].numel() > 0
        if any(w.shape[0] != H or (A.numel() > 0) != fourier_act for w, A in zip(weights, fourier)) or \
                (fourier_act and any(A.shape != fourier[-1].shape for A in fourier)):
            raise NotImplementedError("backend 'triton' needs every hidden layer of the kernel MLP to have the same "
                                      "field type (as ImplicitKernel builds them)")
        if fourier_act:  # channel-major, each channel padded to DP components (the Fourier ELU's GEMM view)
            G, D = fourier[-1].shape
            C = H // D
            CP, DP, GP = _pow2(C, 1), _pow2(D), _pow2(G)
            real = (C, D, CP, DP)
        else:  # a pointwise ELU: any split of the padded width will do
            total = _pow2(H)
            DP = min(total, 64)
            CP, GP = total // DP, 16
            real = (1, H, 1, total)
    return Layout(ndim, P0, _pow2(P0), NL, CP, DP, GP, _block_width(DP, CP * DP, _pow2(R)), fourier_act, *real)


def pad_hidden(lay: Layout, weights, biases, fourier, fourier_inv, dtype, device):
    """(w1 (P0P, HP), b1 (HP,), wh (NH, HP, HP), bh (NH, HP), at (NL, DP, GP), ait (NL, GP, DP)): x @ W layout,
    each built with one scatter of the stacked real entries."""
    HP, NL = lay.HP, lay.NL
    nh = max(NL - 1, 1)
    z = lambda *shape: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
    if NL == 0:
        w1, b1 = z(lay.P0P, HP), z(HP)
    else:
        w1 = _scatter(weights[0].t().to(dtype)[None], lay, (1, lay.P0P, HP), (False, True))[0]
        b1 = _scatter(biases[0].to(dtype)[None, None], lay, (1, 1, HP), (False, True)).reshape(HP)
    if NL > 1:
        wh = _scatter(torch.stack(weights[1:]).to(dtype).transpose(1, 2), lay, (nh, HP, HP), (True, True))
        bh = _scatter(torch.stack(biases[1:]).to(dtype)[:, None], lay, (nh, 1, HP), (False, True)).reshape(nh, HP)
    else:
        wh, bh = z(nh, HP, HP), z(nh, HP)
    if lay.FOURIER:
        A = torch.stack(fourier).to(dtype)  # (NL, G, D)
        Ainv = torch.stack(fourier_inv).to(dtype)  # (NL, D, G)
        at = F.pad(A.transpose(1, 2), (0, lay.GP - A.shape[1], 0, lay.DP - A.shape[2]))
        ait = F.pad(Ainv.transpose(1, 2), (0, lay.DP - A.shape[2], 0, lay.GP - A.shape[1]))
    else:
        na = max(NL, 1)
        at, ait = z(na, lay.DP, lay.GP), z(na, lay.GP, lay.DP)
    return w1, b1, wh, bh, at, ait


def pad_final(lay: Layout, final_weight, final_bias, dtype):
    """wf (C_in, HP, R) and bf (C_in, R)."""
    R, _, C = final_weight.shape
    wf = _scatter(final_weight.permute(2, 1, 0).to(dtype), lay, (C, lay.HP, R), (True, False))
    return wf, final_bias.t().to(dtype).contiguous()


# ----------------------------------------------------------------------------------------------------------------
# tiling, cached per CSR
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tiling:
    loc: Tensor        # (E,) int32 segment of each edge within its tile
    base: Tensor       # (n_tiles,) int32 global index of each tile's first segment
    seg_recv: Tensor   # (n_seg,) receiver of each segment (non-decreasing)
    lengths: Tensor    # (n_dst,) segments per receiver
    n_tiles: int
    BE: int
    BR: int
    chunks: Tuple[Tuple[int, int, int, int], ...]  # the backward's (t0, t1, seg0, seg1) for one Z row size
    z_row: int


_TILINGS: dict = {}  # id(rowptr) -> (weak reference to rowptr, {key: Tiling})


def tile_size(device, hidden: int = 0) -> int:
    """Edges per tile: 32 on GPUs (16 when the padded hidden width is above 512, to bound the register tiles); 16 in
    the interpreter."""
    if torch.device(device).type != "cuda":
        return 16
    return 32 if hidden <= 512 else 16


def tiling(rowptr: Tensor, num_edges: int, BE: int, z_row: int) -> Tiling:
    """Edge-balanced tiles of ``BE`` edges over the receiver-sorted edges; cached per ``rowptr`` tensor (the graph's
    CSR), so that only a new graph pays the host synchronisations of its plan."""
    # the tiling's segment indices (loc, base) are int32: every edge index must fit
    check_int32_extents("backend 'triton'", edges=num_edges)
    ident = id(rowptr)
    ref, per = _TILINGS.get(ident, (None, None))
    if ref is None or ref() is not rowptr:
        per = {}
        _TILINGS[ident] = (weakref.ref(rowptr, lambda _: _TILINGS.pop(ident, None)), per)
    key = (BE, z_row, rowptr._version)
    if key in per:
        return per[key]
    E = num_edges
    dst = receivers(rowptr, E)
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
    n_tiles = (E + BE - 1) // BE
    t = Tiling(loc.to(torch.int32).contiguous(), base.to(torch.int32).contiguous(), seg_recv,
               torch.bincount(seg_recv, minlength=rowptr.shape[0] - 1), n_tiles, BE, BR,
               _z_chunks(base, int(seg_recv.shape[0]), z_row), z_row)
    per.clear()
    per[key] = t
    return t


def _z_chunks(base: Tensor, n_seg: int, row: int):
    """Ranges (t0, t1, seg0, seg1) of tiles for the backward's Z chunks: the tiles whose first segment falls in the
    same window of ``cap`` segments (``row`` floats of Z each, ``cap`` rows within the chunk budget) form one chunk,
    which then holds at most ``cap`` + BE - 1 rows. Built with tensor code and one transfer to the host."""
    cap = max(1, Z_CHUNK_BUDGET // max(1, row))
    window = base.long() // cap
    first = torch.ones_like(window, dtype=torch.bool)
    first[1:] = window[1:] != window[:-1]
    t0 = torch.nonzero(first).flatten()
    t1 = torch.cat([t0[1:], t0.new_tensor([base.numel()])])
    s_all = torch.cat([base.long(), base.new_tensor([n_seg]).long()])
    bounds = torch.stack([t0, t1, s_all[t0], s_all[t1]], 1).cpu().tolist()
    return tuple(tuple(b) for b in bounds)


def num_programs(n_tiles: int, device, per_program_floats: int) -> int:
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
# the stages
# ----------------------------------------------------------------------------------------------------------------
def _setup(x, inp, rowptr, weights, biases, fourier, fourier_inv, final_weight, final_bias, coef, ndim):
    dtype = x.dtype
    R, _, C = final_weight.shape
    lay = layout(inp, weights, fourier, R, ndim)
    tiles = tiling(rowptr, inp.shape[0], tile_size(x.device, lay.HP), C * lay.HP)
    hidden = pad_hidden(lay, weights, biases, fourier, fourier_inv, dtype, x.device)
    wf, bf = pad_final(lay, final_weight, final_bias, dtype)
    consts = dict(NDIM=ndim, NL=lay.NL, CP=lay.CP, DP=lay.DP, GP=lay.GP, GW=lay.GW, FOURIER=lay.FOURIER,
                  HAS_BIAS=True, BE=tiles.BE, BR=tiles.BR,
                  PREC=PREC_NAMES[precision(dtype, x.device)], CIN=C, CINP=_pow2(C), P0=lay.P0, P0P=lay.P0P,
                  CB=16, R=R, RP=_pow2(R))
    return lay, tiles, hidden, wf, bf, coef.to(dtype).reshape(1).contiguous(), consts


def conv(x, inp, src, rowptr, weights, biases, fourier, fourier_inv, final_weight, final_bias, coef, norm, ndim):
    R = final_weight.shape[0]
    n_dst = rowptr.shape[0] - 1
    E = inp.shape[0]
    if E == 0:
        return x.new_zeros(n_dst, R)
    lay, tiles, hidden, wf, bf, coef, k = _setup(x, inp, rowptr, weights, biases, fourier, fourier_inv,
                                                 final_weight, final_bias, coef, ndim)
    seg = x.new_zeros(tiles.seg_recv.shape[0], R)
    K.fused_forward_kernel[(tiles.n_tiles,)](
        x.contiguous(), inp.contiguous(), src.contiguous(), tiles.loc, tiles.base, *hidden, wf, bf, coef, seg, E,
        float(norm), **k)
    # a receiver's segments are consecutive rows: a segmented sum, deterministic (no atomics)
    return torch.segment_reduce(seg, "sum", lengths=tiles.lengths, unsafe=True)  # (lengths from the tiling)


def conv_backward(grad, x, inp, src, rowptr, weights, biases, fourier, fourier_inv, final_weight, final_bias, coef,
                  norm, ndim) -> List[Tensor]:
    R, H, C = final_weight.shape
    E = inp.shape[0]
    zeros = [torch.zeros_like(t) for t in (x, inp, *weights, *biases, final_weight, final_bias, coef)]
    if E == 0:
        return zeros
    lay, tiles, hidden, wf, bf, coefp, k = _setup(x, inp, rowptr, weights, biases, fourier, fourier_inv,
                                                  final_weight, final_bias, coef, ndim)
    w1, b1, wh, bh, at, ait = hidden
    HP, P0P, nh = lay.HP, lay.P0P, wh.shape[0]
    per_program = w1.numel() + b1.numel() + wh.numel() + bh.numel() + bf.numel() + 1
    nprog = num_programs(tiles.n_tiles, x.device, per_program)
    acc = lambda *shape: x.new_zeros(nprog, *shape)  # noqa: E731
    gw1, gb1, gwh, gbh, gbf, gcoef = acc(P0P, HP), acc(HP), acc(nh, HP, HP), acc(nh, HP), acc(C, R), acc()
    gwf = x.new_zeros(C * HP, R)
    dxe = x.new_zeros(E, C)
    dinp = torch.zeros_like(inp)
    gseg = grad.index_select(0, tiles.seg_recv).contiguous()  # each segment's row of the output gradient
    for t0, t1, s0, s1 in tiles.chunks:
        z = x.new_empty(s1 - s0, C * HP)
        K.fused_backward_kernel[(min(nprog, t1 - t0),)](
            gseg, x.contiguous(), inp.contiguous(), src.contiguous(), tiles.loc, tiles.base, *hidden, wf, bf, coefp,
            dxe, dinp, gw1, gb1, gwh, gbh, z, gbf, gcoef, E, t0, t1, s0, float(norm), NH=nh, **k)
        gwf.addmm_(z.t(), gseg[s0:s1].to(z.dtype))  # sum over the chunk's segments of Z (x) d out
    dx = torch.zeros_like(x).index_add_(0, src, dxe)
    gw1, gb1, gwh, gbh = gw1.sum(0), gb1.sum(0), gwh.sum(0), gbh.sum(0)
    dweights, dbiases = [], []
    if weights:  # (without hidden layers the input is the hidden activation)
        gwh_real = unpad_h(unpad_h(gwh, 1, lay), 2, lay).transpose(1, 2)  # (x @ W layout -> (out, in))
        gbh_real = unpad_h(gbh, 1, lay)
        dweights = [unpad_h(gw1[:lay.P0], 1, lay).t()] + list(gwh_real[:len(weights) - 1])
        dbiases = [unpad_h(gb1, 0, lay)] + list(gbh_real[:len(weights) - 1])
    dfw = unpad_h(gwf.reshape(C, HP, R), 1, lay).permute(2, 1, 0)
    dfb = gbf.sum(0).t()
    dweights = [w.to(weights[0].dtype).contiguous() for w in dweights]
    dbiases = [b.to(weights[0].dtype).contiguous() for b in dbiases]
    return [dx, dinp, *dweights, *dbiases, dfw.to(final_weight.dtype).contiguous(),
            dfb.to(final_bias.dtype).contiguous(), gcoef.sum(0).reshape(1).to(coef.dtype)]


def trunk_moments(inp, weights, biases, fourier, fourier_inv):
    E = inp.shape[0]
    lay = layout(inp, weights, fourier, 1, 0)
    if E == 0:
        return inp.new_zeros(2, lay.C * lay.D)
    w1, b1, wh, bh, at, ait = pad_hidden(lay, weights, biases, fourier, fourier_inv, inp.dtype, inp.device)
    HP = lay.HP
    n_tiles = (E + STATS_TILE - 1) // STATS_TILE
    nprog = num_programs(n_tiles, inp.device, 1 + 2 * HP)
    parts = inp.new_zeros(nprog, 1 + 2 * HP)
    K.fused_stats_kernel[(nprog,)](
        inp.contiguous(), w1, b1, wh, bh, at, ait, inp.new_zeros(1), parts, E, n_tiles, K=lay.NL, P0=lay.P0,
        P0P=lay.P0P, NDIM=0, CP=lay.CP, DP=lay.DP, GP=lay.GP, GW=lay.GW, FOURIER=lay.FOURIER, BE=STATS_TILE,
        PREC=PREC_NAMES[precision(inp.dtype, inp.device)])
    # merge the programs' partial moments (Chan et al.) with tensor code, in a fixed order
    count, mean, m2 = parts[:, :1], parts[:, 1:1 + HP], parts[:, 1 + HP:]
    total = mean * count
    mu = total.sum(0) / E
    M2 = (m2 + count * (mean - mu).square()).sum(0)
    return unpad_h(torch.stack([mu, M2]), 1, lay)


def _register():
    for key in ("CPU", "CUDA"):
        torch.library.register_kernel("ik_fast::triton_conv", key.lower(), conv)
        torch.library.register_kernel("ik_fast::triton_conv_backward", key.lower(), conv_backward)
        torch.library.register_kernel("ik_fast::triton_trunk_moments", key.lower(), trunk_moments)


_register()
