"""Metrics: snapshot gauges scraped over real HTTP, event metrics, windowed summaries, promtool."""

from __future__ import annotations

import logging
import math
import shutil
import subprocess

import pytest
import requests

from cloud.clock import FakeClock
from actors.snapshot import INSTANCE_CATEGORIES, WORKER_STATES, Snapshot
from api.app import make_app
from api.backend import SnapshotBackend
from api.metrics import DispatchMetrics, WindowedSummary, instance_category, quantile
from api.server import ApiServer
from cloud.base import InstrumentedInstanceSet
from tests import api_data as d
from tests.promtext import parse, samples

NS = "arvados_dispatchcloud_"




@pytest.fixture
def scrape():
    backend = SnapshotBackend(d.snapshot())
    metrics = DispatchMetrics(d.cluster(), clock=lambda: d.NOW)
    metrics.set_snapshot_source(backend.snapshot)
    server = ApiServer(make_app(d.cluster(), backend, metrics), ["http://127.0.0.1:0"], loopback_only=True).start()

    def get() -> str:
        r = requests.get(server.urls[0] + "/metrics", headers={"Authorization": "Bearer " + d.TOKEN}, timeout=10)
        assert r.status_code == 200
        return r.text

    get.metrics, get.backend = metrics, backend
    yield get
    server.stop()


def test_instances_by_category_and_type(scrape):
    s = samples(scrape())
    total = {(dict(k[1])["category"], dict(k[1])["instance_type"]): v
             for k, v in s.items() if k[0] == NS + "instances_total"}
    # every configured type x category is present, zero-filled
    assert set(total) == {(c, t) for c in INSTANCE_CATEGORIES for t in d.TYPES}
    nonzero = {k: v for k, v in total.items() if v}
    # i-0003 inuse; i-0001 idle; i-0005 hold; i-0002 booting; i-0004 unknown; i-0006 shutdown -> idle;
    # the pending create is not a worker yet
    assert nonzero == {("inuse", "small"): 1, ("idle", "small"): 2, ("hold", "big"): 1,
                       ("booting", "big"): 1, ("unknown", "gpu"): 1}
    price = {dict(k[1])["category"]: v for k, v in s.items() if k[0] == NS + "instances_price"}
    assert price == pytest.approx({"inuse": 0.096, "idle": 0.192, "hold": 0.252, "booting": 0.252,
                                   "unknown": 0.526})
    vcpus = {dict(k[1])["category"]: v for k, v in s.items() if k[0] == NS + "vcpus_total"}
    assert vcpus == {"inuse": 2, "idle": 4, "hold": 4, "booting": 4, "unknown": 4}
    mem = {dict(k[1])["category"]: v for k, v in s.items() if k[0] == NS + "memory_bytes_total"}
    assert mem["idle"] == 16 * d.GiB and mem["unknown"] == 28 * d.GiB


def test_scalar_gauges_follow_the_snapshot(scrape):
    s = samples(scrape())
    assert s[NS + "containers_running", ()] == 2
    # probe ages 20, 2, 4, 30, 60, 10 s; probed times ascending are ages 60,30,20,10,4,2 -> [6//2] = 10
    assert s[NS + "probe_age_seconds_max", ()] == 60
    assert s[NS + "probe_age_seconds_median", ()] == 10
    assert s[NS + "at_quota", ()] == 1
    assert s[NS + "max_concurrent_containers", ()] == 42
    assert s[NS + "containers_allocated_not_started", ()] == 1
    assert s[NS + "containers_not_allocated_over_quota", ()] == 2
    assert s[NS + "containers_longest_wait_time_seconds", ()] == 60
    assert s[NS + "last_503_time", ()] == d.NOW - 100
    q = {(dict(k[1])["state"], dict(k[1])["instance_type"]): v for k, v in s.items() if k[0] == NS + "queue_entries"}
    assert q == {("Running", "small"): 1, ("Locked", "small"): 1, ("Queued", "big"): 1, ("Queued", "gpu"): 1}

    scrape.backend.publish(Snapshot(at_quota=False, queue_entries={("Queued", "small"): 7}))
    s = samples(scrape())
    assert s[NS + "containers_running", ()] == 0 and s[NS + "at_quota", ()] == 0
    assert s[NS + "probe_age_seconds_max", ()] == 0
    assert s[NS + "queue_entries", (("instance_type", "small"), ("state", "Queued"))] == 7
    assert not any(v for k, v in s.items() if k[0] == NS + "instances_total")
    # series seen before stay, at 0, as Go keeps them (a dashboard shows 0, not "No data")
    q = {(dict(k[1])["state"], dict(k[1])["instance_type"]): v for k, v in s.items() if k[0] == NS + "queue_entries"}
    assert q == {("Running", "small"): 0, ("Locked", "small"): 0, ("Queued", "big"): 0, ("Queued", "gpu"): 0,
                 ("Queued", "small"): 7}
    scrape.backend.publish(Snapshot())
    s = samples(scrape())
    assert s[NS + "queue_entries", (("instance_type", "small"), ("state", "Queued"))] == 0


def test_no_per_instance_labels(scrape):
    text = scrape()
    ids = {v.instance for v in d.INSTANCES if v.instance}
    for (name, labels) in samples(text):
        assert not ids & {v for _, v in labels}, (name, labels)


def test_event_counters_precreated_and_usable_by_the_driver_wrapper(scrape):
    m = scrape.metrics
    s = samples(scrape())
    ops = {k: v for k, v in s.items() if k[0] == NS + "driver_operations"}
    assert len(ops) == 8 and not any(ops.values())
    assert {dict(k[1])["outcome"] for k in s if k[0] == NS + "boot_outcomes"} == {
        "failure", "success", "aborted", "disappeared"}
    assert {dict(k[1])["state"] for k in s if k[0] == NS + "instances_disappeared"} == set(WORKER_STATES)
    assert not any(k[0].endswith("_created") for k in s)

    class Inner:
        def instances(self, tags):
            return []

        def create(self, *a):
            raise RuntimeError("quota")

    wrapped = InstrumentedInstanceSet(Inner(), m.driver_operations)
    wrapped.instances({})
    with pytest.raises(RuntimeError):
        wrapped.create(None, "img", {}, "", None)
    m.boot_outcomes.labels(outcome="success").inc()
    m.time_to_ssh.observe(12.5)
    m.run_probe_duration.labels(outcome="fail").observe(0.25)
    s = samples(scrape())
    assert s[NS + "driver_operations", (("error", "0"), ("operation", "List"))] == 1
    assert s[NS + "driver_operations", (("error", "1"), ("operation", "Create"))] == 1
    assert s[NS + "boot_outcomes", (("outcome", "success"),)] == 1
    assert s[NS + "instances_time_to_ssh_seconds", (("quantile", "0.5"),)] == 12.5
    assert s[NS + "instances_time_to_ssh_seconds_count", ()] == 1
    assert s[NS + "instances_run_probe_duration_seconds", (("outcome", "fail"), ("quantile", "0.99"))] == 0.25
    # a SummaryVec child appears with its first observation, as in Go
    assert not any(dict(k[1]).get("outcome") == "success" for k in s if k[0].startswith(NS + "instances_run_probe"))
    assert math.isnan(s[NS + "instances_time_to_ready_for_container_seconds", (("quantile", "0.5"),)])


def test_broken_snapshot_source_is_logged_and_event_metrics_survive(caplog):
    m = DispatchMetrics(d.cluster())

    def boom():
        raise RuntimeError("scheduler gone")

    m.set_snapshot_source(boom)
    with caplog.at_level(logging.ERROR, logger="api.metrics"):
        text = m.exposition().decode()
    assert NS + "driver_operations" in text and NS + "instances_total" not in text
    assert any("snapshot" in r.getMessage() and r.exc_info for r in caplog.records)


def test_no_source_yet_gives_zeros():
    s = samples(DispatchMetrics(d.cluster()).exposition().decode())
    assert s[NS + "containers_running", ()] == 0
    assert s[NS + "instances_total", (("category", "idle"), ("instance_type", "gpu"))] == 0


@pytest.mark.parametrize("running,behavior,state,cat", [
    (("c",), "hold", "running", "inuse"), ((), "hold", "booting", "hold"), ((), "run", "booting", "booting"),
    ((), "drain", "unknown", "unknown"), ((), "run", "idle", "idle"), ((), "run", "shutdown", "idle"),
    ((), "drain", "running", "idle"),
])
def test_instance_category(running, behavior, state, cat):
    v = d._iv("i-x", d.SMALL, state, behavior=behavior, running=running)
    assert instance_category(v) == cat


# -- windowed summaries ---------------------------------------------------------------------------

def test_summary_quantiles_and_window():
    clock = FakeClock(1000.0)
    s = WindowedSummary("x_seconds", "doc", max_age=600, clock=clock.now)
    for v in range(1, 101):
        s.observe(float(v))
    [m] = s.collect()
    got = {(smp.name, smp.labels.get("quantile")): smp.value for smp in m.samples}
    assert got[("x_seconds", "0.5")] == 50 and got[("x_seconds", "0.9")] == 90
    assert got[("x_seconds", "0.99")] == 99 and got[("x_seconds_count", None)] == 100
    assert got[("x_seconds_sum", None)] == 5050
    clock.advance(300)
    s.observe(1000.0)
    clock.advance(400)  # the first 100 are now 700 s old: out of the window; 1000.0 is 400 s old
    [m] = s.collect()
    got = {(smp.name, smp.labels.get("quantile")): smp.value for smp in m.samples}
    assert got[("x_seconds", "0.5")] == 1000.0
    assert got[("x_seconds_count", None)] == 101  # count and sum stay all-time, as in Go
    clock.advance(700)
    [m] = s.collect()
    assert math.isnan(next(smp.value for smp in m.samples if smp.labels.get("quantile") == "0.5"))


def test_summary_memory_is_bounded():
    clock = FakeClock()
    s = WindowedSummary("y", "doc", max_age=600, buckets=5, cap=100, clock=clock.now)
    for i in range(50_000):
        s.observe(i % 1000)
        if i % 10_000 == 0:
            clock.advance(120)
    window = s._children[()]
    assert len(window._slots) <= 5 and all(len(vals) <= 100 for _, vals, _ in window._slots)
    values, total, n = window.state()
    assert n == 50_000 and len(values) <= 500
    assert 300 <= quantile(values, 0.5) <= 700  # a fair sample of 0..999


def test_summary_label_errors():
    s = WindowedSummary("z", "doc", ["outcome"])
    with pytest.raises(ValueError, match="labels"):
        s.observe(1)
    with pytest.raises(ValueError, match="expected labels"):
        s.labels(result="x")


# -- promtool -------------------------------------------------------------------------------------

# Go's own names: three gauges end in _total and three counters do not; promtool's naming lint
# says so for Go's output too, and that is the only complaint it may make.
KNOWN_LINT = {f'{NS}{n} non-counter metrics should not have "_total" suffix'
              for n in ("instances_total", "vcpus_total", "memory_bytes_total")} | {
              f'{NS}{n} counter metrics should have "_total" suffix'
              for n in ("driver_operations", "boot_outcomes", "instances_disappeared")}


def test_promtool_check_metrics(scrape):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install --no-install-recommends prometheus)")
    m = scrape.metrics
    m.time_to_ssh.observe(3)
    m.run_probe_duration.labels(outcome="success").observe(0.1)
    text = scrape()
    proc = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    problems = {line.strip() for line in (proc.stdout + proc.stderr).splitlines() if line.strip()}
    assert proc.returncode in (0, 3), problems  # 1 = unparseable
    assert problems <= KNOWN_LINT, problems - KNOWN_LINT
    # and the same check does catch a real problem
    bad = text + "# TYPE arvados_dispatchcloud_x_seconds gauge\narvados_dispatchcloud_x_seconds{a=} 1\n"
    assert subprocess.run([promtool, "check", "metrics"], input=bad, capture_output=True, text=True,
                          timeout=30).returncode == 1


# -- Go's metrics, as registered in lib/dispatchcloud (scheduler, worker pool, container queue,
# driver wrapper); the EC2 driver's own two are for a driver we do not implement ------------------

GO_METRICS = {  # name: (type, label names, help)
    "driver_operations": ("counter", ("error", "operation"),
                          "Number of instance-create/destroy/list operations performed via cloud driver."),
    "queue_entries": ("gauge", ("instance_type", "state"),
                      "Number of active container entries in the controller database."),
    "containers_allocated_not_started": ("gauge", (), "Number of containers allocated to a worker but not "
                                         "started yet (worker is booting)."),
    "containers_not_allocated_over_quota": ("gauge", (), "Number of containers not allocated to a worker because "
                                            "the system has hit a quota."),
    "containers_longest_wait_time_seconds": ("gauge", (), "Current longest wait time of any container since "
                                             "queuing, and before the start of crunch-run."),
    "last_503_time": ("gauge", (), "Time of most recent 503 error received from API."),
    "max_concurrent_containers": ("gauge", (), "Dynamically assigned limit on number of containers scheduled "
                                  "concurrency, set after receiving 503 errors from API."),
    "at_quota": ("gauge", (), "Flag indicating the cloud driver is reporting an at-quota condition."),
    "containers_running": ("gauge", (), "Number of containers reported running by cloud VMs."),
    "probe_age_seconds_max": ("gauge", (), "Maximum number of seconds since an instance's most recent "
                              "successful probe."),
    "probe_age_seconds_median": ("gauge", (), "Median number of seconds since an instance's most recent "
                                 "successful probe."),
    "instances_total": ("gauge", ("category", "instance_type"), "Number of cloud VMs."),
    "instances_price": ("gauge", ("category",), "Price of cloud VMs."),
    "vcpus_total": ("gauge", ("category",), "Total VCPUs on all cloud VMs."),
    "memory_bytes_total": ("gauge", ("category",), "Total memory on all cloud VMs."),
    "boot_outcomes": ("counter", ("outcome",), "Boot outcomes by type."),
    "instances_disappeared": ("counter", ("state",), "Number of occurrences of an instance disappearing from "
                              "the cloud provider's list of instances."),
    "instances_time_to_ssh_seconds": ("summary", (), "Number of seconds between instance creation and the "
                                      "first successful SSH connection."),
    "instances_time_to_ready_for_container_seconds": ("summary", (), "Number of seconds between the first "
                                                      "successful SSH connection and ready to run a container."),
    "instances_time_from_shutdown_request_to_disappearance_seconds": (
        "summary", (), "Number of seconds between the first shutdown attempt and the disappearance of the worker."),
    "containers_time_from_queue_to_crunch_run_seconds": ("summary", (), "Number of seconds between the queuing "
                                                         "of a container and the start of crunch-run."),
    "instances_run_probe_duration_seconds": ("summary", ("outcome",), "Number of seconds per runProbe call."),
}
# Label values Go creates at start (so they read 0, never "No data").
GO_PRECREATED = {
    "driver_operations": {(("error", e), ("operation", o)) for o in ("Create", "List", "Destroy", "SetTags")
                          for e in ("0", "1")},
    "boot_outcomes": {(("outcome", o),) for o in ("failure", "success", "aborted", "disappeared")},
    "instances_disappeared": {(("state", s),) for s in ("unknown", "booting", "idle", "running", "shutdown")},
    "instances_price": {(("category", c),) for c in ("inuse", "hold", "booting", "unknown", "idle")},
}
OURS = {"standby"}  # documented in README.rst


def test_every_go_metric_with_go_name_type_labels_and_help(scrape):
    scrape.metrics.run_probe_duration.labels(outcome="success").observe(0.1)
    families, got = parse(scrape())
    names = {n[len(NS):] for n in families}
    assert names == set(GO_METRICS) | OURS
    for name, (typ, labels, doc) in GO_METRICS.items():
        full = NS + name
        assert families[full] == (typ, doc), name
        series = {lab for (n, lab) in got if n == full}
        assert series, f"{name}: no series"
        for lab in series:
            assert tuple(k for k, _ in lab) == labels + (("quantile",) if typ == "summary" else ()), (name, lab)
        if typ == "summary":
            base = {tuple(p for p in lab if p[0] != "quantile") for lab in series}
            for lab in base:
                assert {dict(x).get("quantile") for x in series if tuple(p for p in x if p[0] != "quantile") == lab} \
                    == {"0.5", "0.9", "0.95", "0.99"}
                assert (full + "_sum", lab) in got and (full + "_count", lab) in got
        else:
            assert not any(n.startswith(full + "_") for n, _ in got if n != full and n[len(NS):] not in GO_METRICS)
        assert GO_PRECREATED.get(name, set()) <= series, name
    # the three counters have no _total twin; no *_created series anywhere
    assert not any(n.endswith("_created") or n[len(NS):] in {c + "_total" for c in
                   ("driver_operations", "boot_outcomes", "instances_disappeared")} for n, _ in got)


def test_a_driver_counter_is_exposed_under_its_go_name_without_created_samples():
    """A driver's own prometheus_client Counter (EC2's ``ec2_instance_starts_total``) keeps the
    name Go gives it, on the HELP/TYPE lines too, and no ``_created`` series Go does not have."""
    from prometheus_client import CollectorRegistry, Counter

    from api.metrics import exposition
    reg = CollectorRegistry()
    c = Counter("arvados_dispatchcloud_ec2_instance_starts", "Number of attempts to start a new instance",
                ["subnet_id", "success"], registry=reg)
    c.labels(subnet_id="s-1", success="1").inc(2)
    text = exposition(reg).decode()
    assert text == ("# HELP arvados_dispatchcloud_ec2_instance_starts_total Number of attempts to start a new instance\n"
                    "# TYPE arvados_dispatchcloud_ec2_instance_starts_total counter\n"
                    'arvados_dispatchcloud_ec2_instance_starts_total{subnet_id="s-1",success="1"} 2.0\n')
