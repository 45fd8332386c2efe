"""Reading a driver's DriverParameters, one way for every driver (azure, ec2).

Keys are matched case-insensitively (Go's encoding/json does, and Arvados' own test config spells
``TenantId``); keys of other drivers are ignored (Arvados merges the EC2 defaults into every
config); a string value that is not a string is refused without echoing it (a ``ClientSecret``
written as a bare number is still a secret); endpoint overrides follow the config's URL rules
(:mod:`conf.urls`: https, or plain http to a loopback host only). Every error names the key.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from conf.urls import check_url, shown


class DriverParamsError(ValueError):
    """A DriverParameters value is missing or wrong; the message names the key."""


def known(params: Mapping | None, keys) -> Iterator[tuple[str, object]]:
    """``(key as spelled in keys, value)`` for each entry of ``params`` that names one of ``keys``."""
    by_lower = {k.lower(): k for k in keys}
    for raw_key, v in (params or {}).items():
        key = by_lower.get(str(raw_key).lower())
        if key is not None:
            yield key, v


def string(v, key: str) -> str:
    """A string value; None (an empty YAML value) is ``""``."""
    if v is None:
        return ""
    if not isinstance(v, str):
        # never the value: a secret written as a bare number is still a secret
        raise DriverParamsError(f"DriverParameters.{key}: expected a string, got {type(v).__name__} (put it in quotes)")
    return v


def endpoint(url: str, key: str) -> str:
    """An endpoint override (``""``: the SDK's own); the URL in a message shows no user info."""
    if not url:
        return ""
    try:
        check_url(url, schemes=("https", "http"), http_loopback_only=True)
    except ValueError as e:
        raise DriverParamsError(f"DriverParameters.{key}: {shown(url)!r} {e}") from None
    return url
