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
  IEEE, otherwise TF32); under ``torch.autocast(dtype=torch.bfloat16)`` bfloat16 operands with float32 accumulation;
* **backward**: the contraction's backward gives ``d hs`` (E, H), the per-edge gradient of the gathered features and
  the bias term's ``d s``; W''s gradient is summed per (hidden block, input block) over splits of the receivers; the
  trunk's backward then runs per tile;
* **determinism**: per-program accumulators summed in a fixed order, the statistics merged with tensor code in a fixed
  order, the gradient to the source features through ``index_add`` (deterministic under
  ``torch.use_deterministic_algorithms(True)``).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ik_fast.ops import hidden_width

from . import contract as K2
from . import conv as K

PREC_NAMES = ("ieee", "tf32", "bf16", "bf16-emulated")
OPERAND_BUDGET = 8192  # no GEMM operand above this many elements (32 KB in float32)
STATS_TILE = 16  # edges per tile of the statistics kernel
BACKWARD_TILE = 16  # edges per tile of the trunk's backward (its register tiles are the largest)


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
    CWF: int = 0       # componentwise hidden Linears (weights (D, C, C)): the channel padding factor F (CP F >= 16)

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
        H = hidden_width(weights[-1])
        fourier_act = fourier[-1].numel() > 0
        if any(hidden_width(w) != H or (A.numel() > 0) != fourier_act for w, A in zip(weights, fourier)) or \
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
    cwf = 0
    if NL > 1 and all(w.dim() == 3 for w in weights[1:]):
        cwf = max(1, 16 // CP)
    return Layout(ndim, P0, _pow2(P0), NL, CP, DP, GP, _block_width(DP, CP * DP, _pow2(R)), fourier_act, *real, cwf)


def dense_weight(w: Tensor) -> Tensor:
    """A componentwise weight (D, C_out, C_in) as the dense (C_out D, C_in D) matrix (channel-major)."""
    if w.dim() == 2:
        return w
    D, Co, Ci = w.shape
    return torch.diag_embed(w.permute(1, 2, 0)).permute(0, 2, 1, 3).reshape(Co * D, Ci * D)


def componentwise_grad(g: Tensor, like: Tensor) -> Tensor:
    """The gradient of a dense weight (C_out D, C_in D) restricted to a componentwise one shaped like ``like``."""
    if like.dim() == 2:
        return g
    D, Co, Ci = like.shape
    return torch.diagonal(g.reshape(Co, D, Ci, D), dim1=1, dim2=3).permute(2, 0, 1)


def kernel_weights(weights, fourier):
    """The hidden weights the kernels take: componentwise ones stay so only with a Fourier nonlinearity (the
    channel-major layout their batched dot needs); otherwise dense."""
    fourier_act = bool(fourier) and fourier[-1].numel() > 0
    if fourier_act and len(weights) > 1 and all(w.dim() == 3 for w in weights[1:]):
        return list(weights)
    return [dense_weight(w) for w in weights]


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
    if NL > 1 and lay.CWF:
        # (NH, DP, KC, KC), x @ W per component: wh[k, d, ci F, co F] = W_k[d, co, ci]
        KC = lay.CP * lay.CWF
        wh = z(nh, lay.DP, KC, KC)
        d = torch.arange(lay.D, device=device)[:, None, None]
        c = torch.arange(lay.C, device=device) * lay.CWF
        wh[:, d, c[None, :, None], c[None, None, :]] = torch.stack(weights[1:]).to(dtype).transpose(2, 3)
        bh = _scatter(torch.stack(biases[1:]).to(dtype)[:, None], lay, (nh, 1, HP), (False, True)).reshape(nh, HP)
    elif NL > 1:
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


def pad_final(final_weight, final_bias, dtype):
    """W' (HC, CINC, RC) and B' (CINC, RC): the last layer as the contraction kernels read it, each dimension
    zero-padded to a multiple of 16 (the compact hidden units in the program's order)."""
    R, H, C = final_weight.shape
    wf = F.pad(final_weight.to(dtype).permute(1, 2, 0), (0, _ceil(R) - R, 0, _ceil(C) - C, 0, _ceil(H) - H))
    bf = F.pad(final_bias.to(dtype).t(), (0, _ceil(R) - R, 0, _ceil(C) - C))
    return wf.contiguous(), bf.contiguous()


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
    """Edges per tile of the trunk kernels: 32 on GPUs (16 when the padded hidden width is above 512, to bound the
    register tiles); 16 in the interpreter."""
    if target(device) != "cuda":
        return 16
    return 32 if hidden <= 512 else 16


def warps(kind: str, hidden: int) -> int:
    """Warps per program: more threads share the register tiles of the wide kernels (no spills)."""
    if kind == "contract":
        return 8
    if kind == "trunk_backward":  # blocks of a tile through its scratch, Fourier grid chunks: no wide tile live
        return 8
    return 4 if hidden <= 256 else 8 if hidden <= 512 else 16


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
def _setup(x, inp, weights, biases, fourier, fourier_inv, final_weight, final_bias, coef, ndim):
    dtype = x.dtype
    R, _, C = final_weight.shape
    weights = kernel_weights(weights, fourier)
    lay = layout(inp, weights, fourier, R, ndim)
    hidden = pad_hidden(lay, weights, biases, fourier, fourier_inv, dtype, x.device)
    wf, bf = pad_final(final_weight, final_bias, dtype)
    prec = PREC_NAMES[precision(dtype, x.device)]
    trunk = dict(P0=lay.P0, P0P=lay.P0P, NDIM=ndim, NL=lay.NL, CP=lay.CP, DP=lay.DP, GP=lay.GP, GW=lay.GW,
                 FOURIER=lay.FOURIER, C=lay.C, D=lay.D, PD=lay.PD, BE=tile_size(x.device, lay.HP), PREC=prec,
                 CWF=lay.CWF)
    blocks = dict(BN=BLOCK, KP=BLOCK, HB=BLOCK, CB=BLOCK, RB=BLOCK, PREC=prec)
    H = lay.C * lay.D
    sizes = (H, _ceil(H), C, _ceil(C), R, _ceil(R))  # H, HC, CIN, CINC, R, RC
    return lay, hidden, wf, bf, coef.to(dtype).reshape(1).contiguous(), trunk, blocks, sizes


def _trunk_forward(inp, hidden, coef, norm, H, trunk):
    """h (E, H), the last hidden activation in the compact layout, and the radial shell s (E,)."""
    E = inp.shape[0]
    h = inp.new_empty(E, H)
    s = inp.new_empty(E)
    K.trunk_forward_kernel[(-(-E // trunk["BE"]),)](inp, *hidden, coef, h, s, E, float(norm),
                                                     num_warps=warps("trunk", trunk["CP"] * trunk["DP"]), **trunk)
    return h, s


def conv(x, inp, src, rowptr, weights, biases, fourier, fourier_inv, final_weight, final_bias, coef, norm, ndim,
         hidden=None):
    R = final_weight.shape[0]
    n_dst = rowptr.shape[0] - 1
    E = inp.shape[0]
    out = x.new_zeros(n_dst, R)
    if E == 0:
        return out
    inp = inp.contiguous()
    lay, mlp, wf, bf, coefp, trunk, blocks, sizes = _setup(x, inp, weights, biases, fourier, fourier_inv,
                                                           final_weight, final_bias, coef, ndim)
    if hidden is None:
        h, s = _trunk_forward(inp, mlp, coefp, norm, sizes[0], trunk)
    else:  # the activation from the statistics pass of the last layer: only the radial shell is left to compute
        h = hidden.to(x.dtype).contiguous()
        s = torch.exp(-coefp * inp[:, :ndim].square().sum(1)) * norm
    K2.contract_forward_kernel[(-(-n_dst // BLOCK),)](h, s, x.contiguous(), src.contiguous(), rowptr, wf, bf, out,
                                                      n_dst, *sizes, num_warps=warps("contract", 0), **blocks)
    return out


def conv_backward(grad, x, inp, src, rowptr, weights, biases, fourier, fourier_inv, final_weight, final_bias, coef,
                  norm, ndim) -> List[Tensor]:
    R, H, C = final_weight.shape
    E = inp.shape[0]
    n_dst = rowptr.shape[0] - 1
    zeros = [torch.zeros_like(t) for t in (x, inp, *weights, *biases, final_weight, final_bias, coef)]
    if E == 0:
        return zeros
    x, inp, src = x.contiguous(), inp.contiguous(), src.contiguous()
    lay, hidden, wf, bf, coefp, trunk, blocks, sizes = _setup(x, inp, weights, biases, fourier, fourier_inv,
                                                              final_weight, final_bias, coef, ndim)
    H_, HC, _, CINC, _, RC = sizes
    grad = grad.to(x.dtype).contiguous()
    n_blocks = -(-n_dst // BLOCK)
    # 1. the contraction's d hs and the bias term's d s, per receiver block (no trunk needed)
    dhs = x.new_zeros(E, H_)
    dsb = x.new_zeros(E)
    K2.contract_dhs_kernel[(n_blocks,)](grad, x, src, rowptr, wf, bf, dhs, dsb, n_dst, *sizes,
                                        num_warps=warps("contract", 0), **blocks)
    # 2. the trunk's backward per tile (per-program parameter-gradient rows); it leaves h in dhs's place, and s
    w1, b1, wh, bh, at, ait = hidden
    HP, P0P, nh = lay.HP, lay.P0P, wh.shape[0]
    n_tiles = -(-E // BACKWARD_TILE)
    per_program = w1.numel() + b1.numel() + wh.numel() + bh.numel() + 1
    nprog = num_programs(n_tiles, x.device, per_program)
    acc = lambda *shape: x.new_zeros(nprog, *shape)  # noqa: E731
    gw1, gb1, gwh, gbh, gcoef = acc(P0P, HP), acc(HP), acc(*wh.shape), acc(nh, HP), acc()
    dinp = torch.zeros_like(inp)
    s = x.new_empty(E)
    scratch = x.new_empty(nprog, max(lay.NL, 1), BACKWARD_TILE, HP)  # per-program staging of the trunk's layers
    K.trunk_backward_kernel[(nprog,)](dhs, dsb, s, inp, *hidden, coefp, dinp, gw1, gb1, gwh, gbh, gcoef, scratch, E,
                                      n_tiles, float(norm), NH=nh, num_warps=warps("trunk_backward", HP),
                                      **dict(trunk, BE=BACKWARD_TILE))
    hs = dhs  # now h
    # 3. d x per edge, per receiver block ...
    dxe = x.new_zeros(E, C)
    K2.contract_dx_kernel[(n_blocks,)](grad, hs, s, rowptr, wf, bf, dxe, n_dst, *sizes,
                                       num_warps=warps("contract", 0), **blocks)
    # 4. ... and dW', dB' per (hidden block, input block), in splits of the receivers summed in a fixed order
    n_wblocks = (HC // BLOCK) * (CINC // BLOCK)
    nsplit = wgrad_splits(n_blocks, n_wblocks, wf.numel(), x.device)
    dwf = x.new_zeros(nsplit, *wf.shape)
    dbf = x.new_zeros(nsplit, *bf.shape)
    K2.contract_wgrad_kernel[(n_wblocks, nsplit)](grad, hs, s, x, src, rowptr, dwf, dbf, n_dst, n_blocks, *sizes,
                                                  num_warps=warps("contract", 0), **blocks)
    del hs, dhs
    dx = torch.zeros_like(x).index_add_(0, src, dxe)
    gw1, gb1, gwh, gbh = gw1.sum(0), gb1.sum(0), gwh.sum(0), gbh.sum(0)
    dweights, dbiases = [], []
    if weights:  # (without hidden layers the input is the hidden activation)
        if lay.CWF:  # (NH, DP, KC, KC) at channels c F -> (NH, D, C_out, C_in)
            c = torch.arange(lay.C, device=x.device) * lay.CWF
            gwh_real = gwh[:, :lay.D][:, :, c][:, :, :, c].transpose(2, 3)
        else:
            gwh_real = unpad_h(unpad_h(gwh, 1, lay), 2, lay).transpose(1, 2)  # (x @ W layout -> (out, in))
        gbh_real = unpad_h(gbh, 1, lay)
        hidden_grads = list(gwh_real[:len(weights) - 1])
        if not lay.CWF:  # dense kernels; a componentwise weight gets the gradient of its non-zeros
            hidden_grads = [componentwise_grad(g, w) for g, w in zip(hidden_grads, weights[1:])]
        dweights = [unpad_h(gw1[:lay.P0], 1, lay).t()] + hidden_grads
        dbiases = [unpad_h(gb1, 0, lay)] + list(gbh_real[:len(weights) - 1])
    dfw = dwf.sum(0)[:H, :C, :R].permute(2, 0, 1)
    dfb = dbf.sum(0)[:C, :R].t()
    dweights = [w.to(weights[0].dtype).contiguous() for w in dweights]
    dbiases = [b.to(weights[0].dtype).contiguous() for b in dbiases]
    return [dx, dinp, *dweights, *dbiases, dfw.to(final_weight.dtype).contiguous(),
            dfb.to(final_bias.dtype).contiguous(), gcoef.sum(0).reshape(1).to(coef.dtype)]


def trunk_moments(inp, weights, biases, fourier, fourier_inv, with_activation=False):
    E = inp.shape[0]
    weights = kernel_weights(weights, fourier)
    lay = layout(inp, weights, fourier, 1, 0)
    H = lay.C * lay.D
    act = inp.new_empty(E if with_activation else 0, H)
    if E == 0:
        return inp.new_zeros(2, H), act
    w1, b1, wh, bh, at, ait = pad_hidden(lay, weights, biases, fourier, fourier_inv, inp.dtype, inp.device)
    HP = lay.HP
    n_tiles = (E + STATS_TILE - 1) // STATS_TILE
    nprog = num_programs(n_tiles, inp.device, 1 + 2 * HP)
    parts = inp.new_zeros(nprog, 1 + 2 * HP)
    K.fused_stats_kernel[(nprog,)](
        inp.contiguous(), w1, b1, wh, bh, at, ait, inp.new_zeros(1), parts, act, E, n_tiles, K=lay.NL, P0=lay.P0,
        P0P=lay.P0P, NDIM=0, CP=lay.CP, DP=lay.DP, GP=lay.GP, GW=lay.GW, FOURIER=lay.FOURIER, BE=STATS_TILE,
        PREC=PREC_NAMES[precision(inp.dtype, inp.device)], CWF=lay.CWF, C=lay.C, D=lay.D, PD=lay.PD,
        WRITE=bool(with_activation), num_warps=warps("trunk", HP))
    # merge the programs' partial moments (Chan et al.) with tensor code, in a fixed order
    count, mean, m2 = parts[:, :1], parts[:, 1:1 + HP], parts[:, 1 + HP:]
    total = mean * count
    mu = total.sum(0) / E
    M2 = (m2 + count * (mean - mu).square()).sum(0)
    return unpad_h(torch.stack([mu, M2]), 1, lay), act


def _register():
    for key in ("CPU", "CUDA"):
        torch.library.register_kernel("ik_fast::triton_conv", key.lower(), conv)
        torch.library.register_kernel("ik_fast::triton_conv_backward", key.lower(), conv_backward)
        torch.library.register_kernel("ik_fast::triton_trunk_moments", key.lower(), trunk_moments)


_register()
