"""The lowered kernel program: everything a backend needs to evaluate an implicit kernel, and nothing from escnn.

:class:`~ik_fast.ImplicitKernel` lowers its escnn MLP into a :class:`KernelProgram` once per forward pass (cached in
eval mode). The program is a frozen dataclass of plain tensors, differentiable with respect to the escnn parameters
it was expanded from; an :class:`~ik_fast.ImplicitKernel`'s program expands its dense tensors only when something reads
them (:class:`Deferred`), carries how to pack the fused ops' inputs straight from the learnable tensors (``packing``),
and memoises its folds (``meta``). Its semantics, for an edge with vector ``d`` (E, n) and attributes ``a`` (E, A)::

    h_0 = [d, a]
    h_k = BN_k(ELU_Fourier(W_k h_{k-1} + b_k))            k = 1 .. len(hidden)
    K   = norm * s(|d|) * (W_K . h_last + B_K)            s(r) = exp(-r^2 / (2 sigma^2))

where ``ELU_Fourier(x) = Ainv ELU(A x)`` channel by channel (a plain ELU when ``A`` is None), ``BN_k`` is escnn's
IIDBatchNorm1d, and ``W_K`` (R, H, C_in) is the last Linear laid out as the kernel: K[r, c] = sum_h W_K[r, h, c] h[h].

Block structure: each Linear keeps its dense expansion (for the reference) and, where it pays, a :class:`BlockPlan`
that groups the structurally non-zero entries into small dense GEMMs (escnn's expanded matrices are mostly structural
zeros).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "BlockPlan",
    "Linear",
    "BatchNorm",
    "Hidden",
    "KernelProgram",
    "PackedProgram",
    "build_plan",
    "Deferred",
    "DeferredLinear",
    "DeferredBatchNorm",
]


# ----------------------------------------------------------------------------------------------------------------
# block plans
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BlockPlan:
    """Structure of a structurally sparse (R, C) matrix ``W`` as batched dense GEMMs.

    Inputs come in field groups: ``col_groups[g]`` (F_in, d_in) holds the columns of the fields of one representation
    (their components along dim 1). Outputs likewise: ``rows[r]`` (F_out, d_out). Fields of one representation share a
    sparsity pattern, so for output component ``a`` of row group ``r`` and each term ``(g, comp, valid)`` only the
    input components ``comp[a]`` (d_out, J; zero-padded where ``valid`` is False) of every field of group g can be
    non-zero. The product is then, per row group, one batched GEMM over ``a``:
    ``y[a] (n, F_out) = [x_g[:, comp[a, j], f] for terms, j, f] (n, L) @ blocks[r][a] (L, F_out)``.
    """

    col_groups: Tuple[Tensor, ...]
    rows: Tuple[Tensor, ...]
    terms: Tuple[Tuple[Tuple[int, Tensor, Tensor], ...], ...]
    out_index: Optional[Tensor]  # (R,) position of each row in cat(group outputs, [zero]); None if the identity
    shape: Tuple[int, int]
    contiguous: Tuple[bool, ...]  # col group g is arange(F_in * d_in).reshape(F_in, d_in)
    # (F, d) when the matrix only mixes equal components of F fields of one representation of size d,
    # W[(f, a), (f', a')] = 0 unless a = a' (each irrep of the field once and of real type: O(3), SO(3), ...)
    componentwise: Optional[Tuple[int, int]] = None

    @property
    def macs_per_row(self) -> int:
        """Multiply-adds per input row of the structured product (the dense one costs R * C)."""
        return int(
            sum(
                comp.numel() * self.col_groups[g].shape[0] * rows.shape[0]
                for rows, terms in zip(self.rows, self.terms)
                for g, comp, _ in terms
            )
        )

    def gather(self, weight: Tensor) -> Tuple[Tensor, ...]:
        """Per row group, the (d_out, L, F_out) weights of its batched GEMM, gathered from the dense ``weight``."""
        out = []
        for rows, terms in zip(self.rows, self.terms):
            rt = rows.t()  # (d_out, F_out)
            parts = []
            for g, comp, valid in terms:
                cols = self.col_groups[g].t()[comp]  # (d_out, J, F_in)
                w = weight[rt[:, None, None, :], cols[:, :, :, None]]  # (d_out, J, F_in, F_out)
                w = w * valid[:, :, None, None].to(w.dtype)
                parts.append(w.reshape(w.shape[0], -1, w.shape[-1]))
            out.append(torch.cat(parts, 1))
        return tuple(out)

    def split(self, x: Tensor) -> List[Tensor]:
        """Component-major views (n, d_in, F_in) of each input field group of x (n, C)."""
        out = []
        for cg, contiguous in zip(self.col_groups, self.contiguous):
            f_in, d_in = cg.shape
            if contiguous:
                out.append(x.reshape(x.shape[0], f_in, d_in).transpose(1, 2))
            else:
                out.append(x[:, cg.t()])
        return out

    def apply_split(self, xs: Sequence[Tensor], blocks: Sequence[Tensor]) -> List[Tensor]:
        """Products per row group, (d_out, n, F_out), from component-major inputs (see :meth:`split`)."""
        ys = []
        for terms, w in zip(self.terms, blocks):
            parts = []
            for g, comp, _ in terms:
                x = xs[g]
                d_out, J = comp.shape
                xg = x.index_select(1, comp.reshape(-1))  # (n, d_out * J, F_in); backward is an index_add
                parts.append(xg.reshape(x.shape[0], d_out, -1))
            xcat = parts[0] if len(parts) == 1 else torch.cat(parts, 2)
            ys.append(torch.bmm(xcat.transpose(0, 1), w))
        return ys

    def merge(self, ys: Sequence[Tensor]) -> Tensor:
        """Row-group products (d_out, n, F_out) -> y (n, R)."""
        n = ys[0].shape[1]
        flat = [y.permute(1, 2, 0).reshape(n, -1) for y in ys]
        if self.out_index is None:
            return flat[0] if len(flat) == 1 else torch.cat(flat, dim=1)
        flat.append(ys[0].new_zeros(n, 1))
        return torch.cat(flat, dim=1)[:, self.out_index]

    def apply(self, x: Tensor, blocks: Sequence[Tensor]) -> Tensor:
        """``x @ W.T`` for x (n, C), using the gathered ``blocks``."""
        return self.merge(self.apply_split(self.split(x), blocks))

    def to(self, device) -> "BlockPlan":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return BlockPlan(
            tuple(mv(c) for c in self.col_groups),
            tuple(mv(r) for r in self.rows),
            tuple(tuple((g, mv(c), mv(v)) for g, c, v in terms) for terms in self.terms),
            mv(self.out_index),
            self.shape,
            self.contiguous,
            self.componentwise,
        )


def build_plan(
    mask: Tensor, row_groups: Sequence[Tensor], col_groups: Sequence[Tensor], min_saving: float = 2.0
) -> Optional[BlockPlan]:
    """Plan for a matrix whose structural non-zeros are ``mask`` (R, C).

    ``row_groups``: index tensors (F_out, d_out) of output rows, one per field type (the fields of a group share a
    representation, so they share a sparsity pattern up to their offsets); ``col_groups`` likewise (F_in, d_in) for
    the input columns. Returns None when the structured product would save less than ``min_saving`` x.
    """
    R, C = mask.shape
    rows_out, terms_out = [], []
    for rg in row_groups:
        f_out, d_out = rg.shape
        terms = []
        for g, cg in enumerate(col_groups):
            f_in, d_in = cg.shape
            sub = mask[rg.t().reshape(-1)[:, None], cg.reshape(-1)[None, :]]  # (d_out * F_out, F_in * d_in)
            pat = sub.reshape(d_out, f_out, f_in, d_in).any(1).any(1)  # (d_out, d_in)
            J = int(pat.sum(1).max())
            if J == 0:
                continue
            order = torch.argsort((~pat).to(torch.int8), dim=1, stable=True)[:, :J]  # non-zeros first
            terms.append((g, order.contiguous(), torch.gather(pat, 1, order)))
        if terms:
            rows_out.append(rg)
            terms_out.append(tuple(terms))
    out_index = torch.full((R,), -1, dtype=torch.long)
    pos = 0
    for rows in rows_out:
        flat = rows.reshape(-1)  # field-major, as merge() lays them out
        out_index[flat] = torch.arange(pos, pos + flat.numel())
        pos += flat.numel()
    out_index[out_index < 0] = pos  # rows without any non-zero read the zero column
    if pos == R and bool((out_index == torch.arange(R)).all()):
        out_index = None
    contiguous = tuple(cg.numel() == C and bool((cg.reshape(-1) == torch.arange(C)).all()) for cg in col_groups)
    componentwise = None
    if (
        len(rows_out) == 1
        and len(col_groups) == 1
        and len(terms_out[0]) == 1
        and out_index is None
        and contiguous[0]
        and tuple(col_groups[0].shape) == tuple(rows_out[0].shape)
    ):
        f, d = rows_out[0].shape
        _, comp, valid = terms_out[0][0]
        if comp.shape == (d, 1) and bool((comp[:, 0] == torch.arange(d)).all()) and bool(valid.all()):
            componentwise = (int(f), int(d))
    plan = BlockPlan(tuple(col_groups), tuple(rows_out), tuple(terms_out), out_index, (R, C), contiguous, componentwise)
    if not rows_out or plan.macs_per_row * min_saving > R * C:
        return None
    return plan


# ----------------------------------------------------------------------------------------------------------------
# program pieces
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Linear:
    """y = x W^T + b, with W (out, in) dense and, optionally, its block plan. The plan's gathered weights
    (:attr:`blocks`) are built on first use, so a consumer of the dense weight alone (the fused ops) never pays for
    them."""

    weight: Tensor
    bias: Optional[Tensor]
    plan: Optional[BlockPlan] = None
    # of a componentwise hidden Linear, when the lowering has it: (D, C_out, C_in) = W[c * D + a, c' * D + a], the
    # fused ops' form (else :meth:`KernelProgram.packed` takes W's diagonals)
    cw: Optional[Tensor] = None

    @property
    def blocks(self) -> Tuple[Tensor, ...]:
        cached = self.__dict__.get("_blocks")
        if cached is None:
            cached = self.plan.gather(self.weight) if self.plan is not None else ()
            object.__setattr__(self, "_blocks", cached)
        return cached

    def with_blocks(self) -> "Linear":
        """Self, with :attr:`blocks` gathered now (before a checkpointed region that reads them: recomputation
        must see the same operations as the first pass)."""
        self.blocks  # noqa: B018
        return self

    def dense(self, x: Tensor) -> Tensor:
        # x @ W^T with W^T materialised: autograd then forms the weight gradient as x^T @ grad, a GEMM shape that
        # BLAS runs ~15x faster than grad^T @ x when the input is narrow (the first layer's n + A columns)
        y = x @ self.weight.t().contiguous()
        return y if self.bias is None else y + self.bias

    def structured(self, x: Tensor) -> Tensor:
        if self.plan is None:
            return self.dense(x)
        y = self.plan.apply(x, self.blocks)
        return y if self.bias is None else y + self.bias

    def fold(self, scale: Tensor, shift: Tensor, inner: int = 1, gather: bool = True) -> "Linear":
        """This Linear applied after the affine map ``h -> h * scale + shift`` on its input (scale, shift (H,)),
        where each input column index is ``h * inner + k`` (``inner`` > 1 for the kernel-layout last layer).
        ``gather=False`` drops the block plan (for consumers of the dense weight only)."""
        R = self.weight.shape[0]
        w3 = self.weight.reshape(R, -1, inner)
        weight = (w3 * scale[None, :, None]).reshape(R, -1)
        extra = (w3.reshape(R, -1) @ shift) if inner == 1 else torch.matmul(shift, w3).reshape(-1)  # (einsum: 3x
        # the operators)
        bias = extra if self.bias is None else self.bias + extra
        return Linear(weight, bias, self.plan if gather else None)


@dataclass(frozen=True)
class BatchNorm:
    """escnn's IIDBatchNorm1d on ``channels`` fields of one representation of size ``dim``.

    In training the statistics of the batch (all edges of the call) are used, detached from the gradient, and
    returned so that the module can update its running statistics; in eval mode the running ones are used.
    """

    training: bool
    eps: float
    avg: Tensor  # (dim, dim) projection onto the trivial irreps of the field
    scale: Tensor  # (channels,) learnable weight
    shift: Tensor  # (channels, dim) expanded learnable bias
    running_mean: Tensor  # (channels, dim)
    running_var: Tensor  # (channels,)
    sync: bool = False  # statistics over every process's edges (torch.distributed), see :meth:`finish`
    avg_t: Optional[Tensor] = None  # avg.t(), when the lowering keeps that view across passes

    def batch_stats(self, h: Tensor) -> Tuple[Tensor, Tensor]:
        """(mean (C, d), var (C,)) of h (E, C, d), as escnn's ``_estimate_stats``, detached.

        escnn takes ``Tensor.var`` of the centred features, which re-centres them: the variance is the plain unbiased
        per-component one, averaged over the field. Column sums go through GEMV (a column reduction in
        ``Tensor.var`` is an order of magnitude slower on CPU)."""
        with torch.no_grad():
            E = h.shape[0]
            flat = h.reshape(E, -1)
            ones = flat.new_ones(1, E)
            mu = (ones @ flat) / E
            m2 = ones @ (flat - mu).square()
            return self.finish(torch.cat([mu, m2]), E)

    def finish(self, moments: Tensor, count: int) -> Tuple[Tensor, Tensor]:
        """Batch statistics (mean (C, d), var (C,)) from per-component moments (2, C * d) — column means and sums
        of squared deviations — over ``count`` edges (the statistics finish of every backend)."""
        if self.sync:
            moments, count = _all_reduce_moments(moments, count)
        C = self.running_var.shape[0]
        m = moments.view(2, C, -1) if moments.is_contiguous() else moments.reshape(2, C, -1)
        dt = self.avg.dtype
        avg_t = self.avg.t() if self.avg_t is None else self.avg_t
        var = _as(m[1] / scalar(count - 1, m.dtype), dt)
        return torch.mm(_as(m[0], dt), avg_t), var.mean(-1)

    def statistics(self, stats: Optional[Tuple[Tensor, Tensor]]) -> Tuple[Tensor, Tensor]:
        """(mean (C, d), var (C,)) it normalises with: the batch's ``stats`` in training, the running ones in eval."""
        return stats if self.training else (self.running_mean, self.running_var)

    def factors(self, stats: Optional[Tuple[Tensor, Tensor]], shift: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """(factor (C,), shift (C, d)) such that the batch norm is h[:, c, a] -> h[:, c, a] * factor[c] + shift[c, a]
        (the statistics of the batch in training, the running ones in eval mode); ``shift``: the expanded learnable
        shift to use instead of :attr:`shift` (the same values, from another lowering)."""
        mean, var = self.statistics(stats)
        factor = self.scale / torch.sqrt(var + scalar(self.eps, var.dtype))
        return factor, (self.shift if shift is None else shift) - mean * factor.view(-1, 1)

    def affine(self, stats: Optional[Tuple[Tensor, Tensor]]) -> Tuple[Tensor, Tensor]:
        """(scale, shift), each (C * d,), such that the batch norm is h -> h * scale + shift."""
        factor, shift = self.factors(stats)
        return factor[:, None].expand_as(shift).reshape(-1), shift.reshape(-1)

    def __call__(self, h: Tensor, stats: Optional[Tuple[Tensor, Tensor]]) -> Tensor:
        mean, var = stats if self.training else (self.running_mean, self.running_var)
        factor = self.scale / torch.sqrt(var + self.eps)
        return (h - mean) * factor[:, None] + self.shift


class Deferred:
    """The lowered tensors of one program, made on first use: ``make()`` returns them by key (the keys of
    :meth:`KernelProgram.parts`). An :class:`~ik_fast.ImplicitKernel`'s program defers its expansion so that a fused
    backend, which packs from the learnable tensors (:mod:`ik_fast.packing`), never pays for it."""

    def __init__(self, make):
        self._make, self._parts = make, None

    def parts(self) -> dict:
        if self._parts is None:
            self._parts = self._make()
        return self._parts

    def __call__(self, key) -> Optional[Tensor]:
        return self.parts().get(key)


class DeferredLinear(Linear):
    """A :class:`Linear` whose weight, bias and componentwise form are ``parts(("w", k))``, ``("b", k)``,
    ``("cw", k)`` of a :class:`Deferred`, read on first use."""

    def __init__(self, parts: Deferred, k: int, plan: Optional[BlockPlan]):
        object.__setattr__(self, "_parts", parts)
        object.__setattr__(self, "_k", k)
        object.__setattr__(self, "plan", plan)

    weight = property(lambda self: self._parts(("w", self._k)))
    bias = property(lambda self: self._parts(("b", self._k)))
    cw = property(lambda self: self._parts(("cw", self._k)))


class DeferredBatchNorm(BatchNorm):
    """A :class:`BatchNorm` whose expanded shift is ``parts(key)`` of a :class:`Deferred`, read on first use."""

    def __init__(
        self,
        parts: Deferred,
        key,
        training: bool,
        eps: float,
        avg: Tensor,
        scale: Tensor,
        running_mean: Tensor,
        running_var: Tensor,
        sync: bool = False,
        avg_t: Optional[Tensor] = None,
    ):
        for name, value in (
            ("_parts", parts),
            ("_key", key),
            ("training", training),
            ("eps", eps),
            ("avg", avg),
            ("scale", scale),
            ("running_mean", running_mean),
            ("running_var", running_var),
            ("sync", sync),
            ("avg_t", avg_t),
        ):
            object.__setattr__(self, name, value)

    shift = property(lambda self: self._parts(self._key))


def _all_reduce_moments(moments: Tensor, count: int) -> Tuple[Tensor, int]:
    """Moments (2, K) over ``count`` local edges -> the moments of the union of every process's edges (one
    all-reduce of counts, sums and sums of squares; a no-op without an initialised process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return moments, count
    n = moments.new_full((1,), float(count))
    mean, m2 = moments[0], moments[1]
    packed = torch.cat([n, n * mean, m2 + n * mean * mean])
    dist.all_reduce(packed)
    K = mean.shape[0]
    N = packed[0]
    mu = packed[1 : 1 + K] / N
    M2 = (packed[1 + K :] - N * mu * mu).clamp_min(0)
    return torch.stack([mu, M2]), int(N.item())


class _FourierELU(torch.autograd.Function):
    """``ELU(x A^T) Ainv^T`` per channel, saving only its input x (E, C, d): the backward recomputes ``x A^T`` (one
    small GEMM) instead of keeping the activation on the grid, which is grid/d times larger (2.4x for O(3)'s
    120-point grid). Both directions go over edge chunks so that the grid activation exists for one chunk at a time.
    The backward is made of differentiable operations, so double backward works."""

    CHUNK = 8192

    @staticmethod
    def forward(ctx, x, A, Ainv):
        ctx.save_for_backward(x, A, Ainv)
        n = _FourierELU.CHUNK
        if x.shape[0] <= n:
            return F.elu(x @ A.t(), inplace=True) @ Ainv.t()
        out = x.new_empty(*x.shape[:-1], Ainv.shape[0])
        for s in range(0, x.shape[0], n):
            torch.matmul(F.elu(x[s : s + n] @ A.t(), inplace=True), Ainv.t(), out=out[s : s + n])
        return out

    @staticmethod
    def backward(ctx, grad):
        x, A, Ainv = ctx.saved_tensors
        # the backward runs outside autocast: compute in the dtype the forward saw (bfloat16 under autocast)
        A, Ainv, grad = A.to(x.dtype), Ainv.to(x.dtype), grad.to(x.dtype)
        parts = []
        for s in range(0, x.shape[0], _FourierELU.CHUNK):
            u = x[s : s + _FourierELU.CHUNK] @ A.t()
            g = grad[s : s + _FourierELU.CHUNK] @ Ainv
            g = torch.ops.aten.elu_backward(g, 1.0, 1, 1, False, u)  # g * ELU'(u), itself differentiable
            parts.append(g @ A)
        return (parts[0] if len(parts) == 1 else torch.cat(parts)), None, None


@dataclass(frozen=True)
class Hidden:
    """One hidden layer: Linear -> Fourier ELU (or pointwise ELU) -> batch norm."""

    linear: Linear
    channels: int
    dim: int
    A: Optional[Tensor]  # (grid, dim)
    Ainv: Optional[Tensor]  # (dim, grid)
    bn: Optional[BatchNorm]

    def activate(self, x: Tensor) -> Tensor:
        """Linear output (E, channels * dim) -> activation (E, channels, dim)."""
        x = x.reshape(x.shape[0], self.channels, self.dim)
        if self.A is None:
            return F.elu(x)
        return _FourierELU.apply(x, self.A, self.Ainv)


@dataclass(frozen=True)
class PackedProgram:
    """The lowered program as the fused ops take it (see :mod:`ik_fast.ops`): every batch norm folded, unpadded.
    Hidden layer k: ``h_k = act_k(h_{k-1} weights[k]^T + biases[k])`` (``weights[k]`` (H_k, H_{k-1}), dense; or
    (D, C, C) where the Linear only mixes the C channels' equal components (:attr:`BlockPlan.componentwise`):
    ``y[:, c, a] = sum_c' weights[k][a, c, c'] h[:, c', a]`` on the channel-major (C, D) view) with the Fourier ELU on
    ``fourier[k]`` (G, D) / ``fourier_inv[k]`` (D, G), or a pointwise ELU where those are empty; ``final_weight``
    (R, H, C_in), ``final_bias`` (R, C_in); ``coef`` (1,) = 1 / (2 sigma^2); ``ndim`` leading input columns are d;
    ``final_mask`` the structure of ``final_weight`` (see :mod:`ik_fast.ops`), or None."""

    weights: List[Tensor]
    biases: List[Tensor]
    fourier: List[Tensor]
    fourier_inv: List[Tensor]
    final_weight: Tensor
    final_bias: Tensor
    coef: Tensor
    norm: float
    ndim: int
    final_mask: Optional[Tensor] = None  # bool (R, H, C_in) on the CPU: final_weight's structural non-zeros

    def args(self) -> tuple:
        return (
            self.weights,
            self.biases,
            self.fourier,
            self.fourier_inv,
            self.final_weight,
            self.final_bias,
            self.coef,
            self.norm,
            self.ndim,
            self.final_mask,
        )


def _native_fold(program, k: int, parts: dict, pending, dtype) -> Optional[Tuple[Tensor, Tensor]]:
    """:meth:`KernelProgram._pack_hidden`'s fold of ``pending`` into hidden layer k's Linear in one call of the native
    extension (``pack_fold``: the same products and sums) where it applies (CPU tensors of ``dtype``, no autograd);
    else None."""
    from .packing import _native_passes

    c = program.componentwise(k)
    w, bias = parts.get(("cw", k) if c else ("w", k)), parts.get(("b", k))
    if w is None or w.dtype != dtype or (bias is not None and bias.dtype != dtype):
        return None
    fast = _native_passes(w)
    factor, shift = pending
    if fast is None or factor.dtype != dtype or shift.dtype != dtype:
        return None
    if not (w.is_contiguous() and shift.is_contiguous() and (bias is None or bias.is_contiguous())):
        return None
    return tuple(fast.pack_fold(w, bias, factor, shift, c))


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)`` without an operator when it already is."""
    return t if t.dtype == dtype else t.to(dtype)


_SCALARS: dict = {}


def scalar(value, dtype: torch.dtype):
    """``value`` as a 0-d CPU tensor of ``dtype``, made once. Arithmetic with it gives what arithmetic with the Python
    number gives (both are CPU scalars of the operation, in its dtype), but the profiler records one operator where
    the number costs five (wrapping it into a tensor and converting that). While torch.compile traces, the number
    itself (a traced graph should not capture tensors made on the side)."""
    if torch.compiler.is_compiling():
        return value
    key = (value, dtype)
    t = _SCALARS.get(key)
    if t is None:
        if len(_SCALARS) > 1024:  # values such as edge counts vary from graph to graph
            _SCALARS.clear()
        t = _SCALARS[key] = torch.tensor(value, dtype=dtype)
    return t


@dataclass(frozen=True)
class KernelProgram:
    """The implicit kernel of one forward pass, lowered to plain tensors. See the module docstring."""

    dim: int  # n, the dimension of the base space (2 or 3)
    in_size: int  # C_in = in_type.size
    out_size: int  # R = out_type.size
    attr_size: int  # A = edge_attr_type.size (0 without attributes)
    hidden: Tuple[Hidden, ...]
    final: Linear  # weight (R, H * C_in), bias (R * C_in,) or None; kernel layout
    sigma: Tensor  # () learnable width of the radial shell
    norm: float  # 1 / sqrt(number of output fields)
    training: bool
    meta: dict = field(default_factory=dict, compare=False)
    # bool (R, H, C_in) on the CPU: where the last Linear's weight (kernel layout) can be non-zero, from its basis
    final_mask: Optional[Tensor] = field(default=None, compare=False)
    # how to pack straight from the kernel's learnable tensors (:class:`ik_fast.packing.SourcePacking`), or None
    packing: Optional[object] = field(default=None, compare=False)

    @property
    def hidden_size(self) -> int:
        """H, the size of the last hidden activation (the input size when there is no hidden layer)."""
        if self.hidden:
            return self.hidden[-1].channels * self.hidden[-1].dim
        return self.dim + self.attr_size

    @property
    def hidden_layout(self) -> Tuple[int, int]:
        """(channels, field size) of the last hidden activation; (1, n + A) without hidden layers."""
        if self.hidden:
            return self.hidden[-1].channels, self.hidden[-1].dim
        return 1, self.dim + self.attr_size

    @property
    def batch_norms(self) -> List[BatchNorm]:
        return [h.bn for h in self.hidden if h.bn is not None]

    @property
    def needs_batch_stats(self) -> bool:
        return self.training and bool(self.batch_norms)

    def shell(self, delta: Tensor) -> Tensor:
        """s(|d|) * norm, shape (E,)."""
        r2 = (delta * delta).sum(-1)
        return torch.exp(-0.5 * r2 / (self.sigma * self.sigma)) * self.norm

    def mlp_input(self, delta: Tensor, attr: Optional[Tensor]) -> Tensor:
        return delta if attr is None or attr.shape[1] == 0 else torch.cat([delta, attr], 1)

    def trunk(self, delta: Tensor, attr: Optional[Tensor], stats: Optional[Sequence] = None, structured: bool = False):
        """Hidden activations of the MLP (everything before the last Linear) and the batch statistics used.

        ``stats``: precomputed batch statistics, one per batch-norm layer (training only); when None in training,
        they are computed from this batch.

        ``structured=False`` (the reference): returns ``(h (E, H), stats)`` with every layer applied as written.
        ``structured=True``: uses the block plans and folds each batch norm (an affine map per component once its
        statistics are known) into the Linear after it; returns ``(a, stats, pending)`` where ``a`` is the last
        activation *before* its batch norm and ``pending`` the ``(scale, shift)`` still to apply (None without
        batch norm), for the caller to fold into the last layer.
        """
        h = self.mlp_input(delta, attr)
        used = []
        pending = None
        k = 0
        for layer in self.hidden:
            if structured:
                lin = layer.linear if pending is None else layer.linear.fold(*pending)
                a = layer.activate(lin.structured(h))
            else:
                a = layer.activate(layer.linear.dense(h))
            pending = None
            if layer.bn is not None:
                st = None
                if self.training:
                    st = stats[k] if stats is not None else layer.bn.batch_stats(a)
                    used.append(st)
                if structured:
                    pending = layer.bn.affine(st)
                else:
                    a = layer.bn(a, st)
                k += 1
            h = a.reshape(a.shape[0], -1)
        if structured:
            return h, used, pending
        return h, used

    def _memo(self, key, src, make, *args, **kwargs):
        """``make(*args, **kwargs)``, computed once per program for the statistics object ``src``: the fused
        backends ask for the program once per batch-norm layer (:meth:`packed` with ``upto``), and the earlier
        layers' folds and affine maps do not change in between."""
        memo = self.__dict__.setdefault("_memo_cache", {})
        key = (key, torch.is_grad_enabled())  # (a result made without autograd has no gradient)
        hit = memo.get(key)
        if hit is None or hit[0] is not src:
            hit = memo[key] = (src, make(*args, **kwargs))
        return hit[1]

    def _memo_put(self, key, src, value) -> None:
        """Give :meth:`_memo` the result ``value`` for ``key`` and ``src`` (made without autograd) before it asks."""
        self.__dict__.setdefault("_memo_cache", {})[(key, False)] = (src, value)

    def finish_stats(self, k: int, moments: Tensor, count: int) -> Tuple[Tensor, Tensor]:
        """Hidden layer k's batch statistics from a statistics pass's moments (:meth:`BatchNorm.finish`); a program
        that packs from its kernel's learnable tensors finishes them with the fold (:meth:`SourcePacking.finish`)."""
        if self.packing is not None and not torch.compiler.is_compiling():
            st = self.packing.finish(self, k, moments, count)
            if st is not None:
                return st
        return self.hidden[k].bn.finish(moments, count)

    def packed(self, stats: Sequence, dtype: torch.dtype, upto: Optional[int] = None) -> "PackedProgram":
        """The program as the fused ops take it (:mod:`ik_fast.ops`): batch norms folded with ``stats``, dense,
        unpadded, in ``dtype``; differentiable with respect to the escnn parameters. With ``upto``, only hidden
        layers 1..upto (for the statistics of layer ``upto``; the final weight and bias are then empty).

        The fold order is that of :meth:`trunk` (each batch norm into the Linear after it) and the arithmetic that of
        :meth:`Linear.fold`, written on the per-channel factors of :meth:`BatchNorm.factors` (no per-component scale
        is materialised) and on the componentwise weights the lowering made (:attr:`Linear.cw`); each piece is
        memoised per statistics object, so the passes of one forward (one per batch-norm layer, then conv) build it
        once.

        A program lowered with :attr:`packing` (an :class:`ImplicitKernel`'s, outside torch.compile) packs straight
        from the kernel's learnable tensors, the whole packing one autograd node (:mod:`ik_fast.packing`); otherwise
        the operators below run with autograd recording each."""
        if self.packing is not None and not torch.compiler.is_compiling():
            return self.packing.packed(self, stats, dtype, upto)
        return self.packed_from(self.parts(), stats, dtype, upto, "program")

    def parts(self) -> dict:
        """The learnable tensors the packing reads, by key: ``("w", k)`` each Linear's weight (the last in kernel
        layout (R, H * C_in)), ``("cw", k)`` a componentwise hidden Linear's (D, C, C) form, ``("b", k)`` each bias,
        ``("shift", k)`` each batch norm's expanded shift (k: the hidden layer's index; the last Linear's is
        ``len(hidden)``); absent keys have no tensor."""
        out = {}
        for k, layer in enumerate(self.hidden):
            out[("w", k)], out[("cw", k)], out[("b", k)] = layer.linear.weight, layer.linear.cw, layer.linear.bias
            if layer.bn is not None:
                out[("shift", k)] = layer.bn.shift
        L = len(self.hidden)
        out[("w", L)], out[("b", L)] = self.final.weight, self.final.bias
        return {k: v for k, v in out.items() if v is not None}

    def componentwise(self, k: int) -> bool:
        """Whether hidden layer k's Linear takes the (D, C, C) form in the fused ops."""
        plan = self.hidden[k].linear.plan
        return k > 0 and plan is not None and plan.componentwise is not None

    def pendings(self, stats: Sequence, parts: dict, tag) -> list:
        """Per hidden layer, what its batch norm folds into the next Linear: (factor (C,), shift (C, d)), or None (no
        batch norm, or no statistics for it in training), with the shifts of ``parts``; memoised per statistics
        object under ``tag``."""
        out, j = [], 0
        for k, layer in enumerate(self.hidden):
            p = None
            if layer.bn is not None:
                if not self.training or j < len(stats):
                    src = stats[j] if self.training else None
                    p = self._memo(("factors", tag, k), src, layer.bn.factors, src, parts[("shift", k)])
                j += 1
            out.append(p)
        return out

    def packed_from(
        self, parts: dict, stats: Sequence, dtype: torch.dtype, upto: Optional[int], tag, final=None
    ) -> PackedProgram:
        """:meth:`packed` of the learnable tensors ``parts`` (see :meth:`parts`), memoised under ``tag``; ``final``:
        ``(parts, pending, dtype) -> (weight, bias)`` of the last Linear in place of :meth:`_pack_final`."""
        n = len(self.hidden) if upto is None else upto
        weights, biases = [], []
        pend = self.pendings(stats, parts, tag)
        for k in range(n):
            p = pend[k - 1] if k > 0 else None
            src = None if p is None else self._memo_src(stats, k - 1)
            w, b = self._memo(("layer", tag, k, dtype), src, self._pack_hidden, k, parts, p, dtype)
            weights.append(w)
            biases.append(b)
        fourier, fourier_inv = self._fourier(dtype)
        if upto is None:
            L = len(self.hidden)
            p = pend[L - 1] if L > 0 else None
            src = None if p is None else self._memo_src(stats, L - 1)
            fw, fb = self._memo(("final", tag, dtype), src, final or self._pack_final, parts, p, dtype)
        else:  # a statistics pass's program: the trunk's layers only (trunk_moments reads no more)
            fw = fb = self._memo(("empty", dtype), None, self.sigma.new_zeros, 0, dtype=dtype)
        coef = self._memo(("coef", tag, dtype), None, self._coef, dtype)
        return PackedProgram(
            weights,
            biases,
            fourier[:n],
            fourier_inv[:n],
            fw,
            fb,
            coef,
            float(self.norm),
            self.dim,
            self.final_mask if upto is None else None,
        )

    def _memo_src(self, stats: Sequence, k: int):
        """The object whose identity a fold with hidden layer k's batch norm is memoised on: its statistics in
        training (a new object each forward), None in eval mode (the running statistics)."""
        if not self.training:
            return None
        j = sum(1 for h in self.hidden[:k] if h.bn is not None)
        return stats[j]

    def _fourier(self, dtype: torch.dtype):
        return self._memo(
            ("fourier", dtype),
            None,
            lambda: (
                [self._constant(h.A, dtype) for h in self.hidden],
                [self._constant(h.Ainv, dtype) for h in self.hidden],
            ),
        )

    def _pack_hidden(self, k: int, parts: dict, pending: Optional[Tuple[Tensor, Tensor]], dtype: torch.dtype):
        """(weight, bias) of hidden layer k for the fused ops, the batch norm before it (``pending``) folded in."""
        layer = self.hidden[k]
        R = layer.channels * layer.dim
        W, bias = parts.get(("w", k)), parts.get(("b", k))
        extra = None
        if pending is not None and not torch.is_grad_enabled():
            fast = _native_fold(self, k, parts, pending, dtype)
            if fast is not None:
                return fast
        if self.componentwise(k):  # (D, C_out, C_in): the per-component channel mixing, the only non-zeros of W
            w = parts.get(("cw", k))
            if w is None:
                f, d = layer.linear.plan.componentwise
                w = torch.diagonal(W.reshape(f, d, f, d), dim1=1, dim2=3).permute(2, 0, 1).contiguous()
            if pending is not None:
                # W s on the channel-major (C, D) layout: sum_c' w[a, c, c'] s[c', a] (the non-zeros of W's rows)
                D, C = w.shape[0], w.shape[1]
                extra = torch.bmm(w, pending[1].t().unsqueeze(2)).view(D, C).t().reshape(-1)
                w = w * pending[0]  # input channel c' scaled by factor[c']
        elif pending is not None:
            w = (W.view(R, pending[0].shape[0], -1) * pending[0].view(-1, 1)).view(R, -1)
            extra = torch.mv(W, pending[1].view(-1))
        else:
            w = W
        if extra is not None:
            bias = extra if bias is None else bias + extra
        bias = self.sigma.new_zeros(R, dtype=dtype) if bias is None else _as(bias, dtype)
        return _as(w, dtype), bias

    def _pack_final(self, parts: dict, pending: Optional[Tuple[Tensor, Tensor]], dtype: torch.dtype):
        """(weight (R, H, C_in), bias (R, C_in)) of the last Linear, the last batch norm (``pending``) folded in."""
        R, C, H = self.out_size, self.in_size, self.hidden_size
        L = len(self.hidden)
        w3 = parts[("w", L)].view(R, H, C)
        fw, fb = w3, parts.get(("b", L))
        if pending is not None:
            factor, shift = pending
            fw = (w3.view(R, factor.shape[0], -1, C) * factor.view(-1, 1, 1)).view(R, H, C)
            # sum_h shift[h] w3[r, h, c] as one batched product on the expanded row (matmul's choice for this shape)
            extra = torch.bmm(shift.view(1, 1, H).expand(R, 1, H), w3).view(R * C)
            fb = extra if fb is None else fb + extra
        fw = _as(fw, dtype)
        return fw, (fw.new_zeros(R, C) if fb is None else _as(fb, dtype).view(R, C))

    def _constant(self, t: Optional[Tensor], dtype: torch.dtype) -> Tensor:
        if t is None:
            return self.sigma.new_zeros(0, 0, dtype=dtype)
        return _as(t.detach() if t.requires_grad else t, dtype)

    def _coef(self, dtype: torch.dtype) -> Tensor:
        """(1,) 1 / (2 sigma^2): the value (and gradient) of 0.5 / sigma^2, which torch evaluates as 0.5 / x =
        reciprocal(x) * 0.5; scaling by two is exact, so reciprocal(x + x) rounds the same."""
        s2 = self.sigma * self.sigma
        return _as(torch.reciprocal(s2 + s2).view(1), dtype)

    def kernel_from_hidden(self, h: Tensor, shell: Tensor) -> Tensor:
        """Dense per-edge kernels (E, R, C_in) from hidden activations (the reference algorithm)."""
        R, C = self.out_size, self.in_size
        w = self.final.weight.reshape(R, -1, C).permute(1, 0, 2).reshape(h.shape[1], R * C)
        k = h @ w
        if self.final.bias is not None:
            k = k + self.final.bias
        return (k * shell[:, None]).reshape(-1, R, C)
