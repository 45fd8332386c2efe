"""One scheduling pass as a pure function: queue + instances + pool limits -> actions.

This is Arvados ``scheduler/run_queue.go`` (``runQueue``) and ``sync.go`` without the I/O: the
SchedulerActor gathers a consistent picture, calls :func:`plan` and :func:`reconcile`, and
applies what they return. Same rules, same status strings (two spaces after each period), so an
operator reading ``/arvados/v1/dispatch/containers`` sees what the Go dispatcher would say.

Performance: a pass visits the sorted queue once; per-instance free resources are only computed
for instances of a container's eligible types, and the status of every waiting container after
the pass stops is derived lazily from its queue position (see :class:`Plan`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from actors.messages import Behavior, QueueEntry, State
from actors.resources import NOTHING, Resources, fits, take, type_resources
from conf.model import InstanceType

ALLOCATED = "Container is allocated to an instance and preparing to run."
STARTABLE = (State.IDLE, State.RUNNING)
USABLE = (State.UNKNOWN, State.RUNNING, State.BOOTING, State.IDLE)


def waiting_for_boot(it: InstanceType) -> str:
    return f"Waiting for a {it.name} instance to boot and be ready to accept work."


def queue_reason(pos: int, at_quota: bool) -> str:
    if at_quota:
        return f"Waiting in queue at position {pos}.  Cluster is at cloud account limits and cannot start any new instances right now."
    return f"Waiting in queue at position {pos}.  Cluster is at capacity and cannot start any new instances right now."


@dataclass(frozen=True)
class Slot:
    """An instance as the planner sees it; ``id`` "" is a create still in flight."""

    id: str
    instance_type: InstanceType
    state: State
    behavior: Behavior
    running: tuple[str, ...] = ()


@dataclass(frozen=True)
class Limits:
    max_containers: int  # 0 = unlimited
    max_supervisors: int  # 0 = unlimited
    max_per_instance: int  # MaxRunningContainersPerInstance, 0 = unlimited
    max_instances: int  # MaxInstances, 0 = unlimited
    max_concurrent_creates: int  # 0 = unlimited
    n_workers: int  # listed instances (pending creates excluded)
    n_creating: int
    at_quota: bool  # quota error state, independent of MaxInstances
    create_throttled: bool  # rate-limit or concurrency holdoff in force
    blocked: frozenset = frozenset()  # capacity keys (see cloud.base.capacity_keys)
    quota_group: Callable[[InstanceType], str] = lambda it: ""


@dataclass
class Plan:
    head: list[QueueEntry]  # entries with a crunch-run on some worker, in base order
    base: list[QueueEntry]  # every entry, sorted by (not Locked, -priority, first seen)
    running: Mapping[str, float | None]
    locks: list[str] = field(default_factory=list)
    # uuid -> the ready instance this pass holds for it once its lock succeeds (start it there)
    lock_targets: dict[str, str] = field(default_factory=dict)
    starts: list[tuple[str, str]] = field(default_factory=list)  # (uuid, instance id)
    creates: list[tuple[InstanceType, str]] = field(default_factory=list)  # (type, for uuid)
    unlocks: list[tuple[str, str]] = field(default_factory=list)  # (uuid, reason)
    shutdowns: list[str] = field(default_factory=list)
    statuses: dict[str, str] = field(default_factory=dict)
    at_quota: bool = False
    create_limited: bool = False  # a create was wanted but MaxConcurrentInstanceCreateOps is reached
    allocated_not_started: int = 0
    over_quota: int = 0
    # waiting entries without a status get "position N" in queue order, starting after qpos
    qpos: int = 0

    @property
    def order(self) -> list[QueueEntry]:
        """The queue in Arvados' order: running first, then Locked, priority, first seen."""
        run = self.running
        return self.head + [e for e in self.base if e.uuid not in run]

    def status_list(self) -> list[str]:
        """Every entry's scheduling_status, in queue order (computed on demand)."""
        out, qpos = [], self.qpos
        for e in self.order:
            s = self.statuses.get(e.uuid)
            if s is None and e.state in ("Queued", "Locked"):
                qpos += 1
                s = queue_reason(qpos, self.at_quota)
            out.append(s or "")
        return out


class _Free:
    """What one instance has left during a pass (mutable; the arithmetic is actors.resources')."""

    __slots__ = ("slot", "avail", "shared", "running", "order")

    def __init__(self, slot: Slot, order):
        self.slot = slot
        self.avail = type_resources(slot.instance_type)
        self.shared = False  # a 0-VCPU container shares a VCPU here
        self.running = list(slot.running)
        self.order = order

    def fits(self, r: Resources) -> bool:
        return fits(self.avail, r, self.shared)

    def take(self, r: Resources) -> None:
        self.avail, self.shared = take(self.avail, r, self.shared)

    def zero(self) -> None:
        self.avail = NOTHING


def sort_key(e: QueueEntry, running: Mapping[str, float | None]):
    return (e.uuid not in running, e.state != "Locked", -e.priority, e.first_seen_at)


def base_key(e: QueueEntry):
    """:func:`sort_key` without the running-first part, so it can be cached between passes."""
    return (e.state != "Locked", -e.priority, e.first_seen_at)


def instance_sort_key(s: Slot):
    it = s.instance_type
    return (it.price, -it.vcpus, -it.ram, -it.scratch, s.id)


def plan(queue: Sequence[QueueEntry], running: Mapping[str, float | None], slots: Sequence[Slot],
         limits: Limits, *, base: list[QueueEntry] | None = None,
         by_uuid: Mapping[str, QueueEntry] | None = None) -> Plan:
    """``base`` (the whole queue already in :func:`base_key` order) and ``by_uuid`` let a caller
    that keeps them between passes skip re-sorting 100,000 entries."""
    if by_uuid is None:
        by_uuid = {e.uuid: e for e in queue}
    if base is None:
        base = sorted(by_uuid.values(), key=base_key)
    head = sorted((by_uuid[u] for u in running if u in by_uuid), key=base_key)
    p = Plan(head=head, base=base, running=running)
    frees = sorted((_Free(s, instance_sort_key(s)) for s in slots), key=lambda f: f.order)
    # Candidates for placement, by type. An instance that can take nothing now (not usable, not
    # running new work, or no VCPU left: fits() needs one) is left out, so that a queue of
    # Locked containers waiting behind 1,000 full instances is not O(queue x instances).
    by_type: dict[str, list[_Free]] = {}
    for f in frees:
        for uuid in f.slot.running:
            e = by_uuid.get(uuid)
            if e is None:
                f.zero()  # an unknown container: its size is unknown, so nothing else fits
                break
            f.take(e.resources)
        s = f.slot
        if s.state in USABLE and s.behavior is Behavior.RUN and f.avail.vcpus > 0:
            by_type.setdefault(s.instance_type.name, []).append(f)

    creates_left = (limits.max_concurrent_creates - limits.n_creating
                    if limits.max_concurrent_creates > 0 else 1 << 30)
    n_instances = limits.n_workers + limits.n_creating

    def at_quota() -> bool:
        return limits.at_quota or (0 < limits.max_instances <= n_instances + len(p.creates))

    cap_cache: dict[tuple[str, bool], bool] = {}

    def at_capacity(it: InstanceType) -> bool:
        k = (it.provider_type, it.preemptible)
        v = cap_cache.get(k)
        if v is None:
            b = limits.blocked
            v = bool(b) and (("all",) in b or ("group", limits.quota_group(it)) in b
                             or ("type", it.provider_type, it.preemptible) in b)
            cap_cache[k] = v
        return v

    trying = len(running)
    supervisors = 0
    overquota: list[QueueEntry] = []
    overmaxsuper: list[QueueEntry] = []
    maxc, maxs, per_inst = limits.max_containers, limits.max_supervisors, limits.max_per_instance
    statuses = p.statuses

    def not_scheduled(ent) -> None:
        statuses[ent.uuid] = ("This container will not be scheduled to run because its priority is 0 "
                              f"and state is {ent.state}.")

    def over_max_super(ent) -> None:
        overmaxsuper.append(ent)
        statuses[ent.uuid] = (f"Waiting in workflow queue at position {len(overmaxsuper)}.  Cluster is "
                              "at capacity and cannot start any new workflows right now.")

    for ent in head:
        if ent.supervisor:
            supervisors += 1
        if ent.state in ("Queued", "Locked"):
            statuses[ent.uuid] = ALLOCATED
    rest = base  # running entries were visited above; skip them here
    for i, ent in enumerate(rest):
        uuid = ent.uuid
        if uuid in running:
            continue
        if maxc > 0 and trying >= maxc:
            # Nothing further can be locked, started or created in this pass: only priority-0
            # and over-limit supervisor entries still get a status. Visit just those.
            for e in rest[i:]:
                if not (e.supervisor or e.priority < 1) or e.uuid in running:
                    continue
                if e.supervisor:
                    supervisors += 1
                # priority 0 first, as Go does: such a supervisor is not "waiting in the workflow
                # queue", nor over quota, nor unlocked for capacity (issue 10 item 14)
                if e.priority < 1:
                    not_scheduled(e)
                elif maxs > 0 and supervisors > maxs:
                    over_max_super(e)
            break
        if ent.supervisor:
            supervisors += 1
        if ent.priority < 1:
            not_scheduled(ent)
            continue
        if ent.supervisor and maxs > 0 and supervisors > maxs:
            over_max_super(ent)
            continue
        if ent.state not in ("Queued", "Locked"):
            continue
        trying += 1
        need = ent.resources
        cands = []
        for it in ent.instance_types:
            for f in by_type.get(it.name, ()):
                s = f.slot
                if s.state not in USABLE or s.behavior is not Behavior.RUN:
                    continue
                if per_inst > 0 and len(f.running) >= per_inst:
                    continue
                if f.fits(need):
                    cands.append(f)
        best = None
        if cands:
            if len(ent.instance_types) > 1:
                cands.sort(key=lambda f: f.order)
            for f in cands:
                if (best is None or len(f.running) > len(best.running)
                        or (best.slot.state in (State.BOOTING, State.UNKNOWN) and f.slot.state in STARTABLE)):
                    best = f
        avail = None
        for it in ent.instance_types:
            if not at_capacity(it):
                avail = it
                break
        if ent.state == "Queued":
            if best is None and at_quota():
                overquota = [e for e in rest[i:] if e.uuid not in running]
                break
            if best is None and avail is None:
                continue
            p.locks.append(uuid)
            if best is not None:
                best.take(need)
                best.running.append(uuid)
                if best.slot.id and best.slot.state in STARTABLE:
                    p.lock_targets[uuid] = best.slot.id
            continue
        # Locked
        if best is not None:
            best.take(need)
            best.running.append(uuid)
            s = best.slot
            if s.id == "" or s.state not in STARTABLE:
                statuses[uuid] = waiting_for_boot(s.instance_type)
                p.allocated_not_started += 1
            else:
                p.starts.append((uuid, s.id))
                statuses[uuid] = ALLOCATED
            continue
        if at_quota():
            overquota = [e for e in rest[i:] if e.uuid not in running]
            break
        if avail is None:
            p.qpos += 1
            names = ", ".join(t.name for t in ent.instance_types)
            statuses[uuid] = (f"Waiting in queue at position {p.qpos}.  Cluster is at capacity for all "
                              f"eligible instance types ({names}) and cannot start a new instance right now.")
            continue
        if limits.create_throttled:
            continue
        if creates_left <= 0:
            p.create_limited = True
            continue
        creates_left -= 1
        p.creates.append((avail, uuid))
        statuses[uuid] = waiting_for_boot(avail)
        p.allocated_not_started += 1
        ph = Slot("", avail, State.BOOTING, Behavior.RUN, ())
        f = _Free(ph, instance_sort_key(ph))
        f.take(need)
        f.running.append(uuid)
        lst = by_type.setdefault(avail.name, [])
        lst.append(f)
        lst.sort(key=lambda x: x.order)
        frees.append(f)

    p.at_quota = at_quota()
    p.over_quota = len(overquota) + len(overmaxsuper)
    unlock = list(overmaxsuper)
    unlock += overquota[1:] if (limits.n_workers > 0 and len(overquota) > 1) else overquota
    for e in unlock:
        if e.state == "Locked" and e.uuid not in running:
            p.unlocks.append((e.uuid, "pool capacity is used by higher priority containers"))
    if overquota:
        p.shutdowns = [f.slot.id for f in frees if f.slot.id and not f.running]
    return p


def needs_reconcile(e: QueueEntry) -> bool:
    """Can :func:`reconcile` act on this entry when no crunch-run of it is known? (pure)"""
    return e.state in ("Running", "Complete", "Cancelled") or e.priority == 0


def reconcile(queue: Sequence[QueueEntry], running: Mapping[str, float | None], any_unknown: bool,
              q_updated: float, *, in_queue=None) -> list[tuple[str, str, str]]:
    """Arvados ``sync()``: make the queue and the workers agree. Returns (action, uuid, reason).

    Actions: cancel, kill, forget, requeue. ``running`` maps uuid -> exit time (None while its
    crunch-run is alive); ``q_updated`` is when the last completed queue poll started. A caller
    may pass only the entries that can need an action (:func:`needs_reconcile`, or running)
    plus ``in_queue``, the set of every queued uuid.
    """
    out = []
    seen = set() if in_queue is None else in_queue
    for e in queue:
        uuid = e.uuid
        if in_queue is None:
            seen.add(uuid)
        exited = running.get(uuid)
        is_running = uuid in running
        if e.state == "Running":
            if not is_running:
                if not any_unknown:
                    out.append(("cancel", uuid, "not running on any worker"))
            elif exited is not None and q_updated > exited:
                out.append(("cancel", uuid, "state=Running after crunch-run exited"))
            elif e.priority == 0:
                out.append(("kill", uuid, "priority=0"))
        elif e.state in ("Complete", "Cancelled"):
            if is_running:
                out.append(("kill", uuid, f"state={e.state}"))
            else:
                out.append(("forget", uuid, "container finished -- dropping from queue"))
        elif e.state == "Queued":
            if is_running:
                out.append(("kill", uuid, "pool says running, but queue says state=Queued"))
            elif e.priority == 0:
                out.append(("forget", uuid, "container on hold -- dropping from queue"))
        elif e.state == "Locked":
            if is_running and exited is not None and q_updated > exited:
                out.append(("requeue", uuid, "crunch-run exited"))
            elif is_running and exited is None and e.priority == 0:
                out.append(("kill", uuid, "priority=0"))
            elif not is_running and e.priority == 0:
                out.append(("requeue", uuid, "priority=0"))
    for uuid in running:
        if uuid not in seen:
            out.append(("kill", uuid, "not in queue"))
    return out
