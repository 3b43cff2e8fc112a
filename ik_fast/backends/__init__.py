"""Backends: the algorithms that evaluate a lowered kernel program on a graph.

Each backend is a function ``(program, x_src, graph, edge_delta, edge_attr) -> (out (n_dst, C_out), batch_stats)``.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable, Dict, List, Optional

import torch

from ik_fast import kernels_triton, ops
from ik_fast.backends import native
from ik_fast.backends.factorized import implicit_conv_torch
from ik_fast.backends.fused import fused_backend
from ik_fast.backends.reference import implicit_conv_reference

__all__ = [
    "available_backends",
    "get_backend",
    "resolve_backend",
    "compiled_backend",
    "unavailable_reason",
    "BACKENDS",
    "FUSED",
    "TRACEABLE",
    "CPU_SMALL_GRAPH_EDGES",
]

# The rooms that declare an implementation of the ops (ik_fast.ops.Implementation), imported above for their
# declarations; adding an implementation adds its room here (CONTRIBUTING.md).
_DECLARATIONS = (kernels_triton.DECLARATION, native.DECLARATION)
# the eager backends (plain PyTorch, no op implementation), then every implementation of the ops through the shared
# fused host
BACKENDS: Dict[str, Callable] = {
    "reference": implicit_conv_reference,
    "torch": implicit_conv_torch,
    **{d.name: fused_backend(d.name) for d in _DECLARATIONS},
}
FUSED = tuple(d.name for d in _DECLARATIONS)
_FUSED = FUSED
# The backends whose code torch.compile traces (with fullgraph=True and dynamic shapes): the fused ones, whose work is
# in registered ops. Why the others are not:
_UNTRACEABLE = {
    "torch": "its chunk plan, how many chunks of which padded degree, depends on the graph's degrees",
    "reference": "its Fourier ELU and its inference go over edge chunks in Python loops whose length "
    "depends on the edge count",
}
TRACEABLE = tuple(n for n in BACKENDS if n not in _UNTRACEABLE)
# "auto" picks a fused backend on a device only where a committed benchmark (benchmarks/results/) measured it faster
# than "torch" on that kind of device: each implementation declares where (Implementation.measured_faster_on).
_MEASURED_FASTER: Dict[str, tuple] = {
    dev: tuple(d.name for d in _DECLARATIONS if dev in d.measured_faster_on) for dev in ("cpu", "cuda")
}
# Without a fused backend, "auto" on CPU picks "reference" for graphs of fewer edges than this and "torch" otherwise:
# on small graphs "torch" pays for many small operators (one checkpointed chunk of receivers after another) and was
# measured slower than "reference" (docs, benchmarks page); the bound stays below the smallest other benchmark problem
# and above one or two QM9 molecules (400 / 841 edges). Applied only where the edge count is known when the backend is
# chosen (an eager call; inside torch.compile the choice does not depend on the size).
CPU_SMALL_GRAPH_EDGES = 1000
_warned = set()


def unavailable_reason(name: str, device) -> str:
    """Why backend ``name`` does not run on ``device`` ("" when it does)."""
    if name not in _FUSED:
        return ""
    return ops.status(name, str(torch.device(device))) or ""


def available_backends(device=None) -> List[str]:
    """Names of the backends that run here (on ``device`` when given)."""
    dev = torch.device("cuda" if device is None and torch.cuda.is_available() else (device or "cpu"))
    return [name for name in BACKENDS if not unavailable_reason(name, dev)]


def _evaluates(name: str, activation: str, device) -> bool:
    """Whether backend ``name``'s kernels evaluate hidden layers of kind ``activation`` on ``device`` (the unfused
    backends evaluate every kind)."""
    return name not in _FUSED or ops.implementation(name).evaluates(activation, torch.device(device).type)


def resolve_backend(name, device, num_edges: Optional[int] = None, activation: str = "fourier_elu") -> str:
    """The backend to run: ``name``, else $IK_FAST_BACKEND, else "auto": the first fused backend measured faster
    than "torch" on the device that runs here and evaluating the kernel's hidden ``activation`` there, else "torch"
    — on CPU "reference" for graphs of fewer than :data:`CPU_SMALL_GRAPH_EDGES` edges when ``num_edges`` is given.
    Warns once per device type when "auto" falls back from the fused backends, saying why each was not taken. A named
    fused backend that does not evaluate ``activation`` raises a ValueError naming both."""
    if name is None:
        name = os.environ.get("IK_FAST_BACKEND", "auto")
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, got {type(name).__name__}")
    if name == "auto":
        dev = torch.device(device)
        fast = [n for n in _MEASURED_FASTER.get(dev.type, ()) if not unavailable_reason(n, dev)]
        fast = [n for n in fast if _evaluates(n, activation, dev)]
        if fast:
            return fast[0]
        small = dev.type == "cpu" and num_edges is not None and num_edges < CPU_SMALL_GRAPH_EDGES
        choice = "reference" if small else "torch"
        if dev.type not in _warned:
            _warned.add(dev.type)
            unmeasured = "runs here, but no committed benchmark measured it faster than 'torch' on this device"
            reasons = "; ".join(f"{n}: {unavailable_reason(n, dev) or unmeasured}" for n in _FUSED)
            rule = f" ('reference' below {CPU_SMALL_GRAPH_EDGES} edges)" if dev.type == "cpu" else ""
            warnings.warn(
                f"ik_fast: backend 'auto' uses 'torch' on {dev.type}{rule} ({reasons})", RuntimeWarning, stacklevel=3
            )
        return choice
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {['auto'] + list(BACKENDS)}, got {name!r}")
    if not _evaluates(name, activation, device):
        others = [n for n in BACKENDS if _evaluates(n, activation, device)]
        raise ValueError(
            f"backend {name!r} does not evaluate the kernel's {activation!r} nonlinearity on "
            f"{torch.device(device).type} yet; use one of {others} or 'auto'"
        )
    return name


def _compile_error(message: str) -> Exception:
    """An error that torch.compile passes on as it is (Dynamo wraps any other exception raised while it traces into
    an internal error)."""
    try:
        from torch._dynamo.exc import UserError, UserErrorType

        return UserError(UserErrorType.INVALID_INPUT, message)
    except (ImportError, AttributeError):  # pragma: no cover (another torch)
        return RuntimeError(message)


@torch.compiler.assume_constant_result
def compiled_backend(
    name, device: str, dtype: torch.dtype, traced: bool = False, activation: str = "fourier_elu"
) -> str:
    """The backend that runs a layer's call inside ``torch.compile``: :func:`resolve_backend` without the edge count
    (unknown while tracing), checked to run on ``device`` for ``dtype`` (the fused backends have no float16 path:
    "torch" then, with the warning eager calls give).

    Dynamo calls it while tracing and takes its result as a constant, so the native loader (a lock, perhaps a build),
    the availability checks, $IK_FAST_BACKEND and "auto"'s warning run as plain Python, once per compilation; the
    result is not guarded (setting $IK_FAST_BACKEND later does not recompile a compiled layer). A backend that does
    not run here raises at compile time, naming the backend and what runs instead; so does one that cannot be
    traced (:data:`TRACEABLE`) when ``traced`` (the caller traces the backend's code itself, as
    :func:`ik_fast.implicit_point_conv` does; :class:`ik_fast.ImplicitPointConv` runs the others as one op)."""
    try:
        chosen = resolve_backend(name, device, activation=activation)
    except (TypeError, ValueError) as e:
        raise _compile_error(str(e)) from None
    why = unavailable_reason(chosen, device)
    if why:
        others = [n for n in available_backends(device) if n != chosen]
        raise _compile_error(f"backend {chosen!r} does not run here ({why}); use one of {others} (or 'auto')")
    if chosen in FUSED and dtype not in (torch.float32, torch.float64):
        if dtype == torch.float16:
            warnings.warn(
                f"ik_fast: backend {chosen!r} has no float16 path; using 'torch' for this call",
                RuntimeWarning,
                stacklevel=2,
            )
            return "torch"
        raise _compile_error(
            f"backend {chosen!r} computes in float32 or float64, but the layer is {dtype}; use "
            f"backend='torch' for other dtypes"
        )
    if traced and chosen not in TRACEABLE:
        raise _compile_error(
            f"backend {chosen!r} cannot be traced by torch.compile ({_UNTRACEABLE[chosen]}); compile an "
            f"ik_fast.ImplicitPointConv instead (it runs {chosen!r} as one registered op), or use one of "
            f"{[n for n in TRACEABLE if not unavailable_reason(n, device)]}"
        )
    return chosen


def get_backend(name: str) -> Callable:
    return BACKENDS[name]
