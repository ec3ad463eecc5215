"""`deepthink serve`: tuned contexts over HTTP (FastAPI + uvicorn; see docs/serve.md)."""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields

SERVE_HELP = """Serve saved contexts over HTTP: tune once, then score, predict and generate for many clients.

    deepthink serve --context sst2=ctx/sst2 --context topics=ctx/agnews --port 8000

Each --context NAME=DIR is loaded and verified at start-up for the model it records (each distinct model is
loaded once); clients name contexts, never paths. Endpoints: GET /v1/contexts, POST /v1/score, POST
/v1/predict, POST /v1/generate, GET /healthz, GET /metrics, and the OpenAI API (each context is a model named
by its NAME): GET /v1/models, POST /v1/completions, POST /v1/chat/completions; every field is documented at /docs.

Binds to 127.0.0.1 unless --host says otherwise. With a key ($DEEPTHINK_API_KEY or --api-key-file FILE keep
it out of `ps`; --api-key KEY works too) every endpoint but /healthz and /docs asks for 'Authorization: Bearer
KEY' (or 'X-API-Key: KEY'); an empty key is refused. Concurrent score and predict requests for one context are
gathered (--batch-wait-ms, --max-batch) into one shared-prefix model call. The limits below answer 413, 422,
408 or 503 (docs/serve.md lists them). SIGTERM or Ctrl-C gives the requests in flight --graceful-timeout
seconds, then exits; a second signal exits at once. Needs `pip install deepthink[serve]`.
"""


def register(sub) -> None:
    from .common import add_model_args
    from ..integrations.serving import API_KEY_ENV

    p = sub.add_parser("serve", help="serve saved contexts over HTTP (score, predict, generate, OpenAI API)",
                       description=SERVE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", action="append", required=True, metavar="NAME=DIR",
                   help="a context to serve under NAME (a folder written by `deepthink tune --out`); repeatable")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    p.add_argument("--api-key", default=None,
                   help=f"require this key from clients (visible in `ps`: prefer ${API_KEY_ENV} or --api-key-file; "
                        f"default: ${API_KEY_ENV} if set, else no key)")
    p.add_argument("--api-key-file", default=None, metavar="FILE",
                   help="read the key from this file (its first line; trailing newline ignored)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn's log level (default: info)")
    add_model_args(p, from_context=True)
    limits = p.add_argument_group("limits and batching")
    for f in _config_fields():
        limits.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=float if f.type == "float" else int,
                            default=f.default, help=f"{f.metadata['help']}; default: {f.default}")
    p.set_defaults(func=run)


def _config_fields():
    from ..integrations.serving import ServeConfig

    return fields(ServeConfig)


def run(args) -> int:
    from ..integrations import serving

    try:
        from ..integrations import server
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(f"{e.name} is not installed: `deepthink serve` needs the serve extra: "
                                  "pip install 'deepthink[serve]'") from None
    try:
        config = serving.ServeConfig(**{f.name: getattr(args, f.name) for f in _config_fields()})
    except ValueError as e:   # name the flag, not the dataclass field
        msg = str(e)
        for f in _config_fields():
            msg = msg.replace(f"ServeConfig.{f.name}", "--" + f.name.replace("_", "-"))
        raise ValueError(msg) from None
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port} is not a port number (0-65535)")
    specs = serving.parse_context_specs(args.context)
    api_key = serving.read_api_key(args.api_key, args.api_key_file, os.environ)
    if api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"deepthink serve: warning: listening on {args.host} without an API key: anyone who can reach this "
              f"port can use the model (set --api-key or ${serving.API_KEY_ENV})", file=sys.stderr)
    contexts = serving.load_contexts(specs, model=args.model, device=args.device, dtype=args.dtype)
    for name, ctx in contexts.items():
        print(f"context {name}: {specs[name]} ({ctx.length} tokens, {ctx.steps_done} steps, model {ctx.lm.name})",
              file=sys.stderr)
    server.serve(contexts, config, host=args.host, port=args.port, api_key=api_key, log_level=args.log_level)
    return 0
