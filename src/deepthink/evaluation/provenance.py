"""Provenance recorded with every result: versions, platform, and the git commit of the code that ran."""
from __future__ import annotations

import contextlib
import functools
import json
import platform
import signal
import subprocess
import time
from pathlib import Path

from ..version import __version__


@functools.cache
def git_hash() -> str | None:
    """HEAD of the checkout deepthink runs from, with "+dirty" when tracked files other than results and
    Markdown differ from it. Taken once per process (first call: a run makes it at start), so a long run
    records the code it imported, not edits made while it ran."""
    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip()

    try:
        head = git("rev-parse", "HEAD")
        if not head:
            return None
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ":/",
                      ":(top,exclude)benchmarks/results", ":(top,exclude,glob)**/*.md")
        return head + ("+dirty" if changed else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict:
    import torch
    import transformers

    return {"deepthink": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "git": git_hash(),
            "threads": torch.get_num_threads()}


def interrupt_on_sigterm() -> None:
    """Make a kill (SIGTERM) end a benchmark's sitting as Ctrl-C does, with KeyboardInterrupt("SIGTERM"): the sitting
    is recorded and the units already written are kept. Needed beside Ctrl-C because a job started in the background
    of a non-interactive shell (nohup ... &) ignores SIGINT, and an unhandled SIGTERM ends Python without a record."""
    def _raise(*_):
        raise KeyboardInterrupt("SIGTERM")
    signal.signal(signal.SIGTERM, _raise)


def stop_time(text: str, now: float | None = None) -> float:
    """A benchmark's ``--until``: "HH:MM" (UTC; the next such time, today or tomorrow) or "YYYY-MM-DD HH:MM" (UTC,
    still to come) -> seconds since the epoch. ValueError, saying what to write, for anything else."""
    import datetime as dt

    now, utc, given = time.time() if now is None else now, dt.timezone.utc, text.strip()
    try:
        if len(given) <= 5:
            hm = dt.datetime.strptime(given, "%H:%M").time()
            day = dt.datetime.fromtimestamp(now, utc).date()
            when = dt.datetime.combine(day, hm, utc)
            if when.timestamp() <= now:
                when += dt.timedelta(days=1)
        else:
            when = dt.datetime.strptime(given, "%Y-%m-%d %H:%M").replace(tzinfo=utc)
    except ValueError:
        raise ValueError(f"--until {text!r}: write a UTC time as HH:MM or 'YYYY-MM-DD HH:MM'") from None
    if when.timestamp() <= now:
        raise ValueError(f"--until {text!r} is already past (now {time.strftime('%Y-%m-%d %H:%M', time.gmtime(now))}"
                         " UTC)")
    return when.timestamp()


@contextlib.contextmanager
def interrupt_at(when: float | None):
    """Inside it, the sitting ends at ``when`` (seconds since the epoch; None: never) as a kill does (see
    interrupt_on_sigterm), with KeyboardInterrupt("--until YYYY-MM-DD HH:MM UTC reached"): a long benchmark stops
    itself before a session ends, with no watcher process beside it. Raised in the main thread at its next Python
    step (a model call under way finishes first). Leaving it cancels the timer."""
    if when is None:
        yield
        return
    label = time.strftime("%Y-%m-%d %H:%M", time.gmtime(when))

    def _raise(*_):
        raise KeyboardInterrupt(f"--until {label} UTC reached")
    before = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, max(when - time.time(), 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, before)


def stopped_by(e: BaseException) -> str:
    """What stopped a sitting, for its record: the exception's type and first line."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return type(e).__name__ + (f": {first}" if first else "")


class Sitting:
    """One run of a resumable benchmark, for its ``sittings.jsonl`` log: when it started and ended, the command,
    the units it finished, its minutes and the git of the code it ran. Start it before the units run."""

    def __init__(self, command: str):
        self.command = command
        self.start, self._t0 = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), time.perf_counter()
        git_hash()  # taken now (cached for the process): the sitting records the code it started with

    def record(self, log: Path, done: list[str], processes: int = 1, error: str | None = None, *,
               parts: list[str] = (), prompts: dict[str, int] | None = None) -> dict:
        """Append this sitting, with the units it finished (``done``), the parts of unfinished units it kept
        (``parts``), the prompts it answered and kept per unfinished unit (``prompts``) and what stopped it
        (``error``, if anything did), as one line of ``log``: a sitting that only moved a long unit on says so."""
        entry = {"start": self.start, "end": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                 "command": self.command, "units": len(done), "done": sorted(done),
                 "minutes": (time.perf_counter() - self._t0) / 60, "git": git_hash(), "processes": processes}
        if parts:
            entry["parts"] = sorted(parts)
        if prompts:
            entry["prompts"] = dict(sorted(prompts.items()))
        if error:
            entry["error"] = error
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as f:
            f.write(json.dumps(entry) + "\n")
        return entry


def sitting_lines(log: Path) -> list[str]:
    """A Markdown bullet per sitting of ``log`` (none when it does not exist yet)."""
    if not log.exists():
        return []
    out = []
    for line in log.read_text().splitlines():
        s = json.loads(line)
        parts = s.get("parts", [])
        kept = [f"{len(parts)} part(s) of unfinished units kept ({', '.join(parts)}), "] if parts else []
        kept += [f"{n} prompt(s) of {unit} answered and kept, " for unit, n in s.get("prompts", {}).items()]
        out.append(f"- {s['start']} – {s['end']}: {s['command']} — {s['units']} unit(s) finished "
                   f"({', '.join(s['done']) or 'none'}), {''.join(kept)}{s['minutes']:.1f} min, git {s['git']}"
                   + (f"; stopped by {s['error']}" if s.get("error") else ""))
    return out
