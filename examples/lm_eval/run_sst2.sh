#!/usr/bin/env bash
# The worked example of docs/lm-eval.md: the harness's hf model (plain ICL) and deepthink at steps 1, 5 and 10
# on examples/lm_eval/deepthink_sst2.yaml (4 fixed demonstrations, first LIMIT validation reviews), one run at a
# time. Run from the repository root after `make venv`:  bash examples/lm_eval/run_sst2.sh [LIMIT] [OUT]
set -euo pipefail
LIMIT=${1:-200}
OUT=${2:-runs/lm-eval}
BIN=.venv/bin
SMOL=$($BIN/python -c "from deepthink.models import resolve; print(resolve('smollm2-135m')[1])")
COMMON=(--tasks deepthink_sst2 --include_path examples/lm_eval --num_fewshot 4 --limit "$LIMIT" --batch_size 8
        --log_samples)
$BIN/lm_eval --model hf --model_args "pretrained=$SMOL,dtype=float32" --device cpu "${COMMON[@]}" \
  --output_path "$OUT/hf"
for steps in 1 5 10; do
  $BIN/deepthink lm-eval --model_args "model=smollm2-135m,steps=$steps,step_size=0.01,momentum=0.9" "${COMMON[@]}" \
    --output_path "$OUT/deepthink-steps$steps"
done
$BIN/python examples/lm_eval/compare_samples.py "$OUT"/hf "$OUT"/deepthink-steps{1,5,10}
