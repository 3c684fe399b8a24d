#!/usr/bin/env bash
# Install everything from nothing: Fashion-MNIST (Debian), uv, a .venv with the pinned torch/torchvision pair, trn.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist
fi
command -v uv >/dev/null 2>&1 || python3 -m pip install -q uv
# uv ignores the machine's local CPU-only torch wheel, which does not pair with any torchvision on PyPI.
[ -x .venv/bin/python ] || uv venv -q .venv --python 3.11
# --compile-bytecode: every Ray worker process imports torch, pandas and Ray. Without .pyc files, and where
# PYTHONDONTWRITEBYTECODE is set (as on the machines this was built on, and in many container images), each
# process compiles them from source again: `import torch` took 5.0 s instead of 2.4 s here, a 2,048-image
# sanitise job 38-41 s instead of 16-18.
uv pip install -q --python .venv/bin/python --compile-bytecode -e ".[test]"
if [ ! -f .venv/.bytecode-compiled ]; then  # a venv made before the flag above: compile what it holds, once
  # (exit status ignored: a few packages ship files meant for other Python versions, e.g. torch's py312 tests)
  site="$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"
  .venv/bin/python -m compileall -q -j 0 "$site" >/dev/null 2>&1 || true
  touch .venv/.bytecode-compiled
fi
.venv/bin/python -m compileall -q trn workers >/dev/null  # this package is an editable install: its own modules too
.venv/bin/python -c "import torch, torchvision, kornia, ray; print('torch', torch.__version__, '| torchvision', torchvision.__version__, '| ray', ray.__version__)"
