"""`deepthink generate`: continue a prompt after a saved context."""
from __future__ import annotations

import argparse
import sys

from .common import add_context_args, load_context

GENERATE_HELP = """Continue a prompt after the tuned context (greedy by default; sampling with --temperature).

The prompt is tokenised without special tokens and placed right after the tuned prefix, exactly
as a scored query is; the continuation alone is printed. A step-1 context gives the same tokens as
generating from the demonstrations followed by the prompt. --stop S (repeatable) cuts the text before
the first occurrence of any S, as the server's "stop" does (generation also ends there).
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
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="cut the text before the first occurrence of TEXT (repeatable; \\n is a newline)")
    p.add_argument("--no-stop-at-eos", dest="stop_at_eos", action="store_false",
                   help="keep generating after the end-of-sequence token")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..integrations.serving import sampling_problem, text_problem

    bad = sampling_problem(args.temperature, args.top_p)
    if bad:
        raise ValueError(f"--{bad[0].replace('_', '-')} {bad[1]}")
    stops = [s.replace("\\n", "\n").replace("\\t", "\t") for s in args.stop]
    if any(not s for s in stops):
        raise ValueError("--stop strings must be non-empty")
    for s in stops:
        if text_problem(s):
            raise ValueError(f"--stop {text_problem(s)}")
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if text_problem(prompt):        # e.g. bytes that are not UTF-8 in the argument
        raise ValueError(f"--prompt {text_problem(prompt)}")
    ctx = load_context(args)
    decode = ctx.lm.tokenizer.decode
    ids = ctx.generate_tokens(prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_p=args.top_p, seed=args.seed, stop_at_eos=args.stop_at_eos,
                              stop=(lambda new: any(s in decode(new) for s in stops)) if stops else None)
    print(cut_at_stop(decode(ids), stops))
    return 0


def cut_at_stop(text: str, stops: list[str]) -> str:
    """`text` before the first occurrence of any stop string (the server's rule)."""
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[:min(cuts)] if cuts else text
