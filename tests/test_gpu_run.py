"""What benchmarks/run_gpu.sh relies on, checked on CPU: the package from a source checkout on PYTHONPATH (not
installed) imports every module and collects the GPU tests as the GPU run selects them (``-m gpu`` under
``IK_FAST_TEST_DEVICE=cuda``: the conformance suite's CUDA cases among them); the per-test time limit and deadline of
tests/_time_limits.py; the tests step of benchmarks/gpu_run.py going on past a test that hangs in native code.
(The whole script is rehearsed by ``bash benchmarks/run_gpu.sh --rehearse``, which .ci/run runs.)"""

import json
import os
import subprocess
import sys
import textwrap
import time

from ik_fast.backends import FUSED

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")

# In a child interpreter: forget the editable install (its finder would resolve ik_fast whatever PYTHONPATH says),
# import ik_fast from the checkout, every module of it, then collect the gpu-marked tests.
_CHECKOUT = r"""
import importlib, os, pkgutil, sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.path_hooks[:] = [h for h in sys.path_hooks if "editable" not in repr(h).lower()]
sys.path[:] = [p for p in sys.path if "__editable__" not in p]
sys.path_importer_cache.clear()
root = sys.argv[1]
import ik_fast
assert os.path.dirname(ik_fast.__file__) == os.path.join(root, "ik_fast"), ik_fast.__file__
mods = [m.name for m in pkgutil.walk_packages(ik_fast.__path__, "ik_fast.")]
for name in mods:
    importlib.import_module(name)
print("IMPORTED", " ".join(mods), flush=True)
import pytest
sys.exit(pytest.main([os.path.join(root, "tests"), "-m", "gpu", "--collect-only", "-q", "-p", "no:cacheprovider"]))
"""


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IK_FAST_TEST_", "PYTEST_"))}
    env.update(extra)
    return env


def test_checkout_on_pythonpath_imports_every_module_and_collects_the_gpu_tests(tmp_path):
    res = subprocess.run(
        [sys.executable, "-c", _CHECKOUT, ROOT],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=_env(PYTHONPATH=ROOT, IK_FAST_TEST_DEVICE="cuda"),  # (collected, not run: no CUDA needed)
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    mods = next(ln for ln in res.stdout.splitlines() if ln.startswith("IMPORTED")).split()[1:]
    assert {
        "ik_fast.backends",
        "ik_fast.kernels_triton",
        "ik_fast.kernels_triton.launch",
        "ik_fast.tools.bench",
        "ik_fast.records",
    } <= set(mods), mods
    collected = set(res.stdout.split())
    assert "tests/test_gpu.py::test_corner_cases_match_reference_on_cuda[native-wide-tf32]" in collected
    # the conformance suite on CUDA, every case of it, for every declared implementation; none of its CPU cases
    conformance = {t for t in collected if t.startswith("tests/test_conformance.py::")}
    for impl in FUSED:
        assert f"tests/test_conformance.py::test_opcheck[fourier_elu-{impl}-cuda]" in conformance
        assert f"tests/test_conformance.py::test_layer_variants_match_the_reference[eval-four_layers-{impl}-cuda]" in (
            conformance
        )
    assert conformance and all(t.endswith("-cuda]") for t in conformance), sorted(conformance)[:5]


def test_the_rehearsal_runs_each_conformance_test_once_per_implementation():
    """``-m gpu`` under ``IK_FAST_TEST_DEVICE=cpu`` (the rehearsal's selection) takes, of the conformance suite, one CPU
    case of each test for each implementation (test_conformance.rehearsed), but the ones it leaves to native."""
    import re

    import test_conformance as tc

    res = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/test_conformance.py", "-m", "gpu", "--collect-only", "-q"]
        + ["-p", "no:cacheprovider"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=_env(IK_FAST_TEST_DEVICE="cpu"),
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ids = [line for line in res.stdout.split() if line.startswith("tests/test_conformance.py::")]
    got = sorted((i.split("::")[1].split("[")[0], re.search(r"[\[-](\w+)-cpu\]$", i).group(1)) for i in ids)
    tests = [name for name in dir(tc) if name.startswith("test_")]
    expected = sorted((t, impl) for t in tests for impl in tc.IMPLEMENTATIONS if (t, impl) not in tc._NOT_REHEARSED)
    assert got == expected, ids


def _write_tests(folder, body):
    """A test folder whose conftest loads only the time-limit hooks (no escnn: the child starts in a second)."""
    folder.mkdir()
    (folder / "conftest.py").write_text(
        textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {TESTS!r})
        from _time_limits import *  # noqa
        """)
    )
    (folder / "test_limits.py").write_text(textwrap.dedent(body))


_BODY = """
    import signal
    import time


    def test_slow():
        time.sleep(60)


    def test_hangs_in_native_code():
        # SIGALRM blocked: as in a kernel that never returns, the limit cannot interrupt it
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(60)


    def test_after():
        assert True
    """


def test_per_test_limit_fails_a_slow_test_and_the_next_one_runs(tmp_path):
    _write_tests(tmp_path / "t", _BODY)
    progress = tmp_path / "progress.jsonl"
    t = time.time()
    res = subprocess.run(
        [sys.executable, "-m", "pytest", str(tmp_path / "t"), "-q", "-p", "no:cacheprovider", "-k", "not hangs"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(IK_FAST_TEST_TIMEOUT="2", IK_FAST_TEST_PROGRESS=str(progress)),
    )
    assert time.time() - t < 40
    assert res.returncode == 1, res.stdout
    assert "TimeLimitExceeded" in res.stdout and "ran past its time limit of 2 s" in res.stdout
    assert "1 failed, 1 passed" in res.stdout
    events = [json.loads(ln) for ln in progress.read_text().splitlines()]
    calls = {
        e["nodeid"].split("::")[-1]: e["outcome"] for e in events if e["event"] == "report" and e["when"] == "call"
    }
    assert calls == {"test_slow": "failed", "test_after": "passed"}


def test_deadline_skips_the_tests_not_started(tmp_path):
    _write_tests(tmp_path / "t", _BODY)
    res = subprocess.run(
        [sys.executable, "-m", "pytest", str(tmp_path / "t"), "-q", "-rs", "-p", "no:cacheprovider"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(IK_FAST_TEST_DEADLINE=str(time.time() - 1)),
    )
    assert res.returncode == 0, res.stdout
    assert "3 skipped" in res.stdout and "the time for tests (IK_FAST_TEST_DEADLINE) was spent" in res.stdout


def test_tests_step_goes_on_past_a_test_hung_in_native_code(tmp_path):
    """benchmarks/gpu_run.py tests: the hung test ends its pytest process (faulthandler, stacks printed); the step
    runs the tests not yet run in a new process and records every test, the hung one as such."""
    _write_tests(tmp_path / "t", _BODY)
    t = time.time()
    res = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "benchmarks", "gpu_run.py"),
            "tests",
            "--device",
            "cpu",
            "--per-test",
            "2",
            "--deadline",
            str(time.time() + 120),
            "--out-dir",
            str(tmp_path / "out"),
            "--results",
            str(tmp_path / "results"),
            "--name",
            "limits",
            "--",
            str(tmp_path / "t"),
            "-q",
            "-k",
            "not slow",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(PYTHONPATH=ROOT),
    )
    assert time.time() - t < 120
    assert res.returncode == 1, res.stdout + res.stderr  # a hung test is a failure of the step
    assert "Timeout" in res.stderr or "Timeout" in res.stdout  # faulthandler's stacks
    from ik_fast import records

    (path,) = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "results") for f in fs]
    assert path.endswith("-limits.json") and os.sep + "test" + os.sep in path
    got = {r["problem"].split("::")[-1]: (r["extra"]["outcome"], r["value"] is None) for r in records.load(path)}
    assert got == {"test_hangs_in_native_code": ("hung", True), "test_after": ("passed", False)}
    assert (tmp_path / "out" / "gpu-tests-2.xml").exists()  # the second pytest process's report
