"""The package's layering: imports run one way (no circles, even through imports inside functions),
argparse lives only in deepthink.cli, and the engine never imports evaluation, methods or the CLI."""
import ast
from pathlib import Path

import deepthink

SRC = Path(deepthink.__file__).resolve().parent


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every deepthink module `path` imports, at any depth of its code."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("deepthink")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("deepthink"):
                found.add(mod)
                found |= {f"{mod}.{a.name}" for a in node.names}
    return found


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in SRC.rglob("*.py")}
    g = {}
    for name, path in files.items():
        # importing a.b.c runs a and a.b first: count the deepest module that exists
        g[name] = {m for m in imports(path) if m in files and m != name}
    return g


def test_no_import_circles():
    g = graph()
    # a package's __init__ importing its own submodules is how packages work; anything else closing a loop is not
    def edges(n):
        return {m for m in g[n] if not (g.get(m) is not None and n.startswith(m + ".") and m + "." in n + ".")}

    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in edges(n):
            if state.get(m) == 1:
                cycle = stack[stack.index(m):] + [m]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(g):
        if n not in state:
            visit(n)


def test_argparse_only_in_the_cli_package():
    users = [module_name(p) for p in SRC.rglob("*.py")
             if any(isinstance(n, (ast.Import, ast.ImportFrom)) and
                    ("argparse" in [a.name for a in n.names] if isinstance(n, ast.Import) else n.module == "argparse")
                    for n in ast.walk(ast.parse(p.read_text())))]
    assert users and all(u.startswith("deepthink.cli") for u in users), users


def test_library_layers_do_not_import_upwards():
    g = graph()
    for n, deps in g.items():
        if not n.startswith(("deepthink.cli", "deepthink.__main__")):
            assert not any(d.startswith("deepthink.cli") for d in deps), (n, deps)
        if n.startswith(("deepthink.methods", "deepthink.tuning", "deepthink.context", "deepthink.scoring",
                         "deepthink.kv", "deepthink.models")):
            assert not any(d.startswith("deepthink.evaluation") for d in deps), (n, deps)
        if n.startswith(("deepthink.tuning", "deepthink.context", "deepthink.scoring", "deepthink.kv",
                         "deepthink.models")):
            assert not any(d.startswith("deepthink.methods") for d in deps), (n, deps)


def test_eval_applies_threads(tiny_model_dir, tmp_path, monkeypatch):
    """--threads (default: physical cores) is applied before the run starts."""
    from deepthink import models
    from deepthink.cli import main

    seen = []
    monkeypatch.setattr(models, "set_threads", lambda n=None: seen.append(n) or 1)
    monkeypatch.setattr("deepthink.evaluation.run", lambda *a, **k: None)
    assert main(["eval", "--model", str(tiny_model_dir), "--task", "sst2", "--out", str(tmp_path), "--quiet"]) == 0
    assert main(["eval", "--model", str(tiny_model_dir), "--task", "sst2", "--out", str(tmp_path), "--quiet",
                 "--threads", "1"]) == 0
    assert seen == [None, 1]
