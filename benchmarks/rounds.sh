#!/usr/bin/env bash
# The evidence for asynchronous rounds (docs/results) (`taskvec simulate --rounds`) on ../shared/data with the
# pretrained tf_efficientnet_lite0, up to 3 arrivals per site, no DP: BreastMNIST with 3 label-skewed sites
# (Dirichlet 0.5) and MoNuSeg with 3 TCGA source sites (seeds 0-2), and, run by name, PBC blood cells with 5
# Dirichlet-0.5 sites of about 2,400 images (`norm-bias` at the product defaults); each seed's report in
# OUT/<data>/seed<S>/.
# Usage, from the repository root: bash benchmarks/rounds.sh [OUT_DIR] [DATA ...]   (DATA: breastmnist, monuseg,
#   pbc; default breastmnist monuseg. Per seed 13 minutes for BreastMNIST, 6 for MoNuSeg and about 40 for PBC on
#   2 CPU cores; SEEDS=0,1 runs these seeds, default 0,1,2. Resumable: each seed is its own command, and a rerun
#   reuses every finished fine-tune, vector and version)
set -euo pipefail
shared=${TASKVEC_SHARED:-../shared}
out=${1:-evidence-rounds}; shift || true
weights="$shared/weights/tf_efficientnet_lite0.in1k.safetensors"
declare -A data=(
  [breastmnist]="--data $shared/data/breastmnist/breastmnist.npz --sites 3 --split dirichlet:0.5
      --arch tf_efficientnet_lite0 --weights $weights --in-chans 1 --img-size 32 --labels malignant,normal_benign
      --train all --lr 1e-4 --epochs 6 --batch-size 16 --methods mean,ties --rounds 3 --device cpu"
  # H&E nuclei segmentation (U-Net over the same encoder, 64 px), sites = TCGA tissue-source sites
  [monuseg]="--data $shared/data/monuseg_256 --task segmentation --sites 3 --split by-group:tcga
      --arch tf_efficientnet_lite0 --weights $weights --in-chans 3 --img-size 64 --num-classes 2
      --train all --lr 1e-3 --epochs 10 --batch-size 4 --methods mean,ties --rounds 3 --device cpu"
  [pbc]="--data $shared/data/pbc_blood_cells_128 --sites 5 --split dirichlet:0.5 --arch tf_efficientnet_lite0
      --weights $weights --in-chans 3 --img-size 64 --num-classes 8
      --labels basophil,eosinophil,erythroblast,ig,lymphocyte,monocyte,neutrophil,platelet
      --train norm-bias --methods mean,ties --no-calibrate --rounds 3"
)
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(breastmnist monuseg)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
seeds=${SEEDS:-0,1,2}
for name in "${names[@]}"; do
  [ -n "${data[$name]:-}" ] || { echo "rounds.sh: unknown data set $name (breastmnist, monuseg, pbc)" >&2; exit 2; }
  for seed in ${seeds//,/ }; do taskvec simulate ${data[$name]} --out "$out/$name/seed$seed" --seed "$seed"; done
  # every seed done: the report with mean ± sd and error bars (utility_vs_arrivals.png) in OUT/<data>/
  taskvec simulate ${data[$name]} --out "$out/$name" --seeds "$seeds"
done
folders=("${names[@]/#/$out/}")
python "$(dirname "$0")/rounds_summary.py" "${folders[@]}"  # add --readme docs/results/generated/rounds.md to update it
