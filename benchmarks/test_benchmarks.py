"""pytest-benchmark entry to the shared problems (``ik_fast.tools.problems``): ``pytest benchmarks/
--benchmark-json=...``.

These are benchmarks, not tests: the test suite does not collect them (``testpaths = ["tests"]``). By default they
take the CPU-sized problems; ``IK_FAST_BENCH=gpu`` takes the GPU sizes on a CUDA device, and
``IK_FAST_BENCH_PROBLEMS=cpu,M@1024`` picks problems by name. Peak memory per case needs a process per case: use
``python -m ik_fast.tools.bench`` (same problems, same step) for that.
"""

import os

import pytest
import torch

from ik_fast.backends import FUSED, available_backends
from ik_fast.tools.bench import setup_case
from ik_fast.tools.problems import sweep_problems

GPU = os.environ.get("IK_FAST_BENCH") == "gpu" and torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
DEFAULT = ["P", "M", "H", "skew", *sweep_problems("gpu")] if GPU else ["P", "planar", *sweep_problems("cpu")]
PROBLEMS = os.environ.get("IK_FAST_BENCH_PROBLEMS", ",".join(DEFAULT)).split(",")
# the baselines and every declared implementation of the ops that runs on the device
PROVIDERS = ["escnn", "reference", "torch"] + [b for b in FUSED if b in available_backends(DEVICE)]


@pytest.mark.parametrize("mode", ["train", "inference"])
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("problem", PROBLEMS)
def test_layer(benchmark, problem, provider, mode):
    """One layer's forward (+ backward in train mode)."""
    step, rec = setup_case(problem, provider, mode, device=DEVICE)

    def run():
        step()
        if GPU:
            torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update({k: v for k, v in rec.items() if isinstance(v, (int, float, str))})
