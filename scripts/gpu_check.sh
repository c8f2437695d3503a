#!/usr/bin/env bash
# One GPU check, about 8 minutes on one H200: every GPU number the README quotes.
#
#   scripts/gpu_check.sh             # on a CUDA machine: writes results/benchmarks/*_cuda.md
#   scripts/gpu_check.sh --dry-run   # anywhere: the 8B plan on the meta device and every other
#                                    # step on the CPU at smoke size; writes nothing under results/
#
# Steps (each under its own time limit; a step that fails is reported and the rest go on):
#   1. distributions at the Llama-3-8B shape (random bf16 weights): prompts/s, tokens/s and the
#      share of the 790 TFLOP/s bf16 matrix rate (scripts/bench_distributions.py)
#   2. sampling (scripts/bench_sampling.py on the small organism)
#   3. activation capture and probes on the GPU (a random 16-layer x 1024 Llama, the suite's
#      example study at 168 prompts): capture time, probe cross-validation time and accuracy
#   4. a 2-process data-parallel distributions run on the one GPU (torchrun, gloo), compared
#      with one process: same rows, max |difference|
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
if [[ $DRY == 1 ]]; then DEV=cpu; RES=$(mktemp -d); else DEV=cuda; RES=results/benchmarks; fi
WORK=$(mktemp -d)
export TOKENIZERS_PARALLELISM=false
FAILED=()
T0=$(date +%s)

step() {  # step NAME LIMIT_S COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    local t=$(date +%s)
    if timeout "$limit" "$@"; then
        echo "   ok: $name in $(( $(date +%s) - t )) s"
    else
        echo "   FAILED: $name (exit $?) after $(( $(date +%s) - t )) s"
        FAILED+=("$name")
    fi
}

if [[ $DRY == 0 ]]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || exit 2
    python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'" || exit 2
fi

# 1. distributions at the Llama-3-8B shape
if [[ $DRY == 1 ]]; then
    step distributions-8b 120 python -m scripts.bench_distributions --shape llama3-8b --dry-run
else
    step distributions-8b 180 python -m scripts.bench_distributions --shape llama3-8b \
        --device cuda --dtype bfloat16 --methods workbench,hf --repeats 2 \
        --peak-tflops 790 --out "$RES/distributions_cuda.md"
fi

# 2. sampling
if [[ $DRY == 1 ]]; then
    step sampling 180 python -m scripts.bench_sampling --quick --device cpu --real-prompts 0 --out -
else
    step sampling 120 python -m scripts.bench_sampling --device cuda --real-prompts 0 \
        --out "$RES/sampling_cuda.md"
fi

# 3 and 4 share a study and a model
SHAPE=(1024 16)
[[ $DRY == 1 ]] && SHAPE=(256 4)  # the CPU smoke size
python - "$WORK" "${SHAPE[@]}" <<'EOF'
import sys
from pathlib import Path

import yaml

from scripts.soak import study_dict
from workbench.tiny import build_tiny_model

work = Path(sys.argv[1])
(work / "study.yaml").write_text(yaml.safe_dump(study_dict()))
d_model, n_layers = int(sys.argv[2]), int(sys.argv[3])
build_tiny_model(work / "model", "llama", seed=0, d_model=d_model, n_layers=n_layers, vocab_size=2048)
EOF
MODEL=(--model "$WORK/model" --device "$DEV" --quiet)

# 3. activation capture and probes on the device
step activations 90 python -m workbench activations "$WORK/study.yaml" "${MODEL[@]}" \
    --positions answer --batch-size 64 --out "$WORK/acts"
step probes 90 python - "$WORK/acts" "$DEV" "$RES" "$DRY" <<'EOF'
import sys
import time
from pathlib import Path

import numpy as np
import torch

from workbench.interp.activations import ActivationStore
from workbench.interp.fit import CVTask, cross_validate, grouped_folds

acts, dev, res, dry = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), sys.argv[4] == "1"
store = ActivationStore.open(acts)
X, sites, rows = store.stack(str(store.index["site_kind"].iloc[0]), "answer")
folds = grouped_folds(rows["persona_id"].to_numpy(), 5)
codes, levels = np.unique(rows["party"].astype(str).to_numpy(), return_inverse=True)
task = CVTask("logistic", levels.astype(np.int64), folds, len(codes))
lines = [
    f"# Activation capture and probes on {torch.cuda.get_device_name() if dev == 'cuda' else 'CPU'}",
    "",
    "`scripts/gpu_check.sh` step 3: random 16-layer x 1024 Llama, 168 prompts, every "
    "blocks.*.hook_resid_post at the answer position; probe = logistic on `party`, 5 grouped "
    "folds, every layer at once.",
    "",
    "| what | device | seconds | note |",
    "|---|---|---|---|",
    f"| capture | {dev} | {store.manifest['timings_s']['capture']} | "
    f"{store.manifest['counts']['vectors']} vectors |",
]
for device in dict.fromkeys(["cpu", dev]):
    try:
        Xd = X.to(device)
        cross_validate(Xd, [task])  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        cv = cross_validate(Xd, [task])
        if device == "cuda":
            torch.cuda.synchronize()
        best = float(np.nanmean(cv.scores[0], axis=0).max())
        note = f"best layer's held-out accuracy {best:.3f}"
        lines.append(f"| probes | {device} | {time.perf_counter() - t:.3f} | {note} |")
    except Exception as err:  # reported, not fatal: the table says what failed
        lines.append(f"| probes | {device} | failed | {type(err).__name__}: {err} |")
text = "\n".join(lines) + "\n"
print(text)
if not dry:
    (res / "activations_cuda.md").write_text(text)
EOF

# 4. data parallel: two processes on the one device, then one process; same tables?
DP=(--chunk-prompts 8 --batch-size 8)
step dp-two 120 python -m torch.distributed.run --standalone --nproc-per-node 2 -m workbench -- \
    distributions "$WORK/study.yaml" "${MODEL[@]}" "${DP[@]}" --out "$WORK/dp2"
step dp-one 60 python -m workbench distributions "$WORK/study.yaml" "${MODEL[@]}" "${DP[@]}" \
    --out "$WORK/dp1"
python - "$WORK" "$RES" "$DRY" <<'EOF'
import json
import sys
from pathlib import Path

import pandas as pd

work, res, dry = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1"
lines = [
    "# Data-parallel distributions on one device",
    "",
    "`scripts/gpu_check.sh` step 4: `torchrun --nproc-per-node 2 -m workbench -- distributions` "
    "against one process, random 16-layer x 1024 Llama, 168 prompts.",
    "",
    "| table | rows (2 ranks) | rows (1 process) | same rows | max abs difference |",
    "|---|---|---|---|---|",
]
for name in ("distributions", "variants", "prompt_stats", "adjusted", "position_bias"):
    a = pd.read_parquet(work / "dp2" / f"{name}.parquet")
    b = pd.read_parquet(work / "dp1" / f"{name}.parquet")
    num = a.select_dtypes("number").columns
    same = len(a) == len(b) and a.drop(columns=num).equals(b.drop(columns=num))
    diff = float((a[num] - b[num]).abs().max().max()) if same and len(num) else float("nan")
    lines.append(f"| {name} | {len(a)} | {len(b)} | {same} | {diff:.2e} |")
for run in ("dp2", "dp1"):
    m = json.loads((work / run / "manifest.json").read_text())
    lines.append(f"\n{run}: world_size {m['world_size']}, score {m['timings_s']['score']} s")
text = "\n".join(lines) + "\n"
print(text)
if not dry:
    (res / "data_parallel_cuda.md").write_text(text)
EOF

echo "== done in $(( $(date +%s) - T0 )) s; failed: ${FAILED[*]:-none}"
rm -rf "$WORK"
[[ ${#FAILED[@]} == 0 ]]
