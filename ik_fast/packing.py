"""The fused ops' program straight from an :class:`~ik_fast.ImplicitKernel`'s learnable tensors, as one autograd node.

:meth:`KernelProgram.packed` gives the fused ops (:mod:`ik_fast.ops`) the program with every batch norm folded. Built
from the lowered program's own tensors, that is two stages of autograd: the kernel's expansion map (escnn's bases
applied to every learnable tensor, one node) and the folds (about sixty operators, each its own node): on a small
graph their backward, all of it host overhead, is a large part of a native training step.

:class:`SourcePacking` packs from the learnable tensors instead: the expansion of only the tensors the fused ops read
(:class:`PackingMap`: not the dense hidden weights that a componentwise Linear's (D, C, C) form replaces, and the last
Linear's weight as its entries, never dense), without autograd, then the folds of :meth:`KernelProgram.packed_from`
(the same code as the plain path; the last layer's from its entries), and one autograd node, :class:`_FromSources`,
whose backward is the vector-Jacobian product written out: the folds' (a handful of products; the last layer's as
gathers and index_adds over its entries), then the expansion's transpose, one gather and one index_add over its
entries. On CPU with the native extension loaded, the passes over the entries, each statistics pass's finish with the
fold it feeds (:meth:`SourcePacking.finish`), the hidden folds and the whole backward are C++ calls (``pack_*`` of
``csrc/cpu/packing_cpu.cpp``: the same sums; the PyTorch form stays the statement the tests compare with, and runs
off the CPU or with :data:`NATIVE_PASSES` off). A double backward differentiates the plain path's operators instead.
The passes of one forward share the expansion and the folds (memoised per program). The lowered program defers its
own dense expansion (the reference's) until something reads it (:class:`~ik_fast.program.Deferred`), so a fused
backend never makes it.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["PackingMap", "SourcePacking"]


class PackingMap:
    """The part of a kernel's expansion map (:meth:`ImplicitKernel._build_expansion`) that the fused ops read, as flat
    sorted entries: ``target += sources[col] * value``. The small pieces (hidden Linears, biases, batch-norm shifts)
    land on a compact dense layout (``pieces``: (key, shape, offset)); the last Linear's weight, (R, H, C_in) with a
    few percent of it structural, stays a list of entries with each one's target ``t`` = (r H + h) C_in + c, its
    hidden unit ``h``, channel ``h // D`` and kernel position ``r C_in + c``: its folds and their gradients are
    gathers and index_adds over the entries, never a pass over the dense weight. Built once per device and dtype."""

    def __init__(
        self,
        kernel_pieces,
        bounds,
        cols: Tensor,
        values: Tensor,
        targets: Tensor,
        keep,
        final_key,
        layout: Tuple[int, int, int, int],
        dtype,
    ):
        R, H, C, D = layout
        sel_cols, sel_vals, sel_tgt, pieces = [], [], [], []
        offset = 0
        self.final = None
        for i, (key, shape) in enumerate(kernel_pieces):
            if key not in keep and key != final_key:
                continue
            (lo, start), (hi, _) = bounds[i], bounds[i + 1]
            if key == final_key:
                t = targets[lo:hi] - start
                h = (t // C) % H
                self.final = (cols[lo:hi], values[lo:hi].to(dtype), t, h, h // D, (t // (H * C)) * C + t % C)
                continue
            sel_cols.append(cols[lo:hi])
            sel_vals.append(values[lo:hi])
            sel_tgt.append(targets[lo:hi] - start + offset)
            pieces.append((key, tuple(shape), offset))
            offset += math.prod(shape)
        self.cols = torch.cat(sel_cols)
        self.values = torch.cat(sel_vals).to(dtype)
        self.targets = torch.cat(sel_tgt)
        self.pieces = pieces
        self.offsets = {key: off for key, _, off in pieces}  # the flat offset of each small piece
        self._keys = [key for key, _, _ in pieces]
        self._shapes = [list(shape) for _, shape, _ in pieces]
        self._offsets = [off for _, _, off in pieces]
        self.size = offset
        self.layout = layout
        self.bias_key = ("b", final_key[1])
        # the transpose's entries: the small pieces', then the final weight's
        self.all_cols = torch.cat([self.cols, self.final[0]])
        self.all_values = torch.cat([self.values, self.final[1]])

    def expand(self, sources: Sequence[Tensor]) -> Dict[tuple, Tensor]:
        """The small pieces by key, and under ``"final"`` the final weight's entries' products (no autograd: the
        caller's mode)."""
        fast = _native_passes(sources[0])
        if fast is not None:  # the same sums, the pieces as views of one flat tensor
            *views, contrib = fast.pack_expand(
                list(sources),
                self.cols,
                self.values,
                self.targets,
                self.size,
                self.final[0],
                self.final[1],
                self._shapes,
                self._offsets,
            )
            out = dict(zip(self._keys, views))
        else:
            src = torch.cat([t.reshape(-1) for t in sources])
            flat = src.new_zeros(self.size).index_add_(0, self.targets, src.index_select(0, self.cols) * self.values)
            contrib = src.index_select(0, self.final[0]) * self.final[1]
            out = {key: flat[off : off + math.prod(shape)].view(shape) for key, shape, off in self.pieces}
        out["final"] = contrib
        return out

    def final_weight(self, parts: dict, pending, dtype):
        """(weight (R, H, C_in), bias (R, C_in)) of the last Linear from its entries, the last batch norm's
        (factor, shift) folded in: ``W[t] f[channel]`` and ``B + sum_h s[h] W[:, h, :]``, summed entry by entry."""
        R, H, C, D = self.layout
        contrib, (_, _, t, h, ch, rc) = parts["final"], self.final
        b = parts.get(self.bias_key)
        fast = _native_passes(contrib)
        if fast is not None:
            f, s = (None, None) if pending is None else (pending[0].contiguous(), pending[1].contiguous())
            w, fb = fast.pack_final(contrib, t, h, ch, rc, f, s, b, R, H, C, H // D)
            return w, fb
        if pending is None:
            w = contrib.new_zeros(R * H * C).index_add_(0, t, contrib)
            return w.view(R, H, C), (contrib.new_zeros(R, C) if b is None else b.view(R, C))
        f, s = pending
        w = contrib.new_zeros(R * H * C).index_add_(0, t, contrib * f.index_select(0, ch))
        extra = contrib.new_zeros(R * C).index_add_(0, rc, contrib * s.reshape(-1).index_select(0, h))
        return w.view(R, H, C), (extra if b is None else b + extra).view(R, C)

    def final_vjp(self, contrib: Tensor, pending, gfw: Optional[Tensor], gfb: Optional[Tensor]):
        """:meth:`final_weight`'s vector-Jacobian product given the gradients of the weight and bias (None: zero):
        (the gradient of each entry's product, of the factor, of the shift; None where it is zero)."""
        R, H, C, D = self.layout
        _, _, t, h, ch, rc = self.final
        g = gf = gs = None
        if gfw is not None:  # w[t] = sum of its entries' contrib, times f[channel]
            gfw_e = gfw.reshape(-1).index_select(0, t)
            if pending is None:
                g = gfw_e
            else:
                g = gfw_e * pending[0].index_select(0, ch)
                gf = pending[0].new_zeros(pending[0].shape[0]).index_add_(0, ch, gfw_e * contrib)
        if gfb is not None and pending is not None:  # b[rc] += sum of its entries' contrib times s[h]
            s = pending[1]
            gfb_e = gfb.reshape(-1).index_select(0, rc)
            gb = gfb_e * s.reshape(-1).index_select(0, h)
            g = gb if g is None else g + gb
            gs = s.new_zeros(s.numel()).index_add_(0, h, gfb_e * contrib).view_as(s)
        return g, gf, gs

    def transpose(
        self, grads: Dict[tuple, Optional[Tensor]], final: Optional[Tensor], sources: Sequence[Tensor]
    ) -> List[Tensor]:
        """The expansion's vector-Jacobian product: each source's gradient from the small pieces' gradients (None:
        zero) and the final weight's entries' (None: zero)."""
        ref = sources[0]
        flat = torch.cat(
            [
                ref.new_zeros(math.prod(shape)) if grads.get(key) is None else grads[key].reshape(-1)
                for key, shape, _ in self.pieces
            ]
        )
        sizes = [t.numel() for t in sources]
        ge = flat.index_select(0, self.targets)
        ge = torch.cat([ge, ref.new_zeros(self.final[0].shape[0]) if final is None else final])
        g = ref.new_zeros(sum(sizes)).index_add_(0, self.all_cols, ge * self.all_values)
        return [p.view_as(t) for p, t in zip(torch.split(g, sizes), sources)]


# The native extension's fused passes over the entries (csrc/cpu/packing_cpu.cpp) on CPU tensors when it is loaded;
# False: always the PyTorch form below them (what they compute, and the path off the CPU)
NATIVE_PASSES = True


_FLOATS = (torch.float32, torch.float64)


def _native_passes(t: Tensor):
    """The native module when its packing passes apply to ``t``, else None (also while torch.compile traces: they are
    not registered ops, and the PyTorch form traces)."""
    if (
        not NATIVE_PASSES
        or t.is_cuda
        or t.dtype not in _FLOATS
        or t.device.type != "cpu"
        or torch.compiler.is_compiling()
    ):
        return None
    from ._native import module

    return module()


class SourcePacking:
    """What :meth:`KernelProgram.packed` needs to pack one program from its kernel's learnable tensors: the map,
    the tensors it reads (``sources``, in the map's column order), each batch norm's scale and sigma. Without
    autograd the packing is plain tensors; with autograd, one :class:`_FromSources` node (a statistics pass's packing
    with autograd on, and a packing in another dtype, take the plain path)."""

    def __init__(self, pmap: PackingMap, sources: List[Tensor], scales: List[Optional[Tensor]], sigma: Tensor):
        self.map, self.sources, self.scales, self.sigma = pmap, sources, scales, sigma

    def inputs(self) -> list:
        return [self.sigma, *[s for s in self.scales if s is not None], *self.sources]

    def expanded(self, program) -> Dict[tuple, Tensor]:
        with torch.no_grad():
            return program._memo(("expanded",), None, self.map.expand, self.sources)

    def finish(self, program, k: int, moments: Tensor, count: int):
        """Hidden layer k's batch statistics from a statistics pass's moments through the native extension, or None
        where it does not apply (then :meth:`BatchNorm.finish`): with them it makes the fold's (factor, shift) that
        :meth:`KernelProgram.pendings` would make next (one call in place of about twenty operators), memoised
        for it."""
        bn = program.hidden[k].bn
        fast = _native_passes(moments)
        dt = moments.dtype
        if fast is None or bn.sync or self.sigma.dtype != dt or bn.avg.dtype != dt or bn.scale.dtype != dt:
            return None
        shift = self.expanded(program).get(("shift", k))
        if shift is None or not (moments.is_contiguous() and bn.avg.is_contiguous()):
            return None
        mean, var, factor, fshift = fast.pack_bn(moments, count, bn.avg, bn.scale, shift, bn.eps)
        stats = (mean, var)
        program._memo_put(("factors", "packing", k), stats, (factor, fshift))
        return stats

    def packed(self, program, stats: Sequence, dtype: torch.dtype, upto: Optional[int]):
        if self.sigma.dtype != dtype:  # the plain path converts
            return program.packed_from(program.parts(), stats, dtype, upto, "program")
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in self.inputs())
        if not grad:
            return program.packed_from(self.expanded(program), stats, dtype, upto, "packing", self.map.final_weight)
        if upto is not None:  # a statistics pass's packing, differentiable: the plain operators
            return program.packed_from(program.parts(), stats, dtype, upto, "program")
        from .program import PackedProgram

        L = len(program.hidden)
        outs = _FromSources.apply(self, program, stats, dtype, *self.inputs())
        fourier, fourier_inv = program._fourier(dtype)
        return PackedProgram(
            list(outs[:L]),
            list(outs[L : 2 * L]),
            fourier,
            fourier_inv,
            outs[2 * L],
            outs[2 * L + 1],
            outs[2 * L + 2],
            float(program.norm),
            program.dim,
            program.final_mask,
        )


class _FromSources(torch.autograd.Function):
    """Learnable tensors (sigma, the batch norms' scales, the expansion's sources) -> the packed program's weights,
    biases, final weight and bias, coef. See the module docstring; the statistics are constants (escnn's rule).

    The folds' vector-Jacobian product, for a batch norm (factor f = scale / sqrt(var + eps), shift
    s = shift_bn - mean f) folded into the Linear after it (weight W on the channel-major input: ``W f``, ``b + W s``):
    ``dW = dW' f + db' s^T``, ``df = sum dW' W`` over all but the input channel, ``ds = W^T db'``, then
    ``dshift_bn = ds`` and ``dscale = (df - sum_a ds mean) / sqrt(var + eps)``; coef = 1 / (2 sigma^2) gives
    ``dsigma = -4 sigma coef^2 dcoef``."""

    @staticmethod
    def forward(ctx, packing, program, stats, dtype, *inputs):
        ctx.set_materialize_grads(False)
        parts = packing.expanded(program)
        p = program.packed_from(parts, stats, dtype, None, "packing", packing.map.final_weight)
        ctx.packing, ctx.program, ctx.stats, ctx.dtype, ctx.parts = packing, program, stats, dtype, parts
        ctx.coef = p.coef
        ctx.save_for_backward(*inputs)
        # fresh tensor objects: the memoised ones belong to the program (and autograd marks what a forward returns)
        return tuple(t.detach() for t in (*p.weights, *p.biases, p.final_weight, p.final_bias, p.coef))

    @staticmethod
    def backward(ctx, *grads):
        prog, packing = ctx.program, ctx.packing
        inputs = ctx.saved_tensors
        if torch.is_grad_enabled():
            return (None,) * 4 + _plain_vjp(prog, ctx.stats, ctx.dtype, inputs, grads)
        L = len(prog.hidden)
        parts = ctx.parts
        pend = prog.pendings(ctx.stats, parts, "packing")
        fast = _native_passes(parts["final"])
        if fast is not None:
            return (None,) * 4 + _native_vjp(fast, ctx, pend, grads)
        g_parts: Dict[tuple, Tensor] = {}
        g_factor: List[Optional[Tensor]] = [None] * L
        g_shift: List[Optional[Tensor]] = [None] * L

        def add(key, g):
            g_parts[key] = g if key not in g_parts else g_parts[key] + g

        for k in range(L):
            p = pend[k - 1] if k > 0 else None
            gw, gb = grads[k], grads[L + k]
            if gb is not None and ("b", k) in parts:
                add(("b", k), gb)
            if prog.componentwise(k):
                CW = parts[("cw", k)]  # (D, C_out, C_in): w = CW f[c_in]; b += sum_c' CW[a, c, c'] s[c', a]
                if gw is not None:
                    add(("cw", k), gw if p is None else gw * p[0])
                    if p is not None:
                        g_factor[k - 1] = (gw * CW).sum((0, 1))
                if gb is not None and p is not None:
                    D, C = CW.shape[0], CW.shape[1]
                    gbv = gb.view(C, D).t()  # (D, C_out)
                    add(("cw", k), gbv.unsqueeze(2) * p[1].t().unsqueeze(1))
                    g_shift[k - 1] = torch.bmm(CW.transpose(1, 2), gbv.unsqueeze(2)).view(D, -1).t()
            else:
                W = parts[("w", k)]  # (R, C_in * d): w = W f[c_in]; b += W s
                if gw is not None:
                    if p is None:
                        add(("w", k), gw)
                    else:
                        R, C = W.shape[0], p[0].shape[0]
                        gv = gw.view(R, C, -1)
                        add(("w", k), (gv * p[0].view(-1, 1)).view(R, -1))
                        g_factor[k - 1] = (gv * W.view(R, C, -1)).sum((0, 2))
                if gb is not None and p is not None:
                    add(("w", k), torch.outer(gb, p[1].reshape(-1)))
                    g_shift[k - 1] = torch.mv(W.t(), gb).view_as(p[1])
        p = pend[L - 1] if L > 0 else None
        gfw, gfb, gcoef = grads[2 * L], grads[2 * L + 1], grads[2 * L + 2]
        if gfb is not None and ("b", L) in parts:
            add(("b", L), gfb.reshape(-1))
        g_final, gf, gs = packing.map.final_vjp(parts["final"], p, gfw, gfb)  # the final weight's entries'
        if p is not None:
            g_factor[L - 1], g_shift[L - 1] = gf, gs
        g_scales, j = [], 0
        for k, layer in enumerate(prog.hidden):
            if layer.bn is None:
                continue
            gf, gs = (g_factor[k], g_shift[k]) if pend[k] is not None else (None, None)
            if gf is not None or gs is not None:
                mean, var = layer.bn.statistics(ctx.stats[j] if prog.training else None)
            if gs is not None:  # s = shift_bn - mean f
                add(("shift", k), gs)
                extra = -(gs * mean).sum(1)
                gf = extra if gf is None else gf + extra
            if gf is not None:  # f = scale / sqrt(var + eps)
                gf = gf / torch.sqrt(var + layer.bn.eps)
            g_scales.append(gf)
            j += 1
        g_sigma = None
        if gcoef is not None:  # coef = 1 / (2 sigma^2)
            c = ctx.coef
            g_sigma = (gcoef * c * c).sum().neg() * (4 * inputs[0])
        g_src = packing.map.transpose(g_parts, g_final, inputs[1 + len(g_scales) :])
        out = [g_sigma, *g_scales, *g_src]
        return (None,) * 4 + tuple(g if t.requires_grad else None for g, t in zip(out, inputs))


def _native_vjp(fast, ctx, pend, grads) -> tuple:
    """:class:`_FromSources`'s backward below, in one call of the native extension (``pack_vjp``: the same sums)."""
    prog, m, parts, stats = ctx.program, ctx.packing.map, ctx.parts, ctx.stats
    inputs = ctx.saved_tensors
    off = m.offsets
    L = len(prog.hidden)
    weights, cw, factors, shifts, means, variances, eps, bn_layers, off_w, off_b, off_shift = ([] for _ in range(11))
    j = 0
    for k, layer in enumerate(prog.hidden):
        c = prog.componentwise(k)
        key = ("cw", k) if c else ("w", k)
        weights.append(parts[key])
        cw.append(int(c))
        p = pend[k]
        factors.append(None if p is None else p[0])
        shifts.append(None if p is None else p[1])
        mean = var = None
        if layer.bn is not None:
            bn_layers.append(k)
            if p is not None:
                mean, var = layer.bn.statistics(stats[j] if prog.training else None)
            j += 1
        means.append(mean)
        variances.append(var)
        eps.append(0.0 if layer.bn is None else float(layer.bn.eps))
        off_w.append(off.get(key, -1))
        off_b.append(off.get(("b", k), -1))
        off_shift.append(off.get(("shift", k), -1))
    off_b.append(off.get(("b", L), -1))
    R, H, C, D = m.layout
    _, _, t, h, ch, rc = m.final
    sources = inputs[1 + len(bn_layers) :]
    res = fast.pack_vjp(
        list(grads),
        weights,
        cw,
        factors,
        shifts,
        means,
        variances,
        eps,
        bn_layers,
        off_w,
        off_b,
        off_shift,
        m.size,
        parts["final"],
        t,
        h,
        ch,
        rc,
        R,
        H,
        C,
        H // D,
        m.targets,
        m.all_cols,
        m.all_values,
        [list(x.shape) for x in sources],
        ctx.coef,
        inputs[0],
    )
    n = len(sources)
    out = [res[n], *res[n + 1 :], *res[:n]]  # sigma, the scales, the sources
    return tuple(x if t.requires_grad else None for x, t in zip(out, inputs))


def _plain_vjp(prog, stats, dtype, inputs, grads) -> tuple:
    """:class:`_FromSources`'s vector-Jacobian product through the plain path's operators (differentiable, for a
    double backward): the program's own lowering of the same learnable tensors, differentiated."""
    with torch.enable_grad():
        p = prog.packed_from(prog.parts(), stats, dtype, None, "program")
    outs = (*p.weights, *p.biases, p.final_weight, p.final_bias, p.coef)
    pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
    need = [i for i, t in enumerate(inputs) if t.requires_grad]
    res: List[Optional[Tensor]] = [None] * len(inputs)
    if pairs and need:
        got = torch.autograd.grad(
            [o for o, _ in pairs],
            [inputs[i] for i in need],
            [g for _, g in pairs],
            create_graph=True,
            allow_unused=True,
        )
        for i, g in zip(need, got):
            res[i] = g
    return tuple(res)
