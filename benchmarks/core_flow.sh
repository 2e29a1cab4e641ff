#!/usr/bin/env bash
# A short end-to-end run of the data-vector core on a tiny timm model: init → 3 "sites" → export → merge → inspect.
# The three sites here perturb the base with seeded noise in place of real fine-tuning.
set -euo pipefail
out=${1:-taskvec-core-flow}
mkdir -p "$out" && cd "$out"
taskvec init --arch test_vit --num-classes 2 --labels benign,malignant --img-size 32 --out base.safetensors --force
python - <<'PY'
import torch
from safetensors.torch import load_file, save_file
base = load_file("base.safetensors")
for i in range(3):
    g = torch.Generator().manual_seed(i)
    save_file({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}, f"site{i}-model.safetensors")
PY
for i in 0 1 2; do
  taskvec export "site$i-model.safetensors" --base base.safetensors --out "site$i.safetensors" \
    --contributor "site$i" --samples $((100 * (i + 1))) --force
done
taskvec merge site0.safetensors site1.safetensors site2.safetensors --base base.safetensors --method weighted \
  --out merged.safetensors --force
taskvec inspect merged.safetensors
