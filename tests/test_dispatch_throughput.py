"""Issue 15 (dispatch throughput): its causes, one test each, on a fake clock.

The SchedulerActor and QueueActor are used as plain objects (not started; test layer 2): their
collaborators are doubles built from the inbox declarations (actors.inbox); time is whatever
``now`` the test passes, and a pass runs only when the test calls ``tick``. Each test names what
it held back before its fix.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from unittest.mock import Mock, create_autospec

import pytest

from actors.inbox import InstanceSetInbox, QueueInbox, WorkerInbox
from actors.messages import Behavior, InstanceInfo, QueueEntry, State, WorkerView
from actors.resources import Resources
from actors.scheduler import SchedulerActor, SnapshotBox
from tests.simcluster import cluster, instance_type

T0 = 1_700_000_000.0
TYPE = instance_type(1)


class Harness:
    """A scheduler with ``n`` ready (idle) instances of type1 and a queue of its own making."""

    def __init__(self, n: int, **vms):
        self.cluster = cluster(types=(1,), max_instances=n, **vms)
        self.workers: dict[str, Mock] = {}

        def make_worker(info, it, state, behavior, now, secret):
            w = create_autospec(WorkerInbox, instance=True)
            self.workers[info.id] = w
            return w
        self.s = SchedulerActor(cluster=self.cluster, set_id="set1", ticker=Mock(), box=SnapshotBox(),
                                worker_factory=make_worker, public_key=None, first_now=T0)
        self.queue = create_autospec(QueueInbox, instance=True)
        self.iset = create_autospec(InstanceSetInbox, instance=True)
        self.s.wire(self.queue, self.iset)
        tag = self.cluster.tag
        infos = tuple(InstanceInfo(id=f"i-{k}", address=f"10.0.0.{k}", provider_type=TYPE.provider_type,
                                   remote_user="root", tags={tag("InstanceType"): TYPE.name})
                      for k in range(n))
        self.s.instances_listed(infos, T0)
        for info in infos:
            self.report(info.id)
        self.s.queue_update((), (), T0)
        self.tick(T0)

    def report(self, iid: str, *running: str, state: State = State.IDLE) -> None:
        self.s.worker_changed(WorkerView(
            instance_id=iid, instance_type=TYPE, state=state if not running else State.RUNNING,
            idle_behavior=Behavior.RUN, address="", provider_type=TYPE.provider_type,
            running=tuple(sorted(running)), probe_done=True))

    def tick(self, now: float) -> None:
        self.s._dirty = True
        self.s.tick(now)

    def starts(self) -> list[tuple[str, str]]:
        return [(c.args[0].uuid, iid) for iid, w in self.workers.items()
                for c in w.start_container.call_args_list]


def entry(k: int, state: str = "Queued", priority: int = 1) -> QueueEntry:
    uuid = f"zzzzz-dz642-{k:015d}"
    return QueueEntry(uuid=uuid, state=state, priority=priority, container={"uuid": uuid, "state": state},
                      instance_types=(TYPE,), resources=Resources(1, 1 << 30), first_seen_at=T0)


def test_start_goes_out_as_soon_as_the_lock_succeeds():
    """Before: a lock's success only marked the scheduler dirty, and the start waited for the next
    pass (at 1,000 locks, a full pass per answer kept the starts behind the locks)."""
    h = Harness(3)
    es = [entry(k) for k in range(3)]
    h.s.queue_update(tuple(es), (), T0)
    h.tick(T0 + 1)
    assert sorted(c.args[0] for c in h.queue.lock.call_args_list) == sorted(e.uuid for e in es)
    for e in es:
        h.s.container_op_done(e.uuid, "lock", replace(e, state="Locked"), "")
    started = h.starts()  # no tick, no pass: each start went out with its lock's answer
    assert sorted(u for u, _ in started) == sorted(e.uuid for e in es)
    assert len({iid for _, iid in started}) == 3  # one per instance, as the pass held them
    h.tick(T0 + 2)
    assert len(h.starts()) == 3  # and the next pass does not start them again


def test_a_worker_confirming_a_start_triggers_no_pass():
    """Before: every worker's report of a start the scheduler had sent (idle -> running, the same
    container) made the scheduler dirty, so a burst of 1,000 starts ran ~30 passes a second,
    each over all 1,000 workers (a third of the dispatcher's CPU in the burst). The planner
    treats idle and running alike; a change of containers still triggers a pass."""
    h = Harness(2)
    e = entry(1)
    h.s.queue_update((e,), (), T0)
    h.tick(T0 + 1)
    h.s.container_op_done(e.uuid, "lock", replace(e, state="Locked"), "")
    [(uuid, iid)] = h.starts()
    h.s._dirty = False
    h.report(iid, uuid)  # RUNNING, with the container we started
    assert not h.s._dirty
    h.s.worker_changed(replace(h.s._workers[iid].view, state=State.IDLE, running=(), starts_seen=1))
    assert h.s._dirty  # it ended (a probe after the start): idle, nothing running -- that is news


def test_no_early_start_where_the_held_instance_has_no_room_any_more():
    h = Harness(1)
    e = entry(1)
    h.s.queue_update((e,), (), T0)
    h.tick(T0 + 1)
    h.report("i-0", "zzzzz-dz642-somethingelse00", state=State.RUNNING)  # an adopted container
    h.s.container_op_done(e.uuid, "lock", replace(e, state="Locked"), "")
    assert h.starts() == []


def test_one_kill_per_container_per_reason_never_one_per_pass(caplog):
    """Before: every pass decided (and logged, and told the worker) the same kill again, 16,951
    times for 1,000 containers in the bench. The worker escalates on its own timer."""
    h = Harness(1)
    e = entry(1, state="Locked")
    h.s.queue_update((e,), (), T0)
    h.report("i-0", e.uuid)
    h.s.queue_update((replace(e, state="Complete"),), (), T0 + 1)
    with caplog.at_level(logging.INFO, logger="dispatch.scheduler"):
        for k in range(5):
            h.tick(T0 + 2 + k)
    kills = h.workers["i-0"].kill_container.call_args_list
    assert [c.args[:2] for c in kills] == [(e.uuid, "state=Complete")]
    assert sum(r.getMessage().startswith("kill container because") for r in caplog.records) == 1
    # a new reason is a new decision
    h.s.queue_update((replace(e, state="Running", priority=0),), (), T0 + 8)
    h.tick(T0 + 9)
    h.tick(T0 + 10)
    assert [c.args[1] for c in h.workers["i-0"].kill_container.call_args_list] == ["state=Complete", "priority=0"]


def test_a_container_seen_again_after_its_end_is_killed_again():
    h = Harness(1)
    e = entry(1, state="Complete")
    h.report("i-0", e.uuid)
    h.s.queue_update((e,), (), T0 + 1)
    h.tick(T0 + 2)
    h.s.container_ended(e.uuid, "i-0", T0 + 2.5)
    h.report("i-0", e.uuid)  # a later probe finds it running after all
    h.tick(T0 + 3)
    assert len(h.workers["i-0"].kill_container.call_args_list) == 2


def test_an_exited_container_is_forgotten_without_a_kill(caplog):
    h = Harness(1)
    e = entry(1, state="Running")
    h.s.queue_update((e,), (), T0)
    h.report("i-0", e.uuid)
    h.tick(T0 + 1)
    h.s.container_ended(e.uuid, "i-0", T0 + 1.5)
    h.report("i-0")
    h.s.queue_update((replace(e, state="Complete"),), (), T0 + 2)
    with caplog.at_level(logging.INFO, logger="dispatch.scheduler"):
        h.tick(T0 + 3)
        h.tick(T0 + 4)
    assert not h.workers["i-0"].kill_container.called
    assert not any(r.getMessage().startswith("kill container") for r in caplog.records)
    h.queue.forget.assert_called_once_with(e.uuid)


def test_creates_overlap_up_to_max_concurrent_instance_create_ops():
    """Before: the cloud-op pool had at most 32 threads, so with MaxConcurrentInstanceCreateOps
    50 (the bench's setting) no more than 32 creates were ever in the cloud at once. One
    started InstanceSetActor over the stub cloud, whose creates are held until released."""
    from actors.instance_set import InstanceSetActor
    from actors.inbox import SchedulerInbox
    from actors.ticker import Ticker
    from cloud.clock import FakeClock
    from cloud.stub.driver import StubCloud
    from cloud.stub.vm import StubParams

    n = 50
    cl = cluster(types=(1,), max_instances=n, max_concurrent_instance_create_ops=n)
    clock = FakeClock(T0)
    cloud = StubCloud(clock, StubParams(boot_time=1.0, boot_time_jitter=0.0), seed=1)
    cloud.hold_cloud_ops()
    scheduler = create_autospec(SchedulerInbox, instance=True)
    ref = InstanceSetActor.start(instance_set=cloud.instance_set("set1"), set_id="set1", cluster=cl,
                                 scheduler=scheduler, ticker=Ticker(clock), first_now=T0)
    try:
        iset = ref.proxy()
        for k in range(n):
            iset.create(f"req{k}", TYPE, {cl.tag("InstanceSetID"): "set1"}, "", None, T0)
        assert cloud.wait_held(n, timeout=10), f"only {cloud._waiting} creates in flight at once"
    finally:
        cloud.release_cloud_ops(0, stop_holding=True)
        ref.stop(timeout=10)
        cloud.stop()


class _MountsApi:
    """A container API double for one poll: ``queued`` are Queued; a list by uuid answers mounts
    (and waits at ``barrier`` first, if given); every call is counted by kind."""

    def __init__(self, queued, barrier=None):
        self.queued, self.barrier, self.calls = queued, barrier, []

    def current_token_uuid(self):
        return "zzzzz-gj3su-000000000000000"

    def iter_containers(self, **kw):
        return iter(())

    def list_containers(self, filters, offset=0, **kw):
        by_uuid = [f for f in filters if f[0] == "uuid" and f[1] == "in"]
        if by_uuid:
            self.calls.append(("list-mounts", len(by_uuid[0][2])))
            if self.barrier is not None:
                self.barrier.wait()
            return [{"uuid": u, "mounts": {"/tmp": {"kind": "tmp", "capacity": 1 << 30}}}
                    for u in by_uuid[0][2]]
        self.calls.append(("list", 0))
        return [dict(e.container, priority=1) for e in self.queued] if offset == 0 else []

    def get_container(self, uuid, select=None):
        self.calls.append(("get", 1))
        return {"uuid": uuid, "mounts": {"/tmp": {"kind": "tmp", "capacity": 1 << 30}}}


def _queue_actor(api):
    from actors.queue import QueueActor
    return QueueActor(client=api, chooser=Mock(), scheduler=Mock(), ticker=Mock(),
                      cluster=cluster(types=(1,), poll_interval=1.0), first_now=T0)


def test_a_poll_fetches_new_containers_mounts_in_batches():
    """Before: one GET per new container (Go's addEnt does the same): 1,000 new containers cost
    the API server and the dispatcher 1,000 requests, and the poll took 1.6-2 s on 2 cores
    before any of them could be locked. Now one list call by uuid covers MOUNTS_BATCH."""
    from actors.queue import MOUNTS_BATCH

    es = [entry(k) for k in range(3 * MOUNTS_BATCH + 1)]
    api = _MountsApi(es)
    res = _queue_actor(api)._fetch(T0, set())
    assert not res.error
    assert sorted(res.mounts) == sorted(e.uuid for e in es)
    assert ("get", 1) not in api.calls
    assert sorted(n for kind, n in api.calls if kind == "list-mounts") == [1] + [MOUNTS_BATCH] * 3


def test_a_poll_fetches_mounts_batches_in_parallel():
    """MOUNTS_PARALLEL batches are in flight together: the API double answers one only once
    MOUNTS_PARALLEL of them are waiting (a barrier); one batch at a time, none is answered."""
    import threading
    from actors.queue import MOUNTS_BATCH, MOUNTS_PARALLEL

    es = [entry(k) for k in range(2 * MOUNTS_PARALLEL * MOUNTS_BATCH)]
    api = _MountsApi(es, threading.Barrier(MOUNTS_PARALLEL, timeout=5))
    res = _queue_actor(api)._fetch(T0, set())
    assert not res.error
    assert sorted(res.mounts) == sorted(e.uuid for e in es)


def test_a_mounts_batch_that_fails_fails_the_poll(caplog):
    """A failed batch fails the whole poll, which the next one repeats: leaving its containers
    out would make Running ones "not in queue" (tests/test_scenarios.py, test_4_a_failed_...)."""
    from actors.queue import MOUNTS_BATCH

    es = [entry(k) for k in range(2 * MOUNTS_BATCH)]

    class Failing(_MountsApi):
        def list_containers(self, filters, offset=0, **kw):
            by_uuid = [f for f in filters if f[0] == "uuid" and f[1] == "in"]
            if by_uuid and es[0].uuid in by_uuid[0][2]:
                raise RuntimeError("503 service unavailable")
            return super().list_containers(filters, offset, **kw)
    with caplog.at_level(logging.WARNING, logger="dispatch.queue"):
        with pytest.raises(RuntimeError, match="503"):
            _queue_actor(Failing(es))._fetch(T0, set())
    assert any(r.getMessage() == "error getting mounts" for r in caplog.records)


# -- the planner's placement: a few pristine instances stand for all of them -----------------------

def _random_case(rng):
    """A random queue and pool: types of 1/2/4 VCPUs, instances in every state and behaviour,
    some running containers of the queue, creates in flight, 0-VCPU containers, and limits."""
    from actors.planner import Limits, Slot
    types = [instance_type(k) for k in (1, 2, 4)]
    entries, running = [], {}
    for k in range(rng.randint(0, 40)):
        elig = tuple(sorted(rng.sample(types, rng.randint(1, 3)), key=lambda t: t.price))
        v = rng.choice((0, 1, 1, 1, 2, 4))
        if v > elig[-1].vcpus:
            elig = (types[2],)
        uuid = f"zzzzz-dz642-{k:015d}"
        st = rng.choice(("Queued", "Queued", "Queued", "Locked", "Running"))
        entries.append(QueueEntry(uuid=uuid, state=st, priority=rng.choice((0, 1, 1, 2, 3)),
                                  container={"uuid": uuid}, instance_types=elig,
                                  resources=Resources(v, rng.choice((1, 2)) << 29), first_seen_at=float(k)))
    pool = [e.uuid for e in entries if e.state in ("Locked", "Running")]
    rng.shuffle(pool)
    slots = []
    for k in range(rng.randint(0, 30)):
        it = rng.choice(types)
        st = rng.choice((State.IDLE, State.IDLE, State.RUNNING, State.BOOTING, State.UNKNOWN, State.SHUTDOWN))
        beh = rng.choice((Behavior.RUN,) * 6 + (Behavior.HOLD, Behavior.DRAIN))
        run = tuple(pool.pop() for _ in range(rng.randint(0, 2)) if pool) if st is not State.BOOTING else ()
        for u in run:
            running[u] = None
        slots.append(Slot("" if (st is State.BOOTING and rng.random() < 0.4) else f"i-{k:03d}", it, st, beh, run))
    limits = Limits(max_containers=rng.choice((0, 0, 10, 25)), max_supervisors=0,
                    max_per_instance=rng.choice((0, 0, 1, 2)), max_instances=rng.choice((0, 20, 40)),
                    max_concurrent_creates=rng.choice((0, 3)), n_workers=sum(1 for s in slots if s.id),
                    n_creating=sum(1 for s in slots if not s.id), at_quota=rng.random() < 0.1,
                    create_throttled=rng.random() < 0.1)
    return entries, running, slots, limits


def _summary(p):
    return (p.locks, p.lock_targets, p.starts, [(t.name, u) for t, u in p.creates], p.unlocks,
            p.shutdowns, p.statuses, p.at_quota, p.create_limited, p.allocated_not_started, p.over_quota)


def test_placement_shortcut_picks_what_a_scan_of_every_instance_picks(monkeypatch):
    """The planner looks at few pristine instances per container (planner.candidates); over
    2,000 random pools its plans equal those of the full scan it replaced."""
    import random
    from actors import planner

    def every_instance(groups, need, per_inst):
        fs = [f for g in groups for f in (*g.pristine, *g.touched)
              if (per_inst <= 0 or len(f.running) < per_inst) and f.fits(need)]
        return sorted({id(f): f for f in fs}.values(), key=lambda f: f.order)
    for seed in range(2000):
        entries, running, slots, limits = _random_case(random.Random(seed))
        fast = _summary(planner.plan(entries, running, slots, limits))
        with monkeypatch.context() as m:
            m.setattr(planner, "candidates", every_instance)
            full = _summary(planner.plan(entries, running, slots, limits))
        assert fast == full, f"seed {seed}"


def test_a_pass_placing_many_locks_on_many_idle_instances_is_not_quadratic(monkeypatch):
    """Before: every Queued container scanned every idle instance of its type: 500 locks onto
    1,000 idle instances were 500,000 fit checks, 200 ms of CPU per pass in the bench (0.4-1 s
    of wall time on the busy machine), and the lock answers queued behind each such pass held
    their starts back. Counted, not timed: fit checks per container stay a handful."""
    from actors import planner
    from actors.planner import Limits, Slot

    calls = [0]
    real = planner._Free.fits

    def counting(self, r):
        calls[0] += 1
        return real(self, r)
    monkeypatch.setattr(planner._Free, "fits", counting)
    slots = [Slot(f"i-{k:04d}", TYPE, State.IDLE, Behavior.RUN, ()) for k in range(1000)]
    queue = [entry(k) for k in range(500)]
    limits = Limits(max_containers=0, max_supervisors=0, max_per_instance=0, max_instances=1000,
                    max_concurrent_creates=0, n_workers=1000, n_creating=0, at_quota=False,
                    create_throttled=False)
    p = planner.plan(queue, {}, slots, limits)
    assert len(p.locks) == 500 and len(set(p.lock_targets.values())) == 500
    assert calls[0] <= 4 * len(queue), f"{calls[0]} fit checks for {len(queue)} containers"


def test_locks_go_out_in_parallel_beyond_eight():
    """Before: the QueueActor ran lock/unlock/cancel on 8 threads, so no more than 8 locks were
    ever in flight (100-150 locks/s on this machine, 7-10 s for a burst of 1,000). Now the
    bound is the API client's RequestLimiter (16 with Arvados' default MaxConcurrentRequests).
    The API double answers a lock only once 16 are waiting together (a barrier)."""
    import threading
    from actors.queue import QueueActor

    n = 16
    barrier = threading.Barrier(n, timeout=5)
    done = []

    class Api:
        def lock(self, uuid):
            barrier.wait()
            done.append(uuid)
            return {"uuid": uuid, "state": "Locked", "priority": 1, "locked_by_uuid": "me"}

    q = QueueActor(client=Api(), chooser=Mock(), scheduler=Mock(), ticker=Mock(),
                   cluster=cluster(types=(1,), poll_interval=1.0), first_now=T0)
    es = [entry(k) for k in range(n)]
    q._entries = {e.uuid: e for e in es}
    try:
        for e in es:
            q.lock(e.uuid)
        q._ops.shutdown(wait=True)
    finally:
        q._ops.shutdown(wait=False)
    assert sorted(done) == sorted(e.uuid for e in es)
