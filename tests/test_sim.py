"""Actor-level simulations: the real actors, the stub cloud and the SQLite container API on a
FakeClock (ports of Arvados dispatcher_test.go / pool_test.go scenarios). No sleeps: time moves
only through Simulation.step."""

from __future__ import annotations

import random

import pytest

from actors.sim import START, Simulation
from tests.simcluster import GiB, cluster, with_vms

FINAL = ("Complete", "Cancelled")


class Watch:
    """Checks invariants after every step: a container never runs on two instances."""

    def __init__(self, sim: Simulation):
        self.sim = sim
        self.violations: list[str] = []
        self.max_instances = 0

    def check(self) -> None:
        where: dict[str, list[str]] = {}
        for vm in self.sim.cloud.vms:
            for uuid, proc in vm.procs.items():
                if not proc.ended:
                    where.setdefault(uuid, []).append(vm.id)
        for uuid, vms in where.items():
            if len(vms) > 1:
                self.violations.append(f"{uuid} on {vms} at t={self.sim.now - START:.0f}")
        self.max_instances = max(self.max_instances, len(self.sim.cloud.vms))


def run_until(sim, watch, cond, max_seconds, step=5.0):
    t0 = sim.now
    while not cond():
        assert sim.now - t0 < max_seconds, f"not done after {max_seconds}s: {summary(sim)}"
        sim.step(step)
        watch.check()


def summary(sim) -> dict:
    out: dict[str, int] = {}
    for c in sim.containers():
        out[c["state"]] = out.get(c["state"], 0) + 1
    out["instances"] = len(sim.cloud.vms)
    return out


def states(sim) -> dict[str, dict]:
    return {c["uuid"]: c for c in sim.containers()}


def test_lifecycle_boot_run_idle_shutdown():
    c = cluster()
    with Simulation(c) as sim:
        u = sim.submit(runtime_constraints={"vcpus": 1, "ram": 512 << 20})
        took = sim.run_until(lambda: states(sim)[u]["state"] == "Complete", 300)
        # boot 10 s + probes + 30 s run: well under TimeoutBooting, and deterministic
        assert 40 <= took <= 70
        assert states(sim)[u]["exit_code"] == 0
        sim.step(c.cloud_vms.probe_interval + 1)  # the next probe sees crunch-run gone
        inst = sim.snapshot.instances
        assert len(inst) == 1 and inst[0].worker_state == "idle"
        assert inst[0].last_container_uuid == u
        sim.step(c.cloud_vms.timeout_idle + 15)
        assert sim.cloud.vms == [] and sim.snapshot.instances == ()
        m = sim.metrics
        assert m.boot_outcomes.labels(outcome="success")._value.get() == 1
        assert m.driver_operations.labels(operation="Create", error="0")._value.get() == 1
        assert m.driver_operations.labels(operation="Destroy", error="0")._value.get() == 1


def test_cheapest_type_and_packing():
    c = cluster(types=(1, 2, 4, 8))
    with Simulation(c) as sim:
        small = sim.submit(runtime_constraints={"vcpus": 1, "ram": 512 << 20}, priority=2)
        big = sim.submit(runtime_constraints={"vcpus": 3, "ram": 2 * GiB}, priority=1)
        sim.step(8)
        types = sorted(v.arvados_instance_type for v in sim.snapshot.instances)
        assert types == ["type1", "type4"]
        entries = {e.uuid: e for e in sim.snapshot.queue}
        assert [t.name for t in entries[small].instance_types] == ["type1"]
        assert entries[big].scheduling_status == "Waiting for a type4 instance to boot and be ready to accept work."


def test_unsatisfiable_container_is_cancelled_with_reason():
    with Simulation(cluster(types=(1, 2))) as sim:
        u = sim.submit(runtime_constraints={"vcpus": 64, "ram": 1 << 40})
        sim.step(6)
        ctr = states(sim)[u]
        assert ctr["state"] == "Cancelled"
        assert ctr["runtime_status"]["error"] == "constraints not satisfiable by any configured instance type"
        assert sim.cloud.vms == []


def test_hold_keeps_idle_instance_and_drain_shuts_down_after_container():
    c = cluster()
    with Simulation(c) as sim:
        a = sim.submit(runtime_constraints={"vcpus": 1, "ram": 256 << 20})
        sim.run_until(lambda: states(sim)[a]["state"] == "Complete", 300)
        iid = sim.snapshot.instances[0].instance
        sim.dispatcher.backend().set_idle_behavior(iid, "hold")
        sim.step(c.cloud_vms.timeout_idle * 5)
        inst = sim.snapshot.instances
        assert [(i.instance, i.worker_state, i.idle_behavior) for i in inst] == [(iid, "idle", "hold")]
        # the tag is written so hold survives a restart
        assert sim.cloud.vm(iid).tags[c.tag("IdleBehavior")] == "hold"
        # a held instance gets no new container: a new one is created for it
        b = sim.submit(runtime_constraints={"vcpus": 1, "ram": 256 << 20}, command=["sleep", "1"])
        sim.step(8)
        assert len(sim.snapshot.instances) == 2
        sim.run_until(lambda: states(sim)[b]["state"] == "Running", 120)
        other = [i for i in sim.snapshot.instances if i.instance != iid][0]
        assert other.running_container_uuids == (b,)
        # drain the busy one: it stays until its container ends, then goes
        sim.dispatcher.backend().set_idle_behavior(other.instance, "drain")
        sim.step(5)
        assert other.instance in [i.instance for i in sim.snapshot.instances]
        sim.run_until(lambda: states(sim)[b]["state"] == "Complete", 120)
        sim.step(30)
        assert [i.instance for i in sim.snapshot.instances] == [iid]


def test_quota_error_stops_creation_until_an_instance_goes():
    c = with_vms(cluster(driver_parameters={"BootTime": "5s", "BootTimeJitter": "0s",
                                             "ContainerRunTime": "100s", "QuotaMaxInstances": 2}),
                 max_instances=10, max_running_containers_per_instance=1)
    with Simulation(c) as sim:
        uuids = [sim.submit(runtime_constraints={"vcpus": 1, "ram": 256 << 20}) for _ in range(4)]
        sim.step(20)
        creates_ok = sim.metrics.driver_operations.labels(operation="Create", error="0")._value.get()
        errs = sim.metrics.driver_operations.labels(operation="Create", error="1")._value.get()
        assert creates_ok == 2 and errs >= 1  # the creates of one pass race for the quota
        assert sim.snapshot.at_quota
        # no more create attempts while at quota
        sim.step(60)
        assert sim.metrics.driver_operations.labels(operation="Create", error="1")._value.get() == errs
        waiting = [e.scheduling_status for e in sim.snapshot.queue if e.container["state"] != "Running"]
        assert waiting and all("cloud account limits" in s or "Waiting in queue" in s for s in waiting)
        # all four finish eventually: instances go idle, the quota clears as they are shut down
        sim.run_until(lambda: all(states(sim)[u]["state"] == "Complete" for u in uuids), 1200, step=10)
        assert len(sim.cloud.vms) <= 2


def test_rate_limit_holdoff_is_obeyed_to_the_second():
    c = with_vms(cluster(driver_parameters={"BootTime": "5s", "BootTimeJitter": "0s",
                                             "ContainerRunTime": "30s", "MinTimeBetweenCreateCalls": "20s"}),
                 max_running_containers_per_instance=1, max_concurrent_instance_create_ops=1)
    with Simulation(c) as sim:
        calls = []  # every create call the driver sees
        real_create = sim.dispatcher.driver_set.create

        def spy(*a, **kw):
            calls.append(sim.now)
            return real_create(*a, **kw)

        sim.dispatcher.driver_set.create = spy
        for _ in range(3):
            sim.submit(runtime_constraints={"vcpus": 1, "ram": 256 << 20})
        sim.step(60)
        rel = [round(t - calls[0], 3) for t in calls]
        # first create OK; the second is refused with earliest retry = first + 20 s; no call is made
        # before that instant, and the retry happens at exactly that second
        assert rel[0] == 0 and rel[1] == 0
        assert all(t >= 20 for t in rel[2:]) and 20 in rel
        ok = sim.metrics.driver_operations.labels(operation="Create", error="0")._value.get()
        assert ok >= 2


def test_capacity_error_falls_back_to_next_type():
    c = cluster(types=(1, 2, 4), driver_parameters={
        "BootTime": "5s", "BootTimeJitter": "0s", "ContainerRunTime": "10s",
        "CapacityErrorTypes": ["providertype1"]}, containers={"maximum_price_factor": 2.5})
    with Simulation(c) as sim:
        u = sim.submit(runtime_constraints={"vcpus": 1, "ram": 256 << 20})
        sim.run_until(lambda: states(sim)[u]["state"] == "Complete", 300)
        # type1 hit a capacity error; the container ran on the next eligible type
        assert sim.metrics.driver_operations.labels(operation="Create", error="1")._value.get() == 1
        assert sim.snapshot.instances[0].arvados_instance_type == "type2"


def test_repeated_early_crash_ends_in_max_dispatch_attempts_cancel():
    """crunch-run --detach works but the child dies before Running: requeue, until the API
    server cancels the container after MaxDispatchAttempts locks."""
    c = cluster(driver_parameters={"BootTime": "5s", "BootTimeJitter": "0s"},
                containers={"max_dispatch_attempts": 3})
    with Simulation(c) as sim:
        def always_crash_early(vm):
            vm.crash_rate = 2.0  # early crash when rand < rate/2: always
        sim.cloud.setup_vm = always_crash_early
        u = sim.submit(runtime_constraints={"vcpus": 1, "ram": 256 << 20})
        sim.run_until(lambda: states(sim)[u]["state"] == "Cancelled", 3600, step=10)
        ctr = states(sim)[u]
        assert ctr["lock_count"] == 3
        assert "MaxDispatchAttempts" in ctr["runtime_status"]["error"]


def test_kill_running_container_via_management_api():
    c = cluster(driver_parameters={"BootTime": "5s", "BootTimeJitter": "0s", "ContainerRunTime": "1000s"})
    with Simulation(c) as sim:
        u = sim.submit(runtime_constraints={"vcpus": 1, "ram": 256 << 20})
        sim.run_until(lambda: states(sim)[u]["state"] == "Running", 120)
        sim.dispatcher.backend().kill_container(u, "test")
        sim.step(15)
        assert states(sim)[u]["state"] == "Cancelled"
        from api.backend import NotFound
        with pytest.raises(NotFound):
            sim.dispatcher.backend().kill_container(u, "again")


def test_priority_zero_while_running_kills_it():
    c = cluster(driver_parameters={"BootTime": "5s", "BootTimeJitter": "0s", "ContainerRunTime": "1000s"})
    with Simulation(c) as sim:
        u = sim.submit(runtime_constraints={"vcpus": 1, "ram": 256 << 20})
        sim.run_until(lambda: states(sim)[u]["state"] == "Running", 120)
        sim.api.update(u, {"priority": 0})
        sim.step(30)
        assert states(sim)[u]["state"] == "Cancelled"


def test_broken_node_is_drained():
    c = cluster(driver_parameters={"BootTime": "5s", "BootTimeJitter": "0s", "ContainerRunTime": "20s",
                                   "ReportBrokenRate": 1.0, "ReportBrokenAfter": "8s"})
    with Simulation(c) as sim:
        u = sim.submit(runtime_constraints={"vcpus": 1, "ram": 256 << 20})
        # poll at 5 s, boot at 10 s, container started by 16 s, broken from 18 s, seen by 21 s
        sim.step(25)
        views = sim.snapshot.instances
        assert [(v.worker_state, v.idle_behavior) for v in views] == [("running", "drain")]
        assert sim.cloud.vms[0].tags[c.tag("IdleBehavior")] == "drain"
        # its container finishes; then the drained instance goes, and is not reused
        sim.run_until(lambda: states(sim)[u]["state"] == "Complete", 120)
        sim.step(15)
        assert sim.cloud.vms == []


def test_unresponsive_new_instance_is_shut_down_after_timeout_booting():
    c = with_vms(cluster(driver_parameters={"BootTime": "10000s", "BootTimeJitter": "0s"}),
                 timeout_booting=120.0, max_instances=1)
    with Simulation(c) as sim:
        sim.submit(runtime_constraints={"vcpus": 1, "ram": 256 << 20})
        sim.step(100)
        assert [v.worker_state for v in sim.snapshot.instances] == ["booting"]
        sim.step(40)
        assert sim.metrics.boot_outcomes.labels(outcome="failure")._value.get() == 1
        assert sim.metrics.driver_operations.labels(operation="Destroy", error="0")._value.get() >= 1


def test_many_containers_with_errors_crashes_and_quota():
    """200 containers of mixed sizes: create/destroy errors, crunch-run crashes, a quota limit."""
    c = with_vms(cluster(types=(1, 2, 3, 4, 6, 8), driver_parameters={
        "BootTime": "20s", "BootTimeJitter": "10s", "ContainerRunTime": "60s",
        "ContainerRunTimeJitter": "120s", "ErrorRateCreate": 0.1, "ErrorRateDestroy": 0.1,
        "CrunchRunCrashRate": 0.1, "QuotaMaxInstances": 12, "MinTimeBetweenCreateCalls": "1s",
        "Seed": 7}), max_instances=20, timeout_idle=30.0, timeout_probe=60.0, timeout_booting=120.0)
    c = with_vms(c, initial_quota_estimate=8)
    rnd = random.Random(1)
    with Simulation(c, seed=7) as sim:
        w = Watch(sim)
        uuids = [sim.submit(priority=i % 20 + 1,
                            runtime_constraints={"vcpus": i % 4 + 1, "ram": (i % 3 + 1) * GiB // 2})
                 for i in range(200)]
        rnd.shuffle(uuids)
        run_until(sim, w, lambda: all(c["state"] in FINAL for c in sim.containers()), 6 * 3600, step=10)
        final = states(sim)
        assert not w.violations, w.violations[:5]
        done = sum(1 for u in uuids if final[u]["state"] == "Complete")
        cancelled = [final[u] for u in uuids if final[u]["state"] == "Cancelled"]
        assert done + len(cancelled) == 200
        assert done >= 150
        for ctr in cancelled:  # every cancel says why
            assert (ctr.get("runtime_status") or {}).get("error"), ctr
        assert all(x["locked_by_uuid"] in ("", None) for x in final.values())
        assert w.max_instances <= 12
        # once the queue is empty, every instance goes away
        run_until(sim, w, lambda: not sim.cloud.vms, 600, step=10)
        m = sim.metrics
        assert m.driver_operations.labels(operation="Create", error="1")._value.get() > 0
        assert m.boot_outcomes.labels(outcome="success")._value.get() > 0


def detaches(sim, uuid) -> int:
    return sum(1 for vm in sim.cloud.vms for r in vm.commands
               if "--detach" in r.command and uuid in r.command)


def test_resume_after_restart():
    """Stop the actors with instances booting, idle, running, draining and on hold; a new
    dispatcher over the same cloud and API finds each in the right state, adopts running
    containers without restarting or killing them, reconciles locks, and creates nothing until
    the first listing and probes are in."""
    c = with_vms(cluster(types=(1, 2), driver_parameters={
        "BootTime": "10s", "BootTimeJitter": "0s", "ContainerRunTime": "600s"}),
        max_running_containers_per_instance=1, timeout_booting=300.0, timeout_idle=600.0)
    sim = Simulation(c).start()
    a, b, cc = (sim.submit(runtime_constraints={"vcpus": 1, "ram": 256 << 20}, priority=p) for p in (3, 2, 1))
    sim.run_until(lambda: all(states(sim)[u]["state"] == "Running" for u in (a, b, cc)), 120)
    snap = {i.running_container_uuids[0]: i.instance for i in sim.snapshot.instances}
    va, vb, vc = snap[a], snap[b], snap[cc]
    backend = sim.dispatcher.backend()
    backend.kill_container(cc, "make an idle instance")
    sim.step(10)
    assert states(sim)[cc]["state"] == "Cancelled"
    backend.set_idle_behavior(vc, "hold")
    backend.set_idle_behavior(vb, "drain")
    # one more container, whose instance will still be booting at the restart
    sim.cloud.setup_vm = lambda vm: setattr(vm, "boot_at", vm.created_at + 200)
    d = sim.submit(runtime_constraints={"vcpus": 1, "ram": 256 << 20}, priority=4)
    sim.step(10)
    booting = [i.instance for i in sim.snapshot.instances if i.worker_state == "booting"]
    assert len(booting) == 1 and states(sim)[d]["state"] == "Locked"
    vd = booting[0]
    sim.step(5)
    before = {v.instance: (v.worker_state, v.idle_behavior) for v in sim.snapshot.instances}
    assert before == {va: ("running", "run"), vb: ("running", "drain"), vc: ("idle", "hold"),
                      vd: ("booting", "run")}
    sim.dispatcher.stop()  # the actors stop; the VMs and the containers carry on

    sim2 = Simulation(c, store=sim.store, cloud=sim.cloud, clock=sim.clock)
    creates = []
    real_create = sim2.dispatcher.driver_set.create
    sim2.dispatcher.driver_set.create = lambda *a, **kw: (creates.append(sim2.now), real_create(*a, **kw))[1]
    sim2.cloud.setup_vm = None
    t_restart = sim2.now
    sim2.start()
    sim2.step(1)
    views = {v.instance: v for v in sim2.snapshot.instances}
    assert set(views) == {va, vb, vc, vd}
    assert creates == []  # nothing created before the listing and probes are in
    sim2.step(c.cloud_vms.probe_interval * 2)
    views = {v.instance: v for v in sim2.snapshot.instances}
    got = {iid: (v.worker_state, v.idle_behavior) for iid, v in views.items()}
    assert got[va] == ("running", "run") and views[va].running_container_uuids == (a,)
    assert got[vb] == ("running", "drain") and views[vb].running_container_uuids == (b,)
    assert got[vc] == ("idle", "hold")
    assert got[vd] == ("unknown", "run")  # still booting: its boot probe fails
    # adopted, not restarted or killed
    assert detaches(sim2, a) == 1 and detaches(sim2, b) == 1
    assert states(sim2)[a]["state"] == "Running" and states(sim2)[b]["state"] == "Running"
    # the stale lock on d (Locked, running nowhere) is released and d is dispatched again
    sim2.run_until(lambda: states(sim2)[d]["state"] == "Running", 900, step=10)
    assert states(sim2)[d]["lock_count"] >= 2
    assert all(t >= t_restart for t in creates)
    sim2.run_until(lambda: all(states(sim2)[u]["state"] == "Complete" for u in (a, b, d)), 1200, step=10)
    # never re-dispatched: locked once, started once
    assert states(sim2)[a]["lock_count"] == 1 and states(sim2)[b]["lock_count"] == 1
    # the drained instance went away after its container; the held one stays
    sim2.step(60)
    left = {v.instance for v in sim2.snapshot.instances}
    assert vb not in left and vc in left
    sim2.stop()


def test_dead_worker_actor_is_replaced_and_its_container_adopted():
    """A worker actor that dies (a bug, say) must not take the scheduler with it: the instance
    is re-adopted by a fresh actor at the next listing and its container keeps running."""
    import pykka

    from actors.worker import WorkerActor
    c = cluster(driver_parameters={"BootTime": "5s", "BootTimeJitter": "0s", "ContainerRunTime": "120s"})
    with Simulation(c) as sim:
        u = sim.submit(runtime_constraints={"vcpus": 1, "ram": 256 << 20})
        sim.run_until(lambda: states(sim)[u]["state"] == "Running", 120)
        iid = sim.snapshot.instances[0].instance
        (ref,) = pykka.ActorRegistry.get_by_class(WorkerActor)
        ref.stop()
        sim.dispatcher.backend().set_idle_behavior(iid, "hold")  # a tell to the dead actor
        sim.step(c.cloud_vms.sync_interval + 2 * c.cloud_vms.probe_interval)
        views = sim.snapshot.instances
        assert [(v.instance, v.running_container_uuids) for v in views] == [(iid, (u,))]
        assert len(pykka.ActorRegistry.get_by_class(WorkerActor)) == 1
        sim.run_until(lambda: states(sim)[u]["state"] == "Complete", 300)
        assert states(sim)[u]["lock_count"] == 1
