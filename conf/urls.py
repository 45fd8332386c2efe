"""The URLs a config holds, checked once, by one set of rules: the loader's Services URLs and the
cloud drivers' endpoint overrides (issue 10 item 15: what would stop ``run`` later is found by
``check-config`` and at startup, before any cloud call).

:func:`check_url` refuses, with a reason that names no secret: a scheme not allowed there; no host,
or a host that is neither an IP address nor a DNS name; a port that is not a number in 1-65535 (0
only for a listen address: any free port); a user name or password (the token authenticates, and
a password would be shown wherever the URL is); a query or fragment; a path where none belongs;
and, where a secret crosses the network (``http_loopback_only``), plain http to any host but a
loopback one (:func:`conf.hosts.is_loopback_host`). :func:`shown` is the URL as a message may show
it: user info, a port that is not a number, query and fragment blanked out.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import SplitResult, urlsplit

from conf.hosts import is_loopback_host

_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")
_BAD_CHARS = re.compile(r"[\x00-\x20\x7f\\]")


def shown(url: str) -> str:
    """``url`` fit for a message: ``user:password@`` becomes ``***@``, a non-numeric port ``:***``
    (and nothing after it), a query ``?...``, a fragment ``#...``.

    The user info is cut at the last ``@``, not where urlsplit ends the netloc: a secret may hold
    ``/``, ``?`` or ``#`` (AWS secret keys do), and urlsplit would leave the rest of it in the path
    or query. Over-masking a path that holds an ``@`` is the safe side."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    if "@" in rest:
        rest = "***@" + rest.rpartition("@")[2]
    user = "***@" if rest.startswith("***@") else ""
    try:
        p = urlsplit(scheme + sep + rest)
        hostport = p.netloc.removeprefix(user).rpartition("]")[2]  # after an IPv6 literal
        port = hostport.rpartition(":")[2]
        if ":" in hostport and port and not port.isdigit():
            raise ValueError("not a number")  # "https://KEY:SECRET...": the secret is no port
    except ValueError:  # that, or an unclosed "[": keep the host, nothing after it
        host = re.match(r"\[[^\]/?#]*\]|[^:/?#\[]*", rest.removeprefix(user)).group()
        return scheme + sep + user + host + ":***"
    return SplitResult(p.scheme, p.netloc, p.path, "..." if p.query else "",
                       "..." if p.fragment else "").geturl()


def valid_host(host: str) -> bool:
    """An IPv4/IPv6 address or a DNS name (letters, digits, ``-``, ``_``; labels of 1-63)."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    try:
        name = host.encode("idna").decode("ascii").lower() if not host.isascii() else host.lower()
    except UnicodeError:
        return False
    name = name[:-1] if name.endswith(".") else name
    return 0 < len(name) <= 253 and all(_LABEL.fullmatch(label) for label in name.split("."))


def check_url(url, *, schemes: tuple[str, ...] = ("http", "https"), path: bool = True,
              listen: bool = False, http_loopback_only: bool = False) -> SplitResult:
    """The parts of ``url``, or ValueError saying what is wrong (without the URL: the caller names
    the key and shows :func:`shown` of it)."""
    if not isinstance(url, str) or not url:
        raise ValueError("is empty")
    if _BAD_CHARS.search(url):
        raise ValueError("holds a space, a backslash or a control character")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        # "could not be cast" quotes what stood for a port: maybe a secret ("https://KEY:SECRET")
        why = "port is not a number" if "could not be cast" in str(e) else e
        raise ValueError(f"is not a valid URL ({why})") from None
    names = " or ".join(f"{s}://" for s in schemes)
    if parts.scheme not in schemes or not parts.hostname:
        raise ValueError(f"is not an {names} URL with a host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not hold a user name or password")
    host = parts.hostname
    if not valid_host(host):
        raise ValueError(f"has an invalid host name {host!r}")
    if parts.netloc.endswith(":"):
        raise ValueError("has an empty port")
    if port == 0 and not listen:
        raise ValueError("has port 0 (only a listen address may ask for any free port)")
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise ValueError("must not have a query or fragment")
    if not path and parts.path not in ("", "/"):
        raise ValueError(f"must not have a path (got {parts.path!r})")
    if http_loopback_only and parts.scheme == "http" and not is_loopback_host(host):
        raise ValueError("is plain http to a host that is not loopback "
                         "(http is only allowed for 127.0.0.0/8, localhost, ::1; use https)")
    return parts


def check_listen_url(url) -> SplitResult:
    """A URL this process can listen on: ``http://host[:port][/]`` (TLS belongs to a proxy in
    front, so https is not served here); port 0 is any free port."""
    if isinstance(url, str) and url.lower().startswith("https:"):
        raise ValueError("is https: this dispatcher serves plain http (TLS belongs to a proxy in front)")
    return check_url(url, schemes=("http",), path=False, listen=True)


# PostgreSQL.Connection is libpq keywords, not a URL, but holds the one address ``run`` connects to
# besides the controller (the dispatch lock): checked here by the same host and port rules.

def check_pg_address(key: str, value: str) -> None:
    """``host``: names, addresses or socket directories, comma-separated (libpq); ``port``: numbers
    in 1-65535, comma-separated. ValueError saying what is wrong."""
    for item in value.split(","):
        item = item.strip()
        if key == "port":
            if not item.isdigit() or not 0 < int(item) <= 65535:
                raise ValueError("is not a port number (1-65535)")
        elif item and not item.startswith(("/", "@")) and not valid_host(item.strip("[]")):
            raise ValueError("is not a host name, an IP address or a socket directory")


def check_pg_option(key: str) -> None:
    """``key`` is a libpq connection option (``sslmode``, ``dbname``, ...), as libpq itself parses
    them (no connection is made); ValueError if not."""
    try:
        from psycopg.conninfo import make_conninfo
    except ImportError:  # no lock driver: the lock says so when it is taken
        return
    try:
        make_conninfo("", **{key: "x"})
    except Exception:  # noqa: BLE001 - psycopg.ProgrammingError: invalid connection option
        raise ValueError("is not a PostgreSQL connection option") from None
