#!/usr/bin/env bash
# The main job: write a PGD-40 (Linf 0.1) adversarial copy of 2,000 Fashion-MNIST test images against the shipped
# guard, sanitise it with the shipped TRN on a local Ray instance (2 actors), and print guard accuracy before and
# after plus the manifest counts (inputs = ok + error; the job fails if they do not add up).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
N=${N:-2000}
.venv/bin/trn attack --dataset fashion-mnist --split test --limit "$N" --attack pgd --eps 0.1 --steps 40 --seed 0 \
  --out runs/fmnist_pgd.npz
# A fresh attack file means a fresh sanitize job: `trn sanitize` resumes from an existing OUTPUT's manifest and
# refuses one written for different images, so start the output folder anew (resuming is for long jobs).
rm -rf runs/fmnist_pgd_clean
.venv/bin/trn sanitize runs/fmnist_pgd.npz runs/fmnist_pgd_clean --workers 2 --batch-size 256
