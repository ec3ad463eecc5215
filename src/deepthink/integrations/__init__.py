"""Adapters that put deepthink inside other tools (each needs its optional extra, e.g. `deepthink[lm-eval]`)."""
