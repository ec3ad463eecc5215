#!/usr/bin/env bash
# The GPU path, measured in one short script (issue 14): run it on a machine with CUDA GPUs, torch and
# transformers (no model weights or network needed), from the repository root with this repo installed.
#   bash benchmarks/gpu_check.sh            -> benchmarks/results/gpu/{speed.json,speed.md,launch.json}
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=benchmarks/results/gpu
mkdir -p "$OUT"
nvidia-smi -L | tee "$OUT/gpus.txt"
# 1. scoring speed and memory with a Llama-2-7B-shaped model (random weights, fp16), and a 15-step tuning
#    run of the same shape (tune_s in each setting); the tokenizer is SmolLM2's, read from the model cache
$PY benchmarks/speed.py --device cuda --dtype float16 --random-init llama2-7b --tasks sst5,trec --shots 1,8 \
  --max-items 32 --steps 15 --no-load --mem-budget 4096 --out "$OUT"
# 2. with 2 or more GPUs: the same evaluation on 1 and on 2 processes (a small random model folder)
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  $PY - <<'PY'
import torch, transformers, deepthink
from pathlib import Path
lm = deepthink.load_model("smollm2-135m")
cfg = transformers.LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16,
                               num_key_value_heads=16, vocab_size=len(lm.tokenizer))
m = transformers.AutoModelForCausalLM.from_config(cfg)
m.save_pretrained("/tmp/gpu-rand"); lm.tokenizer.save_pretrained("/tmp/gpu-rand")
PY
  ARGS=(--model /tmp/gpu-rand --device cuda --task sst2 trec --seeds 0 1 --steps 10 --dev-size 32 --max-eval 200 --quiet)
  t0=$(date +%s); deepthink eval "${ARGS[@]}" --out /tmp/gpu-one; t1=$(date +%s)
  accelerate launch --multi_gpu --num_processes 2 -m deepthink eval "${ARGS[@]}" --out /tmp/gpu-two; t2=$(date +%s)
  echo "{\"one_process_s\": $((t1 - t0)), \"two_processes_s\": $((t2 - t1))}" | tee "$OUT/launch.json"
fi
