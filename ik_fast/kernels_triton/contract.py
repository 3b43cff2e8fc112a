"""The contraction stage of the fused Triton backend: the last layer, once per *receiver*, never per edge tile.

For receiver ``i`` with in-edges ``e`` (consecutive in the receiver-sorted edge list, ``rowptr[i] .. rowptr[i+1]``),
hidden activations scaled by the radial shell ``hs_e = s_e h_e`` (H,) and gathered source features ``x_e`` (C_in,)::

    Z_i  = sum_e hs_e (x) x_e            (H, C_in)  a GEMM over the receiver's edges
    zb_i = sum_e s_e x_e                  (C_in,)
    out_i = vec(Z_i) . W'  +  zb_i . B'    W' (H * C_in, R), B' (C_in, R)

One program owns a block of ``BN`` receivers. W' is walked through its block plan (:mod:`.blocks`): hidden units,
inputs and outputs are permuted (the kernels gather and scatter through ``perm_h``, ``perm_c``, ``perm_r``) so that
its structural non-zeros fall into few 16 x 16 x 16 blocks, listed per (hidden block, input block) pair. For each
pair, Z's (``HB`` hidden x ``CB`` input) block is formed as a dot batched over the block's receivers (their edges
padded to chunks of ``KP``) and contracted at once with each of the pair's non-zero W' blocks for all ``BN``
receivers (one (BN, HB * CB) x (HB * CB, RB) dot per block), so W' is read once per receiver block, and only its
non-zero blocks (6% of them at config H). Everything is blocked by 16 (the smallest ``tl.dot``). Given the last
hidden activation *before* its batch norm (the statistics pass's, in training), the forward applies that batch norm
as it reads h (``AFF``: a factor and a shift per hidden column, read once per column block), so that no pass over
(E, H) is added.

The backward has three kernels:

* :func:`contract_dhs_kernel`, per receiver block: dZ_i = dout_i . W'^T one block at a time, then per edge
  ``d hs_e = dZ_i x_e`` (batched dots) and the bias term's ``d s_e``; it needs neither hs nor s, so it runs first and
  the trunk's backward (which recomputes h anyway) writes hs and s for the next two;
* :func:`contract_dx_kernel`, per receiver block: dZ again (cheap next to the trunk it saves recomputing) and
  ``d x_e = dZ_i^T hs_e + s_e d zb_i``;
* :func:`contract_wgrad_kernel`, per pair of W''s plan (and per input block for B') and per split of the receivers:
  dW' = sum_i vec(Z_i) (x) dout_i with Z recomputed; each program owns its blocks of one split's partial sum, so no
  two programs write the same memory (deterministic; the host adds the splits in a fixed order).

Accumulators wider than a register tile (the output's R columns, the per-edge gradients summed over blocks) are
read-modify-written in memory that only the owning program touches.
"""

import triton
import triton.language as tl

from ik_fast.kernels_triton.conv import _mm


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
def _cols(perm_ptr, b, n, NB: tl.constexpr):
    """Original indices (NB,) of permuted positions b .. b + NB of a dimension of size n, and their validity (the
    permutation is padded to a multiple of NB)."""
    k = b + tl.arange(0, NB)
    return tl.load(perm_ptr + k).to(tl.int64), k < n


@triton.jit
def _load_hs(h_ptr, s_ptr, e, emask, hcol, hval, H, f=None, t=None, AFF: tl.constexpr = False):
    """hs = s h (BN, KP, HB): hidden columns ``hcol`` of the chunk's edges (h (E, H), s (E,)); with AFF,
    hs = s (h f + t), f and t (HB,) the batch norm's factor and shift of those columns."""
    h = tl.load(
        h_ptr + e[:, :, None] * H + hcol[None, None, :], mask=emask[:, :, None] & hval[None, None, :], other=0.0
    )
    if AFF:
        h = h * f[None, None, :] + t[None, None, :]
    return h * tl.load(s_ptr + e, mask=emask, other=0.0)[:, :, None]


@triton.jit
def _load_x(x_ptr, src_ptr, e, emask, ccol, cval, CIN):
    """Gathered source features (BN, KP, CB): input columns ``ccol`` of the chunk's edges."""
    sr = tl.load(src_ptr + e, mask=emask, other=0).to(tl.int64)
    return tl.load(
        x_ptr + sr[:, :, None] * CIN + ccol[None, None, :], mask=emask[:, :, None] & cval[None, None, :], other=0.0
    )


@triton.jit
def _z_block(
    h_ptr,
    s_ptr,
    x_ptr,
    src_ptr,
    start,
    deg,
    nmax,
    hcol,
    hval,
    ccol,
    cval,
    H,
    CIN,
    BN: tl.constexpr,
    KP: tl.constexpr,
    HB: tl.constexpr,
    CB: tl.constexpr,
    PREC: tl.constexpr,
    bnf_ptr=None,
    bns_ptr=None,
    DL=1,
    AFF: tl.constexpr = False,
):
    """Z block (BN, HB * CB) of the receivers: sum over their edges of hs (x) x, one chunk of KP edges at a time. With
    AFF, h holds the last hidden activation *before* its batch norm, which is applied here as it is read: hidden
    unit j is ``h_j f[j // DL] + t[j]`` (``bnf_ptr`` (H / DL,) per channel of DL components, ``bns_ptr`` (H,)), the
    factor and shift of the block's columns read once."""
    z = tl.zeros((BN, HB, CB), dtype=h_ptr.dtype.element_ty)
    if AFF:
        f = tl.load(bnf_ptr + hcol // DL, mask=hval, other=0.0).to(z.dtype)
        t = tl.load(bns_ptr + hcol, mask=hval, other=0.0).to(z.dtype)
    for t0 in range(0, nmax, KP):
        e, emask = _edges(start, deg, t0, KP)
        if AFF:
            a = _load_hs(h_ptr, s_ptr, e, emask, hcol, hval, H, f, t, True)
        else:
            a = _load_hs(h_ptr, s_ptr, e, emask, hcol, hval, H)
        xt = _load_x(x_ptr, src_ptr, e, emask, ccol, cval, CIN)
        z += _mm(tl.permute(a, (0, 2, 1)), xt, PREC)
    return tl.reshape(z, (BN, HB * CB))


@triton.jit
def _pair(pairs_ptr, pair_ptr, perm_h, perm_c, p, H, CIN, HB: tl.constexpr, CB: tl.constexpr):
    """Pair ``p`` of the plan: its hidden and input columns with validity, and its range of W' blocks."""
    hb = tl.load(pairs_ptr + 2 * p)
    cb = tl.load(pairs_ptr + 2 * p + 1)
    hcol, hval = _cols(perm_h, hb, H, HB)
    ccol, cval = _cols(perm_c, cb, CIN, CB)
    return hcol, hval, ccol, cval, tl.load(pair_ptr + p), tl.load(pair_ptr + p + 1)


@triton.jit
def _w_block(wc_ptr, wi_ptr, q, HB: tl.constexpr, CB: tl.constexpr, RB: tl.constexpr):
    """Block ``q`` (HB * CB, RB) of W' in the plan's order, read from W' (R, H, C_in) through the plan's index of it
    (``wi_ptr`` (NB, HB * CB, RB): the flat position in W' of each entry, -1 outside the structure; NB HB CB RB <
    2^31, checked by the host)."""
    rows = tl.arange(0, HB * CB)
    idx = tl.load(wi_ptr + q * (HB * CB * RB) + rows[:, None] * RB + tl.arange(0, RB)[None, :])
    return tl.load(wc_ptr + idx, mask=idx >= 0, other=0.0)


@triton.jit
def _b_block(bf_ptr, bi_ptr, cb, rb, RC, CB: tl.constexpr, RB: tl.constexpr):
    """B' (CB, RB) at permuted input positions cb.. and output positions rb.., read from B' (R, C_in) through the
    plan's index (``bi_ptr`` (CINC, RC): flat position in B', -1 for padding)."""
    c = cb + tl.arange(0, CB)
    idx = tl.load(bi_ptr + c[:, None] * RC + (rb + tl.arange(0, RB))[None, :])
    return tl.load(bf_ptr + idx, mask=idx >= 0, other=0.0)


@triton.jit
def _rmw(ptr, offs, value, mask):
    """Read-modify-write of memory that only this program touches."""
    old = tl.load(ptr + offs, mask=mask, other=0.0)
    tl.store(ptr + offs, old + value.to(old.dtype), mask=mask)


@triton.jit
def _zb(
    s_ptr, x_ptr, src_ptr, start, deg, nmax, ccol, cval, CIN, BN: tl.constexpr, KP: tl.constexpr, CB: tl.constexpr, dt
):
    """The bias term's zb = sum_e s_e x_e (BN, CB) on input columns ``ccol``."""
    zb = tl.zeros((BN, CB), dtype=dt)
    for t0 in range(0, nmax, KP):
        e, emask = _edges(start, deg, t0, KP)
        s = tl.load(s_ptr + e, mask=emask, other=0.0)
        zb += tl.sum(s[:, :, None] * _load_x(x_ptr, src_ptr, e, emask, ccol, cval, CIN), 1)
    return zb


@triton.jit
def _load_g(g_ptr, i, imask, rcol, rval, R, dt):
    """dout (BN, RB) of the receivers on output columns ``rcol``."""
    g = tl.load(g_ptr + i[:, None] * R + rcol[None, :], mask=imask[:, None] & rval[None, :], other=0.0)
    return g.to(dt)


@triton.jit(do_not_specialize=["n_dst", "n_pairs", "H", "CIN", "CINC", "R", "RC", "DL"])
def contract_forward_kernel(
    h_ptr,
    s_ptr,
    x_ptr,
    src_ptr,
    rowptr_ptr,
    wc_ptr,
    wi_ptr,
    bf_ptr,
    bi_ptr,
    out_ptr,
    pairs_ptr,
    pair_ptr,
    blk_r,
    perm_h,
    perm_c,
    perm_r,
    bnf_ptr,
    bns_ptr,
    n_dst,
    n_pairs,
    H,
    CIN,
    CINC,
    R,
    RC,
    DL,
    BN: tl.constexpr,
    KP: tl.constexpr,
    HB: tl.constexpr,
    CB: tl.constexpr,
    RB: tl.constexpr,
    PREC: tl.constexpr,
    AFF: tl.constexpr,
):
    """out (n_dst, R), zero on entry; h (E, H) the last hidden layer's output (with AFF its activation before its batch
    norm ``bnf`` (H / DL,), ``bns`` (H,), applied as it is read: :func:`_z_block`), s (E,) the radial shell; W' as the
    compact blocks of its plan (wc), B' permuted and padded (bf (CINC, RC))."""
    i, imask, start, deg, nmax = _receivers(rowptr_ptr, tl.program_id(0), n_dst, BN)
    for p in range(0, n_pairs):
        hcol, hval, ccol, cval, q0, q1 = _pair(pairs_ptr, pair_ptr, perm_h, perm_c, p, H, CIN, HB, CB)
        z = _z_block(
            h_ptr, s_ptr, x_ptr, src_ptr, start, deg, nmax, hcol, hval, ccol, cval, H, CIN, BN, KP, HB, CB, PREC,
            bnf_ptr, bns_ptr, DL, AFF,
        )  # fmt: skip
        for q in range(q0, q1):
            rcol, rval = _cols(perm_r, tl.load(blk_r + q), R, RB)
            o = _mm(z, _w_block(wc_ptr, wi_ptr, q, HB, CB, RB), PREC)
            _rmw(out_ptr, i[:, None] * R + rcol[None, :], o, imask[:, None] & rval[None, :])
    # the bias term: zb = sum_e s_e x_e per receiver, times B'
    for cb in range(0, CINC, CB):
        ccol, cval = _cols(perm_c, cb, CIN, CB)
        zb = _zb(s_ptr, x_ptr, src_ptr, start, deg, nmax, ccol, cval, CIN, BN, KP, CB, h_ptr.dtype.element_ty)
        for rb in range(0, RC, RB):
            rcol, rval = _cols(perm_r, rb, R, RB)
            b = _b_block(bf_ptr, bi_ptr, cb, rb, RC, CB, RB)
            _rmw(out_ptr, i[:, None] * R + rcol[None, :], _mm(zb, b, PREC), imask[:, None] & rval[None, :])


@triton.jit
def _dz_block(
    g_ptr,
    wc_ptr,
    wi_ptr,
    blk_r,
    perm_r,
    i,
    imask,
    q0,
    q1,
    R,
    BN: tl.constexpr,
    HB: tl.constexpr,
    CB: tl.constexpr,
    RB: tl.constexpr,
    PREC: tl.constexpr,
):
    """dZ block (BN, HB, CB) = dout . W'^T over the pair's W' blocks q0 .. q1."""
    dt = wc_ptr.dtype.element_ty
    dz = tl.zeros((BN, HB * CB), dtype=dt)
    for q in range(q0, q1):
        rcol, rval = _cols(perm_r, tl.load(blk_r + q), R, RB)
        g = _load_g(g_ptr, i, imask, rcol, rval, R, dt)
        dz += _mm(g, tl.trans(_w_block(wc_ptr, wi_ptr, q, HB, CB, RB)), PREC)
    return tl.reshape(dz, (BN, HB, CB))


@triton.jit
def _dzb_block(
    g_ptr,
    bf_ptr,
    bi_ptr,
    perm_r,
    i,
    imask,
    cb,
    R,
    RC,
    BN: tl.constexpr,
    CB: tl.constexpr,
    RB: tl.constexpr,
    PREC: tl.constexpr,
):
    """d zb block (BN, CB) = dout . B'^T on permuted input positions cb .. cb + CB."""
    dt = bf_ptr.dtype.element_ty
    dzb = tl.zeros((BN, CB), dtype=dt)
    for rb in range(0, RC, RB):
        rcol, rval = _cols(perm_r, rb, R, RB)
        g = _load_g(g_ptr, i, imask, rcol, rval, R, dt)
        dzb += _mm(g, tl.trans(_b_block(bf_ptr, bi_ptr, cb, rb, RC, CB, RB)), PREC)
    return dzb


@triton.jit(do_not_specialize=["n_dst", "n_pairs", "H", "CIN", "CINC", "R", "RC"])
def contract_dhs_kernel(
    g_ptr,
    x_ptr,
    src_ptr,
    rowptr_ptr,
    wc_ptr,
    wi_ptr,
    bf_ptr,
    bi_ptr,
    dhs_ptr,
    ds_ptr,
    pairs_ptr,
    pair_ptr,
    blk_r,
    perm_h,
    perm_c,
    perm_r,
    n_dst,
    n_pairs,
    H,
    CIN,
    CINC,
    R,
    RC,
    BN: tl.constexpr,
    KP: tl.constexpr,
    HB: tl.constexpr,
    CB: tl.constexpr,
    RB: tl.constexpr,
    PREC: tl.constexpr,
):
    """Given dout (n_dst, R): d hs_e = dZ_i x_e (E, H) and the bias term's d s_e = d zb_i . x_e (E,), zero on entry.
    Needs neither hs nor s: it runs before the trunk's backward, which recomputes hs."""
    i, imask, start, deg, nmax = _receivers(rowptr_ptr, tl.program_id(0), n_dst, BN)
    for p in range(0, n_pairs):
        hcol, hval, ccol, cval, q0, q1 = _pair(pairs_ptr, pair_ptr, perm_h, perm_c, p, H, CIN, HB, CB)
        dzt = tl.permute(
            _dz_block(g_ptr, wc_ptr, wi_ptr, blk_r, perm_r, i, imask, q0, q1, R, BN, HB, CB, RB, PREC), (0, 2, 1)
        )
        for t0 in range(0, nmax, KP):
            e, emask = _edges(start, deg, t0, KP)
            xt = _load_x(x_ptr, src_ptr, e, emask, ccol, cval, CIN)
            _rmw(
                dhs_ptr,
                e[:, :, None] * H + hcol[None, None, :],
                _mm(xt, dzt, PREC),
                emask[:, :, None] & hval[None, None, :],
            )
    for cb in range(0, CINC, CB):
        ccol, cval = _cols(perm_c, cb, CIN, CB)
        dzb = _dzb_block(g_ptr, bf_ptr, bi_ptr, perm_r, i, imask, cb, R, RC, BN, CB, RB, PREC)
        for t0 in range(0, nmax, KP):
            e, emask = _edges(start, deg, t0, KP)
            xt = _load_x(x_ptr, src_ptr, e, emask, ccol, cval, CIN)
            _rmw(ds_ptr, e, tl.sum(xt * dzb[:, None, :], 2), emask)


@triton.jit(do_not_specialize=["n_dst", "n_pairs", "H", "CIN", "CINC", "R", "RC"])
def contract_dx_kernel(
    g_ptr,
    h_ptr,
    s_ptr,
    rowptr_ptr,
    wc_ptr,
    wi_ptr,
    bf_ptr,
    bi_ptr,
    dxe_ptr,
    pairs_ptr,
    pair_ptr,
    blk_r,
    perm_h,
    perm_c,
    perm_r,
    n_dst,
    n_pairs,
    H,
    CIN,
    CINC,
    R,
    RC,
    BN: tl.constexpr,
    KP: tl.constexpr,
    HB: tl.constexpr,
    CB: tl.constexpr,
    RB: tl.constexpr,
    PREC: tl.constexpr,
):
    """Given dout (n_dst, R): the gradient of each edge's gathered source features, d x_e = dZ_i^T hs_e + s_e d zb_i
    (E, C_in), zero on entry (the host adds it into the sources)."""
    i, imask, start, deg, nmax = _receivers(rowptr_ptr, tl.program_id(0), n_dst, BN)
    for p in range(0, n_pairs):
        hcol, hval, ccol, cval, q0, q1 = _pair(pairs_ptr, pair_ptr, perm_h, perm_c, p, H, CIN, HB, CB)
        dz = _dz_block(g_ptr, wc_ptr, wi_ptr, blk_r, perm_r, i, imask, q0, q1, R, BN, HB, CB, RB, PREC)
        for t0 in range(0, nmax, KP):
            e, emask = _edges(start, deg, t0, KP)
            a = _load_hs(h_ptr, s_ptr, e, emask, hcol, hval, H)
            _rmw(
                dxe_ptr,
                e[:, :, None] * CIN + ccol[None, None, :],
                _mm(a, dz, PREC),
                emask[:, :, None] & cval[None, None, :],
            )
    for cb in range(0, CINC, CB):
        ccol, cval = _cols(perm_c, cb, CIN, CB)
        dzb = _dzb_block(g_ptr, bf_ptr, bi_ptr, perm_r, i, imask, cb, R, RC, BN, CB, RB, PREC)
        for t0 in range(0, nmax, KP):
            e, emask = _edges(start, deg, t0, KP)
            s = tl.load(s_ptr + e, mask=emask, other=0.0)
            _rmw(
                dxe_ptr,
                e[:, :, None] * CIN + ccol[None, None, :],
                s[:, :, None] * dzb[:, None, :],
                emask[:, :, None] & cval[None, None, :],
            )


@triton.jit(do_not_specialize=["n_dst", "n_blocks", "n_pairs", "NB", "H", "CIN", "CINC", "R", "RC"])
def contract_wgrad_kernel(
    g_ptr,
    h_ptr,
    s_ptr,
    x_ptr,
    src_ptr,
    rowptr_ptr,
    dwc_ptr,
    dbf_ptr,
    pairs_ptr,
    pair_ptr,
    blk_r,
    perm_h,
    perm_c,
    perm_r,
    n_dst,
    n_blocks,
    n_pairs,
    NB,
    H,
    CIN,
    CINC,
    R,
    RC,
    BN: tl.constexpr,
    KP: tl.constexpr,
    HB: tl.constexpr,
    CB: tl.constexpr,
    RB: tl.constexpr,
    PREC: tl.constexpr,
):
    """Partial sums over one split (axis 1) of the receiver blocks: program p < n_pairs (axis 0) owns the W' blocks of
    pair p in dW' (NSPLIT, NB, HB * CB, RB); program n_pairs + j owns input block j of dB' (NSPLIT, CINC, RC) (x @ B
    layout, permuted). Zero on entry."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    nsplit = tl.num_programs(1)
    dt = h_ptr.dtype.element_ty
    if pid < n_pairs:
        hcol, hval, ccol, cval, q0, q1 = _pair(pairs_ptr, pair_ptr, perm_h, perm_c, pid, H, CIN, HB, CB)
        dwc = dwc_ptr + split.to(tl.int64) * NB * (HB * CB * RB)
        rows = tl.arange(0, HB * CB)
        for blk in range(split, n_blocks, nsplit):
            i, imask, start, deg, nmax = _receivers(rowptr_ptr, blk, n_dst, BN)
            zt = tl.trans(
                _z_block(
                    h_ptr, s_ptr, x_ptr, src_ptr, start, deg, nmax, hcol, hval, ccol, cval, H, CIN, BN, KP, HB, CB, PREC
                )
            )  # (HB * CB, BN)
            for q in range(q0, q1):
                rcol, rval = _cols(perm_r, tl.load(blk_r + q), R, RB)
                g = _load_g(g_ptr, i, imask, rcol, rval, R, dt)
                _rmw(
                    dwc,
                    q * (HB * CB * RB) + rows[:, None] * RB + tl.arange(0, RB)[None, :],
                    _mm(zt, g, PREC),
                    rows[:, None] >= 0,
                )
    else:  # the bias weight's gradient for one input block: sum_i zb_i (x) dout_i
        cb = (pid - n_pairs) * CB
        ccol, cval = _cols(perm_c, cb, CIN, CB)
        c = cb + tl.arange(0, CB)
        dbf = dbf_ptr + split.to(tl.int64) * CINC * RC
        for blk in range(split, n_blocks, nsplit):
            i, imask, start, deg, nmax = _receivers(rowptr_ptr, blk, n_dst, BN)
            zbt = tl.trans(_zb(s_ptr, x_ptr, src_ptr, start, deg, nmax, ccol, cval, CIN, BN, KP, CB, dt))
            for rb in range(0, RC, RB):
                rcol, rval = _cols(perm_r, rb, R, RB)
                g = _load_g(g_ptr, i, imask, rcol, rval, R, dt)
                r = rb + tl.arange(0, RB)
                _rmw(dbf, c[:, None] * RC + r[None, :], _mm(zbt, g, PREC), c[:, None] >= 0)


@triton.jit(do_not_specialize=["n", "nsplit", "stride"])
def split_sum_scatter_kernel(part_ptr, src_ptr, dst_ptr, out_ptr, n, nsplit, stride, BV: tl.constexpr):
    """out[dst[v]] = sum over splits s (in order) of part[s * stride + src[v]], for v < n: the W' (or B') gradient's
    partial sums in the plan's order added and put back into W''s own layout (nsplit * stride < 2^31: the host's
    split count bounds it)."""
    v = tl.program_id(0) * BV + tl.arange(0, BV)
    m = v < n
    src = tl.load(src_ptr + v, mask=m, other=0)
    acc = tl.zeros((BV,), dtype=part_ptr.dtype.element_ty)
    for s in range(0, nsplit):
        acc += tl.load(part_ptr + s * stride + src, mask=m, other=0.0)
    tl.store(out_ptr + tl.load(dst_ptr + v, mask=m, other=0), acc, mask=m)
