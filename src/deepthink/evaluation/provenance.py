"""Provenance recorded with every result: versions, platform, and the git commit of the code that ran."""
from __future__ import annotations

import functools
import platform
import subprocess
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
