#!/usr/bin/env bash
# The main job: write a PGD-40 (Linf 0.1) adversarial copy of 2,000 Fashion-MNIST test images against the shipped
# guard, sanitise it with the shipped TRN on a local Ray instance, and print guard accuracy before and after.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
N=${N:-2000}
.venv/bin/trn attack --dataset fashion-mnist --split test --limit "$N" --attack pgd --eps 0.1 --steps 40 --seed 0 \
  --out runs/fmnist_pgd.npz
.venv/bin/trn sanitize runs/fmnist_pgd.npz runs/fmnist_pgd_clean --workers 2
