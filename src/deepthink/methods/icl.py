"""icl: plain in-context learning, the demonstrations' own cache (step 1 of forward tuning)."""
from .base import Method, Prepared, Setup, register_method


@register_method
class ICL(Method):
    name, label = "icl", "ICL"

    def prepare(self, setup: Setup) -> Prepared:
        return Prepared(setup.icl())

    def describe(self, info: dict) -> str:
        return "ICL (step 1)"
