"""SchedulerActor: the worker registry, the pool limits, and the scheduling passes.

It holds what Arvados splits between ``scheduler.Scheduler`` and ``worker.Pool``: the workers
(one WorkerActor each) and their last reported views, pending creates, quota and capacity state,
and the container queue as the QueueActor last reported it. On every change (coalesced) and at
least once a second it runs :func:`actors.planner.plan` and :func:`actors.planner.reconcile`,
applies the actions by telling the other actors, and publishes a :class:`Snapshot` for the
management API and /metrics. The quota and concurrency arithmetic is :mod:`actors.quota`'s, the
snapshot rows :mod:`actors.render`'s.

Nothing here blocks: cloud, SSH and container API calls are the other actors' business, and they
make them off their mailboxes (on bounded pools), telling the answers back as messages.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable

import pykka
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from actors import quota, render
from actors.base import TickedActor
from actors.inbox import InstanceSetInbox, QueueInbox, WorkerInbox
from actors.messages import Behavior, CreateFailure, InstanceInfo, QueueEntry, State, WorkerView
from actors.planner import STARTABLE, Limits, Slot, base_key, needs_reconcile, plan, reconcile
from actors.resources import fits, take, type_resources
from actors.snapshot import InstanceView, LiveSnapshot, Snapshot
from cloud import crunchrun
from conf.model import InstanceType

log = logging.getLogger("dispatch.scheduler")

PASS_INTERVAL = 10.0  # a full pass at least this often, as a safety net; changes trigger one at once
OP_BACKOFF_MAX = 600.0  # a failing lock/unlock/cancel is retried at least this often
PUBLISH_INTERVAL = 2.0  # fresh probe/busy times for /instances and /metrics between passes
_SHUTDOWN, _UNKNOWN = State.SHUTDOWN, State.UNKNOWN  # enum attribute lookups are slow in a hot loop


def _plan_state(s: State) -> State:
    """The state as the planner tells states apart (it treats STARTABLE ones alike)."""
    return State.RUNNING if s is State.IDLE else s


class NotFound(Exception):
    pass


class SnapshotBox:
    """Where the scheduler publishes; readers take ``.snapshot`` without any lock or actor call."""

    def __init__(self):
        self.snapshot = Snapshot()
        # uuid -> (entry, status, QueueEntryView), reused across snapshots; replaced, never
        # changed in place, by whichever reader renders a snapshot's queue
        self.row_memo: dict = {}


@dataclass
class _Worker:
    inbox: WorkerInbox
    view: WorkerView
    added: float
    secret: str = ""
    boot_reported: bool = False
    info: InstanceInfo | None = None  # the latest listing of its instance
    starts_sent: int = 0
    pending: dict = field(default_factory=dict)  # uuid -> number of a start its views predate


@dataclass
class _Pending:
    it: InstanceType
    since: float


class SchedulerActor(TickedActor):
    critical = True

    def __init__(self, *, cluster, set_id: str, ticker, box: SnapshotBox, worker_factory,
                 public_key: str | None, api_client=None, metrics=None, quota_group=None,
                 first_now: float):
        super().__init__(ticker)
        self._cluster = cluster
        self._cfg = cluster.cloud_vms
        self._set_id = set_id
        self._box = box
        self._make_worker = worker_factory  # (info, it, state, behavior, now, secret) -> WorkerInbox
        self._public_key = public_key
        self._api = api_client
        self._last_503 = 0.0  # told by the queue (api_503), never read from the client
        self._metrics = metrics
        self._quota_group = quota_group or (lambda it: "")
        self._queue_inbox: QueueInbox | None = None
        self._iset: InstanceSetInbox | None = None
        self._now = first_now
        self._started = first_now
        self._workers: dict[str, _Worker] = {}
        # uuid -> instances whose view lists it running: kept by _set_view, so the start that
        # goes out with a lock's answer checks every worker (G2) in O(1), not O(workers)
        self._holders: dict[str, dict[str, None]] = {}
        self._creating: dict[str, _Pending] = {}
        self._exited: dict[str, float] = {}
        self._queue: dict[str, QueueEntry] = {}
        self._q_updated = 0.0
        self._queue_loaded = False
        self._loaded = False
        self._gate_open = False
        self._had_unknown_at_start: bool | None = None
        self._ops: dict[str, str] = {}  # uuid -> API op in flight (Arvados uuidLock)
        # uuid -> the reason it is being killed: one kill per container per reason; the worker
        # escalates on its own timer (TimeoutSignal, TimeoutTERM), so a pass never repeats it
        self._killing: dict[str, str] = {}
        self._lock_for: dict[str, str] = {}  # uuid being locked -> instance the last pass holds for it
        self._op_fails: dict[str, tuple[int, float]] = {}  # uuid -> (failures, retry not before)
        self._pool = quota.PoolState()
        self._dirty = True
        self._next_pass = first_now
        self._next_publish = first_now
        self._last_plan = None
        self._create_limited = False  # to log reaching MaxConcurrentInstanceCreateOps once
        self._conc = quota.Concurrency(self._cfg.initial_quota_estimate or self._cfg.max_instances)
        self._types = dict(cluster.instance_types)
        # caches that keep a pass proportional to what changed, not to the queue's length
        self._qver = 0
        self._base_order: tuple[int, list[QueueEntry]] = (-1, [])
        # entries reconcile may act on (see needs_reconcile); a dict, not a set, so the order of
        # reconcile's actions does not depend on string hashing (simulations repeat exactly)
        self._special: dict[str, None] = {}
        self._iviews: dict[str, tuple[WorkerView, InstanceView]] = {}

    def wire(self, queue: QueueInbox, instance_set: InstanceSetInbox) -> None:
        self._queue_inbox = queue
        self._iset = instance_set

    # -- lifecycle ---------------------------------------------------------------------------------

    def next_wake(self) -> float:
        return self._next_pass

    def on_stop(self) -> None:
        super().on_stop()
        for w in self._workers.values():
            try:
                w.inbox.actor_ref.stop(block=False)
            except Exception:
                pass

    def _tell(self, w: _Worker, message: Callable[..., None], *args) -> bool:
        """Tell a worker. A worker actor that died (a bug) must not take the scheduler with it:
        a fresh actor takes over its instance as ``unknown``, and until that one's first probe
        its containers still count as running, so nothing is cancelled or started twice."""
        try:
            message(*args)
            return True
        except pykka.ActorDeadError:
            v = w.view
            if self._workers.get(v.instance_id) is not w or w.info is None:
                return False
            log.warning("worker actor is gone; a new one takes over its instance",
                        extra={"Instance": v.instance_id, "State": str(v.state)})
            state = State.SHUTDOWN if v.state is State.SHUTDOWN else State.UNKNOWN
            w.inbox = self._make_worker(w.info, v.instance_type, state, v.idle_behavior, self._now, w.secret)
            self._set_view(w, replace(v, state=state, probe_done=False, starts_seen=0))
            w.starts_sent, w.pending = 0, {}
            self._touch()
            return False

    def _touch(self) -> None:
        if not self._dirty:
            self._dirty = True
            self.wake_at(self._now)

    def _pass_at(self, when: float) -> None:
        """Run a full pass at ``when`` (a TTL or holdoff ends then), even if nothing else changes."""
        self._next_pass = min(self._next_pass, when)
        self.wake_at(when)

    def tick(self, now: float) -> None:
        """Pass when something changed or a deadline came; in between, only republish.

        Go wakes its scheduler every second; here every change already triggers a pass and
        every timed condition (quota/capacity TTL, rate-limit holdoff, stale-lock wait) books
        its own, so an idle cluster costs a cheap republish every PUBLISH_INTERVAL."""
        self._now = max(self._now, now)
        if self._dirty or now >= self._next_pass:
            self._dirty = False
            self._next_pass = now + PASS_INTERVAL
            self._next_publish = now + PUBLISH_INTERVAL
            self._pass(now)
        elif now >= self._next_publish:
            self._next_publish = now + PUBLISH_INTERVAL
            self._publish(now, self._running(), self._last_plan)
        self.wake_at(min(self._next_pass, self._next_publish))

    # -- events from the instance set ---------------------------------------------------------------

    def instances_listed(self, infos: tuple[InstanceInfo, ...], started: float) -> None:
        now = self._now = max(self._now, started)
        seen = set()
        creating_secrets = set(self._creating)
        tag = self._cluster.tag
        for info in infos:
            seen.add(info.id)
            w = self._workers.get(info.id)
            if w is not None:
                w.info = info
                self._tell(w, w.inbox.update_instance, info, now)
                continue
            self._add_worker(info, now, booting=info.tags.get(tag("InstanceSecret"), "") in creating_secrets)
        for iid in list(self._workers):
            w = self._workers[iid]
            if iid in seen or w.added > started:
                continue
            log.info("instance disappeared in cloud", extra={"Instance": iid, "WorkerState": str(w.view.state)})
            self._observe_gone(w, now)
            # Its containers' attempts ended now, as far as we can know (G2): they count as
            # running until a queue poll newer than this shows where they stand; a queue view
            # from before could still say Locked, and start the same attempt elsewhere
            for u in w.view.running:
                self._exited.setdefault(u, now)
            self._set_view(w, replace(w.view, running=()))
            del self._workers[iid]
            self._tell(w, w.inbox.abandon)
        total = len(self._workers) + len(self._creating)
        self._pool = quota.after_listing(self._pool, total)
        if not self._loaded:
            self._loaded = True
            log.info("loaded initial instance list", extra={"N": len(self._workers)})
        self._touch()

    def _observe_gone(self, w: _Worker, now: float) -> None:
        m = self._metrics
        if m is None:
            return
        m.instances_disappeared.labels(state=str(w.view.state)).inc()
        if w.view.destroyed:
            m.time_from_shutdown_request_to_disappearance.observe(max(0.0, now - w.view.destroyed))
        if w.view.state in (State.BOOTING, State.UNKNOWN) and not w.boot_reported:
            m.boot_outcomes.labels(outcome="disappeared").inc()

    def _add_worker(self, info: InstanceInfo, now: float, booting: bool) -> None:
        tag = self._cluster.tag
        tname = info.tags.get(tag("InstanceType"), "")
        it = self._types.get(tname)
        behavior = Behavior.parse(info.tags.get(tag("IdleBehavior"))) or Behavior.RUN
        if it is None:
            it = InstanceType(name=tname, provider_type="", vcpus=0, ram=0, included_scratch=0,
                              added_scratch=0, price=0.0)
            if behavior is not Behavior.HOLD:
                behavior = Behavior.DRAIN
            log.info(("holding" if behavior is Behavior.HOLD else "draining") +
                     " instance that was tagged with an unrecognized InstanceType",
                     extra={"Instance": info.id, "InstanceType": tname})
        state = State.BOOTING if booting else State.UNKNOWN
        secret = info.tags.get(tag("InstanceSecret"), "")
        proxy = self._make_worker(info, it, state, behavior, now, secret)
        view = WorkerView(instance_id=info.id, instance_type=it, state=state, idle_behavior=behavior,
                          address=info.address, provider_type=info.provider_type, busy=now,
                          appeared=now, probed=now)
        self._workers[info.id] = _Worker(proxy, view, now, secret, info=info)
        log.info("instance appeared in cloud", extra={
            "Instance": info.id, "InstanceType": it.name, "Address": info.address,
            "State": str(state), "IdleBehavior": str(behavior)})

    def instance_created(self, req_id: str, it: InstanceType, info: InstanceInfo, now: float) -> None:
        self._now = max(self._now, now)
        if info.id not in self._workers:
            self._add_worker(info, self._now, booting=True)
        self._creating.pop(req_id, None)
        self._touch()

    def create_failed(self, req_id: str, it: InstanceType, failure: CreateFailure, now: float) -> None:
        now = self._now = max(self._now, now)
        self._creating.pop(req_id, None)
        log.error("create failed", extra={"InstanceType": it.name, "error": failure.message,
                                          "isQuotaError": failure.quota,
                                          "isCapacityError": failure.capacity_scope is not None})
        n = len(self._workers) + len(self._creating)
        out = quota.after_create_failure(self._pool, failure, n, now)
        self._pool = out.state
        if out.quota == "zero":
            log.info("quota error with 0 running -- waiting for quotaErrorTTL")
        elif out.quota == "fewer":
            log.info("quota error -- waiting for next instance shutdown", extra={"N": n})
        if out.capacity_until is not None:
            log.info("capacity error -- pausing instance create calls",
                     extra={"capKey": repr(failure.capacity_scope), "atCapacityUntil": out.capacity_until})
        for when in out.wake:
            self._pass_at(when)
        self._touch()

    # -- events from workers -------------------------------------------------------------------------

    def worker_changed(self, view: WorkerView) -> None:
        w = self._workers.get(view.instance_id)
        if w is None:
            return  # already gone
        if view.state is not State.BOOTING and view.state is not State.UNKNOWN:
            w.boot_reported = True  # the worker reported success, failure or aborted
        if w.pending:
            # A report that predates a start we sent must not erase it (design rule 8).
            w.pending = {u: n for u, n in w.pending.items() if n > view.starts_seen}
            if w.pending:
                view = replace(view, running=tuple(sorted({*view.running, *w.pending})))
        old = w.view
        self._set_view(w, view)
        # Every probe moves ``probed``/``busy``; only what the planner reads is worth a pass now
        # (the periodic pass publishes the rest). At 1,000 workers this is 1 pass/s, not 37.
        # Idle and running are alike to the planner: a worker confirming a start we sent (idle ->
        # running, same containers) is no news; during a burst of 1,000 starts those reports
        # made 30 passes a second, each over every worker.
        if (_plan_state(old.state), old.idle_behavior, old.running, old.probe_done, old.instance_type,
                old.draining) != (_plan_state(view.state), view.idle_behavior, view.running,
                                  view.probe_done, view.instance_type, view.draining):
            self._touch()

    def container_ended(self, uuid: str, instance_id: str, at: float) -> None:
        self._exited[uuid] = at
        self._killing.pop(uuid, None)  # if a crunch-run of it shows up again, kill that one too
        self._touch()

    def container_start_failed(self, uuid: str, instance_id: str, reason: str) -> None:
        log.info("container start refused by worker", extra={"ContainerUUID": uuid, "Instance": instance_id,
                                                             "Reason": reason})
        self._touch()

    # -- events from the queue ---------------------------------------------------------------------

    def _put_entry(self, e: QueueEntry) -> None:
        if e.state in ("Queued", "Complete", "Cancelled"):
            self._exited.pop(e.uuid, None)  # its last attempt is over: requeued or finished
        self._queue[e.uuid] = e
        self._qver += 1
        if needs_reconcile(e):
            self._special[e.uuid] = None
        else:
            self._special.pop(e.uuid, None)

    def _drop_entry(self, uuid: str) -> None:
        self._exited.pop(uuid, None)
        self._op_fails.pop(uuid, None)
        if self._queue.pop(uuid, None) is not None:
            self._qver += 1
        self._special.pop(uuid, None)

    def queue_update(self, changed: tuple[QueueEntry, ...], removed: tuple[str, ...], updated_at) -> None:
        for e in changed:
            self._put_entry(e)
        for u in removed:
            self._drop_entry(u)
        if updated_at is not None:
            self._q_updated = updated_at
            self._queue_loaded = True
        self._touch()

    def container_op_done(self, uuid: str, op: str, entry: QueueEntry | None, error: str) -> None:
        self._ops.pop(uuid, None)
        old = self._queue.get(uuid)
        changed = entry is not None and entry != old
        if changed:
            self._put_entry(entry)
        if op == "lock" and not error and self._start_locked(uuid):
            self._op_fails.pop(uuid, None)
            return  # started where the last pass held room for it: no pass needed for this
        if error and not changed:
            # Nothing learnt (the follow-up GET failed too, or said nothing new): retry no
            # sooner than the next poll, then back off, instead of at once (issue 10 item 6).
            n = self._op_fails.get(uuid, (0, 0.0))[0] + 1
            wait = min(self._cfg.poll_interval * 2 ** (n - 1), OP_BACKOFF_MAX)
            self._op_fails[uuid] = (n, self._now + wait)
            self._pass_at(self._now + wait)
            return
        self._op_fails.pop(uuid, None)
        self._touch()

    def api_503(self, at: float) -> None:
        """The container API answered 503 at ``at``: fewer containers at once for a while."""
        if at > self._last_503:
            self._last_503 = at
            self._touch()

    # -- management requests (asked with .get(timeout) by API threads) ------------------------------

    def set_idle_behavior(self, instance_id: str, behavior: str) -> None:
        w = self._workers.get(instance_id)
        if w is None:
            raise NotFound("requested instance does not exist")
        self._tell(w, w.inbox.set_idle_behavior, Behavior(behavior), self._now)

    def kill_instance(self, instance_id: str, reason: str) -> None:
        w = self._workers.get(instance_id)
        if w is None:
            raise NotFound("instance not found")
        log.info("shutting down", extra={"Instance": instance_id, "Reason": reason})
        self._tell(w, w.inbox.kill_instance, reason, self._now)

    def kill_container(self, uuid: str, reason: str) -> None:
        for w in list(self._workers.values()):
            if uuid in w.view.running:
                self._tell(w, w.inbox.kill_container, uuid, reason, self._now)
                return
        raise NotFound("container not found")

    # -- the pass ------------------------------------------------------------------------------------

    def _running(self) -> dict[str, float | None]:
        """Containers some worker reports (``_holders``), then those whose exit is recorded."""
        running: dict[str, float | None] = dict.fromkeys(self._holders)
        running.update(self._exited)
        return running

    def _pass(self, now: float) -> None:
        p = self._pool = quota.expire(self._pool, now)
        running = self._running()
        # Only an unknown worker whose containers are still unknown (no run probe has answered)
        # suspends "Running on no worker -> cancel": an adopted, drained one that runs
        # containers for hours must not block it cluster-wide (issue 10 item 2); nor, past
        # TimeoutBooting, one that never answers (held, it is never shut down: G3)
        boot_limit = now - self._cfg.timeout_booting
        any_unknown = any(w.view.state is _UNKNOWN and not (w.view.run_probed or w.view.running)
                          and w.view.appeared > boot_limit for w in self._workers.values())
        if not self._gate(now, running):
            self._publish(now, running, None)
            return
        n_workers = len(self._workers)
        at_quota = p.at_quota(now) or (0 < self._cfg.max_instances <= n_workers + len(self._creating))
        self._conc = quota.adjust(self._conc, now, len(running), at_quota, n_workers, self._last_503)
        maxc = self._conc.max_containers
        maxs = quota.supervisor_limit(maxc, self._cfg.supervisor_fraction)
        slots = [Slot(iid, w.view.instance_type, w.view.state,
                      Behavior.DRAIN if w.view.draining else w.view.idle_behavior, w.view.running)
                 for iid, w in self._workers.items() if w.view.state is not _SHUTDOWN]
        slots += [Slot("", c.it, State.BOOTING, Behavior.RUN, ()) for c in self._creating.values()]
        limits = Limits(
            max_containers=maxc, max_supervisors=maxs,
            max_per_instance=self._cfg.max_running_containers_per_instance,
            max_instances=self._cfg.max_instances,
            max_concurrent_creates=self._cfg.max_concurrent_instance_create_ops,
            n_workers=n_workers, n_creating=len(self._creating),
            at_quota=p.at_quota(now), create_throttled=p.create_throttled(now),
            blocked=p.blocked(), quota_group=self._quota_group)
        pl = self._last_plan = plan((), running, slots, limits, base=self._base(), by_uuid=self._queue)
        self._apply(pl, now)
        for u in [u for u in self._killing if u not in running]:
            del self._killing[u]
        todo = [self._queue[u] for u in self._special]
        todo += [self._queue[u] for u in running if u in self._queue and u not in self._special]
        for action, uuid, reason in reconcile(todo, running, any_unknown, self._q_updated,
                                              in_queue=self._queue):
            self._reconcile_action(action, uuid, reason)
        self._publish(now, running, pl)

    def _base(self) -> list[QueueEntry]:
        """The queue sorted by planner.base_key, re-sorted only after it changed."""
        ver, base = self._base_order
        if ver != self._qver:
            base = sorted(self._queue.values(), key=base_key)
            self._base_order = (self._qver, base)
        return base

    def _gate(self, now: float, running) -> bool:
        """No scheduling until the first listing and queue poll are in and startup probes done."""
        if self._gate_open:
            return True
        if not (self._loaded and self._queue_loaded):
            return False
        unprobed = [w for w in self._workers.values()
                    if w.view.state is State.UNKNOWN and not w.view.probe_done]
        if self._had_unknown_at_start is None:
            self._had_unknown_at_start = any(w.view.state is State.UNKNOWN for w in self._workers.values())
            if self._had_unknown_at_start:
                log.info("FixStaleLocks starting.")
        if unprobed and now < self._started + self._cluster.containers.stale_lock_timeout:
            self._pass_at(self._started + self._cluster.containers.stale_lock_timeout)
            return False
        self._gate_open = True
        if self._had_unknown_at_start:
            for e in list(self._queue.values()):
                if e.state == "Locked" and e.uuid not in running and e.uuid not in self._ops:
                    self._ops[e.uuid] = "unlock"
                    self._queue_inbox.unlock(e.uuid, "stale lock")
            log.info("FixStaleLocks finished (%.1fs), starting scheduling.", now - self._started)
        return True

    def _apply(self, pl, now: float) -> None:
        self._lock_for = pl.lock_targets
        for uuid in pl.locks:
            if uuid in self._ops or self._backing_off(uuid, now):
                continue  # a lock/unlock of it is already in flight (Arvados' uuidLock)
            self._ops[uuid] = "lock"
            self._queue_inbox.lock(uuid)
        for uuid, iid in pl.starts:
            w = self._workers.get(iid)
            if uuid in self._ops:
                continue  # being unlocked or cancelled: never start it (issue 10 item 9)
            if w is not None:
                self._send_start(w, self._queue[uuid], now)
        for it, uuid in pl.creates:
            self._create(it, now)
        if pl.create_limited and not self._create_limited:
            log.info("reached MaxConcurrentInstanceCreateOps",
                     extra={"N": self._cfg.max_concurrent_instance_create_ops})
        self._create_limited = pl.create_limited
        for uuid, reason in pl.unlocks:
            if uuid in self._ops:
                continue
            log.info("unlock because pool capacity is used by higher priority containers",
                     extra={"ContainerUUID": uuid})
            self._ops[uuid] = "unlock"
            self._queue_inbox.unlock(uuid, reason)
        for iid in pl.shutdowns:
            w = self._workers.get(iid)
            if w is not None:
                self._tell(w, w.inbox.shutdown_if_allowed, "at quota", now)

    def _start_locked(self, uuid: str) -> bool:
        """Start a container the moment its lock succeeds, on the instance the last pass held for
        it, instead of waiting for the next pass (at 1,000 locks, a full pass per lock answer
        kept the starts behind the locks). Only if that instance still has room for it."""
        iid = self._lock_for.pop(uuid, None)
        e = self._queue.get(uuid)
        w = self._workers.get(iid) if iid else None
        if e is None or w is None or e.state != "Locked" or e.priority < 1 or uuid in self._exited:
            return False
        v = w.view
        per = self._cfg.max_running_containers_per_instance
        if (v.state not in STARTABLE or v.idle_behavior is not Behavior.RUN or v.draining
                or (per > 0 and len(v.running) >= per)):
            return False
        if uuid in self._holders:
            return False  # an earlier attempt is still known to run (a pass kills it first)
        avail, shared = type_resources(v.instance_type), False
        for u in v.running:
            other = self._queue.get(u)
            if other is None:
                return False  # an unknown container: its size is unknown (as the planner says)
            avail, shared = take(avail, other.resources, shared)
        if not fits(avail, e.resources, shared):
            return False
        self._send_start(w, e, self._now)
        return True

    def _send_start(self, w: _Worker, e: QueueEntry, now: float) -> None:
        """Every start goes out here, from a pass or with its lock's answer. Starts are numbered
        per worker: a report that predates one cannot erase it (see worker_changed)."""
        w.starts_sent += 1
        w.pending[e.uuid] = w.starts_sent
        self._tell(w, w.inbox.start_container, e, now)
        # optimistic: count it as running on that worker until the worker reports
        self._set_view(w, replace(w.view, running=tuple(sorted({*w.view.running, e.uuid}))))

    def _set_view(self, w: _Worker, view: WorkerView) -> None:
        """Every change of a known worker's view goes through here, to keep ``_holders``."""
        old, w.view = w.view.running, view
        if old == view.running:
            return
        iid = view.instance_id
        for u in set(old).difference(view.running):
            h = self._holders.get(u)
            if h is not None:
                h.pop(iid, None)
                if not h:
                    del self._holders[u]
        for u in view.running:
            self._holders.setdefault(u, {})[iid] = None

    def _backing_off(self, uuid: str, now: float) -> bool:
        f = self._op_fails.get(uuid)
        return f is not None and now < f[1]

    def _create(self, it: InstanceType, now: float) -> None:
        secret = secrets.token_hex(20)
        self._creating[secret] = _Pending(it, now)
        tag = self._cluster.tag
        tags = {tag("InstanceSetID"): self._set_id, tag("InstanceType"): it.name,
                tag("IdleBehavior"): "run", tag("InstanceSecret"): secret}
        init = crunchrun.init_command(secret, self._cfg.instance_init_command)
        log.info("creating new instance", extra={"InstanceType": it.name})
        if 0 < self._cfg.max_instances == len(self._workers) + len(self._creating):
            log.info("now at MaxInstances limit of %d instances", self._cfg.max_instances)
        self._iset.create(secret, it, tags, init, self._public_key, now)

    def _reconcile_action(self, action: str, uuid: str, reason: str) -> None:
        if action == "kill":
            self._exited.pop(uuid, None)  # an exited one is only forgotten: nothing to kill
            holders = [w for w in self._workers.values() if uuid in w.view.running]
            if not holders or self._killing.get(uuid) == reason:
                return  # already told: the worker repeats the signal on its own timer
            self._killing[uuid] = reason
            log.info("kill container because %s", reason, extra={"ContainerUUID": uuid, "Reason": reason})
            for w in holders:
                self._tell(w, w.inbox.kill_container, uuid, reason, self._now)
            return
        if action == "forget":
            log.info(reason, extra={"ContainerUUID": uuid})
            self._drop_entry(uuid)
            self._queue_inbox.forget(uuid)
            return
        if uuid in self._ops or self._backing_off(uuid, self._now):
            return
        self._ops[uuid] = action
        if action == "cancel":
            self._queue_inbox.cancel(uuid, reason)
        elif action == "requeue":
            log.info("requeueing locked container because %s", reason, extra={"ContainerUUID": uuid})
            # The exit record stays until the container is seen Queued (or finished): until then
            # it counts as running, so no pass starts it again under the lock being released,
            # and a failed unlock is retried (Go: kill/ForgetContainer).
            self._queue_inbox.unlock(uuid, reason)

    # -- publishing ----------------------------------------------------------------------------------

    def _publish(self, now: float, running, pl) -> None:
        views, self._iviews = render.instance_rows(
            ((iid, w.view) for iid, w in self._workers.items()),
            (c.it for c in self._creating.values()), self._iviews)
        qsorted = None if pl is not None else sorted(self._queue.values(), key=lambda e: e.first_seen_at)
        at_quota = pl.at_quota if pl is not None else self._pool.at_quota(now)
        box = self._box

        def lazy():
            """Runs in whichever thread first reads the snapshot's queue (API, /metrics). It
            touches no scheduler state: it renders into a copy of the box's row cache and
            publishes that copy for the next snapshot (two renders at once never share a dict)."""
            order = pl.order if pl is not None else qsorted
            statuses = pl.status_list() if pl is not None else [""] * len(order)
            memo = dict(box.row_memo)
            out = render.queue_rows(order, statuses, running, now, memo)
            box.row_memo = memo
            return out

        self._box.snapshot = LiveSnapshot(
            lazy=lazy, taken_at=now, instances=tuple(views),
            runners=MappingProxyType({u: iid for iid, w in self._workers.items() for u in w.view.running}),
            at_quota=at_quota, max_concurrent_containers=self._conc.max_containers,
            containers_allocated_not_started=pl.allocated_not_started if pl else 0,
            containers_not_allocated_over_quota=pl.over_quota if pl else 0,
            last_503_time=self._conc.last_503, ready=self._gate_open)
