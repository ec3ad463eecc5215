"""`deepthink serve` against clients that misbehave (issue 26): slow and unfinished requests, floods of connections,
an exhausted open-file limit, shutdown with such clients connected. Each test runs a real uvicorn process on
127.0.0.1 (a free port) with low limits (1 s read timeout, 8 connections), bounds every loop and wait, and stops
its server itself."""
import json
import resource
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'deepthink[serve]'")
import httpx  # noqa: E402
import psutil  # noqa: E402

from conftest import CHOICES, QUERIES, free_port, wait_in_flight  # noqa: E402

KEY = "k3y-from-a-file"
AUTH = {"Authorization": f"Bearer {KEY}"}
PARTIAL_HEADERS = b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"   # never finished


class Server:
    """`deepthink serve` in its own process; its log goes to a file (read with .log())."""

    def __init__(self, ctx_dir, tmp_path, *flags, open_files: int | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_file = tmp_path / f"serve-{self.port}.log"

        def limit_files():          # in the child only
            if open_files is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        with open(self.log_file, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "deepthink", "serve", "--context", f"sent={ctx_dir}",
                                          "--port", str(self.port), "--log-level", "warning", *map(str, flags)],
                                         stdout=log, stderr=subprocess.STDOUT, preexec_fn=limit_files)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        assert self.proc.poll() is None, self.log()

    def log(self) -> str:
        return self.log_file.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture(scope="module")
def guarded(ctx_dir, tmp_path_factory):
    """A server with a 1 s read timeout, 8 connections at most, its key read from a file, and an open-file limit
    too low for the flood of connections that test_a_flood_of_connections sends."""
    tmp = tmp_path_factory.mktemp("guarded")
    (tmp / "key").write_text(KEY + "\n")
    server = Server(ctx_dir, tmp, "--read-timeout", 1, "--max-connections", 8, "--graceful-timeout", 1,
                    "--api-key-file", tmp / "key", open_files=256)
    yield server
    server.stop()


def connect(port: int, data: bytes = b"") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    if data:
        s.sendall(data)
    return s


def answers(sockets: list[socket.socket], seconds: float) -> list[bytes | None]:
    """What the server sent on each socket until it closed it (None: still open after `seconds`)."""
    got = {s: b"" for s in sockets}
    done: dict[socket.socket, bytes] = {}
    sel = selectors.DefaultSelector()
    for s in sockets:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    deadline = time.monotonic() + seconds
    while len(done) < len(sockets) and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=max(0.0, deadline - time.monotonic())):
            s = key.fileobj
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                chunk = b""
            if chunk:
                got[s] += chunk
            else:
                done[s] = got[s]
                sel.unregister(s)
    sel.close()
    return [done.get(s) for s in sockets]


def status_of(response: bytes | None):
    return int(response.split(b" ", 2)[1]) if response else response


def body_of(response: bytes) -> dict:
    return json.loads(response.split(b"\r\n\r\n", 1)[1])


def score_ok(url: str) -> bool:
    r = httpx.post(url + "/v1/score", json={"context": "sent", "queries": QUERIES[:1], "choices": CHOICES},
                   headers=AUTH, timeout=30)
    return r.status_code == 200 and len(r.json()["results"]) == 1


# ---------------------------------------------------------------- slow and unfinished requests

def test_slow_requests_are_answered_408_and_closed(guarded):
    t = time.monotonic()
    body_late = connect(guarded.port, PARTIAL_HEADERS + b"Authorization: Bearer " + KEY.encode() +
                        b"\r\nContent-Length: 1000\r\n\r\n" + b'{"context":')     # 11 of 1000 bytes
    headers_late = connect(guarded.port, PARTIAL_HEADERS)
    silent = connect(guarded.port)
    body, headers, nothing = answers([body_late, headers_late, silent], seconds=15)
    assert time.monotonic() - t < 15
    assert status_of(body) == 408 and body_of(body)["error"]["type"] == "request_timeout"
    assert "--read-timeout" in body_of(body)["error"]["message"]
    assert status_of(headers) == 408 and status_of(nothing) == 408
    for s in (body_late, headers_late, silent):
        s.close()
    assert score_ok(guarded.url)
    assert 'endpoint="/v1/score",status="408"} 1' in httpx.get(guarded.url + "/metrics", headers=AUTH).text


def test_a_flood_of_connections_is_refused_and_cleared(guarded):
    """300 connections that never finish their headers, against 8 allowed and 256 open files: while 8 are open
    the next is answered 503 at once, the 8 held are closed after the read timeout; the server never runs out of files, says
    so in a few log lines, and answers everyone afterwards, while the flood's sockets are still open here."""
    server = psutil.Process(guarded.proc.pid)
    files_before = server.num_fds()
    flood = []
    try:
        for _ in range(300):
            flood.append(connect(guarded.port, PARTIAL_HEADERS))
        got = answers(flood, seconds=20)
        statuses = [status_of(r) for r in got]
        assert None not in statuses, "the server left connections open"
        refused = [r for r, s in zip(got, statuses) if s == 503]
        # 8 are let in and time out (408); how many more are let in later depends on how fast 300 connect here
        assert set(statuses) == {503, 408} and statuses.count(408) >= 8
        assert body_of(refused[0])["error"]["type"] == "too_many_connections"
        assert httpx.get(guarded.url + "/healthz", timeout=10).status_code == 200 and score_ok(guarded.url)
        assert server.num_fds() <= files_before + 4
    finally:
        for s in flood:
            s.close()
    log = guarded.log()
    assert "out of system resource" not in log and "Too many open files" not in log
    assert 1 <= log.count("refused a connection") <= 3, log[-3000:]       # one line per 10 s, not 292


def test_the_key_comes_from_a_file_and_no_path_is_shown(guarded, tiny_model_dir, ctx_dir):
    assert KEY not in " ".join(map(str, guarded.proc.args))                 # not visible in `ps`
    assert httpx.get(guarded.url + "/v1/contexts").status_code == 401
    r = httpx.get(guarded.url + "/v1/contexts", headers=AUTH)
    assert r.status_code == 200 and r.json()[0]["model"] == {"name": tiny_model_dir.name}
    assert str(tiny_model_dir) not in r.text and str(ctx_dir) not in r.text


# ---------------------------------------------------------------- shutdown

def post_in_thread(url: str, path: str, body: dict) -> tuple[threading.Thread, dict]:
    """POST on a connection the server has already accepted (a /healthz first, kept alive), from a thread;
    returns once the server has begun the POST."""
    out, connected = {}, threading.Event()

    def go():
        with httpx.Client(base_url=url, timeout=60) as client:
            client.get("/healthz")
            connected.set()
            try:
                out["response"] = client.post(path, json=body)
            except httpx.TransportError as e:
                out["error"] = e
    t = threading.Thread(target=go)
    t.start()
    assert connected.wait(30)
    wait_in_flight(url, path, finished=lambda: bool(out))
    return t, out


def test_sigterm_with_an_unfinished_upload_answers_the_rest_and_exits(ctx_dir, tmp_path):
    """A client stuck mid-body does not hold the shutdown: it gets 503 at once; a complete request in flight is
    answered; the process exits (the read timeout is 30 s here, so it is not what ends the upload)."""
    server = Server(ctx_dir, tmp_path, "--read-timeout", 30, "--graceful-timeout", 30)
    try:
        stuck = connect(server.port, PARTIAL_HEADERS + b"Content-Length: 1000\r\n\r\n" + b'{"context":')
        # 512 tokens, the most the server allows: long enough to be seen in flight even on a fast machine (32 were
        # not, on CI: the answer came between two polls of /metrics and the wait ran out)
        t, out = post_in_thread(server.url, "/v1/generate", {"context": "sent", "prompt": "Review: witty",
                                                             "max_new_tokens": 512, "stop_at_eos": False})
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        [answer] = answers([stuck], seconds=10)
        assert status_of(answer) == 503 and body_of(answer)["error"]["type"] == "shutting_down"
        assert server.proc.wait(20) in (0, -signal.SIGTERM)
        assert time.monotonic() - signalled < 20
        t.join(30)
        assert out["response"].status_code == 200 and out["response"].json()["tokens"] == 512
        stuck.close()
    finally:
        server.stop()


def test_sigterm_cancels_what_outlasts_the_graceful_timeout(ctx_dir, tmp_path):
    server = Server(ctx_dir, tmp_path, "--graceful-timeout", 0.05, "--max-new-tokens", 1900)
    try:
        t, out = post_in_thread(server.url, "/v1/generate", {"context": "sent", "prompt": "Review: witty",
                                                             "max_new_tokens": 1900, "stop_at_eos": False})
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(20) in (0, -signal.SIGTERM)
        t.join(30)
        assert out["response"].status_code == 503, out["response"].text     # cut by the graceful timeout
        assert out["response"].json()["error"]["type"] == "shutting_down"
        assert "timeout graceful shutdown exceeded" in server.log()
    finally:
        server.stop()


def test_a_second_sigterm_exits_at_once(ctx_dir, tmp_path):
    server = Server(ctx_dir, tmp_path, "--graceful-timeout", 60, "--max-new-tokens", 1500)
    try:
        t, out = post_in_thread(server.url, "/v1/generate", {"context": "sent", "prompt": "Review: witty",
                                                             "max_new_tokens": 1500, "stop_at_eos": False})
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(20) == -signal.SIGTERM
        t.join(30)
        assert "a second SIGTERM: exiting now" in server.log()
    finally:
        server.stop()
