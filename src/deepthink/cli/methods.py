"""`deepthink methods`: the registered methods and update rules, with every option and its default."""
from dataclasses import MISSING, fields


def register(sub) -> None:
    p = sub.add_parser("methods", help="list the methods `deepthink eval --methods` takes, and the update rules")
    p.add_argument("--plugin", action="append", default=[], metavar="FILE.py",
                   help="also load a Python file registering methods or update rules")
    p.set_defaults(func=run)


def describe() -> str:
    from ..methods import DEFAULT_METHODS, METHODS, load_entry_points
    from ..tuning import RULES

    load_entry_points()
    options = {name: [(f.name, repr(f.default if f.default is not MISSING else None), f.metadata.get("help", ""))
                      for f in fields(cls.Config)] for name, cls in METHODS.items()}
    # one width per column over every method and rule, so that each column starts at the same place throughout
    name_w = max(len(n) for n in [*METHODS, *RULES])
    opt_w = max((len(o) for opts in options.values() for o, _, _ in opts), default=0)
    val_w = max((len(v) for opts in options.values() for _, v, _ in opts), default=0)
    lines = ["methods (default set: " + " ".join(DEFAULT_METHODS) + "):"]
    for name, cls in METHODS.items():
        doc = (cls.__doc__ or "").strip().splitlines() or [""]
        lines.append(f"  {name:<{name_w}}  {cls.label}" + (f": {doc[0]}" if cls.__doc__ else ""))
        lines += [f"      {o:<{opt_w}} = {v:<{val_w}}  {h}".rstrip() for o, v, h in options[name]]
    lines.append("update rules (TuningConfig.rule, -o METHOD.rule=NAME):")
    lines += [f"  {name:<{name_w}}  {rule.help}" for name, rule in RULES.items()]
    return "\n".join(lines)


def run(args) -> int:
    from ..methods import load_plugin_file

    for path in args.plugin:
        load_plugin_file(path)
    print(describe())
    return 0
