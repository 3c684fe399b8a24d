#!/usr/bin/env bash
# Retrain every shipped checkpoint from scratch, in dependency order (guard first: the TRNs are trained against it).
# CPU: about 10 min (guard) + about 50 min per TRN on 2 cores; with a GPU, a few minutes in all.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -f checkpoints/*_train_state.*
.venv/bin/trn train-classifier --config configs/classifier_fmnist.yaml
.venv/bin/trn train --config configs/trn_fmnist.yaml
.venv/bin/trn train --config configs/trn_fmnist_onestream.yaml
