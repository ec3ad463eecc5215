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
    lines = ["methods (default set: " + " ".join(DEFAULT_METHODS) + "):"]
    for name, cls in METHODS.items():
        doc = (cls.__doc__ or "").strip().splitlines() or [""]
        lines.append(f"  {name:<12} {cls.label}" + (f": {doc[0]}" if cls.__doc__ else ""))
        for f in fields(cls.Config):
            default = f.default if f.default is not MISSING else None
            lines.append(f"      {f.name} = {default!r:<12} {f.metadata.get('help', '')}")
    lines.append("update rules (TuningConfig.rule, -o METHOD.rule=NAME):")
    lines += [f"  {name:<12} {rule.help}" for name, rule in RULES.items()]
    return "\n".join(lines)


def run(args) -> int:
    from ..methods import load_plugin_file

    for path in args.plugin:
        load_plugin_file(path)
    print(describe())
    return 0
