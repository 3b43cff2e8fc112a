"""The contraction stage of the fused Triton backend: the last layer, once per *receiver*, never per edge tile.

For receiver ``i`` with in-edges ``e`` (consecutive in the receiver-sorted edge list, ``rowptr[i] .. rowptr[i+1]``),
hidden activations scaled by the radial shell ``hs_e = s_e h_e`` (H,) and gathered source features ``x_e`` (C_in,)::

    Z_i  = sum_e hs_e (x) x_e            (H, C_in)  a GEMM over the receiver's edges
    zb_i = sum_e s_e x_e                  (C_in,)
    out_i = vec(Z_i) . W'  +  zb_i . B'    W' (H * C_in, R), B' (C_in, R)

One program owns a block of ``BN`` receivers. W' is walked through its block plan (:mod:`.blocks`): hidden units,
inputs and outputs are permuted so that its structural non-zeros fall into few 16 x 16 x 16 blocks, listed per
(hidden block, input block) pair. Every operand is read and written *in the plan's order*, so that each block access
is contiguous rows (whole 32-byte sectors): h and d hs as (E, HC), x as (N, CINC) and d x as (E, CINC), dout and out
as (n_dst, RC) with columns permuted and padded to 16, W' as its compact blocks (NB, HB * CB, RB) and B' as (CINC,
RC), packed once per step; the host applies the permutations once per step at the trunk's boundary (:mod:`.launch`).
For each pair, Z's (``HB`` hidden x ``CB`` input) block is formed as a dot batched over the block's receivers (their
edges padded to one chunk of ``KP``; the pairs of a hidden block are consecutive, and its hs block is read once for
them) and contracted at once with each of the pair's non-zero W' blocks for all ``BN`` receivers (per block, HB
dots (BN, CB) x (CB, RB) batched over its hidden rows and summed: the K of HB * CB split across the warps), so W' is
read once per receiver block, and only its non-zero blocks (6% of them at config H). A program's "receivers" are
receiver *segments* of at most ``KP`` edges (:func:`split_receivers_kernel`, once per graph), so that a segment's
edges are one chunk of the per-edge dots: a hub's edges are spread over several programs instead of serialising its
block, and the forward adds a receiver's segments in order (:func:`segment_sum_kernel`).
Everything is blocked by 16 (the smallest ``tl.dot``). Given the last hidden activation *before* its batch norm (the
statistics pass's, in training), the forward applies that batch norm as it reads h (``AFF``: a factor and a shift per
hidden column in the plan's order, read once per column block), so that no pass over (E, H) is added.

The backward has three kernels:

* :func:`contract_dhs_kernel`, per receiver block: dZ_i = dout_i . W'^T one block at a time, then per edge
  ``d hs_e = dZ_i x_e`` (batched dots) summed in registers over a hidden block's pairs and stored once, and the bias
  term's ``d s_e``; it needs neither hs nor s, so it runs first and the trunk's backward (which recomputes h anyway)
  writes hs and s for the next two;
* :func:`contract_dx_kernel`, per receiver block: dZ again (cheap next to the trunk it saves recomputing) and
  ``d x_e = dZ_i^T hs_e + s_e d zb_i``, the pairs walked input block outer (the plan's ``cperm``) so that an input
  block's sum is stored once;
* :func:`contract_wgrad_kernel`, per non-zero block of W' (and per input block for B') and per split of the
  receivers: dW' = sum_i vec(Z_i) (x) dout_i with Z recomputed, summed in registers and stored once; each program
  owns its block of one split's partial sum, so no two programs write the same memory (deterministic; the host adds
  the splits in a fixed order).

Accumulators wider than a register tile (the output's R columns, the bias term's additions to d s and d x) are
read-modify-written in memory that only the owning program touches; where two loops of a kernel (the pairs', the bias
term's) write the same elements with different register layouts, a CTA barrier separates them.
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
def _segments(vptr_ptr, rid_ptr, blk, n_v, n_dst, BN: tl.constexpr):
    """Segments of block ``blk`` (:func:`split_receivers_kernel`): their own ids (BN,), their receivers' ids, validity,
    first edge and length, max length."""
    v, vmask, start, deg, nmax = _receivers(vptr_ptr, blk, n_v, BN)
    r = tl.load(rid_ptr + v, mask=vmask, other=0)  # int32 (fewer live registers); widened where it is an offset
    return v, r, vmask & (r < n_dst), start, deg, nmax


@triton.jit
def _live(imask):
    """1 when the block has a receiver segment, 0 for a block of the unused tail (its loops then run no dot)."""
    return tl.max(imask.to(tl.int32), 0)


@triton.jit(do_not_specialize=["n_dst", "n_v", "E"])
def split_receivers_kernel(
    rowptr_ptr, vptr_ptr, rid_ptr, segptr_ptr, n_dst, n_v, E, SEG: tl.constexpr, BV: tl.constexpr
):
    """Every receiver's in-edges cut into *segments* of at most SEG consecutive edges (a receiver without edges: one
    empty segment), so that a hub is spread over many programs instead of serialising its block: ``vptr`` (n_v + 1,)
    the segments' CSR, ``rid`` (n_v,) each segment's receiver, ``segptr`` (n_dst + 1,) each receiver's range of
    segments. n_v >= the segment count (the host's bound n_dst + E // SEG); the unused tail is empty segments of
    receiver n_dst (masked by the kernels). One program, receivers in blocks of BV (a running offset)."""
    total = (n_dst * 0).to(tl.int64)
    for b0 in range(0, n_dst, BV):
        r = b0 + tl.arange(0, BV)
        m = r < n_dst
        st = tl.load(rowptr_ptr + r, mask=m, other=0).to(tl.int64)
        en = tl.load(rowptr_ptr + r + 1, mask=m, other=0).to(tl.int64)
        nseg = tl.where(m, tl.maximum((en - st + SEG - 1) // SEG, 1), 0)
        off = total + tl.cumsum(nseg, 0) - nseg
        tl.store(segptr_ptr + r, off, mask=m)
        for j in range(0, tl.max(nseg, 0)):
            mj = m & (j < nseg)
            tl.store(vptr_ptr + off + j, st + j * SEG, mask=mj)
            tl.store(rid_ptr + off + j, r, mask=mj)
        total += tl.sum(nseg, 0)
    tl.store(segptr_ptr + n_dst, total)
    for v0 in range(total, n_v + 1, BV):
        v = v0 + tl.arange(0, BV)
        tl.store(vptr_ptr + v, tl.zeros((BV,), dtype=tl.int64) + E, mask=v <= n_v)
        tl.store(rid_ptr + v, tl.zeros((BV,), dtype=tl.int64) + n_dst, mask=v < n_v)


@triton.jit(do_not_specialize=["n_dst", "R", "RC"])
def segment_sum_kernel(part_ptr, segptr_ptr, permr_ptr, out_ptr, n_dst, R, RC, BN: tl.constexpr, RB: tl.constexpr):
    """out[i] = sum over receiver i's segments (in order) of part's rows (n_v, RC): the forward's per-segment outputs
    added per receiver (deterministic), each row put back in the outputs' own order as it is stored (``out`` (n_dst,
    R), column perm_r[k] (``permr_ptr``) from the plan's column k < R). Program: a block of BN receivers, whole rows
    (RB >= RC), so that the permuted stores still fill whole sectors."""
    i = tl.program_id(0) * BN + tl.arange(0, BN)
    col = tl.arange(0, RB)
    cm = col < R
    m = i < n_dst
    s0 = tl.load(segptr_ptr + i, mask=m, other=0).to(tl.int64)
    n = tl.load(segptr_ptr + i + 1, mask=m, other=0).to(tl.int64) - s0
    acc = tl.zeros((BN, RB), dtype=part_ptr.dtype.element_ty)
    for j in range(0, tl.max(n, 0)):
        mj = m & (j < n)
        acc += tl.load(part_ptr + (s0 + j)[:, None] * RC + col[None, :], mask=mj[:, None] & cm[None, :], other=0.0)
    dst = tl.load(permr_ptr + col, mask=cm, other=0)
    tl.store(out_ptr + i.to(tl.int64)[:, None] * R + dst[None, :], acc, mask=m[:, None] & cm[None, :])


@triton.jit
def _edges(start, deg, t0, KP: tl.constexpr):
    """Edge ids (BN, KP) of chunk ``t0`` of each receiver's edges and their validity."""
    k = t0 + tl.arange(0, KP)
    emask = k[None, :] < deg[:, None]
    return start[:, None] + k[None, :], emask


@triton.jit
def _span(b, n, NB: tl.constexpr):
    """Positions b .. b + NB of a permuted dimension of true size n (padded to a multiple of NB), and their
    validity."""
    k = b + tl.arange(0, NB)
    return k, k < n


@triton.jit
def _load_hs(h_ptr, s_ptr, e, emask, hcol, hval, HC, f=None, t=None, AFF: tl.constexpr = False):
    """hs = s h (BN, KP, HB): hidden columns ``hcol`` (plan order) of the chunk's edges (h (E, HC), s (E,)); with AFF,
    hs = s (h f + t), f and t (HB,) the batch norm's factor and shift of those columns."""
    h = tl.load(
        h_ptr + e[:, :, None] * HC + hcol[None, None, :], mask=emask[:, :, None] & hval[None, None, :], other=0.0
    )
    if AFF:
        h = h * f[None, None, :] + t[None, None, :]
    return h * tl.load(s_ptr + e, mask=emask, other=0.0)[:, :, None]


@triton.jit
def _load_x(x_ptr, src_ptr, e, emask, ccol, cval, CINC):
    """Gathered source features (BN, KP, CB): input columns ``ccol`` (plan order) of the chunk's edges (x (N,
    CINC))."""
    sr = tl.load(src_ptr + e, mask=emask, other=0).to(tl.int64)
    return tl.load(
        x_ptr + sr[:, :, None] * CINC + ccol[None, None, :], mask=emask[:, :, None] & cval[None, None, :], other=0.0
    )


@triton.jit
def _hs_block(h_ptr, s_ptr, e, emask, hcol, hval, HC, bnf_ptr, bns_ptr, permh_ptr, bnk, AFF: tl.constexpr):
    """hs (BN, KP, HB) of the chunk's edges on hidden columns ``hcol``. With AFF, h holds the last hidden activation
    *before* its batch norm, which is applied here as it is read: hidden column k (plan order) is hidden unit u =
    perm_h[k] (``permh_ptr``), ``h_k f[u // bnk] + t[u]`` (``bnf_ptr`` the factor per batch-norm channel of ``bnk``
    units, ``bns_ptr`` (H,) the shift per unit, in their own order)."""
    if AFF:
        u = tl.load(permh_ptr + hcol).to(tl.int64)  # (perm_h is padded to HC: every hcol is inside it)
        f = tl.load(bnf_ptr + u // bnk, mask=hval, other=0.0).to(h_ptr.dtype.element_ty)
        t = tl.load(bns_ptr + u, mask=hval, other=0.0).to(h_ptr.dtype.element_ty)
        return _load_hs(h_ptr, s_ptr, e, emask, hcol, hval, HC, f, t, True)
    return _load_hs(h_ptr, s_ptr, e, emask, hcol, hval, HC)


@triton.jit
def _first(pairs_ptr, p):
    """Whether pair ``p`` of the plan is the first of its hidden block."""
    return tl.load(pairs_ptr + 2 * p - 2, mask=p > 0, other=-1) != tl.load(pairs_ptr + 2 * p)


@triton.jit
def _pair(pairs_ptr, pair_ptr, p, H, CIN, HB: tl.constexpr, CB: tl.constexpr):
    """Pair ``p`` of the plan: its hidden and input positions with validity, and its range of W' blocks."""
    hcol, hval = _span(tl.load(pairs_ptr + 2 * p), H, HB)
    ccol, cval = _span(tl.load(pairs_ptr + 2 * p + 1), CIN, CB)
    return hcol, hval, ccol, cval, tl.load(pair_ptr + p), tl.load(pair_ptr + p + 1)


@triton.jit
def _last(pairs_ptr, order_ptr, k, n_pairs, SIDE: tl.constexpr, ORDERED: tl.constexpr):
    """Whether the k-th pair of the walk (the plan's order, or ``order_ptr``'s with ORDERED) is the last of its hidden
    block (SIDE 0) or input block (SIDE 1)."""
    end = k + 1 >= n_pairs
    a = k
    b = k + 1
    if ORDERED:
        a = tl.load(order_ptr + k)
        b = tl.load(order_ptr + k + 1, mask=k + 1 < n_pairs, other=0)
    nxt = tl.load(pairs_ptr + 2 * b + SIDE, mask=k + 1 < n_pairs, other=-1)
    return end | (nxt != tl.load(pairs_ptr + 2 * a + SIDE))


@triton.jit
def _w_block(wp_ptr, q, HB: tl.constexpr, CB: tl.constexpr, RB: tl.constexpr):
    """Block ``q`` (HB * CB, RB) of W' packed in the plan's order (``wp_ptr`` (NB, HB * CB, RB), zero outside the
    structure; NB HB CB RB < 2^31, checked by the host): one contiguous 16 KB read."""
    rows = tl.arange(0, HB * CB)
    return tl.load(wp_ptr + q * (HB * CB * RB) + rows[:, None] * RB + tl.arange(0, RB)[None, :])


@triton.jit
def _w_block3(wp_ptr, q, HB: tl.constexpr, CB: tl.constexpr, RB: tl.constexpr):
    """:func:`_w_block` as (HB, CB, RB): one (CB, RB) slice per hidden row of the block."""
    h = tl.arange(0, HB)[:, None, None]
    c = tl.arange(0, CB)[None, :, None]
    r = tl.arange(0, RB)[None, None, :]
    return tl.load(wp_ptr + q * (HB * CB * RB) + (h * CB + c) * RB + r)


@triton.jit
def _b_block(bp_ptr, cb, rb, RC, CB: tl.constexpr, RB: tl.constexpr):
    """B' (CB, RB) at permuted input positions cb.. and output positions rb.. (``bp_ptr`` (CINC, RC), B' packed in
    the plan's order, zero padding)."""
    c = cb + tl.arange(0, CB)
    return tl.load(bp_ptr + c[:, None] * RC + (rb + tl.arange(0, RB))[None, :])


@triton.jit
def _rmw(ptr, offs, value, mask):
    """Read-modify-write of memory that only this program touches."""
    old = tl.load(ptr + offs, mask=mask, other=0.0)
    tl.store(ptr + offs, old + value.to(old.dtype), mask=mask)


@triton.jit
def _zb(
    s_ptr, x_ptr, src_ptr, start, deg, nmax, ccol, cval, CINC, BN: tl.constexpr, KP: tl.constexpr, CB: tl.constexpr,
    dt,
):  # fmt: skip
    """The bias term's zb = sum_e s_e x_e (BN, CB) on input columns ``ccol``."""
    zb = tl.zeros((BN, CB), dtype=dt)
    for t0 in range(0, nmax, KP):
        e, emask = _edges(start, deg, t0, KP)
        s = tl.load(s_ptr + e, mask=emask, other=0.0)
        zb += tl.sum(s[:, :, None] * _load_x(x_ptr, src_ptr, e, emask, ccol, cval, CINC), 1)
    return zb


@triton.jit
def _load_g(g_ptr, i, imask, rb, R, RC, RB: tl.constexpr, dt):
    """dout (BN, RB) of the receivers on output positions rb .. rb + RB (``g_ptr`` (n_dst, RC), plan order)."""
    r, rval = _span(rb, R, RB)
    g = tl.load(g_ptr + i.to(tl.int64)[:, None] * RC + r[None, :], mask=imask[:, None] & rval[None, :], other=0.0)
    return g.to(dt)


@triton.jit(do_not_specialize=["bnk", "n_v", "n_dst", "n_pairs", "H", "CIN", "HC", "CINC", "R", "RC"])
def contract_forward_kernel(
    h_ptr,
    s_ptr,
    x_ptr,
    src_ptr,
    rowptr_ptr,
    rid_ptr,
    wp_ptr,
    bp_ptr,
    out_ptr,
    pairs_ptr,
    pair_ptr,
    blk_r,
    bnf_ptr,
    bns_ptr,
    permh_ptr,
    bnk,
    n_v,
    n_dst,
    n_pairs,
    H,
    CIN,
    HC,
    CINC,
    R,
    RC,
    BN: tl.constexpr,
    KP: tl.constexpr,
    HB: tl.constexpr,
    CB: tl.constexpr,
    RB: tl.constexpr,
    PREC: tl.constexpr,
    AFF: tl.constexpr,
):
    """out (n_v, RC) per receiver *segment* (:func:`split_receivers_kernel`; ``rowptr`` the segments' CSR, ``rid``
    their receivers) in the plan's output order (every row of a segment written: any values on entry); h (E, HC) the
    last hidden layer's output in the plan's hidden order (with AFF its activation before its batch norm, ``bnf`` per
    channel of ``bnk`` units and ``bns`` (H,) per unit in their own order, ``permh`` the plan's hidden order, applied
    as it is read: :func:`_hs_block`), s (E,) the radial shell, x (N, CINC); W' and B' packed (wp, bp)."""
    v, i, imask, start, deg, nmax = _segments(rowptr_ptr, rid_ptr, tl.program_id(0), n_v, n_dst, BN)
    live = _live(imask)
    orow = v[:, None] * RC + tl.arange(0, RB)[None, :]
    # the bias term first: zb = sum_e s_e x_e per receiver, times B'; its first input block stores every column of
    # the block's segments (out need not be zeroed), the later ones add
    for cb in range(0, CINC * live, CB):
        ccol, cval = _span(cb, CIN, CB)
        zb = _zb(s_ptr, x_ptr, src_ptr, start, deg, nmax, ccol, cval, CINC, BN, KP, CB, h_ptr.dtype.element_ty)
        for rb in range(0, RC, RB):
            o = _mm(zb, _b_block(bp_ptr, cb, rb, RC, CB, RB), PREC)
            old = tl.load(out_ptr + orow + rb, mask=imask[:, None] & (cb > 0), other=0.0)
            tl.store(out_ptr + orow + rb, old + o.to(old.dtype), mask=imask[:, None])
    tl.debug_barrier()  # the pairs' loop read-modify-writes the same elements in another register layout
    # a segment's edges are one chunk: the hs block of a hidden block is read once and kept over its pairs
    # (consecutive in the plan)
    e, emask = _edges(start, deg, 0, KP)
    a = tl.zeros((BN, HB, KP), dtype=h_ptr.dtype.element_ty)
    for p in range(0, n_pairs * live):
        hcol, hval, ccol, cval, q0, q1 = _pair(pairs_ptr, pair_ptr, p, H, CIN, HB, CB)
        if _first(pairs_ptr, p):
            a = tl.permute(
                _hs_block(h_ptr, s_ptr, e, emask, hcol, hval, HC, bnf_ptr, bns_ptr, permh_ptr, bnk, AFF), (0, 2, 1)
            )
        z = _mm(a, _load_x(x_ptr, src_ptr, e, emask, ccol, cval, CINC), PREC)  # Z (BN, HB, CB)
        zh = tl.permute(z, (1, 0, 2))  # (HB, BN, CB)
        for q in range(q0, q1):
            # out += vec(Z) . W' as HB dots of (BN, CB) x (CB, RB), one per hidden row, then summed: the dot's K of
            # HB * CB split across the warps (a (BN, HB * CB) operand whole in every warp would spill, 3xTF32's split
            # halves doubling it)
            o = tl.sum(_mm(zh, _w_block3(wp_ptr, q, HB, CB, RB), PREC), 0)
            _rmw(out_ptr, orow + tl.load(blk_r + q), o, imask[:, None])


@triton.jit
def _dz_block(
    g_ptr,
    wp_ptr,
    blk_r,
    i,
    imask,
    q0,
    q1,
    R,
    RC,
    BN: tl.constexpr,
    HB: tl.constexpr,
    CB: tl.constexpr,
    RB: tl.constexpr,
    PREC: tl.constexpr,
):
    """dZ block (BN, HB, CB) = dout . W'^T over the pair's W' blocks q0 .. q1."""
    dt = wp_ptr.dtype.element_ty
    dz = tl.zeros((BN, HB * CB), dtype=dt)
    for q in range(q0, q1):
        g = _load_g(g_ptr, i, imask, tl.load(blk_r + q), R, RC, RB, dt)
        dz += _mm(g, tl.trans(_w_block(wp_ptr, q, HB, CB, RB)), PREC)
    return tl.reshape(dz, (BN, HB, CB))


@triton.jit
def _dzb_block(
    g_ptr,
    bp_ptr,
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
    dt = bp_ptr.dtype.element_ty
    dzb = tl.zeros((BN, CB), dtype=dt)
    for rb in range(0, RC, RB):
        g = _load_g(g_ptr, i, imask, rb, R, RC, RB, dt)
        dzb += _mm(g, tl.trans(_b_block(bp_ptr, cb, rb, RC, CB, RB)), PREC)
    return dzb


@triton.jit(do_not_specialize=["n_v", "n_dst", "n_pairs", "H", "CIN", "HC", "CINC", "R", "RC"])
def contract_dhs_kernel(
    g_ptr,
    x_ptr,
    src_ptr,
    rowptr_ptr,
    rid_ptr,
    wp_ptr,
    bp_ptr,
    dhs_ptr,
    ds_ptr,
    pairs_ptr,
    pair_ptr,
    blk_r,
    n_v,
    n_dst,
    n_pairs,
    H,
    CIN,
    HC,
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
    """Given dout (n_dst, RC) in the plan's order: d hs_e = dZ_i x_e (E, HC, plan order) and the bias term's d s_e =
    d zb_i . x_e (E,), zero on entry. Needs neither hs nor s: it runs before the trunk's backward, which recomputes
    hs. A segment's edges are one chunk (KP >= the segment length), so the pairs of a hidden block (consecutive in
    the plan) add into one register tile, stored once per hidden block: d hs is written, never read."""
    _, i, imask, start, deg, nmax = _segments(rowptr_ptr, rid_ptr, tl.program_id(0), n_v, n_dst, BN)
    live = _live(imask)
    e, emask = _edges(start, deg, 0, KP)
    acc = tl.zeros((BN, KP, HB), dtype=wp_ptr.dtype.element_ty)
    for p in range(0, n_pairs * live):
        hcol, hval, ccol, cval, q0, q1 = _pair(pairs_ptr, pair_ptr, p, H, CIN, HB, CB)
        dzt = tl.permute(_dz_block(g_ptr, wp_ptr, blk_r, i, imask, q0, q1, R, RC, BN, HB, CB, RB, PREC), (0, 2, 1))
        acc += _mm(_load_x(x_ptr, src_ptr, e, emask, ccol, cval, CINC), dzt, PREC)
        if _last(pairs_ptr, pairs_ptr, p, n_pairs, 0, False):  # the hidden block's last pair
            dst = e[:, :, None] * HC + hcol[None, None, :]
            tl.store(dhs_ptr + dst, acc.to(dhs_ptr.dtype.element_ty), mask=emask[:, :, None] & hval[None, None, :])
            acc = tl.zeros((BN, KP, HB), dtype=wp_ptr.dtype.element_ty)
    for cb in range(0, CINC * live, CB):
        ccol, cval = _span(cb, CIN, CB)
        dzb = _dzb_block(g_ptr, bp_ptr, i, imask, cb, R, RC, BN, CB, RB, PREC)
        xt = _load_x(x_ptr, src_ptr, e, emask, ccol, cval, CINC)
        _rmw(ds_ptr, e, tl.sum(xt * dzb[:, None, :], 2), emask)


@triton.jit(do_not_specialize=["n_v", "n_dst", "n_pairs", "H", "CIN", "HC", "CINC", "R", "RC"])
def contract_dx_kernel(
    g_ptr,
    h_ptr,
    s_ptr,
    rowptr_ptr,
    rid_ptr,
    wp_ptr,
    bp_ptr,
    dxe_ptr,
    pairs_ptr,
    pair_ptr,
    blk_r,
    cperm_ptr,
    n_v,
    n_dst,
    n_pairs,
    H,
    CIN,
    HC,
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
    """Given dout (n_dst, RC) and h (E, HC) in the plan's order: the gradient of each edge's gathered source
    features, d x_e = dZ_i^T hs_e + s_e d zb_i (E, CINC, plan order), zero on entry (the host adds it into the
    sources). The pairs are walked input block outer (``cperm``), so that an input block's pairs add into one register
    tile (a segment's edges are one chunk), stored once per input block; the bias term then adds to every block.
    Padding input columns (k >= CIN, inside the padded rows) are written by the bias term, unmasked: d zb is zero
    there (B' is packed with zero padding), and the host drops them (fewer live masks)."""
    _, i, imask, start, deg, nmax = _segments(rowptr_ptr, rid_ptr, tl.program_id(0), n_v, n_dst, BN)
    live = _live(imask)
    e, emask = _edges(start, deg, 0, KP)
    acc = tl.zeros((BN, KP, CB), dtype=wp_ptr.dtype.element_ty)
    for pc in range(0, n_pairs * live):
        p = tl.load(cperm_ptr + pc)
        hcol, hval, ccol, cval, q0, q1 = _pair(pairs_ptr, pair_ptr, p, H, CIN, HB, CB)
        dz = _dz_block(g_ptr, wp_ptr, blk_r, i, imask, q0, q1, R, RC, BN, HB, CB, RB, PREC)
        acc += _mm(_load_hs(h_ptr, s_ptr, e, emask, hcol, hval, HC), dz, PREC)
        if _last(pairs_ptr, cperm_ptr, pc, n_pairs, 1, True):  # the input block's last pair
            dst = e[:, :, None] * CINC + ccol[None, None, :]
            tl.store(dxe_ptr + dst, acc.to(dxe_ptr.dtype.element_ty), mask=emask[:, :, None] & cval[None, None, :])
            acc = tl.zeros((BN, KP, CB), dtype=wp_ptr.dtype.element_ty)
    tl.debug_barrier()  # the bias loop read-modify-writes the same elements in another register layout
    s = tl.load(s_ptr + e, mask=emask, other=0.0)
    for cb in range(0, CINC * live, CB):
        ccol, cval = _span(cb, CIN, CB)
        dzb = _dzb_block(g_ptr, bp_ptr, i, imask, cb, R, RC, BN, CB, RB, PREC)
        _rmw(dxe_ptr, e[:, :, None] * CINC + ccol[None, None, :], s[:, :, None] * dzb[:, None, :], emask[:, :, None])


@triton.jit(do_not_specialize=["n_v", "n_dst", "n_blocks", "n_w", "NB", "H", "CIN", "HC", "CINC", "R", "RC"])
def contract_wgrad_kernel(
    g_ptr,
    h_ptr,
    s_ptr,
    x_ptr,
    src_ptr,
    rowptr_ptr,
    rid_ptr,
    dwc_ptr,
    dbf_ptr,
    pairs_ptr,
    pair_ptr,
    blk_r,
    blk_p,
    n_v,
    n_dst,
    n_blocks,
    n_w,
    NB,
    H,
    CIN,
    HC,
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
    """Partial sums over one split (axis 1) of the segment blocks: program q < n_w (axis 0) owns W' block q of dW'
    (NSPLIT, NB, HB * CB, RB), summed in registers over the split's blocks and stored once (Z of its pair recomputed
    per block: dW'_q = sum_i vec(Z_i) (x) dout_i, chunk by chunk); program n_w + j owns input block j of dB' (NSPLIT,
    CINC, RC) (x @ B layout, permuted), zero on entry. Operands in the plan's order, as :func:`contract_dx_kernel`'s."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    nsplit = tl.num_programs(1)
    dt = h_ptr.dtype.element_ty
    if pid < n_w:
        hcol, hval, ccol, cval, q0, q1 = _pair(pairs_ptr, pair_ptr, tl.load(blk_p + pid), H, CIN, HB, CB)
        rb = tl.load(blk_r + pid)
        acc = tl.zeros((HB * CB, RB), dtype=dt)
        for blk in range(split, n_blocks, nsplit):
            v, i, imask, start, deg, nmax = _segments(rowptr_ptr, rid_ptr, blk, n_v, n_dst, BN)
            g = _load_g(g_ptr, i, imask, rb, R, RC, RB, dt)
            for t0 in range(0, nmax, KP):  # (Z is linear in the chunks: each chunk's part times dout)
                e, emask = _edges(start, deg, t0, KP)
                a = _load_hs(h_ptr, s_ptr, e, emask, hcol, hval, HC)
                z = _mm(tl.permute(a, (0, 2, 1)), _load_x(x_ptr, src_ptr, e, emask, ccol, cval, CINC), PREC)
                acc += _mm(tl.trans(tl.reshape(z, (BN, HB * CB))), g, PREC)
        rows = tl.arange(0, HB * CB)
        dst = (split.to(tl.int64) * NB + pid) * (HB * CB * RB) + rows[:, None] * RB + tl.arange(0, RB)[None, :]
        tl.store(dwc_ptr + dst, acc.to(dwc_ptr.dtype.element_ty))
    else:  # the bias weight's gradient for one input block: sum_i zb_i (x) dout_i
        cb = (pid - n_w) * CB
        ccol, cval = _span(cb, CIN, CB)
        dbf = dbf_ptr + split.to(tl.int64) * CINC * RC
        for blk in range(split, n_blocks, nsplit):
            _, i, imask, start, deg, nmax = _segments(rowptr_ptr, rid_ptr, blk, n_v, n_dst, BN)
            zbt = tl.trans(_zb(s_ptr, x_ptr, src_ptr, start, deg, nmax, ccol, cval, CINC, BN, KP, CB, dt))
            for rb in range(0, RC * _live(imask), RB):
                g = _load_g(g_ptr, i, imask, rb, R, RC, RB, dt)
                r = rb + tl.arange(0, RB)
                _rmw(dbf, ccol[:, None] * RC + r[None, :], _mm(zbt, g, PREC), ccol[:, None] >= 0)


@triton.jit(do_not_specialize=["n", "nsplit", "stride"])
def split_sum_kernel(part_ptr, src_ptr, out_ptr, n, nsplit, stride, BV: tl.constexpr):
    """out[v] = sum over splits s (in order) of part[s * stride + src[v]], for v < n: the W' (or B') gradient's
    partial sums added at its structural non-zeros (``src`` ascending positions in the packed blocks), contiguous in
    ``out`` for the host's one scatter back into W''s own layout (nsplit * stride < 2^31: the host's split count
    bounds it)."""
    v = tl.program_id(0) * BV + tl.arange(0, BV)
    m = v < n
    src = tl.load(src_ptr + v, mask=m, other=0)
    acc = tl.zeros((BV,), dtype=part_ptr.dtype.element_ty)
    for s in range(0, nsplit):
        acc += tl.load(part_ptr + s * stride + src, mask=m, other=0.0)
    tl.store(out_ptr + v, acc, mask=m)
