"""One dispatcher per cluster, end to end: two real `dispatch-cloud run` processes on one config
with a real PostgreSQL server holding Arvados' dispatch lock. Only one dispatches; SIGKILL it and
the standby takes over and adopts its VMs and containers; the database going away stops the
holder dispatching until it can take the lock again. Local-driver VMs (process trees with their
own SSH servers, which outlive a dispatcher) on loopback; bounded polling, no fixed sleeps."""

from __future__ import annotations

import os
import signal
import time

import pytest
import requests
import yaml

from actors.devmode import CLUSTER_ID, ensure_state, shutdown_vms
from api.arvados.client import ArvadosClient
from conf.loader import load
from tests import pgserver
from tests.dispatcher_proc import LoopbackApi, RunProcess
from tests.promtext import samples
from tests.util import free_port, wait_for

STANDBY = ("arvados_dispatchcloud_standby", ())


class Proc(RunProcess):
    """One of the two dispatchers: its own InternalURL and state directory."""

    def __init__(self, name, url, cfg, tmp, token):
        self.name, self.url, self.token = name, url, token
        super().__init__(cfg, tmp / f"{name}.log", state=tmp / f"state-{name}",
                         env={"ARVADOS_SERVICE_INTERNAL_URL": url})

    def get(self, path):
        try:
            return requests.get(self.url + path, headers={"Authorization": f"Bearer {self.token}"}, timeout=5)
        except requests.ConnectionError:
            return None

    def role(self) -> str:
        """"active", "standby: <why>", or "" while not answering."""
        r = self.get("/_health/dispatch")
        if r is None or r.status_code != 200:
            return ""
        body = r.json()
        return "active" if body["health"] == "OK" else body["error"]

    def standby_metric(self) -> float:
        return samples(self.get("/metrics").text)[STANDBY]

    def instances(self) -> set[str]:
        return {x["instance"] for x in self.get("/arvados/v1/dispatch/instances").json()["items"]}

    def said(self, msg) -> list[dict]:
        return [r for r in self.records() if r["msg"] == msg]


@pytest.fixture
def cluster_setup(tmp_path):
    if pgserver.binaries() is None:
        pytest.skip("PostgreSQL not installed (make sysdeps installs Debian's postgresql)")
    pg = pgserver.PgServer().start()
    cfg = ensure_state(tmp_path / "dev")  # the dev cluster's config: local driver, keys, runner
    doc = yaml.safe_load(cfg.read_text())
    c = doc["Clusters"][CLUSTER_ID]
    api = LoopbackApi(c["SystemRootToken"], tmp_path / "c.db", cluster_id=CLUSTER_ID)
    urls = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]
    c["Services"]["Controller"]["ExternalURL"] = api.url
    c["Services"]["DispatchCloud"]["InternalURLs"] = {u: {} for u in urls}
    c["PostgreSQL"] = {"Connection": pg.connection}
    vms = c["Containers"]["CloudVMs"]
    vms["DriverParameters"].update(AddressBase="127.0.%d.2" % (10 + (os.getpid() + 77) % 200), BootDelay="1s")
    vms.update(SSHPort=str(free_port()), TimeoutIdle="60s", ProbeInterval="1s", SyncInterval="2s",
               PollInterval="1s", MaxInstances=2)
    cfg.write_text(yaml.safe_dump(doc))
    procs: list[Proc] = []

    def start(name, url):
        p = Proc(name, url, cfg, tmp_path, c["ManagementToken"])
        procs.append(p)
        return p

    try:
        yield pg, start, urls, ArvadosClient(api.url, c["SystemRootToken"])
    finally:
        for p in procs:
            p.stop(signal.SIGKILL)
        shutdown_vms(load(str(cfg)))
        api.close()
        pg.close()


def submit(client, *cmd):
    return client.create_container({"command": list(cmd), "container_image": "img", "cwd": "/",
                                    "output_path": "/out", "priority": 1,
                                    "runtime_constraints": {"vcpus": 1, "ram": 256 << 20}})["uuid"]


def test_one_dispatches_the_standby_takes_over_and_db_loss_stops_dispatching(cluster_setup):
    pg, start, urls, client = cluster_setup
    a = start("a", urls[0])
    wait_for(lambda: a.role() == "active", 30, "a to take the lock")
    b = start("b", urls[1])
    wait_for(lambda: b.role().startswith("standby: waiting for the dispatch lock held by 127.0.0.1:"), 30,
             "b to wait as a standby")
    assert (a.standby_metric(), b.standby_metric()) == (0, 1)
    assert b.get("/arvados/v1/dispatch/instances").json()["items"] == []
    assert b.get("/_health/ping").json() == {"health": "OK"}

    long = submit(client, "sh", "-c", "sleep 6; echo done")
    short = submit(client, "true")
    wait_for(lambda: client.get_container(short)["state"] == "Complete"
             and client.get_container(long)["state"] == "Running", 60, "a to run both containers")
    vms = a.instances()
    assert vms and b.said("creating new instance") == [] and a.said("creating new instance")
    # Go logs the holder once, not on every retry
    [waiting] = b.said("waiting for other process to release lock")
    assert waiting["DBClient"].startswith("127.0.0.1:")

    a.stop(signal.SIGKILL)
    t0 = time.monotonic()
    wait_for(lambda: b.role() == "active", 30, "b to take over")
    took = time.monotonic() - t0
    print(f"failover after SIGKILL: {took:.1f} s")
    assert took < 15, took
    # b adopts a's VMs (found by their tags) and the container running on one of them
    wait_for(lambda: b.instances() >= vms, 30, "b to list a's instances")
    wait_for(lambda: client.get_container(long)["state"] == "Complete", 60, "the long container to finish")
    assert client.get_container(long)["exit_code"] == 0
    assert b.said("creating new instance") == []
    assert b.standby_metric() == 0

    # the database goes away: b stops dispatching at once, and says so
    pg.stop()
    wait_for(lambda: b.role().startswith("standby:"), 15, "b to notice the lost lock")
    assert b.standby_metric() == 1
    assert b.said("lost the dispatch lock: stopped dispatching")
    queued = submit(client, "true")
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:  # a full poll cycle and more: nothing takes it
        assert client.get_container(queued)["state"] == "Queued"
        time.sleep(0.5)
    # the database is back: b takes the lock again and dispatches
    pg.start()
    wait_for(lambda: b.role() == "active", 30, "b to take the lock again")
    wait_for(lambda: client.get_container(queued)["state"] == "Complete", 60, "the queued container to run")
    b.stop()
    assert b.proc.returncode == 0
    assert "Traceback" not in b.log.read_text()
