#!/usr/bin/env bash
# Retrain every shipped checkpoint from scratch, in dependency order (guard first: everything else is trained
# against it). Each TRN is two stages: configs/*_stage1.yaml (3 epochs from scratch, into runs/) then its config
# (3 fine-tuning epochs from stage 1, into checkpoints/); the shipped TRN adds a third, a short fine-tune of the
# top-k TRN with hybrid maps (configs/trn_fmnist.yaml). The GFA and adversarially trained guards are the
# defence table's baselines (trn eval-defenses). Times on 2 idle CPU cores, one job at a time: guard ~25 min, each
# 3-epoch TRN stage ~15 min (13.5 min measured for a stage 2; two or three times that when jobs share the cores),
# the stage-3 fine-tune ~2 min, GFA guard ~45 min, adversarial training ~65 min; a GPU does it all in minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
rm -f checkpoints/*_train_state.* runs/*_stage1_train_state.*
.venv/bin/trn train-classifier --config configs/classifier_fmnist.yaml
# the shipped TRN: stage 1 and 2 with top-k maps (the top-k ablation), then a short hybrid-map fine-tune
.venv/bin/trn train --config configs/trn_fmnist_stage1.yaml
.venv/bin/trn train --config configs/trn_fmnist_topk.yaml
.venv/bin/trn train --config configs/trn_fmnist.yaml
for m in trn_fmnist_onestream trn_fmnist_argmax; do
  .venv/bin/trn train --config "configs/${m}_stage1.yaml"
  .venv/bin/trn train --config "configs/${m}.yaml"
done
.venv/bin/trn train-classifier --config configs/classifier_fmnist_gfa.yaml
.venv/bin/trn train-classifier --config configs/classifier_fmnist_advtrain.yaml
.venv/bin/trn train-classifier --config configs/classifier_fmnist_pgdat.yaml   # the fair PGD-AT baseline (~1 h)
# issue 10: the classifier zoo (mlp and cnn train the agnostic TRN; bncnn, resnet and vit are held out; mixer and
# dwcnn join the five-member ablation zoo), then the downstream-agnostic TRN, a fine-tune of checkpoints/trn_fmnist
# against the zoo (0.5-2 min per zoo epoch, ~17 min for the restorer on one core), its ablations (guard maps only; a
# wider net from scratch, then trained on, then against five members; the five-member zoo), the fidelity-against-
# robustness ablations (fine-tunes of the agnostic net, 8-13 min each on one core: a pure denoiser, narrow and wide;
# five times the fidelity on every image; 5x and 14x the fidelity on clean images only, the 14x one also for 8
# epochs, ~20 min, and with more CW-L2, then both with 50-step CW-L2 for 8 epochs, ~32 min each), and the fitted row
# of the downstream matrix (trn fit on the ViT, a few minutes)
for m in mlp cnn bncnn resnet vit mixer dwcnn; do
  .venv/bin/trn train-classifier --config "configs/zoo_${m}.yaml"
done
.venv/bin/trn train-agnostic --config configs/trn_fmnist_agnostic.yaml
.venv/bin/trn train-agnostic --config configs/trn_fmnist_agnostic_guardmap.yaml
.venv/bin/trn train-agnostic --config configs/trn_fmnist_agnostic_wide.yaml
.venv/bin/trn train-agnostic --config configs/trn_fmnist_agnostic_wide_cont.yaml  # 12 more epochs, ~42 min
.venv/bin/trn train-agnostic --config configs/trn_fmnist_agnostic_wide_zoo5.yaml  # 10 more, five members, ~42 min
.venv/bin/trn train-agnostic --config configs/trn_fmnist_agnostic_zoo5.yaml
for v in denoise denoise_wide fid cleanfid cleanfid14 cleanfid14_8ep cleanfid14_cw cleanfid14_cw50 cleanfid_cw50; do
  .venv/bin/trn train-agnostic --config "configs/trn_fmnist_agnostic_${v}.yaml"
done
.venv/bin/trn fit --classifier checkpoints/zoo_fmnist_vit --restorer checkpoints/trn_fmnist_agnostic \
  --out checkpoints/trn_fmnist_fit_vit --set map_from=downstream
# issue 11: the adversarially trained restorer, four stages from the one-stream gray-box net in front of the frozen
# guard (~25 + ~32 min on one idle core, then ~24 min on 2 cores: PGD-10, and ~36 min: PGD-20); a fifth stage, not
# shipped (one more PGD-20 epoch, ~40 min), and TRADES from stage 4 (~40 min); the width-32 ablation widened from
# stage 2 (~70 min on 2 cores); the two-stream ablation (~60 min); a new restorer stacked on the PGD-AT guard
# (needs classifier_fmnist_pgdat above); stage 4 behind Gaussian noise; the TRADES baseline guard (4 epochs, best
# epoch on validation)
.venv/bin/trn train-robust --config configs/trn_fmnist_robust_stage1.yaml
.venv/bin/trn train-robust --config configs/trn_fmnist_robust.yaml
.venv/bin/trn train-robust --config configs/trn_fmnist_robust_pgd10.yaml
.venv/bin/trn train-robust --config configs/trn_fmnist_robust_pgd20.yaml
.venv/bin/trn train-robust --config configs/trn_fmnist_robust_stage5.yaml
.venv/bin/trn train-robust --config configs/trn_fmnist_robust_trades.yaml   # TRADES ablation: half an epoch per run
.venv/bin/trn train-robust --config configs/trn_fmnist_robust_trades.yaml
.venv/bin/trn train-robust --config configs/trn_fmnist_robust_wide.yaml
.venv/bin/trn train-robust --config configs/trn_fmnist_robust_twostream.yaml
.venv/bin/trn train-robust --config configs/trn_fmnist_robust_stacked.yaml   # a restorer on the PGD-AT guard (~45 min)
.venv/bin/trn train-robust --config configs/trn_fmnist_robust_noise.yaml   # randomness ablation (~25 min)
# issue 12: the query shield's fallback restorer, the agnostic net trained on 8-query Square images and gray-box PGD
# (~17 min on 2 idle cores)
.venv/bin/trn train-robust --config configs/trn_fmnist_fallback.yaml
.venv/bin/trn train-classifier --config configs/classifier_fmnist_trades.yaml
