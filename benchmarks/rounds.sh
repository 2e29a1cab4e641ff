#!/usr/bin/env bash
# The evidence for asynchronous rounds (docs/results) (`taskvec simulate --rounds`) on ../shared/data: BreastMNIST with
# 3 label-skewed sites (Dirichlet 0.5) and MoNuSeg with 3 TCGA source sites, the pretrained tf_efficientnet_lite0,
# up to 3 arrivals per site, seeds 0-2; each seed's report in OUT/<data>/seed<S>/.
# Usage, from the repository root: bash benchmarks/rounds.sh [OUT_DIR]   (per seed 13 minutes for BreastMNIST and
# 6 for MoNuSeg on 2 CPU cores shared at load 6 to 12; resumable: each seed is its own command, and a rerun reuses
# every finished fine-tune, vector and version)
set -euo pipefail
shared=${TASKVEC_SHARED:-../shared}
out=${1:-evidence-rounds}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
args=(--data "$shared/data/breastmnist/breastmnist.npz" --sites 3 --split dirichlet:0.5 --arch tf_efficientnet_lite0
      --weights "$shared/weights/tf_efficientnet_lite0.in1k.safetensors" --in-chans 1 --img-size 32
      --labels malignant,normal_benign --train all --lr 1e-4 --epochs 6 --batch-size 16 --methods mean,ties
      --rounds 3 --device cpu)
# MoNuSeg: H&E nuclei segmentation (U-Net over the same encoder, 64 px), sites = TCGA tissue-source sites
seg=(--data "$shared/data/monuseg_256" --task segmentation --sites 3 --split by-group:tcga --arch tf_efficientnet_lite0
     --weights "$shared/weights/tf_efficientnet_lite0.in1k.safetensors" --in-chans 3 --img-size 64 --num-classes 2
     --train all --lr 1e-3 --epochs 10 --batch-size 4 --methods mean,ties --rounds 3 --device cpu)
for seed in 0 1 2; do
  taskvec simulate "${args[@]}" --out "$out/breastmnist/seed$seed" --seed "$seed"
  taskvec simulate "${seg[@]}" --out "$out/monuseg/seed$seed" --seed "$seed"
done
# every seed done: reports with mean ± sd and error bars (utility_vs_arrivals.png) in OUT/<data>/
taskvec simulate "${args[@]}" --out "$out/breastmnist" --seeds 0,1,2
taskvec simulate "${seg[@]}" --out "$out/monuseg" --seeds 0,1,2
python "$(dirname "$0")/rounds_summary.py" "$out/breastmnist" "$out/monuseg"  # add --readme docs/results/generated/rounds.md to update it
