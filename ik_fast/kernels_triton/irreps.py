"""Trunk kernels of the fused Triton backend for the gated and norm nonlinearities (:mod:`ik_fast.ops`: each
channel's field a direct sum of irreps; a trivial irrep's components through an ELU, a non-trivial irrep's scaled by
``sigmoid`` of its gate (``gated``) or of its norm minus a learned bias (``norm``)).

The contraction with the source features is the Fourier path's (:mod:`.contract`: it reads ``h`` (E, C D) in the
compact layout); these kernels replace :mod:`.conv`'s trunk kernels for such layers:

* :func:`irrep_trunk_kernel`: the trunk of a tile of edges up to hidden layer ``K``, then either the statistics of
  layer K's activation (per program, merged by :func:`.conv.stats_merge_kernel`; with ``WRITE`` the activation too)
  or, for ``conv`` without a given activation, the last layer's output after its batch norm and the radial shell;
* :func:`irrep_backward_kernel`: from ``d hs`` (the contraction's backward), the gradients of the MLP input and of
  every trunk parameter (the norm layers' biases and the batch norms' factors and shifts included), accumulated per
  program (a persistent grid, one row each: deterministic), ``h`` written over ``d hs`` on the way.

**Layout.** A tile's layer lives in the program's scratch (global memory, L1/L2-resident) as (BE, UL) with hidden unit
``u = a CP + c`` (component-major: component ``a``, channel ``c`` of ``CP``, the channels padded to a power of two);
the Linear into a gated layer makes ``DL = D + gates`` components (the gates after the field's). Every stage reads and
writes its slots a block at a time, so no (BE, UL) tile is ever in registers (``UL`` is ~1,000 units at config H).

**Linears.** The first (from the narrow MLP input, ``P0`` columns, 7 for the problems measured) is ``P0`` rank-one
updates (FMAs, no ``tl.dot``: a dot would pad its K to 16); a componentwise hidden Linear is a dot batched over
groups of ``PC`` components (``PC CP = KC >= 16`` channels: for C < 16 channels the weight is block-diagonal over
``PC`` components, so no channel is padded), ``DC`` groups (``GW = DC KC`` units) at a time, each output component
reading its source component (``T0``, the previous field's first trivial component, for a gate); a dense one is a
blocked GEMM over ``GW``-unit blocks.

**Activations.** Irrep by irrep through a small table (``tab``: rows (start, size, gate / bias index); first ``NTR``
runs of trivial components, then ``NNT`` non-trivial irreps), each a (BE, SP, CP) block of the slot (``SP`` the
largest irrep's size as a power of two): the gate or the norm is formed from the block itself, so no reduction crosses
blocks. Norm: ``d|v|/dv`` is 0 where ``|v| = 0``.

A stage reads what the previous one wrote, possibly from other threads: ``tl.debug_barrier()`` sits between them and
between a block's loads and its stores in place.
"""

import triton
import triton.language as tl

from ik_fast.kernels_triton.conv import _accumulate, _elu, _elu_grad, _load_tile, _mm


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


# ----------------------------------------------------------------------------------------------------------------
# Linears
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _lin_first(
    inp_ptr, offs, emask, w1, b1, dst, P0: tl.constexpr, UL: tl.constexpr, GW: tl.constexpr, BE: tl.constexpr
):
    """y_1 = inp W_1 + b_1 into the slot ``dst``, GW units at a time, as P0 rank-one updates."""
    dt = dst.dtype.element_ty
    e = tl.arange(0, BE)
    for i in range(UL // GW):
        u = i * GW + tl.arange(0, GW)
        y = tl.zeros((BE, GW), dtype=dt) + tl.load(b1 + u).to(dt)[None, :]
        for p in tl.static_range(P0):
            x = tl.load(inp_ptr + offs * P0 + p, mask=emask, other=0.0)
            y += x[:, None] * tl.load(w1 + p * UL + u).to(dt)[None, :]
        tl.store(dst + e[:, None] * UL + u[None, :], y)


@triton.jit
def _lin_first_bwd(
    inp_ptr,
    offs,
    emask,
    dy_src,
    w1,
    gw1,
    gb1,
    P0: tl.constexpr,
    P0P: tl.constexpr,
    UL: tl.constexpr,
    GW: tl.constexpr,
    BE: tl.constexpr,
):
    """Backward of :func:`_lin_first` from dy_1 in ``dy_src``: W_1's and b_1's gradients added to this program's rows;
    returns d inp (BE, P0P)."""
    dt = dy_src.dtype.element_ty
    e = tl.arange(0, BE)
    pp = tl.arange(0, P0P)
    dinp = tl.zeros((BE, P0P), dtype=dt)
    for i in range(UL // GW):
        u = i * GW + tl.arange(0, GW)
        dy = tl.load(dy_src + e[:, None] * UL + u[None, :])
        _accumulate(gb1, u, tl.sum(dy, 0), u >= 0)
        for p in tl.static_range(P0):
            x = tl.load(inp_ptr + offs * P0 + p, mask=emask, other=0.0)
            _accumulate(gw1 + p * UL, u, tl.sum(x[:, None] * dy, 0), u >= 0)
            dp = tl.sum(dy * tl.load(w1 + p * UL + u).to(dt)[None, :], 1)
            dinp += tl.where((pp == p)[None, :], dp[:, None], 0.0)
    return dinp


@triton.jit
def _cw_offsets(
    i,
    BE: tl.constexpr,
    CP: tl.constexpr,
    PC: tl.constexpr,
    DC: tl.constexpr,
    D: tl.constexpr,
    DL: tl.constexpr,
    T0: tl.constexpr,
    UL: tl.constexpr,
):
    """Chunk i of a componentwise Linear (DC groups of PC components): offsets (DC, BE, KC) of its inputs in the
    previous slot (each output component's source: itself, or T0 for a gate) and of its outputs (contiguous units),
    the mask of the real output components, their component index (DC, KC), the weight offsets (DC, KC, KC) and the
    output units (DC, KC)."""
    KC: tl.constexpr = PC * CP
    j = i * DC + tl.arange(0, DC)
    k = tl.arange(0, KC)
    e = tl.arange(0, BE)
    a = j[:, None] * PC + (k // CP)[None, :]  # (DC, KC) output component of each column
    src = tl.where(a < D, a, T0)
    xoffs = e[None, :, None] * UL + (src * CP + (k % CP)[None, :])[:, None, :]
    yoffs = e[None, :, None] * UL + (j[:, None] * KC + k[None, :])[:, None, :]
    real = ((a < DL)[:, None, :]) & (e >= 0)[None, :, None]
    woffs = j[:, None, None] * (KC * KC) + k[None, :, None] * KC + k[None, None, :]
    return xoffs, yoffs, real, a, woffs, j[:, None] * KC + k[None, :]


@triton.jit
def _lin_hidden(
    src,
    dst,
    w,
    b,
    BE: tl.constexpr,
    CP: tl.constexpr,
    C: tl.constexpr,
    PC: tl.constexpr,
    DC: tl.constexpr,
    D: tl.constexpr,
    DL: tl.constexpr,
    T0: tl.constexpr,
    UL: tl.constexpr,
    CW: tl.constexpr,
    PREC: tl.constexpr,
):
    """dst = src W + b between two slots: componentwise (CW) chunk by chunk, else dense in GW-unit blocks (the
    source's padding units read as zeros)."""
    KC: tl.constexpr = PC * CP
    GW: tl.constexpr = DC * KC
    dt = dst.dtype.element_ty
    if CW:
        for i in range(UL // GW):
            xoffs, yoffs, real, _, woffs, uo = _cw_offsets(i, BE, CP, PC, DC, D, DL, T0, UL)
            x = tl.load(src + xoffs, mask=real, other=0.0)
            bb = tl.load(b + uo).to(dt)[:, None, :]
            tl.store(dst + yoffs, _mm(x, tl.load(w + woffs).to(dt), PREC) + bb)
    else:
        e = tl.arange(0, BE)
        k = tl.arange(0, GW)
        for go in range(UL // GW):
            y = tl.zeros((BE, GW), dtype=dt)
            for gi in range(UL // GW):
                uin = gi * GW + k
                real = (uin // CP < D) & (uin % CP < C)
                x = tl.load(src + e[:, None] * UL + uin[None, :], mask=real[None, :], other=0.0)
                y += _mm(x, tl.load(w + uin[:, None] * UL + (go * GW + k)[None, :]).to(dt), PREC)
            y += tl.load(b + go * GW + k).to(dt)[None, :]
            tl.store(dst + e[:, None] * UL + (go * GW + k)[None, :], y)


@triton.jit
def _lin_hidden_bwd(
    dy_src,
    x_src,
    dx_dst,
    w,
    gw,
    gb,
    BE: tl.constexpr,
    CP: tl.constexpr,
    C: tl.constexpr,
    PC: tl.constexpr,
    DC: tl.constexpr,
    D: tl.constexpr,
    DL: tl.constexpr,
    T0: tl.constexpr,
    UL: tl.constexpr,
    CW: tl.constexpr,
    GATED: tl.constexpr,
    PREC: tl.constexpr,
):
    """Backward of :func:`_lin_hidden`: d x = dy W^T into ``dx_dst`` (the field's units), x^T dy and the bias's
    gradient added to this program's rows. A componentwise Linear's gates all read component T0: their parts of d x
    are summed over the chunks and added to T0's units at the end."""
    KC: tl.constexpr = PC * CP
    GW: tl.constexpr = DC * KC
    dt = dy_src.dtype.element_ty
    e = tl.arange(0, BE)
    if CW:
        gacc = tl.zeros((BE, CP), dtype=dt)
        for i in range(UL // GW):
            xoffs, yoffs, real, a, woffs, uo = _cw_offsets(i, BE, CP, PC, DC, D, DL, T0, UL)
            dy = tl.load(dy_src + yoffs)
            x = tl.load(x_src + xoffs, mask=real, other=0.0)
            wt = tl.load(w + woffs).to(dt)
            _accumulate(gw, woffs, _mm(tl.permute(x, (0, 2, 1)), dy, PREC), woffs >= 0)
            _accumulate(gb, uo, tl.sum(dy, 1), uo >= 0)
            dx = _mm(dy, tl.permute(wt, (0, 2, 1)), PREC)
            tl.store(dx_dst + yoffs, dx, mask=(a < D)[:, None, :] & (e >= 0)[None, :, None])
            if GATED:
                gate = ((a >= D) & (a < DL))[:, None, :] & (e >= 0)[None, :, None]
                g4 = tl.reshape(tl.where(gate, dx, 0.0), (DC, BE, PC, CP))
                gacc += tl.sum(tl.sum(g4, 2), 0)
        if GATED:
            tl.debug_barrier()
            toffs = e[:, None] * UL + T0 * CP + tl.arange(0, CP)[None, :]
            tl.store(dx_dst + toffs, tl.load(dx_dst + toffs) + gacc)
    else:
        k = tl.arange(0, GW)
        for gi in range(UL // GW):
            uin = gi * GW + k
            real = (uin // CP < D) & (uin % CP < C)
            x = tl.load(x_src + e[:, None] * UL + uin[None, :], mask=real[None, :], other=0.0)
            dx = tl.zeros((BE, GW), dtype=dt)
            for go in range(UL // GW):
                uo = go * GW + k
                dy = tl.load(dy_src + e[:, None] * UL + uo[None, :])
                woffs = uin[:, None] * UL + uo[None, :]
                dx += _mm(dy, tl.trans(tl.load(w + woffs).to(dt)), PREC)
                _accumulate(gw, woffs, _mm(tl.trans(x), dy, PREC), woffs >= 0)
                if gi == 0:
                    _accumulate(gb, uo, tl.sum(dy, 0), uo >= 0)
            tl.store(dx_dst + e[:, None] * UL + uin[None, :], dx)


# ----------------------------------------------------------------------------------------------------------------
# the activations, irrep by irrep
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _entry(tab, r, BE: tl.constexpr, SP: tl.constexpr, CP: tl.constexpr):
    """Table row r: the block's components (SP,), their mask (SP,), the gate / bias index, and index vectors."""
    start = tl.load(tab + 3 * r)
    size = tl.load(tab + 3 * r + 1)
    g = tl.load(tab + 3 * r + 2)
    s = tl.arange(0, SP)
    return start + s, s < size, g


@triton.jit
def _act_value(
    y_slot,
    ab,
    comp,
    smask,
    g,
    TRIV: tl.constexpr,
    GATED: tl.constexpr,
    BE: tl.constexpr,
    CP: tl.constexpr,
    D: tl.constexpr,
    UL: tl.constexpr,
):
    """(v, z, m, nrm) of one block: its pre-activations v (BE, SP, CP), and for a non-trivial irrep the gate's
    pre-activation z or the norm nrm (BE, CP) and the factor m = sigmoid(z or nrm - bias) (BE, CP)."""
    e = tl.arange(0, BE)
    c = tl.arange(0, CP)
    units = (comp * CP)[:, None] + c[None, :]
    m3 = smask[None, :, None] & (e >= 0)[:, None, None] & (c >= 0)[None, None, :]
    v = tl.load(y_slot + e[:, None, None] * UL + units[None, :, :], mask=m3, other=0.0)
    if TRIV:
        z = tl.zeros((BE, CP), dtype=v.dtype)
        return v, z, z, z
    else:
        if GATED:
            z = tl.load(y_slot + e[:, None] * UL + (D + g) * CP + c[None, :])
            return v, z, _sigmoid(z), z
        else:
            sq = tl.sum(v * v, 1)
            nrm = tl.where(sq > 0, tl.sqrt(tl.where(sq > 0, sq, 1.0)), 0.0)
            b = tl.load(ab + g * CP + c).to(v.dtype)
            return v, nrm, _sigmoid(nrm - b[None, :]), nrm


@triton.jit
def _act_block_fwd(
    y_slot,
    dst,
    out_ptr,
    row,
    tab,
    r,
    ab,
    bf,
    bs,
    offs,
    emask,
    n_a,
    n_b,
    MODE: tl.constexpr,
    AFF: tl.constexpr,
    WRITE: tl.constexpr,
    TRIV: tl.constexpr,
    GATED: tl.constexpr,
    BE: tl.constexpr,
    CP: tl.constexpr,
    C: tl.constexpr,
    D: tl.constexpr,
    SP: tl.constexpr,
    UL: tl.constexpr,
):
    """The activation of table entry r from the slot ``y_slot``. MODE 0: its batch norm applied (AFF), into the slot
    ``dst``; 1: its moments merged into this program's row ``row`` (with WRITE the activation into ``out_ptr``
    (E, C D)); 2: its batch norm applied (AFF), into ``out_ptr`` (E, C D)."""
    comp, smask, g = _entry(tab, r, BE, SP, CP)
    v, _, m, _ = _act_value(y_slot, ab, comp, smask, g, TRIV, GATED, BE, CP, D, UL)
    if TRIV:
        a = _elu(v)
    else:
        a = v * m[:, None, :]
    e = tl.arange(0, BE)
    c = tl.arange(0, CP)
    units = (comp * CP)[:, None] + c[None, :]  # (SP, CP)
    um = smask[:, None] & (c >= 0)[None, :]
    if AFF:
        a = a * tl.load(bf + units, mask=um, other=0.0).to(a.dtype)[None, :, :]
        a += tl.load(bs + units, mask=um, other=0.0).to(a.dtype)[None, :, :]
    if MODE == 0:
        tl.store(dst + e[:, None, None] * UL + units[None, :, :], a, mask=um[None, :, :] & (e >= 0)[:, None, None])
    else:
        # the compact layout (E, C D): unit c D + a
        cmask = emask[:, None, None] & (smask[:, None] & (c < C)[None, :])[None, :, :]
        coffs = offs[:, None, None] * (C * D) + (c[None, :] * D + comp[:, None])[None, :, :]
        if MODE == 1:
            if WRITE:
                tl.store(out_ptr + coffs, a, mask=cmask)
            ev = emask[:, None, None]
            mean_b = tl.sum(tl.where(ev, a, 0.0), 0) / n_b
            dev = tl.where(ev, a - mean_b[None, :, :], 0.0)
            m2_b = tl.sum(dev * dev, 0)
            n = n_a + n_b
            mean = tl.load(row + 1 + units, mask=um, other=0.0)
            m2 = tl.load(row + 1 + UL + units, mask=um, other=0.0)
            delta = mean_b - mean
            tl.store(row + 1 + units, mean + delta * (n_b / n), mask=um)
            tl.store(row + 1 + UL + units, m2 + m2_b + delta * delta * (n_a * n_b / n), mask=um)
        else:
            tl.store(out_ptr + coffs, a, mask=cmask)


@triton.jit
def _act_fwd(
    y_slot,
    dst,
    out_ptr,
    row,
    tab,
    ab,
    bf,
    bs,
    offs,
    emask,
    n_a,
    n_b,
    MODE: tl.constexpr,
    AFF: tl.constexpr,
    WRITE: tl.constexpr,
    GATED: tl.constexpr,
    NTR: tl.constexpr,
    NNT: tl.constexpr,
    BE: tl.constexpr,
    CP: tl.constexpr,
    C: tl.constexpr,
    D: tl.constexpr,
    SP: tl.constexpr,
    UL: tl.constexpr,
):
    """A layer's activation, entry by entry of its table (see :func:`_act_block_fwd`)."""
    for r in range(NTR):
        _act_block_fwd(
            y_slot, dst, out_ptr, row, tab, r, ab, bf, bs, offs, emask, n_a, n_b, MODE, AFF, WRITE, True, GATED, BE,
            CP, C, D, SP, UL,
        )  # fmt: skip
    for r in range(NTR, NTR + NNT):
        _act_block_fwd(
            y_slot, dst, out_ptr, row, tab, r, ab, bf, bs, offs, emask, n_a, n_b, MODE, AFF, WRITE, False, GATED, BE,
            CP, C, D, SP, UL,
        )  # fmt: skip


@triton.jit
def _act_block_bwd(
    y_slot,
    g_src,
    tab,
    r,
    ab,
    bf,
    bs,
    gab,
    gbf,
    gbs,
    offs,
    emask,
    s,
    ds,
    LAST: tl.constexpr,
    AFF: tl.constexpr,
    TRIV: tl.constexpr,
    GATED: tl.constexpr,
    NORM: tl.constexpr,
    BE: tl.constexpr,
    CP: tl.constexpr,
    C: tl.constexpr,
    D: tl.constexpr,
    SP: tl.constexpr,
    UL: tl.constexpr,
):
    """Backward of table entry r's activation (and batch norm): the gradient of the layer's output is read from the
    slot ``g_src``, or for the LAST layer from d hs (E, C D) at ``g_src`` (times s; h written there in its place, and
    d s (BE,) returned with this block's part added); dy written over y in ``y_slot`` (a gate's at its unit), the
    batch norm's and the norm bias's gradients added to this program's rows."""
    comp, smask, g = _entry(tab, r, BE, SP, CP)
    v, zn, m, _ = _act_value(y_slot, ab, comp, smask, g, TRIV, GATED, BE, CP, D, UL)
    if TRIV:
        a = _elu(v)
    else:
        a = v * m[:, None, :]
    e = tl.arange(0, BE)
    c = tl.arange(0, CP)
    units = (comp * CP)[:, None] + c[None, :]  # (SP, CP)
    um = smask[:, None] & (c >= 0)[None, :]
    sl = e[:, None, None] * UL + units[None, :, :]
    sm = um[None, :, :] & (e >= 0)[:, None, None]
    if LAST:
        cmask = emask[:, None, None] & (smask[:, None] & (c < C)[None, :])[None, :, :]
        coffs = offs[:, None, None] * (C * D) + (c[None, :] * D + comp[:, None])[None, :, :]
        dhs = tl.load(g_src + coffs, mask=cmask, other=0.0)
        dh = dhs * s[:, None, None]
    else:
        dh = tl.load(g_src + sl, mask=sm, other=0.0)
    if AFF:
        f = tl.load(bf + units, mask=um, other=0.0).to(a.dtype)
        _accumulate(gbf, units, tl.sum(dh * a, 0), um)
        _accumulate(gbs, units, tl.sum(dh, 0), um)
        da = dh * f[None, :, :]
        if LAST:
            h = a * f[None, :, :] + tl.load(bs + units, mask=um, other=0.0).to(a.dtype)[None, :, :]
    else:
        da = dh
        if LAST:
            h = a
    if LAST:
        ds += tl.sum(tl.sum(dhs * h, 2), 1)
        tl.debug_barrier()
        tl.store(g_src + coffs, h, mask=cmask)
    if TRIV:
        dv = da * _elu_grad(v)
        tl.debug_barrier()
        tl.store(y_slot + sl, dv, mask=sm)
    else:
        t = tl.sum(da * v, 1)  # (BE, CP)
        dm = t * m * (1.0 - m)
        dv = da * m[:, None, :]
        if NORM:
            inv = tl.where(zn > 0, 1.0 / tl.where(zn > 0, zn, 1.0), 0.0)
            dv += (dm * inv)[:, None, :] * v
            _accumulate(gab + g * CP, c, -tl.sum(dm, 0), c >= 0)
        tl.debug_barrier()
        tl.store(y_slot + sl, dv, mask=sm)
        if GATED:
            tl.store(y_slot + e[:, None] * UL + (D + g) * CP + c[None, :], dm)
    return ds


@triton.jit
def _act_bwd(
    y_slot,
    g_src,
    tab,
    ab,
    bf,
    bs,
    gab,
    gbf,
    gbs,
    offs,
    emask,
    s,
    ds,
    LAST: tl.constexpr,
    AFF: tl.constexpr,
    GATED: tl.constexpr,
    NTR: tl.constexpr,
    NNT: tl.constexpr,
    BE: tl.constexpr,
    CP: tl.constexpr,
    C: tl.constexpr,
    D: tl.constexpr,
    SP: tl.constexpr,
    UL: tl.constexpr,
):
    """A layer's activation backward, entry by entry (see :func:`_act_block_bwd`); returns d s."""
    NORM: tl.constexpr = not GATED
    for r in range(NTR):
        ds = _act_block_bwd(
            y_slot, g_src, tab, r, ab, bf, bs, gab, gbf, gbs, offs, emask, s, ds, LAST, AFF, True, GATED, NORM, BE,
            CP, C, D, SP, UL,
        )  # fmt: skip
    for r in range(NTR, NTR + NNT):
        ds = _act_block_bwd(
            y_slot, g_src, tab, r, ab, bf, bs, gab, gbf, gbs, offs, emask, s, ds, LAST, AFF, False, GATED, NORM, BE,
            CP, C, D, SP, UL,
        )  # fmt: skip
    return ds


# ----------------------------------------------------------------------------------------------------------------
# the kernels
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _offsets(prm, NL: tl.constexpr, P0: tl.constexpr, UL: tl.constexpr, WS: tl.constexpr):
    """w1, b1, wh, bh, bf, bs, ab in the packed parameters (launch.Packing for these kernels):
    ``[w1 (P0, UL) | b1 (UL,) | wh (NH, WS) | bh (NH, UL) | bf (NL, UL) | bs (NL, UL) | ab (NL, UL)]``."""
    NH: tl.constexpr = max(NL - 1, 1)
    b1 = prm + P0 * UL
    wh = b1 + UL
    bh = wh + NH * WS
    bf = bh + NH * UL
    bs = bf + NL * UL
    ab = bs + NL * UL
    return prm, b1, wh, bh, bf, bs, ab


@triton.jit(do_not_specialize=["E", "n_tiles"])
def irrep_trunk_kernel(
    inp_ptr,
    prm_ptr,
    tab_ptr,
    coef_ptr,
    out_ptr,
    act_ptr,
    s_ptr,
    scr_ptr,
    E,
    n_tiles,
    norm,
    K: tl.constexpr,
    P0: tl.constexpr,
    P0P: tl.constexpr,
    NDIM: tl.constexpr,
    CP: tl.constexpr,
    C: tl.constexpr,
    PC: tl.constexpr,
    DC: tl.constexpr,
    D: tl.constexpr,
    DL: tl.constexpr,
    T0: tl.constexpr,
    UL: tl.constexpr,
    CW: tl.constexpr,
    GATED: tl.constexpr,
    NTR: tl.constexpr,
    NNT: tl.constexpr,
    SP: tl.constexpr,
    BE: tl.constexpr,
    PREC: tl.constexpr,
    BNM: tl.constexpr,
    STATS: tl.constexpr,
    WRITE: tl.constexpr,
):
    """The trunk to hidden layer K (of the K given: ``prm_ptr`` packs them) for the tiles ``pid, pid + nprog, ..``.
    STATS: per program (count, mean (UL), M2 (UL)) of layer K's activation before its batch norm -> ``out_ptr``
    (NPROG, 1 + 2 UL) (Chan et al.'s merge per block), with WRITE also the activation, ``act_ptr`` (E, C D); else the
    output after layer K's batch norm (where BNM has it), ``out_ptr`` (E, C D), and the radial shell ``s_ptr`` (E,).
    Scratch: two (BE, UL) slots per program (pre-activations, then the layer's output)."""
    KC: tl.constexpr = PC * CP
    GW: tl.constexpr = DC * KC
    WS: tl.constexpr = UL * KC if CW else UL * UL
    TILE: tl.constexpr = BE * UL
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    dt = inp_ptr.dtype.element_ty
    w1, b1, wh, bh, bf, bs, ab = _offsets(prm_ptr, K, P0, UL, WS)
    ys = scr_ptr + pid.to(tl.int64) * (2 * TILE)
    hs = ys + TILE
    row = out_ptr + pid * (1 + 2 * UL)
    n_a = tl.sum(tl.zeros((BE,), dtype=dt), 0)
    for t in range(pid, n_tiles, nprog):
        offs, emask, _, s, _, _ = _load_tile(inp_ptr, coef_ptr, norm, t, E, P0, P0P, NDIM, BE)
        n_b = tl.sum(emask.to(dt), 0)
        tl.debug_barrier()  # the previous tile is done with the scratch
        _lin_first(inp_ptr, offs, emask, w1, b1, ys, P0, UL, GW, BE)
        for k in tl.static_range(1, K):  # layer k's activation (and batch norm), then Linear k + 1
            tl.debug_barrier()
            _act_fwd(
                ys, hs, act_ptr, row, tab_ptr, ab + (k - 1) * UL, bf + (k - 1) * UL, bs + (k - 1) * UL, offs, emask,
                n_a, n_b, 0, (BNM >> (k - 1)) & 1, False, GATED, NTR, NNT, BE, CP, C, D, SP, UL,
            )  # fmt: skip
            tl.debug_barrier()
            _lin_hidden(hs, ys, wh + (k - 1) * WS, bh + (k - 1) * UL, BE, CP, C, PC, DC, D, DL, T0, UL, CW, PREC)
        tl.debug_barrier()
        lk = K - 1
        if STATS:
            _act_fwd(
                ys, hs, act_ptr, row, tab_ptr, ab + lk * UL, bf, bs, offs, emask, n_a, n_b, 1, False, WRITE, GATED,
                NTR, NNT, BE, CP, C, D, SP, UL,
            )  # fmt: skip
            n_a += n_b
        else:
            _act_fwd(
                ys, hs, out_ptr, row, tab_ptr, ab + lk * UL, bf + lk * UL, bs + lk * UL, offs, emask, n_a, n_b, 2,
                (BNM >> lk) & 1, False, GATED, NTR, NNT, BE, CP, C, D, SP, UL,
            )  # fmt: skip
            tl.store(s_ptr + offs, s, mask=emask)
    if STATS:
        tl.store(row, n_a)


@triton.jit(do_not_specialize=["E", "n_tiles"])
def irrep_backward_kernel(
    dhs_ptr,
    dsb_ptr,
    s_ptr,
    inp_ptr,
    prm_ptr,
    tab_ptr,
    coef_ptr,
    dinp_ptr,
    acc_ptr,
    scr_ptr,
    E,
    n_tiles,
    norm,
    NL: tl.constexpr,
    P0: tl.constexpr,
    P0P: tl.constexpr,
    NDIM: tl.constexpr,
    CP: tl.constexpr,
    C: tl.constexpr,
    PC: tl.constexpr,
    DC: tl.constexpr,
    D: tl.constexpr,
    DL: tl.constexpr,
    T0: tl.constexpr,
    UL: tl.constexpr,
    CW: tl.constexpr,
    GATED: tl.constexpr,
    NTR: tl.constexpr,
    NNT: tl.constexpr,
    SP: tl.constexpr,
    BE: tl.constexpr,
    PREC: tl.constexpr,
    BNM: tl.constexpr,
):
    """Backward of the trunk and the radial shell given d hs (E, C D) and the bias term's d s (E,): d inp (E, P0) and
    the parameters' gradients, accumulated in this program's row of ``acc_ptr``, laid out as the packed parameters
    then coef's; h (after the last batch norm) written over d hs, and s.

    Scratch per program: 2 NL slots (BE, UL): y_1 .. y_NL (then dy_k in their place), h_1 .. h_{NL-1} (each layer's
    output: the next Linear's input) and one for d h_k. Per tile: the forward (one evaluation of each Linear), the
    last layer's backward from d hs, then per hidden Linear k = NL .. 2 its backward into d h_{k-1} and layer k-1's
    activation backward, then the first Linear's backward."""
    KC: tl.constexpr = PC * CP
    GW: tl.constexpr = DC * KC
    WS: tl.constexpr = UL * KC if CW else UL * UL
    NH: tl.constexpr = max(NL - 1, 1)
    ROW: tl.constexpr = P0 * UL + UL + NH * WS + NH * UL + 3 * NL * UL
    TILE: tl.constexpr = BE * UL
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    dt = inp_ptr.dtype.element_ty
    pp = tl.arange(0, P0P)
    w1, b1, wh, bh, bf, bs, ab = _offsets(prm_ptr, NL, P0, UL, WS)
    gw1, gb1, gwh, gbh, gbf, gbs, gab = _offsets(acc_ptr + pid.to(tl.int64) * (ROW + 1), NL, P0, UL, WS)
    gcoef = gw1 + ROW
    scr = scr_ptr + pid.to(tl.int64) * (2 * NL * TILE)
    hsl = scr + NL * TILE  # h_k in slot NL + k - 1
    dhl = scr + (2 * NL - 1) * TILE
    gcoef_acc = tl.sum(tl.zeros((BE,), dtype=dt), 0)
    for t in range(pid, n_tiles, nprog):
        offs, emask, inp, s, r2, coef = _load_tile(inp_ptr, coef_ptr, norm, t, E, P0, P0P, NDIM, BE)
        tl.debug_barrier()  # the previous tile is done with the scratch
        _lin_first(inp_ptr, offs, emask, w1, b1, scr, P0, UL, GW, BE)
        for k in tl.static_range(1, NL):
            tl.debug_barrier()
            _act_fwd(
                scr + (k - 1) * TILE, hsl + (k - 1) * TILE, dhs_ptr, dinp_ptr, tab_ptr, ab + (k - 1) * UL,
                bf + (k - 1) * UL, bs + (k - 1) * UL, offs, emask, 0.0, 0.0, 0, (BNM >> (k - 1)) & 1, False, GATED,
                NTR, NNT, BE, CP, C, D, SP, UL,
            )  # fmt: skip
            tl.debug_barrier()
            _lin_hidden(
                hsl + (k - 1) * TILE, scr + k * TILE, wh + (k - 1) * WS, bh + (k - 1) * UL, BE, CP, C, PC, DC, D, DL,
                T0, UL, CW, PREC,
            )  # fmt: skip
        tl.debug_barrier()
        lk = NL - 1
        ds = tl.zeros((BE,), dtype=dt)
        ds = _act_bwd(
            scr + lk * TILE, dhs_ptr, tab_ptr, ab + lk * UL, bf + lk * UL, bs + lk * UL, gab + lk * UL, gbf + lk * UL,
            gbs + lk * UL, offs, emask, s, ds, True, (BNM >> lk) & 1, GATED, NTR, NNT, BE, CP, C, D, SP, UL,
        )  # fmt: skip
        for kk in tl.static_range(0, NL - 1):
            k = NL - 1 - kk  # hidden Linear k (0-based: Linear k + 1 of the MLP) from dy in slot k
            tl.debug_barrier()
            _lin_hidden_bwd(
                scr + k * TILE, hsl + (k - 1) * TILE, dhl, wh + (k - 1) * WS, gwh + (k - 1) * WS, gbh + (k - 1) * UL,
                BE, CP, C, PC, DC, D, DL, T0, UL, CW, GATED, PREC,
            )  # fmt: skip
            tl.debug_barrier()
            ds = _act_bwd(
                scr + (k - 1) * TILE, dhl, tab_ptr, ab + (k - 1) * UL, bf + (k - 1) * UL, bs + (k - 1) * UL,
                gab + (k - 1) * UL, gbf + (k - 1) * UL, gbs + (k - 1) * UL, offs, emask, s, ds, False,
                (BNM >> (k - 1)) & 1, GATED, NTR, NNT, BE, CP, C, D, SP, UL,
            )  # fmt: skip
        tl.debug_barrier()
        dmlp = _lin_first_bwd(inp_ptr, offs, emask, scr, w1, gw1, gb1, P0, P0P, UL, GW, BE)
        tl.store(s_ptr + offs, s, mask=emask)
        ds += tl.load(dsb_ptr + offs, mask=emask, other=0.0)
        # radial shell s = norm * exp(-coef r^2)
        dsr = ds * s
        gcoef_acc += tl.sum(-dsr * r2, 0)
        dinp = tl.where((pp < NDIM)[None, :], (-2.0 * coef * dsr)[:, None] * inp, 0.0) + dmlp
        tl.store(dinp_ptr + offs[:, None] * P0 + pp[None, :], dinp, mask=emask[:, None] & (pp < P0)[None, :])
    tl.store(gcoef, gcoef_acc)
