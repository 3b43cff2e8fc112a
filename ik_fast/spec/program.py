"""The lowered kernel program: everything a backend needs to evaluate an implicit kernel, and nothing from escnn.

:class:`~ik_fast.ImplicitKernel` lowers its escnn MLP into a :class:`KernelProgram` once per forward pass (cached in
eval mode). The program is a frozen dataclass of plain tensors, differentiable with respect to the escnn parameters
it was expanded from (one autograd node, the kernel's expansion map), and of the structure those tensors have. It
imports no implementation: the op layer (:mod:`ik_fast.ops`) states what it computes, :meth:`KernelProgram.op_program`
gives the ops their arguments. Its semantics, for an edge with vector ``d`` (E, n) and attributes ``a`` (E, A)::

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

from dataclasses import dataclass, replace
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ik_fast import ops
from ik_fast.structure import HiddenLayout

__all__ = ["BlockPlan", "Linear", "BatchNorm", "Hidden", "KernelProgram", "build_plan"]


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
    mask: Optional[Tensor],
    row_groups: Sequence[Tensor],
    col_groups: Sequence[Tensor],
    min_saving: float = 2.0,
    pattern: Optional[Callable[[int, int], Tensor]] = None,
    shape: Optional[Tuple[int, int]] = None,
) -> Optional[BlockPlan]:
    """Plan for a matrix whose structural non-zeros are ``mask`` (R, C).

    ``row_groups``: index tensors (F_out, d_out) of output rows, one per field type (the fields of a group share a
    representation, so they share a sparsity pattern up to their offsets); ``col_groups`` likewise (F_in, d_in) for
    the input columns. ``pattern(r, g)``: instead of a mask (then None, and ``shape`` (R, C) given), the bool
    (d_out, d_in) pattern that every field pair of row group r and column group g shares, as the kernel's structure
    states it (:meth:`ik_fast.structure.ConvSpec.field_pattern`). Returns None when the structured product would
    save less than ``min_saving`` x.
    """
    R, C = mask.shape if mask is not None else shape
    rows_out, terms_out = [], []
    for r, rg in enumerate(row_groups):
        f_out, d_out = rg.shape
        terms = []
        for g, cg in enumerate(col_groups):
            f_in, d_in = cg.shape
            if pattern is not None:
                pat = pattern(r, g)
            else:
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
    """y = x W^T + b, with W (out, in) dense and, optionally, its block plan (a backend gathers the plan's blocks
    from the weight, :meth:`BlockPlan.gather`, where it uses them)."""

    weight: Tensor
    bias: Optional[Tensor]
    plan: Optional[BlockPlan] = None
    # of a componentwise hidden Linear, when the lowering has it: (D, C_out, C_in) = W[c * D + a, c' * D + a], the
    # fused ops' form
    cw: Optional[Tensor] = None


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

    def batch_stats(self, h: Tensor) -> Tuple[Tensor, Tensor]:
        """(mean (C, d), var (C,)) of h (E, C * d), as escnn's ``_estimate_stats``, detached.

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
        var = _as(m[1] / scalar(count - 1, m.dtype), dt)
        # mean @ avg^T as a product and a sum: a (C, d) x (d, d) GEMM goes to BLAS, whose thread pool costs
        # milliseconds a call on a busy machine (measured ~15 ms twice a step on 2 cores under load)
        return (_as(m[0], dt)[:, None, :] * self.avg).sum(-1), var.mean(-1)

    def statistics(self, stats: Optional[Tuple[Tensor, Tensor]]) -> Tuple[Tensor, Tensor]:
        """(mean (C, d), var (C,)) it normalises with: the batch's ``stats`` in training, the running ones in eval."""
        return stats if self.training else (self.running_mean, self.running_var)

    def factors(self, stats: Optional[Tuple[Tensor, Tensor]]) -> Tuple[Tensor, Tensor]:
        """(factor (C,), shift (C, d)) such that the batch norm is h[:, c, a] -> h[:, c, a] * factor[c] + shift[c, a]
        (the statistics of the batch in training, the running ones in eval mode)."""
        mean, var = self.statistics(stats)
        factor = self.scale / torch.sqrt(var + scalar(self.eps, var.dtype))
        return factor, self.shift - mean * factor.view(-1, 1)


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


@dataclass(frozen=True)
class Hidden:
    """One hidden layer: Linear -> activation (Fourier ELU, pointwise ELU, gated or norm) -> batch norm."""

    linear: Linear
    channels: int
    dim: int
    A: Optional[Tensor]  # (grid, dim)
    Ainv: Optional[Tensor]  # (dim, grid)
    bn: Optional[BatchNorm]
    layout: Optional[HiddenLayout] = None  # the structure's statement of the layer (its activation kind, irreps)
    act_bias: Optional[Tensor] = None  # (channels * non-trivial irreps,) of a norm layer


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)`` without an operator when it already is."""
    return t if t.dtype == dtype else t.to(dtype)


_SCALARS: dict = {}
_EMPTY = torch.zeros(0)


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
    # the kernel's structure (an encoded :class:`~ik_fast.structure.ConvSpec`): among others where the last
    # Linear's weight (kernel layout) can be non-zero, from its basis; None: no structure is known (dense)
    structure: Optional[str] = None

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
    def activation(self) -> str:
        """The hidden layers' activation kind (:data:`ik_fast.structure.ACTIVATIONS`); "elu" without hidden layers."""
        return self.layouts[0].activation if self.hidden else "elu"

    @property
    def layouts(self) -> Tuple[HiddenLayout, ...]:
        """Every hidden layer's statement (:class:`~ik_fast.structure.HiddenLayout`: activation kind, irreps)."""
        if all(h.layout is not None for h in self.hidden):
            return tuple(h.layout for h in self.hidden)
        from ik_fast.structure import layers_of

        return layers_of(self.structure, [h.A if h.A is not None else _EMPTY for h in self.hidden])

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

    def componentwise(self, k: int) -> bool:
        """Whether hidden layer k's Linear takes the (D, C, C) form in the fused ops."""
        lin = self.hidden[k].linear
        return k > 0 and lin.cw is not None

    def batch_affines(self, stats: Optional[Sequence] = None, used: Optional[list] = None):
        """``(k, a_k) -> (factor, shift)`` of hidden layer k's batch norm for :func:`ik_fast.ops.trunk_reference_form`
        (None, None without one): in training from ``stats`` (one per batch norm) or, where None, the batch
        statistics of ``a_k``, each appended to ``used``; in eval mode the running statistics."""

        def affines(k, a):
            bn = self.hidden[k].bn
            if bn is None:
                return None, None
            st = None
            if self.training:
                j = sum(1 for h in self.hidden[:k] if h.bn is not None)
                st = stats[j] if stats is not None else bn.batch_stats(a)
                if used is not None:
                    used.append(st)
            factor, shift = bn.factors(st)
            return factor, shift.reshape(-1)

        return affines

    def op_program(
        self,
        stats: Sequence,
        dtype: Optional[torch.dtype] = None,
        dense: bool = False,
        base: Optional[ops.OpProgram] = None,
        affines: Sequence = (),
    ) -> ops.OpProgram:
        """The program as the ops take it (:class:`ik_fast.ops.OpProgram`): the MLP as written, in ``dtype``, each
        batch norm's affine from its statistics (``stats``, one per batch norm, in training; the running ones in eval
        mode; empty where a training batch norm's statistics are not given yet, as in a statistics pass).
        Differentiable with respect to the escnn parameters. ``dense``: the plain statement's form, every hidden weight
        dense (the componentwise Linears too); the lowered last weight is zero outside the structure's blocks, so the
        statement need not mask it (``masked=False``).
        ``base``: a program this one made in the same dtype and form, whose tensors other than the batch norms'
        are reused (a forward's statistics passes and its ``conv`` differ only in those); ``affines``: the first
        batch norms' maps as :meth:`bn_affine` formed them in this forward, reused."""
        dtype = self.sigma.dtype if dtype is None else dtype
        reuse = base is not None and len(base.bn_factor) > 0 and base.bn_factor[0].numel() == 0
        empty = base.bn_factor[0] if reuse else self.sigma.new_zeros(0, dtype=dtype)
        factors, shifts = [], []
        j = 0
        for layer in self.hidden:
            f = s = empty
            if layer.bn is not None:
                if j < len(affines):
                    f, s = affines[j]
                elif not self.training or j < len(stats):
                    f, s = self.bn_affine(layer, stats[j] if self.training else None, dtype)
                j += 1
            factors.append(f)
            shifts.append(s)
        if base is not None:
            return replace(base, bn_factor=factors, bn_shift=shifts)
        weights, biases, fourier, fourier_inv, act_bias = [], [], [], [], []
        for k, layer in enumerate(self.hidden):
            lin = layer.linear
            w = lin.cw if not dense and self.componentwise(k) else lin.weight
            weights.append(_as(w, dtype))
            R = lin.weight.shape[0]
            act_bias.append(empty if layer.act_bias is None else _as(layer.act_bias, dtype))
            biases.append(self.sigma.new_zeros(R, dtype=dtype) if lin.bias is None else _as(lin.bias, dtype))
            # (the Fourier matrices are buffers: constants, no gradient)
            fourier.append(empty.view(0, 0) if layer.A is None else _as(layer.A, dtype))
            fourier_inv.append(empty.view(0, 0) if layer.Ainv is None else _as(layer.Ainv, dtype))
        R, C, H = self.out_size, self.in_size, self.hidden_size
        fw = _as(self.final.weight.view(R, H, C), dtype)
        fb = fw.new_zeros(R, C) if self.final.bias is None else _as(self.final.bias, dtype).view(R, C)
        return ops.OpProgram(
            weights, biases, fourier, fourier_inv, act_bias, factors, shifts, fw, fb, self._coef(dtype),
            float(self.norm), self.dim, self.structure,
        )  # fmt: skip

    @staticmethod
    def bn_affine(layer: Hidden, stats, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
        """(factor (C,), shift (C D,)) of ``layer``'s batch norm as the ops take it, from ``stats`` (None: the
        running statistics), in ``dtype``; differentiable with respect to its parameters."""
        f, s = layer.bn.factors(stats)
        return _as(f, dtype), _as(s.reshape(-1), dtype)

    def _coef(self, dtype: torch.dtype) -> Tensor:
        """(1,) 1 / (2 sigma^2): the value (and gradient) of 0.5 / sigma^2, which torch evaluates as 0.5 / x =
        reciprocal(x) * 0.5; scaling by two is exact, so reciprocal(x + x) rounds the same."""
        s2 = self.sigma * self.sigma
        return _as(torch.reciprocal(s2 + s2).view(1), dtype)

    def kernels(self, delta: Tensor, attr: Optional[Tensor], stats: Optional[Sequence] = None):
        """Dense per-edge kernels (E, R, C_in) and the batch statistics used: the op layer's statement
        (:func:`ik_fast.ops.kernels_reference_form`), each batch norm with the batch's statistics in training
        (``stats``, or computed from this batch where None), the running ones in eval mode."""
        used: list = []
        args = self.op_program([], dense=True).args()
        k = ops.kernels_reference_form(
            self.mlp_input(delta, attr), *args, affines=self.batch_affines(stats, used), masked=False
        )
        return k, used

    def trunk(self, delta: Tensor, attr: Optional[Tensor], stats: Optional[Sequence] = None):
        """(h (E, H), the batch statistics used): the trunk of the MLP as the op layer states it
        (:func:`ik_fast.ops.trunk_reference_form`), batch norms as in :meth:`kernels`."""
        used: list = []
        p = self.op_program([], dense=True)
        h = ops.trunk_reference_form(
            self.mlp_input(delta, attr), p.weights, p.biases, p.fourier, p.fourier_inv,
            affines=self.batch_affines(stats, used), act_bias=p.act_bias, layouts=self.layouts,
        )  # fmt: skip
        return h, used
