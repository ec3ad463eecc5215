#!/usr/bin/env python
"""Load and fault test of `deepthink serve` on this machine (localhost only, bounded in count and time).

    python benchmarks/serve_load.py                                   # 10,000 items at concurrency 8, smollm2-135m
    python benchmarks/serve_load.py --items 300 --serial-items 100    # a smoke run (a few minutes)

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
    p.add_argument("--timeout", type=float, default=3600, help="give up after this many seconds (default: 3600)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_load"),
                   help="write OUT.json and OUT.md (default: benchmarks/results/serve_load)")
    args = p.parse_args()
    for name in ("items", "concurrency", "rows_per_request", "max_batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    args.serial_items = args.items if args.serial_items is None else args.serial_items
    if args.serial_items < 1:
        p.error("--serial-items must be >= 1")
    deadline = time.monotonic() + args.timeout
    args.git = git_hash()          # the code this run starts with (the server imports it right after)
    with tempfile.TemporaryDirectory(prefix="serve_load-") as tmp:
        return run(args, Path(tmp), deadline)


def deepthink_cmd(*argv) -> list[str]:
    return [sys.executable, "-m", "deepthink", *map(str, argv)]


def run(args, tmp: Path, deadline: float) -> int:
    import httpx
    import psutil

    base = [json.loads(line) for line in DEMO_TEST.read_text().splitlines() if line.strip()]
    rows = [base[i % len(base)] for i in range(max(args.items, args.serial_items))]
    items_file = tmp / "items.jsonl"
    items_file.write_text("".join(json.dumps(r) + "\n" for r in rows[:args.items]))
    (tmp / "one.jsonl").write_text(json.dumps(rows[0]) + "\n")

    ctx = Path(args.context) if args.context else tmp / "ctx"
    if not args.context:
        log(f"tuning a context with {args.model} ...")
        check(deepthink_cmd("tune", "--model", args.model, "--task", "sentiment-demo", "--seed", 0, "--shots", 1,
                            "--method", "forward", "--steps", 10, "--out", ctx), deadline)

    log(f"offline: deepthink predict on {args.items} items ...")
    t_one = timed(deepthink_cmd("predict", "--context", ctx, "--input", tmp / "one.jsonl", "--output",
                                tmp / "one.out"), deadline)
    t_all = timed(deepthink_cmd("predict", "--context", ctx, "--input", items_file, "--output", tmp / "all.out"),
                  deadline)
    offline = [json.loads(line) for line in (tmp / "all.out").read_text().splitlines()]
    reference = {r["query"]: r for r in offline}
    offline_rate = args.items / max(t_all - t_one, 1e-9)
    log(f"  {t_all:.1f}s for {args.items} items, {t_one:.1f}s for 1 item: {offline_rate:.1f} items/s")

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(deepthink_cmd("serve", "--context", f"bench={ctx}", "--port", port, "--log-level",
                                            "warning", "--batch-wait-ms", args.batch_wait_ms, "--max-batch",
                                            args.max_batch, "--max-queries", max(256, args.rows_per_request)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_healthy(url, server, deadline)
        proc = psutil.Process(server.pid)
        result = asyncio.run(load(args, url, rows, reference, deadline, proc))
        metrics = httpx.get(url + "/metrics", timeout=10).text
        server.send_signal(signal.SIGTERM)
        code = server.wait(60)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(10)
    if code not in (0, -signal.SIGTERM):
        raise SystemExit(f"the server exited with {code} after SIGTERM:\n{server.stdout.read()[-3000:]}")
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
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(summary))
    log(markdown(summary))
    print(json.dumps({"concurrent_vs_serial": round(r["concurrent_vs_serial"], 2),
                      "concurrent_vs_offline": round(r["concurrent_vs_offline"], 2),
                      "failures": c["failures"], "rss_growth_pct": round(r["rss_growth_pct"], 2),
                      "targets_met": all(summary["targets_met"].values())}))
    return 0


async def load(args, url, rows, reference, deadline, proc) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=args.concurrency + 4, max_keepalive_connections=args.concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        for i in range(20):                                                     # warm-up
            await client.post("/v1/predict", json={"context": "bench", "rows": [rows[i % len(rows)]]})
        rss_before = proc.memory_info().rss
        log(f"server resident memory after warm-up: {rss_before / 2**20:.0f} MiB")
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
                want = reference[row["query"]]
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
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "src", "benchmarks"],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
