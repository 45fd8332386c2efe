"""The simulation's accounts: what each instance cost and how it spent its time; the waits.

Pure bookkeeping fed by the stub cloud's milestones (:attr:`cloud.stub.driver.StubCloud.listener`),
so the bill is the cloud's: an instance costs its type's hourly price from Create until it is
gone. Its time is split into

* ``booting`` — from Create until its boot probe first answers;
* ``busy`` — while at least one crunch-run holds a container lock on it;
* ``idle`` — booted, nothing running, not yet told to go;
* ``shutting_down`` — from Destroy until it is gone.

The lower bound is each container's run time at the price of the cheapest type it fits (no
boot, no idle); spent / lower bound says what the dispatcher's policy costs. When containers
may share an instance (MaxRunningContainersPerInstance != 1) the dispatcher can beat that bound
by packing, so a second, packed bound charges each container only its share of the instance:
its largest fraction of the type's VCPUs, RAM, scratch or GPUs, at the type where that share
costs least.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

STATES = ("booting", "busy", "idle", "shutting_down")


@dataclass
class _VM:
    type_name: str
    price: float
    state: str
    since: float
    procs: int = 0
    running: set = field(default_factory=set)  # containers Running on it


@dataclass
class Sample:
    t: float  # seconds since the start
    instances: dict  # state -> count
    queued: int
    running: int
    cost: float


@dataclass
class Ledger:
    start: float
    vms: dict = field(default_factory=dict)  # instance id -> _VM (alive ones)
    seconds: Counter = field(default_factory=Counter)  # (type, state) -> seconds
    prices: dict = field(default_factory=dict)  # type -> $/h
    created: Counter = field(default_factory=Counter)  # type -> instances created
    counts: Counter = field(default_factory=Counter)  # state -> alive instances in it
    running: int = 0  # containers Running in the cloud now
    peak_instances: int = 0
    peak_running: int = 0
    cloud_errors: Counter = field(default_factory=Counter)  # kind -> count
    samples: list = field(default_factory=list)
    _closed_cost: float = 0.0

    # -- the cloud's milestones --------------------------------------------------------------------

    def on_cloud(self, event: str, vm, at: float, uuid: str = "") -> None:
        """``listener(event, vm, at, uuid)`` for the stub cloud."""
        iid = vm.id
        if event == "create":
            it = vm.instance_type
            self.prices[it.name] = it.price
            self.created[it.name] += 1
            self.vms[iid] = _VM(it.name, it.price, "booting", at)
            self.counts["booting"] += 1
            self.peak_instances = max(self.peak_instances, len(self.vms))
            return
        v = self.vms.get(iid)
        if v is None:
            return
        if event == "running":
            v.running.add(uuid)
            self.running += 1
            self.peak_running = max(self.peak_running, self.running)
        elif event == "exit":
            if uuid in v.running:
                v.running.discard(uuid)
                self.running -= 1
        elif event == "ready":
            if v.state == "booting":
                self._move(v, "busy" if v.procs else "idle", at)
        elif event == "detach":
            v.procs += 1
            if v.state == "idle":
                self._move(v, "busy", at)
        elif event == "release":
            v.procs = max(0, v.procs - 1)
            if not v.procs and v.state == "busy":
                self._move(v, "idle", at)
        elif event == "destroy":
            v.procs = 0
            self.running -= len(v.running)  # killed with their VM: no exit comes
            v.running.clear()
            self._move(v, "shutting_down", at)
        elif event == "remove":
            self._move(v, "", at)
            del self.vms[iid]

    def _move(self, v: _VM, state: str, at: float) -> None:
        dt = max(0.0, at - v.since)
        self.seconds[(v.type_name, v.state)] += dt
        self._closed_cost += dt * v.price / 3600
        self.counts[v.state] -= 1
        if state:
            self.counts[state] += 1
        v.state, v.since = state, at

    # -- time --------------------------------------------------------------------------------------

    def cost_at(self, now: float) -> float:
        return self._closed_cost + sum(max(0.0, now - v.since) * v.price / 3600 for v in self.vms.values())

    def sample(self, now: float, queued: int) -> None:
        self.samples.append(Sample(round(now - self.start, 3), {s: self.counts[s] for s in STATES},
                                   queued, self.running, self.cost_at(now)))

    def finish(self, now: float) -> None:
        """Bill the instances still alive up to ``now`` (a run cut short by its time limit)."""
        for v in self.vms.values():
            dt = max(0.0, now - v.since)
            self.seconds[(v.type_name, v.state)] += dt
            self._closed_cost += dt * v.price / 3600
            v.since = now

    # -- results -----------------------------------------------------------------------------------

    @property
    def total_cost(self) -> float:
        return sum(secs * self.prices[t] / 3600 for (t, _), secs in self.seconds.items())

    def hours_by_type(self) -> dict:
        out = {}
        for name in sorted(self.prices, key=lambda n: (self.prices[n], n)):
            hours = {s: self.seconds.get((name, s), 0.0) / 3600 for s in STATES}
            total = sum(hours.values())
            out[name] = {"price": self.prices[name], "created": self.created[name], "hours": hours,
                         "total_hours": total, "cost": total * self.prices[name]}
        return out


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of already sorted values (None for none)."""
    if not sorted_values:
        return None
    k = max(0, min(len(sorted_values) - 1, math.ceil(q / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


def wait_stats(waits: Iterable[float]) -> dict:
    w = sorted(waits)
    return {"count": len(w), "p50": percentile(w, 50), "p95": percentile(w, 95), "max": w[-1] if w else None}


def size_class(vcpus: int, gpu: int = 0) -> str:
    """Containers grouped for the wait table: GPU jobs apart, else VCPUs in powers of two."""
    if gpu:
        return "GPU"
    if vcpus <= 1:
        return "1 VCPU"
    if vcpus == 2:
        return "2 VCPUs"
    hi = 1 << (vcpus - 1).bit_length()
    return f"{hi // 2 + 1}-{hi} VCPUs"


def size_class_order(name: str) -> tuple:
    if name == "GPU":
        return (1, 0)
    return (0, int(name.split()[0].split("-")[-1]))


def share_price(need, types) -> float | None:
    """The least hourly price of the share of an instance a container needs, over ``types``
    (InstanceTypes it fits): price x its dominant fraction of VCPUs, RAM, scratch, GPUs."""
    best = None
    for it in types:
        fracs = [need.vcpus / it.vcpus if it.vcpus else 0.0, need.ram / it.ram if it.ram else 0.0]
        if it.scratch:
            fracs.append(need.scratch / it.scratch)
        if it.gpu.device_count:
            fracs.append(need.gpus / it.gpu.device_count)
        p = it.price * min(1.0, max(fracs))
        best = p if best is None else min(best, p)
    return best


def lower_bound(jobs: Iterable[tuple[float, float | None]]) -> float:
    """Sum of run time x hourly price of the cheapest fitting type, over (runtime s, price)
    pairs; a job that fits no type (price None) adds nothing."""
    return sum(rt * price / 3600 for rt, price in jobs if price is not None)
