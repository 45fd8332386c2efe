"""The API server at the HTTP level (raw ``requests``), and the Waitress helper under it."""

from __future__ import annotations

import json
import logging
import socket
import time

import pytest
import requests

from api.wsgi import WsgiServer, parse_listen_url
from api.arvados.server import make_app, serve
from api.arvados.store import ContainerStore
from tests.util import run_threads

ADMIN = "admin-secret-token-1234567890"
USER = "user-secret-token-0987654321"
H = {"Authorization": f"Bearer {ADMIN}"}


@pytest.fixture
def srv():
    store = ContainerStore(":memory:")
    store.add_token(ADMIN, admin=True)
    store.add_token(USER)
    server = serve(store)
    base = server.url + "/arvados/v1"
    yield store, base
    server.stop()
    store.close()


def create(base, **kw):
    body = {"container": {"container_image": "img", "command": ["true"], **kw}}
    r = requests.post(f"{base}/containers", json=body, headers=H)
    assert r.status_code == 200, r.text
    return r.json()


def assert_json_error(r, status, needle):
    assert r.status_code == status, r.text
    assert r.headers["Content-Type"].startswith("application/json")
    body = r.json()
    assert isinstance(body["errors"], list) and needle in body["errors"][0], body


def test_auth_header_forms_and_401(srv):
    store, base = srv
    uuid = store.authenticate(ADMIN).uuid
    for headers, params in (({"Authorization": f"Bearer {ADMIN}"}, None),
                            ({"Authorization": f"OAuth2 {ADMIN}"}, None),
                            ({}, {"api_token": ADMIN})):
        r = requests.get(f"{base}/api_client_authorizations/current", headers=headers, params=params)
        assert r.json() == {"kind": "arvados#apiClientAuthorization", "uuid": uuid}
    assert_json_error(requests.get(f"{base}/containers"), 401, "Not logged in")
    assert_json_error(requests.get(f"{base}/containers", headers={"Authorization": "Bearer nope"}),
                      401, "Not logged in")
    assert_json_error(requests.get(f"{base}/containers", headers={"Authorization": f"Basic {ADMIN}"}),
                      401, "Not logged in")


def test_403_for_non_admin_writes(srv):
    _, base = srv
    u = create(base)["uuid"]
    uh = {"Authorization": f"Bearer {USER}"}
    assert requests.get(f"{base}/containers/{u}", headers=uh).status_code == 200
    assert_json_error(requests.post(f"{base}/containers/{u}/lock", headers=uh), 403, "admin")
    assert_json_error(requests.post(f"{base}/containers", headers=uh,
                                    json={"container": {"container_image": "i", "command": ["x"]}}),
                      403, "admin")


def test_list_response_shape_and_query_encoding(srv):
    _, base = srv
    a = create(base, priority=5)["uuid"]
    create(base, priority=0)
    params = {"filters": json.dumps([["priority", ">", "0"]]), "order": "priority desc",
              "select": json.dumps(["uuid", "priority"]), "limit": "10"}
    body = requests.get(f"{base}/containers", params=params, headers=H).json()
    assert body == {"kind": "arvados#containerList", "limit": 10, "offset": 0, "items_available": 1,
                    "items": [{"kind": "arvados#container", "uuid": a, "priority": 5}]}
    body = requests.get(f"{base}/containers", params={"count": "none"}, headers=H).json()
    assert "items_available" not in body and len(body["items"]) == 2


@pytest.mark.parametrize("how", ["header", "form_method", "json_body"])
def test_post_as_get(srv, how):
    _, base = srv
    uuids = [create(base)["uuid"] for _ in range(2)]
    filters = [["uuid", "in", uuids + [f"zzzzz-dz642-{i:015d}" for i in range(40)]]]
    if how == "header":
        r = requests.post(f"{base}/containers", headers={**H, "X-Http-Method-Override": "GET"},
                          data={"filters": json.dumps(filters), "order": "uuid"})
    elif how == "form_method":
        r = requests.post(f"{base}/containers", headers=H,
                          data={"_method": "GET", "filters": json.dumps(filters), "order": "uuid"})
    else:
        r = requests.post(f"{base}/containers", headers={**H, "X-Http-Method-Override": "GET"},
                          json={"filters": filters, "order": "uuid"})
    assert r.status_code == 200, r.text
    assert [c["uuid"] for c in r.json()["items"]] == sorted(uuids)
    assert r.json()["kind"] == "arvados#containerList"


def test_get_one_with_select_and_override(srv):
    _, base = srv
    u = create(base)["uuid"]
    r = requests.get(f"{base}/containers/{u}", params={"select": '["state","mounts"]'}, headers=H)
    assert r.json() == {"kind": "arvados#container", "state": "Queued", "mounts": {}}
    r = requests.post(f"{base}/containers/{u}", headers={**H, "X-Http-Method-Override": "GET"},
                      data={"select": '["uuid"]'})
    assert r.json() == {"kind": "arvados#container", "uuid": u}
    assert_json_error(requests.post(f"{base}/containers/{u}", headers=H), 405, "not allowed")
    assert_json_error(requests.get(f"{base}/containers/zzzzz-dz642-xxxxxxxxxxxxxxx", headers=H),
                      404, "not found")


def test_update_as_the_go_sdk_sends_it(srv):
    _, base = srv
    u = create(base)["uuid"]
    requests.post(f"{base}/containers/{u}/lock", headers=H).raise_for_status()
    # Go's cancelUnsatisfiableContainer: PUT with form container=<json> and select=["uuid"].
    r = requests.put(f"{base}/containers/{u}", headers=H, data={
        "container": json.dumps({"runtime_status": {"error": "no suitable instance type"}}),
        "select": '["uuid"]'})
    assert r.json() == {"kind": "arvados#container", "uuid": u}
    r = requests.patch(f"{base}/containers/{u}", headers=H, json={"container": {"state": "Cancelled"}})
    assert r.json()["state"] == "Cancelled"
    assert r.json()["runtime_status"] == {"error": "no suitable instance type"}
    assert_json_error(requests.put(f"{base}/containers/{u}", headers=H, json={"nope": 1}),
                      400, 'missing parameter "container"')
    assert_json_error(requests.put(f"{base}/containers/{u}", headers={**H, "Content-Type": "application/json"},
                                   data="{not json"), 400, "invalid JSON")
    assert_json_error(requests.post(f"{base}/containers/{u}/unlock", headers=H), 422,
                      "cannot unlock when Cancelled")


def test_bad_parameters_are_422_with_messages(srv):
    _, base = srv
    for params, needle in (({"filters": '[["command","=","x"]]'}, "cannot filter on attribute 'command'"),
                           ({"filters": "priority>0"}, "filters: expected a list"),
                           ({"order": "bogus desc"}, "cannot order by 'bogus'"),
                           ({"select": '["nope"]'}, "unknown attribute 'nope'"),
                           ({"limit": "-3"}, "limit"),
                           ({"count": "maybe"}, "count")):
        assert_json_error(requests.get(f"{base}/containers", params=params, headers=H), 422, needle)


def test_unknown_route_wrong_method_and_crash_are_json(srv, caplog):
    store, base = srv
    assert_json_error(requests.get(f"{base}/collections", headers=H), 404, "no such route")
    r = requests.delete(f"{base}/containers/zzzzz-dz642-000000000000000", headers=H)
    assert_json_error(r, 405, "method DELETE not allowed")
    assert "PUT" in r.headers["Allow"]

    def boom(*a, **k):
        raise RuntimeError("kaboom")
    store.get = boom
    caplog.set_level(logging.ERROR, logger="api.arvados.server")
    r = requests.get(f"{base}/containers/zzzzz-dz642-000000000000000", headers=H)
    assert_json_error(r, 500, "internal server error")
    assert "kaboom" not in r.text
    rec = [x for x in caplog.records if x.msg == "API request failed"]
    assert rec and "kaboom" in rec[0].error and rec[0].path.endswith("000000000000000")


def test_create_via_post(srv):
    store, base = srv
    c = create(base, priority=7, runtime_constraints={"vcpus": 4, "ram": 8 << 30})
    assert c["state"] == "Queued" and c["priority"] == 7 and c["uuid"].startswith("zzzzz-dz642-")
    assert store.count() == 1
    r = requests.post(f"{base}/containers", headers=H, json={"container": {"command": ["x"]}})
    assert_json_error(r, 422, "container_image is required")


# -- WsgiServer ------------------------------------------------------------------------------------

def hello(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello"]


def test_start_stop_fifty_times_without_errors(caplog):
    caplog.set_level(logging.WARNING)
    session = requests.Session()  # keep-alive connections must not hold a server open
    ports = []
    t0 = time.monotonic()
    for _ in range(50):
        server = WsgiServer(hello).start()
        assert session.get(server.url, timeout=5).text == "hello"
        ports.append(server.port)
        server.stop()
        assert not server._loop_thread.is_alive()
    assert time.monotonic() - t0 < 15
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    # port released: nothing listens there any more, and it can be bound again.
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{ports[-1]}/", timeout=2)
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", ports[-1]))


def test_stop_with_a_request_in_flight_and_idempotent_stop():
    server = WsgiServer(hello, threads=2).start()
    s = socket.create_connection(("127.0.0.1", server.port))
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # half a request, left open
    t0 = time.monotonic()
    server.stop()
    server.stop()
    assert time.monotonic() - t0 < 5
    s.settimeout(2)
    try:  # the loop closed our connection: FIN, or RST if our bytes were still unread
        assert s.recv(100) == b""
    except ConnectionResetError:
        pass
    s.close()


def test_listen_url():
    assert parse_listen_url("http://localhost:9006") == ("127.0.0.1", 9006)
    assert parse_listen_url("http://127.0.0.2:0/") == ("127.0.0.2", 0)
    for bad in ("https://localhost:9006", "localhost:9006", "http://h:port", "http://h:1/x"):
        with pytest.raises(ValueError, match="listen URL"):
            parse_listen_url(bad)
    server = WsgiServer(hello, "http://localhost:0").start()
    try:
        assert server.url == f"http://127.0.0.1:{server.port}" and server.port > 0
        assert requests.get(server.url, timeout=5).text == "hello"
    finally:
        server.stop()


def test_app_can_be_served_from_a_listen_url():
    store = ContainerStore(":memory:")
    store.add_token(ADMIN, admin=True)
    server = WsgiServer(make_app(store), "http://127.0.0.1:0").start()
    try:
        r = requests.get(server.url + "/arvados/v1/containers", headers=H, timeout=5)
        assert r.json()["items"] == []
    finally:
        server.stop()
        store.close()


def test_manual_entry_point_serves_and_stops_on_sigterm(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    db = tmp_path / "manual.sqlite"
    proc = subprocess.Popen([sys.executable, "-m", "api.arvados.server", "--db", str(db), "--token", ADMIN],
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip()  # the server prints its URL once listening
        assert url.startswith("http://127.0.0.1:"), proc.stderr.read() if proc.poll() is not None else url
        r = requests.post(url + "/arvados/v1/containers", headers=H, timeout=5,
                          json={"container": {"container_image": "i", "command": ["x"]}})
        assert r.json()["state"] == "Queued"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        proc.stdout.close()
        proc.stderr.close()
    with ContainerStore(str(db)) as s:
        assert s.count() == 1


def test_manual_entry_point_bad_db_is_a_message_not_a_traceback(tmp_path):
    import os
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "api.arvados.server", "--db", str(tmp_path / "no" / "x.db"),
                          "--token", "t"], cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         capture_output=True, text=True, timeout=20)
    assert out.returncode == 1
    assert "cannot open" in out.stderr and "no/x.db" in out.stderr and "Traceback" not in out.stderr


def test_concurrent_dispatchers_over_http_lock_each_container_once(tmp_path):
    """Four clients race through Waitress's threads into one file-backed store."""
    import threading

    from api.arvados.client import ArvadosClient, Unprocessable

    store = ContainerStore(str(tmp_path / "race.sqlite"))
    store.add_token(ADMIN, admin=True)
    tokens = [f"dispatcher-{i}" for i in range(4)]
    for t in tokens:
        store.add_token(t, admin=True)
    server = serve(store, threads=4)
    clients = [ArvadosClient(server.url, t, retries=0) for t in tokens]
    try:
        uuids = [create(server.url + "/arvados/v1")["uuid"] for _ in range(20)]
        wins, errors = [], []
        gate = threading.Barrier(len(clients))

        def race(c):
            gate.wait()
            for u in uuids:
                try:
                    wins.append((u, c.lock(u)["locked_by_uuid"]))
                    c.list_containers([["locked_by_uuid", "=", c.current_token_uuid()]])
                except Unprocessable as e:
                    if "cannot lock when Locked" not in str(e):
                        errors.append(e)
                except Exception as e:  # pragma: no cover - what the test is looking for
                    errors.append(e)
        run_threads(race, [(c,) for c in clients], 20)
        assert errors == []
        assert sorted(u for u, _ in wins) == sorted(uuids)
        owners = dict(wins)
        for c in clients:
            mine = {x["uuid"] for x in c.iter_containers([["locked_by_uuid", "=", c.current_token_uuid()]])}
            assert mine == {u for u, o in owners.items() if o == c.current_token_uuid()}
    finally:
        for c in clients:
            c.close()
        server.stop()
        store.close()


# -- child containers: requesting_container_uuid, container tokens, AlwaysUsePreemptibleInstances ---

def preemptible_srv(**kw):
    store = ContainerStore(":memory:", **kw)
    store.add_token(ADMIN, admin=True)
    store.add_token(USER)
    return store, serve(store)


def create_as(base, token, **kw):
    body = {"container": {"container_image": "img", "command": ["true"], **kw}}
    return requests.post(f"{base}/containers", json=body, headers={"Authorization": f"Bearer {token}"})


def container_token(base, uuid):
    """Lock ``uuid`` as the dispatcher and fetch its own token as crunch-run does."""
    assert requests.post(f"{base}/containers/{uuid}/lock", headers=H).status_code == 200
    r = requests.get(f"{base}/containers/{uuid}/auth", headers=H)
    assert r.status_code == 200, r.text
    a = r.json()
    assert a["kind"] == "arvados#apiClientAuthorization" and a["uuid"].startswith("zzzzz-gj3su-")
    return f"v2/{a['uuid']}/{a['api_token']}/{uuid}"  # crunchrun.go ContainerToken


def test_always_use_preemptible_instances_applies_to_child_containers_only():
    store, server = preemptible_srv(always_use_preemptible_instances=True, preemptible_types=True)
    base = server.url + "/arvados/v1"
    try:
        parent = create(base, scheduling_parameters={"preemptible": False, "supervisor": True})
        top = create(base, scheduling_parameters={"preemptible": False})
        bare = create(base)
        # Top-level containers keep what they asked, an explicit false included.
        assert parent["scheduling_parameters"] == {"preemptible": False, "supervisor": True}
        assert top["scheduling_parameters"] == {"preemptible": False}
        assert bare["scheduling_parameters"] == {}
        # A child named by requesting_container_uuid is made preemptible; other keys stay.
        child = create(base, requesting_container_uuid=parent["uuid"],
                       scheduling_parameters={"preemptible": False, "max_run_time": 60})
        assert child["scheduling_parameters"] == {"preemptible": True, "max_run_time": 60}
        assert "requesting_container_uuid" not in child  # a request's attribute, not a container's
        # A child made with the running parent's own token, as a workflow runner makes its steps.
        tok = container_token(base, parent["uuid"])
        r = create_as(base, tok, scheduling_parameters={"preemptible": False})
        assert r.status_code == 200, r.text
        assert r.json()["scheduling_parameters"] == {"preemptible": True}
        got = requests.get(f"{base}/containers/{r.json()['uuid']}", headers=H).json()
        assert got["scheduling_parameters"] == {"preemptible": True}  # stored, not only answered
        # The same token in its three-part form works too; a user token is no container's.
        short = "/".join(tok.split("/")[:3])
        assert create_as(base, short).json()["scheduling_parameters"] == {"preemptible": True}
        assert_json_error(create_as(base, USER), 403, "admin token or a container's token")
        # Once the parent ends its token is expired: no more children from it.
        assert requests.put(f"{base}/containers/{parent['uuid']}", headers=H,
                            json={"container": {"state": "Cancelled"}}).status_code == 200
        assert_json_error(create_as(base, tok), 401, "Not logged in")
    finally:
        server.stop()
        store.close()


@pytest.mark.parametrize("flag, types, want", [(False, True, False), (True, False, False),
                                               (False, None, False), (True, None, True)])
def test_child_preemptible_needs_the_flag_and_a_preemptible_type(flag, types, want):
    store, server = preemptible_srv(always_use_preemptible_instances=flag, preemptible_types=types)
    base = server.url + "/arvados/v1"
    try:
        parent = create(base)
        child = create(base, requesting_container_uuid=parent["uuid"])
        assert child["scheduling_parameters"] == ({"preemptible": True} if want else {})
    finally:
        server.stop()
        store.close()


def test_preemptible_request_refused_without_preemptible_types():
    store, server = preemptible_srv(preemptible_types=False)
    base = server.url + "/arvados/v1"
    try:
        r = requests.post(f"{base}/containers", headers=H, json={"container": {
            "container_image": "i", "command": ["x"], "scheduling_parameters": {"preemptible": True}}})
        assert_json_error(r, 422, "preemptible instances are not configured in InstanceTypes")
        assert store.count() == 0
        assert create(base, scheduling_parameters={"preemptible": False})["state"] == "Queued"
    finally:
        server.stop()
        store.close()


def test_requesting_container_uuid_must_name_a_container(srv):
    store, base = srv
    r = requests.post(f"{base}/containers", headers=H, json={"container": {
        "container_image": "i", "command": ["x"], "requesting_container_uuid": "zzzzz-dz642-000000000000000"}})
    assert_json_error(r, 422, "requesting_container_uuid: container zzzzz-dz642-000000000000000 not found")
    r = requests.post(f"{base}/containers", headers=H, json={"container": {
        "container_image": "i", "command": ["x"], "requesting_container_uuid": 7}})
    assert_json_error(r, 422, "requesting_container_uuid: expected a string")
    assert store.count() == 0


def test_container_auth_only_for_the_locker_and_expires_on_unlock(srv):
    store, base = srv
    other = "other-admin-token-000000000000000"
    store.add_token(other, admin=True)
    u = create(base)["uuid"]
    assert_json_error(requests.get(f"{base}/containers/{u}/auth", headers=H), 403, "Not locked by your token")
    tok = container_token(base, u)
    assert_json_error(requests.get(f"{base}/containers/{u}/auth",
                                   headers={"Authorization": f"Bearer {other}"}), 403, "Not locked by your token")
    cur = requests.get(f"{base}/api_client_authorizations/current", headers={"Authorization": f"Bearer {tok}"})
    assert cur.status_code == 200 and cur.json()["uuid"] == tok.split("/")[1]
    # A container token is no admin: it cannot lock, unlock or update.
    assert_json_error(requests.post(f"{base}/containers/{u}/unlock",
                                    headers={"Authorization": f"Bearer {tok}"}), 403, "admin")
    assert requests.post(f"{base}/containers/{u}/unlock", headers=H).status_code == 200
    assert_json_error(requests.get(f"{base}/api_client_authorizations/current",
                                   headers={"Authorization": f"Bearer {tok}"}), 401, "Not logged in")
    # Locked again: a new token, not the old one.
    assert container_token(base, u) != tok
