"""Row hooks for the few tasks whose query is not a single field.

A hook maps a source row to template variables; they override/extend the default
`{query}` and are available to both templates.
"""

from __future__ import annotations

from typing import Callable


def copa(row: dict) -> dict[str, str]:
    """`{query}` = premise without a final ".", `{connective}` = because / therefore."""
    premise = row["premise"]
    if premise.endswith("."):  # a premise ending in ". " (train idx 209) keeps its period
        premise = premise[:-1]
    return {"query": premise, "connective": "because" if row["question"] == "cause" else "therefore"}


def winogrande(row: dict) -> dict[str, str]:
    """Split the sentence at its "_": `{query}` = the part before, `{after}` = the rest (both stripped)."""
    parts = row["sentence"].split("_")
    if len(parts) != 2:
        raise ValueError(f"sentence must contain exactly one '_': {row['sentence']!r}")
    before, after = (p.strip() for p in parts)
    return {"query": before, "after": after}


HOOKS: dict[str, Callable[[dict], dict[str, str]]] = {"copa": copa, "winogrande": winogrande}
