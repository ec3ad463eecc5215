"""Bridges from deepthink to other software: an HTTP server for tuned contexts (server.py)."""
