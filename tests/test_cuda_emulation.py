"""The native CUDA kernels' index arithmetic and host steps, emulated on the CPU (tests/tools/emulate_check.py),
against the op layer's statement: run with the suite so that a change of the op contract or of the block plan that
the CUDA code no longer follows fails here, on machines without a GPU."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cuda_kernels_emulated_on_the_cpu_agree_with_the_statement():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "tools", "emulate_check.py")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0 and "all ok" in r.stdout, (r.stdout[-3000:], r.stderr[-3000:])
