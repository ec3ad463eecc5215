#!/usr/bin/env python
"""Load and fault test of `deepthink serve` on this machine (localhost only, bounded in count and time).

    python benchmarks/serve_load.py                                   # 10,000 items at concurrency 8, smollm2-135m
    python benchmarks/serve_load.py --items 300 --serial-items 100    # a smoke run (a few minutes)
    python benchmarks/serve_load.py --abuse --items 1500              # normal clients, clean and under abuse

Items are the sentiment-demo test reviews (20, with labels) cycled to --items rows. The context is tuned once
(`deepthink tune --task sentiment-demo --shots 1 --method forward --steps 10`) unless --context DIR names one.
Phases, one after the other so that none competes with another for the cores:
  offline     `deepthink predict --context DIR --input items.jsonl` in a fresh process; its start-up (model and
              context load) is measured with a 1-item file and subtracted: items/s of the scoring itself
  server      `deepthink serve` in its own process; 20 warm-up requests; then its resident memory (psutil)
  serial      --serial-items items, one request at a time (POST /v1/predict, --rows-per-request rows each)
  concurrent  --items items from --concurrency clients (httpx, asyncio) while a fault task interleaves bad
              requests (malformed JSON, an oversized body, too many rows, an unknown context: each must get its
              4xx) and clients that hang up mid-request (after the headers, or after the whole body), one
              after every --fault-every good requests, sent by the client that sent that request
  after       resident memory again, /metrics' batch sizes, then SIGTERM (the server must exit by itself)
Every good answer is checked against the offline run: a different prediction, or a log-probability more than
1e-4 away, counts as a failure, as does any transport error or non-200 status.

Writes <out>.json (the numbers, the command, git hash, machine) and <out>.md (the table for docs/serve.md).
Targets (issue 13, on the 2-core machine with smollm2-135m): concurrent >= 3x serial, >= 0.75x offline,
zero failures, resident memory growth < 5 %. The last line printed is one JSON object with those ratios.

--abuse (issue 26) runs other phases on the same server (default limits, so a 10 s read timeout):
  clean       --items items from --concurrency clients, nothing else; its answers are the reference
  abuse       the same again while --abusers clients loop over abusive requests (a 200 KB query with 10 choices
              and a query with 5,000 choices: 413; a body that stops after 11 of 1000 bytes and headers that never
              end: 408 after the read timeout; hang-ups right after the body or the headers), --abuse-held uploads
              are kept open at all times (each reopened when the server closes it), and /healthz is timed twice
              a second
Targets: the normal clients' p99 latency under abuse <= 2x the clean run's, their answers unchanged (1e-4),
every abusive request answered as above, resident memory growth (after warm-up -> after abuse) < 5 %.
Writes <out>.json and <out>.md (default benchmarks/results/serve_abuse).

--openai (issue 30) asks the same server for --new-tokens-token greedy continuations of the --items reviews'
prompts ("Review: ...\nSentiment:"), at --concurrency, twice: POST /v1/generate (httpx), then POST
/v1/completions through the official `openai` client (AsyncOpenAI), after a warm-up of each. Both are timed by
the tokens the model produced (an end-of-sequence token counts: it cost a forward step); every completion's text
must equal /v1/generate's for the same prompt. Target: the openai client's tokens/s >= 0.8x /v1/generate's (the
compatibility layer costs little). Writes <out>.json and <out>.md (default benchmarks/results/serve_openai).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO_TEST = ROOT / "src" / "deepthink" / "demo_data" / "sentiment_test.jsonl"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=10_000, help="items in the concurrent phase (default: 10000)")
    p.add_argument("--concurrency", type=int, default=8, help="concurrent clients (default: 8)")
    p.add_argument("--serial-items", type=int, default=None,
                   help="items sent one request at a time (default: --items; fewer keeps the run short)")
    p.add_argument("--rows-per-request", type=int, default=1, help="rows in each request (default: 1)")
    p.add_argument("--model", default="smollm2-135m", help="model to tune the context with (default: smollm2-135m)")
    p.add_argument("--context", metavar="DIR", help="serve this saved context instead of tuning one")
    p.add_argument("--batch-wait-ms", type=float, default=5.0, help="the server's --batch-wait-ms (default: 5)")
    p.add_argument("--max-batch", type=int, default=64, help="the server's --max-batch (default: 64)")
    p.add_argument("--fault-every", type=int, default=50,
                   help="in the concurrent phase, one bad request or hang-up after every this many good requests "
                        "(0: none; default: 50)")
    p.add_argument("--abuse", action="store_true",
                   help="instead of the phases above: a clean concurrent run, then the same under abuse")
    p.add_argument("--abusers", type=int, default=4, help="with --abuse: clients sending abusive requests (default: 4)")
    p.add_argument("--abuse-held", type=int, default=50,
                   help="with --abuse: unfinished uploads kept open at all times (default: 50)")
    p.add_argument("--openai", action="store_true",
                   help="instead of the phases above: /v1/generate against the openai client's /v1/completions")
    p.add_argument("--new-tokens", type=int, default=8, help="with --openai: tokens per continuation (default: 8)")
    p.add_argument("--timeout", type=float, default=3600, help="give up after this many seconds (default: 3600)")
    p.add_argument("--out", default=None,
                   help="write OUT.json and OUT.md (default: benchmarks/results/serve_load, or serve_abuse with "
                        "--abuse)")
    args = p.parse_args()
    if args.abuse and args.openai:
        p.error("give --abuse or --openai, not both")
    args.out = args.out or str(ROOT / "benchmarks" / "results" / (
        "serve_abuse" if args.abuse else "serve_openai" if args.openai else "serve_load"))
    for name in ("items", "concurrency", "rows_per_request", "max_batch", "abusers", "new_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    args.serial_items = args.items if args.serial_items is None else args.serial_items
    if args.serial_items < 1:
        p.error("--serial-items must be >= 1")
    deadline = time.monotonic() + args.timeout
    args.git = git_hash()          # the code this run starts with (the server imports it right after)
    with tempfile.TemporaryDirectory(prefix="serve_load-") as tmp:
        return (run_abuse if args.abuse else run_openai if args.openai else run)(args, Path(tmp), deadline)


def deepthink_cmd(*argv) -> list[str]:
    return [sys.executable, "-m", "deepthink", *map(str, argv)]


def run(args, tmp: Path, deadline: float) -> int:
    import httpx

    base = [json.loads(line) for line in DEMO_TEST.read_text().splitlines() if line.strip()]
    rows = [base[i % len(base)] for i in range(max(args.items, args.serial_items))]
    items_file = tmp / "items.jsonl"
    items_file.write_text("".join(json.dumps(r) + "\n" for r in rows[:args.items]))
    (tmp / "one.jsonl").write_text(json.dumps(rows[0]) + "\n")

    ctx = context_dir(args, tmp, deadline)

    log(f"offline: deepthink predict on {args.items} items ...")
    t_one = timed(deepthink_cmd("predict", "--context", ctx, "--input", tmp / "one.jsonl", "--output",
                                tmp / "one.out"), deadline)
    t_all = timed(deepthink_cmd("predict", "--context", ctx, "--input", items_file, "--output", tmp / "all.out"),
                  deadline)
    offline = [json.loads(line) for line in (tmp / "all.out").read_text().splitlines()]
    reference = {r["query"]: r for r in offline}
    offline_rate = args.items / max(t_all - t_one, 1e-9)
    log(f"  {t_all:.1f}s for {args.items} items, {t_one:.1f}s for 1 item: {offline_rate:.1f} items/s")

    def work(url, proc):
        out = asyncio.run(load(args, url, rows, reference, deadline, proc))
        return out, httpx.get(url + "/metrics", timeout=10).text

    (result, metrics), code, _ = with_server(args, ctx, deadline, work, "--max-queries",
                                             max(256, args.rows_per_request))
    batches = re.search(r"^deepthink_batch_requests_count (\d+)$", metrics, re.M)
    served = re.search(r"^deepthink_batch_requests_sum (\S+)$", metrics, re.M)
    c, s = result["concurrent"], result["serial"]
    summary = {
        "items": args.items, "concurrency": args.concurrency, "rows_per_request": args.rows_per_request,
        "serial_items": args.serial_items, "model": args.model if not args.context else f"context {ctx}",
        "batch_wait_ms": args.batch_wait_ms, "max_batch": args.max_batch,
        "offline": {"items_per_s": offline_rate, "wall_s": t_all, "startup_s": t_one},
        **result,
        "mean_requests_per_model_call": (float(served[1]) / int(batches[1])) if batches and int(batches[1]) else None,
        "server_exit_code": code,
        "ratios": {"concurrent_vs_serial": c["items_per_s"] / s["items_per_s"],
                   "concurrent_vs_offline": c["items_per_s"] / offline_rate,
                   "rss_growth_pct": 100 * (result["rss_after"] / result["rss_before"] - 1)},
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "git": args.git, "cpus": os.cpu_count(), "platform": platform.platform(),
        "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    r = summary["ratios"]
    summary["targets_met"] = {"concurrent >= 3x serial": r["concurrent_vs_serial"] >= 3,
                              "concurrent >= 0.75x offline": r["concurrent_vs_offline"] >= 0.75,
                              "zero failures": c["failures"] == 0 and result["faults"]["wrong_status"] == 0,
                              "rss growth < 5 %": r["rss_growth_pct"] < 5}
    write_summary(args.out, summary, markdown(summary))
    print(json.dumps({"concurrent_vs_serial": round(r["concurrent_vs_serial"], 2),
                      "concurrent_vs_offline": round(r["concurrent_vs_offline"], 2),
                      "failures": c["failures"], "rss_growth_pct": round(r["rss_growth_pct"], 2),
                      "targets_met": all(summary["targets_met"].values())}))
    return 0


def context_dir(args, tmp: Path, deadline: float) -> Path:
    ctx = Path(args.context) if args.context else tmp / "ctx"
    if not args.context:
        log(f"tuning a context with {args.model} ...")
        check(deepthink_cmd("tune", "--model", args.model, "--task", "sentiment-demo", "--seed", 0, "--shots", 1,
                            "--method", "forward", "--steps", 10, "--out", ctx), deadline)
    return ctx


async def warm_up(client, rows, proc) -> int:
    """20 one-row requests, then the server's resident memory (the baseline its growth is measured from)."""
    for i in range(20):
        await client.post("/v1/predict", json={"context": "bench", "rows": [rows[i % len(rows)]]})
    rss = proc.memory_info().rss
    log(f"server resident memory after warm-up: {rss / 2**20:.0f} MiB")
    return rss


async def load(args, url, rows, reference, deadline, proc) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=args.concurrency + 4, max_keepalive_connections=args.concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        rss_before = await warm_up(client, rows, proc)
        log(f"serial: {args.serial_items} items one request at a time ...")
        serial = await phase(client, rows[:args.serial_items], 1, args.rows_per_request, reference, deadline)
        log(f"  {serial['items_per_s']:.1f} items/s, p50 {serial['p50_ms']:.0f} ms, failures {serial['failures']}")
        log(f"concurrent: {args.items} items from {args.concurrency} clients ...")
        fault_counts = {"sent": 0, "wrong_status": 0, "errors": []}
        faults = Faults(client, url, args.fault_every, fault_counts)
        concurrent = await phase(client, rows[:args.items], args.concurrency, args.rows_per_request, reference,
                                 deadline, faults)
        fault_counts["errors"] = fault_counts["errors"][:10]
        log(f"  {concurrent['items_per_s']:.1f} items/s, p50 {concurrent['p50_ms']:.0f} ms, p99 "
            f"{concurrent['p99_ms']:.0f} ms, failures {concurrent['failures']}; faults {fault_counts}")
        rss_after = proc.memory_info().rss
    return {"serial": serial, "concurrent": concurrent, "faults": fault_counts, "rss_before": rss_before,
            "rss_after": rss_after}


async def phase(client, rows, concurrency, per_request, reference, deadline, faults=None) -> dict:
    """Send `rows` in requests of `per_request` rows from `concurrency` clients; check every answer."""
    chunks = [rows[i:i + per_request] for i in range(0, len(rows), per_request)]
    latencies, failures, errors, worst = [], 0, [], 0.0
    next_chunk = iter(range(len(chunks)))

    async def client_loop():
        nonlocal failures, worst
        for k in next_chunk:
            if time.monotonic() > deadline:
                raise SystemExit("--timeout reached")
            t = time.perf_counter()
            try:
                r = await client.post("/v1/predict", json={"context": "bench", "rows": chunks[k]})
            except Exception as e:  # noqa: BLE001  (counted, not raised: the point is to count them)
                failures += len(chunks[k])
                errors.append(f"{type(e).__name__}: {e}")
                continue
            latencies.append(time.perf_counter() - t)
            if faults is not None:
                await faults.after(k)
            if r.status_code != 200:
                failures += len(chunks[k])
                errors.append(f"{r.status_code}: {r.text[:200]}")
                continue
            for row in r.json()["results"]:
                want = reference.setdefault(row["query"], row)      # a clean run's first answer is its reference
                gap = max(abs(a - b) for a, b in zip(row["logprob"], want["logprob"]))
                worst = max(worst, gap)
                if row["prediction"] != want["prediction"] or gap > 1e-4:
                    failures += 1
                    errors.append(f"answer differs from offline for {row['query']!r}: {row['logprob']} vs "
                                  f"{want['logprob']}")

    start = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    ms = sorted(1000 * x for x in latencies) or [float("nan")]
    return {"items": len(rows), "requests": len(chunks), "wall_s": wall, "items_per_s": len(rows) / wall,
            "p50_ms": statistics.median(ms), "p99_ms": ms[min(len(ms) - 1, int(0.99 * len(ms)))],
            "failures": failures, "max_logprob_gap": worst, "errors": errors[:10]}


class Faults:
    """Bad requests and hang-ups, one after every `every`-th good request; each must get its own status."""

    KINDS = ["malformed JSON", "oversized body", "too many rows", "unknown context", "hang-up after headers",
             "hang-up after body"]

    def __init__(self, client, url: str, every: int, counts: dict):
        self.client, self.every, self.counts = client, every, counts
        self.host, port = url.removeprefix("http://").split(":")
        self.port = int(port)

    async def after(self, k: int) -> None:
        if self.every <= 0 or (k + 1) % self.every:
            return
        name = self.KINDS[(k + 1) // self.every % len(self.KINDS)]
        try:
            if name.startswith("hang-up"):
                await self.hang_up(whole_body=name.endswith("body"))
            else:
                status, kwargs = self.request(name)
                r = await self.client.post("/v1/predict", **kwargs)
                if r.status_code != status:
                    self.counts["wrong_status"] += 1
                    self.counts["errors"].append(f"{name}: expected {status}, got {r.status_code} {r.text[:200]}")
            self.counts["sent"] += 1
        except Exception as e:  # noqa: BLE001
            self.counts["wrong_status"] += 1
            self.counts["errors"].append(f"{name}: {type(e).__name__}: {e}")

    @staticmethod
    def request(name: str):
        as_json = {"content-type": "application/json"}
        return {"malformed JSON": (400, dict(content=b'{"context": "bench", "rows": [', headers=as_json)),
                "oversized body": (413, dict(content=b'{"context": "bench", "rows": ["' + b"x" * 1_000_000 + b'"]}',
                                             headers=as_json)),
                "too many rows": (413, dict(json={"context": "bench", "rows": ["a fine film"] * 1000})),
                "unknown context": (404, dict(json={"context": "nope", "rows": ["a fine film"]}))}[name]

    async def hang_up(self, whole_body: bool) -> None:
        """Send a request (8 rows) and close the connection without reading the answer."""
        body = json.dumps({"context": "bench", "rows": ["a fine film"] * 8}).encode()
        _, writer = await asyncio.open_connection(self.host, self.port)
        writer.write(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + (body if whole_body else body[:10]))
        await writer.drain()
        writer.close()
        await writer.wait_closed()


def write_summary(out, summary: dict, table: str) -> None:
    """OUT.json (every number) and OUT.md (the table), and the table on stderr."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    out.with_suffix(".md").write_text(table)
    log(table)


def with_server(args, ctx, deadline: float, work, *extra):
    """Start `deepthink serve` on the context, run work(url, psutil process) once it is healthy, stop it with
    SIGTERM; -> (what work returned, the server's exit code, its log). An exit other than SIGTERM's stops the run."""
    import psutil

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(deepthink_cmd("serve", "--context", f"bench={ctx}", "--port", port, "--log-level",
                                            "warning", "--batch-wait-ms", args.batch_wait_ms, "--max-batch",
                                            args.max_batch, *extra),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_healthy(url, server, deadline)
        result = work(url, psutil.Process(server.pid))
        server.send_signal(signal.SIGTERM)
        code = server.wait(60)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(10)
    server_log = server.stdout.read()
    if code not in (0, -signal.SIGTERM):
        raise SystemExit(f"the server exited with {code} after SIGTERM:\n{server_log[-3000:]}")
    return result, code, server_log


# ---------------------------------------------------------------- --openai: the OpenAI API's cost

def run_openai(args, tmp: Path, deadline: float) -> int:
    base = [json.loads(line) for line in DEMO_TEST.read_text().splitlines() if line.strip()]
    prompts = [f"Review: {base[i % len(base)]['sentence']}\nSentiment:" for i in range(args.items)]
    ctx = context_dir(args, tmp, deadline)
    result, code, _ = with_server(args, ctx, deadline,
                                  lambda url, proc: asyncio.run(openai_load(args, url, prompts, deadline)),
                                  "--max-new-tokens", max(512, args.new_tokens))
    g, o = result["generate"], result["openai"]
    summary = {
        "mode": "openai", "items": args.items, "concurrency": args.concurrency, "new_tokens": args.new_tokens,
        "model": args.model if not args.context else f"context {ctx}", **result, "server_exit_code": code,
        "ratios": {"openai_vs_generate": o["tokens_per_s"] / g["tokens_per_s"]},
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "git": args.git, "cpus": os.cpu_count(), "platform": platform.platform(),
        "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    r = summary["ratios"]
    summary["targets_met"] = {"openai >= 0.8x generate": r["openai_vs_generate"] >= 0.8,
                              "zero failures": g["failures"] == 0 and o["failures"] == 0,
                              "same texts": result["text_mismatches"] == 0}
    write_summary(args.out, summary, markdown_openai(summary))
    print(json.dumps({"openai_vs_generate": round(r["openai_vs_generate"], 3),
                      "failures": g["failures"] + o["failures"], "text_mismatches": result["text_mismatches"],
                      "targets_met": all(summary["targets_met"].values())}))
    return 0


async def openai_load(args, url, prompts, deadline) -> dict:
    import httpx
    import openai

    n = args.new_tokens
    limits = httpx.Limits(max_connections=args.concurrency + 4, max_keepalive_connections=args.concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        async def generate(prompt):
            r = await client.post("/v1/generate", json={"context": "bench", "prompt": prompt, "max_new_tokens": n,
                                                        "temperature": 0})
            r.raise_for_status()
            body = r.json()
            return body["text"], body["tokens"] + (body["finish_reason"] == "eos")

        oa = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)

        async def complete(prompt):
            r = await oa.completions.create(model="bench", prompt=prompt, max_tokens=n, temperature=0)
            return r.choices[0].text, r.usage.completion_tokens

        for i in range(min(8, len(prompts))):       # warm-up: both paths, so neither pays the first call's costs
            await generate(prompts[i])
            await complete(prompts[i])
        log(f"/v1/generate: {len(prompts)} prompts x {n} tokens from {args.concurrency} clients ...")
        gen = await token_phase(generate, prompts, args.concurrency, deadline)
        log(f"  {gen['tokens_per_s']:.1f} tokens/s, failures {gen['failures']}")
        log("/v1/completions (openai client): the same ...")
        comp = await token_phase(complete, prompts, args.concurrency, deadline)
        log(f"  {comp['tokens_per_s']:.1f} tokens/s, failures {comp['failures']}")
        await oa.close()
    texts_g, texts_o = gen.pop("texts"), comp.pop("texts")
    mismatches = sum(a != b for a, b in zip(texts_g, texts_o) if a is not None and b is not None)
    return {"generate": gen, "openai": comp, "text_mismatches": mismatches}


async def token_phase(ask, prompts, concurrency, deadline) -> dict:
    """Every prompt through ask(prompt) -> (text, tokens), from `concurrency` workers; tokens/s over the wall."""
    queue = list(enumerate(prompts))[::-1]
    texts: list[str | None] = [None] * len(prompts)
    tokens, failures, errors, latencies = 0, 0, [], []

    async def worker():
        nonlocal tokens, failures
        while queue and time.monotonic() < deadline:
            i, prompt = queue.pop()
            t = time.perf_counter()
            try:
                texts[i], k = await ask(prompt)
                tokens += k
                latencies.append(time.perf_counter() - t)
            except Exception as e:      # noqa: BLE001  (counted and reported)
                failures += 1
                errors.append(f"{type(e).__name__}: {e}"[:200])
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    latencies.sort()
    return {"requests": len(prompts), "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / max(wall, 1e-9),
            "p50_ms": 1000 * latencies[len(latencies) // 2] if latencies else None, "failures": failures,
            "errors": errors[:10], "texts": texts}


def markdown_openai(s: dict) -> str:
    g, o, r = s["generate"], s["openai"], s["ratios"]
    lines = [
        f"`{s['command']}` ({s['date']}, git {s['git']}, {s['cpus']} CPUs; model {s['model']}; {s['items']} "
        f"prompts x {s['new_tokens']} tokens, greedy, concurrency {s['concurrency']})", "",
        "| | /v1/generate (httpx) | /v1/completions (openai client) | target | met |",
        "|---|---|---|---|---|",
        f"| tokens/s | {g['tokens_per_s']:.1f} | {o['tokens_per_s']:.1f} ({r['openai_vs_generate']:.2f}x) | "
        f">= 0.8x | {yes(s['targets_met']['openai >= 0.8x generate'])} |",
        f"| p50 latency | {g['p50_ms'] or 0:.0f} ms | {o['p50_ms'] or 0:.0f} ms | | |",
        f"| failures, texts that differ | {g['failures']} | {o['failures']}, {s['text_mismatches']} differ | 0 | "
        f"{yes(s['targets_met']['zero failures'] and s['targets_met']['same texts'])} |",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- --abuse: hostile clients beside normal ones

def run_abuse(args, tmp: Path, deadline: float) -> int:

    base = [json.loads(line) for line in DEMO_TEST.read_text().splitlines() if line.strip()]
    rows = [base[i % len(base)] for i in range(args.items)]
    ctx = context_dir(args, tmp, deadline)
    result, code, server_log = with_server(args, ctx, deadline,
                                           lambda url, proc: asyncio.run(abuse_load(args, url, rows, deadline, proc)))
    clean, abused, a = result["clean"], result["abuse"], result["abusive"]
    summary = {
        "mode": "abuse", "items": args.items, "concurrency": args.concurrency, "abusers": args.abusers,
        "abuse_held": args.abuse_held, "model": args.model if not args.context else f"context {ctx}",
        "batch_wait_ms": args.batch_wait_ms, "max_batch": args.max_batch, **result,
        "server_log_lines": len(server_log.splitlines()), "server_log_tail": server_log.splitlines()[-5:],
        "server_exit_code": code,
        "ratios": {"p99_abuse_vs_clean": abused["p99_ms"] / clean["p99_ms"],
                   "rss_growth_pct": 100 * (result["rss_after"] / result["rss_before"] - 1)},
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "git": args.git, "cpus": os.cpu_count(), "platform": platform.platform(),
        "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    r = summary["ratios"]
    summary["targets_met"] = {"p99 under abuse <= 2x clean": r["p99_abuse_vs_clean"] <= 2,
                              "zero failures": clean["failures"] == 0 and abused["failures"] == 0,
                              "abusive requests answered as expected": a["wrong"] == 0,
                              "rss growth < 5 %": r["rss_growth_pct"] < 5}
    write_summary(args.out, summary, markdown_abuse(summary))
    print(json.dumps({"p99_abuse_vs_clean": round(r["p99_abuse_vs_clean"], 2), "failures": abused["failures"],
                      "abusive_wrong": a["wrong"], "rss_growth_pct": round(r["rss_growth_pct"], 2),
                      "targets_met": all(summary["targets_met"].values())}))
    return 0


async def abuse_load(args, url, rows, deadline, proc) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=args.concurrency + 4, max_keepalive_connections=args.concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        rss_before = await warm_up(client, rows, proc)
        reference: dict = {}
        log(f"clean: {args.items} items from {args.concurrency} clients ...")
        clean = await phase(client, rows, args.concurrency, args.rows_per_request, reference, deadline)
        clean["healthz_max_ms"] = None
        rss_clean = proc.memory_info().rss
        log(f"  {clean['items_per_s']:.1f} items/s, p50 {clean['p50_ms']:.0f} ms, p99 {clean['p99_ms']:.0f} ms, "
            f"failures {clean['failures']}; resident memory {rss_clean / 2**20:.0f} MiB")
        log(f"abuse: the same with {args.abusers} abusive clients and {args.abuse_held} uploads held open ...")
        abuse = Abuse(url)
        async with httpx.AsyncClient(base_url=url, timeout=120) as bad_client:
            tasks = [asyncio.ensure_future(abuse.client_loop(bad_client, i)) for i in range(args.abusers)]
            tasks += [asyncio.ensure_future(abuse.hold()) for _ in range(args.abuse_held)]
            tasks.append(asyncio.ensure_future(abuse.probe_health(bad_client)))
            await asyncio.sleep(1.0)                                            # let the abuse start
            try:
                abused = await phase(client, rows, args.concurrency, args.rows_per_request, reference, deadline)
            finally:
                abuse.stop.set()
                await asyncio.gather(*tasks, return_exceptions=True)
        abused["healthz_max_ms"] = max(abuse.health_ms) if abuse.health_ms else None
        rss_after = proc.memory_info().rss
        log(f"  {abused['items_per_s']:.1f} items/s, p50 {abused['p50_ms']:.0f} ms, p99 {abused['p99_ms']:.0f} ms, "
            f"failures {abused['failures']}; abusive {abuse.summary()}")
    return {"clean": clean, "abuse": abused, "abusive": abuse.summary(), "rss_before": rss_before,
            "rss_clean": rss_clean, "rss_after": rss_after}


class Abuse:
    """Abusive clients beside the normal ones; each request's answer is checked against what the server promises."""

    EXPECT = {"long query": 413, "many choices": 413, "slow body": 408, "unfinished headers": 408,
              "hang-up after body": None, "hang-up after headers": None, "held upload": 408}
    LOOP = ["long query", "many choices", "hang-up after body", "slow body", "hang-up after headers",
            "unfinished headers"]

    def __init__(self, url: str):
        self.host, port = url.removeprefix("http://").split(":")
        self.port = int(port)
        self.stop = asyncio.Event()
        self.counts: dict[str, dict[str, int]] = {k: {} for k in self.EXPECT}
        self.wrong, self.errors, self.health_ms = 0, [], []

    def note(self, kind: str, status) -> None:
        self.counts[kind][str(status)] = self.counts[kind].get(str(status), 0) + 1
        if status != self.EXPECT[kind]:
            self.wrong += 1
            self.errors.append(f"{kind}: expected {self.EXPECT[kind]}, got {status}")

    def summary(self) -> dict:
        return {"sent": sum(sum(c.values()) for c in self.counts.values()), "wrong": self.wrong,
                "by_kind": self.counts, "errors": self.errors[:10]}

    async def client_loop(self, client, i: int) -> None:
        k = i
        while not self.stop.is_set():
            kind = self.LOOP[k % len(self.LOOP)]
            k += 1
            try:
                if kind == "long query":
                    r = await client.post("/v1/score", json={"context": "bench", "queries": ["x " * 100_000],
                                                             "choices": [f" c{j}" for j in range(10)]})
                    status = r.status_code
                elif kind == "many choices":
                    r = await client.post("/v1/score", json={"context": "bench",
                                                             "queries": ["Review: fine\nSentiment:"],
                                                             "choices": [f" choice {j}" for j in range(5000)]})
                    status = r.status_code
                else:
                    status = await self.raw(kind)
            except Exception as e:  # noqa: BLE001  (counted: the point is to count them)
                status = f"{type(e).__name__}: {e}"
            self.note(kind, status)
            await asyncio.sleep(0.25)

    async def raw(self, kind: str):
        """One abusive request on its own connection; the status the server answered (None: closed, no answer)."""
        body = json.dumps({"context": "bench", "rows": ["a fine film"] * 8}).encode()
        head = (b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body))
        data = {"slow body": head + body[:11], "unfinished headers": head[:40], "held upload": head + body[:11],
                "hang-up after body": head + body, "hang-up after headers": head}[kind]
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            writer.write(data)
            await writer.drain()
            if kind.startswith("hang-up"):
                return None
            answer = await asyncio.wait_for(reader.read(), timeout=60)          # until the server closes it
            return int(answer.split(b" ", 2)[1]) if answer else None
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass

    async def hold(self) -> None:
        while not self.stop.is_set():
            try:
                status = await self.raw("held upload")
            except Exception as e:  # noqa: BLE001
                status = f"{type(e).__name__}: {e}"
            if not self.stop.is_set():
                self.note("held upload", status)

    async def probe_health(self, client) -> None:
        while not self.stop.is_set():
            t = time.perf_counter()
            r = await client.get("/healthz")
            if r.status_code == 200:
                self.health_ms.append(1000 * (time.perf_counter() - t))
            await asyncio.sleep(0.5)


def markdown_abuse(s: dict) -> str:
    c, a, r, ab = s["clean"], s["abuse"], s["ratios"], s["abusive"]
    mb = 2 ** 20
    kinds = "; ".join(f"{k}: " + ", ".join(f"{n}x {st}" for st, n in sorted(v.items())) for k, v in
                      ab["by_kind"].items() if v)
    lines = [
        f"`{s['command']}` ({s['date']}, git {s['git']}, {s['cpus']} CPUs; model {s['model']}; server defaults "
        f"(--read-timeout 10, --max-connections 256), --batch-wait-ms {s['batch_wait_ms']:g} --max-batch "
        f"{s['max_batch']})",
        "",
        "| normal clients | items | items/s | p50 ms | p99 ms | failures | slowest /healthz ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| clean, concurrency {s['concurrency']} | {c['items']} | {c['items_per_s']:.1f} | {c['p50_ms']:.0f} | "
        f"{c['p99_ms']:.0f} | {c['failures']} | |",
        f"| under abuse ({s['abusers']} abusive clients, {s['abuse_held']} uploads held) | {a['items']} | "
        f"{a['items_per_s']:.1f} | {a['p50_ms']:.0f} | {a['p99_ms']:.0f} | {a['failures']} | "
        f"{a['healthz_max_ms'] or 0:.0f} |",
        "",
        "| check | measured | target | met |",
        "| --- | ---: | ---: | :---: |",
        f"| p99 under abuse / clean | {r['p99_abuse_vs_clean']:.2f}x | <= 2x | "
        f"{yes(s['targets_met']['p99 under abuse <= 2x clean'])} |",
        f"| failed items (answers under abuse checked against the clean run's; max log-prob gap "
        f"{a['max_logprob_gap']:.1e}) | {c['failures'] + a['failures']} | 0 | "
        f"{yes(s['targets_met']['zero failures'])} |",
        f"| abusive requests answered otherwise than promised | {ab['wrong']} of {ab['sent']} | 0 | "
        f"{yes(s['targets_met']['abusive requests answered as expected'])} |",
        f"| server resident memory, after warm-up -> after clean -> after abuse | {s['rss_before'] / mb:.0f} -> "
        f"{s['rss_clean'] / mb:.0f} -> {s['rss_after'] / mb:.0f} MiB ({r['rss_growth_pct']:+.1f} %) | < 5 % | "
        f"{yes(s['targets_met']['rss growth < 5 %'])} |",
        f"| server log lines over the whole run | {s['server_log_lines']} | | |",
        "",
        f"Abusive requests (status received; None = closed without an answer, as a hang-up expects): {kinds}.",
    ]
    return "\n".join(lines) + "\n"


def markdown(s: dict) -> str:
    c, se, r = s["concurrent"], s["serial"], s["ratios"]
    mb = 2 ** 20
    lines = [
        f"`{s['command']}` ({s['date']}, git {s['git']}, {s['cpus']} CPUs; model {s['model']}; "
        f"{s['rows_per_request']} row(s) per request; server --batch-wait-ms {s['batch_wait_ms']:g} "
        f"--max-batch {s['max_batch']})",
        "",
        "| run | items | items/s | p50 ms | p99 ms | failures |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        f"| offline `deepthink predict` (start-up {s['offline']['startup_s']:.1f} s subtracted) | {s['items']} | "
        f"{s['offline']['items_per_s']:.1f} | | | |",
        f"| server, one request at a time | {se['items']} | {se['items_per_s']:.1f} | {se['p50_ms']:.0f} | "
        f"{se['p99_ms']:.0f} | {se['failures']} |",
        f"| server, concurrency {s['concurrency']} | {c['items']} | {c['items_per_s']:.1f} | {c['p50_ms']:.0f} | "
        f"{c['p99_ms']:.0f} | {c['failures']} |",
        "",
        "| check | measured | target | met |",
        "| --- | ---: | ---: | :---: |",
        f"| concurrent / one at a time | {r['concurrent_vs_serial']:.2f}x | >= 3x | "
        f"{yes(s['targets_met']['concurrent >= 3x serial'])} |",
        f"| concurrent / offline predict | {r['concurrent_vs_offline']:.2f}x | >= 0.75x | "
        f"{yes(s['targets_met']['concurrent >= 0.75x offline'])} |",
        f"| failed items (answers checked against offline; max log-prob gap {c['max_logprob_gap']:.1e}) | "
        f"{c['failures'] + se['failures']} | 0 | {yes(s['targets_met']['zero failures'])} |",
        f"| bad requests and hang-ups interleaved, wrong answers to them | {s['faults']['sent']} sent, "
        f"{s['faults']['wrong_status']} wrong | 0 wrong | {yes(s['faults']['wrong_status'] == 0)} |",
        f"| server resident memory, after warm-up -> after the run | {s['rss_before'] / mb:.0f} -> "
        f"{s['rss_after'] / mb:.0f} MiB ({r['rss_growth_pct']:+.1f} %) | < 5 % | "
        f"{yes(s['targets_met']['rss growth < 5 %'])} |",
        f"| mean requests per model call | {s['mean_requests_per_model_call'] or 0:.1f} | | |",
    ]
    return "\n".join(lines) + "\n"


def yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, server: subprocess.Popen, deadline: float) -> None:
    import httpx

    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode}:\n{server.stdout.read()[-3000:]}")
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.5)
    raise SystemExit("--timeout reached while the server started")


def check(cmd: list[str], deadline: float) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=max(1.0, deadline - time.monotonic()))
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")


def timed(cmd: list[str], deadline: float) -> float:
    t = time.perf_counter()
    check(cmd, deadline)
    return time.perf_counter() - t


def git_hash() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "src", "benchmarks",
                                ":(exclude)benchmarks/results"],   # results written meanwhile are not code
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
