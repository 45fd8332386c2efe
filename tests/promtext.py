"""A literal reader of the Prometheus text format for tests.

prometheus_client's parser renames a counter's samples to ``<name>_total``, which would hide the
very difference the metric tests check; this reader keeps every name as written.
"""

from __future__ import annotations

import re

_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})? (\S+)$')


def _unescape(v: str) -> str:
    return re.sub(r'\\(.)', lambda m: {"n": "\n"}.get(m.group(1), m.group(1)), v)


def parse(text: str) -> tuple[dict[str, tuple[str, str]], dict[tuple[str, tuple], float]]:
    """(family name -> (type, help), (sample name, sorted label pairs) -> value)."""
    families: dict[str, list[str]] = {}
    samples: dict[tuple[str, tuple], float] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, doc = line[7:].partition(" ")
            families.setdefault(name, ["", ""])[1] = _unescape(doc)
        elif line.startswith("# TYPE "):
            name, _, typ = line[7:].partition(" ")
            families.setdefault(name, ["", ""])[0] = typ
        elif line and not line.startswith("#"):
            m = _SAMPLE.match(line)
            assert m, f"unparseable sample line {line!r}"
            labels = tuple(sorted((k, _unescape(v)) for k, v in _LABEL.findall(m.group(2) or "")))
            key = (m.group(1), labels)
            assert key not in samples, f"duplicate series {key}"
            samples[key] = float(m.group(3))
    return {k: (v[0], v[1]) for k, v in families.items()}, samples


def samples(text: str) -> dict[tuple[str, tuple], float]:
    return parse(text)[1]
