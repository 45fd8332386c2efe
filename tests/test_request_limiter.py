"""The container API client's request limiter (the Go SDK's requestLimiter) and its keep-alive
connection pool: pure arithmetic on a fake clock, then over a real HTTP server on loopback."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

from api.arvados.client import ArvadosClient
from api.arvados.limiter import QUIET_PERIOD, RequestLimiter
from api.wsgi import WsgiServer
from cloud.clock import FakeClock

TOKEN = "systemroot" + "a" * 30
T0 = 1_700_000_000.0


def held(lim: RequestLimiter) -> int:
    """Take slots without waiting until none is left; how many were taken."""
    n = 0
    while lim.acquire(timeout=0):
        n += 1
    return n


def test_starts_at_eight_and_grows_a_tenth_per_answer_up_to_twice_in_flight_and_the_max():
    clock = FakeClock(T0)
    lim = RequestLimiter(16, clock=clock.now)
    assert held(lim) == 8
    lim.report(200)  # 8 in flight: 8 + max(1, 0) = 9
    assert lim.limit == 9 and held(lim) == 1
    for _ in range(20):
        lim.report(200)
    assert lim.limit == 16  # API.MaxConcurrentRequests / 4 caps it
    for _ in range(8):
        lim.release()
    lim.report(200)  # one in flight: no more than twice that
    assert lim.limit == 2


def test_a_503_halves_the_limit_and_starts_nothing_for_a_second():
    clock = FakeClock(T0)
    lim = RequestLimiter(16, clock=clock.now)
    assert held(lim) == 8
    for _ in range(4):
        lim.release()
    assert lim.report(503) is True
    assert lim.limit == 4
    lim.report(503)  # inside the quiet period: not halved again
    assert lim.limit == 4
    for _ in range(4):
        lim.release()
    assert not lim.acquire(timeout=0), "a request started during the quiet period"
    clock.advance(QUIET_PERIOD)
    assert held(lim) == 4


def test_an_unlimited_limiter_gets_half_of_what_was_in_flight_at_the_first_503():
    clock = FakeClock(T0)
    lim = RequestLimiter(initial=0, clock=clock.now)
    for _ in range(30):
        assert lim.acquire(timeout=0)
    lim.report(503)
    assert lim.limit == 15


def _app(seen_ports: set, gate: threading.Barrier | None, in_flight: list, status: int = 200):
    lock = threading.Lock()

    def app(environ, start_response):
        with lock:
            seen_ports.add(environ.get("REMOTE_PORT"))
            in_flight[0] += 1
            in_flight[1] = max(in_flight[1], in_flight[0])
        try:
            if gate is not None:
                gate.wait()
        finally:
            with lock:
                in_flight[0] -= 1
        start_response(f"{status} X", [("Content-Type", "application/json")])
        return [json.dumps({"uuid": "zzzzz-gj3su-000000000000000", "items": []}).encode()]
    return app


def test_threads_sharing_a_client_keep_their_connections_alive():
    """Before: requests' pool kept 10 connections per host, so with 16 threads sharing the
    dispatcher's client, 6 connections were thrown away after each burst of calls and new ones
    opened for the next ("Connection pool is full, discarding connection" in the bench's log).
    The server answers only when all 16 requests of a burst are in flight together."""
    n, rounds = 16, 5
    ports: set = set()
    server = WsgiServer(_app(ports, threading.Barrier(n, timeout=10), [0, 0]), threads=n).start()
    client = ArvadosClient(server.url, TOKEN, retries=0)
    try:
        with ThreadPoolExecutor(n) as ex:
            for _ in range(rounds):  # a burst of n calls, then all idle (as locks come in bursts)
                list(ex.map(lambda _: client.list_containers(), range(n)))
    finally:
        client.close()
        server.stop()
    assert len(ports) <= n, f"{len(ports)} connections for {n} threads"


def test_the_limiter_bounds_requests_in_flight_and_a_503_halves_it():
    ports: set = set()
    in_flight = [0, 0]
    server = WsgiServer(_app(ports, None, in_flight), threads=16).start()
    lim = RequestLimiter(4)
    client = ArvadosClient(server.url, TOKEN, retries=0, limiter=lim)
    try:
        with ThreadPoolExecutor(16) as ex:
            list(ex.map(lambda _: client.list_containers(), range(200)))
    finally:
        client.close()
        server.stop()
    assert 1 <= in_flight[1] <= 4
    assert lim.current == 0

    server = WsgiServer(_app(ports, None, [0, 0], status=503), threads=4).start()
    lim = RequestLimiter(16)
    client = ArvadosClient(server.url, TOKEN, retries=0, limiter=lim)
    try:
        try:
            client.list_containers()
        except Exception:
            pass
    finally:
        client.close()
        server.stop()
    assert lim.limit == 4 and client.last_503 is not None and lim.current == 0


def test_the_dispatchers_limit_is_a_quarter_of_max_concurrent_requests():
    from actors.service import api_request_limit
    from conf.loader import load_text

    def limit(extra: str) -> int:
        return api_request_limit(load_text(f"""
Clusters:
  zzzzz:
    SystemRootToken: {TOKEN}
    ManagementToken: {"m" * 40}
    Services: {{Controller: {{ExternalURL: "http://127.0.0.1:1"}}}}
    Containers: {{CloudVMs: {{Driver: stub}}}}
    InstanceTypes: {{small: {{VCPUs: 1, RAM: 1GiB, Price: 0.1}}}}
{extra}"""))
    assert limit("") == 16  # Arvados' default 64
    assert limit("    API: {MaxConcurrentRequests: 8}") == 2
    assert limit("    API: {MaxConcurrentRequests: 2}") == 1
    assert limit("    API: {MaxConcurrentRequests: 0}") == 0  # no limit


def test_the_environment_is_read_once_not_on_every_call(monkeypatch):
    """Before: requests looked up proxies (and ~/.netrc, the CA bundle variables) in the
    environment on every call, about 0.13 ms of CPU each (a sixth of a lock's round trip on
    loopback). Read once when the client is made; a proxy or CA bundle set then still applies."""
    import requests.utils
    import requests.sessions

    looked = []
    real = requests.utils.get_environ_proxies

    def counting(url, no_proxy=None):
        looked.append(url)
        return real(url, no_proxy=no_proxy)
    monkeypatch.setattr(requests.utils, "get_environ_proxies", counting)
    monkeypatch.setattr(requests.sessions, "get_environ_proxies", counting)
    server = WsgiServer(_app(set(), None, [0, 0]), threads=2).start()
    client = ArvadosClient(server.url, TOKEN, retries=0)
    try:
        for _ in range(5):
            client.list_containers()
    finally:
        client.close()
        server.stop()
    assert len(looked) <= 1

    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.setenv("NO_PROXY", "")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    c = ArvadosClient("https://api.example:443", TOKEN)
    assert c._session.proxies.get("https") == "http://proxy.example:3128"
    assert c._session.verify == "/etc/ssl/certs/ca-certificates.crt"
    assert ArvadosClient("https://api.example:443", TOKEN, insecure=True)._session.verify is False
