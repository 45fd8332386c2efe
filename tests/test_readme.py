"""README.rst's Architecture section names every module of the tree (so it stays true)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _section(title: str) -> str:
    text = (ROOT / "README.rst").read_text(encoding="utf-8")
    start = text.index(f"\n{title}\n{'-' * len(title)}\n")
    end = text.index("\n---", start + len(title) + 2 * len(title) + 4)
    return text[start:end]


def test_architecture_section_names_every_module():
    arch = _section("Architecture")
    missing = []
    for pkg in ("actors", "api", "api/arvados", "cloud", "conf"):
        for p in sorted((ROOT / pkg).glob("*.py")):
            if p.name != "__init__.py" and f"``{p.name}``" not in arch and f"/{p.name}``" not in arch:
                missing.append(f"{pkg}/{p.name}")
    for sub in sorted(p for p in (ROOT / "cloud").iterdir() if (p / "__init__.py").exists()):
        if f"``{sub.name}/``" not in arch:
            missing.append(f"cloud/{sub.name}/")
    assert missing == [], f"README Architecture does not mention {missing}"
