"""The container API through both clients: ArvadosClient over real HTTP and LocalArvadosClient.

The shared assertions run once per client (the ``api`` fixture is parametrized), which is how
we know a simulation using LocalArvadosClient sees exactly what the dispatcher sees over HTTP.
The transport tests (method override, retries, dead port) are HTTP only.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from types import SimpleNamespace

import pytest

from cloud.clock import FakeClock
from api.wsgi import WsgiServer
from api.arvados.server import make_app, serve
from api.arvados.client import (ApiError, ApiUnavailable, ArvadosClient, Forbidden, NotFound, Unauthorized,
                                Unprocessable, base_url, encode_params)
from api.arvados.inprocess import LocalArvadosClient
from api.arvados.store import MAX_DISPATCH_TEXT, ContainerStore

TOKEN_A = "dispatcher-token-aaaaaaaaaaaa"
TOKEN_B = "other-dispatcher-token-bbbbbb"
TOKEN_USER = "plain-user-token-cccccccccc"
SELECT = ["uuid", "state", "priority", "runtime_constraints", "container_image",
          "scheduling_parameters", "created_at"]


def new_container(api, **kw):
    fields = {"container_image": "arvados/jobs", "command": ["echo", "hi"], "priority": 1,
              "runtime_constraints": {"vcpus": 1, "ram": 1 << 30}}
    fields.update(kw)
    return api.create_container(fields)


@pytest.fixture(params=["http", "local"])
def api(request, tmp_path):
    clock = FakeClock()
    store = ContainerStore(str(tmp_path / "api.sqlite"), max_dispatch_attempts=3, clock=clock)
    uuid_a = store.add_token(TOKEN_A, admin=True)
    uuid_b = store.add_token(TOKEN_B, admin=True)
    store.add_token(TOKEN_USER, admin=False)
    server = None
    if request.param == "http":
        server = serve(store)
        mk = lambda tok: ArvadosClient(server.url, tok, retries=0)  # noqa: E731
    else:
        mk = lambda tok: LocalArvadosClient(store, tok)  # noqa: E731
    ns = SimpleNamespace(kind=request.param, store=store, clock=clock, a=mk(TOKEN_A), b=mk(TOKEN_B),
                         user=mk(TOKEN_USER), anon=mk("no-such-token"), uuid_a=uuid_a, uuid_b=uuid_b)
    yield ns
    for client in (ns.a, ns.b, ns.user, ns.anon):
        client.close()
    if server is not None:
        server.stop()
    store.close()


# -- shared assertions (both clients) -------------------------------------------------------------


def test_current_token_uuid_names_the_lock_owner(api):
    assert api.a.current_token_uuid() == api.uuid_a
    ctr = new_container(api.a)
    assert api.a.lock(ctr["uuid"])["locked_by_uuid"] == api.uuid_a


def test_full_state_machine(api):
    u = new_container(api.a)["uuid"]
    got = api.a.lock(u)
    assert {k: got[k] for k in ("uuid", "state", "locked_by_uuid")} == {
        "uuid": u, "state": "Locked", "locked_by_uuid": api.uuid_a}
    assert got["auth_uuid"].startswith("zzzzz-gj3su-")
    assert api.a.get_container(u)["lock_count"] == 1

    with pytest.raises(Unprocessable, match="cannot lock when Locked"):
        api.b.lock(u)
    with pytest.raises(Forbidden, match="locked by a different token"):
        api.b.unlock(u)
    with pytest.raises(Forbidden, match="locked by a different token"):
        api.b.update(u, {"state": "Running"})

    assert api.a.unlock(u)["state"] == "Queued"
    with pytest.raises(Unprocessable, match="cannot unlock when Queued"):
        api.a.unlock(u)
    after = api.a.get_container(u)
    assert after["locked_by_uuid"] is None and after["auth_uuid"] is None

    api.clock.advance(5)
    api.b.lock(u)
    running = api.b.update(u, {"state": "Running"})
    assert running["state"] == "Running" and running["started_at"] == "2023-11-14T22:13:25.000000Z"
    with pytest.raises(Unprocessable, match="cannot change state from Running to Queued"):
        api.b.update(u, {"state": "Queued"})
    with pytest.raises(Unprocessable, match="exit_code is required"):
        api.b.update(u, {"state": "Complete"})
    api.clock.advance(60)
    done = api.b.update(u, {"state": "Complete", "exit_code": 0, "runtime_status": {"activity": "done"}})
    assert done["state"] == "Complete" and done["exit_code"] == 0
    assert done["finished_at"] == "2023-11-14T22:14:25.000000Z"
    assert done["locked_by_uuid"] is None and done["runtime_status"] == {"activity": "done"}
    with pytest.raises(Unprocessable, match="cannot change state from Complete to Cancelled"):
        api.b.cancel(u)
    with pytest.raises(Unprocessable, match="cannot lock when Complete"):
        api.a.lock(u)


def test_cancel_paths_and_illegal_transitions(api):
    queued = new_container(api.a)["uuid"]
    assert api.a.cancel(queued)["state"] == "Cancelled"
    assert api.a.get_container(queued)["finished_at"] is not None

    locked = new_container(api.a)["uuid"]
    with pytest.raises(Unprocessable, match="cannot change state from Queued to Running"):
        api.a.update(locked, {"state": "Running"})
    with pytest.raises(Unprocessable, match="cannot change state from Queued to Locked"):
        api.a.update(locked, {"state": "Locked"})
    api.a.lock(locked)
    with pytest.raises(Unprocessable, match="cannot change state from Locked to Queued"):
        api.a.update(locked, {"state": "Queued"})
    # Another admin may cancel (the dispatcher cancels unsatisfiable containers it locked, and
    # operators cancel anything), but may not write progress fields of a container it didn't lock.
    with pytest.raises(Forbidden):
        api.b.update(locked, {"runtime_status": {"error": "x"}})
    api.a.update(locked, {"runtime_status": {"error": "constraints not satisfiable"}})
    gone = api.b.cancel(locked)
    assert gone["state"] == "Cancelled" and gone["locked_by_uuid"] is None
    assert gone["runtime_status"] == {"error": "constraints not satisfiable"}

    zero = new_container(api.a, priority=0)["uuid"]
    with pytest.raises(Unprocessable, match=r"cannot lock when priority<=0"):
        api.a.lock(zero)


def test_max_dispatch_attempts_cancels_with_the_exact_text(api):
    u = new_container(api.a)["uuid"]
    for n in (1, 2):
        api.a.lock(u)
        assert api.a.unlock(u)["state"] == "Queued"
    api.a.lock(u)
    assert api.a.get_container(u, select=["lock_count"])["lock_count"] == 3
    final = api.a.unlock(u)
    assert final["state"] == "Cancelled"
    got = api.a.get_container(u)
    assert got["runtime_status"] == {"error": "Failed to start container.  Cancelled after exceeding "
                                              "'Containers.MaxDispatchAttempts' (lock_count=3)"}
    assert got["runtime_status"]["error"] == MAX_DISPATCH_TEXT.format(n=3)


def test_auth_errors_are_typed(api):
    u = new_container(api.a)["uuid"]
    with pytest.raises(Unauthorized, match="Not logged in"):
        api.anon.list_containers()
    with pytest.raises(Unauthorized):
        api.anon.current_token_uuid()
    assert [c["uuid"] for c in api.user.list_containers()] == [u]  # any token may read
    for call in (lambda: api.user.lock(u), lambda: api.user.cancel(u),
                 lambda: api.user.create_container({"container_image": "x", "command": ["y"]})):
        with pytest.raises(Forbidden):
            call()
    with pytest.raises(NotFound):
        api.a.get_container("zzzzz-dz642-000000000000000")
    with pytest.raises(NotFound):
        api.a.lock("zzzzz-dz642-000000000000000")


def test_dispatcher_queries_string_zero_priority_and_mine(api):
    hi = new_container(api.a, priority=10)["uuid"]
    lo = new_container(api.a, priority=2)["uuid"]
    new_container(api.a, priority=0)
    mine = new_container(api.a, priority=5)["uuid"]
    api.a.lock(mine)
    available = api.a.list_containers([["state", "=", "Queued"], ["priority", ">", "0"]],
                                      order="priority desc", select=SELECT, limit=1000)
    assert [c["uuid"] for c in available] == [hi, lo]
    assert set(available[0]) == {"kind", *SELECT}
    assert available[0]["runtime_constraints"] == {"vcpus": 1, "ram": 1 << 30}
    locked = api.a.list_containers([["locked_by_uuid", "=", api.a.current_token_uuid()]], order="uuid")
    assert [c["uuid"] for c in locked] == [mine]
    assert api.b.list_containers([["locked_by_uuid", "=", api.b.current_token_uuid()]]) == []


def test_order_select_limit_offset_count(api):
    uuids = []
    for p in (3, 1, 2, 1):
        uuids.append(new_container(api.a, priority=p)["uuid"])
        api.clock.advance(1)
    by_prio = api.a.list_containers(order=["priority desc"], select=["uuid", "priority"])
    assert [c["priority"] for c in by_prio] == [3, 2, 1, 1]
    ones = [c["uuid"] for c in by_prio if c["priority"] == 1]
    assert ones == sorted(ones)  # uuid is the final tie-break
    assert [c["uuid"] for c in api.a.list_containers(order="created_at asc")] == uuids
    assert [c["uuid"] for c in api.a.list_containers(order="created_at desc", limit=2, offset=1)] == \
        uuids[::-1][1:3]
    with pytest.raises(Unprocessable, match="select: unknown attribute 'bogus'"):
        api.a.list_containers(select=["uuid", "bogus"])
    with pytest.raises(Unprocessable, match="cannot order by 'command'"):
        api.a.list_containers(order="command")
    with pytest.raises(Unprocessable, match="cannot filter on attribute 'command'"):
        api.a.list_containers([["command", "=", "x"]])
    with pytest.raises(Unprocessable, match="unsupported operator '~'"):
        api.a.list_containers([["uuid", "~", "x"]])
    assert api.a.get_container(uuids[0], select=["state"]) == {"kind": "arvados#container", "state": "Queued"}


def test_keyset_paging_survives_changes_between_pages(api):
    originals = sorted(new_container(api.a)["uuid"] for _ in range(30))
    queued = [["state", "=", "Queued"]]
    it = api.a.iter_containers(queued, select=["state"], page_size=10)
    first = [next(it) for _ in range(10)]
    assert [c["uuid"] for c in first] == originals[:10]
    assert all(set(c) == {"kind", "state", "uuid"} for c in first)
    # Between pages: 5 containers of page 1 leave the filter, one later container changes,
    # and new containers arrive.
    for u in originals[:5]:
        api.b.lock(u)
    # The same change breaks offset paging (what this test catches if iter used offsets).
    offset_page2 = api.a.list_containers(queued, order="uuid", limit=10, offset=10)
    assert originals[10] not in [c["uuid"] for c in offset_page2]
    api.a.update(originals[20], {"priority": 7})
    added = [new_container(api.a)["uuid"] for _ in range(10)]
    rest = list(it)
    seen = [c["uuid"] for c in first + rest]
    assert len(seen) == len(set(seen)), "a container was returned twice"
    assert set(originals) <= set(seen), "a container was skipped"
    last_of_page1 = originals[9]
    assert {u for u in added if u > last_of_page1} <= set(seen)
    assert {u for u in added if u < last_of_page1}.isdisjoint(seen)


def test_iter_containers_pages_everything_once(api):
    made = {new_container(api.a)["uuid"] for _ in range(25)}
    got = [c["uuid"] for c in api.a.iter_containers(page_size=7)]
    assert sorted(got) == sorted(made) and len(got) == 25


def test_update_fields_and_validation(api):
    u = new_container(api.a)["uuid"]
    assert api.a.update(u, {"priority": 9})["priority"] == 9
    with pytest.raises(Unprocessable, match="priority"):
        api.a.update(u, {"priority": -1})
    with pytest.raises(Unprocessable, match="'command' cannot be updated"):
        api.a.update(u, {"command": ["x"]})
    with pytest.raises(Unprocessable, match="unknown attribute 'nonsense'"):
        api.a.update(u, {"nonsense": 1})
    with pytest.raises(Unprocessable, match="runtime_status: 'error' value must be a string"):
        api.a.update(u, {"runtime_status": {"error": 3}})
    with pytest.raises(Unprocessable, match="container_image is required"):
        api.a.create_container({"command": ["x"]})


# -- HTTP transport ---------------------------------------------------------------------------------


class Recorder:
    """WSGI middleware noting each request's method, override header and query length."""

    def __init__(self, app):
        self.app = app
        self.seen = []

    def __call__(self, environ, start_response):
        self.seen.append((environ["REQUEST_METHOD"], environ.get("HTTP_X_HTTP_METHOD_OVERRIDE"),
                          len(environ.get("QUERY_STRING", ""))))
        return self.app(environ, start_response)


@pytest.fixture
def recorded(tmp_path):
    store = ContainerStore(":memory:")
    store.add_token(TOKEN_A, admin=True)
    rec = Recorder(make_app(store))
    server = WsgiServer(rec).start()
    client = ArvadosClient(server.url, TOKEN_A, retries=0)
    yield SimpleNamespace(store=store, rec=rec, client=client)
    client.close()
    server.stop()
    store.close()


def test_long_get_switches_to_post_with_method_override(recorded):
    c = recorded.client
    made = [new_container(c)["uuid"] for _ in range(3)]
    short = c.list_containers([["uuid", "in", made[:1]]])
    assert recorded.rec.seen[-1][:2] == ("GET", None)
    many = made + [f"zzzzz-dz642-{i:015d}" for i in range(40)]  # > 1000 chars encoded
    assert len(json.dumps(many)) > 1000
    got = c.list_containers([["uuid", "in", many]], order="uuid")
    method, override, qlen = recorded.rec.seen[-1]
    assert (method, override, qlen) == ("POST", "GET", 0)
    assert [x["uuid"] for x in got] == sorted(made)
    assert [x["uuid"] for x in short] == made[:1]


def flaky_app(fail_times: int, status: int = 503):
    state = {"calls": 0}

    def app(environ, start_response):
        state["calls"] += 1
        if state["calls"] <= fail_times:
            start_response(f"{status} Oops", [("Content-Type", "application/json")])
            return [json.dumps({"errors": [f"try later ({state['calls']})"]}).encode()]
        body = {"kind": "arvados#apiClientAuthorization", "uuid": "zzzzz-gj3su-flaky0000000000",
                "items": []}
        start_response("200 OK", [("Content-Type", "application/json")])
        return [json.dumps(body).encode()]
    return app, state


@pytest.fixture
def flaky():
    servers = []

    def start(fail_times, status=503, **kw):
        app, state = flaky_app(fail_times, status)
        server = WsgiServer(app).start()
        servers.append(server)
        delays = []
        kw.setdefault("retries", 4)
        client = ArvadosClient(server.url, TOKEN_A, backoff=0.25, sleep=delays.append,
                               clock=lambda: 1234.5, **kw)
        return client, state, delays
    yield start
    for s in servers:
        s.stop()


def test_retries_503_with_backoff_and_records_last_503(flaky):
    client, state, delays = flaky(2)
    assert client.last_503 is None
    assert client.current_token_uuid() == "zzzzz-gj3su-flaky0000000000"
    assert state["calls"] == 3 and delays == [0.25, 0.5]
    assert client.last_503 == 1234.5


def test_retries_exhausted_is_api_unavailable(flaky):
    client, state, delays = flaky(100, retries=2)
    with pytest.raises(ApiUnavailable, match=r"HTTP 503: try later \(3\).*after 3 attempts") as ei:
        client.list_containers()
    assert ei.value.status == 503 and state["calls"] == 3 and delays == [0.25, 0.5]
    assert "/arvados/v1/containers" in str(ei.value)


def test_4xx_is_not_retried(flaky):
    client, state, delays = flaky(100, status=422)
    with pytest.raises(Unprocessable, match="try later"):
        client.list_containers()
    assert state["calls"] == 1 and delays == []


def test_500_retried_for_reads_but_not_for_lock(flaky):
    client, state, _ = flaky(1, status=500)
    client.list_containers()
    assert state["calls"] == 2
    client, state, _ = flaky(1, status=500)
    with pytest.raises(ApiUnavailable):
        client.lock("zzzzz-dz642-000000000000000")
    assert state["calls"] == 1  # the server may have applied it: don't lock twice


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_retry_pauses_are_capped_by_max_delay():
    """The service caps pauses at PollInterval, so a poll in backoff cannot hold dispatch back
    for more than one PollInterval after an API outage ends."""
    port = free_port()
    delays = []
    client = ArvadosClient(f"127.0.0.1:{port}", TOKEN_A, retries=4, backoff=0.5, max_delay=1.0,
                           sleep=delays.append, timeout=(1.0, 1.0))
    with pytest.raises(ApiUnavailable):
        client.list_containers()
    assert delays == [0.5, 1.0, 1.0, 1.0]


def test_dead_port_raises_api_unavailable_quickly(caplog):
    port = free_port()
    client = ArvadosClient(f"127.0.0.1:{port}", TOKEN_A, retries=2, backoff=0.05, timeout=(1.0, 1.0))
    caplog.set_level(logging.DEBUG, logger="api.arvados.client")
    t0 = time.monotonic()
    with pytest.raises(ApiUnavailable) as ei:
        client.list_containers()
    assert time.monotonic() - t0 < 5
    msg = str(ei.value)
    assert f"http://127.0.0.1:{port}/arvados/v1/containers" in msg and "ConnectionError" in msg
    assert "after 3 attempts" in msg and ei.value.status is None
    assert len([r for r in caplog.records if r.msg == "retrying Arvados API request"]) == 2
    logged = " ".join(json.dumps(r.__dict__, default=str) for r in caplog.records)
    assert TOKEN_A not in logged and TOKEN_A not in msg and TOKEN_A not in repr(client)


def test_read_timeout_is_bounded():
    release = threading.Event()

    def stuck(environ, start_response):
        release.wait(10)
        start_response("200 OK", [("Content-Type", "application/json")])
        return [b"{}"]
    server = WsgiServer(stuck).start()
    try:
        client = ArvadosClient(server.url, TOKEN_A, retries=1, backoff=0.01, timeout=(1.0, 0.3))
        t0 = time.monotonic()
        with pytest.raises(ApiUnavailable, match="Timeout"):
            client.get_container("zzzzz-dz642-000000000000000")
        assert time.monotonic() - t0 < 3
    finally:
        release.set()
        server.stop()


def test_persistence_across_server_and_store_restart(tmp_path):
    db = str(tmp_path / "q.sqlite")
    store = ContainerStore(db)
    store.add_token(TOKEN_A, admin=True)
    server = serve(store)
    c = ArvadosClient(server.url, TOKEN_A)
    queued = new_container(c, priority=4)["uuid"]
    locked = new_container(c)["uuid"]
    c.lock(locked)
    server.stop()
    store.close()

    store = ContainerStore(db)
    server = serve(store)
    try:
        c = ArvadosClient(server.url, TOKEN_A)
        got = {x["uuid"]: x for x in c.list_containers(order="uuid")}
        assert got[queued]["state"] == "Queued" and got[queued]["priority"] == 4
        assert got[locked]["state"] == "Locked" and got[locked]["lock_count"] == 1
        c.unlock(locked)  # same token, same lock owner after the restart
    finally:
        server.stop()
        store.close()


@pytest.mark.parametrize("given,want", [
    ("api.example.com:443", "https://api.example.com:443"),
    ("127.0.0.1:8000", "http://127.0.0.1:8000"),
    ("localhost:8000", "http://localhost:8000"),
    ("[::1]:8000", "http://[::1]:8000"),
    ("http://ctrl.example:80/", "http://ctrl.example:80"),
    ("https://127.0.0.1:9", "https://127.0.0.1:9"),
])
def test_base_url(given, want):
    assert base_url(given) == want


@pytest.mark.parametrize("bad", ["", "ftp://x", "https://"])
def test_base_url_rejects_bad_hosts(bad):
    with pytest.raises(ValueError, match="api_host"):
        base_url(bad)


def test_encode_params_like_the_go_sdk():
    assert encode_params({"order": "uuid", "limit": 5, "filters": [["priority", ">", "0"]],
                          "skip": False, "none": None}) == {
        "order": "uuid", "limit": "5", "filters": '[["priority",">","0"]]'}


def test_error_hierarchy_is_shared():
    for cls in (Unauthorized, Forbidden, NotFound, Unprocessable, ApiUnavailable):
        assert issubclass(cls, ApiError)
