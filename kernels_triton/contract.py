"""The contraction stage of the fused Triton backend: the last layer, once per *receiver*, never per edge tile.

For receiver ``i`` with in-edges ``e`` (consecutive in the receiver-sorted edge list, ``rowptr[i] .. rowptr[i+1]``),
hidden activations scaled by the radial shell ``hs_e = s_e h_e`` (H,) and gathered source features ``x_e`` (C_in,)::

    Z_i  = sum_e hs_e (x) x_e            (H, C_in)  a GEMM over the receiver's edges
    zb_i = sum_e s_e x_e                  (C_in,)
    out_i = vec(Z_i) . W'  +  zb_i . B'    W' (H * C_in, R), B' (C_in, R)

One program owns a block of ``BN`` receivers. Z is formed one (``HB`` hidden x ``CB`` input) block at a time, as a dot
batched over the block's receivers (their edges padded to chunks of ``KP``), and contracted at once with the matching
rows of W' for all ``BN`` receivers (one (BN, HB * CB) x (HB * CB, RB) dot per output block of ``RB``), so W' is read
once per receiver block instead of once per edge tile. Everything is blocked by 16 (the smallest ``tl.dot``), so the
padding of H, C_in and R is at most 15 columns each (not to the next power of two).

The backward has three kernels:

* :func:`contract_dhs_kernel`, per receiver block: dZ_i = dout_i . W'^T one block at a time, then per edge
  ``d hs_e = dZ_i x_e`` (batched dots) and the bias term's ``d s_e``; it needs neither hs nor s, so it runs first and
  the trunk's backward (which recomputes h anyway) writes hs and s for the next two;
* :func:`contract_dx_kernel`, per receiver block: dZ again (cheap next to the trunk it saves recomputing) and
  ``d x_e = dZ_i^T hs_e + s_e d zb_i``;
* :func:`contract_wgrad_kernel`, per (hidden block, input block) of W' and per split of the receivers:
  dW' = sum_i vec(Z_i) (x) dout_i with Z recomputed; each program owns its block of one split's partial sum, so no
  two programs write the same memory (deterministic; the host adds the splits in a fixed order).

Accumulators wider than a register tile (the output's R columns, the per-edge gradients summed over blocks) are
read-modify-written in memory that only the owning program touches.
"""

import triton
import triton.language as tl

from .conv import _mm


@triton.jit
def _receivers(rowptr_ptr, blk, n_dst, BN: tl.constexpr):
    """Receivers of block ``blk``: ids (BN,), validity, first edge and degree (0 for padding lanes), max degree."""
    i = blk * BN + tl.arange(0, BN)
    imask = i < n_dst
    start = tl.load(rowptr_ptr + i, mask=imask, other=0).to(tl.int64)
    end = tl.load(rowptr_ptr + i + 1, mask=imask, other=0).to(tl.int64)
    deg = end - start
    return i.to(tl.int64), imask, start, deg, tl.max(deg, 0)


@triton.jit
def _edges(start, deg, t0, KP: tl.constexpr):
    """Edge ids (BN, KP) of chunk ``t0`` of each receiver's edges and their validity."""
    k = t0 + tl.arange(0, KP)
    emask = k[None, :] < deg[:, None]
    return start[:, None] + k[None, :], emask


@triton.jit
def _load_hs(h_ptr, s_ptr, e, emask, hb, H, HB: tl.constexpr):
    """hs = s h (BN, KP, HB): hidden block ``hb`` of the chunk's edges (h (E, H), s (E,))."""
    hh = hb + tl.arange(0, HB)
    h = tl.load(h_ptr + e[:, :, None] * H + hh[None, None, :], mask=emask[:, :, None] & (hh < H)[None, None, :],
                other=0.0)
    return h * tl.load(s_ptr + e, mask=emask, other=0.0)[:, :, None]


@triton.jit
def _load_x(x_ptr, src_ptr, e, emask, cb, CIN, CB: tl.constexpr):
    """Gathered source features (BN, KP, CB): input block ``cb`` of the chunk's edges."""
    sr = tl.load(src_ptr + e, mask=emask, other=0).to(tl.int64)
    c = cb + tl.arange(0, CB)
    return tl.load(x_ptr + sr[:, :, None] * CIN + c[None, None, :], mask=emask[:, :, None] & (c < CIN)[None, None, :],
                   other=0.0)


@triton.jit
def _z_block(h_ptr, s_ptr, x_ptr, src_ptr, start, deg, nmax, hb, cb, H, CIN, BN: tl.constexpr, KP: tl.constexpr,
             HB: tl.constexpr, CB: tl.constexpr, PREC: tl.constexpr):
    """Z block (BN, HB * CB) of the receivers: sum over their edges of hs (x) x, one chunk of KP edges at a time."""
    z = tl.zeros((BN, HB, CB), dtype=h_ptr.dtype.element_ty)
    for t0 in range(0, nmax, KP):
        e, emask = _edges(start, deg, t0, KP)
        a = _load_hs(h_ptr, s_ptr, e, emask, hb, H, HB)
        xt = _load_x(x_ptr, src_ptr, e, emask, cb, CIN, CB)
        z += _mm(tl.permute(a, (0, 2, 1)), xt, PREC)
    return tl.reshape(z, (BN, HB * CB))


@triton.jit
def _w_block(wf_ptr, hb, cb, rb, CINC, RC, HB: tl.constexpr, CB: tl.constexpr, RB: tl.constexpr):
    """W' rows of (hidden block hb) x (input block cb), columns rb .. rb + RB: (HB * CB, RB). W' is (HC, CINC, RC)."""
    h = hb + tl.arange(0, HB)
    c = cb + tl.arange(0, CB)
    rows = tl.reshape(h[:, None] * CINC + c[None, :], (HB * CB,)).to(tl.int64)
    return tl.load(wf_ptr + rows[:, None] * RC + (rb + tl.arange(0, RB))[None, :])


@triton.jit
def _rmw(ptr, offs, value, mask):
    """Read-modify-write of memory that only this program touches."""
    old = tl.load(ptr + offs, mask=mask, other=0.0)
    tl.store(ptr + offs, old + value.to(old.dtype), mask=mask)


@triton.jit(do_not_specialize=["n_dst", "H", "HC", "CIN", "CINC", "R", "RC"])
def contract_forward_kernel(h_ptr, s_ptr, x_ptr, src_ptr, rowptr_ptr, wf_ptr, bf_ptr, out_ptr, n_dst, H, HC, CIN,
                            CINC, R, RC, BN: tl.constexpr, KP: tl.constexpr, HB: tl.constexpr, CB: tl.constexpr,
                            RB: tl.constexpr, PREC: tl.constexpr):
    """out (n_dst, R), zero on entry; h (E, H) the last hidden activation, s (E,) the radial shell."""
    i, imask, start, deg, nmax = _receivers(rowptr_ptr, tl.program_id(0), n_dst, BN)
    for hb in range(0, HC, HB):
        for cb in range(0, CINC, CB):
            z = _z_block(h_ptr, s_ptr, x_ptr, src_ptr, start, deg, nmax, hb, cb, H, CIN, BN, KP, HB, CB, PREC)
            for rb in range(0, RC, RB):
                r = rb + tl.arange(0, RB)
                o = _mm(z, _w_block(wf_ptr, hb, cb, rb, CINC, RC, HB, CB, RB), PREC)
                _rmw(out_ptr, i[:, None] * R + r[None, :], o, imask[:, None] & (r < R)[None, :])
    # the bias term: zb = sum_e s_e x_e per receiver, times B'
    for cb in range(0, CINC, CB):
        zb = tl.zeros((BN, CB), dtype=h_ptr.dtype.element_ty)
        for t0 in range(0, nmax, KP):
            e, emask = _edges(start, deg, t0, KP)
            s = tl.load(s_ptr + e, mask=emask, other=0.0)
            zb += tl.sum(s[:, :, None] * _load_x(x_ptr, src_ptr, e, emask, cb, CIN, CB), 1)
        c = cb + tl.arange(0, CB)
        for rb in range(0, RC, RB):
            r = rb + tl.arange(0, RB)
            b = tl.load(bf_ptr + c[:, None] * RC + r[None, :])
            _rmw(out_ptr, i[:, None] * R + r[None, :], _mm(zb, b, PREC), imask[:, None] & (r < R)[None, :])


@triton.jit
def _dz_block(g_ptr, wf_ptr, i, imask, hb, cb, CINC, R, RC, BN: tl.constexpr, HB: tl.constexpr, CB: tl.constexpr,
              RB: tl.constexpr, PREC: tl.constexpr):
    """dZ block (BN, HB, CB) = dout . W'^T on the block's rows of W'."""
    dt = wf_ptr.dtype.element_ty
    dz = tl.zeros((BN, HB * CB), dtype=dt)
    for rb in range(0, RC, RB):
        r = rb + tl.arange(0, RB)
        g = tl.load(g_ptr + i[:, None] * R + r[None, :], mask=imask[:, None] & (r < R)[None, :], other=0.0)
        dz += _mm(g.to(dt), tl.trans(_w_block(wf_ptr, hb, cb, rb, CINC, RC, HB, CB, RB)), PREC)
    return tl.reshape(dz, (BN, HB, CB))


@triton.jit
def _dzb_block(g_ptr, bf_ptr, i, imask, cb, R, RC, BN: tl.constexpr, CB: tl.constexpr, RB: tl.constexpr,
               PREC: tl.constexpr):
    """d zb block (BN, CB) = dout . B'^T."""
    dt = bf_ptr.dtype.element_ty
    c = cb + tl.arange(0, CB)
    dzb = tl.zeros((BN, CB), dtype=dt)
    for rb in range(0, RC, RB):
        r = rb + tl.arange(0, RB)
        g = tl.load(g_ptr + i[:, None] * R + r[None, :], mask=imask[:, None] & (r < R)[None, :], other=0.0)
        dzb += _mm(g.to(dt), tl.trans(tl.load(bf_ptr + c[:, None] * RC + r[None, :])), PREC)
    return dzb


@triton.jit(do_not_specialize=["n_dst", "H", "HC", "CIN", "CINC", "R", "RC"])
def contract_dhs_kernel(g_ptr, x_ptr, src_ptr, rowptr_ptr, wf_ptr, bf_ptr, dhs_ptr, ds_ptr, n_dst, H, HC, CIN, CINC,
                        R, RC, BN: tl.constexpr, KP: tl.constexpr, HB: tl.constexpr, CB: tl.constexpr,
                        RB: tl.constexpr, PREC: tl.constexpr):
    """Given dout (n_dst, R): d hs_e = dZ_i x_e (E, H) and the bias term's d s_e = d zb_i . x_e (E,), zero on entry.
    Needs neither hs nor s: it runs before the trunk's backward, which recomputes hs."""
    i, imask, start, deg, nmax = _receivers(rowptr_ptr, tl.program_id(0), n_dst, BN)
    for hb in range(0, HC, HB):
        h = hb + tl.arange(0, HB)
        for cb in range(0, CINC, CB):
            dzt = tl.permute(_dz_block(g_ptr, wf_ptr, i, imask, hb, cb, CINC, R, RC, BN, HB, CB, RB, PREC), (0, 2, 1))
            for t0 in range(0, nmax, KP):
                e, emask = _edges(start, deg, t0, KP)
                xt = _load_x(x_ptr, src_ptr, e, emask, cb, CIN, CB)
                _rmw(dhs_ptr, e[:, :, None] * H + h[None, None, :], _mm(xt, dzt, PREC),
                     emask[:, :, None] & (h < H)[None, None, :])
    for cb in range(0, CINC, CB):
        dzb = _dzb_block(g_ptr, bf_ptr, i, imask, cb, R, RC, BN, CB, RB, PREC)
        for t0 in range(0, nmax, KP):
            e, emask = _edges(start, deg, t0, KP)
            xt = _load_x(x_ptr, src_ptr, e, emask, cb, CIN, CB)
            _rmw(ds_ptr, e, tl.sum(xt * dzb[:, None, :], 2), emask)


@triton.jit(do_not_specialize=["n_dst", "H", "HC", "CIN", "CINC", "R", "RC"])
def contract_dx_kernel(g_ptr, h_ptr, s_ptr, rowptr_ptr, wf_ptr, bf_ptr, dxe_ptr, n_dst, H, HC, CIN, CINC, R, RC,
                       BN: tl.constexpr, KP: tl.constexpr, HB: tl.constexpr, CB: tl.constexpr, RB: tl.constexpr,
                       PREC: tl.constexpr):
    """Given dout (n_dst, R): the gradient of each edge's gathered source features, d x_e = dZ_i^T hs_e + s_e d zb_i
    (E, C_in), zero on entry (the host adds it into the sources)."""
    i, imask, start, deg, nmax = _receivers(rowptr_ptr, tl.program_id(0), n_dst, BN)
    for cb in range(0, CINC, CB):
        c = cb + tl.arange(0, CB)
        for hb in range(0, HC, HB):
            dz = _dz_block(g_ptr, wf_ptr, i, imask, hb, cb, CINC, R, RC, BN, HB, CB, RB, PREC)
            for t0 in range(0, nmax, KP):
                e, emask = _edges(start, deg, t0, KP)
                a = _load_hs(h_ptr, s_ptr, e, emask, hb, H, HB)
                _rmw(dxe_ptr, e[:, :, None] * CIN + c[None, None, :], _mm(a, dz, PREC),
                     emask[:, :, None] & (c < CIN)[None, None, :])
        dzb = _dzb_block(g_ptr, bf_ptr, i, imask, cb, R, RC, BN, CB, RB, PREC)
        for t0 in range(0, nmax, KP):
            e, emask = _edges(start, deg, t0, KP)
            s = tl.load(s_ptr + e, mask=emask, other=0.0)
            _rmw(dxe_ptr, e[:, :, None] * CIN + c[None, None, :], s[:, :, None] * dzb[:, None, :],
                 emask[:, :, None] & (c < CIN)[None, None, :])


@triton.jit(do_not_specialize=["n_dst", "n_blocks", "H", "HC", "CIN", "CINC", "R", "RC"])
def contract_wgrad_kernel(g_ptr, h_ptr, s_ptr, x_ptr, src_ptr, rowptr_ptr, dwf_ptr, dbf_ptr, n_dst, n_blocks, H, HC,
                          CIN, CINC, R, RC, BN: tl.constexpr, KP: tl.constexpr, HB: tl.constexpr, CB: tl.constexpr,
                          RB: tl.constexpr, PREC: tl.constexpr):
    """Partial sums over one split of the receiver blocks: dW' (NSPLIT, HC, CINC, RC) and dB' (NSPLIT, CINC, RC), the
    block (HB, CB) of program (axis 0) in split (axis 1); zero on entry."""
    n_cb = CINC // CB
    hb = (tl.program_id(0) // n_cb) * HB
    cb = (tl.program_id(0) % n_cb) * CB
    split = tl.program_id(1)
    nsplit = tl.num_programs(1)
    dwf = dwf_ptr + split.to(tl.int64) * HC * CINC * RC
    dbf = dbf_ptr + split.to(tl.int64) * CINC * RC
    h = hb + tl.arange(0, HB)
    c = cb + tl.arange(0, CB)
    rows = tl.reshape(h[:, None] * CINC + c[None, :], (HB * CB,)).to(tl.int64)
    dt = h_ptr.dtype.element_ty
    for blk in range(split, n_blocks, nsplit):
        i, imask, start, deg, nmax = _receivers(rowptr_ptr, blk, n_dst, BN)
        z = _z_block(h_ptr, s_ptr, x_ptr, src_ptr, start, deg, nmax, hb, cb, H, CIN, BN, KP, HB, CB, PREC)
        zt = tl.trans(z)  # (HB * CB, BN)
        for rb in range(0, RC, RB):
            r = rb + tl.arange(0, RB)
            g = tl.load(g_ptr + i[:, None] * R + r[None, :], mask=imask[:, None] & (r < R)[None, :], other=0.0)
            _rmw(dwf, rows[:, None] * RC + r[None, :], _mm(zt, g.to(dt), PREC), rows[:, None] >= 0)
        if hb == 0:  # the bias weight's gradient, once per input block: sum_i zb_i (x) dout_i
            zb = tl.zeros((BN, CB), dtype=dt)
            for t0 in range(0, nmax, KP):
                e, emask = _edges(start, deg, t0, KP)
                s = tl.load(s_ptr + e, mask=emask, other=0.0)
                zb += tl.sum(s[:, :, None] * _load_x(x_ptr, src_ptr, e, emask, cb, CIN, CB), 1)
            for rb in range(0, RC, RB):
                r = rb + tl.arange(0, RB)
                g = tl.load(g_ptr + i[:, None] * R + r[None, :], mask=imask[:, None] & (r < R)[None, :], other=0.0)
                _rmw(dbf, c[:, None] * RC + r[None, :], _mm(tl.trans(zb), g.to(dt), PREC), c[:, None] >= 0)
