"""A real Prometheus server (Debian's ``prometheus``) scrapes a running ``dispatch-cloud run`` over
HTTP with the ManagementToken every second while containers queue, instances boot, run and shut
down; then the queries of the Grafana dashboard Arvados ships (``arvados_overview.json``) must all
return data, as they do against the Go dispatcher."""

from __future__ import annotations

import math
import shutil
import subprocess

import pytest
import requests
import yaml

from api.arvados.client import ArvadosClient
from tests.test_metrics import GO_METRICS
from tests.dispatcher_proc import LoopbackApi, RunProcess, stub_site
from tests.util import free_port, stop_process, wait_for

TOKEN = "systemroot" + "p" * 30
MGMT = "management" + "q" * 30
NS = "arvados_dispatchcloud_"

# The dispatcher panels of Arvados' tools/salt-install/.../dashboards/arvados_overview.json.
DASHBOARD = [
    "arvados_dispatchcloud_boot_outcomes{}",
    "arvados_dispatchcloud_containers_allocated_not_started{}",
    "arvados_dispatchcloud_containers_longest_wait_time_seconds{}",
    "arvados_dispatchcloud_containers_not_allocated_over_quota{}",
    "arvados_dispatchcloud_containers_running{}",
    "arvados_dispatchcloud_instances_disappeared{}",
    "arvados_dispatchcloud_instances_price{}",
    "arvados_dispatchcloud_instances_total{}",
    "arvados_dispatchcloud_queue_entries{}",
    "delta(arvados_dispatchcloud_instances_run_probe_duration_seconds_count{}[1m])",
    "sum(arvados_dispatchcloud_instances_price{})",
]
# Ratios that are only meaningful (not NaN) once their summary has counted something.
RATIOS = [f"rate({NS}{m}_sum{{}}[10m]) / rate({NS}{m}_count{{}}[10m])" for m in (
    "containers_time_from_queue_to_crunch_run_seconds", "instances_run_probe_duration_seconds",
    "instances_time_from_shutdown_request_to_disappearance_seconds",
    "instances_time_to_ready_for_container_seconds", "instances_time_to_ssh_seconds")]


def query(prom: str, expr: str) -> list[dict]:
    r = requests.get(prom + "/api/v1/query", params={"query": expr}, timeout=10)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "success", body
    return body["data"]["result"]


def finite(result: list[dict]) -> bool:
    return bool(result) and all(math.isfinite(float(x["value"][1])) for x in result)


def test_prometheus_scrapes_the_dispatcher_and_the_dashboard_has_data(tmp_path):
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip("prometheus not installed (make sysdeps installs Debian's prometheus)")
    api = LoopbackApi(TOKEN, tmp_path / "c.db")
    mgmt_port = free_port()
    cfg = tmp_path / "config.yml"
    cfg.write_text(yaml.safe_dump(stub_site(api.url, f"http://127.0.0.1:{mgmt_port}", TOKEN, MGMT,
                                            SyncInterval="1s", TimeoutIdle="2s")))
    prom_port = free_port()
    prom = f"http://127.0.0.1:{prom_port}"
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{
            "job_name": "arvados-dispatch-cloud",
            "authorization": {"type": "Bearer", "credentials": MGMT},
            "static_configs": [{"targets": [f"127.0.0.1:{mgmt_port}"]}]}]}))
    dispatcher, prom_proc = RunProcess(cfg, tmp_path / "run.log"), None
    try:
        prom_proc = subprocess.Popen(
            [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "wb"))

        def up():
            try:
                return [x for x in query(prom, "up") if x["value"][1] == "1"]
            except requests.ConnectionError:
                return []
        [target] = wait_for(up, 30, "Prometheus to scrape the dispatcher", interval=0.5)
        assert target["metric"]["job"] == "arvados-dispatch-cloud"

        # work for the dispatcher, after the first scrape, so every summary's count rises under watch
        client = ArvadosClient(api.url, TOKEN)
        base = {"command": ["true"], "container_image": "img", "cwd": "/", "output_path": "/out", "priority": 1}
        uuids = [client.create_container({**base, "runtime_constraints": {"vcpus": v, "ram": 256 << 20}})["uuid"]
                 for v in (1, 1, 3)]
        wait_for(lambda: all(client.get_container(u)["state"] == "Complete" for u in uuids), 60,
                 "the containers to finish", interval=0.5)
        # instances go after TimeoutIdle; the shutdown-to-disappearance ratio then has data too
        for expr in RATIOS:
            wait_for(lambda: finite(query(prom, expr)), 30, f"data for {expr}", interval=0.5)

        for expr in DASHBOARD:
            assert query(prom, expr), f"no data for {expr}"
        for name, (typ, _, _) in GO_METRICS.items():
            series = query(prom, NS + name + ("_count" if typ == "summary" else ""))
            assert series, f"no data for {name}"
        # what the dashboard's panels show after this run
        # the queue is empty: its series stay, at 0, not dropped ("No data")
        entries = query(prom, NS + "queue_entries")
        assert entries and all(x["value"][1] == "0" for x in entries)
        assert float(query(prom, f"max_over_time(sum({NS}queue_entries)[1m:1s])")[0]["value"][1]) > 0
        ok = {x["metric"]["outcome"]: float(x["value"][1]) for x in query(prom, NS + "boot_outcomes")}
        assert ok["success"] >= 2 and set(ok) == {"success", "failure", "aborted", "disappeared"}
        creates = query(prom, NS + 'driver_operations{operation="Create",error="0"}')
        assert float(creates[0]["value"][1]) >= 2
        wait_for(lambda: query(prom, f"sum({NS}instances_price)")[0]["value"][1] == "0", 30,
                 "every idle instance to be shut down", interval=0.5)
        assert query(prom, f'max_over_time(sum({NS}instances_price)[1m:1s])')[0]["value"][1] != "0"
        assert query(prom, NS + "standby")[0]["value"][1] == "0"
        # and no scrape failed along the way
        assert query(prom, 'min_over_time(up[1m])')[0]["value"][1] == "1"
    finally:
        stop_process(prom_proc)
        dispatcher.stop()
        api.close()
