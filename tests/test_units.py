"""Duration and size syntax: the values an Arvados config file holds."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conf.units import format_duration, format_size, parse_duration, parse_size

S = 1.0
MS = 1e-3


@pytest.mark.parametrize("text, seconds", [
    ("10s", 10.0),
    ("1m30s", 90.0),
    ("2h45m", 9900.0),
    ("500ms", 0.5),
    ("1.5h", 5400.0),
    ("300us", 300e-6),
    ("300\u00b5s", 300e-6),   # micro sign
    ("300\u03bcs", 300e-6),   # Greek mu, which Go also accepts
    ("10ns", 10e-9),
    ("-1s", -1.0),
    ("+5m", 300.0),
    (".5s", 0.5),
    ("1.s", 1.0),
    ("1h1m1s1ms", 3661.001),
    ("0.1s", 0.1),
    ("24h", 86400.0),
    ("0", 0.0),
    ("-0", 0.0),
    (0, 0.0),
    (0.0, 0.0),
])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds, rel=1e-12, abs=0)


@pytest.mark.parametrize("value, reason", [
    ("5", "missing unit"),
    (5, "missing unit"),
    (1.5, "missing unit"),
    ("1.5.5s", "missing unit"),
    ("1d", 'unknown unit "d"'),
    ("10 s", 'unknown unit " s"'),
    ("10S", 'unknown unit "S"'),
    ("", "invalid duration"),
    ("s", "invalid duration"),
    ("-", "invalid duration"),
    ("--1s", "invalid duration"),
    ("3000000h", "out of range"),
    (True, "not a duration"),
    (None, "not a duration"),
    ([], "not a duration"),
])
def test_parse_duration_rejects(value, reason):
    with pytest.raises(ValueError) as e:
        parse_duration(value)
    assert str(e.value) == reason


@pytest.mark.parametrize("seconds, text", [
    (0, "0s"),
    (90, "1m30s"),
    (600, "10m"),
    (3600, "1h"),
    (5400, "1h30m"),
    (3601, "1h0m1s"),
    (0.5, "500ms"),
    (1.5, "1.5s"),
    (1.5e-6, "1.5\u00b5s"),
    (1e-7, "100ns"),
    (-10, "-10s"),
    (86400, "24h"),
])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


@given(st.integers(min_value=-(2**62), max_value=2**62))
def test_duration_round_trip(ns):
    seconds = ns / 10**9
    assert parse_duration(format_duration(seconds)) == seconds


@given(st.lists(st.tuples(st.integers(0, 10**5), st.sampled_from(["h", "m", "s", "ms", "us", "ns"])),
                min_size=1, max_size=4))
def test_duration_components_add_up(parts):
    ns_per = {"h": 3600 * 10**9, "m": 60 * 10**9, "s": 10**9, "ms": 10**6, "us": 10**3, "ns": 1}
    text = "".join(f"{n}{u}" for n, u in parts)
    assert parse_duration(text) == sum(n * ns_per[u] for n, u in parts) / 10**9


@pytest.mark.parametrize("value, n", [
    ("16GiB", 17179869184),
    ("16GB", 16 * 10**9),
    ("16G", 16 * 10**9),
    ("16 GiB", 17179869184),
    ("550MiB", 550 * 2**20),
    ("1.5G", 1_500_000_000),
    ("1e3", 1000),
    ("1e3K", 10**6),
    ("1.5e3Ki", 1_536_000),
    ("4.5EiB", int(4.5 * 2**60)),
    ("1E", 10**18),           # E the prefix, not the start of an exponent
    ("2T", 2 * 10**12),
    ("1PiB", 2**50),
    ("1024", 1024),
    ("1024B", 1024),
    ("0.5KiB", 512),
    ("0.9", 0),               # fractions of a byte are truncated
    ("1.9K", 1900),
    ("1.0001Ki", 1024),
    ("-1K", -1000),           # the syntax allows a sign; the loader rejects negative sizes
    (0, 0),
    (7, 7),
    (1.9, 1),
    (1e9, 10**9),
])
def test_parse_size(value, n):
    assert parse_size(value) == n


@pytest.mark.parametrize("value, reason", [
    ("16 gigs", 'unknown unit "gigs"'),
    ("16GiBs", 'unknown unit "GiBs"'),
    ("16kB", 'unknown unit "kB"'),
    ("abc", "not a size"),
    ("", "not a size"),
    ("K", "not a size"),
    ("1.2.3", "not a size"),
    ("8EiB", "out of range"),
    (True, "not a size"),
    (None, "not a size"),
    ({"a": 1}, "not a size"),
    (float("inf"), "not a finite number"),
])
def test_parse_size_rejects(value, reason):
    with pytest.raises(ValueError) as e:
        parse_size(value)
    assert str(e.value) == reason


@pytest.mark.parametrize("n, text", [
    (0, "0B"),
    (512, "512B"),
    (1024, "1KiB"),
    (1000, "1KB"),
    (17179869184, "16GiB"),
    (16 * 10**9, "16GB"),
    (550 * 2**20, "550MiB"),
    (1536, "1536B"),
    (1536 * 1024, "1536KiB"),
    (1536 * 1024 + 1, "1.5MiB"),
    (1025, "1025B"),
    (9999, "9999B"),
    (10001, "9.77KiB"),
    (16 * 2**30 + 12345, "16GiB"),   # approximate, three significant digits
    (int(15.3 * 2**30), "15.3GiB"),
    (-2048, "-2KiB"),
])
def test_format_size(n, text):
    assert format_size(n) == text


UNITS = ["", "K", "M", "G", "T", "Ki", "Mi", "Gi", "Ti", "Pi"]
MULT = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
        "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50}


@given(st.integers(0, 4096), st.sampled_from(UNITS), st.sampled_from(["", "B"]), st.sampled_from(["", " "]))
def test_size_syntax(n, unit, b, space):
    assert parse_size(f"{n}{space}{unit}{b}") == n * MULT[unit]


@given(st.integers(0, 4096), st.sampled_from(UNITS))
def test_size_exact_round_trip(n, unit):
    size = n * MULT[unit]
    assert parse_size(format_size(size)) == size


@given(st.integers(1, 2**62))
def test_size_approximate_round_trip(n):
    back = parse_size(format_size(n))
    assert abs(back - n) <= n * 0.005
