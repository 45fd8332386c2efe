#!/usr/bin/env python3
"""Print ``name==floor`` for every requirement in setup.py (install_requires and every extra).

Used by ``make test-lowest``: installing exactly these proves the floors setup.py declares are
true. setup.py is read with ``ast``, never executed. A requirement without a ``>=`` floor is an
error: every dependency must state the lowest version it is tested with.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path


def requirements(setup_py: Path) -> list[str]:
    tree = ast.parse(setup_py.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup":
            kw = {k.arg: k.value for k in node.keywords}
            reqs = list(ast.literal_eval(kw.get("install_requires", ast.List(elts=[]))))
            for extra in ast.literal_eval(kw.get("extras_require", ast.Dict(keys=[], values=[]))).values():
                reqs += extra
            return reqs
    raise SystemExit(f"{setup_py}: no setup() call")


def floor(req: str) -> str:
    m = re.match(r"^\s*([A-Za-z0-9_.\-\[\]]+)\s*(.*)$", req)
    name, spec = m.group(1), m.group(2)
    lows = re.findall(r">=\s*([^,;\s]+)", spec)
    if len(lows) != 1:
        raise SystemExit(f"setup.py: {req!r} has no single '>=' floor")
    return f"{name}=={lows[0]}"


if __name__ == "__main__":
    setup_py = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "setup.py")
    print("\n".join(floor(r) for r in requirements(setup_py)))
