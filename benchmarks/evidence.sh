#!/usr/bin/env bash
# The evidence grid (docs/results) on real data (../shared/data) with the shared pretrained tf_efficientnet_lite0:
# BreastMNIST (3 iid or Dirichlet-0.5 sites), MoNuSeg (3 TCGA source sites) and ISBI 2012 EM (3 iid sites; its
# unlabelled test folder is left out, so a test share of the training tiles is held out), per training mode, without DP and
# with DP-SGD at one target ε (δ = 1e-5, per-image clipping at 1.0; class-means: its one Gaussian release at ε 1, 3
# and 8; *-pixel-stats: the per-pixel statistics head over an FPN decoder at ε 1, 3 and 8, against DP-SGD on the same
# decoder, *-fpn-nb-e8), seeds 0-2, mean ± sd. BreastMNIST at 32 px and at 64 px (bm64-*). PBC blood cells (pbc-*: 5 sites of
# about 2,400 images, iid or Dirichlet 0.5, DP-SGD at ε 8 and without DP) is sized for GPUs: about 90 minutes per
# seed on 2 CPU cores for norm-bias, two hours for lora:8. pbc128-* (iid, 128 px, norm-bias, lora:8 and all at ε 1,
# 3 and 8) is for a GPU only.
# Usage, from the repository root: bash benchmarks/evidence.sh [OUT_DIR] [NAME ...]   (default: every experiment but
#   the PBC ones, pbc-* and pbc128-*)
#   SEEDS=0,1 runs these seeds (default 0,1,2; the report over one seed shows no sd).
#   JOBS=N runs N (experiment, seed) simulations at once (default 1). The published tables: JOBS=15 on one H100 with 16
#   CPU cores, about 5 minutes for the first 15 and 7 for the other 12; on 2 CPU cores one BreastMNIST seed takes
#   about 40 minutes. Resumable: every simulation reuses its finished runs.
#   EXECUTOR=ray submits every fine-tune of every simulation as a Ray task to the instance at ADDRESS (default auto:
#   start one first with `ray start --head`, or join a cluster), with TASK_CPUS and TASK_GPUS each (default 1, 0);
#   JOBS then sets how many simulations submit at once (docs/how-to/simulate.md).
set -euo pipefail
shared=${TASKVEC_SHARED:-../shared}
out=${1:-evidence}; shift || true
weights="$shared/weights/tf_efficientnet_lite0.in1k.safetensors"
breast="--data $shared/data/breastmnist/breastmnist.npz --sites 3 --arch tf_efficientnet_lite0 --weights $weights
    --in-chans 1 --labels malignant,normal_benign --methods mean,ties --no-calibrate --dp"
bm="$breast --img-size 32"
bm64="$breast --img-size 64"
monuseg="--data $shared/data/monuseg_256 --task segmentation --sites 3 --split by-group:tcga
    --arch tf_efficientnet_lite0 --weights $weights --in-chans 3 --img-size 64 --num-classes 2 --no-calibrate --dp"
em="--data $shared/data/isbi2012_em --task segmentation --sites 3 --split iid --arch tf_efficientnet_lite0
    --weights $weights --in-chans 1 --img-size 64 --num-classes 2 --no-calibrate --dp"
mo="$monuseg --methods mean,ties"
isbi="$em --methods mean,ties"
pixel_stats="--decoder fpn --train stats-head:128 --methods lda-head --target-epsilons 1,3,8"
pbc_sites="--data $shared/data/pbc_blood_cells_128 --sites 5 --arch tf_efficientnet_lite0 --weights $weights
    --in-chans 3 --num-classes 8 --labels basophil,eosinophil,erythroblast,ig,lymphocyte,monocyte,neutrophil,platelet
    --methods mean,ties --no-calibrate --dp"
pbc="$pbc_sites --img-size 64 --target-epsilons 8"
pbc128="$pbc_sites --img-size 128 --split iid --target-epsilons 1,3,8"
declare -A grid=(
  [bm-nb-e1]="$bm --split iid --train norm-bias --target-epsilons 1"
  [bm-nb-e3]="$bm --split iid --train norm-bias --target-epsilons 3"
  [bm-nb-e8]="$bm --split iid --train norm-bias --target-epsilons 8"
  [bm-lora8-e1]="$bm --split iid --train lora:8 --target-epsilons 1"
  [bm-lora8-e3]="$bm --split iid --train lora:8 --target-epsilons 3"
  [bm-lora8-e8]="$bm --split iid --train lora:8 --target-epsilons 8"
  [bm-all-e8]="$bm --split iid --train all --target-epsilons 8"
  [bm-dir-nb-e8]="$bm --split dirichlet:0.5 --train norm-bias --target-epsilons 8"
  [mo-nb-e8]="$mo --train norm-bias --target-epsilons 8"
  [mo-lora8-e8]="$mo --train lora:8 --target-epsilons 8"
  [mo-all-e8]="$mo --train all --target-epsilons 8"
  [isbi-nb-e8]="$isbi --train norm-bias --target-epsilons 8"
  [mo-pixel-stats]="$monuseg $pixel_stats"
  [isbi-pixel-stats]="$em $pixel_stats"
  [mo-fpn-nb-e8]="$mo --decoder fpn --train norm-bias --target-epsilons 8"
  [isbi-fpn-nb-e8]="$isbi --decoder fpn --train norm-bias --target-epsilons 8"
  [bm64-cm]="$bm64 --split iid --train class-means --target-epsilons 1,3,8"
  [bm64-dir-cm]="$bm64 --split dirichlet:0.5 --train class-means --target-epsilons 1,3,8"
  [bm64-head-e8]="$bm64 --split iid --train head --target-epsilons 8"
  [bm64-nb-e8]="$bm64 --split iid --train norm-bias --target-epsilons 8"
  [pbc-nb-e8]="$pbc --split iid --train norm-bias"
  [pbc-lora8-e8]="$pbc --split iid --train lora:8"
  [pbc-dir-nb-e8]="$pbc --split dirichlet:0.5 --train norm-bias"
  [pbc-dir-lora8-e8]="$pbc --split dirichlet:0.5 --train lora:8"
  [pbc128-nb]="$pbc128 --train norm-bias"
  [pbc128-lora8]="$pbc128 --train lora:8"
  [pbc128-all]="$pbc128 --train all"
)
names=("$@")
if [ ${#names[@]} -eq 0 ]; then  # every experiment but PBC's, which are run by name
  for name in "${!grid[@]}"; do [[ $name == pbc* ]] || names+=("$name"); done
fi
for name in "${names[@]}"; do
  [ -n "${grid[$name]:-}" ] || { echo "evidence.sh: unknown experiment $name (known: ${!grid[*]})" >&2; exit 2; }
done
executor=""
if [ "${EXECUTOR:-local}" = ray ]; then
  executor="--executor ray --address ${ADDRESS:-auto} --task-cpus ${TASK_CPUS:-1} --task-gpus ${TASK_GPUS:-0}"
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
seeds=${SEEDS:-0,1,2}
for name in "${names[@]}"; do
  for seed in ${seeds//,/ }; do echo ${grid[$name]} $executor --out "$out/$name/seed$seed" --seed "$seed"; done
done | xargs -P "${JOBS:-1}" -L 1 taskvec simulate > "$out.log" 2>&1
for name in "${names[@]}"; do  # every seed finished: the report over seeds (mean ± sd, error bars) reuses them
  taskvec simulate ${grid[$name]} --out "$out/$name" --seeds "$seeds" >> "$out.log" 2>&1
  python "$(dirname "$0")/evidence_summary.py" "$out/$name"
done
