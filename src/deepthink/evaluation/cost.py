"""What a method costs beyond its accuracy, measured by the runner per method of a unit: its peak memory, how fast it
scores, and the size of its cache.

Peak memory on CPU is the process's resident set high-water mark (Linux VmHWM) during the method, reset at the
method's start (`echo 5 > /proc/self/clear_refs`), beside the resident set at its start (after glibc's malloc_trim
has returned freed heap pages): the peak counts the model's weights and whatever earlier methods of the unit still
hold, so `peak - start` is what the method added at its worst. torch's CPU allocator has no peak counter and
tracemalloc does not see its tensors; ru_maxrss cannot be reset. Where the reset is not possible (not Linux, or
/proc not writable) nothing is recorded and the unit says why. On CUDA the allocator's own peak is recorded beside.
"""
from __future__ import annotations

import ctypes
import re
from pathlib import Path

STATUS, CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")
HOW = ("peak_mb: the process's resident set high-water mark (VmHWM) during the method, reset at its start by "
       "writing 5 to /proc/self/clear_refs; start_mb: the resident set at its start after malloc_trim; both in MB "
       "(2^20 bytes) and both counting the model's weights and what earlier methods of the unit still hold")


def _status_kb(field: str) -> int | None:
    try:
        m = re.search(rf"^{field}:\s+(\d+) kB", STATUS.read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def _trim() -> None:
    """Give freed heap pages back to the system (glibc), so that the resident set at a method's start is what is
    held, not what was once used."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """`with PeakMemory(device) as m: ...`, then m.result(): {"start_mb", "peak_mb"[, "cuda_peak_mb"]} or None with
    m.unavailable saying why."""

    def __init__(self, device=None):
        self.cuda = str(device or "cpu").startswith("cuda")
        self.start = self.peak = self.cuda_peak = None
        self.unavailable: str | None = None

    def __enter__(self):
        _trim()
        try:
            CLEAR_REFS.write_text("5")
        except OSError as e:
            self.unavailable = f"the peak resident set cannot be reset here ({CLEAR_REFS}: {e.strerror or e})"
        self.start = _status_kb("VmRSS")
        if self.start is None and not self.unavailable:
            self.unavailable = f"{STATUS} has no VmRSS"
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        self.peak = _status_kb("VmHWM")
        if self.cuda:
            import torch

            self.cuda_peak = torch.cuda.max_memory_allocated()
        return False

    def result(self) -> dict | None:
        out = {}
        if not self.unavailable and self.peak is not None:
            out = {"start_mb": round(self.start / 1024, 1), "peak_mb": round(self.peak / 1024, 1)}
        if self.cuda_peak is not None:
            out["cuda_peak_mb"] = round(self.cuda_peak / 2 ** 20, 1)
        return out or None


def cache_bytes(scorer) -> int | None:
    """Bytes of the keys/values a scorer holds when it is a cache (a TunedContext: ICL, the tuned caches, prefix /
    prompt tuning's virtual positions); None for anything else (an adapter inside the model, a calibrated scorer)."""
    from ..context import TunedContext

    return int(scorer.nbytes) if isinstance(scorer, TunedContext) else None


def kv_bytes_per_token(lm) -> int:
    """Bytes one token adds to the model's key/value cache (every layer's keys and values at its dtype), measured by
    encoding one token: how large a demonstrations' cache of n tokens is, n times this."""
    import torch

    from .. import kv

    ids = lm.tokenizer("a", add_special_tokens=False).input_ids[:1] or [0]
    with torch.no_grad():
        keys, values = kv.encode(lm.model, torch.tensor([ids], device=lm.device))
    return int(sum(t.numel() * t.element_size() for t in (*keys, *values)))
