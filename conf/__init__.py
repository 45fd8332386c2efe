"""Configuration: the Arvados cluster config format, loaded into frozen dataclasses.

``from conf import load, ConfigError`` is the usual entry. The names are resolved lazily, so
``import conf.model`` (which most modules do) does not pull in YAML parsing or the driver registry.
"""

_EXPORTS = {
    "load": "conf.loader",
    "load_text": "conf.loader",
    "ConfigError": "conf.loader",
    "default_path": "conf.loader",
    "parse_duration": "conf.units",
    "format_duration": "conf.units",
    "parse_size": "conf.units",
    "format_size": "conf.units",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'conf' has no attribute {name!r}")
