#!/usr/bin/env python
"""What each tuning method costs to prepare: wall seconds, updates, seconds per update, peak memory, artifact size.

    python benchmarks/tune_cost.py                                 # the tests' tiny random Llama on the CPU
    python benchmarks/tune_cost.py --methods grad_kv ct_kv --model smollm2-135m   # a real model (minutes)
    python benchmarks/tune_cost.py --model TOKENIZER_DIR --random-init llama2-7b --device cuda --dtype bfloat16 \\
        --task sst5 --shots 8 --time-limit 45                      # a 7B shape with random weights (no download)

Per method of --methods, in a fresh workspace (nothing shared with the method before it: lora_icl trains its own
run), after a warm-up of its family (gradient: grad_kv / ct_kv, peft, forward) with two dev items and one or two
updates, so that first-call costs (lazy imports, allocator, kernels) are not counted:
  seconds       the whole preparation (Method.check and Method.prepare: tuning and its dev readings), wall clock,
                with torch.cuda.synchronize on CUDA
  updates       optimizer updates done (torch's global optimizer step hook: grad_kv's T - 1, ct_kv's E, a peft
                method's steps)
  s/update      the mean interval between consecutive updates (the training alone: the time before the first
                update, the encoding of the demonstrations and peft's wrapping, and the dev readings after the
                last are not in it); with one update, the time up to it
  peak          CPU: the process's resident set high-water mark during the preparation (evaluation/cost.py's
                PeakMemory, the runner's), beside the resident set at its start; CUDA: the allocator's peak
                (max_memory_allocated after reset_peak_memory_stats) beside what was allocated at the start (the
                model's weights): growth = peak - start
  artifact      what `deepthink tune` would save: a cache method's keys/values, a peft method's adapter tensors
                (benchmarks/field.py's `artifact`)
--time-limit N stops a method at its first update or scoring pass after N seconds: "> N s (k updates done)", with
s/update from the updates done. A method that raises is reported as "fails: <reason>" and the next one runs.

Results go to <out>/tune_cost.json (one entry per model, device, dtype, task and shots per class; a run with the
same settings as the stored entry replaces its methods' rows, other settings replace the entry; the file is written
after every method, so a killed run keeps what finished) and <out>/tune_cost.md (regenerated from all entries). One line
is printed per method, and last one JSON object: {key, methods: {method: {status, seconds, updates, ...}}}.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from torch.optim.optimizer import register_optimizer_step_post_hook  # noqa: E402

import field  # noqa: E402  (the artifact reading and its byte format, as FIELD.md shows them)
import speed  # noqa: E402  (the --random-init shapes, dtypes and loader; the machine record)

DEFAULT_METHODS = ["grad_kv", "ct_kv", "lora", "lora_icl", "ia3", "prefix", "prompt", "cpt"]
GRADIENT = ("grad_kv", "ct_kv")


class OverTime(BaseException):
    """Raised from the update / progress hooks once a method is past --time-limit. A BaseException, so that no
    `except Exception` inside a method (peft's failure handling, for one) takes it for the method's own error."""


def tiny_llama():
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import tiny_lm

    return tiny_lm("llama")


def load(args):
    """The model: --random-init's shape (speed.py's loader), --model's weights, or the tests' tiny random Llama."""
    import deepthink

    if args.random_init:
        return speed.load(argparse.Namespace(model=args.model or deepthink.models.DEFAULT_MODEL, device=args.device,
                                             dtype=args.dtype, random_init=args.random_init))
    if args.model:
        return deepthink.load_model(args.model, device=args.device, dtype=speed.DTYPES[args.dtype])
    lm = tiny_llama()
    model = lm.model.to(device=args.device, dtype=speed.DTYPES[args.dtype])
    return deepthink.wrap_model(model, lm.tokenizer, name=lm.name, source="tests/conftest.py tiny_lm('llama')")


def family(name: str) -> str:
    from deepthink.methods import get_method
    from deepthink.methods.peft_baselines import PeftMethod

    if name.split("@")[0] in GRADIENT:
        return "gradient"
    return "peft" if issubclass(get_method(name), PeftMethod) else "forward"


def options(name: str, args, warm: bool = False) -> dict:
    """--steps / --epochs for the methods that have that option (for a warm-up: one or two updates)."""
    from dataclasses import fields

    from deepthink.methods import get_method

    have = {f.name for f in fields(get_method(name).Config)}
    want = {"steps": 2 if warm else args.steps, "epochs": 1 if warm else args.epochs}
    if warm and family(name) == "peft":
        want["steps"] = 1
    return {k: v for k, v in want.items() if k in have} | args.options.get(name, {})


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def free(device: str) -> None:
    gc.collect()
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()


class Clock:
    """Counts optimizer updates (torch's global step hook) and stops the block past `limit` seconds: at an update,
    or at a piece of work the workspace reports (a tuning step, a scoring pass)."""

    def __init__(self, device: str, limit: float | None):
        self.device, self.limit = device, limit
        self.updates: list[float] = []           # seconds since the start at each update

    def __enter__(self):
        sync(self.device)
        self.start = time.perf_counter()
        self.handle = register_optimizer_step_post_hook(lambda *_: self._update())
        return self

    def elapsed(self) -> float:
        sync(self.device)
        return time.perf_counter() - self.start

    def _update(self) -> None:
        self.updates.append(self.elapsed())
        self.check()

    def check(self, *_) -> None:
        if self.limit is not None and self.elapsed() > self.limit:
            raise OverTime

    def __exit__(self, *exc):
        self.seconds = self.elapsed()
        self.handle.remove()
        return False

    def per_update(self) -> float | None:
        u = self.updates
        if not u:
            return None
        return u[0] if len(u) == 1 else (u[-1] - u[0]) / (len(u) - 1)


def artifact_bytes(key: str, prepared) -> int | None:
    """benchmarks/field.py's reading of a unit, on this one method: a peft adapter's bytes, else the cache's."""
    from deepthink.evaluation.cost import cache_bytes

    size = cache_bytes(prepared.scorer)
    unit = {"methods": {key: prepared.info}, "cache_bytes": {} if size is None else {key: size}}
    return field.artifact(unit, key)


def measure(lm, plan, key: str, args) -> dict:
    """One method's preparation in a fresh workspace: its row of the table."""
    from deepthink.evaluation.cost import PeakMemory
    from deepthink.methods import Setup, make_method

    device = str(lm.device)
    row: dict = {"options": options(key, args)}
    method = make_method(key, row["options"])
    setup = Setup(lm, plan.demonstrations, plan.dev, demos=plan.demos, task=plan.task)
    free(device)
    cuda_start = torch.cuda.memory_allocated() if device.startswith("cuda") else None
    peak, clock = PeakMemory(device), Clock(device, args.time_limit)
    prepared = None
    try:
        with peak, clock:
            setup.workspace.on_progress = clock.check
            method.check(setup)
            prepared = method.prepare(setup)
        row["status"] = "ok"
    except OverTime:
        row["status"] = "over time"
    except Exception as e:   # noqa: BLE001 - any failure is the method's result; the next method runs
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        row.update(status="fails", reason=f"{type(e).__name__}: {msg}".rstrip(": ")[:300])
    setup.workspace.on_progress = None
    row.update(seconds=round(clock.seconds, 3), updates=len(clock.updates))
    if (pu := clock.per_update()) is not None:
        row["s_per_update"] = round(pu, 4)
    if prepared is not None:
        row["tuning_seconds"] = prepared.info.get("tuning_seconds")
        row["artifact_bytes"] = artifact_bytes(key, prepared)
    if cuda_start is not None:
        row["memory"] = {"how": "cuda max_memory_allocated", "start_mb": round(cuda_start / 2 ** 20, 1),
                         "peak_mb": peak.cuda_peak and round(peak.cuda_peak / 2 ** 20, 1)}
    elif (used := peak.result()) is not None:
        row["memory"] = {"how": "peak RSS (VmHWM after clear_refs)", **used}
    else:
        row["memory"] = {"how": f"unavailable: {peak.unavailable}"}
    mem = row["memory"]
    if mem.get("peak_mb") is not None:
        mem["growth_mb"] = round(mem["peak_mb"] - mem["start_mb"], 1)
    del prepared, setup
    free(device)
    return row


def warm_up(lm, plan, key: str, args) -> str | None:
    """The method's family run once with one or two updates and two dev items; its failure is only noted (the
    timed run reports it)."""
    from deepthink.methods import Setup, make_method

    name = {"forward": "icl"}.get(family(key), key)
    try:
        setup = Setup(lm, plan.demonstrations, plan.dev[:2], demos=plan.demos, task=plan.task)
        method = make_method(name, options(name, args, warm=True))
        method.check(setup)
        method.prepare(setup)
        return None
    except Exception as e:   # noqa: BLE001
        return f"{type(e).__name__}: {str(e)[:200]}"
    finally:
        free(str(lm.device))


# --- table --------------------------------------------------------------------------------------------------------

def seconds_cell(row: dict, limit) -> str:
    if row["status"] == "over time":
        return f"> {limit:g} s ({row['updates']} updates done)"
    return f"{row['seconds']:.2f}"


def line(key: str, row: dict, limit) -> str:
    if row["status"] == "fails":
        return f"{key}: fails: {row['reason']} (after {row['seconds']:.1f} s)"
    mem = row["memory"]
    pu = row.get("s_per_update")
    peak = (f"peak {mem['peak_mb']:,.0f} MB (+{mem['growth_mb']:,.0f} over {mem['start_mb']:,.0f})"
            if mem.get("peak_mb") is not None else f"memory {mem['how']}")
    done = (f"{seconds_cell(row, limit)}" if row["status"] == "over time"
            else f"{row['seconds']:.2f} s, {row['updates']} updates")
    return (f"{key}: {done}" + ("" if pu is None else f", {1000 * pu:.1f} ms/update") + f", {peak}, artifact "
            + field._bytes(row.get("artifact_bytes")))


def markdown(entries: dict) -> str:
    out = ["# Tuning cost per method", "", "Written by `benchmarks/tune_cost.py` (its docstring says what each column "
           "measures). Peak: the process's peak resident set on the CPU, the allocator's peak on CUDA; the growth over "
           "the memory held at the method's start (the model's weights) in brackets.", ""]
    for key, e in entries.items():
        out += [f"## {key}", "", f"`{e['command']}`", "",
                f"{e['task']}, {e['demos']} demonstrations ({e['demo_tokens']} tokens), {e['dev']} dev items, seed "
                f"{e['seed']}; --steps {e['steps']}, --epochs {e['epochs']}, --time-limit {e['time_limit'] or 'none'}; "
                f"{e['machine'].get('gpu') or e['machine'].get('cpu')}, torch {e['machine']['torch']}, transformers "
                f"{e['machine'].get('transformers', '?')}, peft {e['machine'].get('peft', '-')}, git "
                f"{e['machine'].get('git', '?')}", "",
                "| method | options | preparation s | updates | s/update | peak MB (growth) | artifact |",
                "|---|---|---|---|---|---|---|"]
        for k, r in e["methods"].items():
            opts = " ".join(f"{o}={v}" for o, v in r["options"].items()) or "–"
            if r["status"] == "fails":
                out.append(f"| {k} | {opts} | fails: {r['reason'].replace('|', '/')} | | | | |")
                continue
            m, pu = r["memory"], r.get("s_per_update")
            mem = f"{m['peak_mb']:,.0f} (+{m['growth_mb']:,.0f})" if m.get("peak_mb") is not None else "–"
            out.append(f"| {k} | {opts} | {seconds_cell(r, e['time_limit'])} | {r['updates']} | "
                       f"{'–' if pu is None else f'{pu:.4f}'} | {mem} | {field._bytes(r.get('artifact_bytes'))} |")
        out.append("")
    return "\n".join(out)


# --- main ---------------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, help="default: %(default)s")
    p.add_argument("--model", default=None, help="a registry name or model folder (default: the tests' tiny random "
                                                 "Llama; with --random-init only its tokenizer is used, default "
                                                 "smollm2-135m's)")
    p.add_argument("--random-init", metavar="SHAPE", default=None,
                   help=f"random weights of a given shape: a config.json path or one of {', '.join(speed.SHAPES)}")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default %(default)s)")
    p.add_argument("--dtype", default="float32", choices=list(speed.DTYPES), help="default %(default)s")
    p.add_argument("--task", default="sentiment-demo")
    p.add_argument("--shots", type=int, default=4, help="demonstrations per class (default %(default)s)")
    p.add_argument("--dev-size", type=int, default=16, help="dev items the methods read (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=15, help="grad_kv's T and the peft methods' steps (default %(default)s)")
    p.add_argument("--epochs", type=int, default=200, help="ct_kv's E (default %(default)s)")
    p.add_argument("-o", "--option", action="append", default=[], metavar="METHOD.OPTION=VALUE",
                   help="one option of one method in --methods, as `deepthink eval -o` takes it (repeatable); "
                        "NAME@VARIANT in --methods times NAME with its own options, e.g. --methods grad_kv "
                        "grad_kv@ckpt -o grad_kv@ckpt.checkpointing=true")
    p.add_argument("--time-limit", type=float, default=None, metavar="S",
                   help="stop a method at its first update or scoring pass after S seconds (default: none)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: physical cores)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"),
                   help="folder for tune_cost.json and tune_cost.md (default %(default)s)")
    args = p.parse_args(argv)
    if args.shots < 1 or args.dev_size < 0 or args.steps < 1 or args.epochs < 1:
        p.error("--shots, --steps and --epochs must be >= 1, --dev-size >= 0")
    if args.time_limit is not None and args.time_limit <= 0:
        p.error(f"--time-limit {args.time_limit:g}: must be > 0 seconds")
    from deepthink.cli.common import parse_method_option
    from deepthink.methods import get_method, make_method
    from deepthink.tasks import get_task

    args.options = {}
    try:
        get_task(args.task)
        classes = {m: get_method(m) for m in args.methods}
        for text in args.option:
            name, option, value = parse_method_option(text, classes)
            args.options.setdefault(name, {})[option] = value
        for name, opts in args.options.items():
            make_method(name, opts)
    except Exception as e:   # noqa: BLE001 - the registries' and parsers' messages say what is valid
        p.error(str(e))
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: torch sees no CUDA device here")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    from deepthink import models
    from deepthink.data import make_plan

    args.threads = models.set_threads(args.threads)
    t = time.perf_counter()
    lm = load(args)
    sync(args.device)
    loaded = time.perf_counter() - t
    plan = make_plan(args.task, args.seed, shots=args.shots, dev_size=args.dev_size)
    demo_tokens = len(lm.tokenizer(plan.demonstrations).input_ids)
    print(f"{lm.name} on {args.device} ({args.dtype}, {args.threads} threads), loaded in {loaded:.1f} s; "
          f"{args.task}: {len(plan.demos)} demonstrations, {demo_tokens} tokens, {len(plan.dev)} dev items", flush=True)
    machine = speed.machine(args.device)
    try:
        import peft

        machine["peft"] = peft.__version__
    except ImportError:
        pass
    # one entry per model, device, dtype and draw size: a run at other shots sits beside it instead of replacing it
    key = " / ".join([lm.name if args.random_init else args.model or lm.name, args.device, args.dtype,
                      f"{args.task} {args.shots} per class"])
    entry = {"model": lm.name, "device": args.device, "dtype": args.dtype, "shape": args.random_init,
             "command": "python benchmarks/tune_cost.py " + " ".join(sys.argv[1:] if argv is None else argv),
             "task": args.task, "shots": args.shots, "demos": len(plan.demos), "demo_tokens": demo_tokens,
             "dev": len(plan.dev), "seed": args.seed, "steps": args.steps, "epochs": args.epochs,
             "time_limit": args.time_limit, "machine": machine, "load_s": round(loaded, 1), "methods": {}}
    if args.device.startswith("cuda"):
        entry["resident_mb"] = round(torch.cuda.memory_allocated() / 2 ** 20, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "tune_cost.json"
    entries = json.loads(store.read_text()) if store.exists() else {}
    same = ("task", "shots", "dev", "seed", "steps", "epochs", "time_limit")
    if key in entries and all(entries[key].get(k) == entry[k] for k in same):
        entry["methods"] = dict(entries[key]["methods"])        # this run's rows replace the same methods' rows
    warmed = {}
    for m in args.methods:
        fam = family(m)
        if fam not in warmed:
            warmed[fam] = warm_up(lm, plan, m, args)
            if warmed[fam]:
                print(f"(warm-up of the {fam} family with {m} failed: {warmed[fam]})", flush=True)
        row = measure(lm, plan, m, args)
        entry["methods"][m] = row
        print(line(m, row, args.time_limit), flush=True)
        entries[key] = entry
        store.write_text(json.dumps(entries, indent=1))
        (out / "tune_cost.md").write_text(markdown(entries))
    summary = {"key": key, "methods": {m: {k: r.get(k) for k in ("status", "seconds", "updates", "s_per_update",
                                                                  "artifact_bytes", "reason")
                                           if r.get(k) is not None}
                                       | ({"peak_mb": r["memory"]["peak_mb"], "growth_mb": r["memory"]["growth_mb"]}
                                          if r["memory"].get("peak_mb") is not None else {})
                                       for m, r in entry["methods"].items() if m in args.methods}}
    print(f"wrote {store} and {out / 'tune_cost.md'}")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
