#!/usr/bin/env bash
# The GPU path, measured in one short script (issue 14): run it on a machine with CUDA GPUs, torch and
# transformers (no model weights or network needed), from the repository root, with deepthink importable
# (installed, or PYTHONPATH=src).
#   bash benchmarks/gpu_check.sh     -> benchmarks/results/gpu/{gpus.txt,speed.json,speed.md,same_as_cpu.json,...}
# Environment: PYTHON (default python), GPU_OUT (the output folder), MODEL (whose tokenizer the random models use:
# a registry name or a folder with config.json and tokenizer files; default smollm2-135m), DEEPTHINK_DATA_DIR
# (tasks sst5 and trec are read), SHAPES (the --random-init shapes timed, default "llama2-7b qwen2.5-7b": the
# first gets the full grid, the others one setting). A section that fails is reported and the next one runs;
# the exit status says whether any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${GPU_OUT:-benchmarks/results/gpu}
MODEL=${MODEL:-smollm2-135m}
SHAPES=(${SHAPES:-llama2-7b qwen2.5-7b})
mkdir -p "$OUT"
nvidia-smi -L | tee "$OUT/gpus.txt"
NGPU=$(nvidia-smi -L | wc -l)
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
FAILED=()

# A random Llama folder with MODEL's tokenizer: random_llama DIR HIDDEN LAYERS HEADS KV_HEADS
random_llama() {
  $PY - "$MODEL" "$@" <<'PY'
import sys, torch, transformers, deepthink
model, out, hidden, layers, heads, kv_heads = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
tok = transformers.AutoTokenizer.from_pretrained(deepthink.models.resolve(model)[1])
cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                               num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=len(tok),
                               max_position_embeddings=4096)
torch.manual_seed(0)
transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
tok.save_pretrained(out)
PY
}

# 1. scoring speed and memory with 7B-shaped models (random weights, fp16) and a 15-step tuning run of the same
#    shape (tune_s in each setting): the full grid for the first shape, one setting for the others
speed() {
  local shape=$1; shift
  $PY benchmarks/speed.py --model "$MODEL" --device cuda --dtype float16 --random-init "$shape" "$@" \
    --max-items 32 --steps 15 --no-load --merge --out "$OUT"
}

# 2. the same `deepthink eval` on the CPU, on cuda and with --device auto (a small random Llama, float32):
#    the same predictions, per-choice log-probabilities within float32 summation noise
same_as_cpu() {
  random_llama "$TMP/rand" 256 4 8 4 >/dev/null 2>&1 || return 1
  local args=(--model "$TMP/rand" --task sst5 trec --seeds 0 --shots 1 --steps 5 --dev-size 16 --max-eval 64 --quiet
              --methods zero_shot icl dt_fixed dt_dev)
  for dev in cpu cuda auto; do
    local t0=$(date +%s.%N)
    $PY -m deepthink eval "${args[@]}" --device $dev --out "$TMP/$dev" >/dev/null || return 1
    awk -v d=$dev -v a=$t0 -v b=$(date +%s.%N) 'BEGIN {print d, b - a}' >> "$TMP/times"
  done
  $PY - "$TMP" "$OUT/same_as_cpu.json" "${args[*]}" <<'PY'
import json, sys
from pathlib import Path
tmp, out, args = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
times = dict(l.split() for l in (tmp / "times").read_text().splitlines())
res = {"command": "deepthink eval " + args.replace(str(tmp / "rand"), "<random Llama: 4 layers, hidden 256, 8 heads, "
                                                                 "4 kv heads>") + " --device DEVICE",
       "wall_s": {k: round(float(v), 1) for k, v in times.items()}}
for dev in ("cuda", "auto"):
    worst, items, differ, acc = 0.0, 0, 0, {}
    for f in sorted((tmp / "cpu" / "units").glob("*.predictions.jsonl")):
        a = [json.loads(l) for l in f.read_text().splitlines()]
        b = [json.loads(l) for l in (tmp / dev / "units" / f.name).read_text().splitlines()]
        assert len(a) == len(b) and a, f
        for x, y in zip(a, b):
            for k, v in x.items():
                if isinstance(v, dict):
                    items += 1
                    differ += v["pred"] != y[k]["pred"]
                    worst = max(worst, max(abs(p - q) for p, q in zip(v["logprob"], y[k]["logprob"])))
    for f in sorted((tmp / dev / "units").glob("*.json")):
        u, c = (json.loads(p.read_text()) for p in (f, tmp / "cpu" / "units" / f.name))
        acc[f.stem.split("__", 1)[1]] = {m: [c["accuracy"][m]["sum"], u["accuracy"][m]["sum"]] for m in u["accuracy"]}
        acc[f.stem.split("__", 1)[1]].update({f"{m} T": [c["methods"][m]["chosen_steps"], info["chosen_steps"]]
                            for m, info in u["methods"].items() if "chosen_steps" in info})
    res[dev] = {"device_recorded": u["device"], "scored_predictions": items, "predictions_differing": differ,
                "max_logprob_diff": worst, "accuracy_cpu_vs_device": acc}
out.write_text(json.dumps(res, indent=1))
print(json.dumps(res))
PY
}

# 3. with 2 or more GPUs: the same evaluation on 1 and on 2 processes (a larger random Llama)
two_processes() {
  random_llama "$TMP/rand2" 1024 12 16 16 >/dev/null 2>&1 || return 1
  local args=(--model "$TMP/rand2" --device cuda --task sst5 trec --seeds 0 1 --steps 10 --dev-size 32 --max-eval 200
              --quiet --methods zero_shot icl dt_fixed dt_dev)
  local t0=$(date +%s)
  $PY -m deepthink eval "${args[@]}" --out "$TMP/one" || return 1
  local t1=$(date +%s)
  $PY -m accelerate.commands.launch --multi_gpu --num_processes 2 -m deepthink eval "${args[@]}" --out "$TMP/two" \
    || return 1
  echo "{\"one_process_s\": $((t1 - t0)), \"two_processes_s\": $(($(date +%s) - t1))}" | tee "$OUT/launch.json"
}

speed "${SHAPES[0]}" --tasks sst5,trec --shots 1,8 --mem-budget 4096 || FAILED+=("speed ${SHAPES[0]}")
same_as_cpu || FAILED+=(same_as_cpu)
for shape in "${SHAPES[@]:1}"; do
  speed "$shape" --tasks sst5 --shots 8 --mem-budget 0 || FAILED+=("speed $shape")
done
if [ "$NGPU" -ge 2 ]; then two_processes || FAILED+=(two_processes); else echo "one GPU: no 2-process run"; fi
[ ${#FAILED[@]} -eq 0 ] || { echo "FAILED: ${FAILED[*]}"; exit 1; }
