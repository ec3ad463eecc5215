"""zero_shot: no demonstrations; the prefix is only the tokenizer's own special tokens (e.g. BOS)."""
from .base import Method, Prepared, Setup, register_method


@register_method
class ZeroShot(Method):
    name, label = "zero_shot", "zero-shot"

    def prepare(self, setup: Setup) -> Prepared:
        return Prepared(setup.zero_shot())
