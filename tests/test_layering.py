"""The layering rule, read from the source (every import, including those inside functions).

Bottom to top: ``conf`` imports none of the other folders; ``api.arvados`` (the container API
client, dev server and store) builds on conf; ``cloud`` (driver contract, drivers, SSH) never
imports the actors; the actors use conf and cloud and reach ``api`` only from the application
modules (composition root, command line, dev mode, simulation harness); the management API uses
the actors' published vocabulary (snapshot, messages), not their internals. No import cycles.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("actors", "api", "cloud", "conf")

# The top layer: may import anything.
APPLICATION = {"actors.service", "actors.run", "actors.cli", "actors.devmode", "actors.checkconfig",
               "actors.sim", "actors.simulate.command", "actors.simulate.runner", "actors.simulate.report"}

# (module prefix, what it may import), most specific prefix first.
ALLOWED = (
    ("conf", ("conf",)),
    ("api.arvados", ("conf", "api.arvados", "api.wsgi")),
    ("cloud", ("conf", "cloud", "api.arvados")),
    ("actors", ("conf", "cloud", "actors")),
    ("api", ("conf", "api", "cloud.base", "actors.snapshot", "actors.messages", "actors.resources")),
)


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def modules(root: Path) -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for p in (root / pkg).rglob("*.py"):
            parts = list(p.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = p
    return out


def imports(root: Path) -> dict[str, set[str]]:
    """module -> the project modules it imports (``from pkg import mod`` counts as ``pkg.mod``)."""
    mods = modules(root)
    graph = {}
    for name, path in mods.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.split(".")[0] in PACKAGES)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                    and node.module.split(".")[0] in PACKAGES:
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    found.add(full if full in mods else node.module)
        graph[name] = found - {name}
    return graph


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, targets in sorted(graph.items()):
        if mod in APPLICATION:
            continue
        allowed = next((ok for prefix, ok in ALLOWED if _within(mod, prefix)), None)
        for t in sorted(targets):
            if t in APPLICATION or not any(_within(t, ok) for ok in allowed):
                bad.append(f"{mod} imports {t}")
    return bad


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_tree_keeps_the_layering():
    assert layer_violations(imports(ROOT)) == []


def test_the_tree_has_no_import_cycles():
    assert cycles(imports(ROOT)) == []


def test_every_module_is_in_a_layer():
    assert all(m in APPLICATION or any(_within(m, p) for p, _ in ALLOWED) for m in modules(ROOT))


def _copy_tree(tmp_path: Path) -> Path:
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def test_a_forbidden_import_is_caught(tmp_path):
    root = _copy_tree(tmp_path)
    with open(root / "conf" / "units.py", "a") as f:  # conf reaching up, inside a function
        f.write("\n\ndef _sneaky():\n    from cloud.ssh import executor_for\n    return executor_for\n")
    with open(root / "cloud" / "base.py", "a") as f:
        f.write("\nimport actors.worker\n")
    with open(root / "actors" / "worker.py", "a") as f:
        f.write("\nfrom api import app\n")
    assert layer_violations(imports(root)) == ["actors.worker imports api.app",
                                                "cloud.base imports actors.worker",
                                                "conf.units imports cloud.ssh"]


def test_a_cycle_is_caught(tmp_path):
    root = _copy_tree(tmp_path)
    with open(root / "cloud" / "base.py", "a") as f:
        f.write("\nfrom cloud import ssh\n")  # cloud.ssh already imports cloud.base
    assert any({"cloud.base", "cloud.ssh"} <= set(c) for c in cycles(imports(root)))
