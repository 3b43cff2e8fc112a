"""The README's install recipe, verbatim, in a fresh venv, then every subpackage imported from the installed wheel and a
forward pass (scripts/check_install.sh). Takes minutes: marked ``install``, run with ``pytest -m install``."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.install
def test_readme_install_recipe_in_a_fresh_venv(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable if sys.prefix == sys.base_prefix else
               os.path.join(sys.base_prefix, "bin", "python3"))
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "check_install.sh"), str(tmp_path / "venv")],
                       capture_output=True, text=True, env=env, timeout=3600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "OK: ik_fast" in r.stdout
