"""Prometheus metrics: the event counters/summaries the actors update, and gauges read from the
last published Snapshot at scrape time.

Everything lives in a private CollectorRegistry (one per DispatchMetrics), so tests and several
dispatchers in one process never collide. Names, types, labels and help texts are Go's
(``lib/dispatchcloud``, ``lib/cloud``), so dashboards and alerts keep working. Go's three counters
have no ``_total`` suffix, which prometheus_client always adds: the counters live outside the
registry, a collector re-emits them under Go's names, and :func:`exposition` writes the text
format itself (``generate_latest`` would add the suffix back).
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from prometheus_client import CollectorRegistry, Counter, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from actors.snapshot import INSTANCE_CATEGORIES, WORKER_STATES, InstanceView, Snapshot
from cloud.base import OPERATIONS
from conf.model import Cluster

log = logging.getLogger(__name__)

NS = "arvados_dispatchcloud_"
QUANTILES = (0.5, 0.9, 0.95, 0.99)  # Go's objectives; dashboards read these series
BOOT_OUTCOMES = ("failure", "success", "aborted", "disappeared")
PROBE_OUTCOMES = ("success", "fail")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # what Go's promhttp serves by default


# -- a summary with quantiles over a sliding window ----------------------------------------------

class _Window:
    """Observations of the last ``max_age`` seconds in ``buckets`` rotating slots.

    Each slot keeps at most ``cap`` values (reservoir sampling beyond that), so memory is bounded
    and observe() is O(1); quantiles are computed only when scraped. A slot counts while its start
    is within max_age, so, as in Go's summaries, quantiles never see an observation older than
    max_age and always see the last (buckets-1)/buckets of it; _sum/_count are all-time.
    """

    def __init__(self, max_age: float, buckets: int, cap: int, clock: Callable[[], float]):
        self._width = max_age / buckets
        self._clock = clock
        self._cap = cap
        self._lock = threading.Lock()
        self._slots: list[tuple[float, list[float], list[int]]] = []  # (start, values, [seen])
        self._buckets = buckets
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        now = self._clock()
        with self._lock:
            self.sum += value
            self.count += 1
            if not self._slots or now >= self._slots[-1][0] + self._width:
                self._slots.append((now, [], [0]))
                if len(self._slots) > self._buckets:
                    del self._slots[0]
            _, values, seen = self._slots[-1]
            seen[0] += 1
            if len(values) < self._cap:
                values.append(value)
            else:
                j = random.randrange(seen[0])
                if j < self._cap:
                    values[j] = value

    def state(self) -> tuple[list[float], float, int]:
        """(sorted recent values, all-time sum, all-time count)."""
        horizon = self._clock() - self._width * self._buckets
        with self._lock:
            recent = [v for start, values, _ in self._slots if start >= horizon for v in values]
            total, n = self.sum, self.count
        recent.sort()
        return recent, total, n


def quantile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank quantile of an ascending list; NaN when empty (what Go reports)."""
    if not sorted_values:
        return math.nan
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))]


class WindowedSummary:
    """A Summary with Go's quantile series ({0.5,0.9,0.95,0.99}) over a sliding window.

    prometheus_client's Summary exports only _sum and _count; the Arvados dashboards read
    quantiles. ``labels(**kw)`` returns a child with ``observe(value)``, as in prometheus_client.
    """

    def __init__(self, name: str, documentation: str, labelnames: Iterable[str] = (), *,
                 max_age: float = 600.0, buckets: int = 5, cap: int = 500,
                 clock: Callable[[], float] = time.monotonic):
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._args = (max_age, buckets, cap, clock)
        self._children: dict[tuple[str, ...], _Window] = {}
        self._lock = threading.Lock()
        if not self.labelnames:
            self._children[()] = _Window(*self._args)

    def labels(self, **labels: str) -> _Window:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {tuple(labels)}")
        key = tuple(str(labels[n]) for n in self.labelnames)
        with self._lock:
            child = self._children.get(key)
            if child is None:
                child = self._children[key] = _Window(*self._args)
        return child

    def observe(self, value: float) -> None:
        if self.labelnames:
            raise ValueError(f"{self.name} has labels {self.labelnames}: use .labels(...).observe()")
        self._children[()].observe(value)

    def collect(self) -> list[Metric]:
        m = Metric(self.name, self.documentation, "summary")
        with self._lock:
            children = sorted(self._children.items())
        for key, child in children:
            labels = dict(zip(self.labelnames, key))
            values, total, n = child.state()
            for q in QUANTILES:
                m.add_sample(self.name, {**labels, "quantile": str(q)}, quantile(values, q))
            m.add_sample(self.name + "_sum", labels, total)
            m.add_sample(self.name + "_count", labels, n)
        return [m]


# -- gauges derived from a Snapshot (pure) ----------------------------------------------------------

def instance_category(v: InstanceView) -> str:
    """Go's rule: containers -> inuse; else hold -> hold; booting; unknown; else idle (incl. shutdown)."""
    if v.running_container_uuids:
        return "inuse"
    if v.idle_behavior == "hold":
        return "hold"
    if v.worker_state in ("booting", "unknown"):
        return v.worker_state
    return "idle"


@dataclass(frozen=True)
class Aggregates:
    """What the gauges need from a Snapshot, computed once per snapshot (a scrape then costs ~nothing)."""

    instances: dict  # (category, type) -> count, zero-filled for configured types
    price: dict  # category -> sum
    vcpus: dict
    ram: dict
    running: int
    probed: tuple[float, ...]  # ascending
    queue: dict  # (state, type) -> count


def aggregate(snap: Snapshot, type_names: Iterable[str]) -> Aggregates:
    workers = [v for v in snap.instances if v.instance]  # pending creates are not workers yet
    counts = {(c, t): 0 for t in type_names for c in INSTANCE_CATEGORIES}
    price = dict.fromkeys(INSTANCE_CATEGORIES, 0.0)
    vcpus = dict.fromkeys(INSTANCE_CATEGORIES, 0)
    ram = dict.fromkeys(INSTANCE_CATEGORIES, 0)
    running = 0
    for v in workers:
        cat = instance_category(v)
        counts[cat, v.arvados_instance_type] = counts.get((cat, v.arvados_instance_type), 0) + 1
        price[cat] += v.price
        vcpus[cat] += v.vcpus
        ram[cat] += v.ram
        running += len(v.running_container_uuids)
    probed = tuple(sorted(v.probed for v in workers if v.probed > 0))
    return Aggregates(counts, price, vcpus, ram, running, probed, queue_entry_counts(snap))


def snapshot_gauges(snap: Snapshot, agg: Aggregates, now: float) -> list[Metric]:
    """Every snapshot-derived gauge family, with Go's zero-filled label sets."""
    out = []
    g = GaugeMetricFamily(NS + "instances_total", "Number of cloud VMs.", labels=["category", "instance_type"])
    for (cat, typ), n in sorted(agg.instances.items()):
        g.add_metric([cat, typ], n)
    out.append(g)
    for name, doc, values in (("instances_price", "Price of cloud VMs.", agg.price),
                              ("vcpus_total", "Total VCPUs on all cloud VMs.", agg.vcpus),
                              ("memory_bytes_total", "Total memory on all cloud VMs.", agg.ram)):
        g = GaugeMetricFamily(NS + name, doc, labels=["category"])
        for cat in INSTANCE_CATEGORIES:
            g.add_metric([cat], values[cat])
        out.append(g)

    g = GaugeMetricFamily(NS + "queue_entries", "Number of active container entries in the controller database.",
                          labels=["state", "instance_type"])
    for (state, typ), n in sorted(agg.queue.items()):
        g.add_metric([state, typ], n)
    out.append(g)

    probed = agg.probed
    for name, doc, value in (
        ("containers_running", "Number of containers reported running by cloud VMs.", agg.running),
        ("probe_age_seconds_max", "Maximum number of seconds since an instance's most recent successful probe.",
         now - probed[0] if probed else 0.0),
        ("probe_age_seconds_median", "Median number of seconds since an instance's most recent successful probe.",
         now - probed[len(probed) // 2] if probed else 0.0),
        ("containers_allocated_not_started",
         "Number of containers allocated to a worker but not started yet (worker is booting).",
         snap.containers_allocated_not_started),
        ("containers_not_allocated_over_quota",
         "Number of containers not allocated to a worker because the system has hit a quota.",
         snap.containers_not_allocated_over_quota),
        ("containers_longest_wait_time_seconds",
         "Current longest wait time of any container since queuing, and before the start of crunch-run.",
         snap.containers_longest_wait_time_seconds),
        ("last_503_time", "Time of most recent 503 error received from API.", snap.last_503_time),
        ("max_concurrent_containers", "Dynamically assigned limit on number of containers scheduled concurrency, "
         "set after receiving 503 errors from API.",
         snap.max_concurrent_containers),
        ("at_quota", "Flag indicating the cloud driver is reporting an at-quota condition.",
         1 if snap.at_quota else 0),
    ):
        out.append(GaugeMetricFamily(NS + name, doc, value=value))
    return out


def queue_entry_counts(snap: Snapshot) -> dict[tuple[str, str], int]:
    """(state, first eligible type) -> count: the published counts, else counted from the queue."""
    if snap.queue_entries:
        return dict(snap.queue_entries)
    counts: dict[tuple[str, str], int] = defaultdict(int)
    for e in snap.queue:
        counts[str(e.container.get("state", "")), e.instance_types[0].name if e.instance_types else ""] += 1
    return dict(counts)


_EMPTY = Snapshot()


class _SnapshotCollector:
    def __init__(self, metrics: "DispatchMetrics"):
        self._m = metrics
        self._cached: tuple[Snapshot | None, Aggregates | None] = (None, None)
        self._lock = threading.Lock()
        self._queue_keys: set[tuple[str, str]] = set()  # every (state, type) ever exposed

    def collect(self) -> list[Metric]:
        source = self._m._snapshot_source
        try:
            snap = (source() if source is not None else None) or _EMPTY
            cached_snap, agg = self._cached
            if cached_snap is not snap or agg is None:
                agg = aggregate(snap, self._m.type_names)
                self._cached = (snap, agg)
            with self._lock:
                # Go sets a (state, type) pair it has seen to 0 instead of dropping it (queue.go
                # runMetrics), so a queue that empties reads 0, not "No data".
                self._queue_keys.update(agg.queue)
                queue = {k: agg.queue.get(k, 0) for k in self._queue_keys}
            return snapshot_gauges(snap, replace(agg, queue=queue), self._m.clock())
        except Exception:
            # A broken source must not take the event metrics down with it: log and skip.
            log.exception("metrics: cannot read the dispatcher snapshot")
            return []


class _SummaryCollector:
    def __init__(self, summaries: list[WindowedSummary]):
        self._summaries = summaries

    def collect(self) -> list[Metric]:
        return [m for s in self._summaries for m in s.collect()]


class GoCounters:
    """Re-emits prometheus_client Counters under Go's names: ``x``, not ``x_total``.

    The counters stay ordinary (thread-safe ``labels(...).inc()``); only their exposition changes.
    """

    def __init__(self, counters: Iterable[tuple[str, Counter]]):
        self._counters = tuple(counters)  # (Go's full name, counter)

    def collect(self) -> list[Metric]:
        out = []
        for name, counter in self._counters:
            [fam] = counter.collect()
            m = Metric(name, fam.documentation, "counter")
            for smp in fam.samples:
                if smp.name.endswith("_total"):
                    m.add_sample(name, smp.labels, smp.value)
            out.append(m)
        return out


class _RoleCollector:
    """Ours, not Go's: 1 while this process waits for the dispatch lock (a standby)."""

    def __init__(self, metrics: "DispatchMetrics"):
        self._m = metrics

    def collect(self) -> list[Metric]:
        return [GaugeMetricFamily(NS + "standby", "1 while this dispatcher waits for the dispatch lock held "
                                  "by another process (it dispatches nothing), else 0.",
                                  value=1 if self._m.standby else 0)]


def _escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def _escape_value(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n").replace('"', r'\"')


def exposition(registry: CollectorRegistry) -> bytes:
    """The Prometheus text format (0.0.4) with every family under its own name and type, sorted by
    name as Go's registry does; unlike ``generate_latest`` it never renames a counter."""
    lines = []
    for m in sorted(registry.collect(), key=lambda m: m.name):
        typ = {"unknown": "untyped"}.get(m.type, m.type)
        # A prometheus_client Counter (a driver's, e.g. EC2's ``ec2_instance_starts_total``) names
        # its family without ``_total`` and adds ``_created`` samples Go has no equivalent of.
        samples = [s for s in m.samples if not (typ == "counter" and s.name == m.name + "_created")]
        name = m.name
        if typ == "counter" and samples and all(s.name == m.name + "_total" for s in samples):
            name = m.name + "_total"
        lines.append(f"# HELP {name} {_escape_help(m.documentation)}\n# TYPE {name} {typ}\n")
        for smp in samples:
            labels = ",".join(f'{k}="{_escape_value(str(v))}"' for k, v in smp.labels.items())
            lines.append(f"{smp.name}{{{labels}}} {floatToGoString(smp.value)}\n" if labels
                         else f"{smp.name} {floatToGoString(smp.value)}\n")
    return "".join(lines).encode()


# -- the set the dispatcher owns --------------------------------------------------------------------

class DispatchMetrics:
    """All ``arvados_dispatchcloud_*`` metrics of one dispatcher, in a private registry.

    Actors update the event metrics directly (they are thread-safe); the gauges come from the
    function given to :meth:`set_snapshot_source`, called at scrape time and never blocking.
    ``clock`` is the wall clock for probe ages; ``window_clock`` drives the summaries' window.
    """

    def __init__(self, cluster: Cluster, *, clock: Callable[[], float] = time.time,
                 window_clock: Callable[[], float] = time.monotonic, summary_max_age: float = 600.0):
        disable_created_metrics()  # Go has no *_created series; this setting is process-wide
        self.registry = CollectorRegistry()
        self.clock = clock
        self.type_names = tuple(sorted(cluster.instance_types))
        self._snapshot_source: Callable[[], Snapshot] | None = None
        self.standby = False  # set by the run command while it waits for the dispatch lock

        # Not in the registry: GoCounters exposes them without the _total suffix. All label
        # values Go pre-creates start at 0, so a dashboard sees 0 rather than "No data".
        self.driver_operations = Counter(
            "driver_operations", "Number of instance-create/destroy/list operations performed via cloud driver.",
            ["operation", "error"], namespace="arvados", subsystem="dispatchcloud", registry=None)
        for op in OPERATIONS:
            for err in ("0", "1"):
                self.driver_operations.labels(operation=op, error=err)
        self.boot_outcomes = Counter(
            "boot_outcomes", "Boot outcomes by type.", ["outcome"],
            namespace="arvados", subsystem="dispatchcloud", registry=None)
        for outcome in BOOT_OUTCOMES:
            self.boot_outcomes.labels(outcome=outcome)
        self.instances_disappeared = Counter(
            "instances_disappeared", "Number of occurrences of an instance disappearing from the cloud provider's "
            "list of instances.", ["state"], namespace="arvados", subsystem="dispatchcloud", registry=None)
        for state in WORKER_STATES:
            self.instances_disappeared.labels(state=state)
        self.registry.register(GoCounters([
            (NS + "driver_operations", self.driver_operations), (NS + "boot_outcomes", self.boot_outcomes),
            (NS + "instances_disappeared", self.instances_disappeared)]))

        def summary(name, doc, labelnames=()):
            return WindowedSummary(NS + name, doc, labelnames, max_age=summary_max_age, clock=window_clock)

        self.time_to_ssh = summary(
            "instances_time_to_ssh_seconds", "Number of seconds between instance creation and the first "
            "successful SSH connection.")
        self.time_to_ready_for_container = summary(
            "instances_time_to_ready_for_container_seconds", "Number of seconds between the first successful "
            "SSH connection and ready to run a container.")
        self.time_from_shutdown_request_to_disappearance = summary(
            "instances_time_from_shutdown_request_to_disappearance_seconds", "Number of seconds between the "
            "first shutdown attempt and the disappearance of the worker.")
        self.time_from_queue_to_crunch_run = summary(
            "containers_time_from_queue_to_crunch_run_seconds", "Number of seconds between the queuing of a "
            "container and the start of crunch-run.")
        # A SummaryVec: as in Go, an outcome's series appear with its first observation.
        self.run_probe_duration = summary(
            "instances_run_probe_duration_seconds", "Number of seconds per runProbe call.", ["outcome"])
        self.registry.register(_SummaryCollector([
            self.time_to_ssh, self.time_to_ready_for_container,
            self.time_from_shutdown_request_to_disappearance, self.time_from_queue_to_crunch_run,
            self.run_probe_duration]))
        self.registry.register(_SnapshotCollector(self))
        self.registry.register(_RoleCollector(self))

    def exposition(self) -> bytes:
        return exposition(self.registry)

    def set_snapshot_source(self, fn: Callable[[], Snapshot]) -> None:
        """``fn`` returns the last published Snapshot; it is called on every scrape, so it must not block."""
        self._snapshot_source = fn
