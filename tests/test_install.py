"""Installs in fresh venvs. Take minutes and gigabytes: marked ``install``, run with ``pytest -m install`` (not in the
default suite, nor in CI's ``.ci/run``).

- The README's install recipe exactly as the README prints it (scripts/check_install.sh reads it from README.md and
  runs it unchanged), then every subpackage imported from the installed wheel, "native" available, a forward pass.
- A CUDA build of torch (torch==2.14.1, ~5.7 GB) on a machine that cannot link CUDA (scripts/check_cuda_torch.sh):
  ``available_backends()`` lists "native" after a CPU-only first-use build with no CUDA compile or link, and a forced
  CUDA build fails at once with the linker's own message. ``IK_FAST_CUDA_TORCH_VENV=DIR`` reuses (or keeps) that
  venv between runs.
"""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _base_python():
    return sys.executable if sys.prefix == sys.base_prefix else os.path.join(sys.base_prefix, "bin", "python3")


def _readme_recipe():
    text = open(os.path.join(ROOT, "README.md")).read()
    m = re.search(r"<!-- install-recipe -->\s*```bash\n(.*?)\n```", text, re.S)
    assert m, "no bash block after <!-- install-recipe --> in README.md"
    return m.group(1)


@pytest.mark.install
def test_readme_install_recipe_in_a_fresh_venv(tmp_path):
    recipe = _readme_recipe()
    env = dict(os.environ, PYTHON=_base_python())
    env.pop("IK_FAST_CACHE", None)
    r = subprocess.run(
        ["bash", os.path.join(ROOT, "scripts", "check_install.sh"), str(tmp_path / "venv")],
        capture_output=True,
        text=True,
        env=env,
        timeout=3600,
    )
    print(r.stdout[-6000:])
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    ran = r.stdout.split("----- recipe -----\n", 1)[1].split("\n----- end of recipe -----", 1)[0]
    assert ran == recipe  # what ran is the README's text, unchanged
    assert "OK: ik_fast" in r.stdout and "'native'" in r.stdout


@pytest.mark.install
def test_cuda_torch_without_cuda_libraries_builds_the_cpu_part(tmp_path):
    venv = os.environ.get("IK_FAST_CUDA_TORCH_VENV") or str(tmp_path / "venv")
    r = subprocess.run(
        ["bash", os.path.join(ROOT, "scripts", "check_cuda_torch.sh"), venv],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHON=_base_python()),
        timeout=3600,
    )
    print(r.stdout[-6000:])
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "OK: CUDA torch without CUDA libraries" in r.stdout
