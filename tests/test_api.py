"""The management API over real HTTP (Waitress on 127.0.0.1:0) with a SnapshotBackend."""

from __future__ import annotations

import logging
import re
import socket

import pytest
import requests

from actors.snapshot import Snapshot
from api.app import check_token, make_app, rfc3339
from api.backend import SnapshotBackend
from api.metrics import DispatchMetrics
from api.server import ApiServer
from tests import api_data as d

P = "/arvados/v1/dispatch"
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z$")
INSTANCE_KEYS = {"instance", "address", "price", "arvados_instance_type", "provider_instance_type",
                 "last_container_uuid", "last_busy", "running_container_uuids", "worker_state", "idle_behavior"}
CONTAINER_KEYS = {"container", "instance_type", "instance_types", "instance_resources", "first_seen_at",
                  "scheduling_status"}
DOC_TYPE_KEYS = {"Name", "ProviderType", "VCPUs", "RAM", "Scratch", "IncludedScratch", "AddedScratch", "Price",
                 "Preemptible"}
GO_TYPE_KEYS = {"ProviderType", "VCPUs", "RAM", "IncludedScratch", "AddedScratch", "Price", "Preemptible", "GPU"}
AUTH = {"Authorization": "Bearer " + d.TOKEN}


class Api:
    def __init__(self, cluster, backend):
        self.backend = backend
        self.metrics = DispatchMetrics(cluster, clock=lambda: d.NOW)
        self.metrics.set_snapshot_source(backend.snapshot)
        self.server = ApiServer(make_app(cluster, backend, self.metrics), ["http://127.0.0.1:0"],
                                loopback_only=True).start()
        self.url = self.server.urls[0]
        self.http = requests.Session()

    def get(self, path, headers=AUTH, **kw):
        return self.http.get(self.url + path, headers=headers, timeout=10, **kw)

    def post(self, path, headers=AUTH, **kw):
        return self.http.post(self.url + path, headers=headers, timeout=10, **kw)


@pytest.fixture
def api():
    a = Api(d.cluster(), SnapshotBackend(d.snapshot()))
    yield a
    a.http.close()
    a.server.stop()


def assert_error(resp, status, message):
    assert resp.status_code == status, resp.text
    assert resp.headers["Content-Type"].startswith("application/json")
    assert resp.json() == {"errors": [message]}


# -- auth -------------------------------------------------------------------------------------------

ENDPOINTS = [("GET", P + "/containers"), ("GET", P + "/container?container_uuid=" + d.CTR_QUEUED),
             ("POST", P + "/containers/kill?container_uuid=" + d.CTR_RUNNING_1),
             ("GET", P + "/instances"), ("POST", P + "/instances/hold?instance_id=i-0001"),
             ("POST", P + "/instances/drain?instance_id=i-0001"), ("POST", P + "/instances/run?instance_id=i-0001"),
             ("POST", P + "/instances/kill?instance_id=i-0001"), ("GET", "/metrics"), ("GET", "/metrics.json"),
             ("GET", "/_health/ping"), ("GET", "/no/such/path")]


@pytest.mark.parametrize("method,path", ENDPOINTS)
def test_every_path_needs_the_token(api, method, path):
    r = api.http.request(method, api.url + path, timeout=10)
    assert r.status_code == 401 and r.headers["Content-Type"].startswith("application/json")
    assert "ManagementToken" in r.json()["errors"][0]
    r = api.http.request(method, api.url + path, headers={"Authorization": "Bearer abc"}, timeout=10)
    assert_error(r, 403, "Forbidden: management token does not match")
    r = api.http.request(method, api.url + path, headers=AUTH, timeout=10)
    assert r.status_code == (404 if path == "/no/such/path" else 200)
    assert api.backend.calls or method == "GET"


def test_token_alternatives(api):
    assert api.get(P + "/instances", headers={"Authorization": "OAuth2 " + d.TOKEN}).status_code == 200
    assert api.get(P + "/instances", headers={}, params={"api_token": d.TOKEN}).status_code == 200
    assert api.post(P + "/instances/hold", headers={},
                    data={"api_token": d.TOKEN, "instance_id": "i-0001"}).status_code == 200
    assert api.get(P + "/instances", headers={}, auth=("anyone", d.TOKEN)).status_code == 200
    assert api.get(P + "/instances", headers={}, params={"api_token": "nope"}).status_code == 403


def test_disabled_without_management_token():
    a = Api(d.cluster(token=""), SnapshotBackend(d.snapshot()))
    try:
        for headers in ({}, AUTH, {"Authorization": "Bearer "}):
            for path in (P + "/instances", "/metrics", "/_health/ping", "/elsewhere"):
                assert_error(a.get(path, headers=headers), 403, "Management API authentication is not configured")
    finally:
        a.server.stop()


@pytest.mark.parametrize("expected,offered,result", [
    ("", [], (403, "Management API authentication is not configured")),
    ("", ["x"], (403, "Management API authentication is not configured")),
    ("t", [], (401, "Unauthorized: this API requires the cluster's ManagementToken")),
    ("t", ["u"], (403, "Forbidden: management token does not match")),
    ("t", ["u", "t"], None),
    ("t", ["t"], None),
    ("tö", ["tö"], None),
])
def test_check_token_table(expected, offered, result):
    assert check_token(expected, offered) == result


# -- instances ------------------------------------------------------------------------------------

def test_instances_list(api):
    r = api.get(P + "/instances")
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("application/json")
    assert r.text.endswith("\n")
    items = r.json()["items"]
    assert len(items) == len(d.INSTANCES)
    for item in items:
        assert set(item) == INSTANCE_KEYS
        assert RFC3339.match(item["last_busy"]), item["last_busy"]
        assert isinstance(item["running_container_uuids"], list)  # [] never null
    assert [(i["instance"], i["arvados_instance_type"]) for i in items] == sorted(
        (v.instance, v.arvados_instance_type) for v in d.INSTANCES)
    by_id = {i["instance"]: i for i in items}
    assert by_id[""]["worker_state"] == "booting" and by_id[""]["running_container_uuids"] == []
    assert by_id["i-0003"]["running_container_uuids"] == [d.CTR_RUNNING_1, d.CTR_RUNNING_2]  # sorted
    assert by_id["i-0001"]["last_busy"] == "2023-11-14T21:56:40.123456Z"
    assert by_id["i-0005"]["last_busy"] == "0001-01-01T00:00:00Z"
    assert by_id["i-0001"] == {**by_id["i-0001"], "price": 0.096, "provider_instance_type": "Standard_D2s_v3",
                               "address": "10.1.2.3", "idle_behavior": "run"}


def test_empty_lists_are_arrays_not_null(api):
    api.backend.publish(Snapshot())
    assert api.get(P + "/instances").json() == {"items": []}
    assert api.get(P + "/containers").json() == {"items": []}


@pytest.mark.parametrize("action", ["hold", "drain", "run"])
def test_idle_behavior_actions(api, action):
    assert_error(api.post(P + f"/instances/{action}"), 400, "instance_id parameter not provided")
    assert_error(api.post(P + f"/instances/{action}?instance_id=i-9999"), 404, "requested instance does not exist")
    api.backend.publish(api.backend.snapshot())  # unchanged
    first = "hold" if action != "hold" else "drain"
    assert api.post(P + f"/instances/{first}", data={"instance_id": "i-0001"}).status_code == 200
    r = api.post(P + f"/instances/{action}?instance_id=i-0001")
    assert r.status_code == 200 and r.text == ""
    assert api.backend.calls[-1] == ("set_idle_behavior", "i-0001", action)
    row = next(i for i in api.get(P + "/instances").json()["items"] if i["instance"] == "i-0001")
    assert row["idle_behavior"] == action


def test_kill_instance(api):
    assert_error(api.post(P + "/instances/kill"), 400, "instance_id parameter not provided")
    assert_error(api.post(P + "/instances/kill?instance_id=i-9999"), 404, "instance not found")
    assert_error(api.post(P + "/instances/kill?instance_id="), 400, "instance_id parameter not provided")
    r = api.post(P + "/instances/kill", params={"instance_id": "i-0002", "reason": "stuck booting"})
    assert r.status_code == 200 and r.text == ""
    assert api.backend.calls == [("kill_instance", "i-0002", "via management API: stuck booting")]


# -- containers -------------------------------------------------------------------------------------

def test_containers_list(api):
    r = api.get(P + "/containers")
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("application/json")
    items = r.json()["items"]
    assert [i["container"]["uuid"] for i in items] == [e.uuid for e in d.QUEUE]  # scheduler order
    for item, ent in zip(items, d.QUEUE):
        assert set(item) == CONTAINER_KEYS
        assert set(item["instance_type"]) == DOC_TYPE_KEYS  # the documented object, with Name
        assert item["instance_type"]["Name"] == ent.instance_types[0].name
        assert item["instance_type"]["Scratch"] == ent.instance_types[0].scratch
        assert [set(t) for t in item["instance_types"]] == [GO_TYPE_KEYS] * len(ent.instance_types)
        assert [t["ProviderType"] for t in item["instance_types"]] == [t.provider_type for t in ent.instance_types]
        assert set(item["instance_resources"]) == {"VCPUs", "RAM", "Scratch", "GPUs", "GPUVRAM"}
        assert RFC3339.match(item["first_seen_at"])
        assert {"uuid", "state", "priority", "runtime_constraints"} <= set(item["container"])
    assert items[0]["first_seen_at"] == "2023-11-14T22:03:19.75Z"
    assert items[0]["container"]["priority"] == 562948375092493200
    assert items[3]["instance_types"][0]["GPU"] == {"Stack": "cuda", "DriverVersion": "12.0",
                                                    "HardwareTarget": "7.5", "DeviceCount": 1, "VRAM": 16 * d.GiB}
    assert items[3]["instance_resources"]["GPUs"] == 1
    assert items[2]["scheduling_status"] == "waiting for new instance to be ready"


def test_one_container(api):
    r = api.get(P + "/container", params={"container_uuid": d.CTR_QUEUED})
    assert r.status_code == 200
    assert set(r.json()) == CONTAINER_KEYS and r.json()["container"]["uuid"] == d.CTR_QUEUED
    assert_error(api.get(P + "/container", params={"container_uuid": "zzzzz-dz642-nosuchcontainer"}),
                 404, "container not found")
    assert_error(api.get(P + "/container"), 404, "container not found")


def test_kill_container(api):
    assert_error(api.post(P + "/containers/kill"), 400, "container_uuid parameter not provided")
    # queued but not on an instance: 404, as in Arvados
    assert_error(api.post(P + "/containers/kill", params={"container_uuid": d.CTR_QUEUED}), 404, "container not found")
    r = api.post(P + "/containers/kill", data={"container_uuid": d.CTR_RUNNING_1, "reason": "user asked"})
    assert r.status_code == 200 and r.text == ""
    assert api.backend.calls == [("kill_container", d.CTR_RUNNING_1, "via management API: user asked")]


# -- errors ---------------------------------------------------------------------------------------

def test_wrong_method_and_unknown_path_are_json(api):
    r = api.get(P + "/instances/hold?instance_id=i-0001")
    assert r.status_code == 405 and r.headers["Content-Type"].startswith("application/json")
    assert "not allowed" in r.json()["errors"][0]
    assert api.post(P + "/instances").status_code == 405
    r = api.get("/arvados/v1/dispatch/nothing")
    assert r.status_code == 404 and r.headers["Content-Type"].startswith("application/json")
    assert r.json()["errors"] == ["not found: /arvados/v1/dispatch/nothing"]
    assert "<html" not in r.text.lower()


def test_busy_backend_is_503(api):
    api.backend.busy = True
    for path in ("/instances/hold?instance_id=i-0001", "/instances/kill?instance_id=i-0001",
                 "/containers/kill?container_uuid=" + d.CTR_RUNNING_1):
        assert_error(api.post(P + path), 503, "dispatcher is busy, try again")


class _Broken(SnapshotBackend):
    def snapshot(self):
        raise RuntimeError("secret internals")


def test_unexpected_error_is_logged_json_500(caplog):
    a = Api(d.cluster(), _Broken(d.snapshot()))
    try:
        with caplog.at_level(logging.ERROR, logger="api.app"):
            r = a.get(P + "/instances")
        assert_error(r, 500, "internal server error")
        assert "secret" not in r.text and "Traceback" not in r.text
        rec = [x for x in caplog.records if x.name == "api.app"]
        assert rec and rec[0].path == P + "/instances" and rec[0].exc_info
    finally:
        a.server.stop()


# -- health and metrics ---------------------------------------------------------------------------

def test_health(api):
    r = api.get("/_health/ping")
    assert r.status_code == 200 and r.json() == {"health": "OK"}
    api.backend.health_error = "error loading runner binary: no such file"
    assert api.get("/_health/ping").json() == {"health": "ERROR",
                                               "error": "error loading runner binary: no such file"}
    assert api.get("/_health/other").status_code == 404


def test_health_dispatch_says_standby(api):
    assert api.get("/_health/dispatch").json() == {"health": "OK"}
    api.backend.standby_reason = "waiting for the dispatch lock held by 127.0.0.1:5555"
    assert api.get("/_health/dispatch").json() == {
        "health": "ERROR", "error": "standby: waiting for the dispatch lock held by 127.0.0.1:5555"}
    assert api.get("/_health/ping").json() == {"health": "OK"}  # the process itself is fine


def test_metrics_routes(api):
    for path in ("/metrics", "/metrics.json"):
        r = api.get(path)
        assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain")
        assert "arvados_dispatchcloud_instances_total" in r.text


# -- the server -----------------------------------------------------------------------------------

def test_server_listens_on_each_url_and_stops_idempotently():
    app = make_app(d.cluster(), SnapshotBackend(d.snapshot()), DispatchMetrics(d.cluster()))
    srv = ApiServer(app, ["http://127.0.0.1:0", "http://localhost:0"], loopback_only=True).start()
    urls = srv.urls
    assert len(urls) == 2
    for url in urls:
        assert requests.get(url + P + "/instances", headers=AUTH, timeout=10).status_code == 200
    srv.stop()
    srv.stop()
    for url in urls:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        with pytest.raises(OSError):
            socket.create_connection((host, int(port)), timeout=2).close()


def test_server_rejects_bad_urls():
    app = make_app(d.cluster(), SnapshotBackend(), DispatchMetrics(d.cluster()))
    with pytest.raises(ValueError, match="not a loopback"):
        ApiServer(app, ["http://10.0.0.1:9006"], loopback_only=True)
    with pytest.raises(ValueError, match="https://127.0.0.1:9006"):
        ApiServer(app, ["https://127.0.0.1:9006"])
    with pytest.raises(ValueError, match="InternalURLs"):
        ApiServer(app, [])


def test_server_port_in_use_names_the_url():
    app = make_app(d.cluster(), SnapshotBackend(), DispatchMetrics(d.cluster()))
    with ApiServer(app, ["http://127.0.0.1:0"]) as first:
        url = first.urls[0]
        with pytest.raises(OSError, match=re.escape(url)):
            ApiServer(app, [url]).start()


@pytest.mark.parametrize("ts,text", [
    (0, "0001-01-01T00:00:00Z"), (-1, "0001-01-01T00:00:00Z"),
    (1_700_000_000, "2023-11-14T22:13:20Z"), (1_700_000_000.5, "2023-11-14T22:13:20.5Z"),
    (1_578_928_821.775019, "2020-01-13T15:20:21.775019Z"),
])
def test_rfc3339(ts, text):
    assert rfc3339(ts) == text


def test_items_renderer_caches_per_snapshot_and_per_item():
    import dataclasses
    import json

    from api.app import ItemsRenderer, instance_json

    rendered = []

    def item_json(v):
        rendered.append(v.instance)
        return instance_json(v)

    r = ItemsRenderer(lambda s: s.instances, item_json)
    snap = d.snapshot()
    body = r.body(snap)
    assert r.body(snap) is body and len(rendered) == len(d.INSTANCES)
    changed = dataclasses.replace(d.INSTANCES[1], idle_behavior="drain")
    snap2 = dataclasses.replace(snap, instances=(d.INSTANCES[0], changed) + d.INSTANCES[2:])
    items = json.loads(r.body(snap2))["items"]
    assert rendered[len(d.INSTANCES):] == [changed.instance]  # only the new object is re-rendered
    assert items[1]["idle_behavior"] == "drain" and items[0] == json.loads(body)["items"][0]
