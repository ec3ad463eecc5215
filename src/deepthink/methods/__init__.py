"""Methods: every way of answering queries from demonstrations, behind one contract (see base.py)."""
from . import zero_shot, icl, deep_thinking, gradient, ctkv  # noqa: F401,I001  (registers the built-in methods, in this order)
from . import repeat, ensemble, calibration  # noqa: F401,I001  (then icl_repeat, dt_ensemble, NAME_cc variants)
from . import peft_baselines  # noqa: F401,I001  (lora, lora_icl, ia3, prefix, prompt, cpt; peft imported on use)
from .base import (DEFAULT_METHODS, METHODS, Method, MethodFailed, NoOptions, NotApplicable, Prepared, Setup,
                   Workspace, accuracies, get_method, load_entry_points, load_plugin_file, make_method,
                   register_method, split_key, variant_label)

__all__ = ["DEFAULT_METHODS", "METHODS", "Method", "MethodFailed", "NoOptions", "NotApplicable", "Prepared", "Setup",
           "Workspace",
           "accuracies", "get_method", "load_entry_points", "load_plugin_file", "make_method", "register_method",
           "split_key", "variant_label"]
