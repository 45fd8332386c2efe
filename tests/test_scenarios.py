"""Issue 10's sixteen scenarios, each as a deterministic test on the fake clock (or a pure table).

Each reproduces an interleaving that once double-started, killed, stranded or mis-scheduled a
container; a scenario still open is marked ``xfail(strict=True)`` so it fails loudly once fixed.
Scheduler-level scenarios drive a SchedulerActor used as a plain object (its collaborators are
mocks that record what it tells them); the rest run the real actors in a Simulation.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path
from unittest.mock import MagicMock

import pytest

from actors.base import ACTIVITY
from actors.instancetype import TypeChooser
from actors.messages import Behavior, InstanceInfo, QueueEntry, State, WorkerView
from actors.planner import Limits, Slot, plan
from actors.scheduler import SchedulerActor, SnapshotBox
from actors.sim import START, Simulation
from api.arvados.client import error_for
from cloud.base import ExecutorError
from cloud.clock import FakeClock
from cloud.stub.driver import StubParams
from tests.chaos import Chaos, ChaosConfig
from tests.simcluster import GiB, cluster, instance_type

T0 = START
ROOT = Path(__file__).resolve().parent.parent


# -- a scheduler used as a plain object ------------------------------------------------------------

class Sched:
    """A SchedulerActor, not started, whose workers, queue and instance set are mocks."""

    def __init__(self, c=None, now: float = T0):
        self.cluster = c or cluster(types=(2,))
        self.chooser = TypeChooser(self.cluster)
        self.workers: dict[str, MagicMock] = {}
        self.queue = MagicMock(name="queue")
        self.iset = MagicMock(name="iset")
        self.box = SnapshotBox()
        self.s = SchedulerActor(cluster=self.cluster, set_id="set", ticker=MagicMock(), box=self.box,
                                worker_factory=self._factory, public_key=None, first_now=now)
        self.s.wire(self.queue, self.iset)
        self.now = now

    def _factory(self, info, it, state, behavior, now, secret):
        w = MagicMock(name=info.id)
        self.workers[info.id] = w
        return w

    def list(self, *ids: str, it: str = "type2") -> None:
        infos = tuple(InstanceInfo(id=i, address="10.0.0.1", provider_type="p", remote_user="root",
                                   tags={self.cluster.tag("InstanceType"): it}) for i in ids)
        self.s.instances_listed(infos, self.now)

    def view(self, iid: str, state: State, running=(), behavior=Behavior.RUN, it: str = "type2",
             **kw) -> WorkerView:
        return WorkerView(instance_id=iid, instance_type=self.cluster.instance_types[it], state=state,
                          idle_behavior=behavior, address="10.0.0.1", provider_type="p",
                          running=tuple(sorted(running)), appeared=T0, probed=self.now, busy=self.now,
                          probe_done=True, **kw)

    def report(self, *views: WorkerView) -> None:
        for v in views:
            self.s.worker_changed(v)

    def entry(self, uuid: str, state: str, priority: int = 1, vcpus: int = 1, supervisor=False,
              runtime_status=None) -> QueueEntry:
        ctr = {"uuid": uuid, "state": state, "priority": priority,
               "runtime_constraints": {"vcpus": vcpus, "ram": 256 << 20},
               "container_image": "img", "mounts": {},
               "scheduling_parameters": {"supervisor": supervisor},
               "locked_by_uuid": "zzzzz-gj3su-dispatcher" if state in ("Locked", "Running") else ""}
        return QueueEntry(uuid=uuid, state=state, priority=priority, container=ctr,
                          instance_types=self.chooser.choose(ctr), resources=self.chooser.needed(ctr),
                          first_seen_at=T0, supervisor=supervisor, locked_by_uuid=ctr["locked_by_uuid"])

    def poll(self, *entries: QueueEntry, at: float | None = None) -> None:
        self.s.queue_update(tuple(entries), (), self.now if at is None else at)

    def tick(self, dt: float = 0.0) -> None:
        """A full pass ``dt`` seconds on (as if something changed)."""
        self.now += dt
        self.s._now = max(self.s._now, self.now)
        self.s._touch()
        self.s.tick(self.now)

    def starts(self, uuid: str) -> list[str]:
        """The workers told to start ``uuid``, in order."""
        out = []
        for iid, w in self.workers.items():
            for call in w.start_container.call_args_list:
                e = call.args[0]
                if getattr(e, "uuid", e) == uuid:
                    out.append(iid)
        return out

    def told(self, proxy: MagicMock, method: str, uuid: str) -> int:
        return sum(1 for c in getattr(proxy, method).call_args_list if c.args and c.args[0] == uuid)


A, B, C = (f"zzzzz-dz642-{x * 15}" for x in "abc")


# -- 1: double start -------------------------------------------------------------------------------

def test_1_report_taken_before_a_start_does_not_erase_it():
    """A probe report that predates a start must not erase the scheduler's record of it; else the
    next pass starts the same Locked container on a second instance."""
    s = Sched()
    s.list("i-2", "i-1")  # i-1 sorts first among equals
    s.report(s.view("i-2", State.RUNNING, running=(A,)), s.view("i-1", State.IDLE))
    s.poll(s.entry(A, "Running"), s.entry(B, "Locked"))
    s.tick()
    assert s.starts(B) == ["i-2"]  # packed next to A: the busier fitting instance wins
    # The report of a probe that began before the start arrives: A has ended, B is not listed yet.
    s.s.container_ended(A, "i-2", s.now)
    s.report(s.view("i-2", State.IDLE, running=()))
    s.tick(1)
    s.tick(1)
    assert s.starts(B) == ["i-2"], "B was sent crunch-run --detach on a second instance"


# -- 2: a drained unknown instance does not block cancels cluster-wide -----------------------------

def test_2_unknown_worker_with_known_containers_does_not_block_cancel():
    s = Sched()
    s.list("i-1", "i-2")
    # i-1 was adopted at startup: its boot probe fails but its run probe lists A (drained)
    s.report(s.view("i-1", State.UNKNOWN, running=(A,), behavior=Behavior.DRAIN),
             s.view("i-2", State.IDLE))
    s.poll(s.entry(A, "Running"), s.entry(C, "Running"))  # C's instance vanished
    s.tick()
    s.tick(1)
    assert s.told(s.queue, "cancel", C) == 1
    assert s.told(s.queue, "cancel", A) == 0


def test_2_an_unknown_worker_that_never_answers_blocks_cancel_only_until_timeout_booting():
    """Found by the chaos run (seed 23): an operator held an instance that never booted; after a
    restart it stayed unknown, never shut down (held) and never answered a run probe, so
    'Running on no worker -> cancel' stayed suspended cluster-wide for good, and containers whose
    instances broke stayed Running for ever (G3)."""
    s = Sched()
    s.list("i-1")
    s.report(s.view("i-1", State.UNKNOWN, behavior=Behavior.HOLD))  # never run-probed
    s.poll(s.entry(C, "Running"))  # C's instance vanished
    s.tick()
    s.tick(s.cluster.cloud_vms.timeout_booting - 1)
    assert s.told(s.queue, "cancel", C) == 0  # i-1 may still turn out to run it
    s.tick(2)
    assert s.told(s.queue, "cancel", C) == 1


# -- G2: a container whose instance vanished is not started again under the same lock ---------------

def test_g2_container_on_a_vanished_instance_is_not_started_again_from_an_older_queue_view():
    """Found by the chaos run (seed 26): A was started on i-1 (its crunch-run set it Running);
    i-1 broke and vanished from the listing while the container API was down, so the last queue
    view still said Locked; the next pass started A on i-2 while the API had it Running. As Go
    does with a crunch-run that exits, the attempt counts as running until a queue poll newer
    than its end shows where the container stands."""
    s = Sched()
    s.list("i-1", "i-2")
    s.report(s.view("i-1", State.IDLE), s.view("i-2", State.IDLE))
    s.poll(s.entry(A, "Locked"))
    s.tick()
    [first] = s.starts(A)
    other = "i-2" if first == "i-1" else "i-1"
    s.report(s.view(first, State.RUNNING, running=(A,), starts_seen=1))
    s.tick(60)
    s.now += 300
    s.list(other)  # the instance is gone; no poll since (API outage)
    s.tick(1)
    s.tick(10)
    assert s.starts(A) == [first], "A was sent crunch-run --detach again under the same lock"
    s.poll(s.entry(A, "Running"))  # a poll newer than the instance's disappearance
    s.tick(1)
    assert s.starts(A) == [first]
    assert s.told(s.queue, "cancel", A) == 1  # Running on no worker


def test_g2_lock_answer_does_not_start_a_container_an_earlier_attempt_of_which_turned_up():
    """The start that goes out with a lock's answer checked only the instance held for it: a
    crunch-run of an earlier attempt that a probe reported meanwhile, on another instance, was
    not seen, and the container got a second one."""
    s = Sched()
    s.list("i-1", "i-2")
    s.report(s.view("i-1", State.IDLE), s.view("i-2", State.IDLE))
    s.poll(s.entry(A, "Queued"))
    s.tick()
    assert s.told(s.queue, "lock", A) == 1
    s.report(s.view("i-2", State.RUNNING, running=(A,)))  # an earlier attempt's crunch-run
    s.s.container_op_done(A, "lock", s.entry(A, "Locked"), "")
    s.tick(1)
    assert s.starts(A) == []



def test_lock_answer_does_not_start_on_a_worker_the_dispatcher_drains():
    """A pass treats a worker the dispatcher drains (its boot probe failing) as DRAIN; the start
    that goes out with a lock's answer must too, or it lands on an instance being emptied."""
    s = Sched()
    s.list("i-1")
    s.report(s.view("i-1", State.IDLE))
    s.poll(s.entry(A, "Queued"))
    s.tick()
    assert s.told(s.queue, "lock", A) == 1
    s.report(s.view("i-1", State.IDLE, draining="boot probe failing"))
    s.s.container_op_done(A, "lock", s.entry(A, "Locked"), "")
    assert s.starts(A) == []

# -- 3: a Running container that fits no configured type is left alone ---------------------------

def test_3_running_container_of_retired_type_is_not_killed():
    dp = {"BootTime": "10s", "BootTimeJitter": "0s", "ContainerRunTime": "300s"}
    c = cluster(types=(1, 2), driver_parameters=dp)
    sim = Simulation(c).start()
    try:
        u = sim.submit(runtime_constraints={"vcpus": 2, "ram": 256 << 20})
        sim.run_until(lambda: state(sim, u) == "Running", 120)
    finally:
        sim.stop()
    # the operator retires type2 and restarts: nothing else fits the running container
    c2 = cluster(types=(1,), driver_parameters=dp)
    sim2 = Simulation(c2, store=sim.store, cloud=sim.cloud, clock=sim.clock).start()
    try:
        sim2.step(60)
        assert state(sim2, u) == "Running"
        sim2.run_until(lambda: state(sim2, u) != "Running", 600)
        assert state(sim2, u) == "Complete"
    finally:
        sim2.stop()


def state(sim, uuid: str) -> str:
    return sim.api.get_container(uuid, select=["state"])["state"]


# -- 4: a failed mounts fetch does not lose the scratch need --------------------------------------

class _FailMountsOnce:
    def __init__(self, inner):
        self._inner, self.failed = inner, 0

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def list_containers(self, *a, select=None, **kw):
        if select and "mounts" in select and not self.failed:
            self.failed += 1
            raise error_for(503, "mounts: service unavailable")
        return self._inner.list_containers(*a, select=select, **kw)


def test_4_container_is_skipped_until_its_mounts_are_known(caplog):
    c = cluster(types=(1, 2, 4, 8))
    ctr = {"runtime_constraints": {"vcpus": 1, "ram": 256 << 20},
           "mounts": {"/tmp": {"kind": "tmp", "capacity": 3 * GiB}}}
    want = TypeChooser(c).choose({"container_image": "arvados/jobs", **ctr})[0].name
    assert want != "type1"
    apis = []
    with Simulation(c, wrap_api=lambda api, role: apis.append(_FailMountsOnce(api)) or apis[-1]) as sim:
        with caplog.at_level(logging.WARNING, logger="dispatch.queue"):
            u = sim.submit(**ctr)
            sim.run_until(lambda: state(sim, u) == "Complete", 300)
        assert apis[0].failed == 1
        assert sorted({vm.instance_type.name for vm in sim.cloud.vms}) == [want]
        assert any("error getting mounts" in r.getMessage() for r in caplog.records)



def test_4_a_failed_mounts_fetch_after_a_restart_kills_no_running_container():
    """After a restart every container is new to the queue, Running ones included: a mounts
    fetch that fails must not leave them out of the queue, where "not in queue" kills them."""
    dp = {"BootTime": "10s", "BootTimeJitter": "0s", "ContainerRunTime": "300s"}
    c = cluster(types=(1,), driver_parameters=dp)
    sim = Simulation(c).start()
    try:
        u = sim.submit()
        sim.run_until(lambda: state(sim, u) == "Running", 120)
    finally:
        sim.stop()
    apis = []
    sim2 = Simulation(c, store=sim.store, cloud=sim.cloud, clock=sim.clock,
                      wrap_api=lambda api, role: apis.append(_FailMountsOnce(api)) or apis[-1]).start()
    try:
        sim2.run_until(lambda: state(sim2, u) != "Running", 600)
        assert apis[0].failed == 1
        got = sim2.api.get_container(u, select=["state", "lock_count", "runtime_status"])
        assert (got["state"], got["lock_count"]) == ("Complete", 1), got
    finally:
        sim2.stop()

# -- 5: slow destroys do not starve listing and creates ---------------------------------------------

class _SlowDestroys(Chaos):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.calls: list[tuple[float, str]] = []

    def _cloud_fault(self, op, target, command):
        self.calls.append((self.t, op))
        if op == "destroy" and not self.closing:
            self.park(900, "cloud destroy")


def test_5_slow_destroys_do_not_starve_listing_and_creates():
    c = cluster(types=(1,), max_concurrent_instance_create_ops=1, max_instances=40,
                max_running_containers_per_instance=1, timeout_idle=10.0, sync_interval=10.0,
                driver_parameters={"BootTime": "5s", "BootTimeJitter": "0s", "ContainerRunTime": "10s"})
    ch = _SlowDestroys(ChaosConfig(seed=5), cluster=c, random_faults=False,
                       params=StubParams.from_driver_parameters(c.cloud_vms.driver_parameters))
    ch.start()
    try:
        for _ in range(12):
            ch.submit()
        # twelve idle instances go; their destroys hang for 15 minutes
        ch.sim.run_until(lambda: len(ch._parked) >= 5, 600, step=5)
        t_parked = ch.t
        late = ch.submit()
        ch.sim.step(120)
        after = [op for t, op in ch.calls if t > t_parked]
        assert "instances" in after, "no instance listing while destroys are slow"
        assert "create" in after, "no create while destroys are slow"
        assert state(ch.sim, late) in ("Running", "Complete")
    finally:
        ch.stop()


# -- 6: a failed lock is retried at the next poll, not at once ----------------------------------------

class _LockAndGetFail:
    def __init__(self, inner, counts):
        self._inner, self._counts = inner, counts

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def lock(self, uuid):
        self._counts["lock"] += 1
        raise error_for(401, "token revoked")

    def get_container(self, uuid, select=None):
        if select != ["mounts"]:
            raise error_for(404, "not found")
        return self._inner.get_container(uuid, select=select)


def test_6_failed_lock_with_failed_refresh_is_not_retried_at_once():
    c = cluster(types=(1,), poll_interval=5.0)
    counts = {"lock": 0}
    wrap = (lambda api, role: _LockAndGetFail(api, counts) if role == "dispatcher" else api)
    sim = Simulation(c, wrap_api=wrap)
    try:
        sim.start()
        sim.submit()
        sim.step(60)
    finally:
        sim.dispatcher.stop()
    assert 1 <= counts["lock"] <= 60 / 5 + 2


# -- 7: the next poll waits max(last poll's duration, PollInterval) ---------------------------------

class _SlowPoll(Chaos):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.polls: list[float] = []

    def _wrap_api(self, client, role):
        chaos = self
        api = super()._wrap_api(client, role)

        def iter_containers(*a, **kw):
            if role == "dispatcher":
                chaos.polls.append(chaos.t)
                if len(chaos.polls) == 3:
                    chaos.park(30, "slow poll")
            yield from client.iter_containers(*a, **kw)
        api.iter_containers = iter_containers
        return api


def test_7_next_poll_waits_as_long_as_a_slow_poll_took():
    c = cluster(types=(1,), poll_interval=5.0)
    ch = _SlowPoll(ChaosConfig(seed=7), cluster=c, random_faults=False,
                   params=StubParams.from_driver_parameters(c.cloud_vms.driver_parameters))
    ch.start()
    try:
        ch.sim.step(80)
    finally:
        ch.stop()
    p = ch.polls
    assert len(p) >= 5
    assert p[1] - p[0] == pytest.approx(5.0) and p[2] - p[1] == pytest.approx(5.0)
    # poll 3 took 30 s (it ended at p[2] + 30): the next one starts 30 s after that
    assert p[3] - p[2] >= 60 - 0.01


# -- 8: requeue race ----------------------------------------------------------------------------

def test_8_container_is_not_restarted_while_its_unlock_is_in_flight():
    s = Sched()
    s.list("i-1", "i-2")
    s.report(s.view("i-1", State.RUNNING, running=(B,)), s.view("i-2", State.IDLE))
    s.poll(s.entry(B, "Locked"))
    s.tick()
    # crunch-run ends without finishing the container; a later poll still says Locked
    s.s.container_ended(B, "i-1", s.now + 1)
    s.report(s.view("i-1", State.IDLE))
    s.now += 5
    s.poll(s.entry(B, "Locked"))
    s.tick()
    assert s.told(s.queue, "unlock", B) == 1  # requeue
    s.tick(1)
    s.tick(1)
    assert s.starts(B) == [], "started again while the unlock is in flight"
    # the unlock fails: it must not run again under the same lock either
    s.s.container_op_done(B, "unlock", s.entry(B, "Locked"), "ApiUnavailable: 503")
    s.tick(1)
    s.tick(1)
    assert s.starts(B) == []


# -- 9: startup race ----------------------------------------------------------------------------

def test_9_no_start_for_a_container_being_unlocked_at_startup():
    s = Sched()
    s.list("i-1", "i-2")
    # after a restart: i-1 is unknown (boot probe failing, nothing running), i-2 idle;
    # B is still Locked by us from before the restart
    s.report(s.view("i-1", State.UNKNOWN), s.view("i-2", State.IDLE))
    s.poll(s.entry(B, "Locked"))
    s.tick()
    assert s.told(s.queue, "unlock", B) == 1  # the stale-lock fix
    s.tick(1)
    assert s.starts(B) == []


# -- 10: the queue's mailbox never waits on the container API; rendering never mutates ------------

class _BlockingLock:
    def __init__(self, inner):
        self._inner = inner
        self.entered = threading.Event()
        self.release = threading.Event()

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def lock(self, uuid):
        self.entered.set()
        self.release.wait(10)
        return self._inner.lock(uuid)


def test_10_queue_answers_while_a_lock_call_hangs():
    from actors.queue import QueueActor
    from actors.ticker import Ticker
    from api.arvados.inprocess import LocalArvadosClient
    from api.arvados.store import ContainerStore
    c = cluster(types=(1,))
    clock = FakeClock(T0)
    store = ContainerStore(":memory:", cluster_id="zzzzz", clock=clock)
    store.add_token(c.system_root_token, admin=True)
    client = _BlockingLock(LocalArvadosClient(store, c.system_root_token))
    uuid = client.create_container({"command": ["true"], "container_image": "img", "priority": 1,
                                    "runtime_constraints": {"vcpus": 1, "ram": 1 << 20}})["uuid"]
    sched = MagicMock(name="scheduler")
    ticker = Ticker(clock)
    q = QueueActor.start(client=client, chooser=TypeChooser(c), scheduler=sched, ticker=ticker,
                         cluster=c, first_now=T0).proxy()
    try:
        ticker.fire_due(T0)
        ACTIVITY.wait_idle()
        assert sched.queue_update.called
        q.lock.defer(uuid)
        assert client.entered.wait(5)
        # the API hangs on the lock: the queue must still take messages
        answered = q.forget("zzzzz-dz642-unknownxxxxxxxx").get(timeout=2)
        assert answered is None
    finally:
        client.release.set()
        ACTIVITY.wait_idle()
        q.actor_ref.stop(block=True)



def test_10_calls_still_queued_when_the_queue_stops_are_never_made(monkeypatch):
    """A stopped dispatcher must not go on locking containers: calls waiting for a pool thread
    are dropped (and uncounted), only the one in flight finishes."""
    import actors.queue as queue_mod
    from actors.ticker import Ticker
    from api.arvados.inprocess import LocalArvadosClient
    from api.arvados.store import ContainerStore
    monkeypatch.setattr(queue_mod, "OP_THREADS", 1)
    c = cluster(types=(1,))
    clock = FakeClock(T0)
    store = ContainerStore(":memory:", cluster_id="zzzzz", clock=clock)
    store.add_token(c.system_root_token, admin=True)
    client = _BlockingLock(LocalArvadosClient(store, c.system_root_token))
    uuids = [client.create_container({"command": ["true"], "container_image": "img", "priority": 1,
                                      "runtime_constraints": {"vcpus": 1, "ram": 1 << 20}})["uuid"]
             for _ in range(2)]
    ticker = Ticker(clock)
    q = queue_mod.QueueActor.start(client=client, chooser=TypeChooser(c), scheduler=MagicMock(),
                                   ticker=ticker, cluster=c, first_now=T0).proxy()
    try:
        ticker.fire_due(T0)
        ACTIVITY.wait_idle()
        q.lock.defer(uuids[0])
        assert client.entered.wait(5)
        q.lock(uuids[1]).get(timeout=5)  # queued behind the first, in the pool
    finally:
        q.actor_ref.stop(block=True)
        client.release.set()
        ACTIVITY.wait_idle()
    states = [client.get_container(u)["state"] for u in uuids]
    assert states == ["Locked", "Queued"]

def test_10_rendering_a_snapshot_changes_no_scheduler_state():
    s = Sched()
    s.list("i-1")
    s.report(s.view("i-1", State.IDLE))
    s.poll(*(s.entry(f"zzzzz-dz642-{i:015d}", "Queued") for i in range(5)))
    s.tick()
    before = {k: (len(v) if hasattr(v, "__len__") else v) for k, v in vars(s.s).items()
              if isinstance(v, (dict, list, set))}
    snap = s.box.snapshot
    assert len(snap.queue) == 5
    after = {k: (len(v) if hasattr(v, "__len__") else v) for k, v in vars(s.s).items()
             if isinstance(v, (dict, list, set))}
    assert after == before


# -- 11: a dispatcher cancel keeps crunch-run's runtime_status -------------------------------------

def test_11_cancel_keeps_runtime_status():
    c = cluster(types=(1,))
    sim = Simulation(c)
    api = sim.api
    ids = []
    for status in ({"warning": "disk almost full"}, {"error": "crunch-run: oom", "warning": "w2"}):
        u = sim.submit()
        api.lock(u)
        api.update(u, {"state": "Running", "runtime_status": status})
        ids.append(u)
    with sim:
        sim.step(20)  # Running on no worker (its VM is gone): the dispatcher cancels both
        got = {u: api.get_container(u, select=["state", "runtime_status"]) for u in ids}
    first, second = (got[u] for u in ids)
    assert first["state"] == second["state"] == "Cancelled"
    assert first["runtime_status"]["warning"] == "disk almost full"
    assert "not running on any worker" in first["runtime_status"]["error"]
    assert second["runtime_status"] == {"error": "crunch-run: oom", "warning": "w2"}


# -- 12: a transient boot-probe failure does not drain for good ------------------------------------

def test_12_drain_for_failing_boot_probe_is_lifted_when_it_recovers():
    dp = {"BootTime": "10s", "BootTimeJitter": "0s", "ContainerRunTime": "600s"}
    c = cluster(types=(1,), driver_parameters=dp)
    sim = Simulation(c).start()
    u = sim.submit()
    sim.run_until(lambda: state(sim, u) == "Running", 120)
    sim.stop()
    failing_until = sim.now + 40

    def hook(op, target, command):  # the boot probe fails for 40 s after the restart
        if op == "exec" and command == "true" and sim.clock.now() < failing_until:
            raise ExecutorError("chaos: connection reset")
    sim.cloud.fault_hook = hook
    sim2 = Simulation(c, store=sim.store, cloud=sim.cloud, clock=sim.clock).start()
    try:
        sim2.step(30)
        iid = sim2.snapshot.instances[0].instance
        sim2.step(60)  # the boot probe answers again
        (iv,) = sim2.snapshot.instances
        assert (iv.instance, iv.worker_state, iv.idle_behavior) == (iid, "running", "run")
        assert sim2.cloud.vm(iid).tags[c.tag("IdleBehavior")] == "run"
    finally:
        sim2.stop()


# -- 13: AlwaysUsePreemptibleInstances is the API server's business ---------------------------------

def test_13_explicit_non_preemptible_container_gets_on_demand_type():
    spot = replace(instance_type(1, preemptible=True), name="type1p", price=0.1)
    c = cluster(types=(spot, 1, 2), containers={"always_use_preemptible_instances": True})
    ch = TypeChooser(c)
    ctr = {"runtime_constraints": {"vcpus": 1, "ram": 256 << 20}, "container_image": "img",
           "scheduling_parameters": {"preemptible": False}}
    assert ch.choose(ctr)[0].name == "type1"
    ctr["scheduling_parameters"] = {}
    assert ch.choose(ctr)[0].name == "type1"  # as the API server gave it: not preemptible
    ctr["scheduling_parameters"] = {"preemptible": True}
    assert ch.choose(ctr)[0].name == "type1p"


# -- 14: a priority-0 supervisor past maxContainers -------------------------------------------------

def test_14_priority_zero_supervisor_past_max_containers():
    s = Sched()
    run_sup = s.entry(A, "Running", supervisor=True)
    held = s.entry(B, "Locked", priority=0, supervisor=True)
    limits = Limits(max_containers=1, max_supervisors=1, max_per_instance=0, max_instances=10,
                    max_concurrent_creates=0, n_workers=1, n_creating=0, at_quota=False,
                    create_throttled=False)
    slot = Slot("i-1", s.cluster.instance_types["type2"], State.RUNNING, Behavior.RUN, (A,))
    p = plan([run_sup, held], {A: None}, [slot], limits)
    assert p.statuses[B] == ("This container will not be scheduled to run because its priority is 0 "
                             "and state is Locked.")
    assert p.over_quota == 0
    assert B not in [u for u, _ in p.unlocks]


# -- 15: startup-fatal config problems are found before any cloud call ------------------------------

def test_15_check_config_rejects_empty_dispatch_private_key(tmp_path):
    cfg = tmp_path / "config.yml"
    cfg.write_text((ROOT / "tests/data/minimal.yml").read_text().replace("Driver: stub", "Driver: local"))
    r = subprocess.run([sys.executable, "-c", "import sys; from actors.cli import main; "
                        "sys.exit(main(sys.argv[1:]))", "check-config", "--config", str(cfg)],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 1, r.stdout
    assert "DispatchPrivateKey" in r.stderr and str(cfg) in r.stderr
    assert "Traceback" not in r.stderr


# -- 16: one log line per decision, not per pass ----------------------------------------------------

def test_16_kill_decision_logged_once(caplog):
    s = Sched()
    s.list("i-1")
    s.report(s.view("i-1", State.RUNNING, running=(B,)))
    s.poll(s.entry(B, "Complete"))
    with caplog.at_level(logging.INFO, logger="dispatch.scheduler"):
        for _ in range(4):
            s.tick(0.02)
    kills = [r for r in caplog.records if r.levelno >= logging.INFO and "kill container" in r.getMessage()]
    assert len(kills) == 1
