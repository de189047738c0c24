#!/usr/bin/env bash
# The checks and runs that need a GPU, in one script: run it when `status` shows a GPU
# lent (README, "On a GPU"). Everything it measures goes to $OUT (default gpu-out/).
#
#   bash scripts/gpu_check.sh                 # the checks, then the longest training runs
#   METALM_GPU_SKIP_LONG=1 bash scripts/gpu_check.sh  # the checks only (about 8 minutes)
#   METALM_GPU_STEPS=1000 bash scripts/gpu_check.sh   # the long run's steps (default 600)
#
# The device machine has PyTorch, transformers, safetensors, PyYAML and tqdm but no
# internet and no metalm install: the package runs from src/ (PYTHONPATH), and the
# encoder comes from $METALM_GPU_MODEL, or from .gpu/minilm-fp16 (all-MiniLM-L6-v2 in
# float16, so that it fits the 64 MiB a device call may carry; widened back to float32
# there, so every GPU run, its `frozen` baseline included, starts from those weights).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src:$PWD/benchmarks PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
# on one H200 with both targets at once, a 200-step row took 63-118 s (the step is
# bound by Python and tokenizing, not the GPU): 2000 steps did not fit in 470 s, 600 may
STEPS=${METALM_GPU_STEPS:-600}
EPISODES=${METALM_GPU_EPISODES:-300}

MODEL=${METALM_GPU_MODEL:-}
if [ -z "$MODEL" ] && [ -d .gpu/minilm-fp16 ]; then
  MODEL=/tmp/minilm-fp32
  $PY - <<'EOF' || exit 1
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

src, dst = Path(".gpu/minilm-fp16"), Path("/tmp/minilm-fp32")
dst.mkdir(exist_ok=True)
for f in src.iterdir():
    if f.name != "model.safetensors":
        shutil.copy(f, dst / f.name)
tensors = load_file(src / "model.safetensors")
save_file({k: v.float() if v.is_floating_point() else v for k, v in tensors.items()},
          dst / "model.safetensors", metadata={"format": "pt"})
print("model widened to float32 in", dst)
EOF
fi
MODEL_ARG=()
[ -n "$MODEL" ] && MODEL_ARG=("model.name_or_path=$MODEL")

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$OUT/gpu.txt"

# 0. the CUDA path: every learner CUDA = CPU, checkpoints across devices, the causal LM
#    in bf16, protonet on MiniLM CUDA = CPU
METALM_GPU_MODEL="$MODEL" timeout 180 $PY scripts/gpu_cuda_path.py --out "$OUT/cuda_path.json" \
  2>&1 | tee "$OUT/cuda_path.txt"
[ "${METALM_GPU_ONLY_PATH:-0}" = 1 ] && exit 0

# 1. smoke: meta-training on CUDA through the CLI with the NCCL backend asked for
#    (--nproc 1: one process, so no process group forms; NCCL between ranks needs 2 GPUs)
timeout 120 $PY -m metalm -q train --nproc 1 --backend nccl learner.name=protonet \
  "${MODEL_ARG[@]}" model.device=auto train.steps=6 train.eval_every=3 train.checkpoint_every=3 \
  train.val_episodes=5 train.tensorboard=false eval.episodes=5 \
  "eval.settings=[{n_way: 5, k_shot: 1}]" eval.full_way_shots=[] eval.baselines=[] \
  output_dir=/tmp/gpu-runs run_name=smoke 2>&1 | tail -5 | tee "$OUT/smoke.txt"
# the finished run resumed with the GPU hidden: its CUDA checkpoint loads on the CPU and
# the run is evaluated there (model.device=auto picks the CPU)
CUDA_VISIBLE_DEVICES= timeout 120 $PY -m metalm -q train --resume /tmp/gpu-runs/smoke \
  2>&1 | tail -5 | tee "$OUT/smoke_resume_cpu.txt"

# 2. throughput, GPU beside CPU: encoding and meta-training steps
timeout 240 $PY scripts/gpu_throughput.py --devices cpu cuda ${MODEL:+--model "$MODEL"} \
  --out "$OUT/throughput.json" 2>&1 | tail -6 | tee "$OUT/throughput.txt"

# 3. the longest runs (issue 22: more source tasks, 10x longer), both targets at once
[ "${METALM_GPU_SKIP_LONG:-0}" = 1 ] && exit 0
for target in banking77 clinc150; do
  timeout 470 $PY benchmarks/source_tasks.py --targets $target --long-steps "$STEPS" --quiet \
    --rows cluster names --episodes "$EPISODES" \
    --runs /tmp/gpu-runs/source-tasks --out "$OUT/source_tasks_$target.json" \
    "${MODEL_ARG[@]}" > "$OUT/source_tasks_$target.log" 2>&1 &
done
wait
tail -n 3 "$OUT"/source_tasks_*.log
