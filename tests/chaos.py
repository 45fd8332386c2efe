"""An invariant-checking chaos simulation: the real actors on a FakeClock, the stub cloud with
every fault it knows, a container API that fails and answers slowly, worker reports delayed
against starts, operators and users acting, and dispatcher restarts at random moments (a new
actor system over the same cloud, container store and clock).

After every step (and, for G2, at every ``crunch-run --detach`` sent) it checks:

G1  every instance tagged with our InstanceSetID is a worker the dispatcher knows, or is being
    destroyed; none is left once the queue is empty and TimeoutIdle has passed (held ones aside);
G2  no container is sent ``--detach`` while an earlier attempt of it still runs (on any
    instance), nor while it is not Locked by us, nor while we are unlocking or cancelling it;
G3  every container ends Complete, or Cancelled with a reason in runtime_status (a user's cancel
    aside); none stays Locked by us for long once we no longer run it;
G4  an operator's hold/drain/run, once saved in the instance's tag, is what the dispatcher
    applies, across restarts.

A violation records the seed and the events (faults, restarts, operator actions, starts and
container API calls, crunch-run and instance lifecycles, and the dispatcher's view of the
container at each start) that led to it.

The actors run on pykka's threads, not on the deterministic single-thread runtime: a slow call
parks the thread that made it (a pool thread, or one a job started itself, such as the poll's
mounts fetches) until the simulated clock reaches its end, which one thread running every job
inline cannot model. So a seed fixes the faults and the timeline, not the interleaving. :class:`Chaos` is driven either by a seeded random
timeline (:meth:`Chaos.run`, used by tests/test_chaos.py and bench/bench_chaos.py) or rule by
rule (the hypothesis state machine in tests/test_chaos_state.py).
"""

from __future__ import annotations

import random
import re
import threading
from collections import Counter
from dataclasses import dataclass

import pykka

from actors.base import ACTIVITY, holds_count
from actors.sim import START, Simulation
from api.arvados.client import error_for
from api.arvados.inprocess import LocalArvadosClient
from cloud.base import ExecutorError
from cloud.stub.driver import StubParams
from cloud.stub.vm import Phase
from tests.simcluster import cluster as make_cluster

UUID_RE = re.compile(r"[a-z0-9]{5}-dz642-[a-z0-9]{15}")
FINAL = ("Complete", "Cancelled")


@dataclass(frozen=True)
class ChaosConfig:
    seed: int = 0
    containers: int = 150
    hours: float = 2.0  # containers arrive over this long; then the run drains
    quantum: float = 5.0  # simulated seconds per step (checks run after each)
    restart_every: float = 2400.0  # mean simulated seconds between dispatcher restarts
    outage_every: float = 3600.0  # mean seconds between container API outages
    outage_length: tuple = (30.0, 600.0)
    slow_every: float = 3600.0  # mean seconds between windows of slow API answers
    slow_length: tuple = (300.0, 1200.0)
    slow_call_rate: float = 0.3  # in a slow window, the share of calls that are slow
    slow_call: tuple = (60.0, 300.0)  # how slow
    slow_cloud_rate: float = 0.1  # destroys, tag updates and creates that take minutes
    slow_cloud: tuple = (60.0, 600.0)
    ssh_drop_rate: float = 0.01
    report_delay_rate: float = 0.2  # worker reports held back up to a ProbeInterval
    boot_failure_rate: float = 0.03
    operator_every: float = 900.0  # mean seconds between hold/drain/run actions
    user_cancel_rate: float = 0.03  # share of containers a user cancels (priority 0)
    drain_limit: float = 6 * 3600.0  # after arrivals end, give up waiting this long
    check_actor_thread_calls: bool = False  # G0: no container API call on an actor's thread


def chaos_cluster(seed: int):
    rng = random.Random(f"cluster:{seed}")
    return make_cluster(
        types=(1, 2, 4, 8), poll_interval=10.0, probe_interval=10.0, sync_interval=60.0,
        timeout_idle=60.0, timeout_booting=300.0, timeout_probe=300.0, timeout_shutdown=10.0,
        timeout_signal=5.0, timeout_term=120.0, timeout_stale_run_lock=10.0,
        max_instances=rng.choice((16, 24, 32)), max_concurrent_instance_create_ops=rng.choice((0, 2, 4)),
        supervisor_fraction=0.5)


def chaos_params(seed: int) -> StubParams:
    rng = random.Random(f"params:{seed}")
    return StubParams(
        error_rate_create=0.05, error_rate_destroy=0.05,
        min_time_between_create_calls=rng.choice((0.0, 1.0, 5.0)),
        quota_max_instances=rng.choice((0, 12, 20)),
        capacity_error_types=rng.choice(((), ("providertype8",))),
        boot_time=30.0, boot_time_jitter=60.0,
        broken_rate=0.04, broken_after=900.0, report_broken_rate=0.03, report_broken_after=900.0,
        crunch_run_missing_rate=0.02, crunch_run_crash_rate=0.05, crunch_run_detach_delay=1.0,
        arv_mount_max_exit_lag=10.0, arv_mount_deadlock_rate=0.02,
        container_run_time=120.0, container_run_time_jitter=1500.0,
        destroy_delay=rng.choice((0.0, 30.0, 300.0)), seed=seed)


# -- fault-injecting wrappers --------------------------------------------------------------------

class FaultyApi:
    """A container API client that fails during outages and answers slowly in slow windows.

    Slow calls are parked until a later simulated time, before or after their effect (an answer
    lost in a slow network after the server acted). Crunch-run's own client (role "crunch-run")
    suffers outages but never parks: it runs inside cloud events."""

    _STATE_CHANGES = ("unlock", "update", "cancel")

    def __init__(self, chaos: Chaos, inner, role: str):
        self._chaos = chaos
        self._inner = inner
        self.role = role
        self._last_503: float = 0.0

    @property
    def last_503(self) -> float:
        return self._last_503

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def _call(self, name: str, uuid: str | None, fn, *args, **kw):
        c = self._chaos
        mine = self.role == "dispatcher"
        if mine and uuid and name in self._STATE_CHANGES:
            c.op_begin(uuid, name)
        try:
            c.api_before(self, name, uuid)
            out = fn(*args, **kw)
            if mine and uuid:
                c.note(f"api {name} {uuid} ok")
            c.api_after(self, name, uuid)
            return out
        except Exception as e:
            if mine and uuid:
                c.note(f"api {name} {uuid} failed: {type(e).__name__}")
            raise
        finally:
            if mine and uuid and name in self._STATE_CHANGES:
                c.op_end(uuid)

    def outage(self) -> None:
        self._last_503 = self._chaos.sim.now
        raise error_for(503, "chaos: container API unavailable")

    def current_token_uuid(self):
        return self._call("current", None, self._inner.current_token_uuid)

    def list_containers(self, *a, **kw):
        return self._call("list", None, self._inner.list_containers, *a, **kw)

    def iter_containers(self, *a, **kw):
        self._chaos.api_before(self, "list", None)
        if self.role == "dispatcher":
            self._chaos.note("api list (poll)")
        yield from self._inner.iter_containers(*a, **kw)

    def get_container(self, uuid, *a, **kw):
        return self._call("get", uuid, self._inner.get_container, uuid, *a, **kw)

    def lock(self, uuid):
        return self._call("lock", uuid, self._inner.lock, uuid)

    def unlock(self, uuid):
        return self._call("unlock", uuid, self._inner.unlock, uuid)

    def update(self, uuid, fields):
        return self._call("update", uuid, self._inner.update, uuid, fields)

    def cancel(self, uuid):
        return self._call("cancel", uuid, self._inner.cancel, uuid)


class _Reports:
    """What one worker reports to: the scheduler's proxy, with chosen reports held back (in the
    order they were sent) so they arrive after later decisions, e.g. a start."""

    def __init__(self, chaos: Chaos, proxy):
        self._chaos = chaos
        self.proxy = proxy
        self.tail = 0.0  # when the last held report is released
        self.held = 0

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *args: self._chaos.report(self, name, args)


class Violation(AssertionError):
    pass


# -- the simulation --------------------------------------------------------------------------------

class Chaos:
    def __init__(self, cfg: ChaosConfig = ChaosConfig(), *, cluster=None, params=None,
                 random_faults: bool = True):
        self.cfg = cfg
        self.seed = cfg.seed
        self.cluster = cluster or chaos_cluster(cfg.seed)
        self.params = params or chaos_params(cfg.seed)
        self.rng = random.Random(cfg.seed)
        self.frng = random.Random(f"faults:{cfg.seed}")  # used from several threads
        self.random_faults = random_faults
        self.trace: list[tuple[float, str]] = []
        self.faults: Counter = Counter()
        self.checks = 0
        self.violations: list[str] = []
        self.restarts = 0
        self.unsettled = 0
        self.outage_until = 0.0
        self.slow_until = 0.0
        self.impaired_at = 0.0  # last time the API was impaired (outage, slow, parked calls)
        self.closing = False  # stopping or restarting the dispatcher: no call parks
        self._plock = threading.Lock()
        self._parked: dict[threading.Event, bool] = {}  # parked call -> it gave back a count
        self._park_gen = 0
        self._ops: Counter = Counter()  # uuid -> our unlock/cancel calls in flight
        self.desired: dict[str, tuple[str, float]] = {}  # instance -> (behavior, since)
        self.user_cancelled: set[str] = set()
        self.submitted: list[str] = []
        self._attempted: dict[str, int] = {}  # uuid -> lock_count of its last --detach
        self._stale_since: dict[str, float] = {}
        self._flagged: set = set()
        self._violation_keys: set[str] = set()
        self._cancel_later: list[tuple[float, str]] = []
        self.sim = self._new_sim()
        self.oracle = LocalArvadosClient(self.sim.store, self.cluster.system_root_token)
        self.me = self.oracle.current_token_uuid()
        self.set_id = self.sim.dispatcher.set_id
        self.started_at = self.sim.now

    # -- construction and restarts -------------------------------------------------------------

    def _new_sim(self, old: Simulation | None = None) -> Simulation:
        kw = dict(store=old.store, cloud=old.cloud, clock=old.clock) if old is not None else {}
        sim = Simulation(self.cluster, stub_params=self.params, seed=self.seed + 7919 * self.restarts,
                         metrics=False, wrap_api=self._wrap_api, worker_reports=self._wrap_reports,
                         runtime="threads",  # slow calls park real threads
                         **kw)
        sim.blocked = self.blocked
        sim.cloud.fault_hook = self._cloud_fault
        sim.cloud.setup_vm = self._setup_vm
        sim.cloud.listener = self._cloud_event
        return sim

    def start(self) -> Chaos:
        self.sim.start()
        return self

    def stop(self) -> None:
        """Stop the dispatcher; no call parks from here on (none may outlive the run)."""
        self.closing = True
        self.release_parked()
        self.sim.stop()

    def restart(self) -> None:
        """Stop the dispatcher at this instant and start a new one on the same cloud and API.

        Slow calls in flight finish first (their answers reach the old actors): a stopped
        actor system cannot be left with cloud calls queued behind them."""
        self.note("RESTART")
        self.restarts += 1
        self.unsettled += self.sim.unsettled
        self.closing = True
        try:
            self.release_parked()
            self.sim.stop()
            self.sim = self._new_sim(self.sim)
        finally:
            self.closing = False
        self.started_at = self.sim.now
        self.sim.start()

    # -- trace -----------------------------------------------------------------------------------

    @property
    def t(self) -> float:
        return self.sim.now - START

    def note(self, text: str) -> None:
        self.trace.append((self.t, text))

    def fault(self, kind: str, text: str = "") -> None:
        self.faults[kind] += 1
        self.note(f"FAULT {kind} {text}".rstrip())

    def violation(self, g: str, text: str, *keys: str) -> None:
        msg = f"{g} t={self.t:.1f}s seed={self.seed}: {text}"
        self.violations.append(msg)
        self.note("VIOLATION " + msg)
        self._violation_keys |= set(keys)

    def report_text(self, last: int = 60) -> str:
        keys = self._violation_keys
        related = [(t, s) for t, s in self.trace if any(k in s for k in keys)]
        lines = [f"seed {self.seed}: {len(self.violations)} violation(s)", *self.violations[:20],
                 "-- events about the containers/instances involved --"]
        lines += [f"{t:10.1f} {s}" for t, s in related[-120:]]
        lines += ["-- last events --"] + [f"{t:10.1f} {s}" for t, s in self.trace[-last:]]
        return "\n".join(lines)

    # -- parking (slow calls) --------------------------------------------------------------------

    def blocked(self):
        """None when no call is parked; else a token that changes with every park and release."""
        return self._park_gen if self._parked else None

    def park(self, seconds: float, label: str) -> None:
        """Block the calling thread until the simulated clock has moved ``seconds`` on.

        While it waits, the work it runs stops counting in the barrier (else no step could end
        before the release), and counts again from the instant of the release. Only a thread that
        holds a count gives one back: a thread started inside a counted job (the poll's mounts
        fetches) holds none of its own, and its job stays counted while it waits; the barrier
        sees that as a stall behind a parked call (``blocked``)."""
        if self.closing:
            return
        ev = threading.Event()
        gave = holds_count()
        with self._plock:
            self._parked[ev] = gave
            self._park_gen += 1
            if gave:
                ACTIVITY.end()
        # after a slow poll the next one waits as long again (Go's back-off, issue 10 item 7)
        self.impaired_at = max(self.impaired_at, self.sim.now + 2 * seconds)

        def release(at):
            self._release(ev)
        self.sim.cloud.call_at(self.sim.now + seconds, "release " + label, release)
        if not ev.wait(timeout=120):
            self._release(ev)
            raise RuntimeError(f"parked call {label} never released")

    def _release(self, ev: threading.Event) -> None:
        with self._plock:
            if ev not in self._parked:
                return
            gave = self._parked.pop(ev)
            self._park_gen += 1
            if gave:
                ACTIVITY.begin()  # counted again before the parked thread can run on
            ev.set()

    def release_parked(self) -> None:
        with self._plock:
            evs = list(self._parked)
        for ev in evs:
            self._release(ev)
        if evs:
            self.sim.settle()

    # -- the container API -----------------------------------------------------------------------

    def _wrap_api(self, client, role: str):
        return FaultyApi(self, client, role)

    def api_impaired(self) -> bool:
        return self.sim.now < self.outage_until or self.sim.now < self.slow_until or self.blocked() is not None

    def api_before(self, api: FaultyApi, name: str, uuid: str | None) -> None:
        if api.role == "dispatcher" and self.cfg.check_actor_thread_calls:
            tname = threading.current_thread().name
            if tname.split("-")[0] in ("QueueActor", "SchedulerActor", "InstanceSetActor", "WorkerActor"):
                self.violation("G0", f"container API call {name} {uuid or ''} on actor thread {tname}",
                               *(k for k in (uuid,) if k))
        if self.sim.now < self.outage_until:
            self.faults["api 503"] += 1
            api.outage()
        if (api.role == "dispatcher" and self.sim.now < self.slow_until
                and self.frng.random() < self.cfg.slow_call_rate / 2):
            secs = self.frng.uniform(*self.cfg.slow_call)
            self.fault("api slow", f"{name} {uuid or ''} {secs:.0f}s before")
            self.park(secs, f"api {name}")

    def api_after(self, api: FaultyApi, name: str, uuid: str | None) -> None:
        if (api.role == "dispatcher" and self.sim.now < self.slow_until
                and self.frng.random() < self.cfg.slow_call_rate / 2):
            secs = self.frng.uniform(*self.cfg.slow_call)
            self.fault("api slow", f"{name} {uuid or ''} {secs:.0f}s after")
            self.park(secs, f"api {name}")

    def op_begin(self, uuid: str, name: str) -> None:
        with self._plock:
            self._ops[uuid] += 1

    def op_end(self, uuid: str) -> None:
        with self._plock:
            self._ops[uuid] -= 1
            if self._ops[uuid] <= 0:
                del self._ops[uuid]

    def outage(self, seconds: float) -> None:
        self.outage_until = max(self.outage_until, self.sim.now + seconds)
        self.impaired_at = max(self.impaired_at, self.outage_until)
        self.fault("api outage", f"{seconds:.0f}s")

    def slow_window(self, seconds: float) -> None:
        self.slow_until = max(self.slow_until, self.sim.now + seconds)
        self.impaired_at = max(self.impaired_at, self.slow_until)
        self.fault("api slow window", f"{seconds:.0f}s")

    # -- worker reports --------------------------------------------------------------------------

    def _wrap_reports(self, proxy):
        return _Reports(self, proxy)

    def report(self, r: _Reports, name: str, args: tuple) -> None:
        now = self.sim.now
        delay = 0.0
        if self.random_faults and self.frng.random() < self.cfg.report_delay_rate:
            delay = self.frng.uniform(0, self.cluster.cloud_vms.probe_interval)
        at = max(now + delay, r.tail)
        if at <= now and r.held == 0:
            self._deliver(r, name, args)
            return
        r.tail, r.held = at, r.held + 1
        self.faults["report delayed"] += 1

        def release(t):
            r.held -= 1
            self._deliver(r, name, args)
        self.sim.cloud.call_at(at, f"report {name}", release)

    @staticmethod
    def _deliver(r: _Reports, name: str, args: tuple) -> None:
        try:
            getattr(r.proxy, name)(*args)
        except pykka.ActorDeadError:
            pass  # reported to a dispatcher that has since been restarted

    # -- the cloud -------------------------------------------------------------------------------

    def _setup_vm(self, vm) -> None:
        if self.random_faults and self.frng.random() < self.cfg.boot_failure_rate:
            vm.boot_at = vm.created_at + 100 * self.cluster.cloud_vms.timeout_booting
            self.fault("boot failure", vm.id)

    def _cloud_fault(self, op: str, target, command: str) -> None:
        if op == "exec":
            if "--detach" in command:
                self._on_detach(str(target), command)
            if self.random_faults and self.frng.random() < self.cfg.ssh_drop_rate:
                self.fault("ssh drop", f"{target} {command[:60]}")
                raise ExecutorError("chaos: SSH connection dropped")
            return
        if op in ("destroy", "set_tags", "create") and not self.closing and self.random_faults:
            if self.frng.random() < self.cfg.slow_cloud_rate:
                secs = self.frng.uniform(*self.cfg.slow_cloud)
                self.fault(f"slow {op}", f"{getattr(target, 'name', target)} {secs:.0f}s")
                self.park(secs, f"cloud {op}")

    def _on_detach(self, instance_id: str, command: str) -> None:
        m = UUID_RE.search(command)
        if m is None:
            return
        uuid = m.group(0)
        self.checks += 1
        live = [vm.id for vm in self.sim.cloud.vms
                if (p := vm.procs.get(uuid)) is not None and p.phase is not Phase.EXITED]
        ctr = self.oracle.get_container(uuid, select=["state", "locked_by_uuid", "lock_count"])
        self.note(f"detach {uuid} on {instance_id} (state={ctr['state']} lock_count={ctr['lock_count']}; "
                  f"dispatcher's view {self._views_of(uuid)})")
        if live:
            self.violation("G2", f"{uuid} sent --detach to {instance_id} while still running on {live}",
                           uuid, instance_id, *live)
        if ctr["state"] != "Locked" or ctr["locked_by_uuid"] != self.me:
            self.violation("G2", f"{uuid} sent --detach to {instance_id} while {ctr['state']} "
                                 f"(locked by {ctr['locked_by_uuid']!r})", uuid, instance_id)
        with self._plock:
            ops = self._ops.get(uuid, 0)
        if ops:
            self.violation("G2", f"{uuid} sent --detach to {instance_id} while we are unlocking or "
                                 "cancelling it", uuid, instance_id)
        self._attempted[uuid] = ctr["lock_count"]

    def _views_of(self, uuid: str) -> str:
        """What the scheduler and the queue hold about a container (read racily, for the trace)."""
        out = []
        for name, attr in (("scheduler", "_queue"), ("queue", "_entries")):
            try:
                e = getattr(getattr(self.sim.dispatcher, name)._actor, attr).get(uuid)
            except Exception:
                e = None
            out.append(f"{name}={e.state if e is not None else None}")
        return " ".join(out)

    def _cloud_event(self, event: str, vm, at: float, uuid: str) -> None:
        if event in ("running", "exit"):
            p = vm.procs.get(uuid)
            why = f" ({p.exit_reason})" if event == "exit" and p is not None and p.exit_reason else ""
            self.note(f"crunch-run {event} {uuid} on {vm.id}{why}")
        elif event in ("destroy", "remove"):
            self.note(f"cloud {event} {vm.id}")

    # -- operators and users ---------------------------------------------------------------------

    def set_behavior(self, instance_id: str, behavior: str) -> bool:
        try:
            self.sim.dispatcher.backend().set_idle_behavior(instance_id, behavior)
        except Exception as e:  # gone meanwhile, or busy: an operator would retry
            self.note(f"operator {behavior} {instance_id} refused: {e}")
            return False
        self.desired[instance_id] = (behavior, self.sim.now)
        self.note(f"operator {behavior} {instance_id}")
        return True

    def user_cancel(self, uuid: str) -> None:
        try:
            self.oracle.update(uuid, {"priority": 0})
        except Exception:
            return
        self.user_cancelled.add(uuid)
        self.note(f"user cancel {uuid}")

    def submit(self, rng: random.Random | None = None) -> str:
        rng = rng or self.rng
        vcpus = rng.choice((1, 1, 1, 2, 2, 4))
        sp = {}
        if rng.random() < 0.05:
            sp["supervisor"] = True
        if rng.random() < 0.1:
            sp["preemptible"] = False
        uuid = self.oracle.create_container({
            "command": ["true"], "priority": rng.randint(1, 1000), "container_image": "arvados/jobs",
            "runtime_constraints": {"vcpus": vcpus, "ram": vcpus << 29}, "output_path": "/out",
            "cwd": "/", "scheduling_parameters": sp})["uuid"]
        self.submitted.append(uuid)
        self.note(f"submit {uuid} vcpus={vcpus}")
        return uuid

    # -- invariants ------------------------------------------------------------------------------

    def check(self) -> None:
        now = self.sim.now
        vms = self.sim.cloud.vms
        snap = self.sim.snapshot
        views = {iv.instance: iv for iv in snap.instances if iv.instance}
        cv = self.cluster.cloud_vms
        tag = self.cluster.tag
        # G1: known or being destroyed (a listing may lag: SyncInterval, plus a rate limit)
        grace = cv.sync_interval + cv.probe_interval + 30 + self.params.min_time_between_instances_calls
        for vm in vms:
            if vm.tags.get(tag("InstanceSetID")) != self.set_id or vm.destroying:
                continue
            self.checks += 1
            if vm.id not in views and now - max(vm.created_at, self.started_at) > grace \
                    and ("G1", vm.id) not in self._flagged:
                self._flagged.add(("G1", vm.id))
                self.violation("G1", f"instance {vm.id} unknown to the dispatcher for "
                                     f"{now - max(vm.created_at, self.started_at):.0f}s", vm.id)
        # G4: an operator's saved setting is applied
        for vm in vms:
            want = self.desired.get(vm.id)
            iv = views.get(vm.id)
            if want is None or iv is None or vm.destroying or iv.worker_state == "shutdown":
                continue
            behavior, since = want
            if vm.tags.get(tag("IdleBehavior")) != behavior or now - since < cv.probe_interval + 10:
                continue
            self.checks += 1
            if iv.idle_behavior != behavior and not (behavior == "run" and iv.idle_behavior == "drain"):
                key = ("G4", vm.id, behavior, since)
                if key not in self._flagged:
                    self._flagged.add(key)
                    self.violation("G4", f"instance {vm.id}: operator set {behavior} (saved in its tag), "
                                         f"dispatcher applies {iv.idle_behavior}", vm.id)
        # G3: no lingering lock once we no longer run the container
        live = {u for vm in vms for u, p in vm.procs.items() if p.phase is not Phase.EXITED}
        locked = self.oracle.list_containers(
            filters=[["state", "=", "Locked"], ["locked_by_uuid", "=", self.me]],
            select=["uuid", "lock_count"], limit=1000)
        # "long": what the dispatcher may legitimately need to learn the attempt is over (an
        # unresponsive VM is given TimeoutProbe; a restart waits up to StaleLockTimeout for its
        # probes, then unlocks) plus the polls and probes that carry the news
        limit = (2 * self.cluster.containers.stale_lock_timeout + cv.timeout_probe + 3 * cv.poll_interval
                 + 2 * cv.probe_interval + cv.timeout_term + 60)
        still = set()
        for c in locked:
            u = c["uuid"]
            self.checks += 1
            if u in live or self._attempted.get(u) != c["lock_count"]:
                continue  # running, or not yet tried under this lock
            still.add(u)
            since = max(self._stale_since.setdefault(u, now), self.impaired_at, self.started_at)
            if now - since > limit and ("G3", u, c["lock_count"]) not in self._flagged:
                self._flagged.add(("G3", u, c["lock_count"]))
                self.violation("G3", f"{u} still Locked by us {now - since:.0f}s after its crunch-run "
                                     f"ended (lock_count={c['lock_count']})", u)
        for u in list(self._stale_since):
            if u not in still:
                del self._stale_since[u]

    def check_final(self) -> None:
        """The end state: every container finished, no instance left but held ones."""
        for c in self.oracle.iter_containers(select=["uuid", "state", "priority", "runtime_status"]):
            u = c["uuid"]
            self.checks += 1
            err = (c.get("runtime_status") or {}).get("error")
            if c["state"] == "Complete":
                continue
            if c["state"] == "Cancelled" and (err or u in self.user_cancelled):
                continue
            if c["state"] == "Queued" and c["priority"] == 0 and u in self.user_cancelled:
                continue
            self.violation("G3", f"{u} ended {c['state']} (priority {c['priority']}, error {err!r})", u)
        held = {i for i, (b, _) in self.desired.items() if b == "hold"}
        for vm in self.sim.cloud.vms:
            if vm.tags.get(self.cluster.tag("InstanceSetID")) != self.set_id or vm.destroying:
                continue
            self.checks += 1
            if vm.id not in held:
                self.violation("G1", f"instance {vm.id} left behind with an empty queue "
                                     f"(tags {vm.tags.get(self.cluster.tag('IdleBehavior'))})", vm.id)

    # -- driving ---------------------------------------------------------------------------------

    def step(self, dt: float | None = None) -> None:
        self.sim.step(self.cfg.quantum if dt is None else dt)
        self.check()

    def unfinished(self) -> list[str]:
        out = []
        for c in self.oracle.iter_containers(select=["uuid", "state", "priority"]):
            if c["state"] in FINAL or (c["state"] == "Queued" and c["priority"] == 0):
                continue
            out.append(c["uuid"])
        return out

    def _random_operator_action(self) -> None:
        views = [iv for iv in self.sim.snapshot.instances if iv.instance and iv.worker_state != "shutdown"]
        if not views:
            return
        iv = self.rng.choice(views)
        held = sum(1 for b, _ in self.desired.values() if b == "hold")
        choices = ["drain", "run"] + (["hold"] if held < 2 else [])
        self.set_behavior(iv.instance, self.rng.choice(choices))

    def run(self) -> Chaos:
        """The seeded random timeline: arrivals over ``hours``, faults all along, then drain."""
        cfg, rng = self.cfg, self.rng
        end_arrivals = cfg.hours * 3600.0
        arrivals = sorted(rng.uniform(0, end_arrivals) for _ in range(cfg.containers))
        t0 = self.sim.now

        def next_after(mean):
            return self.sim.now + rng.expovariate(1.0 / mean)

        at = {"restart": next_after(cfg.restart_every), "outage": next_after(cfg.outage_every),
              "slow": next_after(cfg.slow_every), "operator": next_after(cfg.operator_every)}
        self.start()
        try:
            while True:
                now = self.sim.now
                while arrivals and t0 + arrivals[0] <= now:
                    arrivals.pop(0)
                    u = self.submit()
                    if rng.random() < cfg.user_cancel_rate:
                        self._cancel_later.append((now + rng.uniform(0, 1800), u))
                for item in list(self._cancel_later):
                    if item[0] <= now:
                        self._cancel_later.remove(item)
                        self.user_cancel(item[1])
                arriving = now - t0 < end_arrivals
                if arriving and now >= at["outage"]:
                    self.outage(rng.uniform(*cfg.outage_length))
                    at["outage"] = next_after(cfg.outage_every)
                if arriving and now >= at["slow"]:
                    self.slow_window(rng.uniform(*cfg.slow_length))
                    at["slow"] = next_after(cfg.slow_every)
                if arriving and now >= at["operator"]:
                    self._random_operator_action()
                    at["operator"] = next_after(cfg.operator_every)
                if arriving and now >= at["restart"]:
                    self.restart()
                    at["restart"] = next_after(cfg.restart_every)
                self.step()
                if not arriving and not arrivals:
                    if not self.unfinished() and self.blocked() is None:
                        break
                    if now - t0 > end_arrivals + cfg.drain_limit:
                        break
            # the queue is empty (or we gave up): faults off, idle instances must go
            self.random_faults = False
            cv = self.cluster.cloud_vms
            quiet = cv.timeout_idle + cv.timeout_booting + 3 * cv.sync_interval + 120
            if self.params.destroy_delay:
                quiet += self.params.destroy_delay
            self.step(quiet)
            self.check_final()
        finally:
            self.stop()
        return self

    def summary(self) -> dict:
        states = Counter(c["state"] for c in self.oracle.iter_containers(select=["uuid", "state"]))
        return {"seed": self.seed, "containers": len(self.submitted), "states": dict(states),
                "unsettled": self.unsettled + self.sim.unsettled,
                "faults": sum(self.faults.values()), "by_kind": dict(self.faults),
                "restarts": self.restarts, "checks": self.checks, "violations": len(self.violations),
                "simulated_hours": round(self.t / 3600, 2)}
