"""The management API served from the real actor system: a Simulation (real actors, FakeClock, stub
cloud, SQLite container API) behind ApiServer on 127.0.0.1:0, with ``sim.dispatcher.backend()``.

tests/test_api.py covers the HTTP layer over a fake backend; these tests prove the wiring: what an
operator sees and does over HTTP is what the actors did and do. HTTP calls happen between steps, while
no step runs (the actors answer asks on their own threads); simulated time moves only with step().
"""

from __future__ import annotations

import logging
import subprocess
import threading
from datetime import datetime

import pytest
import requests

from actors.service import ActorBackend
from actors.sim import START, Simulation
from api.app import make_app
from api.server import ApiServer
from tests import promtext
from tests.dispatcher_proc import dispatch_cli
from tests.simcluster import GiB, cluster, with_vms
from tests.util import closing_each

P = "/arvados/v1/dispatch"
INSTANCE_KEYS = {"instance", "address", "price", "arvados_instance_type", "provider_instance_type",
                 "last_container_uuid", "last_busy", "running_container_uuids", "worker_state", "idle_behavior"}
CONTAINER_KEYS = {"container", "instance_type", "instance_types", "instance_resources", "first_seen_at",
                  "scheduling_status"}
SMALL = {"vcpus": 1, "ram": 256 << 20}
BOOTING = "Waiting for a type1 instance to boot and be ready to accept work."
AT_LIMITS = "Waiting in queue at position {}.  Cluster is at cloud account limits and cannot start any new instances right now."
AT_CAPACITY = "Waiting in queue at position {}.  Cluster is at capacity and cannot start any new instances right now."


def stub(**kw) -> dict:
    return {"BootTime": "10s", "BootTimeJitter": "0s", "ContainerRunTime": "1000s", **kw}


class Live:
    """A started Simulation whose dispatcher is served over real HTTP; ``close()`` stops both."""

    def __init__(self, c, *, before_start=None, timeout: float | None = None):
        self.cluster = c
        self.sim = Simulation(c, runtime="threads")  # API threads ask the actors
        if before_start is not None:
            before_start(self.sim)
        self.sim.start()
        self.server = None
        try:
            backend = self.sim.dispatcher.backend() if timeout is None else ActorBackend(self.sim.dispatcher, timeout)
            self.server = ApiServer(make_app(c, backend, self.sim.metrics), ["http://127.0.0.1:0"],
                                    loopback_only=True).start()
        except BaseException:
            self.sim.stop()
            raise
        self.url = self.server.urls[0]
        self.http = requests.Session()
        self.http.headers["Authorization"] = "Bearer " + c.management_token

    def close(self) -> None:
        try:
            self.http.close()
            self.server.stop()
        finally:
            self.sim.stop()

    # -- HTTP --------------------------------------------------------------------------------------

    def get(self, path, **kw) -> requests.Response:
        return self.http.get(self.url + path, timeout=10, **kw)

    def post(self, path, **kw) -> requests.Response:
        return self.http.post(self.url + path, timeout=10, **kw)

    def instances(self) -> list[dict]:
        r = self.get(P + "/instances")
        assert r.status_code == 200, r.text
        return r.json()["items"]

    def instance(self, iid: str) -> dict | None:
        return next((i for i in self.instances() if i["instance"] == iid), None)

    def queue(self) -> list[dict]:
        r = self.get(P + "/containers")
        assert r.status_code == 200, r.text
        return r.json()["items"]

    def entry(self, uuid: str) -> dict | None:
        return next((e for e in self.queue() if e["container"]["uuid"] == uuid), None)

    def act(self, what: str, **params) -> requests.Response:
        return self.post(P + "/" + what, params=params)

    def metrics(self) -> dict[tuple, float]:
        """{(sample name, sorted label items): value} from a real scrape, names as written."""
        r = self.get("/metrics")
        assert r.status_code == 200, r.text
        return promtext.samples(r.text)

    # -- the simulation's own records (the truth the API is checked against) -----------------------

    def state(self, uuid: str) -> dict:
        return next(c for c in self.sim.containers() if c["uuid"] == uuid)

    def wait(self, cond, max_seconds: float, step: float = 1.0) -> float:
        return self.sim.run_until(cond, max_seconds, step)


@pytest.fixture
def live():
    with closing_each(Live) as make:
        yield make


def at(ts: str) -> float:
    """An RFC 3339 time from the API as unix seconds."""
    return datetime.fromisoformat(ts).timestamp()


def assert_error(r: requests.Response, status: int, message: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["Content-Type"].startswith("application/json")
    assert r.json() == {"errors": [message]}


def ok_empty(r: requests.Response) -> None:
    assert (r.status_code, r.text) == (200, ""), r.text


# -- reading ---------------------------------------------------------------------------------------

def test_queue_and_instances_show_what_the_actors_did(live):
    lv = live(with_vms(cluster(types=(1, 2), driver_parameters=stub()), max_instances=1))
    a = lv.sim.submit(runtime_constraints=SMALL, priority=3)
    b = lv.sim.submit(runtime_constraints=SMALL, priority=2)
    big = lv.sim.submit(runtime_constraints={"vcpus": 2, "ram": 256 << 20}, priority=1)
    # before the first queue poll and cloud listing: empty lists, not null
    assert lv.queue() == [] and lv.instances() == []
    lv.wait(lambda: len(lv.queue()) == 3, 30)
    t_seen = lv.sim.now
    lv.wait(lambda: lv.instances() and lv.instances()[0]["instance"], 30)

    items = lv.queue()
    assert all(set(e) == CONTAINER_KEYS for e in items)
    assert [(e["container"]["uuid"], e["container"]["state"], e["scheduling_status"]) for e in items] == [
        (a, "Locked", BOOTING), (b, "Queued", AT_LIMITS.format(1)), (big, "Queued", AT_LIMITS.format(2))]
    by = {e["container"]["uuid"]: e for e in items}
    assert by[a]["instance_type"]["Name"] == "type1" and by[big]["instance_type"]["Name"] == "type2"
    assert [t["ProviderType"] for t in by[big]["instance_types"]] == ["providertype2"]
    assert by[big]["instance_resources"]["VCPUs"] == 2
    for e in items:
        assert START < at(e["first_seen_at"]) <= t_seen
        assert e["container"]["priority"] == lv.state(e["container"]["uuid"])["priority"]
    # one entry by uuid is exactly its list item
    r = lv.get(P + "/container", params={"container_uuid": b})
    assert r.status_code == 200 and r.json() == by[b]

    (inst,) = lv.instances()
    vm = lv.sim.cloud.vm(inst["instance"])
    assert set(inst) == INSTANCE_KEYS
    assert inst == {**inst, "address": vm.address, "price": 0.123, "arvados_instance_type": "type1",
                    "provider_instance_type": "providertype1", "last_container_uuid": "",
                    "running_container_uuids": [], "worker_state": "booting", "idle_behavior": "run"}

    lv.wait(lambda: lv.state(a)["state"] == "Running", 60)
    lv.sim.step(lv.cluster.cloud_vms.probe_interval)  # the next probe reports it
    (inst,) = lv.instances()
    assert (inst["worker_state"], inst["running_container_uuids"], inst["last_container_uuid"]) == (
        "running", [a], a)
    assert START < at(inst["last_busy"]) <= lv.sim.now
    assert lv.entry(a)["scheduling_status"] == "" and lv.entry(a)["container"]["state"] == "Running"


def test_go_management_api_containers_scenario(live):
    """Arvados' TestManagementAPI_Containers, over HTTP against the real actors: quota 4, capacity
    errors for type4 and up, 20 containers; the statuses settle to exactly the Go test's summary."""
    c = with_vms(cluster(types=(1, 2, 3, 4, 6, 8, 16), driver_parameters=stub(
        QuotaMaxInstances=4, CapacityErrorTypes=["providertype4", "providertype6", "providertype8"])),
        initial_quota_estimate=4)
    lv = live(c)
    uuids = [lv.sim.submit(priority=100 - i, runtime_constraints={"vcpus": i % 8 + 1, "ram": (i % 3 + 1) * GiB})
             for i in range(20)]
    want = [(uuids[i], "Running", "") for i in range(3)]
    want.append((uuids[3], "Locked", "Waiting in queue at position 1.  Cluster is at capacity for all "
                 "eligible instance types (type4, type6) and cannot start a new instance right now."))
    want += [(uuids[i], "Queued", AT_CAPACITY.format(i - 2)) for i in range(4, 20)]

    def summary():
        return [(e["container"]["uuid"], e["container"]["state"], e["scheduling_status"]) for e in lv.queue()]

    lv.wait(lambda: summary() == want, 120, step=5)
    assert sum(1 for i in lv.instances() if i["running_container_uuids"]) == 3


# -- idle behavior ---------------------------------------------------------------------------------

def test_hold_run_and_drain_over_http(live):
    c = with_vms(cluster(types=(1,), driver_parameters=stub(ContainerRunTime="30s")), timeout_idle=60.0,
                 max_instances=1)
    lv = live(c)
    idle = c.cloud_vms.timeout_idle
    a = lv.sim.submit(runtime_constraints=SMALL)
    lv.wait(lambda: lv.state(a)["state"] == "Running", 60)
    (x,) = lv.instances()
    xid = x["instance"]

    # hold a busy instance: it finishes its container, then stays idle past TimeoutIdle, taking nothing
    ok_empty(lv.act("instances/hold", instance_id=xid))
    lv.sim.step(0)
    assert (lv.instance(xid)["worker_state"], lv.instance(xid)["idle_behavior"]) == ("running", "hold")
    b = lv.sim.submit(runtime_constraints=SMALL)
    lv.wait(lambda: lv.state(a)["state"] == "Complete", 60)
    lv.sim.step(idle * 3)  # a "run" instance would have gone after TimeoutIdle
    assert [(i["instance"], i["worker_state"], i["idle_behavior"], i["running_container_uuids"],
             i["last_container_uuid"]) for i in lv.instances()] == [(xid, "idle", "hold", [], a)]
    assert lv.sim.cloud.vm(xid).tags[c.tag("IdleBehavior")] == "hold"  # survives a restart
    assert (lv.state(b)["state"], lv.entry(b)["scheduling_status"]) == ("Queued", AT_LIMITS.format(1))

    # run on an instance idle for longer than TimeoutIdle: it is shut down at once (Arvados'
    # setIdleBehavior calls shutdownIfIdle), and b gets a new instance
    ok_empty(lv.act("instances/run", instance_id=xid))
    lv.sim.step(0)
    assert lv.instance(xid)["worker_state"] == "shutdown"
    lv.wait(lambda: lv.state(b)["state"] == "Running", 120)
    (y,) = lv.instances()
    yid = y["instance"]
    assert yid != xid and lv.sim.cloud.vm(xid) is None

    # hold, then run again within TimeoutIdle: the instance resumes and takes the next container
    ok_empty(lv.act("instances/hold", instance_id=yid))
    cc = lv.sim.submit(runtime_constraints=SMALL)
    lv.wait(lambda: lv.state(b)["state"] == "Complete", 60)
    lv.wait(lambda: lv.instance(yid)["worker_state"] == "idle", 30)
    lv.sim.step(10)
    assert lv.state(cc)["state"] == "Queued" and lv.instance(yid)["running_container_uuids"] == []
    ok_empty(lv.act("instances/run", instance_id=yid))
    lv.wait(lambda: lv.state(cc)["state"] == "Running", 30)
    lv.sim.step(c.cloud_vms.probe_interval)
    assert [(i["instance"], i["idle_behavior"], i["running_container_uuids"]) for i in lv.instances()] == [
        (yid, "run", [cc])]
    assert lv.sim.cloud.vm(yid).tags[c.tag("IdleBehavior")] == "run"

    # drain a busy instance: it stays until its container ends, then goes
    ok_empty(lv.act("instances/drain", instance_id=yid))
    lv.sim.step(1)
    assert (lv.instance(yid)["worker_state"], lv.instance(yid)["idle_behavior"]) == ("running", "drain")
    lv.wait(lambda: lv.state(cc)["state"] == "Complete", 60)
    lv.wait(lambda: lv.instance(yid) is None, 30)
    assert lv.sim.cloud.vm(yid) is None

    # drain an idle instance: shut down at once, long before TimeoutIdle
    d = lv.sim.submit(runtime_constraints=SMALL)
    lv.wait(lambda: lv.state(d)["state"] == "Complete", 120)
    (z,) = lv.instances()
    lv.wait(lambda: lv.instance(z["instance"])["worker_state"] == "idle", 30)
    t_idle = lv.sim.now
    ok_empty(lv.act("instances/drain", instance_id=z["instance"]))
    lv.sim.step(0)
    assert lv.instance(z["instance"])["worker_state"] == "shutdown"
    lv.wait(lambda: lv.instances() == [], 30)
    assert lv.sim.now - t_idle < idle / 2


# -- killing ---------------------------------------------------------------------------------------

def test_kill_instance_running_a_container(live, caplog):
    c = cluster(types=(1,), driver_parameters=stub())
    lv = live(c)
    a = lv.sim.submit(runtime_constraints=SMALL)
    lv.wait(lambda: lv.state(a)["state"] == "Running", 60)
    (x,) = lv.instances()
    caplog.set_level(logging.INFO)
    ok_empty(lv.act("instances/kill", instance_id=x["instance"], reason="bad disk"))
    lv.sim.step(0)
    assert lv.instance(x["instance"])["worker_state"] == "shutdown"
    assert any(getattr(r, "Reason", None) == "via management API: bad disk" and r.msg == "shutting down"
               for r in caplog.records)
    # the VM goes; crunch-run died with it (its attempt counts as ended when the instance vanished);
    # the dispatcher cancels the orphaned Running container rather than re-running it
    lv.wait(lambda: lv.instance(x["instance"]) is None, 30)
    assert lv.sim.cloud.vm(x["instance"]) is None
    lv.wait(lambda: lv.state(a)["state"] == "Cancelled", 30)
    assert lv.state(a)["lock_count"] == 1
    assert any(getattr(r, "ContainerUUID", None) == a
               and getattr(r, "Reason", None) == "state=Running after crunch-run exited"
               for r in caplog.records)
    lv.sim.step(30)
    assert lv.instances() == [] and lv.sim.cloud.vms == []
    m = lv.metrics()
    assert m[("arvados_dispatchcloud_boot_outcomes", (("outcome", "success"),))] == 1
    assert m[("arvados_dispatchcloud_boot_outcomes", (("outcome", "aborted"),))] == 0


def test_kill_booting_instance_keeps_the_lock_and_boots_another(live):
    c = cluster(types=(1,), driver_parameters=stub(BootTime="30s"))
    lv = live(c)
    a = lv.sim.submit(runtime_constraints=SMALL)
    lv.wait(lambda: lv.state(a)["state"] == "Locked" and lv.instances() and lv.instances()[0]["instance"], 30)
    (x,) = lv.instances()
    assert x["worker_state"] == "booting"
    ok_empty(lv.act("instances/kill", instance_id=x["instance"]))
    lv.sim.step(0)
    assert lv.instance(x["instance"])["worker_state"] == "shutdown"
    lv.wait(lambda: lv.state(a)["state"] == "Running", 120)
    lv.sim.step(c.cloud_vms.probe_interval)
    (y,) = lv.instances()
    assert y["instance"] != x["instance"] and y["running_container_uuids"] == [a]
    assert lv.sim.cloud.vm(x["instance"]) is None
    # the Locked container kept its lock and waited for a new instance: never requeued (Arvados:
    # sync leaves a Locked container with priority > 0 alone; runQueue creates an instance for it)
    assert lv.state(a)["lock_count"] == 1
    m = lv.metrics()
    assert m[("arvados_dispatchcloud_boot_outcomes", (("outcome", "aborted"),))] == 1
    assert m[("arvados_dispatchcloud_boot_outcomes", (("outcome", "success"),))] == 1


def test_instance_booting_longer_than_timeout_idle_still_gets_its_container(live):
    """Found here: with ``busy`` left at the appearance time, a worker ready more than TimeoutIdle after
    it appeared was shut down the instant it was ready, before the scheduler could start the container,
    and every replacement went the same way (fixed in actors/worker.py c25f551)."""
    c = cluster(types=(1,), driver_parameters=stub(BootTime="65s", ContainerRunTime="10s"))
    assert c.cloud_vms.timeout_idle == 60
    lv = live(c)
    a = lv.sim.submit(runtime_constraints=SMALL)
    lv.wait(lambda: lv.state(a)["state"] == "Complete", 200, step=5)
    m = lv.metrics()
    assert m[("arvados_dispatchcloud_driver_operations", (("error", "0"), ("operation", "Create")))] == 1


def test_kill_container_over_http(live, caplog):
    c = with_vms(cluster(types=(1,), driver_parameters=stub()), max_instances=1)
    lv = live(c)
    a = lv.sim.submit(runtime_constraints=SMALL, priority=2)
    b = lv.sim.submit(runtime_constraints=SMALL, priority=1)
    lv.wait(lambda: lv.state(a)["state"] == "Running", 60)
    lv.sim.step(c.cloud_vms.probe_interval)
    # no runner anywhere: 404, as Arvados (a queued container cannot be killed from here)
    assert_error(lv.act("containers/kill", container_uuid=b), 404, "container not found")
    caplog.set_level(logging.INFO)
    ok_empty(lv.act("containers/kill", container_uuid=a, reason="operator"))
    # the scheduler answered; the worker acts on its own mailbox, so the log line may follow
    lv.wait(lambda: any(getattr(r, "Reason", None) == "via management API: operator"
                        and r.msg == "killing crunch-run process" for r in caplog.records), 5)  # raises if not
    lv.wait(lambda: lv.state(a)["state"] == "Cancelled", 30)
    lv.sim.step(c.cloud_vms.probe_interval)
    assert_error(lv.act("containers/kill", container_uuid=a), 404, "container not found")
    # the instance is free again and b runs on it
    lv.wait(lambda: lv.state(b)["state"] == "Running", 60)
    lv.sim.step(c.cloud_vms.probe_interval)
    (x,) = lv.instances()
    assert x["running_container_uuids"] == [b]


# -- errors and auth -------------------------------------------------------------------------------

def test_errors_and_auth_against_the_live_app(live):
    lv = live(cluster(types=(1,), driver_parameters=stub()))
    a = lv.sim.submit(runtime_constraints=SMALL)
    lv.wait(lambda: lv.instances() and lv.instances()[0]["instance"], 30)
    for action in ("hold", "drain", "run"):
        assert_error(lv.act(f"instances/{action}", instance_id="inst404,providertype1"), 404,
                     "requested instance does not exist")
        assert_error(lv.act(f"instances/{action}"), 400, "instance_id parameter not provided")
    assert_error(lv.act("instances/kill", instance_id="inst404"), 404, "instance not found")
    assert_error(lv.act("instances/kill"), 400, "instance_id parameter not provided")
    assert_error(lv.act("containers/kill", container_uuid="zzzzz-dz642-000000000000404"), 404, "container not found")
    assert_error(lv.act("containers/kill"), 400, "container_uuid parameter not provided")
    assert_error(lv.get(P + "/container", params={"container_uuid": "zzzzz-dz642-000000000000404"}), 404,
                 "container not found")
    assert_error(lv.get(P + "/container"), 404, "container not found")
    assert lv.get(P + "/container", params={"container_uuid": a}).status_code == 200
    r = lv.get("/_health/ping")
    assert (r.status_code, r.json()) == (200, {"health": "OK"})

    anon = requests.Session()
    try:
        for method, path in (("GET", P + "/instances"), ("GET", P + "/containers"), ("GET", "/metrics"),
                             ("POST", P + "/instances/kill?instance_id=" + lv.instances()[0]["instance"])):
            r = anon.request(method, lv.url + path, timeout=10)
            assert r.status_code == 401 and r.headers["Content-Type"].startswith("application/json"), r.text
            r = anon.request(method, lv.url + path, headers={"Authorization": "Bearer abc"}, timeout=10)
            assert_error(r, 403, "Forbidden: management token does not match")
        r = anon.get(lv.url + P + "/instances", params={"api_token": lv.cluster.management_token}, timeout=10)
        assert r.status_code == 200 and len(r.json()["items"]) == 1
    finally:
        anon.close()
    # the refused kill did nothing
    lv.sim.step(5)
    assert lv.instances()[0]["worker_state"] != "shutdown"


# -- metrics ---------------------------------------------------------------------------------------

class OpCounter:
    """Counts the cloud calls the stub really received, and how many failed."""

    def __init__(self, sim: Simulation):
        self.counts: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()
        cloud = sim.cloud
        for op, name in (("Create", "create"), ("List", "instances"), ("Destroy", "destroy"),
                         ("SetTags", "set_tags")):
            setattr(cloud, name, self._spy(op, getattr(cloud, name)))

    def _spy(self, op, fn):
        def call(*a, **kw):
            err = "1"
            try:
                out = fn(*a, **kw)
                err = "0"
                return out
            finally:
                with self._lock:
                    self.counts[op, err] = self.counts.get((op, err), 0) + 1
        return call

    def get(self, op, err) -> int:
        return self.counts.get((op, err), 0)


def test_metrics_scrape_matches_the_simulation(live):
    c = with_vms(cluster(types=(1, 2), driver_parameters=stub()), max_instances=2)
    ops: list[OpCounter] = []
    lv = live(c, before_start=lambda sim: ops.append(OpCounter(sim)))
    ops = ops[0]
    a = lv.sim.submit(runtime_constraints=SMALL, priority=3)
    b = lv.sim.submit(runtime_constraints={"vcpus": 2, "ram": 256 << 20}, priority=2)
    q = lv.sim.submit(runtime_constraints=SMALL, priority=1)
    lv.wait(lambda: all(lv.state(u)["state"] == "Running" for u in (a, b)), 120)
    lv.sim.step(c.cloud_vms.probe_interval)

    def g(name, **labels) -> float:
        return m[("arvados_dispatchcloud_" + name, tuple(sorted(labels.items())))]

    m = lv.metrics()
    assert g("instances_total", category="inuse", instance_type="type1") == 1
    assert g("instances_total", category="inuse", instance_type="type2") == 1
    assert sum(v for (n, _), v in m.items() if n == "arvados_dispatchcloud_instances_total") == 2
    assert g("instances_price", category="inuse") == pytest.approx(0.123 + 0.246)
    assert g("containers_running") == 2
    assert g("at_quota") == 1  # MaxInstances reached: q waits
    assert lv.entry(q)["scheduling_status"] == AT_LIMITS.format(1)
    assert g("queue_entries", state="Queued", instance_type="type1") == 1
    assert g("queue_entries", state="Running", instance_type="type2") == 1
    assert g("boot_outcomes", outcome="success") == 2
    assert sum(g("boot_outcomes", outcome=o) for o in ("failure", "aborted", "disappeared")) == 0

    # hold the type1 instance, then free it: it is "hold", q still cannot have it
    x = next(i for i in lv.instances() if i["arvados_instance_type"] == "type1")
    ok_empty(lv.act("instances/hold", instance_id=x["instance"]))
    ok_empty(lv.act("containers/kill", container_uuid=a))
    lv.wait(lambda: lv.state(a)["state"] == "Cancelled", 30)
    lv.sim.step(c.cloud_vms.probe_interval * 2)
    m = lv.metrics()
    assert g("instances_total", category="hold", instance_type="type1") == 1
    assert g("instances_total", category="inuse", instance_type="type1") == 0
    assert g("instances_price", category="hold") == pytest.approx(0.123)
    assert g("instances_price", category="inuse") == pytest.approx(0.246)
    assert g("containers_running") == 1
    assert lv.state(q)["state"] == "Queued"

    # drain the held one: it goes, the quota frees, q gets a new instance
    ok_empty(lv.act("instances/drain", instance_id=x["instance"]))
    lv.wait(lambda: lv.state(q)["state"] == "Running", 120)
    lv.sim.step(c.cloud_vms.probe_interval)
    m = lv.metrics()
    assert g("containers_running") == 2 and g("at_quota") == 1
    assert g("boot_outcomes", outcome="success") == 3
    for op in ("Create", "List", "Destroy", "SetTags"):
        for err in ("0", "1"):
            assert g("driver_operations", operation=op, error=err) == ops.get(op, err), (op, err)
    assert ops.get("Create", "0") == 3 and ops.get("Destroy", "0") == 1 and ops.get("List", "0") > 0
    assert ops.get("SetTags", "0") >= 2  # hold, then drain


# -- the admin CLI ---------------------------------------------------------------------------------

def cli(lv: Live, tmp_path, *args) -> subprocess.CompletedProcess:
    return dispatch_cli([*args, "--url", lv.url, "--token", lv.cluster.management_token], tmp_path / "state",
                        env={"ARVADOS_CONFIG": str(tmp_path / "absent.yml")})


def test_admin_cli_against_the_live_dispatcher(live, tmp_path):
    c = cluster(types=(1,), driver_parameters=stub())
    lv = live(c)
    a = lv.sim.submit(runtime_constraints=SMALL)
    lv.wait(lambda: lv.state(a)["state"] == "Running", 60)
    lv.sim.step(c.cloud_vms.probe_interval)
    (x,) = lv.instances()
    iid, addr = x["instance"], x["address"]

    r = cli(lv, tmp_path, "instance", "list")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"{iid}\t{addr}\trunning\trun\ttype1\tprovidertype1\t0.123000\t{a}"]
    r = cli(lv, tmp_path, "container", "list")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"{a}\tRunning\t1\ttype1\t-"]

    r = cli(lv, tmp_path, "instance", "hold", iid)
    assert r.returncode == 0 and r.stderr.startswith(f"{iid}: 200 OK"), r.stderr
    lv.sim.step(0)
    r = cli(lv, tmp_path, "instance", "list")
    assert r.stdout.split("\t")[2:4] == ["running", "hold"]

    r = cli(lv, tmp_path, "instance", "drain", iid, "inst404,providertype1")
    assert r.returncode == 1
    assert f"{iid}: 200 OK" in r.stderr and "inst404,providertype1: 404 Not Found" in r.stderr
    lv.sim.step(0)
    r = cli(lv, tmp_path, "instance", "list")
    assert r.stdout.split("\t")[2:4] == ["running", "drain"]  # busy: drained once its container ends
    lv.wait(lambda: lv.state(a)["state"] == "Complete", 1200, step=10)
    lv.wait(lambda: lv.instance(iid) is None, 30)
    r = cli(lv, tmp_path, "instance", "list")
    assert (r.returncode, r.stdout) == (0, "")


# -- an unresponsive or stopped dispatcher ---------------------------------------------------------

def test_busy_scheduler_is_a_json_503_and_reads_still_work(live, caplog):
    lv = live(cluster(types=(1,), driver_parameters=stub()), timeout=0.2)
    lv.sim.submit(runtime_constraints=SMALL)
    lv.wait(lambda: lv.instances() and lv.instances()[0]["instance"], 30)
    iid = lv.instances()[0]["instance"]

    gate = threading.Event()
    actor = lv.sim.dispatcher.scheduler._actor  # the actor object behind the proxy (pykka keeps it there)
    real_tick = actor.tick

    def stuck_tick(now):  # a pass that takes far longer than the API waits
        gate.wait(20)
        real_tick(now)

    actor.tick = stuck_tick
    lv.sim.dispatcher.scheduler.tick.defer(lv.sim.now)
    try:
        caplog.set_level(logging.WARNING, logger="api.app")
        r = lv.act("instances/hold", instance_id=iid)
        assert_error(r, 503, "dispatcher is busy, try again")
        assert "Traceback" not in r.text
        assert any(r.msg == "management API: dispatcher did not answer in time"
                   and getattr(r, "path", "") == P + "/instances/hold" for r in caplog.records)
        # reads come from the published snapshot and never wait on the actor
        assert lv.instances()[0]["instance"] == iid
        assert lv.metrics()[("arvados_dispatchcloud_instances_total",
                             (("category", "booting"), ("instance_type", "type1")))] == 1
    finally:
        gate.set()
        actor.tick = real_tick
    lv.sim.step(0)
    # the request stayed in the mailbox and was applied late: hold/drain/run are idempotent, so a retry is harmless
    assert lv.instance(iid)["idle_behavior"] == "hold"


def test_stopped_dispatcher_is_a_json_503(live):
    lv = live(cluster(types=(1,), driver_parameters=stub()))
    a = lv.sim.submit(runtime_constraints=SMALL)
    lv.wait(lambda: lv.state(a)["state"] == "Running", 60)
    iid = lv.instances()[0]["instance"]
    lv.sim.stop()
    for action, params in (("instances/hold", {"instance_id": iid}), ("instances/kill", {"instance_id": iid}),
                           ("containers/kill", {"container_uuid": a})):
        r = lv.act(action, **params)
        assert_error(r, 503, "dispatcher is stopping")
    assert lv.instances()[0]["instance"] == iid  # the last snapshot is still served
    assert lv.sim.cloud.vm(iid) is not None  # stopping never destroys a VM
