"""The Triton implementation of the op layer's stages (:mod:`ik_fast.ops`): ``ik_fast::triton_conv``,
``ik_fast::triton_conv_backward`` and ``ik_fast::triton_trunk_moments``, launching the kernels of :mod:`.conv` and
:mod:`.contract`.

Everything Triton-specific happens here, behind the neutral schemas:

* **layout**: the op's dense, unpadded program tensors are padded to the kernels' power-of-two tiles (hidden layer as
  ``CP`` channels of ``DP`` components, channel-major; the Fourier grid to ``GP``; see :mod:`.conv`);
* **stages**: the trunk per tile of edges writes ``hs = s h`` (E, H) once (:mod:`.conv`); the contraction reads it
  per block of 16 receivers through the op's CSR (:mod:`.contract`). No plan is built per graph: the receiver blocks
  are ``rowptr`` itself, so a step does not synchronise with the host;
* **precision**: float64 in IEEE arithmetic; float32 follows ``torch.get_float32_matmul_precision()`` ("highest" ->
  IEEE, or 3xTF32 on CUDA with ``IK_FAST_HIGHEST=tf32x3`` (split TF32, within 2x of IEEE float32's error as
  measured; :data:`HIGHEST_ON_CUDA`); otherwise TF32); under ``torch.autocast(dtype=torch.bfloat16)`` bfloat16
  operands with float32 accumulation;
* **batch norms**: applied by the trunk kernels where they write each layer's activation (an affine map per hidden
  unit, packed with the weights; the last one by the contraction when the forward is given that layer's activation
  before it, ``hidden``), their gradients accumulated with the biases';
* **backward**: the contraction's backward gives ``d hs`` (E, H), the per-edge gradient of the gathered features and
  the bias term's ``d s``; W''s gradient is summed per (hidden block, input block) over splits of the receivers; the
  trunk's backward then runs per tile;
* **determinism**: per-program accumulators summed in a fixed order, the statistics merged with tensor code in a fixed
  order, the gradient to the source features through ``index_add`` (deterministic under
  ``torch.use_deterministic_algorithms(True)``).
"""

from __future__ import annotations

import collections
import functools
import math
import os
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.weak import WeakIdKeyDictionary

from ik_fast.kernels_triton import contract as K2
from ik_fast.kernels_triton import conv as K
from ik_fast.kernels_triton import irreps as KI
from ik_fast.kernels_triton.blocks import blocks
from ik_fast.ops import hidden_width
from ik_fast.structure import decode

PREC_NAMES = ("ieee", "tf32", "bf16", "bf16-emulated", "tf32x3")
# What "highest" runs on CUDA when IK_FAST_HIGHEST does not say: "ieee", or "tf32x3" (each float32 operand split into
# two TF32 halves, three tensor-core products accumulated in float32). Emulated on CPU (benchmarks/precision.py
# --emulate, the docs' precision table), 3xTF32's error against float64 stays within 2x of IEEE float32's on the
# cases measured (planar@16 eval's parameters' gradient at 1.89x, with the coefficient's gradient accumulated in
# float64), and no Triton kernel spills under it (benchmarks/compile_check.py --precision tf32x3, Triton 3.6 and 3.9).
# It stays opt-in (IK_FAST_HIGHEST=tf32x3) because it is not yet faster: the static GPU model (benchmarks/gpu_model.py)
# puts the Triton step in 3xTF32 no faster than IEEE (37 against 26 ms at M; its trunk blocks are not the tensor-core
# ones), and the native kernels' split spills (compiled only with -DIK_FAST_3XTF32).
HIGHEST_ON_CUDA = "ieee"
# Set by ik_fast.tools.tensorcore_emulation while it emulates the tensor cores' rounding in the interpreter: CPU
# tensors then take the precisions CUDA would (the interpreter itself ignores input_precision).
EMULATE_CUDA_PRECISION = False
OPERAND_BUDGET = 8192  # no GEMM operand above this many elements (32 KB in float32)
STATS_TILE = 16  # edges per tile of the statistics kernel
BACKWARD_TILE = 16  # edges per tile of the trunk's backward (its register tiles are the largest)
TAPE_LAYERS = 3  # the most hidden layers whose tape the trunk's backward reads (conv.trunk_backward_kernel)


def _c(t: Tensor) -> Tensor:
    """``t.contiguous()`` without an operator when it already is (host operators per step are counted)."""
    return t if t.is_contiguous() else t.contiguous()


# the padded Fourier matrices by their storages: key -> (weak references to the storages, padded buffer)
_FOURIER: "collections.OrderedDict" = collections.OrderedDict()
FOURIER_CACHE = 8  # entries (one per program and dtype in use; a few KB to a few hundred KB each)


def fourier_storage(dtype: torch.dtype, prec: str, device) -> torch.dtype:
    """The dtype the kernels read the Fourier matrices in. They are only ever ``tl.dot`` operands (the Fourier ELU's
    GEMMs), so where the dot reads fewer mantissa bits than float32 holds they are stored with those bits only, in
    half the bytes (half the trunk kernels' sectors for them):

    * bf16: bfloat16, the dot's own rounding of them (the same operands);
    * TF32 where the dots run on tensor cores (CUDA; the interpreter under the tensor-core emulation or
      ``IK_FAST_TARGET_DEVICE=cuda``): float16, whose 10 mantissa bits are TF32's (rounded to nearest, where the
      tensor core would truncate the float32 values), when the matrices fit its range (:func:`_as_float16`);
    * anything else (IEEE, 3xTF32, whose split needs every bit, float64, TF32 on the interpreter's IEEE dots): the
      compute dtype."""
    if dtype != torch.float32:
        return dtype
    if prec in ("bf16", "bf16-emulated"):
        return torch.bfloat16
    if prec == "tf32" and (target(device) == "cuda" or EMULATE_CUDA_PRECISION):
        return torch.float16
    return dtype


def _as_float16(flat: Tensor) -> Tensor:
    """``flat`` (float32) in float16 when no entry moves by more than TF32's rounding at the matrices' scale (2^-11
    of the largest magnitude: true for any matrix whose largest entry lies in [2^-14, 65504)), else unchanged. One read
    of a device value, when the buffer is made (never while a CUDA graph is captured: then it stays float32)."""
    from ik_fast.graph import _capturing

    if flat.numel() == 0 or _capturing():
        return flat
    half = flat.to(torch.float16)
    err = (half.to(flat.dtype) - flat).abs().nan_to_num(float("inf")).max()
    return half if bool(err <= 2.0**-11 * flat.abs().max()) else flat


def _storage_key(t: Tensor):
    """What identifies ``t``'s values while its storage lives: the storage, the view of it and the version (a
    detached alias of a tensor, as a program may pass afresh each call, has the same key)."""
    return (t.untyped_storage()._cdata, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t._version)


@functools.lru_cache(maxsize=32)
def _zeros(n: int, dtype: torch.dtype, device: str) -> Tensor:
    """Cached zeros (n,) (read-only use)."""
    z = torch.from_numpy(np.zeros(n)).to(dtype)
    return z if device == "cpu" else z.to(device)


@functools.lru_cache(maxsize=32)
def _zero(dtype: torch.dtype, device: str) -> Tensor:
    """A cached one-element zero (made without an operator on the CPU)."""
    z = torch.from_numpy(np.zeros(1)).to(dtype)
    return z if device == "cpu" else z.to(device)


@functools.lru_cache(maxsize=32)
def _zero_one(dtype: torch.dtype, device: str) -> Tensor:
    """A cached [0, 1] (the padding and the identity factor of the packed parameters)."""
    z = torch.from_numpy(np.array([0.0, 1.0])).to(dtype)
    return z if device == "cpu" else z.to(device)


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << max(0, int(n) - 1).bit_length())


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def runs_on(device: torch.device):
    """None when the kernels run on ``device``, else why not."""
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "CUDA is not available"
    if device.type == "cpu":
        return (
            None
            if interpreting()
            else (
                "the Triton kernels run on CUDA devices (on CPU tensors only under "
                "TRITON_INTERPRET=1, Triton's interpreter, for tests)"
            )
        )
    return f"the Triton kernels do not run on {device.type} devices"


def precision(dtype, device) -> int:
    """Index into PREC_NAMES for a dtype on a device under the current PyTorch switches."""
    if dtype == torch.float64:
        return 0
    dev = torch.device(device).type
    if torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev) == torch.bfloat16:
        return 3 if dev == "cpu" else 2
    if torch.get_float32_matmul_precision() != "highest":
        return 1
    # (CPU tensors take CUDA's mapping while the tensor cores are emulated, or when the interpreter runs the GPU's
    # choices for benchmarks/compile_check.py)
    on_cuda = dev == "cuda" or (
        dev == "cpu" and (EMULATE_CUDA_PRECISION or os.environ.get("IK_FAST_TARGET_DEVICE") == "cuda")
    )
    return PREC_NAMES.index(highest_on_cuda()) if on_cuda else 0


def highest_on_cuda() -> str:
    """What "highest" runs as on CUDA: ``IK_FAST_HIGHEST`` ("ieee" or "tf32x3", read per call; the native CUDA
    kernels read it too) or :data:`HIGHEST_ON_CUDA`."""
    name = os.environ.get("IK_FAST_HIGHEST", "") or HIGHEST_ON_CUDA
    if name not in ("ieee", "tf32x3"):
        raise ValueError(f"IK_FAST_HIGHEST must be 'ieee' or 'tf32x3', got {name!r}")
    return name


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
    GW: int  # width of the hidden blocks the GEMMs work on (a multiple of DP dividing CP * DP)
    FOURIER: bool
    C: int  # the hidden width H as C real channels of D components, padded to PC x PD = HP
    D: int
    PC: int
    PD: int
    CWF: int = 0  # componentwise hidden Linears (weights (D, C, C)): the channel padding factor F (CP F >= 16)

    @property
    def HP(self) -> int:
        return self.CP * self.DP


def _block_width(DP: int, HP: int, RP: int) -> int:
    gw = DP
    while 2 * gw <= HP and 2 * gw * max(2 * gw, RP) <= OPERAND_BUDGET:
        gw *= 2
    return gw


def layout(inp: Tensor, weights, fourier, R: int, ndim: int) -> Layout:
    return _layout(inp.shape[1], weights, fourier, R, ndim)


def _layout(P0: int, weights, fourier, R: int, ndim: int) -> Layout:
    NL = len(weights)
    if NL == 0:
        CP, DP, GP, fourier_act = 1, _pow2(P0), 16, False
        real = (1, P0, 1, DP)
    else:
        H = hidden_width(weights[-1])
        fourier_act = fourier[-1].numel() > 0
        if any(hidden_width(w) != H or (A.numel() > 0) != fourier_act for w, A in zip(weights, fourier)) or (
            fourier_act and any(A.shape != fourier[-1].shape for A in fourier)
        ):
            raise NotImplementedError(
                "backend 'triton' needs every hidden layer of the kernel MLP to have the same "
                "field type (as ImplicitKernel builds them)"
            )
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
    cwf = 0
    if fourier_act and NL > 1 and all(w.dim() == 3 for w in weights[1:]):
        cwf = max(1, 16 // CP)  # componentwise kernels (their batched dot needs the channel-major Fourier layout)
    return Layout(ndim, P0, _pow2(P0), NL, CP, DP, GP, _block_width(DP, CP * DP, _pow2(R)), fourier_act, *real, cwf)


@dataclass(frozen=True)
class Packing:
    """How the op's unpadded hidden-layer tensors become the kernels' padded ones, as index tensors built once per
    layout (with NumPy: no PyTorch operator), so that a call pads with one gather and unpads gradients with one per
    tensor.

    The padded buffer is ``[w1 (P0P, HP) | b1 (HP,) | wh (NH, ...) | bh (NH, HP) | bf (NA, HP) | bs (NA, HP) | f0
    (P0P,) | s0 (P0P,) | at (NA, DP, GP) | ait (NA, GP, DP)]`` (x @ W layouts; ``wh`` (NH, DP, CP, CP) per component
    for componentwise kernels (the kernels' dots spread each over (KC, KC), KC = CP F), else (NH, HP, HP); ``bf`` /
    ``bs`` each hidden layer's batch-norm factor and shift per hidden unit, the factor repeated over its channel's
    components, the identity for a layer without batch norm;
    ``f0`` / ``s0`` an affine map on the MLP input, per input column). The trainable part (up to ``s0``) gathers from
    the op's weights, biases, batch-norm factors and shifts and the input map's factor and shift, flattened and
    concatenated, then ``[0, 1]``; the constant part from the Fourier matrices and their inverses, then a zero.
    ``src`` / ``fsrc``: the source position of each entry; ``pos``: per weight, bias, factor and shift (in that
    order), the buffer positions of its entries' gradients (a factor's: one per channel where the kernels give it
    per Fourier channel, else those of its hidden units, channel-major, summed per channel here: ``factor_sums``);
    ``hidden`` (H,): padded position of each real hidden unit."""

    src: Tensor  # the trainable part [w1 | b1 | wh | bh | bf | bs | f0 | s0]
    fsrc: Tensor  # the constant part [at | ait]
    pos: Tuple[Tensor, ...]
    hidden: Tensor
    shapes: Tuple[Tuple[int, ...], ...]  # of w1, b1, wh, bh, bf, bs, f0, s0, at, ait
    trainable: Tuple[Tuple[int, ...], ...]  # shapes of the weights, the biases, the factors and the shifts
    factor_sums: Tuple[bool, ...]  # per layer: whether its factor's gradient is summed over its units

    def pad(self, weights, biases, bn_factor, bn_shift, in_affine, dtype, device, act_bias=()) -> Tensor:
        """The trainable part of the padded buffer, flat (the kernels find its parts, conv._params); ``in_affine``:
        (factor, shift) of the map on the input, or empty tensors; ``act_bias``: the norm layers' biases (the gated
        and norm kernels' packing, :func:`irrep_packing`)."""
        if not weights:  # no hidden layer: every kernel weight is zero
            return torch.zeros(self.src.shape[0], dtype=dtype, device=device)
        parts = [  # (no empty tensor: torch.cat on the CPU takes a slower path, 3 more operators a tensor)
            t.view(-1) if t.is_contiguous() else t.reshape(-1)
            for t in (*weights, *biases, *bn_factor, *bn_shift, *in_affine, *act_bias)
            if t.numel()
        ]
        flat = torch.cat(parts + [_zero_one(parts[0].dtype, str(parts[0].device))]).index_select(0, self.src)
        return flat if flat.dtype == dtype else flat.to(dtype)

    def pad_fourier(self, fourier, fourier_inv, dtype, device, prec: str = "ieee") -> Tensor:
        """The constant part [at | ait], kept per Fourier matrices (their storages, views and versions) while their
        storages live: the program passes the same constant matrices to every call (the same storages, even where
        the tensors are new aliases). Stored as :func:`fourier_storage` says for ``prec`` (a float16 copy only where
        the matrices fit its range: checked once, when the buffer is made)."""
        tensors = [t for t in (*fourier, *fourier_inv) if t.numel()]
        if not tensors:  # pointwise ELUs: the matrices are not read
            return _zeros(self.fsrc.shape[0], dtype, str(torch.device(device)))
        store = fourier_storage(dtype, prec, device)
        key = (tuple(_storage_key(t) for t in tensors), dtype, store, str(device), self.fsrc.shape[0])
        hit = _FOURIER.get(key)
        if hit is not None and not any(r.expired() for r in hit[0]):  # (a live storage is the one of the key)
            _FOURIER.move_to_end(key)
            return hit[1]
        parts = [t.reshape(-1) for t in tensors]
        flat = torch.cat(parts + [_zero(parts[0].dtype, str(parts[0].device))]).index_select(0, self.fsrc)
        flat = flat if flat.dtype == dtype else flat.to(dtype)
        if store == torch.float16:
            flat = _as_float16(flat)
        elif store != dtype:
            flat = flat.to(store)
        _FOURIER[key] = (tuple(StorageWeakRef(t.untyped_storage()) for t in tensors), flat)
        while len(_FOURIER) > FOURIER_CACHE:
            _FOURIER.popitem(last=False)
        return flat

    @property
    def gradient_size(self) -> int:
        """Elements of the buffer's trainable part (w1 .. s0; w1 .. ab for :func:`irrep_packing`)."""
        return sum(math.prod(sh) for sh in self.shapes[:8])

    def unpad_grads(self, flat: Tensor) -> List[Tensor]:
        """The gradient of the padded buffer's trainable part (flat, anything may follow) -> those of the op's
        weights, biases, batch-norm factors and shifts (in that order; empty for a layer without batch norm; then the
        activation biases where the packing has them), one gather each and a sum over each channel's components for a
        factor (separate tensors: an op's outputs must not alias each other)."""
        L = len(self.factor_sums)
        out = []
        for i, (p, sh) in enumerate(zip(self.pos, self.trainable)):
            g = flat.index_select(0, p)
            if 2 * L <= i < 3 * L and self.factor_sums[i - 2 * L]:  # a factor: its units' gradients summed
                g = g.view(sh[0], -1).sum(1)
            out.append(g.view(sh))
        return out


def _shape(t: Tensor) -> Tuple[int, ...]:
    return tuple(int(n) for n in t.shape)


def packing(lay: Layout, weights, biases, bn_factor, bn_shift, in_affine, fourier, fourier_inv, device) -> Packing:
    groups = (weights, biases, bn_factor, bn_shift, in_affine, fourier, fourier_inv)
    shapes = tuple(tuple(_shape(t) for t in group) for group in groups)
    return _packing(lay, shapes, str(torch.device(device)))


@functools.lru_cache(maxsize=256)
def _packing(lay: Layout, shapes, device: str) -> Packing:
    wsh, bsh, fsh, ssh, ish, ash, aish = shapes
    NL, HP, DP, GP, P0, P0P = lay.NL, lay.HP, lay.DP, lay.GP, lay.P0, lay.P0P
    H = lay.C * lay.D
    hm = (np.arange(H) // lay.D) * lay.PD + np.arange(H) % lay.D  # padded position of each hidden unit
    nh = max(NL - 1, 1)
    na = max(NL, 1)
    CP = lay.CP
    wh_shape = (nh, DP, CP, CP) if lay.CWF else (nh, HP, HP)
    out_shapes = ((P0P, HP), (HP,), wh_shape, (nh, HP), (na, HP), (na, HP), (P0P,), (P0P,), (na, DP, GP), (na, GP, DP))
    base = np.cumsum([0] + [math.prod(sh) for sh in out_shapes])
    # the sources: the trainable ones (weights, biases, factors, shifts, the input map), then [0, 1]; the Fourier
    # matrices, then a zero
    train_sizes = [math.prod(sh) for group in (wsh, bsh, fsh, ssh, ish) for sh in group]
    n_train = int(sum(train_sizes))
    ZERO, ONE = n_train, n_train + 1
    toff = np.cumsum([0] + train_sizes)
    w_off, b_off, f_off, s_off = (toff[k * NL : (k + 1) * NL] for k in range(4))
    i_off = toff[4 * NL : 4 * NL + 2]
    four_sizes = [math.prod(sh) for group in (ash, aish) for sh in group]
    foff = np.cumsum([0] + four_sizes)
    a_off, ai_off = foff[:NL], foff[NL : 2 * NL]
    n_four = int(foff[-1])
    split = int(base[8])
    buf = np.full(split, ZERO, dtype=np.int64)  # every entry the appended zero, unless written below
    fbuf = np.full(int(base[-1]) - split, n_four, dtype=np.int64)

    def put(dst: np.ndarray, src: np.ndarray, trainable: bool = True):
        (buf if trainable else fbuf)[dst.reshape(-1) - (0 if trainable else split)] = src.reshape(-1)
        return dst.reshape(-1)

    if NL > 0:
        if len(wsh[0]) != 2:
            raise ValueError(f"the first hidden Linear's weight must be dense (H, P0), got {wsh[0]}")
    w_pos, b_pos = [], []
    for k in range(NL):
        sh = wsh[k]
        if k == 0:  # W1[j, p] -> w1[p, hm[j]]
            j, p = np.meshgrid(np.arange(H), np.arange(P0), indexing="ij")
            dst = base[0] + p * HP + hm[j]
        elif len(sh) == 3 and lay.CWF:  # W[d, co, ci] -> wh[k-1, d, ci, co] (compact: conv._cw_weight)
            d, co, ci = np.meshgrid(*(np.arange(n) for n in sh), indexing="ij")
            dst = base[2] + (k - 1) * DP * CP * CP + (d * CP + ci) * CP + co
        elif len(sh) == 3:  # componentwise, in the dense layout: W[d, co, ci] is entry (co D + d, ci D + d)
            d, co, ci = np.meshgrid(*(np.arange(n) for n in sh), indexing="ij")
            D = sh[0]
            dst = base[2] + (k - 1) * HP * HP + hm[ci * D + d] * HP + hm[co * D + d]
        else:  # W[jo, ji] -> wh[k-1, hm[ji], hm[jo]]
            jo, ji = np.meshgrid(np.arange(sh[0]), np.arange(sh[1]), indexing="ij")
            dst = base[2] + (k - 1) * HP * HP + hm[ji] * HP + hm[jo]
        w_pos.append(put(dst, w_off[k] + np.arange(dst.size)))
        dst = base[1] + hm if k == 0 else base[3] + (k - 1) * HP + hm
        b_pos.append(put(dst, b_off[k] + np.arange(H)))
    f_pos, s_pos, f_sum = [], [], []
    for k in range(NL):  # the batch norms per hidden unit (the identity without one)
        fdst, sdst = base[4] + k * HP + hm, base[5] + k * HP + hm
        if fsh[k] and fsh[k][0]:
            n_ch = fsh[k][0]
            if lay.FOURIER and (H // n_ch) % lay.D:
                # (the backward's Fourier ELU takes the factor as one per channel of its own: conv._act_bwd_blk)
                raise NotImplementedError(
                    f"backend 'triton' needs each batch norm channel to hold whole Fourier channels ({H // n_ch} "
                    f"components per batch norm channel, {lay.D} per Fourier channel)"
                )
            put(fdst, f_off[k] + np.arange(H) // (H // n_ch))
            s_pos.append(put(sdst, s_off[k] + np.arange(H)))
            # the kernels' gradient of a factor: per hidden unit for pointwise ELUs, per Fourier channel (on its
            # first component) for Fourier ELUs; a batch norm channel's is read at once where it is one Fourier
            # channel, else summed over its units
            direct = lay.FOURIER and H // n_ch == lay.D
            f_pos.append(fdst[:: lay.D] if direct else fdst)
            f_sum.append(not direct)
        else:
            buf[fdst] = ONE
            f_pos.append(np.zeros(0, dtype=np.int64))
            s_pos.append(np.zeros(0, dtype=np.int64))
            f_sum.append(False)
    if ish and ish[0] and ish[0][0]:  # the map on the input: C0 channels of P0 / C0 components
        n_ch = ish[0][0]
        put(base[6] + np.arange(P0), i_off[0] + np.arange(P0) // (P0 // n_ch))
        put(base[7] + np.arange(P0), i_off[1] + np.arange(P0))
    if lay.FOURIER:
        for k in range(NL):
            G, D = ash[k]
            g, a = np.meshgrid(np.arange(G), np.arange(D), indexing="ij")  # A[g, a] -> at[k, a, g]
            put(base[8] + k * DP * GP + a * GP + g, a_off[k] + np.arange(G * D), False)
            a, g = np.meshgrid(np.arange(D), np.arange(G), indexing="ij")  # Ainv[a, g] -> ait[k, g, a]
            put(base[9] + k * GP * DP + g * DP + a, ai_off[k] + np.arange(G * D), False)
    tens = lambda a: torch.from_numpy(a) if device == "cpu" else torch.from_numpy(a).to(device)  # noqa: E731
    per = tuple(tens(np.ascontiguousarray(p)) for p in (*w_pos, *b_pos, *f_pos, *s_pos))
    trainable = tuple(wsh) + tuple(bsh) + tuple(fsh) + tuple(ssh)
    return Packing(tens(buf), tens(fbuf), per, tens(hm), out_shapes, trainable, tuple(f_sum))


# ----------------------------------------------------------------------------------------------------------------
# layout of the gated and norm kernels (.irreps)
# ----------------------------------------------------------------------------------------------------------------
IRREP_KINDS = ("gated", "norm")
IRREP_CHUNK = 1024  # elements of one operand block of a componentwise Linear (DC groups of KC channels, BE edges)


@dataclass(frozen=True)
class IrrepLayout:
    """The gated and norm kernels' sizes (:mod:`.irreps`): ``NL`` given hidden layers of ``C`` channels (``CP``
    padded) of ``D`` components, their Linears making ``DL`` (the gates after the components); a slot row of ``UL``
    units (unit ``a CP + c``), in chunks of ``DC`` groups of ``PC`` components; ``T0`` the first trivial component
    (a gate's source); ``table`` the activation's entries (start, size, gate / bias index): ``NTR`` runs of trivial
    components, then ``NNT`` non-trivial irreps, each at most ``SP`` components."""

    NL: int
    P0: int
    P0P: int
    C: int
    CP: int
    D: int
    DL: int
    T0: int
    PC: int
    DC: int
    UL: int
    CW: bool
    GATED: bool
    NTR: int
    NNT: int
    SP: int
    table: Tuple[Tuple[int, int, int], ...]

    @property
    def KC(self) -> int:
        return self.PC * self.CP

    @property
    def GW(self) -> int:
        return self.DC * self.KC

    @property
    def WS(self) -> int:
        """Elements of one hidden Linear's packed weight."""
        return self.UL * self.KC if self.CW else self.UL * self.UL

    @property
    def H(self) -> int:
        return self.C * self.D

    def constexprs(self) -> dict:
        names = ("P0", "P0P", "CP", "C", "PC", "DC", "D", "DL", "T0", "UL", "CW", "GATED", "NTR", "NNT", "SP")
        return {n: getattr(self, n) for n in names}


def irrep_kind(structure: Optional[str], first: int = 0, n: Optional[int] = None) -> Optional[str]:
    """The kind, "gated" or "norm", where the structure states that kind for the given hidden layers, else None."""
    if structure is None:
        return None
    layers = decode(structure).layers
    layers = layers[first:] if n is None else layers[first : first + n]
    kinds = {h.activation for h in layers}
    found = kinds & set(IRREP_KINDS)
    return next(iter(found)) if found else None


@functools.lru_cache(maxsize=64)
def irrep_layout(structure: str, first: int, n: int, P0: int, weight_dims: Tuple[int, ...]) -> IrrepLayout:
    """The layout of hidden layers ``first .. first + n`` of ``structure`` (gated or norm) for an MLP input of ``P0``
    columns; ``weight_dims``: each given Linear's weight's number of dimensions (3: componentwise)."""
    layers = decode(structure).layers[first : first + n]
    h = layers[0]
    if any((x.channels, x.components, x.irreps, x.activation) != (h.channels, h.components, h.irreps, h.activation)
           for x in layers):  # fmt: skip
        raise NotImplementedError(
            "backend 'triton' needs every hidden layer of the kernel MLP to have the same field type (as "
            "ImplicitKernel builds them)"
        )
    if first > 0:
        raise NotImplementedError(
            f"backend 'triton': a statistics pass from a previous activation (chained statistics) is not implemented "
            f"for nonlinearity {h.activation!r}"
        )
    if weight_dims and weight_dims[0] != 2:
        raise ValueError(f"the first hidden Linear's weight must be dense (H, P0), got {weight_dims[0]} dimensions")
    hidden = weight_dims[1:]
    cw = bool(hidden) and all(d == 3 for d in hidden)
    if hidden and not cw and any(d == 3 for d in hidden):
        raise NotImplementedError("backend 'triton' needs every hidden Linear componentwise, or every one dense")
    C, D = h.channels, h.components
    DL = h.linear_components
    t0 = h.trivial_source()
    if h.gates and cw and t0 < 0:
        raise ValueError("a componentwise Linear into a gated layer needs a trivial irrep in its input field")
    CP = _pow2(C, 1)
    PC = max(1, 16 // CP)
    KC = PC * CP
    DC = max(1, IRREP_CHUNK // (STATS_TILE * KC))
    UL = -(-DL // (PC * DC)) * DC * KC
    sizes = [size for size, trivial in h.irreps if not trivial]
    SP = max(2, _pow2(max(sizes), 1)) if sizes else 16
    runs, p = [], 0
    for size, trivial in h.irreps:  # consecutive trivial components as runs of at most SP
        if trivial:
            if runs and runs[-1][0] + runs[-1][1] == p and runs[-1][1] + size <= SP:
                runs[-1] = (runs[-1][0], runs[-1][1] + size, 0)
            else:
                for q in range(0, size, SP):
                    runs.append((p + q, min(SP, size - q), 0))
        p += size
    nontrivial, p, g = [], 0, 0
    for size, trivial in h.irreps:
        if not trivial:
            nontrivial.append((p, size, g))
            g += 1
        p += size
    return IrrepLayout(
        len(layers), P0, _pow2(P0), C, CP, D, DL, max(t0, 0), PC, DC, UL, cw, h.activation == "gated", len(runs),
        len(nontrivial), SP, tuple(runs + nontrivial),
    )  # fmt: skip


def irrep_packing(il: IrrepLayout, weights, biases, bn_factor, bn_shift, act_bias, device) -> Packing:
    groups = (weights, biases, bn_factor, bn_shift, act_bias)
    shapes = tuple(tuple(_shape(t) for t in group) for group in groups)
    return _irrep_packing(il, shapes, str(torch.device(device)))


@functools.lru_cache(maxsize=256)
def _irrep_packing(il: IrrepLayout, shapes, device: str) -> Packing:
    """The gated and norm kernels' parameters (:func:`.irreps._offsets`): ``[w1 (P0, UL) | b1 (UL,) | wh (NH, WS) |
    bh (NH, UL) | bf (NL, UL) | bs (NL, UL) | ab (NL, UL)]``, each Linear's output unit (channel c, component a) at
    ``a CP + c``; a componentwise weight as (groups, KC, KC) blocks (x @ W), block-diagonal over a group's PC
    components; a norm layer's bias j of channel c at ``j CP + c``. The sources as :class:`Packing`'s, in the order
    weights, biases, factors, shifts, (no input map,) activation biases."""
    wsh, bsh, fsh, ssh, absh = shapes
    NL, UL, CP, C, D, DL, P0, KC, PC = il.NL, il.UL, il.CP, il.C, il.D, il.DL, il.P0, il.KC, il.PC
    H = C * D
    nh = max(NL - 1, 1)
    out_shapes = ((P0, UL), (UL,), (nh, il.WS), (nh, UL), (NL, UL), (NL, UL), (NL, UL))
    base = np.cumsum([0] + [math.prod(sh) for sh in out_shapes])
    train_sizes = [math.prod(sh) for group in (wsh, bsh, fsh, ssh, absh) for sh in group]
    n_train = int(sum(train_sizes))
    ZERO, ONE = n_train, n_train + 1
    toff = np.cumsum([0] + train_sizes)
    w_off, b_off, f_off, s_off, a_off = (toff[k * NL : (k + 1) * NL] for k in range(5))
    buf = np.full(int(base[-1]), ZERO, dtype=np.int64)

    def put(dst: np.ndarray, src: np.ndarray):
        buf[dst.reshape(-1)] = src.reshape(-1)
        return dst.reshape(-1)

    def unit(c, a):
        return a * CP + c

    lin = np.arange(C * DL)
    lc, la = lin // DL, lin % DL  # the Linears' outputs, channel-major
    hid = np.arange(H)
    hc, ha = hid // D, hid % D  # the field's units, channel-major
    w_pos, b_pos, f_pos, s_pos, a_pos = [], [], [], [], []
    for k in range(NL):
        sh = wsh[k]
        if k == 0:  # W1[r, p] -> w1[p, unit(r)]
            if sh != (C * DL, P0):
                raise ValueError(f"the first hidden Linear's weight must be ({C * DL}, {P0}), got {sh}")
            r, p = np.meshgrid(lin, np.arange(P0), indexing="ij")
            dst = base[0] + p * UL + unit(lc[r], la[r])
        elif il.CW:  # W[a, co, ci] -> wh[k-1, a // PC, q CP + ci, q CP + co], q = a % PC
            if sh != (DL, C, C):
                raise ValueError(f"hidden Linear {k}'s componentwise weight must be ({DL}, {C}, {C}), got {sh}")
            a, co, ci = np.meshgrid(np.arange(DL), np.arange(C), np.arange(C), indexing="ij")
            q = a % PC
            dst = base[2] + (k - 1) * il.WS + (a // PC) * KC * KC + (q * CP + ci) * KC + q * CP + co
        else:  # W[co DL + a, ci D + b] -> wh[k-1, unit(ci, b), unit(co, a)]
            if sh != (C * DL, H):
                raise ValueError(f"hidden Linear {k}'s weight must be ({C * DL}, {H}), got {sh}")
            r, j = np.meshgrid(lin, hid, indexing="ij")
            dst = base[2] + (k - 1) * il.WS + unit(hc[j], ha[j]) * UL + unit(lc[r], la[r])
        w_pos.append(put(dst, w_off[k] + np.arange(dst.size)))
        dst = (base[1] if k == 0 else base[3] + (k - 1) * UL) + unit(lc, la)
        b_pos.append(put(dst, b_off[k] + np.arange(C * DL)))
        fdst, sdst = base[4] + k * UL + unit(hc, ha), base[5] + k * UL + unit(hc, ha)
        if fsh[k] and fsh[k][0]:
            if fsh[k][0] != C:
                raise NotImplementedError(f"backend 'triton': a batch norm of {fsh[k][0]} channels on {C} channels")
            put(fdst, f_off[k] + hc)  # (channel-major units: the host sums each channel's D gradients)
            f_pos.append(fdst)
            s_pos.append(put(sdst, s_off[k] + hid))
        else:
            buf[fdst] = ONE
            f_pos.append(np.zeros(0, dtype=np.int64))
            s_pos.append(np.zeros(0, dtype=np.int64))
        n_ab = absh[k][0] if absh[k] else 0
        if n_ab:
            nt = n_ab // C
            j = np.arange(n_ab)
            a_pos.append(put(base[6] + k * UL + (j % nt) * CP + j // nt, a_off[k] + j))
        else:
            a_pos.append(np.zeros(0, dtype=np.int64))
    tens = lambda a: torch.from_numpy(a) if device == "cpu" else torch.from_numpy(a).to(device)  # noqa: E731
    per = tuple(tens(np.ascontiguousarray(p)) for p in (*w_pos, *b_pos, *f_pos, *s_pos, *a_pos))
    trainable = tuple(wsh) + tuple(bsh) + tuple(fsh) + tuple(ssh) + tuple(absh)
    hm = unit(hc, ha)
    f_sum = tuple(bool(fsh[k] and fsh[k][0]) for k in range(NL))
    return Packing(tens(buf), tens(np.zeros(0, dtype=np.int64)), per, tens(hm), out_shapes, trainable, f_sum)


@functools.lru_cache(maxsize=64)
def _irrep_table(table, device: str) -> Tensor:
    t = torch.from_numpy(np.array(table, dtype=np.int32).reshape(-1, 3))
    return t if device == "cpu" else t.to(device)


# ----------------------------------------------------------------------------------------------------------------
# tiles and blocks
# ----------------------------------------------------------------------------------------------------------------
BLOCK = 16  # receivers per contraction program, edges per chunk of a receiver, and the H / C_in / R blocks of W'


def _ceil(n: int, m: int = BLOCK) -> int:
    return max(m, -(-int(n) // m) * m)


def target(device) -> str:
    """The device type the launch parameters are chosen for: the tensors' own, or ``cuda`` for CPU tensors under
    ``IK_FAST_TARGET_DEVICE=cuda`` (the interpreter then runs the GPU's choices: benchmarks/compile_check.py)."""
    dev = torch.device(device).type
    if dev == "cpu" and os.environ.get("IK_FAST_TARGET_DEVICE") == "cuda":
        return "cuda"
    return dev


def tile_size(device, hidden: int = 0) -> int:
    """Edges per tile of the forward trunk kernel: 16 (32-edge tiles spill at config M in IEEE float32 on sm_90,
    with 4 or 8 warps; benchmarks/compile_check.py)."""
    return 16


def warps(kind: str, hidden: int) -> int:
    """Warps per program: more threads share the register tiles of the wide kernels (no spills)."""
    if kind == "contract":
        return 8
    if kind == "trunk_forward":  # 4 warps spill at M in IEEE float32 on sm_90; 8 do not
        return 8 if hidden <= 512 else 16
    if kind == "trunk_backward":  # blocks of a tile through its scratch, Fourier grid chunks: no wide tile live
        return 8
    if kind == "irreps":  # the gated and norm kernels: blocks of a tile through their scratch
        return 8
    return 4 if hidden <= 256 else 8 if hidden <= 512 else 16


BACKWARD_MMA_ROWS = 64  # rows of the trunk backward's Fourier GEMMs when its layout allows (one wgmma on sm_90)
BACKWARD_MMA_ELEMENTS = 2048  # ... and at most this many elements in one of their (rows, DP) operands (no spills)


MMA_PRECISIONS = ("tf32",)  # the precisions whose trunk blocks are shaped for the tensor cores (IEEE float32 runs its
# dots on the FMA pipes, whose register tiles spill at these blocks; bf16 is not compile-checked at them yet: the
# layout's blocks for both)


STATS_MMA_PRECISIONS = MMA_PRECISIONS + ("tf32x3",)  # ... and of the statistics kernel (3xTF32 does not spill there;
# in the backward it does, at the wider blocks)
BACKWARD_NARROW_WARPS = 2  # warps of the trunk backward's 32-row tensor-core blocks (backward_blocks)


BACKWARD_X3_MAX_DP = 32  # 3xTF32 takes the narrow blocks (2 warps, 16 rows each) up to this DP: at config M they do
# not spill (352 / 328 B of stack with / without the tape under Triton 3.9); at config H's DP = 64 they spill 1.2 KB


def backward_blocks(lay: "Layout", prec: str, tile: int = BACKWARD_TILE) -> Tuple[int, int]:
    """(GW, num_warps) of conv.trunk_backward_kernel. Triton lays the warps of chained dots (the Fourier ELU's) all
    along M, so a dot of fewer than 16 rows per warp computes the same rows on several warps. Where a block of
    BACKWARD_MMA_ROWS (edge x channel) rows fits (4 warps: one warpgroup, a wgmma on sm_90; at config M, 16 edges x
    4 channels of 32 components), the backward takes blocks of that many channels; else blocks of half as many rows
    on 2 warps, 16 rows each (config H, whose D = 64 makes a 64-row operand twice as large: 4 warps with wgmma's
    layouts spill, 792-880 B of stack under Triton 3.6; 2 channels per block there, mma.sync). On 8 warps those
    blocks computed two of the Fourier ELU's three GEMMs twice (1.78x the ideal MMA count at H in the static GPU
    model; 1.02x on 2 warps, the first Linear's d inp of 16 rows being the rest), and :func:`num_programs`' 4
    programs per SM at 255 registers fill an SM's registers as one 8-warp program did. Without the tape, 2 warps
    fit only with the last layer's activation evaluated apart from its backward (the kernel's ACT_APART: 648 B of
    stack at config H under Triton 3.9 otherwise, 432 B with it). 3xTF32 takes the narrow blocks up to DP =
    BACKWARD_X3_MAX_DP (its split operands spill at the wider ones), IEEE float32 the layout's blocks."""
    if lay.FOURIER and (prec in MMA_PRECISIONS or (prec == "tf32x3" and lay.DP <= BACKWARD_X3_MAX_DP)):
        dense = lay.NL > 1 and lay.CWF == 0  # (a dense hidden Linear's weight operand is (GW, GW))
        narrow = ((BACKWARD_MMA_ROWS // 2, BACKWARD_NARROW_WARPS),)
        for rows, nw in (((BACKWARD_MMA_ROWS, 4),) if prec in MMA_PRECISIONS else ()) + narrow:
            gw = min(lay.HP, rows * lay.DP // tile)  # (all of a narrower layer's channels at once)
            fits = rows * lay.DP <= BACKWARD_MMA_ELEMENTS and (not dense or gw * gw <= OPERAND_BUDGET)
            if gw >= lay.GW and gw % lay.DP == 0 and lay.HP % gw == 0 and fits:
                return gw, nw
    return lay.GW, warps("trunk_backward", lay.HP)


def stats_blocks(lay: "Layout", prec: str, tile: int = STATS_TILE) -> Tuple[int, int]:
    """(GW, num_warps) of conv.fused_stats_kernel: its Fourier GEMMs on blocks of 16 (edge x channel) rows per warp
    (no MMA computed twice; 64 or 128 rows, a wgmma on sm_90): 4 warps up to 256 hidden units (config M: blocks of 4
    channels), else 8 (config H: 8 channels, a (BE, 1024) tile over 8 warps does not spill; 16 warps would need more
    than the shared memory); the layout's blocks where a dense hidden Linear would get too large an operand."""
    nw = 4 if lay.HP <= 256 else 8
    if lay.FOURIER and prec in STATS_MMA_PRECISIONS:
        gw = min(lay.HP, 16 * nw * lay.DP // tile)
        dense = lay.NL > 1 and lay.CWF == 0
        if gw >= lay.GW and gw % lay.DP == 0 and lay.HP % gw == 0 and (not dense or gw * gw <= OPERAND_BUDGET):
            return gw, nw
    return lay.GW, warps("trunk", lay.HP)


def num_programs(n_tiles: int, device, per_program_floats: int) -> int:
    """Persistent programs of the backward and statistics kernels (each owns an accumulator row): 4 per SM, all
    resident where a program has 2 warps at 255 registers (the trunk backward's tensor-core blocks at config H; at 8
    warps one per SM is), so the narrow programs keep an 8-warp program's occupancy."""
    dev = torch.device(device)
    if dev.type == "cuda":
        sms = torch.cuda.get_device_properties(dev).multi_processor_count
        budget = 2**28  # floats of accumulators (1 GiB in float32)
        n = min(4 * sms, max(1, budget // max(1, per_program_floats)))
    else:
        n = 4
    return max(1, min(n, n_tiles))


def wgrad_splits(n_blocks: int, n_wblocks: int, w_floats: int, device) -> int:
    """Receiver splits of the W' gradient kernel: enough programs to fill the device, each split one partial sum of
    W' (bounded memory)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        want = -(-4 * torch.cuda.get_device_properties(dev).multi_processor_count // max(1, n_wblocks))
        n = min(want, max(1, 2**28 // max(1, w_floats)))
    else:
        n = 2
    return max(1, min(n, n_blocks))


# ----------------------------------------------------------------------------------------------------------------
# the stages
# ----------------------------------------------------------------------------------------------------------------
_SETUPS: "WeakIdKeyDictionary" = WeakIdKeyDictionary()


def _empty(dtype: torch.dtype, device) -> Tensor:
    """A cached empty tensor (read-only use)."""
    return _zeros(0, dtype, str(torch.device(device)))


def _bn_mask(factors) -> int:
    """The kernels' BNM: bit k set where hidden layer k + 1 has a batch norm (a non-empty factor)."""
    return sum(1 << k for k, f in enumerate(factors) if f is not None and f.numel() > 0)


def _setup(
    x, inp, weights, biases, fourier, fourier_inv, bn_factor, bn_shift, final_weight, final_bias, coef, ndim,
    structure, act_bias=(),
):  # fmt: skip
    """The kernels' padded tensors and launch constants for one call. The forward's are kept (per final weight tensor,
    while it lives) for the backward of the same inputs: identical tensors (by identity and version), dtype,
    precision and device, so the backward does not pad again."""
    args = (*weights, *biases, *fourier, *fourier_inv, *bn_factor, *bn_shift, *act_bias, final_weight, final_bias, coef)
    key = (
        tuple((id(t), t._version) for t in args),
        x.dtype,
        str(x.device),
        precision(x.dtype, x.device),
        inp.shape[1],
        ndim,
        structure,
    )
    hit = _SETUPS.get(final_weight)
    if hit is not None and hit[0] == key:
        return hit[1]
    out = _make_setup(
        x, inp, weights, biases, fourier, fourier_inv, bn_factor, bn_shift, final_weight, final_bias, coef, ndim,
        structure, act_bias,
    )  # fmt: skip
    _SETUPS[final_weight] = (key, out)
    return out


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    return _c(t if t.dtype == dtype else t.to(dtype))


def _make_setup(
    x, inp, weights, biases, fourier, fourier_inv, bn_factor, bn_shift, final_weight, final_bias, coef, ndim,
    structure, act_bias,
):  # fmt: skip
    dtype = x.dtype
    R, H, C = final_weight.shape
    none = (_empty(dtype, x.device), _empty(dtype, x.device))  # no map on the input
    prec = PREC_NAMES[precision(dtype, x.device)]
    bnm = _bn_mask(bn_factor)
    if irrep_kind(structure) is not None:  # the gated and norm kernels (.irreps)
        lay = irrep_layout(structure, 0, len(weights), inp.shape[1], tuple(w.dim() for w in weights))
        pack = irrep_packing(lay, weights, biases, bn_factor, bn_shift, act_bias, x.device)
        hidden = (
            pack.pad(weights, biases, bn_factor, bn_shift, none, dtype, x.device, act_bias),
            _irrep_table(lay.table, str(torch.device(x.device))),
        )
        trunk = dict(NDIM=ndim, BE=BACKWARD_TILE, PREC=prec, BNM=bnm, **lay.constexprs())
    else:
        lay = layout(inp, weights, fourier, R, ndim)
        pack = packing(lay, weights, biases, bn_factor, bn_shift, none, fourier, fourier_inv, x.device)
        hidden = (
            pack.pad(weights, biases, bn_factor, bn_shift, none, dtype, x.device),
            pack.pad_fourier(fourier, fourier_inv, dtype, x.device),
        )
        trunk = _fourier_constexprs(lay, ndim, prec, bnm, x.device)
    plan = blocks(structure, final_weight.shape, lay.D, x.device)
    # W' and B' packed once per step in the plan's order: W''s non-zero blocks contiguous (NB, 16 * 16, 16), B' (CINC,
    # RC); each is one gather, its padding then zeroed
    wc = _pack(_as(final_weight, dtype), plan.w_take, plan.w_pad)
    bf = _pack(_as(final_bias, dtype), plan.b_take, plan.b_pad)
    consts = dict(BN=BLOCK, KP=BLOCK, HB=BLOCK, CB=BLOCK, RB=BLOCK, PREC=prec)
    # the plan's tensors and sizes, in the contraction kernels' argument order
    walk = (plan.pairs, plan.pair_ptr, plan.blk_r)
    sizes = (H, C, _ceil(H), _ceil(C), R, _ceil(R))  # H, CIN, HC, CINC, R, RC
    coef = coef if coef.dtype == dtype and coef.dim() == 1 else coef.to(dtype).reshape(1)
    # the last batch norm, for a forward given the last activation before it: (factor, shift, components per channel)
    last_bn = None
    if lay.NL and bnm >> (lay.NL - 1) & 1:  # in their own order: the kernel reads them through the plan's (no operator)
        f = bn_factor[-1]
        last_bn = (_c(f), _c(bn_shift[-1]), H // f.shape[0])
    return lay, pack, hidden, plan, wc, bf, coef, trunk, consts, walk, sizes, last_bn


SEGMENT = 2 * BLOCK  # the most edges of one receiver that one contraction program walks (a hub: several programs),
# and the edges per chunk: a segment is one chunk, so that the backward's d hs and d x add in registers over a hidden
# (input) block's pairs and are stored once
_SEGMENTS: "WeakIdKeyDictionary" = WeakIdKeyDictionary()


def _segments(rowptr: Tensor, E: int):
    """The receivers' in-edges cut into segments of at most SEGMENT edges (.contract.split_receivers_kernel): (vptr
    (n_v + 1,), rid (n_v,), segptr (n_dst + 1,), n_v) with n_v = n_dst + E // SEGMENT, a bound on the segment count
    known without reading the graph back (no host synchronisation). Kept per CSR tensor (identity and version), so
    that a backward reuses its forward's."""
    key = (rowptr._version, E)
    hit = _SEGMENTS.get(rowptr)
    if hit is not None and hit[0] == key:
        return hit[1]
    n_dst = rowptr.shape[0] - 1
    n_v = n_dst + E // SEGMENT
    vptr, segptr = rowptr.new_empty(n_v + 1), rowptr.new_empty(n_dst + 1)
    rid = torch.empty(n_v, dtype=torch.int32, device=rowptr.device)
    K2.split_receivers_kernel[(1,)](rowptr, vptr, rid, segptr, n_dst, n_v, E, SEG=SEGMENT, BV=1024, num_warps=4)
    out = (vptr, rid, segptr, n_v)
    _SEGMENTS[rowptr] = (key, out)
    return out


def _pack(t: Tensor, take: Tensor, pad: Tensor) -> Tensor:
    """``t`` flattened, gathered at ``take`` (the plan's packed order), zero where ``pad`` (structural zeros and
    padding): two operators (``take`` reads any strides)."""
    if t.numel() == 0:
        return t.new_zeros(take.shape[0])
    return torch.take(t, take).masked_fill_(pad, 0)


def _to_plan(t: Tensor, perm: Tensor) -> Tensor:
    """Columns of ``t`` (n, m) in the plan's order, padded to a multiple of 16 (n, len(perm)): the contraction
    kernels' layout of h, x and dout (padding columns are masked by the kernels)."""
    return t.index_select(1, perm)


def _from_plan(t: Tensor, inv: Tensor) -> Tensor:
    """The inverse of :func:`_to_plan`: columns back in their own order (n, len(inv))."""
    return t.index_select(1, inv)


def _fourier_constexprs(lay: Layout, ndim: int, prec: str, bnm: int, device) -> dict:
    """The Fourier and pointwise ELU trunk kernels' constexprs (.conv)."""
    return dict(
        P0=lay.P0,
        P0P=lay.P0P,
        NDIM=ndim,
        NL=lay.NL,
        CP=lay.CP,
        DP=lay.DP,
        GP=lay.GP,
        GW=lay.GW,
        FOURIER=lay.FOURIER,
        C=lay.C,
        D=lay.D,
        PD=lay.PD,
        BE=tile_size(device, lay.HP),
        PREC=prec,
        CWF=lay.CWF,
        BNM=bnm,
    )


def _trunk_forward(inp, hidden, coef, norm, H, trunk):
    """h (E, H), the last hidden layer's output (after its batch norm) in the compact layout, and the radial shell s
    (E,)."""
    E = inp.shape[0]
    h = inp.new_empty(E, H)
    s = inp.new_empty(E)
    nw = warps("trunk_forward", trunk["CP"] * trunk["DP"])
    K.trunk_forward_kernel[(-(-E // trunk["BE"]),)](inp, *hidden, coef, h, s, E, float(norm), num_warps=nw, **trunk)
    return h, s


def _irrep_trunk_forward(inp, hidden, coef, norm, lay: "IrrepLayout", trunk):
    """h (E, H) and s (E,) of the gated and norm kernels (.irreps.irrep_trunk_kernel)."""
    E = inp.shape[0]
    h = inp.new_empty(E, lay.H)
    s = inp.new_empty(E)
    n_tiles = -(-E // trunk["BE"])
    nprog = num_programs(n_tiles, inp.device, 2 * trunk["BE"] * lay.UL)
    scratch = inp.new_empty(nprog, 2, trunk["BE"], lay.UL)
    KI.irrep_trunk_kernel[(nprog,)](
        inp, *hidden, coef, h, h, s, scratch, E, n_tiles, float(norm), K=lay.NL, STATS=False, WRITE=False,
        num_warps=warps("irreps", 0), **trunk,
    )  # fmt: skip
    return h, s


def conv(
    x,
    inp,
    src,
    rowptr,
    weights,
    biases,
    fourier,
    fourier_inv,
    act_bias,
    bn_factor,
    bn_shift,
    final_weight,
    final_bias,
    coef,
    norm,
    ndim,
    structure=None,
    hidden=None,
    tape=None,
):
    _check_activations(structure, act_bias)
    R = final_weight.shape[0]
    n_dst = rowptr.shape[0] - 1
    E = inp.shape[0]
    if E == 0:
        return x.new_zeros(n_dst, R)
    inp = _c(inp)
    lay, _, mlp, plan, wc, bf, coefp, trunk, consts, walk, sizes, last_bn = _setup(
        x, inp, weights, biases, fourier, fourier_inv, bn_factor, bn_shift, final_weight, final_bias, coef, ndim,
        structure, act_bias,
    )  # fmt: skip
    # (the last batch norm's factor per channel, its shift per unit and the units per channel, applied by the
    # contraction)
    aff = (coefp, coefp, 1, False)
    if hidden is None and isinstance(lay, IrrepLayout):
        h, s = _irrep_trunk_forward(inp, mlp, coefp, norm, lay, trunk)
    elif hidden is None:
        h, s = _trunk_forward(inp, mlp, coefp, norm, sizes[0], trunk)
    else:  # the activation from the statistics pass of the last layer, before its batch norm: only the radial shell
        # is left to compute, and the contraction applies the batch norm as it reads h
        h = _as(hidden, x.dtype)
        s = inp.new_empty(E)
        K.shell_kernel[(-(-E // 128),)](
            inp, coefp, s, E, float(norm), P0=lay.P0, P0P=lay.P0P, NDIM=ndim, BE=128, num_warps=4
        )
        if last_bn is not None:
            aff = (*last_bn, True)
    # h and x in the plan's order (one column permutation each at the trunk's boundary); one output row per receiver
    # segment
    vptr, rid, segptr, n_v = _segments(rowptr, E)
    RC = sizes[-1]
    outv = x.new_empty(n_v, RC)  # (every segment's row is written)
    K2.contract_forward_kernel[(-(-n_v // BLOCK),)](
        _to_plan(h, plan.perm_h),
        s,
        _to_plan(x, plan.perm_c),
        _c(src),
        vptr,
        rid,
        wc,
        bf,
        outv,
        *walk,
        aff[0],
        aff[1],
        plan.perm_h,
        aff[2],
        n_v,
        n_dst,
        plan.n_pairs,
        *sizes,
        num_warps=warps("contract", 0),
        AFF=aff[3],
        **dict(consts, KP=SEGMENT),  # (a segment is one chunk)
    )
    # the segments added per receiver, the columns put back in their own order as they are stored
    out = x.new_empty(n_dst, R)
    rb = _pow2(RC)
    bn = max(2, min(BLOCK, 4096 // rb))  # (at most 4096 elements of a register tile)
    K2.segment_sum_kernel[(-(-n_dst // bn),)](outv, segptr, plan.perm_r, out, n_dst, R, RC, BN=bn, RB=rb, num_warps=4)
    return out


def conv_backward(
    grad,
    x,
    inp,
    src,
    rowptr,
    weights,
    biases,
    fourier,
    fourier_inv,
    act_bias,
    bn_factor,
    bn_shift,
    final_weight,
    final_bias,
    coef,
    norm,
    ndim,
    structure=None,
    tape=None,
) -> List[Tensor]:
    # a tape (ik_fast.ops) gives the trunk's backward every layer's activation (TAPE_LAYERS at most); without one it
    # evaluates the trunk again from the narrow MLP input
    _check_activations(structure, act_bias)
    R, H, C = final_weight.shape
    E = inp.shape[0]
    n_dst = rowptr.shape[0] - 1
    like = [x, inp, *weights, *biases, *bn_factor, *bn_shift, final_weight, final_bias, coef]
    L = len(weights)
    nab = (  # (an empty activation bias, every kind's but the norm layers': an empty gradient, no zeroing)
        [torch.zeros_like(t) if t.numel() else torch.empty_like(t) for t in act_bias]
        if E == 0 or irrep_kind(structure) is None
        else []
    )
    if E == 0:
        z = [torch.zeros_like(t) for t in like]
        return z[: 2 + 2 * L] + nab + z[2 + 2 * L :]
    x, inp, src = _c(x), _c(inp), _c(src)
    lay, pack, hidden, plan, wc, bf, coefp, trunk, consts, walk, sizes, _ = _setup(
        x, inp, weights, biases, fourier, fourier_inv, bn_factor, bn_shift, final_weight, final_bias, coef, ndim,
        structure, act_bias,
    )  # fmt: skip
    irreps = isinstance(lay, IrrepLayout)
    grad = _as(grad, x.dtype)
    vptr, rid, _, n_v = _segments(rowptr, E)
    n_blocks = -(-n_v // BLOCK)  # blocks of receiver segments
    n_tiles = -(-E // BACKWARD_TILE)
    per_program = pack.gradient_size + 1
    nprog = num_programs(n_tiles, x.device, per_program)
    w_floats, b_floats = wc.shape[0], bf.shape[0]
    nsplit = wgrad_splits(n_blocks, plan.n_blocks + plan.n_cblocks, w_floats, x.device)
    HC, CC = sizes[2], sizes[3]
    # every zero-initialised buffer of the backward in one allocation; the contraction's in the plan's order, first,
    # each a multiple of 16 elements (rows of 16-element blocks on whole 32-byte sectors)
    shapes = [(E, HC), (E, CC), (nsplit, w_floats), (nsplit, b_floats), (E,), (nprog, per_program)]
    zeros = x.new_zeros(sum(math.prod(sh) for sh in shapes)).split([math.prod(sh) for sh in shapes])
    dhsp, dxe, dwc, dbf, dsb, acc = (z.view(sh) for z, sh in zip(zeros, shapes))
    # dout and x in the plan's order (x: the forward's permuted copy)
    gp, xp = _to_plan(grad, plan.perm_r), _to_plan(x, plan.perm_c)
    # 1. the contraction's d hs and the bias term's d s, per receiver block (no trunk needed)
    K2.contract_dhs_kernel[(n_blocks,)](
        gp,
        xp,
        src,
        vptr,
        rid,
        wc,
        bf,
        dhsp,
        dsb,
        *walk,
        n_v,
        n_dst,
        plan.n_pairs,
        *sizes,
        num_warps=warps("contract", 0),
        **dict(consts, KP=SEGMENT),  # (a segment is one chunk)
    )
    # 2. the trunk's backward per tile (per-program parameter-gradient rows in acc, laid out as the padded
    # parameters, then coef's); it leaves h in dhs's place, and s
    dhs = _from_plan(dhsp, plan.inv_h)  # d hs in the trunk's layout
    del dhsp
    dinp = torch.zeros_like(inp)
    s = x.new_empty(E)
    if irreps:  # (.irreps.irrep_backward_kernel: 2 NL slots of (BE, UL) per program)
        scratch = x.new_empty(nprog, 2 * lay.NL, BACKWARD_TILE, lay.UL)
        KI.irrep_backward_kernel[(nprog,)](
            dhs, dsb, s, inp, *hidden, coefp, dinp, acc, scratch, E, n_tiles, float(norm), NL=lay.NL,
            num_warps=warps("irreps", 0), **trunk,
        )  # fmt: skip
    else:
        # per-program staging of the trunk's layers (conv.trunk_backward_kernel): NL slots, and with batch norms the
        # activations before them
        HP, nh = lay.HP, pack.shapes[2][0]
        slots = 2 * lay.NL - 1 if trunk["BNM"] and lay.NL > 1 else max(lay.NL, 1)
        scratch = x.new_empty(nprog, slots, BACKWARD_TILE, HP)
        taped = tape is not None and 1 <= lay.NL <= TAPE_LAYERS and len(tape) == 2 * lay.NL
        bgw, bwarps = backward_blocks(lay, trunk["PREC"])
        acts = [_as(tape[2 * k], x.dtype) for k in range(lay.NL)] if taped else []
        acts += [scratch] * (TAPE_LAYERS - len(acts))  # (not read)
        if taped:  # the Fourier matrices as the dots read them (fourier_storage); the untaped backward, like the
            # forward-only trunk kernel, reads them in the compute dtype (float16's loads spill both on sm_90)
            hidden = (hidden[0], pack.pad_fourier(fourier, fourier_inv, x.dtype, x.device, trunk["PREC"]))
        K.trunk_backward_kernel[(nprog,)](
            dhs,
            dsb,
            s,
            inp,
            *hidden,
            coefp,
            dinp,
            acc,
            scratch,
            *acts,
            E,
            n_tiles,
            float(norm),
            NH=nh,
            TAPE=taped,
            ACT_APART=not taped and bwarps == BACKWARD_NARROW_WARPS,
            num_warps=bwarps,
            **dict(trunk, BE=BACKWARD_TILE, GW=bgw),
        )
    hs = _to_plan(dhs, plan.perm_h)  # now h, in the plan's order
    del dhs
    # 3. d x per edge, per receiver block ...
    K2.contract_dx_kernel[(n_blocks,)](
        gp, hs, s, vptr, rid, wc, bf, dxe, *walk, plan.cperm, n_v, n_dst, plan.n_pairs, *sizes,
        num_warps=warps("contract", 0), **dict(consts, KP=SEGMENT),
    )  # fmt: skip
    # 4. ... and dW', dB' per block of the plan (and per input block), in splits of the receivers summed in a fixed
    # order
    K2.contract_wgrad_kernel[(plan.n_blocks + plan.n_cblocks, nsplit)](
        gp,
        hs,
        s,
        xp,
        src,
        vptr,
        rid,
        dwc,
        dbf,
        *walk,
        plan.blk_p,
        n_v,
        n_dst,
        n_blocks,
        plan.n_blocks,
        max(plan.n_blocks, 1),
        *sizes,
        num_warps=warps("contract", 0),
        **consts,
    )
    del hs
    dx = _from_plan(x.new_zeros(x.shape[0], CC).index_add_(0, src, dxe), plan.inv_c)
    # the hidden parameters' gradients (batch norms included): the programs' rows summed, then unpadded with one
    # gather each
    acc = acc.sum(0)
    grads = pack.unpad_grads(acc)
    # W''s and B''s gradients: the splits' partial sums added (in order) at the structural non-zeros, then put back
    # in their own layout with one scatter each (zero outside the structure)
    dfw, dfb = x.new_zeros(R, H, C), x.new_zeros(R, C)
    for part, srcs, dsts, out, n in (
        (dwc, plan.w_dst, plan.w_src, dfw, w_floats),
        (dbf, plan.b_dst, plan.b_src, dfb, b_floats),
    ):
        if srcs.shape[0]:
            vals = x.new_empty(srcs.shape[0])
            K2.split_sum_kernel[(-(-srcs.shape[0] // 1024),)](
                part, srcs, vals, srcs.shape[0], nsplit, n, BV=1024, num_warps=4
            )
            out.view(-1).index_copy_(0, dsts, vals)
    if irreps:  # (the packing's activation biases after the shifts)
        nab = [g if g.dtype == t.dtype else g.to(t.dtype) for g, t in zip(grads[4 * L :], act_bias)]
        grads = grads[: 4 * L]
    out = [dx, dinp, *grads, dfw, dfb, acc[-1:].clone()]  # (outputs are not views)
    out = [g if g.dtype == t.dtype else g.to(t.dtype) for g, t in zip(out, like)]
    return out[: 2 + 2 * L] + nab + out[2 + 2 * L :]


def _at(seq, k):
    return seq[k] if seq is not None and k < len(seq) else None


def _check_activations(structure, act_bias=(), first: int = 0) -> None:
    """A ValueError where an activation bias is not what the structure states (a norm layer's, channels x non-trivial
    irreps; empty for every other kind)."""
    layers = decode(structure).layers[first:] if structure is not None else ()
    for k, t in enumerate(act_bias):
        want = layers[k].bias_size if k < len(layers) else 0
        if t.numel() != want:
            raise ValueError(f"act_bias[{k}] has {t.numel()} elements, but its layer takes {want}")


def trunk_moments(
    inp, weights, biases, fourier, fourier_inv, act_bias, in_factor, in_shift, structure=None, first_layer=0,
    with_activation=False, with_grid=False,
):  # fmt: skip
    _check_activations(structure, act_bias, first_layer)
    if with_grid:
        raise NotImplementedError("backend 'triton' keeps no Fourier grids (the tape of ik_fast.ops)")
    if irrep_kind(structure, first_layer, len(weights)) is not None:
        return _irrep_trunk_moments(
            inp, weights, biases, act_bias, in_factor, in_shift, structure, first_layer, with_activation
        )
    E = inp.shape[0]
    NL = len(weights)
    none = _empty(inp.dtype, inp.device)
    # the batch norm after each given layer but the last (the input's of the next), and the map on the input
    bn_factor = [_at(in_factor, k + 1) if k + 1 < NL else None for k in range(NL)]
    bn_shift = [_at(in_shift, k + 1) if k + 1 < NL else None for k in range(NL)]
    bn_factor = [none if f is None else f for f in bn_factor]
    bn_shift = [none if t is None else t for t in bn_shift]
    f0, s0 = _at(in_factor, 0), _at(in_shift, 0)
    in_affine = (none, none) if f0 is None or f0.numel() == 0 else (f0, s0)
    chain = first_layer > 0 and NL > 0
    if chain:
        # a chained pass: inp is layer `first_layer`'s activation (E, H). The kernels take it as the activation of a
        # first layer of their own, whose batch norm is the map on the input; that layer's Linear is never read (a
        # cached zero weight (H, 1) and bias stand for it), and its Fourier matrices are the next layer's (same shape)
        H0 = inp.shape[1]
        zero = _zeros(H0, inp.dtype, str(torch.device(inp.device)))
        weights, biases = [zero.view(H0, 1), *weights], [zero, *biases]
        fourier, fourier_inv = [fourier[0], *fourier], [fourier_inv[0], *fourier_inv]
        bn_factor, bn_shift = [in_affine[0], *bn_factor], [in_affine[1], *bn_shift]
        in_affine = (none, none)
    lay = _layout(1 if chain else inp.shape[1], weights, fourier, 1, 0)
    H = lay.C * lay.D
    act = inp.new_empty(E if with_activation else 0, H)
    grid = inp.new_empty(0)
    if E == 0:
        return inp.new_zeros(2, H), act, grid
    pack = packing(lay, weights, biases, bn_factor, bn_shift, in_affine, fourier, fourier_inv, inp.device)
    prm = pack.pad(weights, biases, bn_factor, bn_shift, in_affine, inp.dtype, inp.device)
    HP = lay.HP
    prec = PREC_NAMES[precision(inp.dtype, inp.device)]
    fou = pack.pad_fourier(fourier, fourier_inv, inp.dtype, inp.device, prec)
    sgw, swarps = stats_blocks(lay, prec)
    n_tiles = (E + STATS_TILE - 1) // STATS_TILE
    nprog = num_programs(n_tiles, inp.device, 1 + 2 * HP)
    parts = inp.new_zeros(nprog, 1 + 2 * HP)
    K.fused_stats_kernel[(nprog,)](
        _c(inp),
        prm,
        fou,
        _zero(inp.dtype, str(inp.device)),
        parts,
        act,
        E,
        n_tiles,
        K=lay.NL,
        P0=lay.P0,
        P0P=lay.P0P,
        NDIM=0,
        CP=lay.CP,
        DP=lay.DP,
        GP=lay.GP,
        GW=sgw,
        FOURIER=lay.FOURIER,
        BE=STATS_TILE,
        PREC=prec,
        CWF=lay.CWF,
        C=lay.C,
        D=lay.D,
        PD=lay.PD,
        WRITE=bool(with_activation),
        BNM=_bn_mask(bn_factor),
        IAFF=in_affine[0].numel() > 0,
        CHAIN=chain,
        num_warps=swarps,
    )
    # merge the programs' partial moments (Chan et al.), in program order, straight into the real hidden units
    moments = inp.new_empty(2, H)
    K.stats_merge_kernel[(-(-H // 128),)](parts, pack.hidden, moments, nprog, H, HP, BH=128, num_warps=4)
    return moments, act, grid


def _irrep_trunk_moments(inp, weights, biases, act_bias, in_factor, in_shift, structure, first_layer, with_activation):
    """trunk_moments for gated and norm layers (.irreps.irrep_trunk_kernel, STATS)."""
    E = inp.shape[0]
    NL = len(weights)
    lay = irrep_layout(structure, first_layer, NL, inp.shape[1], tuple(w.dim() for w in weights))
    H = lay.H
    act = inp.new_empty(E if with_activation else 0, H)
    if E == 0:
        return inp.new_zeros(2, H), act, inp.new_empty(0)
    none = _empty(inp.dtype, inp.device)
    # the batch norm after each given layer but the last (the input of the next)
    bn_factor = [_at(in_factor, k + 1) if k + 1 < NL else None for k in range(NL)]
    bn_shift = [_at(in_shift, k + 1) if k + 1 < NL else None for k in range(NL)]
    bn_factor = [none if f is None else f for f in bn_factor]
    bn_shift = [none if t is None else t for t in bn_shift]
    pack = irrep_packing(lay, weights, biases, bn_factor, bn_shift, act_bias, inp.device)
    prm = pack.pad(weights, biases, bn_factor, bn_shift, (none, none), inp.dtype, inp.device, act_bias)
    tab = _irrep_table(lay.table, str(torch.device(inp.device)))
    n_tiles = (E + STATS_TILE - 1) // STATS_TILE
    nprog = num_programs(n_tiles, inp.device, 1 + 2 * lay.UL + 2 * STATS_TILE * lay.UL)
    # the per-program moments, then the scratch, in one allocation (the moments' rows start at zero)
    buf = inp.new_empty(nprog * (1 + 2 * lay.UL + 2 * STATS_TILE * lay.UL))
    parts = buf[: nprog * (1 + 2 * lay.UL)].view(nprog, 1 + 2 * lay.UL).zero_()
    scratch = buf[nprog * (1 + 2 * lay.UL) :]
    prec = PREC_NAMES[precision(inp.dtype, inp.device)]
    KI.irrep_trunk_kernel[(nprog,)](
        _c(inp), prm, tab, _zero(inp.dtype, str(inp.device)), parts, act, parts, scratch, E, n_tiles, 1.0, K=NL,
        NDIM=0, BE=STATS_TILE, PREC=prec, BNM=_bn_mask(bn_factor), STATS=True, WRITE=bool(with_activation),
        num_warps=warps("irreps", 0), **lay.constexprs(),
    )  # fmt: skip
    moments = inp.new_empty(2, H)
    K.stats_merge_kernel[(-(-H // 128),)](parts, pack.hidden, moments, nprog, H, lay.UL, BH=128, num_warps=4)
    return moments, act, inp.new_empty(0)


def _register():
    for key in ("CPU", "CUDA"):
        torch.library.register_kernel("ik_fast::triton_conv", key.lower(), conv)
        torch.library.register_kernel("ik_fast::triton_conv_backward", key.lower(), conv_backward)
        torch.library.register_kernel("ik_fast::triton_trunk_moments", key.lower(), trunk_moments)


_register()
