"""Trunk kernels of the fused Triton backend: the kernel MLP per tile of edges (the contraction with the source
features is :mod:`.contract`, per receiver block).

One program takes a tile of ``BE`` consecutive edges of the receiver-sorted edge list and evaluates the MLP on chip:
``a_0 = [d, attr]``, ``a_k = act(a_{k-1} W_k + b_k)``, where ``act`` is the Fourier ELU (per channel:
``ELU(y A^T) Ainv^T``, two small GEMMs on the (edge x channel, component) view of the tile) or a pointwise ELU,
followed by the layer's batch norm as an affine map ``h_k = a_k f_k + t_k`` (per channel factor, per component
shift, expanded per hidden unit by the host's packing and read once per program like the bias; ``BNM``: bit k set
where hidden layer k + 1 has a batch norm). The next Linear reads h_k. Kernels:

* :func:`trunk_forward_kernel`: the last hidden layer's output ``h`` (after its batch norm) in the compact hidden
  layout (E, H) that the contraction reads, and the radial shell ``s = norm exp(-coef |d|^2)``;
* :func:`fused_stats_kernel`: for batch norm in training mode, per-component mean and sum of squared deviations of
  one hidden layer's activations before its batch norm (per persistent program, merged with Chan's formula), the
  trunk recomputed up to that layer with the earlier batch norms applied (and, ``IAFF``, an affine map on the input);
  for the last layer it also writes the activation, which the forward's contraction then reads (applying the last
  batch norm itself) instead of evaluating the trunk again;
* :func:`trunk_backward_kernel`: from ``d hs`` (written by the contraction's backward), the gradients of the MLP
  input and of the trunk's parameters (the batch norms' factors and shifts included); parameter gradients are
  accumulated per program (a persistent grid, one accumulator row each): deterministic, the host adds the rows in a
  fixed order. It keeps no whole tile in registers: each layer's activations and gradients go through a small
  per-program scratch in global memory, a block at a time.

Every hidden GEMM works on blocks of ``GW`` hidden units (the host picks ``GW`` so that no operand exceeds 32 KB in
float32; on the tensor cores the statistics and backward kernels take wider blocks, ``launch.stats_blocks`` and
``launch.backward_blocks``: Triton lays all the warps of a chain of dots along M, so a Fourier GEMM needs 16 rows of
(edge x channel) per warp not to compute the same MMA on several warps). Register tiles cannot be sliced in
Triton: in the forward kernels a block is taken out of (and put back into) the (BE, NG, GW) view of a tile by a
masked sum (``_group``, ``_add_group``); the backward loads and stores blocks of its scratch instead.

Edge and tile counts are not specialised on (one compilation serves every graph size); edge offsets are int64. Shapes
are padded on the host to powers of two (at least 16, for ``tl.dot``): ``P0P`` the MLP input, ``CP x DP`` the hidden
layer (``CP`` channels of ``DP`` components, channel-major; ``CP = 1`` for a pointwise ELU), ``GP`` the Fourier grid.
``PREC`` is ``"ieee"``, ``"tf32"`` or ``"bf16"`` (bf16 operands, float32 accumulation; ``"bf16-emulated"`` the same
in the interpreter).
"""

import triton
import triton.language as tl


@triton.jit
def _mm(a, b, PREC: tl.constexpr):
    if PREC == "bf16":
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    elif PREC == "bf16-emulated":
        # the same arithmetic (a product of two bfloat16 numbers is exact in float32) for the Triton interpreter,
        # whose bfloat16 dot is broken (Triton 3.9)
        return tl.dot(a.to(tl.bfloat16).to(tl.float32), b.to(tl.bfloat16).to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _elu(u):
    return tl.where(u > 0, u, tl.exp(tl.minimum(u, 0.0)) - 1.0)


@triton.jit
def _elu_grad(u):
    return tl.where(u > 0, 1.0, tl.exp(tl.minimum(u, 0.0)))


@triton.jit
def _affine(a, f_ptr, s_ptr, N: tl.constexpr):
    """A batch norm with known statistics on a (BE, N) tile: a f + s, f and s (N,) per column (loaded once)."""
    n = tl.arange(0, N)
    f = tl.load(f_ptr + n).to(a.dtype)
    s = tl.load(s_ptr + n).to(a.dtype)
    return a * f[None, :] + s[None, :]


@triton.jit
def _group(v3, g, NG: tl.constexpr):
    """Group g (BE, GW) of a (BE, NG, GW) register tile: register tiles cannot be sliced, so a masked sum."""
    return tl.sum(tl.where((tl.arange(0, NG) == g)[None, :, None], v3, 0.0), 1)


@triton.jit
def _add_group(v3, blk, g, NG: tl.constexpr):
    """v3 with blk (BE, GW) added into group g."""
    return v3 + tl.where((tl.arange(0, NG) == g)[None, :, None], blk[:, None, :], 0.0)


@triton.jit
def _linear_in(inp, w_ptr, b_ptr, P0: tl.constexpr, P0P: tl.constexpr, HP: tl.constexpr, PREC: tl.constexpr):
    """The first Linear: the MLP input (BE, P0P) is narrow, so its weight (P0P, HP) is one GEMM operand (its P0 real
    rows read, the padding rows zero)."""
    k = tl.arange(0, P0P)
    n = tl.arange(0, HP)
    w = tl.load(w_ptr + k[:, None] * HP + n[None, :], mask=(k < P0)[:, None] & (n >= 0)[None, :], other=0.0)
    b = tl.load(b_ptr + n)
    return _mm(inp, w.to(inp.dtype), PREC) + b[None, :].to(inp.dtype)


@triton.jit
def _linear_hh(a, w_ptr, b_ptr, BE: tl.constexpr, HP: tl.constexpr, GW: tl.constexpr, PREC: tl.constexpr):
    """A hidden -> hidden Linear (weight (HP, HP) row-major as x @ W) in (GW x GW) blocks, so that no GEMM operand
    is larger than one block whatever the hidden width."""
    NG: tl.constexpr = HP // GW
    a3 = tl.reshape(a, (BE, NG, GW))
    k = tl.arange(0, GW)
    y3 = tl.zeros((BE, NG, GW), dtype=a.dtype)
    for gi in range(NG):
        ag = _group(a3, gi, NG)
        for go in range(NG):
            w = tl.load(w_ptr + (gi * GW + k)[:, None] * HP + (go * GW + k)[None, :]).to(a.dtype)
            y3 = _add_group(y3, _mm(ag, w, PREC), go, NG)
    b = tl.load(b_ptr + tl.arange(0, HP)).to(a.dtype)
    return tl.reshape(y3, (BE, HP)) + b[None, :]


@triton.jit
def _pad_k(x, F: tl.constexpr):
    """x (B, M, n) -> (B, M, n F) with x[..., c] at c F and zeros between (tl.dot needs K and N of 16 or more; a
    componentwise Linear of C < 16 channels is padded this way, not by widening the hidden layout)."""
    if F >= 2:
        x = tl.reshape(tl.join(x, tl.zeros_like(x)), (x.shape[0], x.shape[1], 2 * x.shape[2]))
    if F >= 4:
        x = tl.reshape(tl.join(x, tl.zeros_like(x)), (x.shape[0], x.shape[1], 2 * x.shape[2]))
    if F >= 8:
        x = tl.reshape(tl.join(x, tl.zeros_like(x)), (x.shape[0], x.shape[1], 2 * x.shape[2]))
    if F >= 16:
        x = tl.reshape(tl.join(x, tl.zeros_like(x)), (x.shape[0], x.shape[1], 2 * x.shape[2]))
    return x


@triton.jit
def _unpad_k(x, F: tl.constexpr):
    """Inverse of :func:`_pad_k`: (B, M, n F) -> (B, M, n), the columns at multiples of F."""
    if F >= 2:
        x, _ = tl.split(tl.reshape(x, (x.shape[0], x.shape[1], x.shape[2] // 2, 2)))
    if F >= 4:
        x, _ = tl.split(tl.reshape(x, (x.shape[0], x.shape[1], x.shape[2] // 2, 2)))
    if F >= 8:
        x, _ = tl.split(tl.reshape(x, (x.shape[0], x.shape[1], x.shape[2] // 2, 2)))
    if F >= 16:
        x, _ = tl.split(tl.reshape(x, (x.shape[0], x.shape[1], x.shape[2] // 2, 2)))
    return x


@triton.jit
def _by_component(a, BE: tl.constexpr, CP: tl.constexpr, DP: tl.constexpr, F: tl.constexpr):
    """(BE, CP * DP) channel-major -> (DP, BE, CP * F): the batched-dot view of a componentwise Linear."""
    return _pad_k(tl.permute(tl.reshape(a, (BE, CP, DP)), (2, 0, 1)), F)


@triton.jit
def _from_component(y, BE: tl.constexpr, CP: tl.constexpr, DP: tl.constexpr, F: tl.constexpr):
    """Inverse of :func:`_by_component`."""
    return tl.reshape(tl.permute(_unpad_k(y, F), (1, 2, 0)), (BE, CP * DP))


@triton.jit
def _load_cw(w_ptr, DP: tl.constexpr, KC: tl.constexpr, F: tl.constexpr):
    """A componentwise weight as the dots take it, (DP, KC, KC) with zeros between the real rows and columns (those at
    multiples of F), from its compact packing (DP, KC / F, KC / F) (:func:`_cw_weight`)."""
    offs, real = _cw_weight(0, DP, KC, F)
    return tl.load(w_ptr + offs, mask=real, other=0.0)


@triton.jit
def _linear_cw(
    a, w_ptr, b_ptr, BE: tl.constexpr, CP: tl.constexpr, DP: tl.constexpr, F: tl.constexpr, PREC: tl.constexpr
):
    """A componentwise hidden Linear (a hidden Linear through its block structure): component d of every
    output channel mixes component d of the input channels, one (CP F x CP F) block per component (weight
    (DP, CP F, CP F), x @ W layout, channel c at row/column c F): a dot batched over the components, CP^2 DP
    multiply-adds per edge (padded), against (CP DP)^2 for the dense Linear."""
    w = _load_cw(w_ptr, DP, CP * F, F).to(a.dtype)
    y = _from_component(_mm(_by_component(a, BE, CP, DP, F), w, PREC), BE, CP, DP, F)
    b = tl.load(b_ptr + tl.arange(0, CP * DP)).to(a.dtype)
    return y + b[None, :]


@triton.jit
def _linear_hidden(
    a,
    w_ptr,
    b_ptr,
    BE: tl.constexpr,
    CP: tl.constexpr,
    DP: tl.constexpr,
    GW: tl.constexpr,
    CWF: tl.constexpr,
    PREC: tl.constexpr,
):
    """Hidden Linear: componentwise when CWF > 0 (F = CWF), else dense in GW blocks."""
    if CWF > 0:
        return _linear_cw(a, w_ptr, b_ptr, BE, CP, DP, CWF, PREC)
    else:
        return _linear_hh(a, w_ptr, b_ptr, BE, CP * DP, GW, PREC)


@triton.jit
def _params(
    prm,
    fou,
    NL: tl.constexpr,
    P0P: tl.constexpr,
    CP: tl.constexpr,
    DP: tl.constexpr,
    GP: tl.constexpr,
    CWF: tl.constexpr,
):
    """Pointers to w1, b1, wh, bh, bf, bs, f0, s0 in the padded parameter buffer the host builds (launch.Packing),
    ``[w1 (P0P, HP) | b1 (HP,) | wh (NH, WS) | bh (NH, HP) | bf (NA, HP) | bs (NA, HP) | f0 (P0P,) | s0 (P0P,)]``
    (bf, bs: each hidden layer's batch-norm factor and shift per hidden unit; f0, s0: an affine map on the input), and
    to at, ait in its constant Fourier buffer ``[at (NA, DP, GP) | ait (NA, GP, DP)]``; NH = max(NL - 1, 1),
    NA = max(NL, 1)."""
    HP: tl.constexpr = CP * DP
    NH: tl.constexpr = max(NL - 1, 1)
    NA: tl.constexpr = max(NL, 1)
    b1 = prm + P0P * HP
    wh = b1 + HP
    bh = wh + NH * _wstride(CP, DP, CWF)
    bf = bh + NH * HP
    bs = bf + NA * HP
    f0 = bs + NA * HP
    return prm, b1, wh, bh, bf, bs, f0, f0 + P0P, fou, fou + NA * DP * GP


@triton.jit
def _wstride(CP: tl.constexpr, DP: tl.constexpr, CWF: tl.constexpr):
    """Elements of one hidden Linear's weight as the kernels read it."""
    if CWF > 0:  # (DP, CP, CP), compact (_cw_weight)
        return DP * CP * CP
    else:
        return CP * DP * CP * DP


@triton.jit
def _felu(y, at, ait, BE: tl.constexpr, G: tl.constexpr, DP: tl.constexpr, PREC: tl.constexpr):
    """Fourier ELU of a group of G channels (BE, G * DP): ELU(y A^T) Ainv^T per channel, on the (edge x channel,
    component) view."""
    u = _mm(tl.reshape(y, (BE * G, DP)), at, PREC)
    return tl.reshape(_mm(_elu(u), ait, PREC), (BE, G * DP))


@triton.jit
def _load_fourier(at_ptr, ait_ptr, DP: tl.constexpr, GP: tl.constexpr, dtype):
    d = tl.arange(0, DP)
    g = tl.arange(0, GP)
    at = tl.load(at_ptr + d[:, None] * GP + g[None, :]).to(dtype)
    ait = tl.load(ait_ptr + g[:, None] * DP + d[None, :]).to(dtype)
    return at, ait


@triton.jit
def _act(
    y,
    at_ptr,
    ait_ptr,
    BE: tl.constexpr,
    CP: tl.constexpr,
    DP: tl.constexpr,
    GP: tl.constexpr,
    GW: tl.constexpr,
    FOURIER: tl.constexpr,
    PREC: tl.constexpr,
):
    if FOURIER:
        HP: tl.constexpr = CP * DP
        NG: tl.constexpr = HP // GW
        y3 = tl.reshape(y, (BE, NG, GW))
        v3 = tl.zeros((BE, NG, GW), dtype=y.dtype)
        if PREC == "tf32x3":  # the grid in chunks (_act_blk): whole Fourier matrices split in three spill
            for g in range(NG):
                v3 = _add_group(v3, _act_blk(_group(y3, g, NG), at_ptr, ait_ptr, BE, GW, DP, GP, True, PREC), g, NG)
        else:
            at, ait = _load_fourier(at_ptr, ait_ptr, DP, GP, y.dtype)
            for g in range(NG):
                v3 = _add_group(v3, _felu(_group(y3, g, NG), at, ait, BE, GW // DP, DP, PREC), g, NG)
        return tl.reshape(v3, (BE, HP))
    else:
        return _elu(y)


@triton.jit
def _forward_to(
    inp,
    w1,
    b1,
    wh,
    bh,
    bf,
    bs,
    at,
    ait,
    K: tl.constexpr,
    P0: tl.constexpr,
    P0P: tl.constexpr,
    BE: tl.constexpr,
    CP: tl.constexpr,
    DP: tl.constexpr,
    GP: tl.constexpr,
    GW: tl.constexpr,
    FOURIER: tl.constexpr,
    PREC: tl.constexpr,
    CWF: tl.constexpr,
    BNM: tl.constexpr,
):
    """y_K, the pre-activation of layer K (1-based), recomputed from the MLP input (each layer before it followed by
    its batch norm where it has one)."""
    HP: tl.constexpr = CP * DP
    y = _linear_in(inp, w1, b1, P0, P0P, HP, PREC)
    for j in tl.static_range(1, K):  # layer j + 1 of the MLP
        a = _act(y, at + (j - 1) * DP * GP, ait + (j - 1) * GP * DP, BE, CP, DP, GP, GW, FOURIER, PREC)
        if (BNM >> (j - 1)) & 1:  # (constexpr arithmetic: a compile-time branch)
            a = _affine(a, bf + (j - 1) * HP, bs + (j - 1) * HP, HP)
        y = _linear_hidden(a, wh + (j - 1) * _wstride(CP, DP, CWF), bh + (j - 1) * HP, BE, CP, DP, GW, CWF, PREC)
    return y


@triton.jit
def _trunk(
    inp,
    w1,
    b1,
    wh,
    bh,
    bf,
    bs,
    at,
    ait,
    NL: tl.constexpr,
    P0: tl.constexpr,
    P0P: tl.constexpr,
    BE: tl.constexpr,
    CP: tl.constexpr,
    DP: tl.constexpr,
    GP: tl.constexpr,
    GW: tl.constexpr,
    FOURIER: tl.constexpr,
    PREC: tl.constexpr,
    CWF: tl.constexpr,
    BNM: tl.constexpr,
):
    """a_NL, the last hidden activation before its batch norm; the input itself without hidden layers."""
    if NL == 0:
        return inp
    else:
        y = _forward_to(inp, w1, b1, wh, bh, bf, bs, at, ait, NL, P0, P0P, BE, CP, DP, GP, GW, FOURIER, PREC, CWF, BNM)
        return _act(y, at + (NL - 1) * DP * GP, ait + (NL - 1) * GP * DP, BE, CP, DP, GP, GW, FOURIER, PREC)


@triton.jit
def _trunk_chain(
    a,
    wh,
    bh,
    bf,
    bs,
    at,
    ait,
    K: tl.constexpr,
    BE: tl.constexpr,
    CP: tl.constexpr,
    DP: tl.constexpr,
    GP: tl.constexpr,
    GW: tl.constexpr,
    FOURIER: tl.constexpr,
    PREC: tl.constexpr,
    CWF: tl.constexpr,
    BNM: tl.constexpr,
):
    """a_K from a_1 (BE, HP), the activation of layer 1 before its batch norm (a chained statistics pass: a_1 is the
    previous pass's activation; the trunk is not evaluated again up to it)."""
    HP: tl.constexpr = CP * DP
    for j in tl.static_range(1, K):  # layer j + 1 of the MLP
        if (BNM >> (j - 1)) & 1:
            a = _affine(a, bf + (j - 1) * HP, bs + (j - 1) * HP, HP)
        y = _linear_hidden(a, wh + (j - 1) * _wstride(CP, DP, CWF), bh + (j - 1) * HP, BE, CP, DP, GW, CWF, PREC)
        a = _act(y, at + j * DP * GP, ait + j * GP * DP, BE, CP, DP, GP, GW, FOURIER, PREC)
    return a


@triton.jit
def _tile_edges(t, BE: tl.constexpr):
    """Edge ids (BE,) of tile t, in int64 (no overflow past 2^31 edges or elements)."""
    return (t + tl.zeros((BE,), dtype=tl.int64)) * BE + tl.arange(0, BE)


@triton.jit
def _load_tile(
    inp_ptr, coef_ptr, norm, t, E, P0: tl.constexpr, P0P: tl.constexpr, NDIM: tl.constexpr, BE: tl.constexpr
):
    """Edge ids, validity mask, MLP input (BE, P0P) and radial factor s (BE,) of tile t (0 on padding lanes)."""
    offs = _tile_edges(t, BE)
    emask = offs < E
    p = tl.arange(0, P0P)
    inp = tl.load(inp_ptr + offs[:, None] * P0 + p[None, :], mask=emask[:, None] & (p < P0)[None, :], other=0.0)
    r2 = tl.sum(tl.where((p < NDIM)[None, :], inp * inp, 0.0), 1)
    coef = tl.load(coef_ptr).to(inp.dtype)
    s = tl.where(emask, tl.exp(-r2 * coef) * norm, 0.0)
    return offs, emask, inp, s, r2, coef


@triton.jit
def _accumulate(ptr, offsets, value, mask):
    """Read-modify-write of this program's own accumulator row (no other program touches it)."""
    old = tl.load(ptr + offsets, mask=mask, other=0.0)
    tl.store(ptr + offsets, old + value.to(old.dtype), mask=mask)


@triton.jit
def _compact_columns(HP: tl.constexpr, PD: tl.constexpr, C: tl.constexpr, D: tl.constexpr):
    """Column of each padded hidden unit (HP,) in the compact (C * D) layout, and whether it is a real unit."""
    j = tl.arange(0, HP)
    ch = j // PD
    d = j % PD
    return ch * D + d, (ch < C) & (d < D)


@triton.jit(do_not_specialize=["E"])
def trunk_forward_kernel(
    inp_ptr,
    prm_ptr,
    fou_ptr,
    coef_ptr,
    h_ptr,
    s_ptr,
    E,
    norm,
    P0: tl.constexpr,
    P0P: tl.constexpr,
    NDIM: tl.constexpr,
    NL: tl.constexpr,
    CP: tl.constexpr,
    DP: tl.constexpr,
    GP: tl.constexpr,
    GW: tl.constexpr,
    FOURIER: tl.constexpr,
    C: tl.constexpr,
    D: tl.constexpr,
    PD: tl.constexpr,
    BE: tl.constexpr,
    PREC: tl.constexpr,
    CWF: tl.constexpr,
    BNM: tl.constexpr,
):
    """The MLP trunk of a tile of BE edges: h (E, C * D), the last hidden layer's output after its batch norm in the
    compact layout (unit c * D + d), and the radial shell s (E,)."""
    HP: tl.constexpr = CP * DP
    t = tl.program_id(0)
    offs, emask, inp, s, _, _ = _load_tile(inp_ptr, coef_ptr, norm, t, E, P0, P0P, NDIM, BE)
    w1, b1, wh, bh, bf, bs, _f0, _s0, at, ait = _params(prm_ptr, fou_ptr, NL, P0P, CP, DP, GP, CWF)
    h = _trunk(inp, w1, b1, wh, bh, bf, bs, at, ait, NL, P0, P0P, BE, CP, DP, GP, GW, FOURIER, PREC, CWF, BNM)
    if NL > 0:
        if (BNM >> (NL - 1)) & 1:
            h = _affine(h, bf + (NL - 1) * HP, bs + (NL - 1) * HP, HP)
    col, real = _compact_columns(HP, PD, C, D)
    tl.store(h_ptr + offs[:, None] * (C * D) + col[None, :], h, mask=emask[:, None] & real[None, :])
    tl.store(s_ptr + offs, s, mask=emask)


@triton.jit(do_not_specialize=["E", "n_tiles"])
def fused_stats_kernel(
    inp_ptr,
    prm_ptr,
    fou_ptr,
    coef_ptr,
    out_ptr,
    act_ptr,
    E,
    n_tiles,
    K: tl.constexpr,
    P0: tl.constexpr,
    P0P: tl.constexpr,
    NDIM: tl.constexpr,
    CP: tl.constexpr,
    DP: tl.constexpr,
    GP: tl.constexpr,
    GW: tl.constexpr,
    FOURIER: tl.constexpr,
    BE: tl.constexpr,
    PREC: tl.constexpr,
    CWF: tl.constexpr,
    C: tl.constexpr,
    D: tl.constexpr,
    PD: tl.constexpr,
    WRITE: tl.constexpr,
    BNM: tl.constexpr,
    IAFF: tl.constexpr,
    CHAIN: tl.constexpr,
):
    """Per program: (count, mean (HP), M2 (HP)) of layer K's activation over its tiles -> out (NPROG, 1 + 2 HP); with
    WRITE also the activation itself, act (E, C * D) in the compact layout. With CHAIN (a chained statistics pass)
    ``inp_ptr`` is a previous pass's activation (E, C * D), compact, taken as layer 1's activation of the packing
    (whose first Linear is then not read): its batch norm, and layers 2 .. K, run from it (:func:`_trunk_chain`).

    The running moments live in the program's own output row (zeros at the start) and are merged block by block of
    GW columns (Chan et al.'s pairwise formula), so that only one block's statistics are in registers at a time."""
    HP: tl.constexpr = CP * DP
    NG: tl.constexpr = HP // GW
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    kk = tl.arange(0, GW)
    dt = inp_ptr.dtype.element_ty
    row = out_ptr + pid * (1 + 2 * HP)
    w1, b1, wh, bh, bf, bs, f0, s0, at, ait = _params(prm_ptr, fou_ptr, K, P0P, CP, DP, GP, CWF)
    n_a = tl.sum(tl.zeros((BE,), dtype=dt), 0)
    for t in range(pid, n_tiles, nprog):
        if CHAIN:  # the previous pass's activation (E, C * D), compact, as layer 1's of this packing
            offs = _tile_edges(t, BE)
            emask = offs < E
            col, real = _compact_columns(HP, PD, C, D)
            a1 = tl.load(
                inp_ptr + offs[:, None] * (C * D) + col[None, :], mask=emask[:, None] & real[None, :], other=0.0
            )
            a = _trunk_chain(a1, wh, bh, bf, bs, at, ait, K, BE, CP, DP, GP, GW, FOURIER, PREC, CWF, BNM)
        else:
            offs, emask, inp, _, _, _ = _load_tile(inp_ptr, coef_ptr, 1.0, t, E, P0, P0P, NDIM, BE)
            if IAFF:  # an affine map on the MLP input
                inp = _affine(inp, f0, s0, P0P)
            a = _trunk(inp, w1, b1, wh, bh, bf, bs, at, ait, K, P0, P0P, BE, CP, DP, GP, GW, FOURIER, PREC, CWF, BNM)
        if WRITE:
            col, real = _compact_columns(HP, PD, C, D)
            tl.store(act_ptr + offs[:, None] * (C * D) + col[None, :], a, mask=emask[:, None] & real[None, :])
        a3 = tl.reshape(a, (BE, NG, GW))
        n_b = tl.sum(emask.to(dt), 0)
        n = n_a + n_b
        for g in range(NG):
            ag = _group(a3, g, NG)
            mean_b = tl.sum(tl.where(emask[:, None], ag, 0.0), 0) / n_b
            dev = tl.where(emask[:, None], ag - mean_b[None, :], 0.0)
            m2_b = tl.sum(dev * dev, 0)
            cols = 1 + g * GW + kk
            mean = tl.load(row + cols)
            m2 = tl.load(row + HP + cols)
            delta = mean_b - mean
            tl.store(row + cols, mean + delta * (n_b / n))
            tl.store(row + HP + cols, m2 + m2_b + delta * delta * (n_a * n_b / n))
        n_a = n
    tl.store(row, n_a)


# ----------------------------------------------------------------------------------------------------------------
# the trunk's backward: block by block through a per-program scratch
# ----------------------------------------------------------------------------------------------------------------
# A (BE, HP) register tile of the widest trunks (16 x 1,024 floats at H) is as large as a program's whole register
# file, and the backward needs several (activations and gradients of two layers): kept in registers they spill to
# local memory on sm_90. So the backward keeps none: every layer's activation lives in the program's own
# scratch, NL tiles of (BE, HP) in global memory (``scr``: slots 0 .. NL-2 hold a_1 .. a_{NL-1}, then their
# gradients; slot NL-1 the pre-activation y_k of the layer at hand, then its gradient), written and read back a block
# at a time (a few KB, from L1/L2). A stage reads what the previous one wrote, possibly from other threads:
# ``tl.debug_barrier()`` (a CTA barrier, which also orders the CTA's global memory accesses) sits between them, and
# between a block's loads and its stores in place. The Fourier matrices (DP, GP) are half a tile at H themselves:
# the Fourier ELU's GEMMs run on chunks of the grid (the same multiply-adds, in K / N pieces), the componentwise
# Linear on chunks of components. benchmarks/compile_check.py reports what stack remains per thread (compile records).
CW_CHUNK = tl.constexpr(1024)  # elements of one operand block of the componentwise Linear (DC components at a time)
CW_CHUNK_TF32 = tl.constexpr(2048)  # ... in TF32 where the stack allows (8 components at M and, with the tape, at H:
# whole 32-byte sectors of the scratch; trunk_backward_kernel's CWC)
FOURIER_CHUNK = tl.constexpr(32)  # grid points of the Fourier ELU at a time, ...
FOURIER_CHUNK_ELEMENTS = tl.constexpr(1024)  # ... in TF32 at most this many elements of a Fourier matrix (16 points at
# D = 64, config H: at 32 the trunk backward's 32-row blocks on 2 warps spill, 424 B of stack with the tape and 632 B
# without under Triton 3.6; the other precisions' blocks are the layout's, whose stack allows 32 points)
FOURIER_CHUNK_X3 = tl.constexpr(16)  # ... in 3xTF32, whose split operands are three times as many registers (at 32 the
# trunk backward spills without its tape: 816 B of stack at config M under Triton 3.6, 624 B under 3.9)


@triton.jit
def _blk(g, BE: tl.constexpr, HP: tl.constexpr, GW: tl.constexpr):
    """Offsets (BE, GW) of hidden block g in a (BE, HP) scratch tile."""
    return tl.arange(0, BE)[:, None] * HP + (g * GW + tl.arange(0, GW))[None, :]


@triton.jit
def _linear_in_blk(
    inp, w_ptr, b_ptr, g, P0: tl.constexpr, P0P: tl.constexpr, HP: tl.constexpr, GW: tl.constexpr, PREC: tl.constexpr
):
    """Block g (BE, GW) of the first Linear, computed transposed, (W^T inp^T)^T: its GW rows (not BE) are the
    GEMM's M, so that the tile's warps do not all compute the same rows (Triton lays the warps of every dot of a
    chain along M). The weight's rows are read as they lie (P0 of them: the padding rows are zero), then
    transposed in registers."""
    k = tl.arange(0, P0P)
    n = g * GW + tl.arange(0, GW)
    w = tl.load(w_ptr + k[:, None] * HP + n[None, :], mask=(k < P0)[:, None] & (n >= 0)[None, :], other=0.0)
    b = tl.load(b_ptr + n)
    return tl.trans(_mm(tl.trans(w).to(inp.dtype), tl.trans(inp), PREC)) + b[None, :].to(inp.dtype)


@triton.jit
def _linear_in_bwd_blk(
    inp,
    dy,
    g,
    w_ptr,
    gw_ptr,
    gb_ptr,
    P0: tl.constexpr,
    P0P: tl.constexpr,
    HP: tl.constexpr,
    GW: tl.constexpr,
    PREC: tl.constexpr,
):
    """Backward of block g of the first Linear: adds inp^T dy and the bias gradient to this program's rows, returns the
    block's part of d inp (BE, P0P)."""
    k = tl.arange(0, P0P)
    n = g * GW + tl.arange(0, GW)
    offs = k[:, None] * HP + n[None, :]
    real = (k < P0)[:, None] & (n >= 0)[None, :]  # (the padding rows of the weight get no gradient)
    # the weight gradient as dy^T inp (GW, P0P): GW rows, as above; added to the accumulator in its own row order
    _accumulate(gw_ptr, offs, tl.trans(_mm(tl.trans(dy), inp, PREC)), real)
    _accumulate(gb_ptr, n, tl.sum(dy, 0), n >= 0)
    w = tl.load(w_ptr + offs, mask=real, other=0.0).to(inp.dtype)
    return _mm(dy, tl.trans(w), PREC)


@triton.jit
def _fourier_chunk(at_ptr, ait_ptr, c0, DP: tl.constexpr, GP: tl.constexpr, GC: tl.constexpr, dtype):
    """Grid points c0 .. c0 + GC of a layer's Fourier matrices: A^T (DP, GC) and Ainv^T (GC, DP)."""
    d = tl.arange(0, DP)
    g = c0 + tl.arange(0, GC)
    at = tl.load(at_ptr + d[:, None] * GP + g[None, :]).to(dtype)
    ait = tl.load(ait_ptr + g[:, None] * DP + d[None, :]).to(dtype)
    return at, ait


@triton.jit
def _act_blk(
    y,
    at_ptr,
    ait_ptr,
    BE: tl.constexpr,
    GW: tl.constexpr,
    DP: tl.constexpr,
    GP: tl.constexpr,
    FOURIER: tl.constexpr,
    PREC: tl.constexpr,
):
    """The activation of one block (BE, GW) of whole channels; the Fourier ELU GC grid points at a time (the same
    GEMMs, in K / N chunks: no operand of a whole grid in registers)."""
    if FOURIER:
        G: tl.constexpr = GW // DP
        GC: tl.constexpr = min(
            GP,
            FOURIER_CHUNK_X3
            if PREC == "tf32x3"
            else min(FOURIER_CHUNK, max(16, FOURIER_CHUNK_ELEMENTS // DP))
            if PREC == "tf32"
            else FOURIER_CHUNK,
        )
        y2 = tl.reshape(y, (BE * G, DP))
        v = tl.zeros((BE * G, DP), dtype=y.dtype)
        for c0 in range(0, GP, GC):
            at, ait = _fourier_chunk(at_ptr, ait_ptr, c0, DP, GP, GC, y.dtype)
            v += _mm(_elu(_mm(y2, at, PREC)), ait, PREC)
        return tl.reshape(v, (BE, GW))
    else:
        return _elu(y)


@triton.jit
def _act_bwd_blk(
    y,
    dv,
    at_ptr,
    ait_ptr,
    BE: tl.constexpr,
    GW: tl.constexpr,
    DP: tl.constexpr,
    GP: tl.constexpr,
    FOURIER: tl.constexpr,
    PREC: tl.constexpr,
    WITH_ACT: tl.constexpr,
):
    """(act(y) when WITH_ACT else zeros, d y) of one block (BE, GW) given the gradient dv of act(y): the Fourier ELU's
    grid values ``u = y A^T`` are computed once for both (four GEMMs instead of five; three without the activation),
    GC grid points at a time."""
    if FOURIER:
        G: tl.constexpr = GW // DP
        GC: tl.constexpr = min(
            GP,
            FOURIER_CHUNK_X3
            if PREC == "tf32x3"
            else min(FOURIER_CHUNK, max(16, FOURIER_CHUNK_ELEMENTS // DP))
            if PREC == "tf32"
            else FOURIER_CHUNK,
        )
        y2 = tl.reshape(y, (BE * G, DP))
        dv2 = tl.reshape(dv, (BE * G, DP))
        v = tl.zeros((BE * G, DP), dtype=y.dtype)
        dy = tl.zeros((BE * G, DP), dtype=y.dtype)
        for c0 in range(0, GP, GC):
            at, ait = _fourier_chunk(at_ptr, ait_ptr, c0, DP, GP, GC, y.dtype)
            u = _mm(y2, at, PREC)
            if WITH_ACT:
                v += _mm(_elu(u), ait, PREC)
            du = _mm(dv2, tl.trans(ait), PREC) * _elu_grad(u)
            dy += _mm(du, tl.trans(at), PREC)
        return tl.reshape(v, (BE, GW)), tl.reshape(dy, (BE, GW))
    else:
        return _elu(y), dv * _elu_grad(y)


@triton.jit
def _act_and_bwd(
    y,
    dv,
    at_ptr,
    ait_ptr,
    BE: tl.constexpr,
    GW: tl.constexpr,
    DP: tl.constexpr,
    GP: tl.constexpr,
    FOURIER: tl.constexpr,
    PREC: tl.constexpr,
    APART: tl.constexpr,
):
    """(act(y), d y) of one block as :func:`_act_bwd_blk`; APART: the activation after, on its own (y A^T twice, one
    GEMM more per grid chunk; one accumulator less live across the backward's: the trunk backward's 2-warp blocks)."""
    if APART:
        _, dy = _act_bwd_blk(y, dv, at_ptr, ait_ptr, BE, GW, DP, GP, FOURIER, PREC, False)
        return _act_blk(y, at_ptr, ait_ptr, BE, GW, DP, GP, FOURIER, PREC), dy
    else:
        return _act_bwd_blk(y, dv, at_ptr, ait_ptr, BE, GW, DP, GP, FOURIER, PREC, True)


@triton.jit
def _factor_grad(dh, a, GW: tl.constexpr, DP: tl.constexpr, FOURIER: tl.constexpr):
    """This tile's part of a batch norm factor's gradient on one block (BE, GW), sum_e dh a: per hidden unit (GW,)
    for a pointwise ELU; for a Fourier ELU per channel (the factor is one per channel), on its first component (the
    host reads it there: launch.Packing)."""
    g = tl.sum(dh * a, 0)
    if FOURIER:
        gch = tl.sum(tl.reshape(g, (GW // DP, DP)), 1)
        g = tl.reshape(tl.where((tl.arange(0, DP) == 0)[None, :], gch[:, None], 0.0), (GW,))
    return g


@triton.jit
def _cw_chunk(c0, BE: tl.constexpr, CP: tl.constexpr, DP: tl.constexpr, DC: tl.constexpr):
    """Offsets (BE, CP, DC) of components c0 .. c0 + DC of every channel of a (BE, CP DP) tile, in the tile's own
    order (runs of DC contiguous elements: the batched-dot view of a componentwise Linear is formed in registers,
    :func:`_cw_operand`, not gathered from memory one strided element at a time)."""
    e = tl.arange(0, BE)
    c = tl.arange(0, CP)
    d = c0 + tl.arange(0, DC)
    return e[:, None, None] * (CP * DP) + c[None, :, None] * DP + d[None, None, :]


@triton.jit
def _cw_operand(a, F: tl.constexpr):
    """A chunk (BE, CP, DC) -> the batched-dot view (DC, BE, CP F) of a componentwise Linear."""
    return _pad_k(tl.permute(a, (2, 0, 1)), F)


@triton.jit
def _cw_result(y, F: tl.constexpr):
    """Inverse of :func:`_cw_operand`: (DC, BE, CP F) -> (BE, CP, DC)."""
    return tl.permute(_unpad_k(y, F), (1, 2, 0))


@triton.jit
def _cw_weight(c0, DC: tl.constexpr, KC: tl.constexpr, F: tl.constexpr):
    """Offsets (DC, KC, KC) of components c0 .. c0 + DC of a componentwise weight as the dots take it, (DP, KC, KC)
    with zeros between its real rows and columns (those at multiples of F), and the mask of those real entries. The
    weight (and its gradient) is packed compact, (DP, CP, CP) with CP = KC / F: a real row of a component is CP
    contiguous values, where the padded layout spread them over F times the bytes."""
    CP: tl.constexpr = KC // F
    d = c0 + tl.arange(0, DC)
    k = tl.arange(0, KC)
    offs = d[:, None, None] * (CP * CP) + (k // F)[None, :, None] * CP + (k // F)[None, None, :]
    real = (d >= 0)[:, None, None] & (k % F == 0)[None, :, None] & (k % F == 0)[None, None, :]
    return offs, real


@triton.jit
def _linear_scr(
    src,
    dst,
    w_ptr,
    b_ptr,
    BE: tl.constexpr,
    CP: tl.constexpr,
    DP: tl.constexpr,
    GW: tl.constexpr,
    CWF: tl.constexpr,
    PREC: tl.constexpr,
    CWC: tl.constexpr,
):
    """dst = src W + b for two (BE, HP) scratch tiles: componentwise DC components at a time (CWF > 0), else dense in
    (GW x GW) blocks."""
    HP: tl.constexpr = CP * DP
    if CWF > 0:
        KC: tl.constexpr = CP * CWF
        DC: tl.constexpr = max(1, min(DP, CWC // (BE * KC)))
        for c0 in range(0, DP, DC):
            offs = _cw_chunk(c0, BE, CP, DP, DC)
            a = tl.load(src + offs)
            woffs, wreal = _cw_weight(c0, DC, KC, CWF)
            w = tl.load(w_ptr + woffs, mask=wreal, other=0.0).to(a.dtype)
            b = tl.load(b_ptr + _cw_chunk(c0, 1, CP, DP, DC)).to(a.dtype)  # (1, CP, DC)
            tl.store(dst + offs, _cw_result(_mm(_cw_operand(a, CWF), w, PREC), CWF) + b)
    else:
        NG: tl.constexpr = HP // GW
        k = tl.arange(0, GW)
        for go in range(NG):
            y = tl.zeros((BE, GW), dtype=src.dtype.element_ty)
            for gi in range(NG):
                a = tl.load(src + _blk(gi, BE, HP, GW))
                w = tl.load(w_ptr + (gi * GW + k)[:, None] * HP + (go * GW + k)[None, :]).to(a.dtype)
                y += _mm(a, w, PREC)
            b = tl.load(b_ptr + go * GW + k).to(y.dtype)
            tl.store(dst + _blk(go, BE, HP, GW), y + b[None, :])


@triton.jit
def _linear_bwd_scr(
    a_src,
    dy_src,
    w_ptr,
    gw_ptr,
    BE: tl.constexpr,
    CP: tl.constexpr,
    DP: tl.constexpr,
    GW: tl.constexpr,
    CWF: tl.constexpr,
    PREC: tl.constexpr,
    CWC: tl.constexpr,
):
    """Backward of :func:`_linear_scr`: d a (= dy W^T) over a in its own tile, and a^T dy added to this program's
    weight-gradient row."""
    HP: tl.constexpr = CP * DP
    if CWF > 0:
        KC: tl.constexpr = CP * CWF
        DC: tl.constexpr = max(1, min(DP, CWC // (BE * KC)))
        for c0 in range(0, DP, DC):
            offs = _cw_chunk(c0, BE, CP, DP, DC)
            a = _cw_operand(tl.load(a_src + offs), CWF)
            dy = _cw_operand(tl.load(dy_src + offs), CWF)
            woffs, wreal = _cw_weight(c0, DC, KC, CWF)
            w = tl.load(w_ptr + woffs, mask=wreal, other=0.0).to(a.dtype)
            da = _mm(dy, tl.permute(w, (0, 2, 1)), PREC)
            # (only the real entries: the padding rows and columns of the weight get no gradient)
            _accumulate(gw_ptr, woffs, _mm(tl.permute(a, (0, 2, 1)), dy, PREC), wreal)
            tl.debug_barrier()
            tl.store(a_src + offs, _cw_result(da, CWF))
    else:
        NG: tl.constexpr = HP // GW
        k = tl.arange(0, GW)
        for gi in range(NG):
            a = tl.load(a_src + _blk(gi, BE, HP, GW))
            da = tl.zeros((BE, GW), dtype=a.dtype)
            for go in range(NG):
                dy = tl.load(dy_src + _blk(go, BE, HP, GW))
                woffs = (gi * GW + k)[:, None] * HP + (go * GW + k)[None, :]
                w = tl.load(w_ptr + woffs).to(a.dtype)
                da += _mm(dy, tl.trans(w), PREC)
                _accumulate(gw_ptr, woffs, _mm(tl.trans(a), dy, PREC), woffs >= 0)
            tl.debug_barrier()
            tl.store(a_src + _blk(gi, BE, HP, GW), da)


@triton.jit(do_not_specialize=["E"])
def shell_kernel(
    inp_ptr, coef_ptr, s_ptr, E, norm, P0: tl.constexpr, P0P: tl.constexpr, NDIM: tl.constexpr, BE: tl.constexpr
):
    """The radial shell s = norm exp(-coef |d|^2) (E,) of a tile of edges (in training the contraction gets h from
    the statistics pass, and only s is left to compute)."""
    offs, emask, _, s, _, _ = _load_tile(inp_ptr, coef_ptr, norm, tl.program_id(0), E, P0, P0P, NDIM, BE)
    tl.store(s_ptr + offs, s, mask=emask)


@triton.jit(do_not_specialize=["n_prog", "H", "HP"])
def stats_merge_kernel(parts_ptr, hidden_ptr, out_ptr, n_prog, H, HP, BH: tl.constexpr):
    """The per-program moments of :func:`fused_stats_kernel` (NPROG, 1 + 2 HP) merged with Chan et al.'s pairwise
    formula in program order (deterministic) into out (2, H): column means and sums of squared deviations of the real
    hidden units (``hidden_ptr``: each one's padded column), for units ``pid * BH ..``."""
    j = tl.program_id(0) * BH + tl.arange(0, BH)
    jm = j < H
    col = tl.load(hidden_ptr + j, mask=jm, other=0).to(tl.int64)
    dt = parts_ptr.dtype.element_ty
    n_a = tl.sum(tl.zeros((BH,), dtype=dt), 0)
    mean = tl.zeros((BH,), dtype=dt)
    m2 = tl.zeros((BH,), dtype=dt)
    for p in range(0, n_prog):
        row = parts_ptr + p * (1 + 2 * HP)
        n_b = tl.load(row)
        mean_b = tl.load(row + 1 + col, mask=jm, other=0.0)
        m2_b = tl.load(row + 1 + HP + col, mask=jm, other=0.0)
        n = n_a + n_b
        w = tl.where(n > 0, n_b / tl.maximum(n, 1.0), 0.0)
        delta = mean_b - mean
        mean = mean + delta * w
        m2 = m2 + m2_b + delta * delta * (n_a * w)
        n_a = n
    tl.store(out_ptr + j, mean, mask=jm)
    tl.store(out_ptr + H + j, m2, mask=jm)


@triton.jit
def _tape_at(k: tl.constexpr, t1, t2, t3):
    """The tape's activation of hidden layer k (1-based, k <= 3)."""
    if k == 1:
        return t1
    elif k == 2:
        return t2
    else:
        return t3


@triton.jit
def _tape_blk(tp, offs, emask, g, GW: tl.constexpr, PD: tl.constexpr, C: tl.constexpr, D: tl.constexpr):
    """Block g (BE, GW) of a taped activation (E, C D), compact (zero on padding units and edges)."""
    j = g * GW + tl.arange(0, GW)
    col = j // PD * D + j % PD
    real = (j // PD < C) & (j % PD < D)
    return tl.load(tp + offs[:, None] * (C * D) + col[None, :], mask=emask[:, None] & real[None, :], other=0.0)


@triton.jit(do_not_specialize=["E", "n_tiles"])
def trunk_backward_kernel(
    dhs_ptr,
    dsb_ptr,
    s_ptr,
    inp_ptr,
    prm_ptr,
    fou_ptr,
    coef_ptr,
    dinp_ptr,
    acc_ptr,
    scr_ptr,
    t1_ptr,
    t2_ptr,
    t3_ptr,
    E,
    n_tiles,
    norm,
    P0: tl.constexpr,
    P0P: tl.constexpr,
    NDIM: tl.constexpr,
    NL: tl.constexpr,
    CP: tl.constexpr,
    DP: tl.constexpr,
    GP: tl.constexpr,
    GW: tl.constexpr,
    FOURIER: tl.constexpr,
    C: tl.constexpr,
    D: tl.constexpr,
    PD: tl.constexpr,
    BE: tl.constexpr,
    PREC: tl.constexpr,
    NH: tl.constexpr,
    CWF: tl.constexpr,
    BNM: tl.constexpr,
    TAPE: tl.constexpr,
    ACT_APART: tl.constexpr,
):
    """Backward of :func:`trunk_forward_kernel` given d hs (E, C D, compact) and the bias term's d s (E,): d of the MLP
    input (E, P0) and the trunk's parameter gradients, accumulated per program (a persistent grid, one accumulator
    row per program: deterministic, the host adds the rows in a fixed order). A row of ``acc_ptr`` is laid out as the
    padded parameters (:func:`_params`), ``[w1 | b1 | wh | bh | bf | bs | f0 | s0 | coef (1,)]`` (f0, s0 unused). On
    the way it writes ``h`` (after the last batch norm) over ``d hs`` (each block of a tile read before it is written)
    and ``s``, which the contraction's remaining backward kernels read, so no separate forward pass of the trunk is
    needed.

    Per tile, a block of GW hidden units (or DC components of a componentwise Linear) at a time, through the program's
    scratch ``scr_ptr`` (NPROG, NS, BE, HP) (see above): the forward stores h_1 .. h_{NL-1} (each layer's output after
    its batch norm: the next Linear's input, and what its weight gradient needs) and y_NL, and with batch norms
    a_1 .. a_{NL-1} (before them: what their factors' gradients need) in slots NL .. 2 NL - 2; the last layer gives h,
    d s and dy_NL; each hidden Linear's backward turns h_k into d h_k in place, the batch norm's gradients are read off
    d h_k and a_k, and y_k is recomputed from h_{k-1} (y_1 from the input, per block) and turned into dy_k. The GEMMs
    are those of a forward and a backward pass plus the recomputed y_1 .. y_{NL-1} (for NL = 2 only the narrow first
    Linear). With a batch norm anywhere (BNM != 0) every layer takes the affine path; the host gives a layer without
    one the identity (its gradients are computed, and dropped).

    With TAPE (NL <= 3) the forward part reads the statistics passes' activations a_1 .. a_NL before their batch
    norms (``t1_ptr`` .. ``t3_ptr``, (E, C D) compact, as the tape of :mod:`ik_fast.ops` holds them) instead of
    evaluating them: it computes y_NL alone, and the last layer's activation is not evaluated again either; layer 1's
    batch-norm gradients read a_1 from the tape again instead of staging it (its slot is not written). Without
    it, ACT_APART evaluates the last layer's activation apart from its backward (:func:`_act_and_bwd`)."""
    HP: tl.constexpr = CP * DP
    NG: tl.constexpr = HP // GW
    TILE: tl.constexpr = BE * HP
    # (plain constexpr arithmetic: Triton 3.6 does not fold a jit helper's result into a constexpr)
    WS: tl.constexpr = DP * CP * CP if CWF > 0 else HP * HP  # = _wstride(CP, DP, CWF)
    NA: tl.constexpr = max(NL, 1)
    ROW: tl.constexpr = P0P * HP + HP + NH * WS + NH * HP + 2 * NA * HP + 2 * P0P  # the padded parameters
    FG: tl.constexpr = DP * GP  # elements of one layer's Fourier matrix
    BN: tl.constexpr = BNM != 0
    # elements of a componentwise Linear's operand chunk (_linear_scr): TF32's larger chunks (whole sectors of the
    # scratch) where the stack allows them, up to DP = 32 and with the tape (at DP = 64 the untaped 2-warp blocks
    # take 488 B of stack with them under Triton 3.9, 464 B without)
    CWC: tl.constexpr = CW_CHUNK_TF32 if PREC == "tf32" and (DP <= 32 or TAPE) else CW_CHUNK
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    w1, b1, wh, bh, bf, bs, _f0, _s0, at, ait = _params(prm_ptr, fou_ptr, NL, P0P, CP, DP, GP, CWF)
    dt = inp_ptr.dtype.element_ty
    gg = tl.arange(0, GW)
    pp = tl.arange(0, P0P)
    gw1 = acc_ptr + pid.to(tl.int64) * (ROW + 1)
    gb1 = gw1 + P0P * HP
    gwh = gb1 + HP
    gbh = gwh + NH * WS
    gbf = gbh + NH * HP
    gbs = gbf + NA * HP
    gcoef = gw1 + ROW
    NS: tl.constexpr = 2 * NL - 1 if BN and NL > 1 else max(NL, 1)  # scratch slots (as launch.conv_backward allocates)
    scr = scr_ptr + pid.to(tl.int64) * (NS * TILE)
    ys = scr + (NL - 1) * TILE  # the slot of y_k / dy_k
    pre = scr + NL * TILE  # a_1 .. a_{NL-1}, before their batch norms
    # (coef's gradient, a sum over every edge of the program, accumulated in float64: in float32 its rounding, not the
    # dots', set its error, up to 3 ulps of a scalar that dominates the parameters' gradient)
    gcoef_acc = tl.sum(tl.zeros((BE,), dtype=tl.float64), 0)
    for t in range(pid, n_tiles, nprog):
        offs, emask, inp, s, r2, coef = _load_tile(inp_ptr, coef_ptr, norm, t, E, P0, P0P, NDIM, BE)
        if NL == 0:  # h is the input itself (HP = P0P): one small tile
            col, real = _compact_columns(HP, PD, C, D)
            hmask = emask[:, None] & real[None, :]
            dhs = tl.load(dhs_ptr + offs[:, None] * (C * D) + col[None, :], mask=hmask, other=0.0)
            tl.debug_barrier()
            tl.store(dhs_ptr + offs[:, None] * (C * D) + col[None, :], inp, mask=hmask)
            ds = tl.sum(dhs * inp, 1)
            dmlp = dhs * s[:, None]
        else:
            tl.debug_barrier()  # the previous tile is done with the scratch
            # forward: h_1 .. h_{NL-1} into slots 0 .. NL-2, y_NL into the last slot
            if NL > 1 and TAPE:  # a_1 .. a_{NL-1} from the tape: only y_NL is computed
                for kt in tl.static_range(0, NL - 1):  # (a name of its own: k is a loop variable below)
                    tk = _tape_at(kt + 1, t1_ptr, t2_ptr, t3_ptr)
                    for g in range(NG):
                        blk = _blk(g, BE, HP, GW)
                        a = _tape_blk(tk, offs, emask, g, GW, PD, C, D)
                        if BN:
                            if kt > 0:  # (a_1's batch-norm gradients read it from the tape again)
                                tl.store(pre + kt * TILE + blk, a)
                            a = _affine(a, bf + kt * HP + g * GW, bs + kt * HP + g * GW, GW)
                        tl.store(scr + kt * TILE + blk, a)
                tl.debug_barrier()
                _linear_scr(
                    scr + (NL - 2) * TILE, ys, wh + (NL - 2) * WS, bh + (NL - 2) * HP, BE, CP, DP, GW, CWF, PREC, CWC
                )
                tl.debug_barrier()
            elif NL > 1:
                for g in range(NG):
                    a = _act_blk(
                        _linear_in_blk(inp, w1, b1, g, P0, P0P, HP, GW, PREC), at, ait, BE, GW, DP, GP, FOURIER, PREC
                    )
                    if BN:
                        tl.store(pre + _blk(g, BE, HP, GW), a)
                        a = _affine(a, bf + g * GW, bs + g * GW, GW)
                    tl.store(scr + _blk(g, BE, HP, GW), a)
                for k in range(1, NL - 1):  # h_{k+1} = bn(act(y_{k+1})), y_{k+1} = h_k W_k + b_k (hidden Linear k)
                    tl.debug_barrier()
                    _linear_scr(
                        scr + (k - 1) * TILE, ys, wh + (k - 1) * WS, bh + (k - 1) * HP, BE, CP, DP, GW, CWF, PREC, CWC
                    )
                    tl.debug_barrier()
                    atk, aitk = at + k * FG, ait + k * FG
                    for g in range(NG):
                        blk = _blk(g, BE, HP, GW)
                        a = _act_blk(tl.load(ys + blk), atk, aitk, BE, GW, DP, GP, FOURIER, PREC)
                        if BN:
                            tl.store(pre + k * TILE + blk, a)
                            a = _affine(a, bf + k * HP + g * GW, bs + k * HP + g * GW, GW)
                        tl.store(scr + k * TILE + blk, a)
                tl.debug_barrier()
                _linear_scr(
                    scr + (NL - 2) * TILE, ys, wh + (NL - 2) * WS, bh + (NL - 2) * HP, BE, CP, DP, GW, CWF, PREC, CWC
                )
                tl.debug_barrier()
            # the last layer, block by block: h (over d hs), d s and dy_NL (into the last slot; for a single layer
            # straight into the first Linear's gradients)
            atl, aitl = at + (NL - 1) * FG, ait + (NL - 1) * FG
            ds = tl.zeros((BE,), dtype=dt)
            dmlp = tl.zeros((BE, P0P), dtype=dt)
            for g in range(NG):
                j = g * GW + gg  # the block's hidden units, and their columns of d hs / h
                col = j // PD * D + j % PD
                real = (j // PD < C) & (j % PD < D)
                hoffs = offs[:, None] * (C * D) + col[None, :]
                hmask = emask[:, None] & real[None, :]
                dhs = tl.load(dhs_ptr + hoffs, mask=hmask, other=0.0)
                if NL == 1:
                    y = _linear_in_blk(inp, w1, b1, g, P0, P0P, HP, GW, PREC)
                else:
                    y = tl.load(ys + _blk(g, BE, HP, GW))
                if BN:  # h = a f + t: d a = d h f (d h = d hs s formed again after the activation's backward,
                    # which is where the registers run short: nothing of this block but d hs is kept across it)
                    fl = bf + (NL - 1) * HP + g * GW
                    sf = s[:, None] * tl.load(fl + gg).to(dt)[None, :]
                    if TAPE:  # a_NL from the tape
                        _, dy = _act_bwd_blk(y, dhs * sf, atl, aitl, BE, GW, DP, GP, FOURIER, PREC, False)
                        h = _tape_blk(_tape_at(NL, t1_ptr, t2_ptr, t3_ptr), offs, emask, g, GW, PD, C, D)
                    else:
                        h, dy = _act_and_bwd(y, dhs * sf, atl, aitl, BE, GW, DP, GP, FOURIER, PREC, ACT_APART)
                    dh = dhs * s[:, None]
                    _accumulate(gbf + (NL - 1) * HP, j, _factor_grad(dh, h, GW, DP, FOURIER), j >= 0)
                    _accumulate(gbs + (NL - 1) * HP, j, tl.sum(dh, 0), j >= 0)
                    h = _affine(h, fl, bs + (NL - 1) * HP + g * GW, GW)
                elif TAPE:
                    _, dy = _act_bwd_blk(y, dhs * s[:, None], atl, aitl, BE, GW, DP, GP, FOURIER, PREC, False)
                    h = _tape_blk(_tape_at(NL, t1_ptr, t2_ptr, t3_ptr), offs, emask, g, GW, PD, C, D)
                else:
                    h, dy = _act_and_bwd(y, dhs * s[:, None], atl, aitl, BE, GW, DP, GP, FOURIER, PREC, ACT_APART)
                ds += tl.sum(dhs * h, 1)
                tl.debug_barrier()
                tl.store(dhs_ptr + hoffs, h, mask=hmask)
                if NL == 1:
                    dmlp += _linear_in_bwd_blk(inp, dy, g, w1, gw1, gb1, P0, P0P, HP, GW, PREC)
                else:
                    _accumulate(gbh + (NL - 2) * HP, j, tl.sum(dy, 0), j >= 0)
                    tl.store(ys + _blk(g, BE, HP, GW), dy)
            if NL > 1:
                # hidden layers NL-1 .. 2: d h_k = dy_{k+1} W_k^T (in h_k's slot), then dy_k from the recomputed y_k
                for kk in range(0, NL - 2):
                    k = NL - 1 - kk
                    tl.debug_barrier()
                    _linear_bwd_scr(
                        scr + (k - 1) * TILE, ys, wh + (k - 1) * WS, gwh + (k - 1) * WS, BE, CP, DP, GW, CWF, PREC, CWC
                    )
                    tl.debug_barrier()
                    _linear_scr(
                        scr + (k - 2) * TILE, ys, wh + (k - 2) * WS, bh + (k - 2) * HP, BE, CP, DP, GW, CWF, PREC, CWC
                    )
                    tl.debug_barrier()
                    atk, aitk = at + (k - 1) * FG, ait + (k - 1) * FG
                    for g in range(NG):
                        blk = _blk(g, BE, HP, GW)
                        da = tl.load(scr + (k - 1) * TILE + blk)
                        if BN:  # da holds d h_k: the batch norm's gradients, then d a_k
                            gk = g * GW + gg
                            a = tl.load(pre + (k - 1) * TILE + blk)
                            _accumulate(gbf + (k - 1) * HP, gk, _factor_grad(da, a, GW, DP, FOURIER), gg >= 0)
                            _accumulate(gbs + (k - 1) * HP, gk, tl.sum(da, 0), gg >= 0)
                            da = da * tl.load(bf + (k - 1) * HP + gk).to(dt)[None, :]
                        _, dy = _act_bwd_blk(tl.load(ys + blk), da, atk, aitk, BE, GW, DP, GP, FOURIER, PREC, False)
                        _accumulate(gbh + (k - 2) * HP, g * GW + gg, tl.sum(dy, 0), gg >= 0)
                        tl.debug_barrier()
                        tl.store(ys + blk, dy)
                # the first hidden Linear's backward, then layer 1 per block from y_1 recomputed from the input
                tl.debug_barrier()
                _linear_bwd_scr(scr, ys, wh, gwh, BE, CP, DP, GW, CWF, PREC, CWC)
                tl.debug_barrier()
                for g in range(NG):
                    y1 = _linear_in_blk(inp, w1, b1, g, P0, P0P, HP, GW, PREC)
                    da = tl.load(scr + _blk(g, BE, HP, GW))
                    if BN:  # as above, for layer 1 (a_1 from the tape where there is one)
                        gk = g * GW + gg
                        if TAPE:
                            a = _tape_blk(t1_ptr, offs, emask, g, GW, PD, C, D)
                        else:
                            a = tl.load(pre + _blk(g, BE, HP, GW))
                        _accumulate(gbf, gk, _factor_grad(da, a, GW, DP, FOURIER), gg >= 0)
                        _accumulate(gbs, gk, tl.sum(da, 0), gg >= 0)
                        da = da * tl.load(bf + gk).to(dt)[None, :]
                    _, dy = _act_bwd_blk(y1, da, at, ait, BE, GW, DP, GP, FOURIER, PREC, False)
                    dmlp += _linear_in_bwd_blk(inp, dy, g, w1, gw1, gb1, P0, P0P, HP, GW, PREC)
        tl.store(s_ptr + offs, s, mask=emask)
        ds += tl.load(dsb_ptr + offs, mask=emask, other=0.0)
        # radial shell s = norm * exp(-coef r^2)
        dsr = ds * s
        gcoef_acc += tl.sum((-dsr * r2).to(tl.float64), 0)
        dinp = tl.where((pp < NDIM)[None, :], (-2.0 * coef * dsr)[:, None] * inp, 0.0) + dmlp
        tl.store(dinp_ptr + offs[:, None] * P0 + pp[None, :], dinp, mask=emask[:, None] & (pp < P0)[None, :])
    tl.store(gcoef, gcoef_acc.to(dt))
