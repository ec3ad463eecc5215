#!/usr/bin/env python
"""Speed and memory of scoring with a tuned context, against vanilla ICL, reference-style scoring and no prefix.

    python benchmarks/speed.py                          # smollm2-135m; sst2, sst5, trec, obqa; 1/4/8 demos per class
    python benchmarks/speed.py --quick                  # under 5 minutes: fewer items and settings, same JSON line
    python benchmarks/speed.py --model gemma3-270m
    python benchmarks/speed.py --device cuda --random-init llama2-7b   # a 7B shape with random weights

Methods, timed on the same items, interleaved (a, b, c, d, a, b, c, d, ...), --reps times; a method faster than
--min-time is called several times back to back in each window (the count fixed from its warm-up call) and timed
per call; each ratio is taken within a repetition and the median over repetitions is reported with its spread:
  icl        vanilla ICL: the demonstrations concatenated before every query and re-encoded each time
             (otherwise scored like deepthink: each query once, LM head only where a choice token is scored)
  reference  the original code's scorer (scoring.score_naive): one right-padded forward per choice, padded to
             the longest item of the whole split, the tuned prefix expanded over the batch, full logits
  deepthink  TunedContext.score: each query encoded once after the tuned prefix, held once per batch
  floor      the same queries and choices with no prefix at all, scored the deepthink way
Memory (one setting, --mem-task at the largest --shots): peak growth of a batch for every method, measured in a
fresh process per method (peak RSS on CPU, max allocated on CUDA), and the largest batch that fits --mem-budget
for icl and deepthink (doubling, then bisection).

Results go to <out>/speed.json (one entry per model, device and shape; earlier entries are kept) and
<out>/speed.md (regenerated from all entries). The last line printed is one JSON object:
  speedup_vs_icl        deepthink / icl throughput at the largest shots (the smallest over tasks)
  speedup_vs_reference  deepthink / reference throughput on sst5 and trec (the smallest over their settings)
  floor_ratio           deepthink time / floor time at the largest shots (the largest over tasks)
  max_batch_ratio       largest batch within the budget, deepthink / icl
  second_load_s         seconds of load_model() in a fresh process once the model cache exists
A run whose entry replaces one of the same key made from the same code records how far each ratio moved
(`agreement_with_previous`, relative difference per setting): two consecutive --quick runs are the repeat check.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402

import deepthink  # noqa: E402
from deepthink import TuningConfig, data, kv, models, scoring  # noqa: E402

METHODS = ("icl", "reference", "deepthink", "floor")
# --random-init shapes: (model_type, config fields). The vocabulary grows to the tokenizer's when it is smaller.
SHAPES = {
    "llama2-7b": ("llama", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                                vocab_size=32000, rms_norm_eps=1e-5)),
    "qwen2.5-7b": ("qwen2", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                 num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                                 vocab_size=152064, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=False)),
    "tiny-llama": ("llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=8192, vocab_size=1000)),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --- model and data ----------------------------------------------------------------------------------------------

def random_config(spec: str, vocab: int):
    """A transformers config from a SHAPES name or a config.json path (must name its model_type)."""
    from transformers import AutoConfig

    if spec in SHAPES:
        model_type, fields = SHAPES[spec]
        fields = dict(fields)
    elif Path(spec).is_file():
        fields = json.loads(Path(spec).read_text())
        model_type = fields.pop("model_type", None)
        if model_type is None:
            raise SystemExit(f"--random-init {spec}: the config has no model_type")
    else:
        raise SystemExit(f"--random-init {spec!r}: expected a config.json path or one of {', '.join(SHAPES)}")
    fields["vocab_size"] = max(fields.get("vocab_size", 0), vocab)
    return AutoConfig.for_model(model_type, **fields)


def load(args) -> deepthink.LM:
    dtype = DTYPES[args.dtype]
    if not args.random_init:
        return deepthink.load_model(args.model, device=args.device, dtype=dtype)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models.resolve(args.model)[1])
    config = random_config(args.random_init, len(tokenizer))
    torch.manual_seed(0)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return deepthink.wrap_model(model, tokenizer, name=f"random:{args.random_init}", source=args.random_init)


def n_demos(task: str, shots: int) -> int:
    """`shots` demonstrations per class; tasks without fixed classes get shots x (choices per item) in total."""
    plan = data.make_plan(task, seed=0, shots=1, dev_size=0, max_eval=1)
    return shots if plan.task.stratified else shots * len(plan.eval[0].continuations)


class Setting:
    """One (task, shots): demonstrations, scored items and everything tokenised once, outside the timings."""

    def __init__(self, lm, task: str, shots: int, items: int, seed: int = 0):
        self.task, self.shots = task, shots
        self.plan = data.make_plan(task, seed=seed, shots=n_demos(task, shots), dev_size=0, max_eval=items)
        self.queries = [e.query for e in self.plan.eval]
        self.choices = [list(e.continuations) for e in self.plan.eval]
        self.demo_ids = lm.tokenizer(self.plan.demonstrations).input_ids
        self.L = len(self.demo_ids)
        units, _ = scoring.prepare(lm.tokenizer, self.queries, self.choices)
        self.query_tokens = sum(len(u.context) for u in units)
        self.cont_tokens = sum(len(t) - 1 for u in units for _, t in u.choices)
        self.n_choices = len(self.choices[0])
        self.pad_to = split_max_length(lm.tokenizer, task)

    def model_tokens(self, method: str) -> int:
        """Tokens each method runs through the transformer blocks (padding of reference rows included)."""
        n = len(self.queries)
        if method == "icl":
            return n * self.L + self.query_tokens + self.cont_tokens
        if method == "reference":
            return n * self.n_choices * self.pad_to
        return self.query_tokens + self.cont_tokens


_SPLIT_MAX: dict = {}


def split_max_length(tokenizer, task: str) -> int:
    """Longest query + choice of the whole eval split, in tokens: what the reference pads every row to."""
    if task not in _SPLIT_MAX:
        plan = data.make_plan(task, seed=0, shots=0, dev_size=0)
        texts = sorted({e.query + c for e in plan.eval for c in e.continuations})
        _SPLIT_MAX[task] = max(len(ids) for ids in tokenizer(texts, add_special_tokens=False).input_ids)
    return _SPLIT_MAX[task]


def attention_bound(lm, s: Setting) -> float | None:
    """The least c/d time a method that attends to the prefix can reach, in multiply-adds: the floor's work
    (block weights once per token through the blocks, the LM head once per scored row) plus the prefix
    attention every one of those tokens adds in every layer (q.K and p.V over the L prefix positions, or over
    the window on sliding-window layers). Work both methods share beyond that is left out, so the true minimum
    is at least this. None where the config does not say what is needed."""
    try:
        model, cfg = lm.model, lm.config
        head = model.get_output_embeddings().weight
        shared = {model.get_input_embeddings().weight.data_ptr(), head.data_ptr()}
        blocks = sum(p.numel() for p in model.parameters() if p.dim() >= 2 and p.data_ptr() not in shared)
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        types = getattr(cfg, "layer_types", None) or ["sliding_attention" if getattr(cfg, "sliding_window", None)
                                                      else "full_attention"] * cfg.num_hidden_layers
    except (AttributeError, TypeError):
        return None
    window = kv.sliding_window(cfg)
    seen = [min(s.L, window) if window and "sliding" in t else s.L for t in types]
    tokens = s.query_tokens + s.cont_tokens
    floor = tokens * blocks + (len(s.queries) + s.cont_tokens) * head.numel()
    return (floor + tokens * sum(2 * heads * head_dim * n for n in seen)) / floor


# --- the four methods --------------------------------------------------------------------------------------------

def run(method: str, lm, s: Setting, ctx, batch_size: int, shared: bool | None = None) -> scoring.Scores:
    n = len(s.queries)
    if method == "deepthink":
        if shared is None:
            return ctx.score(s.queries, s.choices, batch_size=batch_size)
        units, k = scoring.prepare(lm.tokenizer, s.queries, s.choices, ctx.length, kv.max_positions(lm.config))
        return scoring.score_fast(lm.model, ctx.prefix, units, k, n, batch_size=batch_size, shared=shared)
    if method == "reference":
        units, k = scoring.prepare(lm.tokenizer, s.queries, s.choices, ctx.length, kv.max_positions(lm.config))
        return scoring.score_naive(lm.model, ctx.prefix, units, k, n, batch_size=batch_size, pad_to=s.pad_to)
    units, k = scoring.prepare(lm.tokenizer, s.queries, s.choices, 0, kv.max_positions(lm.config))
    if method == "icl":
        units = [scoring.Unit(u.item, s.demo_ids + u.context, u.choices) for u in units]
    return scoring.score_fast(lm.model, ([], []), units, k, n, batch_size=batch_size)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, passes: int = 1) -> float:
    """Seconds per call of `fn`, over `passes` calls back to back (a window long enough to average out the
    machine's short stalls; see passes_for)."""
    sync(device)
    t = time.perf_counter()
    for _ in range(passes):
        fn()
    sync(device)
    return (time.perf_counter() - t) / passes


def passes_for(seconds: float, min_time: float) -> int:
    """Calls per timed window so that one window lasts at least `min_time` (timeit's autorange, fixed once per
    method and setting from its warm-up call so that every repetition does the same work)."""
    return max(1, math.ceil(min_time / max(seconds, 1e-9)))


def tune(lm, s: Setting, steps: int):
    """(context after `steps` steps, seconds, note). Models whose windows are shorter than the demonstrations
    cannot be tuned (the tuner refuses); they are timed with the step-1 cache, which has the same size."""
    try:
        t0 = time.perf_counter()
        ctx = deepthink.tune(lm, s.plan.demonstrations, TuningConfig(steps=steps))
        sync(str(lm.device))
        return ctx, time.perf_counter() - t0, ""
    except ValueError as e:
        if "window" not in str(e) and "positions" not in str(e):
            raise
        ctx = deepthink.tune(lm, s.plan.demonstrations, TuningConfig(steps=1))
        window = kv.sliding_window(lm.config)
        why = f"L > {window - 1}, the window" if window and "window" in str(e) else "too long"
        return ctx, None, f"not tunable: {why}"


def stats(ts: list[float]) -> dict:
    return {"median": statistics.median(ts), "min": min(ts), "max": max(ts), "runs": ts}


def time_setting(lm, s: Setting, args) -> dict:
    load_before = os.getloadavg()[0]
    ctx, tune_s, note = tune(lm, s, args.steps)
    device = str(lm.device)
    # warm up every method once (thread pools, allocator), timing it to fix how many calls make one window
    out = {}
    warm = {m: timed(lambda: out.__setitem__(m, run(m, lm, s, ctx, args.batch_size)), device) for m in METHODS}
    passes = {m: passes_for(warm[m], args.min_time) for m in METHODS}
    fast, ref = out["deepthink"], out["reference"]          # checked against each other below
    times = {m: [] for m in METHODS}
    for r in range(args.reps):
        for m in METHODS:            # a, b, c, d, a, b, c, d, ...: slow drift of the machine hits all alike
            times[m].append(timed(lambda: run(m, lm, s, ctx, args.batch_size), device, passes[m]))
    diff = max(abs(a - b) for ra, rb in zip(fast.logprob, ref.logprob) for a, b in zip(ra, rb))
    res = {"task": s.task, "shots": s.shots, "demos": len(s.plan.demos), "demo_tokens": s.L, "items": len(s.queries),
           "choices": s.n_choices, "pad_to": s.pad_to, "steps": args.steps, "tune_s": tune_s, "note": note,
           "passes": passes,
           "max_abs_diff_vs_reference": diff, "context_bytes": ctx.nbytes, "methods": {}}
    for m in METHODS:
        st = stats(times[m])
        st["items_per_s"] = len(s.queries) / st["median"]
        st["model_tokens_per_s"] = s.model_tokens(m) / st["median"]
        res["methods"][m] = st
    t = {m: res["methods"][m]["median"] for m in METHODS}
    # each ratio within one repetition (its settings ran back to back), then the median over repetitions
    per_rep = {"speedup_vs_icl": [a / c for a, c in zip(times["icl"], times["deepthink"])],
               "speedup_vs_reference": [b / c for b, c in zip(times["reference"], times["deepthink"])],
               "floor_ratio": [c / d for c, d in zip(times["deepthink"], times["floor"])]}
    for name, vals in per_rep.items():
        res[name] = statistics.median(vals)
    res["ratio_spread"] = {name: [min(vals), max(vals)] for name, vals in per_rep.items()}
    res["floor_ratio_bound"] = attention_bound(lm, s)
    res["tune_fraction_of_icl_pass"] = None if tune_s is None else tune_s / t["icl"]
    saved = (t["icl"] - t["deepthink"]) / len(s.queries)            # seconds saved per item against icl
    res["break_even_items"] = None if tune_s is None or saved <= 0 else tune_s / saved
    # 1-minute load average around the setting: above this process's threads, something else ran meanwhile
    res["load_avg"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    return res


# --- memory: peak growth of one batch, in a fresh process per method --------------------------------------------

_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.mallopt(-3, 128 * 1024)   # M_MMAP_THRESHOLD fixed: big buffers are mapped and unmapped on free
        except OSError:
            _LIBC = False
    return _LIBC


def _status(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", text).group(1)) * 1024


class Peak:
    """Peak memory growth of a block: max allocated on CUDA; peak RSS on CPU (the kernel's high-water mark,
    reset before the block; a sampling thread where /proc/self/clear_refs cannot be written)."""

    def __init__(self, device: str):
        self.device = device

    def __enter__(self):
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        if _libc():
            _libc().malloc_trim(0)
        self.base = _status("VmRSS")
        self.sampler = None
        try:
            Path("/proc/self/clear_refs").write_text("5")   # reset the high-water mark to the current RSS
        except OSError:
            import threading

            self.high, self.stop = self.base, threading.Event()

            def sample():
                while not self.stop.wait(0.002):
                    self.high = max(self.high, _status("VmRSS"))

            self.sampler = threading.Thread(target=sample, daemon=True)
            self.sampler.start()
        return self

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self.base
        elif self.sampler is None:
            self.bytes = _status("VmHWM") - self.base
        else:
            self.stop.set()
            self.sampler.join()
            self.bytes = max(self.high, _status("VmRSS")) - self.base
        return False


def probe_main(spec: dict) -> dict:
    """Child process: one method, peaks at fixed batch sizes and (optionally) the largest batch within a budget."""
    args = argparse.Namespace(**spec["args"])
    torch.set_num_threads(args.threads)
    lm = load(args)
    s = Setting(lm, spec["task"], spec["shots"], 1)
    ctx = deepthink.tune(lm, s.plan.demonstrations, TuningConfig(steps=1))   # the tuned cache has this size
    method, shared = spec["method"], spec.get("shared")
    items = data.make_plan(s.task, seed=0, shots=n_demos(s.task, s.shots), dev_size=0,
                           max_eval=spec["pool"]).eval

    def peak(batch: int) -> int:
        pick = [items[i % len(items)] for i in range(batch)]         # one batch of `batch` rows
        s.queries = [e.query for e in pick]
        s.choices = [list(e.continuations) for e in pick]
        with Peak(args.device) as p:
            run(method, lm, s, ctx, batch, shared=shared)
        return p.bytes

    peak(1)                                                            # warm-up, not recorded
    out = {"method": method, "shared": shared}
    if spec.get("budget"):
        out["search"] = search(peak, spec["budget"], spec["cap"], spec["tolerance"])
    done = out.get("search", {}).get("probes", {})
    out["fixed"] = {b: done[b] if b in done else peak(b) for b in spec["fixed"]}
    out["context_bytes"] = ctx.nbytes
    out["layers"] = len(ctx.keys)
    out["demo_tokens"] = ctx.length
    return out


def search(peak, budget: int, cap: int, tolerance: float) -> dict:
    """Largest batch whose peak stays within `budget`: double until it does not fit (or `cap`), then bisect
    until the gap is within `tolerance` of the answer. Returns the batch and every probe made."""
    probes = {}

    def fits(b):
        probes[b] = peak(b)
        return probes[b] <= budget

    lo, hi = 0, None
    b = 1
    while b <= cap:
        if not fits(b):
            hi = b
            break
        lo, b = b, b * 2
    if hi is None:
        return {"max_batch": lo, "capped": True, "probes": probes}
    while hi - lo > max(1, int(lo * tolerance)):
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return {"max_batch": lo, "capped": False, "probes": probes}


def probe(args, task: str, shots: int, method: str, fixed: list[int], budget: int = 0, cap: int = 0,
          shared: bool | None = None) -> dict:
    spec = {"args": child_args(args), "task": task, "shots": shots, "method": method, "fixed": fixed,
            "budget": budget, "cap": cap, "tolerance": 0.25 if args.quick else 0.1, "shared": shared,
            "pool": max(fixed + [cap, 1])}
    proc = subprocess.run([sys.executable, __file__, "--probe", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe {method} failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["fixed"] = {int(k): v for k, v in out["fixed"].items()}
    if "search" in out:
        out["search"]["probes"] = {int(k): v for k, v in out["search"]["probes"].items()}
    return out


def child_args(args) -> dict:
    return {k: getattr(args, k) for k in ("model", "device", "dtype", "random_init", "threads")}


def memory(args, lm, task: str, shots: int) -> dict:
    budget = int(args.mem_budget * 2**20)
    B = args.mem_batch
    cap = 32 if args.quick else 1024
    res = {"task": task, "shots": shots, "batch": B, "budget_bytes": budget, "peaks": {}}
    for name, method, shared, searched in [("icl", "icl", None, True), ("deepthink", "deepthink", None, True),
                                           ("deepthink-expanded", "deepthink", False, False),
                                           ("reference", "reference", None, False), ("floor", "floor", None, False)]:
        if name == "deepthink-expanded" and not kv.supports_shared_prefix(lm.model):
            continue
        if args.quick and name in ("reference", "floor"):
            continue
        p = probe(args, task, shots, method, [B], budget if searched else 0, cap, shared)
        res["peaks"][name] = p["fixed"][B]
        if searched:
            res[f"max_batch_{name}"] = p["search"]
        res.update(context_bytes=p["context_bytes"], layers=p["layers"], demo_tokens=p["demo_tokens"])
        print(f"  memory {name:<19} batch {B}: {p['fixed'][B] / 2**20:8.1f} MiB"
              + (f"; largest batch within {args.mem_budget:g} MiB: {p['search']['max_batch']}"
                 + (" (cap)" if p["search"]["capped"] else "") if searched else ""), flush=True)
    a, c = res["max_batch_icl"]["max_batch"], res["max_batch_deepthink"]["max_batch"]
    # None when icl cannot hold one row within the budget (no ratio); a lower bound when deepthink hit the cap
    res["max_batch_ratio"] = c / a if a else None
    res["max_batch_ratio_is_lower_bound"] = bool(a and res["max_batch_deepthink"]["capped"])
    return res


def second_load(args) -> dict:
    """load_model() in a fresh process (the model cache already exists: this process loaded it)."""
    code = ("import time, sys; sys.path.insert(0, %r); import deepthink, torch\n"
            "t = time.perf_counter(); deepthink.load_model(%r, device=%r); a = time.perf_counter() - t\n"
            "t = time.perf_counter(); deepthink.load_model(%r, device=%r); b = time.perf_counter() - t\n"
            "print(a, b)") % (str(REPO / "src"), args.model, args.device, args.model, args.device)
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    first, again = map(float, proc.stdout.strip().splitlines()[-1].split())
    return {"load_model_s": first, "same_process_again_s": again, "process_wall_s": wall}


# --- report ------------------------------------------------------------------------------------------------------

def machine(device: str) -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        m = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = m.group(1).strip() if m else cpu
    info = {"cpu": cpu, "physical_cores": models.physical_cores(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "device": device}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    with contextlib.suppress(Exception):
        import transformers

        info["transformers"] = transformers.__version__
    with contextlib.suppress(Exception):
        from deepthink.evaluation.provenance import git_hash

        head = git_hash()                                   # "+dirty" when code differs from the commit
        info["git"] = head[:7] + ("+dirty" if head.endswith("+dirty") else "") if head else "?"
    return info


def summary(entry: dict) -> dict:
    rows = entry["settings"]
    top = max(r["shots"] for r in rows)
    at_top = [r for r in rows if r["shots"] == top]
    ref_rows = [r for r in rows if r["task"] in ("sst5", "trec")] or rows
    mem = entry.get("memory") or {}
    return {
        "model": entry["model"], "device": entry["machine"]["device"],
        "speedup_vs_icl": round(min(r["speedup_vs_icl"] for r in at_top), 3),
        "speedup_vs_reference": round(min(r["speedup_vs_reference"] for r in ref_rows), 3),
        "floor_ratio": round(max(r["floor_ratio"] for r in at_top), 3),
        "floor_ratio_bound": _bound_of_worst(at_top),
        "max_batch_ratio": None if not mem or mem["max_batch_ratio"] is None else round(mem["max_batch_ratio"], 3),
        "second_load_s": None if not entry.get("load") else round(entry["load"]["load_model_s"], 2),
        "shots": top,
        "floor_ratio_by_shots": {str(k): round(max(r["floor_ratio"] for r in rows if r["shots"] == k), 3)
                                 for k in sorted({r["shots"] for r in rows})},
    }


def _bound_of_worst(rows: list[dict]) -> float | None:
    """attention_bound of the setting whose c/d is the reported floor_ratio (the largest)."""
    b = max(rows, key=lambda r: r["floor_ratio"]).get("floor_ratio_bound")
    return None if b is None else round(b, 3)


RATIOS = ("speedup_vs_icl", "speedup_vs_reference", "floor_ratio")


def agreement(old: dict, new: dict) -> dict:
    """Per setting measured by both runs of the same code: |new - old| / old for every ratio ({} when the code
    differs, so that runs of different code are never taken for a repeat)."""
    if old.get("machine", {}).get("git") != new["machine"].get("git") or "dirty" in str(new["machine"].get("git")):
        return {}
    before = {(r["task"], r["shots"]): r for r in old["settings"]}
    return {f"{r['task']}@{r['shots']}": {k: round(abs(r[k] - before[(r["task"], r["shots"])][k])
                                              / before[(r["task"], r["shots"])][k], 4) for k in RATIOS}
            for r in new["settings"] if (r["task"], r["shots"]) in before}


def merge(old: dict, new: dict) -> dict:
    """`old` updated with `new`: settings keyed by (task, shots), memory and load when `new` measured them."""
    done = {(r["task"], r["shots"]) for r in new["settings"]}
    merged = dict(old, machine=new["machine"], commands=old.get("commands", []) + new["commands"],
                  wall_s=old.get("wall_s", 0) + new["wall_s"])
    merged["settings"] = sorted([r for r in old["settings"] if (r["task"], r["shots"]) not in done] + new["settings"],
                                key=setting_order)
    for k in ("memory", "load"):
        if k in new:
            merged[k] = new[k]
    return merged


def setting_order(r: dict):
    tasks = ["sst2", "sst5", "trec", "obqa", "hellaswag"]
    return (tasks.index(r["task"]) if r["task"] in tasks else len(tasks), r["task"], r["shots"])


def batch_ratio(mem: dict, explain: bool = True) -> str:
    """The largest-batch ratio as text: "none" when icl fits no row (older entries stored inf), ">= x" when
    deepthink reached the search cap; with `explain`, the reason in brackets."""
    r = mem.get("max_batch_ratio")
    if r is None or r == float("inf"):
        text, why = "none", "icl does not fit one row within the budget"
    elif mem.get("max_batch_ratio_is_lower_bound"):
        text, why = f">= {r:.2f}", "deepthink reached the search cap"
    else:
        text, why = f"{r:.2f}", ""
    return f"{text} ({why})" if explain and why else text


def mib(b) -> str:
    return "-" if b is None else f"{b / 2**20:.1f}"


def markdown(entries: dict) -> str:
    out = ["# Speed and memory (benchmarks/speed.py)", "",
           "Regenerated by `python benchmarks/speed.py`; one section per model, device and shape. The methods run "
           "interleaved (a, b, c, d, a, b, c, d, ...); a method faster than --min-time is called several times "
           "back to back in each timed window (the count fixed from its warm-up call) and timed per call; times "
           "are medians of the repetitions, with [min-max]; each "
           "ratio is computed within a repetition, and the median over repetitions is shown with [min-max]. "
           "Entries measured before this (no ratio spread) took ratios of medians with a rotating order.", ""]
    for key, e in entries.items():
        m, sm = e["machine"], summary(e)
        out += [f"## {key}", "",
                "Command" + ("s" if len(e["commands"]) > 1 else "") + ": "
                + "; ".join(f"`{c}`" for c in e["commands"]) + "  ",
                f"Machine: {m['cpu']}, {m['physical_cores']} physical cores, {m['threads']} threads, device "
                f"{m['device']}{' (' + m['gpu'] + ')' if m.get('gpu') else ''}; torch {m['torch']}, transformers "
                f"{m.get('transformers', '?')}, git {m.get('git', '?')}; {e['dtype']}; {e['reps']} repetitions; "
                f"batch size {e['batch_size']}; T = {e['steps']} tuning steps.", "",
                "| task | demos/class | demos (tokens) | items | icl items/s | reference items/s | deepthink items/s "
                "| floor items/s | c/a | c/b | c/d time | c/d bound | tuning: s (/ icl pass) | break-even items | load |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in e["settings"]:
            ms = r["methods"]

            def cell(k):
                st, n = ms[k], r["items"]
                return f"{st['items_per_s']:.2f} [{n / st['max']:.2f}-{n / st['min']:.2f}]"
            tf, be = r["tune_fraction_of_icl_pass"], r.get("break_even_items")
            tune = f"n/a ({r['note']})" if tf is None else f"{r['tune_s']:.1f} ({tf:.2f})"
            bound = "-" if r.get("floor_ratio_bound") is None else f"{r['floor_ratio_bound']:.2f}"
            spread = r.get("ratio_spread", {})

            def ratio(k):
                lo_hi = spread.get(k)
                return f"{r[k]:.2f}" + (f" [{lo_hi[0]:.2f}-{lo_hi[1]:.2f}]" if lo_hi else "")
            out.append(f"| {r['task']} | {r['shots']} | {r['demos']} ({r['demo_tokens']}) | {r['items']} | "
                       f"{cell('icl')} | {cell('reference')} | {cell('deepthink')} | {cell('floor')} | "
                       f"{ratio('speedup_vs_icl')} | {ratio('speedup_vs_reference')} | {ratio('floor_ratio')} | "
                       f"{bound} | {tune} | {'-' if be is None else f'{be:.1f}'} | "
                       f"{'/'.join(map(str, r.get('load_avg', [])))} |")
        out += ["", "c = deepthink, a = icl, b = reference, d = floor; c/a and c/b are throughput ratios (higher is "
                "better), c/d is deepthink's time over the floor's (1.0 is the floor); c/d bound: the least c/d "
                "possible for any method that attends to the prefix, from multiply-adds (attention_bound: the "
                "floor's block and head work plus every scored token's attention to the L prefix positions, the "
                "window on sliding layers). Tuning: T steps, once, and as a fraction of one icl pass over the "
                "scored items; break-even: items after which tuning plus deepthink scoring costs less than icl; "
                "load: the machine's 1-minute load average before/after "
                "the setting (above the thread count, other work shared the cores). Model tokens/s (tokens run "
                "through the blocks, padding included): " + "; ".join(
                    f"{r['task']}@{r['shots']}: " + ", ".join(f"{k} {r['methods'][k]['model_tokens_per_s']:.0f}"
                                                             for k in METHODS) for r in e["settings"]) + ".", ""]
        agree = e.get("agreement_with_previous")
        if agree:
            worst = max(v for row in agree.values() for v in row.values())
            out += ["Repeat check: this run replaced an earlier run of the same command and code; each ratio moved "
                    f"by at most {100 * worst:.1f} % (" + "; ".join(
                        f"{k}: " + ", ".join(f"{n.replace('speedup_vs_', 'c/').replace('icl', 'a').replace('reference', 'b').replace('floor_ratio', 'c/d')} "
                                             f"{100 * v:.1f} %" for n, v in row.items()) for k, row in agree.items())
                    + ").", ""]
        mem = e.get("memory")
        if mem:
            L, layers, cb = mem["demo_tokens"], mem["layers"], mem["context_bytes"]
            pk = mem["peaks"]
            out += [f"Memory ({mem['task']}, {mem['shots']} demonstrations per class, {L} demonstration tokens): "
                    f"the tuned context is {mib(cb)} MiB ({cb / layers / 2**10:.1f} KiB per layer, "
                    f"{cb / L / 2**10:.1f} KiB per demonstration token, {layers} layers).", "",
                    f"| method | peak growth, batch of {mem['batch']} (MiB) | largest batch within "
                    f"{mib(mem['budget_bytes'])} MiB |", "|---|---|---|"]
            for k, v in pk.items():
                mb = mem.get(f"max_batch_{k}")
                mbs = "" if mb is None else f"{mb['max_batch']}{' (cap)' if mb['capped'] else ''}"
                out.append(f"| {k} | {mib(v)} | {mbs} |")
            if "deepthink-expanded" in pk:
                out += ["", f"Holding the prefix once instead of once per row saves "
                        f"{mib(pk['deepthink-expanded'] - pk['deepthink'])} MiB per batch of {mem['batch']} "
                        f"({mib((pk['deepthink-expanded'] - pk['deepthink']) / mem['batch'])} MiB per query; the "
                        f"context itself is {mib(cb)} MiB, held once). Against vanilla ICL it saves "
                        f"{mib(pk['icl'] - pk['deepthink'])} MiB per batch."]
            out += ["", f"Largest batch, deepthink / icl: {batch_ratio(mem)}."]
        if e.get("load"):
            ld = e["load"]
            out += ["", f"Second load (model cache present): load_model() {ld['load_model_s']:.2f} s in a fresh process "
                    f"(transformers' first-use imports included), {ld.get('same_process_again_s', float('nan')):.2f} s "
                    f"again in the same process; the whole process with interpreter start and imports "
                    f"{ld['process_wall_s']:.2f} s."]
        out += ["", "Summary: `" + json.dumps(sm) + "`", ""]
    return "\n".join(out)


README_MARK = ("<!-- speed-summary: written by benchmarks/speed.py -->", "<!-- /speed-summary -->")


def readme_table(entries: dict) -> str:
    """The README's Performance table: one row per stored entry, the targets in the header."""
    rows = ["| entry | c/a at most demos (target >= 3) | smaller c/b of sst5, trec (>= 2) | c/d time (<= 1.2) "
            "| c/d bound from multiply-adds | max batch c/a (>= 1.5) | second load (<= 5 s) | items per task | git |",
            "|---|---|---|---|---|---|---|---|---|"]
    for key, e in entries.items():
        sm, mem = summary(e), e.get("memory")
        batch = "-" if not mem else f"{batch_ratio(mem, explain=False)} ({mem['budget_bytes'] / 2**20:g} MiB)"
        items = sorted({r["items"] for r in e["settings"]})
        load = "-" if sm["second_load_s"] is None else f"{sm['second_load_s']} s"
        bound = "-" if sm["floor_ratio_bound"] is None else f"{sm['floor_ratio_bound']:.2f}"
        rows.append(f"| {key} | {sm['speedup_vs_icl']:.2f} @ {sm['shots']}/class | {sm['speedup_vs_reference']:.2f} | "
                    f"{sm['floor_ratio']:.2f} | {bound} | {batch} | {load} | "
                    f"{'/'.join(map(str, items))} | {e['machine'].get('git', '?')} |")
    return "\n".join(rows)


def update_readme(entries: dict, path: Path = REPO / "docs" / "performance.md") -> bool:
    """Rewrite the table between README_MARK in docs/performance.md; False when the markers are not there."""
    from deepthink.evaluation.report import replace_marked

    return replace_marked(path, README_MARK, readme_table(entries))


# --- main --------------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=models.DEFAULT_MODEL,
                   help=f"registry name ({', '.join(models.REGISTRY)}), HF folder or .gguf (default %(default)s); "
                        "with --random-init only its tokenizer is used")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default %(default)s)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="default %(default)s")
    p.add_argument("--quick", action="store_true", help="reduced run (under 5 minutes here): sst5 and trec at 8 "
                                                       "demos per class, 3 items, 4 repetitions of windows of at least "
                                                       "2 s, T = 2, memory at batch 2 within 192 MiB (batch search "
                                                       "capped at 32), no reference/floor memory")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per method and setting (default 3; "
                                                          "quick 4)")
    p.add_argument("--tasks", default=None, help="comma-separated (default sst2,sst5,trec,obqa)")
    p.add_argument("--shots", default=None, help="demonstrations per class, comma-separated (default 1,4,8)")
    p.add_argument("--max-items", type=int, default=None, help="scored items per task (default 16; quick 3)")
    p.add_argument("--steps", type=int, default=None, help="T, tuning steps timed (default 10; quick 2)")
    p.add_argument("--batch-size", type=int, default=16, help="scoring batch size (default %(default)s)")
    p.add_argument("--min-time", type=float, default=None,
                   help="seconds a timed window lasts at least: a method faster than this is called several times "
                        "back to back per repetition and timed per call (default 1; quick 2)")
    p.add_argument("--mem-budget", type=float, default=None,
                   help="MiB for the largest-batch search (peak RSS growth on CPU, max allocated on CUDA; "
                        "default 512, quick 192); 0 skips all memory measurements")
    p.add_argument("--mem-batch", type=int, default=None,
                   help="batch whose peak memory every method reports (default: --batch-size; quick 2)")
    p.add_argument("--mem-task", default=None, help="task of the memory measurements (default sst5, else the first)")
    p.add_argument("--random-init", metavar="CONFIG", default=None,
                   help=f"random weights of a given shape: a config.json path (with model_type) or one of "
                        f"{', '.join(SHAPES)}; the tokenizer comes from --model")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: physical cores)")
    p.add_argument("--no-load", action="store_true", help="skip the second-load measurement")
    p.add_argument("--merge", action="store_true",
                   help="add this run to the stored entry of the same model and device (settings measured again "
                        "replace the old ones) instead of replacing the entry: a profile run in parts")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"),
                   help="folder for speed.json and speed.md (default %(default)s)")
    p.add_argument("--probe", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    q = args.quick
    args.tasks = (args.tasks or ("sst5,trec" if q else "sst2,sst5,trec,obqa")).split(",")
    args.shots = [int(x) for x in (args.shots or ("8" if q else "1,4,8")).split(",")]
    args.max_items = args.max_items or (3 if q else 16)
    args.min_time = (2.0 if q else 1.0) if args.min_time is None else args.min_time
    args.reps = args.reps or (4 if q else 3)
    args.steps = args.steps or (2 if q else 10)
    args.mem_budget = (192 if q else 512) if args.mem_budget is None else args.mem_budget
    args.mem_task = args.mem_task or ("sst5" if "sst5" in args.tasks else args.tasks[0])
    args.mem_batch = args.mem_batch or (2 if q else args.batch_size)
    if args.reps < 1 or args.batch_size < 1 or args.max_items < 1 or args.steps < 1 or min(args.shots) < 1:
        p.error("--reps, --batch-size, --max-items, --steps and --shots must be >= 1")
    for t in args.tasks:
        from deepthink.tasks import get_task

        try:
            get_task(t)
        except Exception as e:   # noqa: BLE001 - the registry's message lists the valid names
            p.error(str(e))
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.threads = models.set_threads(args.threads)
    if args.probe:
        print(json.dumps(probe_main(json.loads(args.probe))))
        return {}
    t_start = time.perf_counter()
    t = time.perf_counter()
    lm = load(args)
    print(f"{lm.name} on {args.device} ({args.dtype}, {args.threads} threads), loaded in "
          f"{time.perf_counter() - t:.1f} s; shared prefix: {kv.supports_shared_prefix(lm.model)}", flush=True)
    entry = {"model": lm.name, "commands": ["python benchmarks/speed.py " + " ".join(sys.argv[1:] if argv is None else argv)],
             "machine": machine(args.device), "dtype": args.dtype, "reps": args.reps, "batch_size": args.batch_size,
             "steps": args.steps, "settings": []}
    print(f"{'task':<6} {'shots':>5} {'L':>5} | " + " | ".join(f"{m:>9} s" for m in METHODS)
          + " |   c/a   c/b c/d time | tune/icl", flush=True)
    for task in args.tasks:
        for shots in args.shots:
            s = Setting(lm, task, shots, args.max_items)
            r = time_setting(lm, s, args)
            entry["settings"].append(r)
            ms = r["methods"]
            tf = r["tune_fraction_of_icl_pass"]
            print(f"{task:<6} {shots:>5} {s.L:>5} | " + " | ".join(
                f"{ms[m]['median']:>7.2f}±{(ms[m]['max'] - ms[m]['min']) / 2:<4.2f}" for m in METHODS)
                + f" | {r['speedup_vs_icl']:5.2f} {r['speedup_vs_reference']:5.2f} {r['floor_ratio']:8.2f} | "
                + ("n/a" if tf is None else f"{tf:.2f}"), flush=True)
    if args.mem_budget > 0:
        print(f"memory: {args.mem_task}, {max(args.shots)} demonstrations per class", flush=True)
        entry["memory"] = memory(args, lm, args.mem_task, max(args.shots))
    if not args.no_load and not args.random_init:
        entry["load"] = second_load(args)
        print(f"second load: load_model() {entry['load']['load_model_s']:.2f} s in a fresh process, "
              f"{entry['load']['same_process_again_s']:.2f} s again in the same process", flush=True)
    entry["wall_s"] = time.perf_counter() - t_start
    key = f"{lm.name} @ {args.device}" + (f" ({args.dtype})" if args.dtype != "float32" else "") + \
        (" quick" if args.quick else "")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "speed.json"
    entries = json.loads(store.read_text()) if store.exists() else {}
    if args.merge and key in entries:
        entry = merge(entries[key], entry)
    elif key in entries:
        entry["agreement_with_previous"] = agreement(entries[key], entry)
        if entry["agreement_with_previous"]:
            worst = max(v for row in entry["agreement_with_previous"].values() for v in row.values())
            print(f"against the previous run of {key} (same code): ratios moved by at most {100 * worst:.1f} %")
    entries[key] = entry
    store.write_text(json.dumps(entries, indent=1))
    (out / "speed.md").write_text(markdown(entries))
    if out.resolve() == (REPO / "benchmarks" / "results").resolve() and update_readme(entries):
        print("updated the Performance table in docs/performance.md")
    sm = summary(entry)
    print(f"wrote {store} and {out / 'speed.md'} ({entry['wall_s']:.0f} s)")
    print(json.dumps(sm))
    return sm


if __name__ == "__main__":
    main()
