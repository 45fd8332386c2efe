"""The HTTP servers against hostile and unlucky clients, over real sockets on loopback (issue 11):
half-open connections, bodies too big to read, undecodable headers, malformed bodies, and
hypothesis-generated requests to every management endpoint. The management API (Waitress via
:class:`api.server.ApiServer`) and the dev container API (:func:`api.arvados.server.serve`) are
the real servers; the management backend is the recording :class:`SnapshotBackend`."""

from __future__ import annotations

import base64
import logging
import socket
import time
from contextlib import contextmanager
from urllib.parse import quote_from_bytes

import pytest
import requests
from hypothesis import HealthCheck, event, given, settings, strategies as st

from api.app import make_app
from api.arvados.server import serve as serve_container_api
from api.arvados.store import ContainerStore
from api.backend import SnapshotBackend
from api.metrics import DispatchMetrics
from api.server import ApiServer
from api.wsgi import Limits, WsgiServer
from tests import api_data as d

P = "/arvados/v1/dispatch"
AUTH = {"Authorization": "Bearer " + d.TOKEN}
ARV_TOKEN = "arvados-admin-token-0123456789abcdef"


class Records(logging.Handler):
    """Every log record of the process while installed (root logger, all levels)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)

    def bad(self) -> list[logging.LogRecord]:
        return [r for r in self.records if r.exc_info or r.levelno >= logging.ERROR]


@contextmanager
def recording():
    h = Records()
    root = logging.getLogger()
    old = root.level
    root.addHandler(h)
    root.setLevel(logging.DEBUG)
    try:
        yield h
    finally:
        root.removeHandler(h)
        root.setLevel(old)


class Mgmt:
    def __init__(self):
        self.backend = SnapshotBackend(d.snapshot())
        self.snap0 = self.backend.snapshot()
        metrics = DispatchMetrics(d.cluster(), clock=lambda: d.NOW)
        metrics.set_snapshot_source(self.backend.snapshot)
        self.server = ApiServer(make_app(d.cluster(), self.backend, metrics), ["http://127.0.0.1:0"],
                                loopback_only=True).start()
        self.url = self.server.urls[0]
        host, port = self.url[len("http://"):].rsplit(":", 1)
        self.addr = (host, int(port))

    def reset(self):
        self.backend.publish(self.snap0)
        self.backend.calls.clear()


@pytest.fixture
def mgmt():
    m = Mgmt()
    yield m
    m.server.stop()


@pytest.fixture
def arv():
    store = ContainerStore(":memory:")
    store.add_token(ARV_TOKEN, admin=True)
    server = serve_container_api(store)
    host, port = server.url[len("http://"):].rsplit(":", 1)
    yield server, (host, int(port))
    server.stop()
    store.close()


def raw_request(addr, data: bytes, timeout: float = 5.0) -> tuple[int | None, bytes]:
    """Send raw bytes; return (status, body) of the response (None: closed without one)."""
    with socket.create_connection(addr, timeout=timeout) as s:
        try:
            s.sendall(data)
        except OSError:
            pass  # the server may answer (413) and close before it has read everything
        buf = b""
        try:
            while b"\r\n\r\n" not in buf:
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
            head, _, body = buf.partition(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1."):
                return None, buf
            status = int(head.split(b" ", 2)[1])
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
            if not data.startswith(b"HEAD "):
                while len(body) < length:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    body += chunk
            return status, body
        except ConnectionResetError:
            head = buf.split(b"\r\n", 1)[0]
            return (int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.") else None), b""


def request_bytes(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes = b"") -> bytes:
    lines = [method + b" " + target + b" HTTP/1.1", b"Host: 127.0.0.1", b"Connection: close",
             *[n + b": " + v for n, v in headers]]
    if body or method in (b"POST", b"PUT", b"PATCH"):
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


# --- slow clients ------------------------------------------------------------------------------------

def half_open(addr, n: int) -> list[socket.socket]:
    """``n`` connections that each sent half a request line and then nothing."""
    socks = []
    for _ in range(n):
        s = socket.create_connection(addr, timeout=5)
        s.sendall(b"GET /arvados/v1/dis")
        socks.append(s)
    return socks


def test_200_half_open_connections_do_not_lock_out_the_management_api(mgmt):
    socks = half_open(mgmt.addr, 200)
    try:
        t0 = time.monotonic()
        r = requests.get(mgmt.url + P + "/instances", headers=AUTH, timeout=5)
        took = time.monotonic() - t0
        assert r.status_code == 200 and took < 1.0, took
        assert requests.get(mgmt.url + "/metrics", headers=AUTH, timeout=5).status_code == 200
    finally:
        for s in socks:
            s.close()
    # and it keeps serving once they have gone
    for _ in range(5):
        assert requests.get(mgmt.url + "/_health/ping", headers=AUTH, timeout=2).status_code == 200


def test_200_half_open_connections_do_not_lock_out_the_container_api(arv):
    server, addr = arv
    socks = half_open(addr, 200)
    try:
        t0 = time.monotonic()
        r = requests.get(server.url + "/arvados/v1/containers", timeout=5,
                         headers={"Authorization": "Bearer " + ARV_TOKEN})
        took = time.monotonic() - t0
        assert r.status_code == 200 and took < 1.0, took
    finally:
        for s in socks:
            s.close()
    r = requests.get(server.url + "/arvados/v1/containers", timeout=2, headers={"Authorization": "Bearer " + ARV_TOKEN})
    assert r.status_code == 200


def test_idle_half_open_connections_are_closed_after_the_idle_timeout():
    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]
    with WsgiServer(app, limits=Limits(idle_timeout=1.0)) as server:
        socks = half_open((server.host, server.port), 20)
        try:
            t0 = time.monotonic()
            for s in socks:
                s.settimeout(10)
                while s.recv(4096):  # Waitress may answer 400 or just close: either way, EOF
                    pass
            assert time.monotonic() - t0 < 6
        finally:
            for s in socks:
                s.close()


# --- bodies, headers -----------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["mgmt", "arv"])
def test_body_over_the_cap_is_refused_before_it_is_read(request, which):
    if which == "mgmt":
        m = request.getfixturevalue("mgmt")
        addr, target, size = m.addr, P + "/instances/hold", 100_000
    else:
        addr, target, size = request.getfixturevalue("arv")[1], "/arvados/v1/containers", 2 << 20
    # a body over the cap (and under Waitress' default) is announced and never sent: the answer
    # must not wait for it
    data = (f"POST {target} HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            f"Content-Length: {size}\r\n\r\n").encode() + b"a=" + b"x" * 1000
    t0 = time.monotonic()
    status, _ = raw_request(addr, data, timeout=5)
    assert status == 413 and time.monotonic() - t0 < 2


def test_undecodable_and_malformed_requests_get_4xx_and_one_log_line_a_minute(mgmt):
    bad = [
        [(b"Authorization", b"Bearer \xff\xfe")],
        [(b"Authorization", b"Basic \xff\xfe")],
        [(b"Authorization", b"Basic " + base64.b64encode(b"user:\xff" + d.TOKEN.encode()))],
        [(b"Cookie", b"arvados_api_token=\xff\xfe")],
        [(b"Content-Type", b"multipart/form-data; boundary=zz")],
    ]
    with recording() as log:
        statuses = []
        for _ in range(10):
            for headers in bad:
                data = request_bytes(b"POST", (P + "/instances/hold?instance_id=i-0001").encode(),
                                     headers, b"--zz\r\nContent-Disposition: form-data; name=\xff\r\n")
                statuses.append(raw_request(mgmt.addr, data)[0])
        assert set(statuses) <= {400, 401, 403}, statuses
        assert log.bad() == [], [r.getMessage() for r in log.bad()]
        warned = [r for r in log.records if r.getMessage() == "management API: malformed request"]
        assert len(warned) == 1 and warned[0].RemoteAddr == "127.0.0.1"
    assert mgmt.backend.calls == [] and mgmt.backend.snapshot() is mgmt.snap0


def test_token_is_checked_before_the_body_is_parsed(mgmt, arv):
    body = b"--zz\r\nbroken multipart without an end"
    hdrs = [(b"Authorization", b"Bearer wrong-token"), (b"Content-Type", b"multipart/form-data; boundary=zz")]
    with recording() as log:
        status, resp = raw_request(mgmt.addr, request_bytes(b"POST", (P + "/instances/hold").encode(), hdrs, body))
        assert status == 403 and b"does not match" in resp
        status, resp = raw_request(arv[1], request_bytes(b"POST", b"/arvados/v1/containers", hdrs, body))
        assert status == 401 and b"Not logged in" in resp
        assert log.bad() == []


# --- fuzzing every management endpoint ---------------------------------------------------------------------

ENDPOINTS = [P + "/containers", P + "/container", P + "/containers/kill", P + "/instances",
             P + "/instances/hold", P + "/instances/drain", P + "/instances/run", P + "/instances/kill",
             "/metrics", "/metrics.json", "/_health/ping", "/_health/other", "/", P, "/arvados/v1/containers"]
PARAMS = ["container_uuid", "instance_id", "reason", "api_token", "x"]
HEADERS = [b"Authorization", b"Cookie", b"Content-Type", b"X-Http-Method-Override", b"Accept",
           b"X-Forwarded-For", b"Range", b"If-None-Match"]
_CTL = bytes(range(0x20)) + b"\x7f"


def _no_ctl(b: bytes) -> bytes:
    return b.translate(None, _CTL)


# Mostly requests Waitress lets through to the app (no control bytes), with undecodable bytes
# both raw (headers) and percent-encoded (query, path, body); some raw garbage too.
header_value = st.one_of(st.binary(max_size=40).map(_no_ctl), st.text(max_size=30).map(
    lambda t: _no_ctl(t.encode("utf-8", "surrogatepass"))), st.binary(max_size=10).map(
    lambda b: b.replace(b"\r", b"").replace(b"\n", b"")))
query_value = st.one_of(st.binary(max_size=30).map(lambda b: quote_from_bytes(b).encode()),
                        st.sampled_from([b"i-0001", b"i-0002", b"i-9999", d.CTR_QUEUED.encode(),
                                         d.CTR_RUNNING_1.encode(), b""]))
path_suffix = st.one_of(st.just(b""), st.just(b""), st.binary(max_size=12).map(lambda b: quote_from_bytes(b).encode()),
                        st.binary(max_size=8).map(lambda b: _no_ctl(b).replace(b" ", b"").replace(b"?", b"")))
tokens = st.sampled_from(["none", "bearer", "bearer", "wrong", "query", "body", "basic", "cookie"])


@st.composite
def requests_(draw):
    path = draw(st.sampled_from(ENDPOINTS))
    if draw(st.booleans()):  # the method the endpoint takes, on its exact path
        method = b"POST" if "/kill" in path or "/instances/" in path else b"GET"
        path = path.encode()
    else:
        method = draw(st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH", b"FOO"]))
        path = path.encode() + draw(path_suffix)
    query = [(draw(st.sampled_from(PARAMS)).encode(), draw(query_value)) for _ in range(draw(st.integers(0, 3)))]
    headers = [(draw(st.sampled_from(HEADERS)), draw(header_value)) for _ in range(draw(st.integers(0, 3)))]
    ctype = draw(st.sampled_from([None, b"application/x-www-form-urlencoded", b"multipart/form-data; boundary=zz",
                                  b"application/json", b"text/plain; charset=\xff"]))
    form = st.lists(st.tuples(st.sampled_from(PARAMS), query_value), max_size=3).map(
        lambda kv: b"&".join(k.encode() + b"=" + v for k, v in kv))
    body = draw(st.one_of(st.just(b""), form, form, st.binary(max_size=300),
                          st.lists(st.tuples(st.sampled_from(PARAMS), st.text(max_size=20)), max_size=3)
                          .map(lambda kv: "&".join(f"{k}={v}" for k, v in kv).encode("utf-8", "surrogatepass")),
                          st.just(b"a=" + b"x" * 5000)))
    how = draw(tokens)
    return method, path, query, headers, ctype, body, how


def build(method, path, query, headers, ctype, body, how) -> bytes:
    headers = list(headers)
    if how == "bearer":
        headers.append((b"Authorization", b"Bearer " + d.TOKEN.encode()))
    elif how == "wrong":
        headers.append((b"Authorization", b"Bearer " + d.TOKEN.encode()[:-1] + b"\xff"))
    elif how == "query":
        query = [*query, (b"api_token", d.TOKEN.encode())]
    elif how == "body":
        body = body + b"&api_token=" + d.TOKEN.encode()
        ctype = b"application/x-www-form-urlencoded"
    elif how == "basic":
        headers.append((b"Authorization", b"Basic " + base64.b64encode(b"u:" + d.TOKEN.encode())))
    elif how == "cookie":
        headers.append((b"Cookie", b"arvados_api_token=" + base64.urlsafe_b64encode(d.TOKEN.encode()).rstrip(b"=")))
    if ctype is not None:
        headers.append((b"Content-Type", ctype))
    qs = b"&".join(k + b"=" + v.replace(b" ", b"+").replace(b"#", b"%23") for k, v in query)
    target = path + (b"?" + qs if qs else b"")
    return request_bytes(method, target, headers, body)


@pytest.fixture(scope="module")
def fuzz_server():
    m = Mgmt()
    yield m
    m.server.stop()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(req=requests_())
def test_fuzz_every_management_endpoint(fuzz_server, req):
    m = fuzz_server
    m.reset()
    with recording() as log:
        status, body = raw_request(m.addr, build(*req))
    event(f"status {status}")
    assert status is not None and status < 500, (req, status, body[:200])
    assert log.bad() == [], [(r.getMessage(), r.exc_info) for r in log.bad()]
    assert d.TOKEN.encode() not in body
    if not 200 <= status < 300:  # a refused request changes nothing
        assert m.backend.calls == [] and m.backend.snapshot() is m.snap0, (req, status)
    else:
        assert req[6] not in ("none", "wrong"), req  # only the token gets a 2xx
