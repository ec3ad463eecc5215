#!/usr/bin/env bash
# 1 vs 2 processes on this machine's CPU: the same `deepthink eval` command run once in one process and
# once as 2 processes started by accelerate (one thread each), wall times and a check that the files agree.
#   bash benchmarks/scale_cpu.sh [MODEL]          (default smollm2-135m; run it alone on the machine)
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="${1:-smollm2-135m}"
BIN=.venv/bin
OUT=$(mktemp -d)
ARGS=(--model "$MODEL" --task sst2 trec --seeds 0 1 --shots 1 --steps 3 --fixed-steps 3 --dev-size 8 --max-eval 50 --quiet
      --methods zero_shot icl dt_fixed dt_dev)   # the default set when these numbers were measured
$BIN/python -c "import deepthink; deepthink.load_model('$MODEL')" >/dev/null 2>&1   # fill the model cache first
t0=$(date +%s.%N)
$BIN/deepthink eval "${ARGS[@]}" --threads 2 --out "$OUT/one" >/dev/null
t1=$(date +%s.%N)
OMP_NUM_THREADS=1 $BIN/accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
  --dynamo_backend no -m deepthink eval "${ARGS[@]}" --out "$OUT/two" >/dev/null 2>&1
t2=$(date +%s.%N)
$BIN/python - "$OUT" "$t0" "$t1" "$t2" <<'PY'
import json, sys
from pathlib import Path
out, t0, t1, t2 = Path(sys.argv[1]), *map(float, sys.argv[2:])
worst, same = 0.0, True
for f in sorted((out / "one" / "units").glob("*.predictions.jsonl")):
    a = [json.loads(l) for l in f.read_text().splitlines()]
    b = [json.loads(l) for l in (out / "two" / "units" / f.name).read_text().splitlines()]
    for x, y in zip(a, b):
        for k, v in x.items():
            if isinstance(v, dict):
                same &= v["pred"] == y[k]["pred"]
                worst = max(worst, max(abs(p - q) for p, q in zip(v["logprob"], y[k]["logprob"])))
print(json.dumps({"one_process_s": round(t1 - t0, 1), "two_processes_s": round(t2 - t1, 1),
                  "speedup": round((t1 - t0) / (t2 - t1), 2), "same_predictions": same,
                  "max_logprob_diff": worst}))
PY
rm -rf "$OUT"
