"""torch.nn layers: ImplicitPointConv (graphs and point clouds) and ImplicitConv (2D/3D grids)."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from escnn import nn as enn

from ik_fast.graph import check_node_features, check_positions, prepare_graph
from ik_fast.nn import _opaque
from ik_fast.nn.functional import implicit_point_conv
from ik_fast.spec._serialize import reduce_module
from ik_fast.spec.kernel import ImplicitKernel, check_field_type

__all__ = ["ImplicitPointConv", "ImplicitConv"]


def _bias_expansion(out_type) -> Optional[torch.Tensor]:
    """(out_type.size, #trivial irreps): maps a bias on the trivial irreps to the fields."""
    G = out_type.fibergroup
    cols = []
    p = 0
    for rep in out_type.representations:
        q = 0
        for irr in rep.irreps:
            if G.irrep(*irr).is_trivial():
                c = torch.zeros(out_type.size)
                c[p : p + rep.size] = torch.tensor(rep.change_of_basis[:, q], dtype=c.dtype)
                cols.append(c)
            q += G.irrep(*irr).size
        p += rep.size
    return torch.stack(cols, 1) if cols else None


class _ImplicitConvBase(torch.nn.Module):
    def __init__(self, in_type, out_type, edge_attr_type, bias: bool, **kernel_kwargs):
        super().__init__()
        check_field_type(in_type, "in_type")
        check_field_type(out_type, "out_type", in_type.gspace)
        self.in_type, self.out_type = in_type, out_type
        self.kernel = ImplicitKernel(in_type, out_type, edge_attr_type, **kernel_kwargs)
        be = _bias_expansion(out_type) if bias else None
        if be is not None:
            self.register_buffer("bias_expansion", be, persistent=False)
            self.bias = torch.nn.Parameter(torch.zeros(be.shape[1]))
        else:
            self.bias_expansion = None
            self.bias = None

    def expanded_bias(self) -> Optional[torch.Tensor]:
        return None if self.bias is None else torch.mv(self.bias_expansion, self.bias)  # (= the matmul, 1 op fewer)

    def __reduce__(self):
        return reduce_module(self, *self._ctor)


class ImplicitPointConv(_ImplicitConvBase):
    r"""G-steerable point convolution with an implicit kernel: ``out_i = bias + sum_{e: j -> i} K(d_e, a_e) x_j``.

    A drop-in for the research code's layer; the kernel options are those of :class:`ImplicitKernel`
    (``nonlinearity``, ``band_limit``, ``grid``, ... may be passed as keywords).

    ``backend``, the algorithm that evaluates the convolution (the registry ``ik_fast.backends.BACKENDS``; the docs'
    backends page); ``ik_fast.available_backends()`` lists those that run here:

    - ``"auto"`` (default): the fastest one measured on the call's device among those that run there and evaluate
      the kernel's nonlinearity
      (:func:`ik_fast.backends.resolve_backend`; on CPU ``"native"`` where its extension is built);
    - ``"reference"``: the research code's algorithm, a kernel per edge (the tests' oracle);
    - ``"torch"``: the factorised algorithm in plain PyTorch, no per-edge kernel;
    - ``"triton"``: fused Triton kernels (CUDA devices; needs ``triton``);
    - ``"native"``: ik_fast's C++ (CPU) and CUDA kernels, the extension ``ik_fast._C`` (built at install or on
      first use);
    - ``None``: $IK_FAST_BACKEND, else ``"auto"``.

    ``forward(x, edge_index, edge_delta=None, edge_attr=None, pos=None)``:

    - ``x``: an escnn GeometricTensor of ``in_type`` whose coords are the positions, or a plain (N, in_type.size)
      tensor with ``pos=`` (N, n); or a pair (source, receiver) of either for a bipartite graph (e.g. downsampling):
      the receivers' features are not used, only their number and positions.
    - ``edge_index``: (2, E), row 0 = source j, row 1 = receiver i (PyG convention).
    - ``edge_delta``: (E, n), default ``pos[j] - pos[i]``.
    - ``edge_attr``: (E, A) attributes of ``edge_attr_type``.

    Returns the receivers' features in the container type of ``x`` (a GeometricTensor carries the receivers' coords).
    A NaN or an infinity in the source features, the positions, ``edge_delta`` or ``edge_attr`` raises a
    ``ValueError`` naming the argument (why, unlike ``torch.nn`` layers: :func:`ik_fast.graph.check_node_features`).
    """

    def __init__(
        self,
        in_type,
        out_type,
        edge_attr_type=None,
        n_layers: int = 3,
        n_channels: int = 16,
        init_scheme: str = "he",
        batch_norm: bool = True,
        bias: bool = True,
        backend: Optional[str] = "auto",
        **kernel_kwargs,
    ):
        super().__init__(
            in_type,
            out_type,
            edge_attr_type,
            bias,
            n_layers=n_layers,
            n_channels=n_channels,
            init_scheme=init_scheme,
            batch_norm=batch_norm,
            **kernel_kwargs,
        )
        self._ctor = (
            (in_type, out_type, edge_attr_type),
            dict(
                n_layers=n_layers,
                n_channels=n_channels,
                init_scheme=init_scheme,
                batch_norm=batch_norm,
                bias=bias,
                backend=backend,
                **kernel_kwargs,
            ),
        )
        if backend is not None:
            from ik_fast.backends import resolve_backend

            if backend != "auto":
                resolve_backend(backend, "cpu")  # validates the name now, not at the first call
        self.backend = backend
        self._op_key = _opaque.register_kernel(self.kernel)
        self._op_slots = _opaque.tensor_slots(self.kernel)

    def _unpack(self, x, name):
        if isinstance(x, enn.GeometricTensor):
            if x.type != self.in_type:
                raise ValueError(f"{name} has field type {x.type} but the layer's in_type is {self.in_type}")
            if x.tensor.dim() != 2:
                raise ValueError(
                    f"{name} must be a GeometricTensor of shape (N, {self.in_type.size}) with coords "
                    f"(N, n), got shape {tuple(x.tensor.shape)}"
                )
            return x.tensor, x.coords, True
        if isinstance(x, torch.Tensor):
            if x.dim() == 3:
                raise ValueError(
                    f"{name} must have shape (N, {self.in_type.size}), got a batched tensor of shape "
                    f"{tuple(x.shape)}: batch several graphs into one graph (concatenate the nodes and "
                    f"offset each graph's edge_index by the nodes before it)"
                )
            return x, None, False
        raise TypeError(
            f"{name} must be a GeometricTensor, a tensor, or a (source, receiver) pair of them, got {type(x).__name__}"
        )

    def forward(self, x, edge_index, edge_delta=None, edge_attr=None, pos=None):
        bipartite = isinstance(x, (tuple, list))
        if bipartite:
            if len(x) != 2:
                raise ValueError(f"x as a pair must have two entries (source, receiver), got {len(x)}")
            x_src, c_src, geo = self._unpack(x[0], "x[0]")
            x_dst, c_dst, _ = self._unpack(x[1], "x[1]")
        else:
            x_src, c_src, geo = self._unpack(x, "x")
            x_dst, c_dst = x_src, c_src
        if pos is not None:
            if isinstance(pos, (tuple, list)):
                if len(pos) != 2:
                    raise ValueError(f"pos as a pair must have two entries (source, receiver), got {len(pos)}")
                c_src, c_dst = pos
            else:
                c_src = c_dst = pos
        n = self.in_type.gspace.dimensionality
        n_src, n_dst = x_src.shape[0], x_dst.shape[0]
        if edge_delta is None and (c_src is None or c_dst is None):
            raise ValueError(
                "edge_delta is required when no positions are given (pass pos= or a GeometricTensor with coords)"
            )
        if geo and c_dst is None:
            raise ValueError(
                "x[1] (the receivers) has no coords, so the output GeometricTensor would have none: pass "
                "the receivers as a GeometricTensor with coords, or pos=(source, receiver) positions, "
                "or plain tensors to get a plain tensor back"
            )
        if torch.compiler.is_compiling():
            out, stats = self._forward_compiled(x_src, edge_index, c_src, c_dst, edge_delta, edge_attr, n_dst)
        else:
            prog = self.kernel.program()
            if bipartite:  # named as passed (implicit_point_conv checks it too, as "x")
                check_node_features(x_src, "x[0]", self.in_type.size, self.kernel.sigma.device, self.kernel.sigma.dtype)
            # the values of one tensor given for both sides are checked once
            for c, nm, rows, finite in (
                (c_src, "pos", n_src, True),
                (c_dst, "pos (receivers)", n_dst, c_dst is not c_src),
            ):
                if c is not None:
                    check_positions(c, nm, rows, n, finite)
            graph = prepare_graph(edge_index, n_src, n_dst, x_src.device if isinstance(x_src, torch.Tensor) else None)
            if edge_delta is None:
                edge_delta = c_src[graph.src] - c_dst[graph.dst]
            out, stats = implicit_point_conv(
                prog, x_src, graph, edge_delta, edge_attr, n_dst=n_dst, backend=self.backend
            )
        if stats:
            self.kernel.update_running_stats(stats)
        b = self.expanded_bias()
        if b is not None:
            out = out + b
        if geo:
            return enn.GeometricTensor(out, self.out_type, coords=c_dst)
        return out

    def _forward_compiled(self, x_src, edge_index, c_src, c_dst, edge_delta, edge_attr, n_dst):
        """Inside torch.compile. The backend is resolved when the call is traced
        (:func:`ik_fast.backends.compiled_backend`: the native loader and the availability checks are not traced).

        The fused backends ("native", "triton") are traced through their registered ops: the kernel's lowering and
        packing in plain PyTorch, the data-dependent part of graph preparation (the checks of the inputs' values:
        edge_index, positions, edge inputs; and the receiver sort) in the registered op ``ik_fast::graph_csr``
        (:func:`ik_fast.graph.prepare_graph`), then the host of :mod:`ik_fast.backends.fused` (statistics passes,
        ``conv``). The compiled step does the work of the eager one, and a double backward goes through the ops'
        registered derivatives wherever the compiled graph's backward allows one (with Dynamo's graph run by autograd,
        ``backend="eager"``; AOTAutograd's compiled backward has none, whatever the model).

        "torch" and "reference" cannot be traced (:data:`ik_fast.backends.TRACEABLE`: "torch"'s chunk plan, how many
        chunks of which padded degree, depends on the graph's degrees; the reference's Fourier ELU and inference go
        over edge chunks in Python loops whose length depends on the edge count) and run in the registered op
        ``ik_fast::eager_conv`` (see :mod:`ik_fast.nn._opaque`), which recomputes the forward in its backward and has no
        double backward. Shapes, dtypes and devices are checked here, where they are known while tracing."""
        from ik_fast.backends import FUSED, compiled_backend

        k = self.kernel
        device, dtype = k.sigma.device, k.sigma.dtype
        check_node_features(x_src, "x", self.in_type.size, device, dtype)
        name = compiled_backend(self.backend, str(device), dtype, activation=k.activation)
        if name in FUSED:
            prog = k.program()
            n, n_src = self.in_type.gspace.dimensionality, x_src.shape[0]
            finite = [("x", x_src)]  # values checked in the graph op (check_node_features does not while tracing)
            for c, nm, rows, check in (
                (c_src, "pos", n_src, True),
                (c_dst, "pos (receivers)", n_dst, c_dst is not c_src),
            ):
                if c is not None:
                    check_positions(c, nm, rows, n, finite=False)
                    if check:
                        finite.append((nm, c))
            finite += [
                (nm, t)
                for nm, t in (("edge_delta", edge_delta), ("edge_attr", edge_attr))
                if isinstance(t, torch.Tensor)
            ]
            graph = prepare_graph(edge_index, n_src, n_dst, device, finite=finite)
            if edge_delta is None:
                edge_delta = c_src[graph.src] - c_dst[graph.dst]
            return implicit_point_conv(prog, x_src, graph, edge_delta, edge_attr, n_dst=n_dst, backend=name)
        if edge_delta is not None:
            c_src = c_dst = None
        n_stats = _opaque.stats_size(k)
        tensors = _opaque.kernel_tensors(self._op_slots)
        out, flat = torch.ops.ik_fast.eager_conv(
            tensors,
            x_src,
            edge_index,
            c_src,
            c_dst,
            edge_delta,
            edge_attr,
            n_dst,
            self._op_key,
            k.training,
            name,
            self.out_type.size,
            n_stats,
        )
        return out, (_opaque.unflatten_stats(k, flat) if n_stats else [])


def kernel_grid(d: int, kernel_size: int) -> torch.Tensor:
    """Points (kernel_size**d, d) of the filter, in escnn's orientation (x along the last array axis, y and z
    inverted), scaled so that the outermost points are at distance 1 along each axis."""
    idx = np.arange(kernel_size**d)
    origin = (kernel_size - 1) / 2
    pts = np.stack([(idx // kernel_size**j) % kernel_size - origin for j in range(d)], 1)
    pts[:, 1:] *= -1
    return torch.tensor(pts / max(kernel_size // 2, 1), dtype=torch.get_default_dtype())


class ImplicitConv(_ImplicitConvBase):
    r"""G-steerable convolution on a 2D/3D grid with an implicit kernel, sampled once on the k^n filter grid.

    ``forward(x, attr=None)``: x is a GeometricTensor (B, in_type.size, *spatial); ``attr`` an optional attribute
    vector (A,) of ``edge_attr_type`` shared by all filter points.
    """

    def __init__(
        self,
        in_type,
        out_type,
        kernel_size: int,
        edge_attr_type=None,
        n_layers: int = 3,
        n_channels: int = 16,
        init_scheme: str = "he",
        batch_norm: bool = True,
        bias: bool = True,
        padding: int = 0,
        stride: int = 1,
        dilation: int = 1,
        **kernel_kwargs,
    ):
        super().__init__(
            in_type,
            out_type,
            edge_attr_type,
            bias,
            n_layers=n_layers,
            n_channels=n_channels,
            init_scheme=init_scheme,
            batch_norm=batch_norm,
            **kernel_kwargs,
        )
        self._ctor = (
            (in_type, out_type, kernel_size, edge_attr_type),
            dict(
                n_layers=n_layers,
                n_channels=n_channels,
                init_scheme=init_scheme,
                batch_norm=batch_norm,
                bias=bias,
                padding=padding,
                stride=stride,
                dilation=dilation,
                **kernel_kwargs,
            ),
        )
        if not isinstance(kernel_size, int) or kernel_size < 1:
            raise ValueError(f"kernel_size must be a positive integer, got {kernel_size!r}")
        self.d = in_type.gspace.dimensionality
        self.kernel_size, self.padding, self.stride, self.dilation = kernel_size, padding, stride, dilation
        self.register_buffer("grid", kernel_grid(self.d, kernel_size), persistent=False)

    def filter(self, attr=None) -> torch.Tensor:
        """The filter (C_out, C_in, k, ..., k)."""
        a = None
        if attr is not None:
            if not isinstance(attr, torch.Tensor) or attr.dim() > 2 or (attr.dim() == 2 and attr.shape[0] != 1):
                raise ValueError("attr must be one attribute vector of shape (A,) or (1, A)")
            a = attr.reshape(1, -1).expand(self.grid.shape[0], -1)
        k = self.kernel(self.grid, a)  # (k^n, C_out, C_in)
        return k.permute(1, 2, 0).reshape(k.shape[1], k.shape[2], *([self.kernel_size] * self.d))

    def forward(self, x, attr=None):
        if not isinstance(x, enn.GeometricTensor) or x.type != self.in_type:
            raise ValueError(f"x must be a GeometricTensor of the layer's in_type {self.in_type}")
        conv = F.conv2d if self.d == 2 else F.conv3d
        out = conv(
            x.tensor,
            self.filter(attr),
            self.expanded_bias(),
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
        )
        return enn.GeometricTensor(out, self.out_type)
