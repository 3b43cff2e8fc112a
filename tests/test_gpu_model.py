"""The static GPU model (benchmarks/gpu_model.py): SASS loops from backward branches, mapped to the source loops whose
executed trip counts (traced in Triton's interpreter) they run."""

import importlib.util
import os
import shutil

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _module():
    spec = importlib.util.spec_from_file_location(
        "_ik_fast_gpu_model", os.path.join(ROOT, "benchmarks", "gpu_model.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gm = _module()

SASS = """
        .text.k:
\t//## File "/a/k.py", line 10
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_1:
\t//## File "/a/k.py", line 3 inlined at "/a/k.py", line 12
\t//## File "/a/k.py", line 12
        /*0010*/                   FFMA R2, R2, R2, R2 ;
        /*0020*/                   FFMA R2, R2, R2, R2 ;
\t//## File "/a/k.py", line 2 inlined at "/a/k.py", line 12
\t//## File "/a/k.py", line 12
        /*0030*/               @P0 BRA `(.L_x_1) ;
        /*0040*/                   EXIT ;
.L_x_2:
        /*0050*/                   BRA `(.L_x_2);
"""


def test_sass_loops_and_inlining_contexts():
    insns = gm.parse_sass(SASS)
    assert [i["op"] for i in insns] == ["MOV", "FFMA", "FFMA", "BRA", "EXIT", "BRA"]
    assert insns[1]["ctx"] == "k.py:3<k.py:12" and insns[2]["ctx"] == "k.py:3<k.py:12"
    assert insns[0]["ctx"] == "k.py:10"
    (loop,) = gm.loops(insns)  # the branch to itself after EXIT is no loop
    assert (loop["start"], loop["end"], loop["ctx"]) == (0x10, 0x30, "k.py:2<k.py:12")


TOY = """import triton
import triton.language as tl


@triton.jit
def _acc(x_ptr, offs, n):
    acc = tl.zeros([128], dtype=tl.float32)
    for r in range(n):
        v = tl.load(x_ptr + offs + r * 128)
        acc += tl.exp(v) * v + tl.sin(v)
    return acc


@triton.jit
def toy_kernel(x_ptr, y_ptr, n, m):
    offs = tl.arange(0, 128)
    a = _acc(x_ptr, offs, n)
    for j in range(m):
        a += _acc(x_ptr, offs, j)
    tl.store(y_ptr + tl.program_id(0) * 128 + offs, a)
"""


def test_dynamic_counts_follow_the_executed_trip_counts(tmp_path):
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("needs Triton's interpreter (conftest sets TRITON_INTERPRET=1)")
    triton = pytest.importorskip("triton")
    nvdisasm = gm._bin("nvdisasm", os.path.dirname(triton.__file__))
    if not (os.path.exists(nvdisasm) and shutil.which(nvdisasm)):
        pytest.skip("Triton's nvdisasm is not here")
    path = tmp_path / "toy_model_kernel.py"
    path.write_text(TOY)
    spec = importlib.util.spec_from_file_location("toy_model_kernel", path)
    toy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(toy)
    tracer = gm.LineTracer({str(path)})
    lines = {}
    x, y = torch.randn(128 * 16), torch.zeros(2 * 128)
    for n in (2, 6, 10):
        tracer.start()
        try:
            toy.toy_kernel[(2,)](x, y, n, 3)
        finally:
            lines[n] = tracer.stop()
    # the helper's loop body ran 2 programs x n times from its first call site, 2 x (0 + 1 + 2) from the second
    assert lines[6]["toy_model_kernel.py:9<toy_model_kernel.py:17"] == 12
    assert lines[6]["toy_model_kernel.py:9<toy_model_kernel.py:19"] == 6
    cfg = {
        "module": "toy_model_kernel",
        "qualname": "toy_kernel",
        "signature": {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32", "m": "i32"},
        "constexprs": {},
        "options": {"num_warps": 4},
    }
    (comp,) = gm.run_compile([cfg], str(tmp_path), None, str(tmp_path), "toy")
    assert "error" not in comp, comp.get("error")
    insns = gm.sass_of(comp["cubin"], nvdisasm)
    paths = {path.name: str(path)}
    totals = {}
    for n, ln in lines.items():
        ops, notes, ls = gm.dynamic_counts(insns, ln, 2, paths, gm.SourceLoops())
        totals[n] = sum(ops.values())
        sources = {lp["source"] for lp in ls}
        assert {"toy_model_kernel.py:8", "toy_model_kernel.py:18"} <= sources, (sources, notes)
        assert any(lp["trips"] == 2 * n for lp in ls if lp["source"] == "toy_model_kernel.py:8")
    # instructions executed grow with the trips of the first call site's loop, linearly
    d1, d2 = totals[6] - totals[2], totals[10] - totals[6]
    assert d1 > 0 and abs(d2 - d1) <= 0.05 * d1, totals
    fig = gm.kernel_figures(ops, 4)
    assert fig["warp_instructions"] == 4 * totals[10] and fig["ffma"] > 0 and fig["hmma"] == 0


def test_two_graphs_separate_the_per_step_constant_from_the_per_edge_slope():
    # 1,000 per step + 3 per edge, seen at 100 and 300 edges: the full problem's figure, not 1,300 / 100 per edge
    assert gm.extrapolate(1300, 1900, 100, 300, 10_000) == pytest.approx(31_000)
    assert gm.extrapolate(1300, 1300, 100, 100, 10_000) == pytest.approx(130_000)  # one graph: in proportion


def test_mma_density_is_the_densest_region_of_the_kernel():
    insns = gm.parse_sass(SASS)  # straight-line: MOV, EXIT, BRA (no FFMA); the loop: FFMA, FFMA, BRA
    assert gm.mma_density(insns, "FFMA") == pytest.approx(2 / 3)
    assert gm.mma_density(insns, "HMMA") is None


def test_row_sectors_average_over_the_row_alignments():
    assert gm._row_sectors(np.arange(8), 8) == 1  # rows of 8 floats: always one aligned sector
    assert gm._row_sectors(np.arange(16) * 8, 1 << 20) == 16  # one float per sector
    # 8 floats from rows of 4 floats: half the rows start mid-sector and straddle two
    assert gm._row_sectors(np.arange(8), 4) == pytest.approx(1.5)


def test_model_graphs_hold_whole_receiver_blocks():
    from ik_fast.tools.problems import get_problem

    for problem in ("M", "H"):
        graphs = gm.model_graphs(problem)
        nodes = [int(g.partition("@")[2]) for g in graphs]
        assert len(graphs) == 2 and nodes[0] < nodes[1]
        assert all(n % gm.RECEIVER_BLOCK == 0 and n > get_problem(problem).k for n in nodes)
