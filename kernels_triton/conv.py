"""Trunk kernels of the fused Triton backend: the kernel MLP per tile of edges (the contraction with the source
features is :mod:`.contract`, per receiver block).

One program takes a tile of ``BE`` consecutive edges of the receiver-sorted edge list and evaluates the MLP on chip:
``a_0 = [d, attr]``, ``a_k = act(a_{k-1} W_k + b_k)``, where ``act`` is the Fourier ELU (per channel:
``ELU(y A^T) Ainv^T``, two small GEMMs on the (edge x channel, component) view of the tile) or a pointwise ELU, and
every batch norm is already folded into the Linear that follows it (host side). Kernels:

* :func:`trunk_forward_kernel`: the last activation ``h`` in the compact hidden layout (E, H) that the contraction
  reads, and the radial shell ``s = norm exp(-coef |d|^2)``;
* :func:`fused_stats_kernel`: for batch norm in training mode, per-component mean and sum of squared deviations of
  one hidden layer's activations (per persistent program, merged with Chan's formula), the trunk recomputed up to that
  layer with the earlier batch norms folded; for the last layer it also writes the activation, which the forward's
  contraction then reads instead of evaluating the trunk again;
* :func:`trunk_backward_kernel`: from ``d hs`` (written by the contraction's backward), the gradients of the MLP
  input and of the trunk's parameters, recomputing the trunk layer by layer from the input; parameter gradients are
  accumulated per program (a persistent grid, one accumulator row each): deterministic, the host adds the rows in a
  fixed order.

Every hidden GEMM works on blocks of ``GW`` hidden units (the host picks ``GW`` so that no operand exceeds 32 KB in
float32). Register tiles cannot be sliced in Triton: a block is taken out of (and put back into) the (BE, NG, GW) view
of a tile by a masked sum (``_group``, ``_add_group``). (Still v1 here: the hidden Linears are dense padded GEMMs and
the backward recomputes; see issue 8.)

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
def _group(v3, g, NG: tl.constexpr):
    """Group g (BE, GW) of a (BE, NG, GW) register tile: register tiles cannot be sliced, so a masked sum."""
    return tl.sum(tl.where((tl.arange(0, NG) == g)[None, :, None], v3, 0.0), 1)


@triton.jit
def _add_group(v3, blk, g, NG: tl.constexpr):
    """v3 with blk (BE, GW) added into group g."""
    return v3 + tl.where((tl.arange(0, NG) == g)[None, :, None], blk[:, None, :], 0.0)


@triton.jit
def _linear_in(inp, w_ptr, b_ptr, P0P: tl.constexpr, HP: tl.constexpr, PREC: tl.constexpr):
    """The first Linear: the MLP input (BE, P0P) is narrow, so its weight (P0P, HP) is one GEMM operand."""
    k = tl.arange(0, P0P)
    n = tl.arange(0, HP)
    w = tl.load(w_ptr + k[:, None] * HP + n[None, :])
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
def _linear_hh_bwd(a, dy, w_ptr, gw_ptr, BE: tl.constexpr, HP: tl.constexpr, GW: tl.constexpr, PREC: tl.constexpr):
    """Backward of :func:`_linear_hh`: returns d a, and adds a^T dy to this program's weight-gradient row."""
    NG: tl.constexpr = HP // GW
    a3 = tl.reshape(a, (BE, NG, GW))
    dy3 = tl.reshape(dy, (BE, NG, GW))
    k = tl.arange(0, GW)
    da3 = tl.zeros((BE, NG, GW), dtype=a.dtype)
    for go in range(NG):
        dyg = _group(dy3, go, NG)
        for gi in range(NG):
            offs = (gi * GW + k)[:, None] * HP + (go * GW + k)[None, :]
            w = tl.load(w_ptr + offs).to(a.dtype)
            da3 = _add_group(da3, _mm(dyg, tl.trans(w), PREC), gi, NG)
            _accumulate(gw_ptr, offs, _mm(tl.trans(_group(a3, gi, NG)), dyg, PREC), offs >= 0)
    return tl.reshape(da3, (BE, HP))


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
def _load_cw(w_ptr, DP: tl.constexpr, KC: tl.constexpr):
    d = tl.arange(0, DP)
    k = tl.arange(0, KC)
    return tl.load(w_ptr + d[:, None, None] * (KC * KC) + k[None, :, None] * KC + k[None, None, :])


@triton.jit
def _linear_cw(a, w_ptr, b_ptr, BE: tl.constexpr, CP: tl.constexpr, DP: tl.constexpr, F: tl.constexpr,
               PREC: tl.constexpr):
    """A componentwise hidden Linear (lever 2: the hidden Linears through their structure): component d of every
    output channel mixes component d of the input channels, one (CP F x CP F) block per component (weight
    (DP, CP F, CP F), x @ W layout, channel c at row/column c F): a dot batched over the components, CP^2 DP
    multiply-adds per edge (padded), against (CP DP)^2 for the dense Linear."""
    w = _load_cw(w_ptr, DP, CP * F).to(a.dtype)
    y = _from_component(_mm(_by_component(a, BE, CP, DP, F), w, PREC), BE, CP, DP, F)
    b = tl.load(b_ptr + tl.arange(0, CP * DP)).to(a.dtype)
    return y + b[None, :]


@triton.jit
def _linear_cw_bwd(a, dy, w_ptr, gw_ptr, BE: tl.constexpr, CP: tl.constexpr, DP: tl.constexpr, F: tl.constexpr,
                   PREC: tl.constexpr):
    """Backward of :func:`_linear_cw`: returns d a, and adds a^T dy (per component) to this program's row."""
    KC: tl.constexpr = CP * F
    w = _load_cw(w_ptr, DP, KC).to(a.dtype)
    dyc = _by_component(dy, BE, CP, DP, F)
    da = _from_component(_mm(dyc, tl.permute(w, (0, 2, 1)), PREC), BE, CP, DP, F)
    d = tl.arange(0, DP)
    k = tl.arange(0, KC)
    offs = d[:, None, None] * (KC * KC) + k[None, :, None] * KC + k[None, None, :]
    _accumulate(gw_ptr, offs, _mm(tl.permute(_by_component(a, BE, CP, DP, F), (0, 2, 1)), dyc, PREC), offs >= 0)
    return da


@triton.jit
def _linear_hidden(a, w_ptr, b_ptr, BE: tl.constexpr, CP: tl.constexpr, DP: tl.constexpr, GW: tl.constexpr,
                   CWF: tl.constexpr, PREC: tl.constexpr):
    """Hidden Linear: componentwise when CWF > 0 (F = CWF), else dense in GW blocks."""
    if CWF > 0:
        return _linear_cw(a, w_ptr, b_ptr, BE, CP, DP, CWF, PREC)
    else:
        return _linear_hh(a, w_ptr, b_ptr, BE, CP * DP, GW, PREC)


@triton.jit
def _linear_hidden_bwd(a, dy, w_ptr, gw_ptr, BE: tl.constexpr, CP: tl.constexpr, DP: tl.constexpr,
                       GW: tl.constexpr, CWF: tl.constexpr, PREC: tl.constexpr):
    if CWF > 0:
        return _linear_cw_bwd(a, dy, w_ptr, gw_ptr, BE, CP, DP, CWF, PREC)
    else:
        return _linear_hh_bwd(a, dy, w_ptr, gw_ptr, BE, CP * DP, GW, PREC)


@triton.jit
def _wstride(CP: tl.constexpr, DP: tl.constexpr, CWF: tl.constexpr):
    """Elements of one hidden Linear's weight as the kernels read it."""
    if CWF > 0:
        return DP * CP * CWF * CP * CWF
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
def _act(y, at_ptr, ait_ptr, BE: tl.constexpr, CP: tl.constexpr, DP: tl.constexpr, GP: tl.constexpr,
         GW: tl.constexpr, FOURIER: tl.constexpr, PREC: tl.constexpr):
    if FOURIER:
        HP: tl.constexpr = CP * DP
        NG: tl.constexpr = HP // GW
        at, ait = _load_fourier(at_ptr, ait_ptr, DP, GP, y.dtype)
        y3 = tl.reshape(y, (BE, NG, GW))
        v3 = tl.zeros((BE, NG, GW), dtype=y.dtype)
        for g in range(NG):
            v3 = _add_group(v3, _felu(_group(y3, g, NG), at, ait, BE, GW // DP, DP, PREC), g, NG)
        return tl.reshape(v3, (BE, HP))
    else:
        return _elu(y)


@triton.jit
def _act_and_bwd(y, dv, at_ptr, ait_ptr, BE: tl.constexpr, CP: tl.constexpr, DP: tl.constexpr, GP: tl.constexpr,
                 GW: tl.constexpr, FOURIER: tl.constexpr, PREC: tl.constexpr, WITH_ACT: tl.constexpr):
    """(act(y) when WITH_ACT else zeros, d y) given the gradient dv of act(y): the Fourier ELU's grid values
    ``u = y A^T`` are computed once for both (four GEMMs per block instead of five; three without the activation)."""
    if FOURIER:
        HP: tl.constexpr = CP * DP
        NG: tl.constexpr = HP // GW
        G: tl.constexpr = GW // DP
        at, ait = _load_fourier(at_ptr, ait_ptr, DP, GP, y.dtype)
        y3 = tl.reshape(y, (BE, NG, GW))
        dv3 = tl.reshape(dv, (BE, NG, GW))
        v3 = tl.zeros((BE, NG, GW), dtype=y.dtype)
        dy3 = tl.zeros((BE, NG, GW), dtype=y.dtype)
        for g in range(NG):
            u = _mm(tl.reshape(_group(y3, g, NG), (BE * G, DP)), at, PREC)
            if WITH_ACT:
                v3 = _add_group(v3, tl.reshape(_mm(_elu(u), ait, PREC), (BE, GW)), g, NG)
            du = _mm(tl.reshape(_group(dv3, g, NG), (BE * G, DP)), tl.trans(ait), PREC) * _elu_grad(u)
            dy3 = _add_group(dy3, tl.reshape(_mm(du, tl.trans(at), PREC), (BE, GW)), g, NG)
        return tl.reshape(v3, (BE, HP)), tl.reshape(dy3, (BE, HP))
    else:
        return _elu(y), dv * _elu_grad(y)


@triton.jit
def _act_bwd(y, dv, at_ptr, ait_ptr, BE: tl.constexpr, CP: tl.constexpr, DP: tl.constexpr, GP: tl.constexpr,
             GW: tl.constexpr, FOURIER: tl.constexpr, PREC: tl.constexpr):
    """Gradient with respect to the pre-activation y, given the gradient dv of act(y)."""
    _, dy = _act_and_bwd(y, dv, at_ptr, ait_ptr, BE, CP, DP, GP, GW, FOURIER, PREC, False)
    return dy


@triton.jit
def _forward_to(inp, w1, b1, wh, bh, at, ait, K: tl.constexpr, P0P: tl.constexpr, BE: tl.constexpr,
                CP: tl.constexpr, DP: tl.constexpr, GP: tl.constexpr, GW: tl.constexpr, FOURIER: tl.constexpr,
                PREC: tl.constexpr, CWF: tl.constexpr):
    """(a_{K-1}, y_K): the input of layer K (1-based) and its pre-activation, recomputed from the MLP input."""
    HP: tl.constexpr = CP * DP
    y = _linear_in(inp, w1, b1, P0P, HP, PREC)
    a = tl.zeros((BE, HP), dtype=inp.dtype)
    for j in tl.static_range(1, K):  # layer j + 1 of the MLP
        a = _act(y, at + (j - 1) * DP * GP, ait + (j - 1) * GP * DP, BE, CP, DP, GP, GW, FOURIER, PREC)
        y = _linear_hidden(a, wh + (j - 1) * _wstride(CP, DP, CWF), bh + (j - 1) * HP, BE, CP, DP, GW, CWF, PREC)
    return a, y


@triton.jit
def _trunk(inp, w1, b1, wh, bh, at, ait, NL: tl.constexpr, P0P: tl.constexpr, BE: tl.constexpr, CP: tl.constexpr,
           DP: tl.constexpr, GP: tl.constexpr, GW: tl.constexpr, FOURIER: tl.constexpr, PREC: tl.constexpr,
           CWF: tl.constexpr):
    """a_NL, the last hidden activation before its (folded) batch norm; the input itself without hidden layers."""
    if NL == 0:
        return inp
    else:
        _, y = _forward_to(inp, w1, b1, wh, bh, at, ait, NL, P0P, BE, CP, DP, GP, GW, FOURIER, PREC, CWF)
        return _act(y, at + (NL - 1) * DP * GP, ait + (NL - 1) * GP * DP, BE, CP, DP, GP, GW, FOURIER, PREC)


@triton.jit
def _tile_edges(t, BE: tl.constexpr):
    """Edge ids (BE,) of tile t, in int64 (no overflow past 2^31 edges or elements)."""
    return (t + tl.zeros((BE,), dtype=tl.int64)) * BE + tl.arange(0, BE)


@triton.jit
def _load_tile(inp_ptr, coef_ptr, norm, t, E, P0: tl.constexpr, P0P: tl.constexpr, NDIM: tl.constexpr,
               BE: tl.constexpr):
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
def trunk_forward_kernel(inp_ptr, w1, b1, wh, bh, at, ait, coef_ptr, h_ptr, s_ptr, E, norm,
                         P0: tl.constexpr, P0P: tl.constexpr, NDIM: tl.constexpr, NL: tl.constexpr, CP: tl.constexpr,
                         DP: tl.constexpr, GP: tl.constexpr, GW: tl.constexpr, FOURIER: tl.constexpr,
                         C: tl.constexpr, D: tl.constexpr, PD: tl.constexpr, BE: tl.constexpr, PREC: tl.constexpr,
                         CWF: tl.constexpr):
    """The MLP trunk of a tile of BE edges: h (E, C * D), the last activation in the compact layout (unit c * D + d),
    and the radial shell s (E,)."""
    HP: tl.constexpr = CP * DP
    t = tl.program_id(0)
    offs, emask, inp, s, _, _ = _load_tile(inp_ptr, coef_ptr, norm, t, E, P0, P0P, NDIM, BE)
    h = _trunk(inp, w1, b1, wh, bh, at, ait, NL, P0P, BE, CP, DP, GP, GW, FOURIER, PREC, CWF)
    col, real = _compact_columns(HP, PD, C, D)
    tl.store(h_ptr + offs[:, None] * (C * D) + col[None, :], h, mask=emask[:, None] & real[None, :])
    tl.store(s_ptr + offs, s, mask=emask)


@triton.jit(do_not_specialize=["E", "n_tiles"])
def fused_stats_kernel(inp_ptr, w1, b1, wh, bh, at, ait, coef_ptr, out_ptr, act_ptr, E, n_tiles,
                       K: tl.constexpr, P0: tl.constexpr, P0P: tl.constexpr, NDIM: tl.constexpr, CP: tl.constexpr,
                       DP: tl.constexpr, GP: tl.constexpr, GW: tl.constexpr, FOURIER: tl.constexpr,
                       BE: tl.constexpr, PREC: tl.constexpr, CWF: tl.constexpr, C: tl.constexpr, D: tl.constexpr,
                       PD: tl.constexpr, WRITE: tl.constexpr):
    """Per program: (count, mean (HP), M2 (HP)) of layer K's activation over its tiles -> out (NPROG, 1 + 2 HP); with
    WRITE also the activation itself, act (E, C * D) in the compact layout.

    The running moments live in the program's own output row (zeros at the start) and are merged block by block of
    GW columns (Chan et al.'s pairwise formula), so that only one block's statistics are in registers at a time."""
    HP: tl.constexpr = CP * DP
    NG: tl.constexpr = HP // GW
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    kk = tl.arange(0, GW)
    dt = inp_ptr.dtype.element_ty
    row = out_ptr + pid * (1 + 2 * HP)
    n_a = tl.sum(tl.zeros((BE,), dtype=dt), 0)
    for t in range(pid, n_tiles, nprog):
        offs, emask, inp, _, _, _ = _load_tile(inp_ptr, coef_ptr, 1.0, t, E, P0, P0P, NDIM, BE)
        a = _trunk(inp, w1, b1, wh, bh, at, ait, K, P0P, BE, CP, DP, GP, GW, FOURIER, PREC, CWF)
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


@triton.jit(do_not_specialize=["E", "n_tiles"])
def trunk_backward_kernel(dhs_ptr, dsb_ptr, s_ptr, inp_ptr, w1, b1, wh, bh, at, ait, coef_ptr, dinp_ptr, gw1, gb1,
                          gwh, gbh, gcoef, E, n_tiles, norm, P0: tl.constexpr, P0P: tl.constexpr,
                          NDIM: tl.constexpr, NL: tl.constexpr, CP: tl.constexpr, DP: tl.constexpr,
                          GP: tl.constexpr, GW: tl.constexpr, FOURIER: tl.constexpr, C: tl.constexpr,
                          D: tl.constexpr, PD: tl.constexpr, BE: tl.constexpr, PREC: tl.constexpr, NH: tl.constexpr,
                          CWF: tl.constexpr):
    """Backward of :func:`trunk_forward_kernel` given d hs (E, C D, compact) and the bias term's d s (E,): d of the MLP
    input (E, P0) and the trunk's parameter gradients, accumulated per program (a persistent grid, one accumulator
    row per program: deterministic, the host adds the rows in a fixed order). The trunk is recomputed layer by layer
    from the input, once per layer; on the way it writes ``h`` over ``d hs`` (each tile reads its rows
    before writing them) and ``s``, which the contraction's remaining backward kernels read, so no separate forward
    pass of the trunk is needed."""
    HP: tl.constexpr = CP * DP
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    hh = tl.arange(0, HP)
    pp = tl.arange(0, P0P)
    col, real = _compact_columns(HP, PD, C, D)
    gw1 = gw1 + pid * (P0P * HP)
    gb1 = gb1 + pid * HP
    gwh = gwh + pid * (NH * _wstride(CP, DP, CWF))
    gbh = gbh + pid * (NH * HP)
    gcoef_acc = tl.sum(tl.zeros((BE,), dtype=inp_ptr.dtype.element_ty), 0)
    for t in range(pid, n_tiles, nprog):
        offs, emask, inp, s, r2, coef = _load_tile(inp_ptr, coef_ptr, norm, t, E, P0, P0P, NDIM, BE)
        hmask = emask[:, None] & real[None, :]
        dhs = tl.load(dhs_ptr + offs[:, None] * (C * D) + col[None, :], mask=hmask, other=0.0)
        dh = dhs * s[:, None]
        if NL == 0:
            h = inp
        else:
            # the last layer: its input and pre-activation, then the activation and its backward together
            a_prev, y = _forward_to(inp, w1, b1, wh, bh, at, ait, NL, P0P, BE, CP, DP, GP, GW, FOURIER, PREC, CWF)
            h, dy = _act_and_bwd(y, dh, at + (NL - 1) * DP * GP, ait + (NL - 1) * GP * DP, BE, CP, DP, GP, GW,
                                 FOURIER, PREC, True)
        tl.store(dhs_ptr + offs[:, None] * (C * D) + col[None, :], h, mask=hmask)
        tl.store(s_ptr + offs, s, mask=emask)
        ds = tl.sum(dhs * h, 1) + tl.load(dsb_ptr + offs, mask=emask, other=0.0)
        # radial shell s = norm * exp(-coef r^2)
        dsr = ds * s
        gcoef_acc += tl.sum(-dsr * r2, 0)
        dinp = tl.where((pp < NDIM)[None, :], (-2.0 * coef * dsr)[:, None] * inp, 0.0)
        # the MLP, layer by layer from the last, recomputing each lower layer's input and pre-activation
        if NL == 0:
            dinp += dh
        else:
            da = dh
            for kl in tl.static_range(NL - 1):
                k = NL - kl  # 1-based layer index, NL .. 2 (a runtime value: constexprs cannot be rebound per step)
                if kl > 0:
                    a_prev, y = _forward_to(inp, w1, b1, wh, bh, at, ait, NL - kl, P0P, BE, CP, DP, GP, GW, FOURIER,
                                            PREC, CWF)
                    dy = _act_bwd(y, da, at + (k - 1) * DP * GP, ait + (k - 1) * GP * DP, BE, CP, DP, GP, GW,
                                  FOURIER, PREC)
                _accumulate(gbh + (k - 2) * HP, hh, tl.sum(dy, 0), hh < HP)
                ws = _wstride(CP, DP, CWF)
                da = _linear_hidden_bwd(a_prev, dy, wh + (k - 2) * ws, gwh + (k - 2) * ws, BE, CP, DP, GW, CWF, PREC)
            if NL > 1:
                _, y1 = _forward_to(inp, w1, b1, wh, bh, at, ait, 1, P0P, BE, CP, DP, GP, GW, FOURIER, PREC, CWF)
                dy1 = _act_bwd(y1, da, at, ait, BE, CP, DP, GP, GW, FOURIER, PREC)
            else:
                dy1 = dy
            _accumulate(gw1, pp[:, None] * HP + hh[None, :], _mm(tl.trans(inp), dy1, PREC),
                        (pp < P0P)[:, None] & (hh < HP)[None, :])
            _accumulate(gb1, hh, tl.sum(dy1, 0), hh < HP)
            w1t = tl.load(w1 + pp[:, None] * HP + hh[None, :]).to(inp.dtype)
            dinp += _mm(dy1, tl.trans(w1t), PREC)
        tl.store(dinp_ptr + offs[:, None] * P0 + pp[None, :], dinp, mask=emask[:, None] & (pp < P0)[None, :])
    tl.store(gcoef + pid, gcoef_acc)
