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
uv pip install -q --python .venv/bin/python -e ".[test]"
.venv/bin/python -c "import torch, torchvision, kornia, ray; print('torch', torch.__version__, '| torchvision', torchvision.__version__, '| ray', ray.__version__)"
