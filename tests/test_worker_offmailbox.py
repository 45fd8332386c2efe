"""A started WorkerActor keeps answering while its SSH commands wait (test layer 3).

One real WorkerActor on a pykka thread, a real Ticker on a FakeClock, an executor whose chosen
commands park until the test releases them, and thread-safe recorders for the scheduler and the
instance set. The test thread waits only on conditions (a command began, a report arrived) with
a bound for failure, never on the clock. Each test parks a probe and shows what the worker does
meanwhile: before the probes moved off the worker's thread, every one of these messages waited
behind the probe (a boot probe may wait up to TimeoutBooting, as Go's does).
"""

from __future__ import annotations

import itertools
import threading

import pytest

from actors.base import ACTIVITY
from actors.messages import Behavior, InstanceInfo, QueueEntry, State
from actors.resources import Resources
from actors.ticker import Ticker
from actors.worker import WorkerActor
from actors.workerpools import WorkerPools, probe_threads
from cloud.base import ExecResult
from cloud.clock import FakeClock
from tests.simcluster import cluster, instance_type, with_vms

T0 = 1_700_000_000.0
UUID = "zzzzz-dz642-abcdefghijklmno"
BOOT, LIST, DETACH, KILL = "bootprobe", "crunch-run --list", "crunch-run --detach", "crunch-run --kill"
OK = ExecResult(b"", b"", 0)
LISTED = ExecResult((UUID + "\n").encode(), b"", 0)
WAIT = 10.0  # bound on any wait for a report (failure only; a passing test waits milliseconds)


class Recorder:
    """Any method call is recorded; the test waits for one to arrive."""

    def __init__(self):
        self.calls: list[tuple[str, tuple]] = []
        self._cond = threading.Condition()

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)

        def record(*args):
            with self._cond:
                self.calls.append((name, args))
                self._cond.notify_all()

        return record

    def named(self, name: str) -> list[tuple]:
        with self._cond:
            return [a for n, a in self.calls if n == name]

    def wait(self, name: str, pred=lambda args: True) -> tuple:
        with self._cond:
            ok = self._cond.wait_for(lambda: any(n == name and pred(a) for n, a in self.calls), WAIT)
            assert ok, f"no {name} matching in {WAIT}s; got {[n for n, _ in self.calls]}"
            return next(a for n, a in self.calls if n == name and pred(a))

    def views(self):
        return [a[0] for a in self.named("worker_changed")]


class ParkingExecutor:
    """Answers by command prefix; a command whose prefix is parked waits until released."""

    def __init__(self, table, parked=()):
        self.table = dict(table)
        self.parked = set(parked)
        self.calls: list[str] = []
        self.threads: set[str] = set()  # where commands ran
        self._cond = threading.Condition()
        self._released: set[str] = set()
        self.waiting = 0

    def execute(self, command: str, stdin: bytes = b"", timeout=None) -> ExecResult:
        key = max((k for k in self.table if command.startswith(k)), key=len)
        with self._cond:
            self.calls.append(command)
            self.threads.add(threading.current_thread().name)
            self._cond.notify_all()
            if key in self.parked:
                self.waiting += 1
                try:
                    assert self._cond.wait_for(lambda: key in self._released, WAIT), f"{key} never released"
                finally:
                    self.waiting -= 1
        return self.table[key]

    def release(self, key: str | None = None) -> None:
        with self._cond:
            self._released |= set(self.table) if key is None else {key}
            self._cond.notify_all()

    def park(self, key: str) -> None:
        with self._cond:
            self.parked.add(key)
            self._released.discard(key)

    def count(self, prefix: str) -> int:
        with self._cond:
            return sum(c.startswith(prefix) for c in self.calls)

    def wait_begun(self, prefix: str, n: int = 1) -> None:
        with self._cond:
            ok = self._cond.wait_for(lambda: sum(c.startswith(prefix) for c in self.calls) >= n, WAIT)
            assert ok, f"{prefix!r} not run {n} time(s) in {WAIT}s; ran {self.calls}"

    def set_target(self, instance) -> None:
        pass

    def close(self) -> None:
        pass  # (a parked command outlives its worker, as one on a hung VM may)


class ZeroJitter:
    def uniform(self, a, b):
        return a


class Rig:
    """Started workers on one ticker and clock; stops them (and releases every park) at the end."""

    def __init__(self, pools=None):
        self.clock = FakeClock(T0)
        self.ticker = Ticker(self.clock)
        self.cluster = with_vms(cluster(), boot_probe_command=BOOT, probe_interval=10.0,
                                timeout_booting=600.0, timeout_probe=600.0, timeout_idle=3600.0,
                                timeout_signal=5.0, timeout_term=60.0, max_probes_per_second=0)
        self.pools = pools
        self.refs = []
        self.executors = []

    def worker(self, state: State, ex: ParkingExecutor, iid: str = "i-1"):
        sched, iset = Recorder(), Recorder()
        info = InstanceInfo(id=iid, address="10.0.0.1", provider_type="p", remote_user="root", tags={},
                            handle=object())
        kw = {} if self.pools is None else {"pools": self.pools}
        ref = WorkerActor.start(instance=info, instance_type=instance_type(1), state=state,
                                behavior=Behavior.RUN, now=T0, executor_factory=lambda cb: ex,
                                scheduler=sched, instance_set=iset, ticker=self.ticker,
                                cluster=self.cluster, rng=ZeroJitter(), clock=self.clock, **kw)
        self.refs.append(ref)
        self.executors.append(ex)
        ref.proxy().view.get(timeout=WAIT)  # on_start has run: its first deadline is booked
        return ref.proxy(), sched, iset

    def at(self, t: float) -> float:
        self.clock.set(T0 + t)
        self.ticker.fire_due(T0 + t)
        return T0 + t

    def close(self):
        for ex in self.executors:
            ex.release()
        for ref in self.refs:
            ref.stop(block=True, timeout=WAIT)
        if self.pools is not None:
            self.pools.shutdown()
        ACTIVITY.wait_idle(WAIT)  # every job ended (or was uncounted): nothing leaks


@pytest.fixture
def rig():
    r = Rig()
    yield r
    r.close()


def entry(uuid=UUID) -> QueueEntry:
    return QueueEntry(uuid=uuid, state="Locked", priority=1, container={"uuid": uuid},
                      instance_types=(instance_type(1),), resources=Resources(1, 1 << 30),
                      first_seen_at=T0)


def test_kill_instance_goes_out_while_the_boot_probe_waits(rig):
    ex = ParkingExecutor({BOOT: OK, LIST: OK}, parked={BOOT})
    w, sched, iset = rig.worker(State.BOOTING, ex)
    now = rig.at(0)
    ex.wait_begun(BOOT)
    w.kill_instance("operator", now + 1)
    iset.wait("destroy")  # the VM goes now, not when the boot probe gives up
    assert sched.views()[-1].state is State.SHUTDOWN
    ex.release(BOOT)  # the probe's answer arrives after the shutdown: it changes nothing
    w.view.get(timeout=WAIT)
    ACTIVITY.wait_idle(WAIT)
    view = w.view.get(timeout=WAIT)
    assert view.state is State.SHUTDOWN and len(iset.named("destroy")) == 1


def test_set_idle_behavior_answers_while_the_boot_probe_waits(rig):
    ex = ParkingExecutor({BOOT: OK, LIST: OK}, parked={BOOT})
    w, sched, iset = rig.worker(State.BOOTING, ex)
    now = rig.at(0)
    ex.wait_begun(BOOT)
    w.set_idle_behavior(Behavior.HOLD, now + 1)
    sched.wait("worker_changed", lambda a: a[0].idle_behavior is Behavior.HOLD)
    iset.wait("set_tags")
    assert ex.waiting == 1  # the boot probe is still out


def test_start_goes_out_while_the_run_probe_waits_and_its_stale_answer_keeps_the_start(rig):
    ex = ParkingExecutor({LIST: OK, DETACH: OK}, parked={LIST})
    w, sched, _ = rig.worker(State.IDLE, ex)
    now = rig.at(0)
    ex.wait_begun(LIST)  # this probe began before the start: its answer will not list UUID
    w.start_container(entry(), now + 1)
    ex.wait_begun(DETACH)  # at once, not after the probe
    sched.wait("worker_changed", lambda a: a[0].last_uuid == UUID)  # the detach's answer is in
    ex.release(LIST)
    ACTIVITY.wait_idle(WAIT)
    view = w.view.get(timeout=WAIT)
    assert view.running == (UUID,) and view.state is State.RUNNING
    assert sched.named("container_ended") == []  # the empty list predates the start: no erasure
    # the next probe (begun after the start's answer) is believed: its empty list ends the runner
    rig.at(20)
    ex.wait_begun(LIST, 2)
    ACTIVITY.wait_idle(WAIT)
    assert [a[0] for a in sched.named("container_ended")] == [UUID]
    assert w.view.get(timeout=WAIT).running == ()


def test_kill_goes_out_while_the_run_probe_waits_and_its_stale_answer_does_not_revive(rig):
    ex = ParkingExecutor({LIST: LISTED, KILL: OK})
    w, sched, _ = rig.worker(State.IDLE, ex)
    rig.at(0)
    sched.wait("worker_changed", lambda a: a[0].running == (UUID,))  # found by the first probe
    ACTIVITY.wait_idle(WAIT)
    ex.park(LIST)
    now = rig.at(11)
    ex.wait_begun(LIST, 2)  # this probe began before the kill: its answer still lists UUID
    w.kill_container(UUID, "cancelled", now + 1)
    ex.wait_begun(KILL)
    sched.wait("container_ended")
    ex.release(LIST)
    ACTIVITY.wait_idle(WAIT)
    view = w.view.get(timeout=WAIT)
    assert view.running == () and view.state is State.IDLE  # the stale list did not bring it back
    assert len(sched.named("container_ended")) == 1


def test_one_probe_in_flight_then_the_overdue_one_at_once(rig):
    ex = ParkingExecutor({LIST: OK}, parked={LIST})
    w, _, _ = rig.worker(State.IDLE, ex)
    rig.at(0)
    ex.wait_begun(LIST)
    for t in (10, 20, 30, 40):
        rig.at(t)
        w.view.get(timeout=WAIT)  # each tick handled
    assert ex.count(LIST) == 1
    ex.release(LIST)
    ACTIVITY.wait_idle(WAIT)  # its answer is applied
    rig.ticker.fire_due(rig.clock.now())  # the answer booked the overdue probe for now
    ex.wait_begun(LIST, 2)


def test_a_slow_failed_probe_counts_from_when_it_began(rig):
    """Go: "using the start time of the probe as the timeout threshold ensures we always initiate
    at least one probe attempt after the boot/probe timeout expires"."""
    ex = ParkingExecutor({LIST: ExecResult(b"", b"no\n", 1)}, parked={LIST})
    w, _, iset = rig.worker(State.IDLE, ex)
    rig.at(595)  # TimeoutProbe is 600 s from the last answer (T0)
    ex.wait_begun(LIST)
    rig.clock.set(T0 + 700)  # it fails after the timeout...
    ex.release(LIST)
    ACTIVITY.wait_idle(WAIT)
    assert w.view.get(timeout=WAIT).state is State.IDLE  # ...but began before it: not unresponsive
    assert iset.named("destroy") == []
    rig.at(700)  # the next one begins after it
    iset.wait("destroy")


def test_stop_while_a_probe_waits_leaks_no_job():
    """Stopping a worker whose probe is out: the job ends on its own and tells a stopped actor;
    a job still queued in a pool that shuts down is cancelled; the barrier counts neither."""
    pools = WorkerPools.create(boot=1, probe=1, command=1)
    rig = Rig(pools)
    try:
        ex_a = ParkingExecutor({LIST: OK}, parked={LIST})
        ex_b = ParkingExecutor({LIST: OK})
        rig.worker(State.IDLE, ex_a, "i-a")
        rig.at(0)
        ex_a.wait_begun(LIST)  # holds the only probe thread
        w_b, _, _ = rig.worker(State.IDLE, ex_b, "i-b")
        rig.at(0)
        w_b.view.get(timeout=WAIT)  # B's tick handled: its probe waits in the pool's queue
        for ref in rig.refs:
            ref.stop(block=True, timeout=WAIT)  # handled at once: nothing blocks the mailboxes
        pools.shutdown()
        assert ACTIVITY.pending >= 1  # A's job is still out
        ex_a.release()
        ACTIVITY.wait_idle(WAIT)
        assert ex_b.count(LIST) == 0  # cancelled, and uncounted
    finally:
        rig.close()


def test_boot_probes_do_not_starve_booted_workers():
    """One thread of each kind: a boot probe that waits (cloud-init --wait) holds the boot pool
    only; another worker's start and run probe still go out."""
    rig = Rig(WorkerPools.create(boot=1, probe=1, command=1))
    try:
        booting = ParkingExecutor({BOOT: OK, LIST: OK}, parked={BOOT})
        busy = ParkingExecutor({LIST: OK, DETACH: OK})
        rig.worker(State.BOOTING, booting, "i-boot")
        w, sched, _ = rig.worker(State.IDLE, busy, "i-idle")
        now = rig.at(0)
        booting.wait_begun(BOOT)
        busy.wait_begun(LIST)
        w.start_container(entry(), now + 1)
        busy.wait_begun(DETACH)
        sched.wait("worker_changed", lambda a: a[0].last_uuid == UUID)
        assert booting.waiting == 1
        ran = booting.threads | busy.threads
        assert ran and all(t.startswith("ssh-") for t in ran), ran  # never a WorkerActor's thread
    finally:
        rig.close()


@pytest.mark.parametrize("rate,interval,want", [(10, 10.0, 80), (0, 10.0, 256), (1, 10.0, 16),
                                                (100, 60.0, 256)])
def test_probe_pool_covers_what_max_probes_per_second_lets_begin(rate, interval, want):
    assert probe_threads(rate, interval) == want


# -- starts and kills: at most pools.per_worker out per worker, the rest queued in the worker -----


class Gated(ParkingExecutor):
    """Parked commands go one per ``permit``, oldest waiter first; ``peak`` is the most ever waiting."""

    def __init__(self, table, parked=()):
        super().__init__(table, parked)
        self.permits = 0
        self.peak = 0
        self._tickets = itertools.count()
        self._serving = 0

    def execute(self, command: str, stdin: bytes = b"", timeout=None) -> ExecResult:
        key = max((k for k in self.table if command.startswith(k)), key=len)
        with self._cond:
            self.calls.append(command)
            self._cond.notify_all()
            if key in self.parked and key not in self._released:
                ticket = next(self._tickets)
                self.waiting += 1
                self.peak = max(self.peak, self.waiting)
                try:
                    ok = self._cond.wait_for(lambda: key in self._released or (
                        self.permits > 0 and self._serving == ticket), WAIT)
                    assert ok, f"{key} never let go"
                    if key not in self._released:
                        self.permits -= 1
                        self._serving += 1
                        self._cond.notify_all()
                finally:
                    self.waiting -= 1
        return self.table[key]

    def permit(self) -> None:
        with self._cond:
            self.permits += 1
            self._cond.notify_all()


def uuid_(i: int) -> str:
    return f"zzzzz-dz642-{i:015d}"


def detached(ex) -> list[str]:
    """The container UUIDs of the --detach commands sent, in order (the last, quoted, word)."""
    return [c.split()[-1].strip("'\"") for c in ex.calls if c.startswith(DETACH)]


def test_hung_vms_with_many_starts_do_not_delay_a_start_on_a_healthy_vm():
    """Five command threads, two per worker: two VMs that never answer their --detach hold four;
    the healthy VM's start goes out and is answered at once. (Before the bound, the hung VMs'
    ten starts took every thread for up to 300 s each.)"""
    rig = Rig(WorkerPools.create(boot=1, probe=1, command=5, per_worker=2))
    try:
        hung = []
        for h in range(2):
            ex = ParkingExecutor({LIST: OK, DETACH: OK}, parked={DETACH})
            w, _, _ = rig.worker(State.IDLE, ex, f"i-hung{h}")
            for i in range(5):
                w.start_container(entry(uuid_(10 * h + i)), T0)
            w.view.get(timeout=WAIT)
            hung.append(ex)
        for ex in hung:
            ex.wait_begun(DETACH, 2)
        healthy = ParkingExecutor({LIST: OK, DETACH: OK})
        w, sched, _ = rig.worker(State.IDLE, healthy, "i-ok")
        w.start_container(entry(), T0)
        sched.wait("worker_changed", lambda a: a[0].last_uuid == UUID)  # its --detach answered
        assert [ex.count(DETACH) for ex in hung] == [2, 2]  # the rest wait in their workers
        assert all(ex.waiting == 2 for ex in hung)
    finally:
        rig.close()


def test_queued_starts_go_out_in_order_as_earlier_ones_answer():
    rig = Rig(WorkerPools.create(boot=1, probe=1, command=8, per_worker=2))
    try:
        ex = Gated({LIST: OK, DETACH: OK}, parked={DETACH})
        w, sched, _ = rig.worker(State.IDLE, ex)
        uuids = [uuid_(i) for i in range(5)]
        for u in uuids:
            w.start_container(entry(u), T0)
        for n in range(2, 6):
            ex.wait_begun(DETACH, n)  # one more goes out only when an earlier one has answered
            assert ex.count(DETACH) == n
            ex.permit()
        ex.permit()
        ACTIVITY.wait_idle(WAIT)
        assert ex.peak == 2
        assert detached(ex) == uuids
        view = w.view.get(timeout=WAIT)
        assert view.running == tuple(uuids) and view.last_uuid == uuids[-1]
    finally:
        rig.close()


def test_a_kill_drops_its_containers_queued_start():
    """The start never went out: crunch-run never ran there, so the runner ends at once, with
    no --kill and no --detach behind the earlier start that still waits."""
    rig = Rig(WorkerPools.create(boot=1, probe=1, command=4, per_worker=1))
    try:
        ex = ParkingExecutor({LIST: OK, DETACH: OK, KILL: OK}, parked={DETACH})
        w, sched, _ = rig.worker(State.IDLE, ex)
        w.start_container(entry(uuid_(1)), T0)
        w.start_container(entry(uuid_(2)), T0)
        ex.wait_begun(DETACH)
        w.kill_container(uuid_(2), "cancelled", T0 + 1)
        sched.wait("container_ended", lambda a: a[0] == uuid_(2))
        assert ex.waiting == 1  # ended while the first start still waits
        ex.release()
        ACTIVITY.wait_idle(WAIT)
        assert detached(ex) == [uuid_(1)] and ex.count(KILL) == 0
        assert w.view.get(timeout=WAIT).running == (uuid_(1),)
    finally:
        rig.close()


def test_shutdown_drops_queued_commands():
    """Queued starts were never counted by the barrier: dropping them leaks nothing (the rig's
    close and conftest check it), and they never go out after the shutdown."""
    rig = Rig(WorkerPools.create(boot=1, probe=1, command=8, per_worker=2))
    try:
        ex = ParkingExecutor({LIST: OK, DETACH: OK, KILL: OK}, parked={DETACH})
        w, sched, iset = rig.worker(State.IDLE, ex)
        for i in range(5):
            w.start_container(entry(uuid_(i)), T0)
        ex.wait_begun(DETACH, 2)
        w.kill_instance("operator", T0 + 1)
        iset.wait("destroy")
        ex.release()
        ACTIVITY.wait_idle(WAIT)
        assert ex.count(DETACH) == 2 and ex.count(KILL) == 0
        assert w.view.get(timeout=WAIT).state is State.SHUTDOWN
    finally:
        rig.close()


def test_a_kill_never_overtakes_its_own_start(rig):
    """A kill decided while the container's --detach is out waits for the start's answer: sent at
    once, it could reach the VM before crunch-run exists, succeed, end the runner, and the detach
    would then start crunch-run anyway (before the SSH calls left the worker's thread, the detach
    always finished first)."""
    ex = ParkingExecutor({LIST: OK, DETACH: OK, KILL: OK}, parked={DETACH})
    w, sched, _ = rig.worker(State.IDLE, ex)
    w.start_container(entry(), T0)
    ex.wait_begun(DETACH)
    w.kill_container(UUID, "cancelled", T0 + 1)
    w.view.get(timeout=WAIT)  # the kill is handled
    ex.release(DETACH)
    ACTIVITY.wait_idle(WAIT)
    assert ex.count(KILL) == 0 and not sched.named("container_ended")  # the clock has not moved
    rig.at(1 + 5.0 + 0.1)  # TimeoutSignal later: the next signal goes out
    ex.wait_begun(KILL)
    sched.wait("container_ended", lambda a: a[0] == UUID)


def test_no_kill_goes_to_a_worker_being_shut_down(rig):
    """A kill decided after the instance's destroy was sent would SSH into a VM on its way out
    (and wait for it to time out): the worker sends nothing once it is shut down."""
    ex = ParkingExecutor({LIST: LISTED, KILL: OK})
    w, sched, iset = rig.worker(State.IDLE, ex)
    rig.at(0)
    sched.wait("worker_changed", lambda a: a[0].running == (UUID,))
    ACTIVITY.wait_idle(WAIT)
    w.kill_instance("operator", T0 + 1)
    iset.wait("destroy")
    w.kill_container(UUID, "cancelled", T0 + 2)
    w.view.get(timeout=WAIT)  # the kill is handled
    ACTIVITY.wait_idle(WAIT)
    assert ex.count(KILL) == 0


class _Observed:
    def __init__(self):
        self.values = []

    def observe(self, v):
        self.values.append(v)

    def labels(self, **kw):
        return self

    def inc(self, *a):
        pass


class _Metrics:
    def __init__(self):
        self.time_to_ssh = _Observed()
        self.boot_outcomes = _Observed()

    def __getattr__(self, name):
        return _Observed()


def test_time_to_ssh_is_dated_when_the_host_was_verified():
    """The executor proves the host on a pool thread; the message it sends is handled later, and
    the worker's own time then is its last tick's (here when the boot probe began): the metric
    took that, not the verification's time."""
    rig = Rig()
    try:
        verified = []

        class Verifying(ParkingExecutor):
            def execute(self, command, stdin=b"", timeout=None):
                if command.startswith(BOOT) and not verified:
                    rig.clock.set(T0 + 7)  # the SSH handshake took 7 s
                    verified.append(1)
                    self.hook()
                return super().execute(command, stdin, timeout)

        ex = Verifying({BOOT: OK, LIST: OK}, parked={BOOT})
        metrics = _Metrics()
        info = InstanceInfo(id="i-1", address="10.0.0.1", provider_type="p", remote_user="root", tags={},
                            handle=object())

        def factory(hook):
            ex.hook = hook
            return ex
        ref = WorkerActor.start(instance=info, instance_type=instance_type(1), state=State.BOOTING,
                                behavior=Behavior.RUN, now=T0, executor_factory=factory,
                                scheduler=Recorder(), instance_set=Recorder(), ticker=rig.ticker,
                                cluster=rig.cluster, rng=ZeroJitter(), clock=rig.clock, metrics=metrics)
        rig.refs.append(ref)
        rig.executors.append(ex)
        ref.proxy().view.get(timeout=WAIT)
        rig.ticker.fire_due(T0)
        ex.wait_begun(BOOT)
        ref.proxy().view.get(timeout=WAIT)  # the verification's message is handled
        assert metrics.time_to_ssh.values == [7.0]
    finally:
        rig.close()


def test_a_starts_config_data_is_made_off_the_mailbox(rig, monkeypatch):
    """crunch-run's stdin is the whole cluster config as Go JSON (~0.5 ms of CPU each start):
    made on the command pool's thread with the --detach, not in the worker's handler."""
    from actors import worker as worker_mod
    made_on = []
    real = worker_mod.crunchrun.config_data

    def config_data(*a, **kw):
        made_on.append(threading.current_thread().name)
        return real(*a, **kw)
    monkeypatch.setattr(worker_mod.crunchrun, "config_data", config_data)
    ex = ParkingExecutor({LIST: OK, DETACH: OK})
    w, sched, _ = rig.worker(State.IDLE, ex)
    w.start_container(entry(), T0)
    ex.wait_begun(DETACH)
    ACTIVITY.wait_idle(WAIT)
    assert len(made_on) == 1 and made_on[0] in ex.threads and not made_on[0].startswith("WorkerActor")
