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

from bisect import bisect_left, bisect_right
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

    __slots__ = ("slot", "avail", "shared", "running", "order", "pristine")

    def __init__(self, slot: Slot, order):
        self.slot = slot
        self.avail = type_resources(slot.instance_type)
        self.shared = False  # a 0-VCPU container shares a VCPU here
        self.running = list(slot.running)
        self.order = order
        self.pristine = False  # in its _TypeCands' pristine list

    def fits(self, r: Resources) -> bool:
        return fits(self.avail, r, self.shared)

    def take(self, r: Resources) -> None:
        self.avail, self.shared = take(self.avail, r, self.shared)

    def zero(self) -> None:
        self.avail = NOTHING


class _TypeCands:
    """The placement candidates of one instance type during a pass.

    An instance nothing runs on and nothing was placed on yet ("pristine": every resource of its
    type left) is interchangeable with the others but for its order and its state, so a container
    needs to look at only a few of them (see :meth:`candidates`). Before, every container
    scanned every instance of its types: 500 locks onto 1,000 idle instances cost 500,000 fit
    checks, a pass took 200 ms of CPU (0.4-1 s of wall time on a busy 2-core machine), and the
    lock answers waiting behind it held their starts back. An instance that can take nothing
    more leaves the candidates altogether.
    """

    __slots__ = ("touched", "pristine", "pkeys", "ready", "rkeys")

    def __init__(self):
        self.touched: list[_Free] = []  # in the order they were touched (sorted when used)
        self.pristine: list[_Free] = []  # in instance order
        self.pkeys: list = []  # their orders, for bisect
        self.ready: list[_Free] = []  # the pristine ones in STARTABLE states, in instance order
        self.rkeys: list = []  # their orders, for bisect

    def add(self, f: _Free) -> None:
        """Add in instance order (pristine ones must come in order)."""
        if not f.running and f.avail == type_resources(f.slot.instance_type) and not f.shared:
            f.pristine = True
            self.pristine.append(f)
            self.pkeys.append(f.order)
            if f.slot.state in STARTABLE:
                self.ready.append(f)
                self.rkeys.append(f.order)
        else:
            self.touched.append(f)

    def placed(self, f: _Free, more: bool) -> None:
        """``f`` took a container; ``more``: it can still take another."""
        if f.pristine:
            f.pristine = False
            i = bisect_left(self.pkeys, f.order)
            while self.pristine[i] is not f:  # creates in flight share an order ("" ids)
                i += 1
            del self.pristine[i], self.pkeys[i]
            if f.slot.state in STARTABLE:
                i = bisect_right(self.rkeys, f.order) - 1
                del self.ready[i], self.rkeys[i]
            if more:
                self.touched.append(f)
        elif not more:
            self.touched.remove(f)


def candidates(groups: list[_TypeCands], need: Resources, per_inst: int) -> list[_Free]:
    """The instances of ``groups`` that can take ``need``, in instance order, or enough of them
    that :func:`choose` picks from them what it would pick from all.

    choose() keeps the instance with most containers, or swaps a booting/unknown one for a later
    ready one. A pristine instance (no containers) can therefore be picked only as the very first
    candidate, or as the first ready one after the current pick. The current pick is the first
    candidate or a touched one, so beyond the touched instances only these pristine ones can
    matter: each type's first, its first ready one, and its first ready one after each touched
    candidate (of any type)."""
    touched = [f for g in groups for f in g.touched
               if (per_inst <= 0 or len(f.running) < per_inst) and f.fits(need)]
    out = {id(f): f for f in touched}
    for g in groups:
        if not g.pristine or not g.pristine[0].fits(need):
            continue  # pristine instances of one type all have the same resources left
        first = g.pristine[0]
        out[id(first)] = first
        if g.ready:
            out[id(g.ready[0])] = g.ready[0]
            for t in touched:
                i = bisect_right(g.rkeys, t.order)
                if i < len(g.ready):
                    out[id(g.ready[i])] = g.ready[i]
    res = list(out.values())
    if len(res) > 1:
        res.sort(key=lambda f: f.order)
    return res


def choose(cands: list[_Free]) -> _Free | None:
    """Go's bestInstIdx: the first eligible instance, then one with more containers running,
    or a ready (idle/running) one over a booting/unknown pick."""
    best = None
    for f in cands:
        if (best is None or len(f.running) > len(best.running)
                or (best.slot.state in (State.BOOTING, State.UNKNOWN) and f.slot.state in STARTABLE)):
            best = f
    return best


def base_key(e: QueueEntry):
    """Queue order as Go's (Locked first, then priority, then first seen), and oldest first among
    containers one poll brought together (Go leaves those in any order; a burst's stragglers were
    the ones submitted just after a poll and then locked last in the next one). Running ones go
    first in :func:`plan`, which keeps this order cacheable between passes."""
    return (e.state != "Locked", -e.priority, e.first_seen_at, e.created_at)


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
    by_type: dict[str, _TypeCands] = {}
    for f in frees:
        for uuid in f.slot.running:
            e = by_uuid.get(uuid)
            if e is None:
                f.zero()  # an unknown container: its size is unknown, so nothing else fits
                break
            f.take(e.resources)
        s = f.slot
        if (s.state in USABLE and s.behavior is Behavior.RUN and f.avail.vcpus > 0
                and (limits.max_per_instance <= 0 or len(f.running) < limits.max_per_instance)):
            g = by_type.get(s.instance_type.name)
            if g is None:
                g = by_type[s.instance_type.name] = _TypeCands()
            g.add(f)

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

    def place(f: _Free, uuid: str, need: Resources) -> None:
        f.take(need)
        f.running.append(uuid)
        more = f.avail.vcpus > 0 and (per_inst <= 0 or len(f.running) < per_inst)
        by_type[f.slot.instance_type.name].placed(f, more)

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
        groups = [g for g in (by_type.get(it.name) for it in ent.instance_types) if g is not None]
        best = choose(candidates(groups, need, per_inst)) if groups else None
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
                place(best, uuid, need)
                if best.slot.id and best.slot.state in STARTABLE:
                    p.lock_targets[uuid] = best.slot.id
            continue
        # Locked
        if best is not None:
            place(best, uuid, need)
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
        if f.avail.vcpus > 0 and (per_inst <= 0 or len(f.running) < per_inst):
            g = by_type.get(avail.name)
            if g is None:
                g = by_type[avail.name] = _TypeCands()
            g.add(f)
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
