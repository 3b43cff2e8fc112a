#!/usr/bin/env bash
# Prepares, on a machine that reaches the package index, what a GPU machine without one lacks to run escnn: wheels of
# escnn and its pure-Python needs (pymanopt, autograd, joblib), and lie_learn rebuilt for that machine's CPython against
# NumPy 2 (lie_learn's published wheel is built against NumPy 1 and fails to import beside NumPy 2), plus setup.sh.
# About 13 MB, well inside what a device call carries.
#
#   bash scripts/device-wheels.sh [DEST]        (DEST defaults to .device-wheels, which git ignores)
#   DEVICE_PYTHON=3.11 bash scripts/device-wheels.sh DEST    lie_learn for another CPython (default 3.12: the
#                                                             GPU image's; a python3.X must be on the PATH or in pyenv)
#
# Then carry DEST with the GPU call (it is ignored by git: it travels only when named) and begin the command there
# with `source DEST/setup.sh DEST`, e.g.  source .device-wheels/setup.sh .device-wheels && bash benchmarks/run_gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-.device-wheels}
ver=${DEVICE_PYTHON:-3.12}
case "$ver" in 3.[0-9]|3.[0-9][0-9]) ;; *) echo "DEVICE_PYTHON must be a CPython version such as 3.12, got '$ver'" >&2; exit 2 ;; esac
py=$(PYENV_VERSION=$(pyenv versions --bare 2>/dev/null | grep -x "$ver\.[0-9]*" | tail -1) pyenv which "python$ver" \
     2>/dev/null || command -v "python$ver" || true)
[ -n "$py" ] || { echo "no python$ver found (PATH or pyenv): lie_learn must be compiled by the target's CPython" >&2; exit 1; }
mkdir -p "$dest"
if [ -d .git ] && [ "${dest#/}" = "$dest" ]; then
  grep -qxF "/$dest/" .git/info/exclude 2>/dev/null || echo "/$dest/" >> .git/info/exclude
fi
plat=(--only-binary=:all: --python-version "$ver" --implementation cp --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform any)
python3 -m pip download -q --no-deps "${plat[@]}" -d "$dest" escnn==1.0.11 pymanopt==2.2.1 autograd==1.9.1 joblib==1.5.2
# lie_learn: the .pyx sources of its published wheel, with NumPy 2's removed aliases replaced, compiled by the target
# CPython against NumPy 2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download -q --no-deps "${plat[@]}" -d "$work" lie-learn==0.0.2
"$py" -m venv "$work/venv"
"$work/venv/bin/pip" install -q 'numpy>=2' cython setuptools
(cd "$work" && unzip -q lie_learn-*.whl -d src && cd src && rm -f $(find lie_learn -name '*.so') &&
  sed -i 's/np\.int_t/np.int64_t/g; s/np\.int\b/np.int64/g; s/np\.float\b/np.float64/g' $(find lie_learn -name '*.pyx') &&
  cat > build.py <<'PY'
import glob, numpy
from setuptools import setup, Extension
from Cython.Build import cythonize
exts = [Extension(f[:-4].replace("/", "."), [f], include_dirs=[numpy.get_include()])
        for f in glob.glob("lie_learn/**/*.pyx", recursive=True)]
setup(name="lie_learn", ext_modules=cythonize(exts, language_level=2, quiet=True), script_args=["build_ext", "--inplace"])
PY
  "$work/venv/bin/python" build.py > build.log 2>&1 || { cat build.log >&2; exit 1; })
find "$work/src/lie_learn" -name '*.c' -delete
rm -f "$dest"/lie_learn-*-numpy2.tar.xz
tar -C "$work/src" -cJf "$dest/lie_learn-py${ver/./}-numpy2.tar.xz" lie_learn
cp scripts/device-setup.sh "$dest/setup.sh"
du -sh "$dest"
