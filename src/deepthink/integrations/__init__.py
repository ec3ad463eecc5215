"""Bridges from deepthink to the tools people already use: an HTTP server for tuned contexts (server.py)
and an lm-evaluation-harness model (lm_eval.py); each needs its optional extra (deepthink[serve], [lm-eval])."""
