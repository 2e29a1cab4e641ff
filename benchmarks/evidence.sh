#!/usr/bin/env bash
# The README's evidence on real data (../shared/data): simulations with and without DP-SGD.
# Usage: bash benchmarks/evidence.sh [OUT_DIR]   (about an hour on 2 CPU cores; resumable: rerun to continue)
set -euo pipefail
data=${TASKVEC_SHARED_DATA:-$(cd "$(dirname "$0")/../.." && pwd)/shared/data}
out=${1:-evidence}
mkdir -p "$out"
# BreastMNIST: 28x28 breast ultrasound, benign+normal vs malignant; 3 sites, iid; DP-SGD at ε = 1, 3, 8 (δ = 1e-5)
taskvec simulate --data "$data/breastmnist/breastmnist.npz" --out "$out/breastmnist" --sites 3 --split iid \
  --arch test_convnext --in-chans 1 --img-size 32 --num-classes 2 --epochs 5 --base-epochs 5 --lr 1e-3 \
  --dp --target-epsilons 1,3,8 --delta 1e-5
# MoNuSeg: H&E nuclei segmentation, sites = TCGA tissue-source sites
taskvec simulate --data "$data/monuseg_256" --task segmentation --out "$out/monuseg" --sites 3 --split by-group:tcga \
  --arch test_convnext --in-chans 3 --img-size 128 --num-classes 2 --epochs 10 --base-epochs 10 --lr 1e-3 \
  --batch-size 4 --dp --target-epsilons 8 --delta 1e-5
