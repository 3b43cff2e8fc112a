# Source this at the start of a GPU call (it is copied into the kit's folder by scripts/device-wheels.sh):
#   source .device-wheels/setup.sh .device-wheels
# Installs the carried escnn stack (no package index needed) into $IK_FAST_SITE (default /tmp/site) and puts it and
# the project root (the working directory) on PYTHONPATH: the project runs from its source tree, not installed.
dest=${1:-.device-wheels}
site=${IK_FAST_SITE:-/tmp/site}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$dest"/*.whl &&
  tar -C "$site" -xJf "$(ls "$dest"/lie_learn-*-numpy2.tar.xz | head -1)" &&
  export PYTHONPATH=$site:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 &&
  python3 -c "import escnn, torch, numpy; print('escnn', escnn.__version__, 'torch', torch.__version__, 'numpy', numpy.__version__, 'cuda', torch.cuda.is_available())"
