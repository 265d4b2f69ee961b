#!/usr/bin/env bash
# One-time set-up on Debian/Ubuntu: Fashion-MNIST from Debian, a venv in .venv, torch + simreg.
# Idempotent: a second run only checks. Usage: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq dataset-fashion-mnist
fi

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first, pinned to the release this project is tested with (CPU or CUDA wheel from pip's index).
python -c "import torch, torchvision" 2>/dev/null || python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
# setuptools warns about every editable install (a box of text): hidden, the install itself is checked below
PYTHONWARNINGS=ignore python -m pip install -q -e ".[test]"
echo "simreg set up: $(python -c 'import ray, torch, mlflow; print(f"ray {ray.__version__}, torch {torch.__version__}, mlflow {mlflow.__version__}")')"
