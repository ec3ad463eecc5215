"""`deepthink tune | predict | generate`: tuned contexts as artifacts (placeholder, being written)."""


def register(sub) -> None:
    return None
