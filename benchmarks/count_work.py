"""Count the work of one training step and compare its growth per edge with the structured floor.

    python benchmarks/count_work.py --problems M,H --backend triton --json out.json

For each problem, one training step (forward + backward with every gradient, training mode: batch statistics
included) runs on two graphs of the problem's full degree (``ik_fast.tools.workcount.graph_sizes``: 40 and 80 nodes at
M, 32 and 64 at H; 2 and 4 molecules at P; ``--sizes M@40,M@80`` to choose) in Triton's interpreter on CPU tensors.
Counted while it runs (``ik_fast.tools.workcount``): every ``tl.dot`` at its padded block shape per program instance,
every host GEMM from torch.profiler's FLOPs, and the ``aten::`` events of the step. Reported: the per-edge slope of the
counted multiply-adds between the two graphs, its ratio to the structured floor read from the layer as built, and the
aten event count at both sizes (the bound: the same within 10% whatever the edge count, at most 600).

Any provider of ``ik_fast.tools.bench`` can be counted (``--backend torch,reference``): for providers without Triton
kernels the count is the host GEMMs alone. The interpreter runs the kernels with the tile sizes the host picks for CPU
tensors, which may differ from those it picks on a GPU (the per-kernel table shows the launches).

``--json OUT.json`` writes the counts as records of ``ik_fast/records.py`` (kind ``work``: ``macs_per_edge``,
with the floor, the ratio and the per-kernel counts of both graphs in ``extra``, and ``aten_ops``); ``--name NAME``
also writes them to ``benchmarks/results/work/<device>/<date>-NAME.json``, which ``benchmarks/report.py`` renders.
"""

from __future__ import annotations

import os
import sys

# the interpreter flag must be set before triton is imported (triton.jit reads it when it decorates the kernels)
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning:escnn.group.groups.so3group")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ik_fast.tools.workcount import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
