#!/usr/bin/env bash
# CPU smoke training of a small LoCoRE on the built-in synthetic benchmark (a few minutes on 2 cores):
#   bash recipes/train_cpu_smoke.sh [extra `locore-plugin train` arguments, e.g. --max-steps 20]
# Every epoch it reports Medium/Hard mAP on the held-out benchmark next to the global-only ranking
# (runs/train_cpu_smoke/log.jsonl); the best weights are in runs/train_cpu_smoke/best.
set -euo pipefail
cd "$(dirname "$0")/.."
INIT=runs/locore-synthetic-init
if [ ! -f "$INIT/model.safetensors" ]; then
  python - "$INIT" <<'PY'
import sys, torch
from locore_plugin.adapters.locore import LocoreConfig, LocoreModel, save_checkpoint
# 1 layer, hidden 64, window 32, on 32-d synthetic descriptors; 1,026 positions (>= 9 images x 26 tokens)
config = LocoreConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128,
                      attention_window=32, max_position_embeddings=1026, local_dim=32, global_dim=32)
torch.manual_seed(0)
save_checkpoint(LocoreModel(config), sys.argv[1], "locore-tiny")
PY
fi
locore-plugin train recipes/train_cpu_smoke.toml "$@"
