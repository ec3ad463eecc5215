"""`deepthink generate`: continue a prompt after a saved context."""
from __future__ import annotations

import argparse
import sys

from .common import add_context_args, load_context

GENERATE_HELP = """Continue a prompt after the tuned context (greedy by default; sampling with --temperature).

The prompt is tokenised without special tokens and placed right after the tuned prefix, exactly
as a scored query is; the continuation alone is printed. A step-1 context gives the same tokens as
generating from the demonstrations followed by the prompt.
"""


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text after a saved context",
                       description=GENERATE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_context_args(p)
    p.add_argument("--prompt", required=True, help="text to continue (- reads it from stdin)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="at most this many new tokens (default: 64)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 = greedy (default); else sampling, between 0.001 and 100")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, between 0.001 and 1 (default: 1)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (default: unseeded)")
    p.add_argument("--no-stop-at-eos", dest="stop_at_eos", action="store_false",
                   help="keep generating after the end-of-sequence token")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..integrations.serving import sampling_problem, text_problem

    bad = sampling_problem(args.temperature, args.top_p)
    if bad:
        raise ValueError(f"--{bad[0].replace('_', '-')} {bad[1]}")
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if text_problem(prompt):        # e.g. bytes that are not UTF-8 in the argument
        raise ValueError(f"--prompt {text_problem(prompt)}")
    ctx = load_context(args)
    print(ctx.generate(prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                       seed=args.seed, stop_at_eos=args.stop_at_eos))
    return 0
