#!/usr/bin/env bash
# Which merge method suits which consortium: BreastMNIST (../shared/data) split into a few large iid sites and
# into many small label-skewed sites, every method with and without λ calibrated, several seeds.
# Usage: bash benchmarks/merge_methods.sh [OUT_DIR] [SEEDS]   then   python benchmarks/merge_methods_summary.py OUT_DIR
# (about 5 minutes per simulation on 2 CPU cores; resumable)
set -euo pipefail
data=${TASKVEC_SHARED_DATA:-$(cd "$(dirname "$0")/../.." && pwd)/shared/data}/breastmnist/breastmnist.npz
out=${1:-merge-methods}
seeds=${2:-0 1 2}
methods=sum,mean,weighted,dare,ties,dare_ties,breadcrumbs,model_stock,median,trimmed_mean
common=(--data "$data" --arch test_convnext --in-chans 1 --img-size 32 --num-classes 2 --epochs 5 --base-epochs 5
        --lr 1e-3 --methods "$methods" --device cpu)
for seed in $seeds; do
  taskvec simulate "${common[@]}" --out "$out/iid3-seed$seed" --sites 3 --split iid --seed "$seed"
  taskvec simulate "${common[@]}" --out "$out/dirichlet8-seed$seed" --sites 8 --split dirichlet:0.5 --seed "$seed"
done
