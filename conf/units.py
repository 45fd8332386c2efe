"""Arvados value syntax for durations and sizes: parse config values, format them for people.

Durations follow Go's ``time.ParseDuration`` (what an Arvados config file holds, e.g. ``1m30s``);
sizes follow Arvados' ``ByteSize`` (``16GiB``, ``16GB``, ``550MiB``, a bare number of bytes).
Arithmetic is done in exact fractions so ``0.1s`` is exactly 100 ms and ``1.5G`` exactly 1.5e9,
then rounded once, the way Go does it in integers.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

# --- durations ---------------------------------------------------------------------------------

_NS_PER = {
    "ns": 1,
    "us": 10**3,
    "\u00b5s": 10**3,  # micro sign, as Go prints it
    "\u03bcs": 10**3,  # Greek small letter mu, which Go also accepts
    "ms": 10**6,
    "s": 10**9,
    "m": 60 * 10**9,
    "h": 3600 * 10**9,
}
_MAX_NS = 2**63 - 1  # Go's time.Duration is an int64 of nanoseconds
# one component: a number (at least one digit, optional fraction) then its unit (anything up to
# the next digit or dot, so that "1d" reports the unknown unit "d", as Go does)
# (no nested or overlapping repeats, so no input can make it backtrack)
_COMPONENT = re.compile(r"(\d+(?:\.\d*)?|\.\d+)([^\d.]*)")
# Longer than any real value (a 64-bit count of nanoseconds or bytes with a unit): refused
# before parsing, so a 30,000-digit value costs nothing.
MAX_TEXT = 64


def parse_duration(v) -> float:
    """Seconds in a Go duration (``"10s"``, ``"1m30s"``, ``"-1.5h"``); ``0`` and ``"0"`` are zero.

    ValueError with a short reason ("missing unit", 'unknown unit "d"', ...) otherwise.
    """
    if isinstance(v, bool):
        raise ValueError("not a duration")
    if isinstance(v, (int, float)):
        if v == 0:
            return 0.0
        raise ValueError("missing unit")
    if not isinstance(v, str):
        raise ValueError("not a duration")
    if len(v) > MAX_TEXT:
        raise ValueError("too long")
    s = v
    sign = 1
    if s[:1] in ("-", "+"):
        sign = -1 if s[0] == "-" else 1
        s = s[1:]
    if s == "0":
        return 0.0
    if not s:
        raise ValueError("invalid duration")
    total = Fraction(0)
    pos = 0
    while pos < len(s):
        m = _COMPONENT.match(s, pos)
        if not m:
            raise ValueError("invalid duration")
        number, unit = m.groups()
        if not unit:
            raise ValueError("missing unit")
        if unit not in _NS_PER:
            raise ValueError(f'unknown unit "{unit}"')
        total += Fraction(number) * _NS_PER[unit]
        pos = m.end()
    ns = int(total)  # Go truncates sub-nanosecond fractions
    if ns > _MAX_NS:
        raise ValueError("out of range")
    return sign * ns / 10**9


def _fraction_digits(whole: int, rest: int, width: int) -> str:
    """``whole.rest`` with ``rest`` zero-padded to ``width`` digits and trailing zeros dropped."""
    frac = f"{rest:0{width}d}".rstrip("0") if rest else ""
    return f"{whole}.{frac}" if frac else str(whole)


def format_duration(seconds: float) -> str:
    """Go's short form, as Arvados prints durations: ``1h``, ``1m30s``, ``10m``, ``500ms``, ``0s``."""
    ns = round(Fraction(seconds) * 10**9)
    if ns == 0:
        return "0s"
    if ns < 0:
        return "-" + format_duration(-seconds)
    if ns < 10**3:
        return f"{ns}ns"
    if ns < 10**6:
        return _fraction_digits(ns // 10**3, ns % 10**3, 3) + "\u00b5s"
    if ns < 10**9:
        return _fraction_digits(ns // 10**6, ns % 10**6, 6) + "ms"
    hours, rest = divmod(ns, 3600 * 10**9)
    minutes, rest = divmod(rest, 60 * 10**9)
    secs = _fraction_digits(rest // 10**9, rest % 10**9, 9) + "s"
    if hours:
        out = f"{hours}h{minutes}m{secs}"
    elif minutes:
        out = f"{minutes}m{secs}"
    else:
        out = secs
    # Arvados' Duration.String: "1h0m0s" -> "1h", "10m0s" -> "10m"
    if out.endswith("m0s"):
        out = out[:-2]
    if out.endswith("h0m"):
        out = out[:-2]
    return out


# --- sizes -------------------------------------------------------------------------------------

_PREFIXES = "KMGTPE"
_MULTIPLIER = {"": 1}
for _i, _p in enumerate(_PREFIXES, start=1):
    _MULTIPLIER[_p] = 1000**_i
    _MULTIPLIER[_p + "i"] = 1024**_i
_MAX_BYTES = 2**63 - 1  # Arvados' ByteSize is an int64
_SIZE = re.compile(
    r"(?P<num>[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)"  # int, float or exponent form
    r" *(?P<unit>[KMGTPE]i?)?B?"
)


def parse_size(v) -> int:
    """Bytes in an Arvados size: a number (bytes) or a string like ``"16GiB"``, ``"1.5 G"``.

    Decimal prefixes K..E are powers of 1000, Ki..Ei powers of 1024; a trailing ``B`` is optional;
    fractions of a byte are truncated. ValueError with a short reason otherwise.
    """
    if isinstance(v, bool):
        raise ValueError("not a size")
    if isinstance(v, int):
        n = v
    elif isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError("not a finite number")
        n = int(v)
    elif isinstance(v, str):
        if len(v) > MAX_TEXT:
            raise ValueError("too long")
        m = _SIZE.fullmatch(v.strip())
        if not m:
            unit = re.sub(r"^[-+\d.eE ]*", "", v.strip())
            raise ValueError(f'unknown unit "{unit}"' if unit and unit != v.strip() else "not a size")
        mantissa, _, exponent = m["num"].lower().partition("e")
        if exponent and abs(int(exponent)) > 40:  # 1e999999999 would take forever to expand
            raise ValueError("out of range")
        n = int(Fraction(m["num"]) * _MULTIPLIER[m["unit"] or ""])
    else:
        raise ValueError("not a size")
    if abs(n) > _MAX_BYTES:
        raise ValueError("out of range")
    return n


def _exact_forms(n: int):
    for p in reversed(_PREFIXES):
        for unit in (p + "i", p):
            q, r = divmod(n, _MULTIPLIER[unit])
            if r == 0 and q:
                yield f"{q}{unit}B"


def format_size(n: int) -> str:
    """A short human form: exact when a unit fits (``16GiB``, ``16GB``, ``550MiB``, ``1025B``),
    else three significant digits in binary units (``15.3GiB``), within 0.5% of ``n``."""
    if n < 0:
        return "-" + format_size(-n)
    exact = list(_exact_forms(n))
    if n < 10**4:
        exact.append(f"{n}B")  # short enough to show every byte
    if exact:
        return min(exact, key=len)  # on a tie the first, binary, form wins
    i = min(int(math.log(n, 1024)), len(_PREFIXES))
    while i > 0 and n < 1024**i:  # guard log() rounding
        i -= 1
    v = n / 1024**i
    digits = 0 if v >= 100 else 1 if v >= 10 else 2
    text = f"{v:.{digits}f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return f"{text}{_PREFIXES[i - 1]}iB"
