"""One ``simulate`` run: a workload through the real actors on the stub cloud, and its accounts.

The actors run on the deterministic runtime (:mod:`actors.simruntime`) under a FakeClock, the
container API is the in-process SQLite store, and the stub cloud runs each container for the
workload's run time and exits with its exit code. Time moves event to event; nothing waits on
the wall clock, so a run costs what its events cost and the same inputs give the same report.
"""

from __future__ import annotations

import gc
import heapq
import logging
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import yaml

from actors.instancetype import ConstraintsNotSatisfiable
from actors.queue import parse_time
from actors.sim import START, Simulation
from actors.simulate.ledger import (Ledger, lower_bound, share_price, size_class, size_class_order,
                                    wait_stats)
from actors.simulate.workload import Job
from cloud.base import CapacityError, is_quota_error, rate_limit_retry_at
from cloud.stub.driver import StubParams, StubParamsError

log = logging.getLogger("dispatch.simulate")

# The simulated cloud for a config whose driver is not the stub: VMs boot in 1.5-2.5 minutes.
DEFAULT_CLOUD = {"BootTime": "90s", "BootTimeJitter": "60s"}
SAMPLE_EVERY = 60.0  # simulated seconds between samples for the plots
# A simulation makes millions of short-lived messages and views: collect the young generation
# less often than Python's default (700), ~10 % faster on the simulated day.
GC_THRESHOLDS = (50_000, 20, 100)


class SimulateError(ValueError):
    """Bad input to a run (the message names the option or file and key)."""


def cloud_params(cluster, overrides: Mapping[str, str], source: str) -> StubParams:
    """The stub cloud's knobs: the config's stub DriverParameters (or DEFAULT_CLOUD for another
    driver), then each ``--cloud Key=Value``."""
    base = dict(cluster.cloud_vms.driver_parameters) if cluster.cloud_vms.driver == "stub" else dict(DEFAULT_CLOUD)
    where = f"{source}: Containers.CloudVMs.DriverParameters"
    try:
        StubParams.from_driver_parameters(base, where)
    except StubParamsError as e:
        raise SimulateError(str(e)) from None
    for key, raw in overrides.items():
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        base[key] = value
        try:
            StubParams.from_driver_parameters({key: value}, "--cloud")
        except StubParamsError as e:
            raise SimulateError(str(e)) from None
    return StubParams.from_driver_parameters(base, where)


@dataclass
class _Submitted:
    job: Job
    uuid: str
    at: float


class Run:
    """Drives one Simulation through ``jobs``; :meth:`result` is the report's data for it."""

    def __init__(self, cluster, jobs: list[Job], *, params: StubParams, seed: int = 0,
                 max_hours: float | None = None, progress: Callable[[float, "Run"], None] | None = None):
        self.cluster = cluster
        self.jobs = jobs
        self.seed = seed
        self.progress = progress
        self.sim = Simulation(cluster, stub_params=replace(params, seed=seed), seed=seed, metrics=False)
        self.ledger = Ledger(start=START)
        self.submitted: dict[str, _Submitted] = {}  # job id -> submission
        self._by_uuid: dict[str, Job] = {}
        self._children: dict[str, list[Job]] = {}
        for j in jobs:
            if j.parent:
                self._children.setdefault(j.parent, []).append(j)
        self._arrivals: list = []  # heap of (time, seq, job)
        self._seq = 0
        for j in jobs:
            if not j.parent:
                self._arrive(START + j.submit, j)
        last = max((j.submit for j in jobs if not j.parent), default=0.0)
        longest = max((j.runtime for j in jobs), default=0.0)
        # a horizon for the progress bar, and the hard stop unless --max-hours says otherwise
        self.expected_end = START + last + longest + 3600
        self.limit = START + (max_hours * 3600 if max_hours else last + 7 * 86400)
        self.timed_out = False
        self.containers: dict[str, dict] = {}  # uuid -> the container record at the end
        cloud = self.sim.cloud
        cloud.listener = self._on_cloud
        cloud.run_time_of = lambda ctr: self._by_uuid[ctr["uuid"]].runtime if ctr["uuid"] in self._by_uuid else None
        cloud.setup_vm = self._setup_vm
        self._count_cloud_errors(self.sim.dispatcher.driver_set)

    # -- hooks -----------------------------------------------------------------------------------------

    def _arrive(self, at: float, job: Job) -> None:
        self._seq += 1
        heapq.heappush(self._arrivals, (at, self._seq, job))

    def _on_cloud(self, event: str, vm, at: float, uuid: str) -> None:
        self.ledger.on_cloud(event, vm, at, uuid)
        if event == "running":
            job = self._by_uuid.get(uuid)
            if job is not None and job.id in self._children:
                for child in self._children.pop(job.id):  # a workflow runner submits its steps
                    self._arrive(at + child.submit, child)

    def _setup_vm(self, vm) -> None:
        by_uuid = self._by_uuid
        vm.execute_container = lambda ctr: by_uuid[ctr["uuid"]].exit_code if ctr["uuid"] in by_uuid else 0

    def _count_cloud_errors(self, driver_set) -> None:
        ledger = self.ledger
        real_create, real_instances = driver_set.create, driver_set.instances

        def classify(op, e):
            kind = ("quota" if is_quota_error(e) else "rate_limit" if rate_limit_retry_at(e) else
                    "capacity" if isinstance(e, CapacityError) else "other")
            ledger.cloud_errors[f"{op}_{kind}"] += 1

        def create(*a, **kw):
            try:
                return real_create(*a, **kw)
            except Exception as e:
                classify("create", e)
                raise

        def instances(*a, **kw):
            try:
                return real_instances(*a, **kw)
            except Exception as e:
                classify("list", e)
                raise
        driver_set.create, driver_set.instances = create, instances

    # -- running ---------------------------------------------------------------------------------------

    def _submit_due(self) -> None:
        sim = self.sim
        while self._arrivals and self._arrivals[0][0] <= sim.now:
            at, _, job = heapq.heappop(self._arrivals)
            uuid = sim.api.create_container(job.container())["uuid"]
            self.submitted[job.id] = _Submitted(job, uuid, at)
            self._by_uuid[uuid] = job

    def _open_containers(self) -> int:
        return self.sim.store.count(("Queued", "Locked", "Running"))

    def _queued(self) -> int:
        return self.sim.store.count(("Queued", "Locked"))

    def run(self) -> Run:
        sim = self.sim
        sim.start()
        thresholds = gc.get_threshold()
        gc.set_threshold(*GC_THRESHOLDS)
        try:
            next_sample = START
            while True:
                self._submit_due()
                if sim.now >= next_sample:
                    self.ledger.sample(sim.now, self._queued())
                    next_sample += SAMPLE_EVERY
                    if self.progress is not None:
                        self.progress(sim.now, self)
                    if not self._arrivals and not self._children_pending() and not self.ledger.vms \
                            and self._open_containers() == 0:
                        break
                if sim.now >= self.limit:
                    self.timed_out = True
                    break
                target = min(next_sample, self.limit)
                if self._arrivals:
                    target = min(target, self._arrivals[0][0])
                sim.step(max(0.0, target - sim.now))
            self.ledger.finish(sim.now)
            self._collect()
        finally:
            gc.set_threshold(*thresholds)
            sim.stop()
        return self

    def _children_pending(self) -> bool:
        """Steps whose runner has not started yet, and never will once it is final."""
        for parent in self._children:
            sub = self.submitted.get(parent)
            if sub is None:
                return True  # the runner itself is not submitted yet
        return False

    def _collect(self) -> None:
        fields = ["uuid", "state", "created_at", "started_at", "finished_at", "exit_code", "runtime_status",
                  "lock_count"]
        self.containers = {c["uuid"]: c for c in self.sim.api.iter_containers(select=fields)}

    # -- the report's data ---------------------------------------------------------------------------

    def result(self) -> dict:
        ledger, chooser = self.ledger, self.sim.dispatcher.chooser
        waits, by_class = [], {}
        states, cancels = Counter(), Counter()
        pairs, shares = [], []
        not_started = 0
        for job_id, sub in self.submitted.items():
            c = self.containers.get(sub.uuid, {})
            states[c.get("state", "?")] += 1
            try:
                types = chooser.choose(sub.job.container())
                price, share = types[0].price, share_price(chooser.needed(sub.job.container()), types)
            except ConstraintsNotSatisfiable:
                price = share = None
            pairs.append((sub.job.runtime, price))
            shares.append((sub.job.runtime, share))
            started = parse_time(c.get("started_at"))
            if started:
                w = max(0.0, started - parse_time(c.get("created_at")))
                waits.append(w)
                by_class.setdefault(size_class(sub.job.vcpus, sub.job.gpu), []).append(w)
            else:
                not_started += 1
            if c.get("state") == "Cancelled":
                cancels[((c.get("runtime_status") or {}).get("error") or "(no reason given)")] += 1
        total, bound, packed = ledger.total_cost, lower_bound(pairs), lower_bound(shares)
        vms = self.cluster.cloud_vms
        return {
            "config": {"MaxInstances": vms.max_instances, "TimeoutIdle": vms.timeout_idle,
                       "TimeoutBooting": vms.timeout_booting, "ProbeInterval": vms.probe_interval,
                       "MaximumPriceFactor": self.cluster.containers.maximum_price_factor,
                       "MaxRunningContainersPerInstance": vms.max_running_containers_per_instance,
                       "InstanceTypes": len(self.cluster.instance_types)},
            "seed": self.seed,
            "simulated_hours": round((self.sim.now - START) / 3600, 4),
            "timed_out": self.timed_out,
            "containers": {"workload": len(self.jobs), "submitted": len(self.submitted),
                           "by_state": dict(sorted(states.items())), "never_started": not_started},
            "cost": round(total, 4),
            "lower_bound": round(bound, 4),
            "ratio": round(total / bound, 4) if bound > 0 else None,
            "lower_bound_packed": round(packed, 4),
            "ratio_packed": round(total / packed, 4) if packed > 0 else None,
            "instances_created": sum(ledger.created.values()),
            "peak_instances": ledger.peak_instances,
            "peak_running_containers": ledger.peak_running,
            "instance_hours": {name: _rounded(v) for name, v in ledger.hours_by_type().items()},
            "wait": _rounded(wait_stats(waits)),
            "wait_by_size": {k: _rounded(wait_stats(by_class[k])) for k in sorted(by_class, key=size_class_order)},
            "cancelled": dict(sorted(cancels.items(), key=lambda kv: (-kv[1], kv[0]))),
            "cloud_errors": {k: ledger.cloud_errors.get(k, 0) for k in
                             ("create_quota", "create_rate_limit", "create_capacity", "create_other",
                              "list_rate_limit", "list_other")},
            "series": [{"t": s.t, "instances": s.instances, "queued": s.queued, "running": s.running,
                        "cost": round(s.cost, 4)} for s in ledger.samples],
        }


def _rounded(v):
    if isinstance(v, float):
        return round(v, 6)
    if isinstance(v, dict):
        return {k: _rounded(x) for k, x in v.items()}
    return v

