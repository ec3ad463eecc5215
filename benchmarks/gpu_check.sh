#!/usr/bin/env bash
# The GPU path, measured in one short script (issue 14): run it on a machine with CUDA GPUs, torch and
# transformers (no model weights or network needed), from the repository root; the checkout's src/ is put first on
# PYTHONPATH (anything already on PYTHONPATH, e.g. a carried peft, stays after it).
#   bash benchmarks/gpu_check.sh     -> benchmarks/results/gpu/{gpus.txt,speed.json,same_as_cpu.json,tune_cost.json,...}
# Environment:
#   PYTHON      the interpreter (default python)
#   GPU_OUT     the output folder (default benchmarks/results/gpu)
#   MODEL       whose tokenizer the random models use: a registry name or a folder with config.json and tokenizer
#               files (default smollm2-135m)
#   DEEPTHINK_DATA_DIR  a folder with sst5/ and trec/ ({train,eval}.jsonl)
#   SECTIONS    the sections run, in this order (default "speed same_as_cpu tune_cost two_processes"):
#                 speed          benchmarks/speed.py on SHAPES (default "llama2-7b qwen2.5-7b": the first gets the
#                                full grid, the others one setting)
#                 same_as_cpu    one `deepthink eval` of every kind of method on the CPU and on DEVICE
#                 tune_cost      benchmarks/tune_cost.py on TUNE_SHAPE (default llama2-7b) in TUNE_DTYPE (bfloat16):
#                                TUNE_TASK sst5, TUNE_SHOTS 8 per class, TUNE_DEV 8 dev items, TUNE_METHODS (default:
#                                tune_cost.py's), TUNE_LIMIT 25 s per method, TUNE_ARGS more of its arguments
#                                (e.g. "-o grad_kv@ckpt.checkpointing=true")
#                 two_processes  with 2 or more GPUs, 1 against 2 processes
#   DEVICE      the device under test (default cuda; DEVICE=cpu rehearses the script on a machine without a GPU)
#   SAME_DEVICES  the devices same_as_cpu compares with the CPU (default: DEVICE)
#   TIMEOUT_SPEED, TIMEOUT_SAME, TIMEOUT_TUNE, TIMEOUT_TWO  seconds each section may run (default 600, 150, 150,
#               600): a section past it is killed and reported failed; tune_cost.json keeps the methods finished
#   PEFT_DIR    a folder holding the peft package, added at the end of PYTHONPATH only when peft cannot be imported
# A section that fails is reported and the next one runs; the exit status says whether any failed.
set -uo pipefail
SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$0")/.."
export PYTHON=${PYTHON:-python} GPU_OUT=${GPU_OUT:-benchmarks/results/gpu} MODEL=${MODEL:-smollm2-135m}
export DEVICE=${DEVICE:-cuda}
case ":${PYTHONPATH:-}:" in *":$PWD/src:"*) ;; *) export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" ;; esac
PY=$PYTHON
OUT=$GPU_OUT
SHAPES=(${SHAPES:-llama2-7b qwen2.5-7b})
SECTIONS=(${SECTIONS:-speed same_as_cpu tune_cost two_processes})
mkdir -p "$OUT"
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
speed_one() {
  local shape=$1; shift
  $PY benchmarks/speed.py --model "$MODEL" --device "$DEVICE" --dtype float16 --random-init "$shape" "$@" \
    --max-items 32 --steps 15 --no-load --merge --out "$OUT"
}
speed() {
  local failed=0
  speed_one "${SHAPES[0]}" --tasks sst5,trec --shots 1,8 --mem-budget 4096 || failed=1
  for shape in "${SHAPES[@]:1}"; do
    speed_one "$shape" --tasks sst5 --shots 8 --mem-budget 0 || failed=1
  done
  return $failed
}

# 2. the same `deepthink eval` on the CPU and on each of SAME_DEVICES (a small random Llama, float32), every kind of
#    method with few steps: forward tuning, gradient tuning (grad_kv, ct_kv) and the peft baselines. Per method: the
#    predictions that differ and the largest per-choice log-probability difference. Scoring alone agrees within float32
#    summation noise; training on two devices may drift apart a little (reported, not asserted). A method that fails
#    on a device and not on the CPU, or a run that crashes, fails the section.
same_as_cpu() {
  random_llama "$TMP/rand" 256 4 8 4 >/dev/null 2>&1 || { echo "same_as_cpu: could not build the random Llama"; return 1; }
  local args=(--model "$TMP/rand" --task sst5 trec --seeds 0 --shots 1 --steps 5 --dev-size 8 --max-eval 32 --quiet
              --methods zero_shot icl icl_cc dt_fixed dt_dev grad_kv ct_kv lora lora_icl ia3 prefix prompt cpt
              -o grad_kv.steps=4 -o ct_kv.epochs=4 -o ct_kv.record_every=2 -o lora.steps=3 -o ia3.steps=3
              -o prefix.steps=3 -o prompt.steps=3 -o cpt.steps=3)
  # the runs at once (the CPU reference on the CPU cores while the GPU runs): the section lasts as long as the slowest
  local devs=(cpu ${SAME_DEVICES:-$DEVICE}) pids=() i=0 failed=0
  for dev in "${devs[@]}"; do
    ( t0=$(date +%s.%N)
      $PY -m deepthink eval "${args[@]}" --device "$dev" --out "$TMP/$i-$dev" >"$TMP/$i-$dev.log" 2>&1 \
        || { echo "same_as_cpu: deepthink eval --device $dev failed:"; tail -n 20 "$TMP/$i-$dev.log"; exit 1; }
      awk -v d="$i-$dev" -v a=$t0 -v b=$(date +%s.%N) 'BEGIN {print d, b - a}' > "$TMP/$i.time" ) &
    pids+=($!)
    i=$((i + 1))
  done
  for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
  [ $failed -eq 0 ] || return 1
  cat "$TMP"/[0-9]*.time > "$TMP/times"
  $PY - "$TMP" "$OUT/same_as_cpu.json" "${args[*]}" <<'PY'
import json, sys
from pathlib import Path
tmp, out, args = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
runs = [l.split() for l in (tmp / "times").read_text().splitlines()]
res = {"command": "deepthink eval " + args.replace(str(tmp / "rand"), "<random Llama: 4 layers, hidden 256, 8 heads, "
                                                                 "4 kv heads>") + " --device DEVICE",
       "wall_s": {}}
names = [d.split("-", 1)[1] for d, _ in runs]
for (d, t), name in zip(runs, names):
    res["wall_s"][name if names.count(name) == 1 else d] = round(float(t), 1)
CHOSEN = ("chosen_steps", "chosen_step", "chosen_epoch")
cpu_dir, bad = tmp / runs[0][0], []
for run, _ in runs[1:]:
    dev = run.split("-", 1)[1]
    per, acc = {}, {}
    for f in sorted((cpu_dir / "units").glob("*.predictions.jsonl")):
        a = [json.loads(l) for l in f.read_text().splitlines()]
        b = [json.loads(l) for l in (tmp / run / "units" / f.name).read_text().splitlines()]
        assert len(a) == len(b) and a, f
        for x, y in zip(a, b):
            for k, v in x.items():
                if isinstance(v, dict) and isinstance(y.get(k), dict):
                    m = per.setdefault(k, {"scored_predictions": 0, "predictions_differing": 0, "max_logprob_diff": 0.0})
                    m["scored_predictions"] += 1
                    m["predictions_differing"] += v["pred"] != y[k]["pred"]
                    m["max_logprob_diff"] = max(m["max_logprob_diff"],
                                                max(abs(p - q) for p, q in zip(v["logprob"], y[k]["logprob"])))
    for f in sorted((tmp / run / "units").glob("*.json")):
        u, c = (json.loads(p.read_text()) for p in (f, cpu_dir / "units" / f.name))
        unit = f.stem.split("__", 1)[1]
        acc[unit] = {m: [c["accuracy"].get(m, {}).get("sum"), u["accuracy"][m]["sum"]] for m in u["accuracy"]}
        for m, info in u["methods"].items():
            was = c["methods"].get(m, {})
            if "fails" in info:                       # a method the runner recorded as failing on this device
                per.setdefault(m, {})[f"fails ({unit})"] = info["fails"]
                if "fails" not in was:
                    bad.append(f"{m} fails on {dev} only ({unit}): {info['fails']}")
            elif "fails" in was:
                per.setdefault(m, {})[f"fails on cpu only ({unit})"] = was["fails"]
            for ck in CHOSEN:
                if ck in info:
                    acc[unit][f"{m} {ck}"] = [was.get(ck), info[ck]]
    res[dev] = {"device_recorded": u["device"], "per_method": per, "accuracy_cpu_vs_device": acc,
                "predictions_differing": sum(m.get("predictions_differing", 0) for m in per.values()),
                "max_logprob_diff": max((m.get("max_logprob_diff", 0.0) for m in per.values()), default=None)}
    print(f"{dev} against cpu (per method: predictions differing / scored, largest log-prob difference):")
    for k, m in per.items():
        fails = "; ".join(f"{w}: {r}" for w, r in m.items() if w.startswith("fails"))
        print(f"  {k:<10} " + (f"{m['predictions_differing']:>3} / {m['scored_predictions']:<4} {m['max_logprob_diff']:.2e}"
                               if "scored_predictions" in m else "") + (f"  {fails}" if fails else ""))
res["failed"] = bad
out.write_text(json.dumps(res, indent=1))
print(json.dumps(res))
if bad:
    print("FAIL: " + "; ".join(bad))
    sys.exit(1)
PY
}

# 3. each tuning method's cost on a 7B shape (random weights): seconds, updates, seconds per update, peak memory,
#    artifact bytes (benchmarks/tune_cost.py; a method past TUNE_LIMIT seconds is stopped and reported with the
#    updates it did). tune_cost.json is written after every method.
tune_cost() {
  local methods=(${TUNE_METHODS:-})
  $PY benchmarks/tune_cost.py --model "$MODEL" --random-init "${TUNE_SHAPE:-llama2-7b}" --device "$DEVICE" \
    --dtype "${TUNE_DTYPE:-bfloat16}" --task "${TUNE_TASK:-sst5}" --shots "${TUNE_SHOTS:-8}" \
    --dev-size "${TUNE_DEV:-8}" --time-limit "${TUNE_LIMIT:-25}" ${methods[@]+--methods "${methods[@]}"} --out "$OUT" \
    ${TUNE_ARGS:-}
}

# 4. with 2 or more GPUs: the same evaluation on 1 and on 2 processes (a larger random Llama)
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

# one section, run by the main script below under `timeout` (a process of its own, so that a hang is killed whole)
if [ "${1:-}" = --section ]; then
  "$2"
  exit $?
fi

echo "gpu_check $(git rev-parse --short HEAD 2>/dev/null || echo '?') $(date -u +%FT%TZ): DEVICE=$DEVICE" \
     "SECTIONS=${SECTIONS[*]} MODEL=$MODEL DEEPTHINK_DATA_DIR=${DEEPTHINK_DATA_DIR:-} PYTHONPATH=$PYTHONPATH"
if command -v nvidia-smi >/dev/null; then nvidia-smi -L | tee "$OUT/gpus.txt"; NGPU=$(nvidia-smi -L | wc -l); else
  echo "no nvidia-smi"; NGPU=0; fi
PEFT_CHECK='import peft; print("peft", peft.__version__, "from", peft.__file__)'
if ! $PY -c "$PEFT_CHECK" 2>/dev/null; then
  echo "peft: not importable: $($PY -c 'import peft' 2>&1 | tail -n 1)"
  if [ -n "${PEFT_DIR:-}" ]; then
    export PYTHONPATH="$PYTHONPATH:$PEFT_DIR"
    $PY -c "$PEFT_CHECK" 2>&1 | tail -n 1
  fi
fi
$PY -c 'import sys, torch, transformers, deepthink
print("python", sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__,
      "deepthink", deepthink.__version__, "from", deepthink.__file__, "cuda", torch.cuda.is_available())'

for section in "${SECTIONS[@]}"; do
  case $section in
    speed) limit=${TIMEOUT_SPEED:-600} ;;
    same_as_cpu) limit=${TIMEOUT_SAME:-150} ;;
    tune_cost) limit=${TIMEOUT_TUNE:-150} ;;
    two_processes)
      limit=${TIMEOUT_TWO:-600}
      if [ "$NGPU" -lt 2 ]; then echo "one GPU: no 2-process run"; continue; fi ;;
    *) echo "SECTIONS: unknown section $section (speed, same_as_cpu, tune_cost, two_processes)"; FAILED+=("$section")
       continue ;;
  esac
  echo "== $section (at most $limit s)"
  t0=$(date +%s)
  timeout -k 10 "$limit" bash "$SELF" --section "$section"
  rc=$?
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && echo "$section: stopped after $limit s"
  echo "== $section: exit $rc, $(($(date +%s) - t0)) s"
  [ $rc -eq 0 ] || FAILED+=("$section")
done
[ ${#FAILED[@]} -eq 0 ] || { echo "FAILED: ${FAILED[*]}"; exit 1; }
echo "all sections passed"
