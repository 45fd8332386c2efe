#!/usr/bin/env python3
"""Memory and idle CPU of 1,000 live WorkerActors, on the real clock.

The real Dispatcher wiring (Scheduler, InstanceSet, Queue actors, the real-time Ticker, metrics)
runs over the stub cloud in real time with an empty container queue. N stub VMs exist before the
dispatcher starts, so it adopts them at its first listing: one WorkerActor (one thread) each. Once
every worker has probed and reports idle, the bench watches an idle window of real seconds:
process CPU (``time.process_time``), CPU per thread group (``/proc/self/task/*/stat``), and the
``crunch-run --list`` probes the stub VMs received. RSS (``VmRSS``) is read before the dispatcher
starts (VMs already created, so the stub cloud's own memory is not counted) and after warm-up.

TimeoutIdle is raised to an hour so idle workers are not shut down inside the window; the other
timings are the Arvados defaults (ProbeInterval 10s, PollInterval 10s, SyncInterval 1m).
Figures only, no assertions: the machine is shared.

    .venv/bin/python bench/bench_workers.py [--workers 1000] [--window 30]
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import re
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cloud.clock import SystemClock  # noqa: E402
from actors.service import Dispatcher, instance_set_id  # noqa: E402
from actors.scheduler import SchedulerActor  # noqa: E402
from api.metrics import DispatchMetrics  # noqa: E402
from api.arvados.inprocess import LocalArvadosClient  # noqa: E402
from api.arvados.store import ContainerStore  # noqa: E402
from cloud.stub.driver import StubCloud, StubParams  # noqa: E402
from tests.simcluster import cluster as test_cluster  # noqa: E402

DEFAULTS = dict(poll_interval=10.0, probe_interval=10.0, sync_interval=60.0, timeout_idle=3600.0,
                timeout_booting=600.0, timeout_probe=600.0, max_concurrent_instance_create_ops=1)


def rss_mib() -> float:
    """Resident set size of this process, from /proc/self/status."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def thread_cpu() -> dict[int, float]:
    """CPU seconds of every thread of this process, by native thread id.

    From ``schedstat`` (nanoseconds on CPU): ``stat``'s utime/stime count 10 ms clock ticks,
    which rounds the ~1 ms a worker thread spends in a window down to zero.
    """
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                out[int(tid)] = int(f.read().split()[0]) / 1e9
        except OSError:
            continue  # the thread ended
    return out


def thread_groups() -> dict[int, str]:
    """Native thread id -> a group name (the Python thread name without its counter/urn)."""
    groups = {}
    for t in threading.enumerate():
        if t.native_id is not None:
            groups[t.native_id] = re.sub(r"[-_]?\d+.*$", "", t.name.split(" ")[0]) or t.name
    return groups


def probe_times(cloud: StubCloud, t0: float, t1: float) -> list[float]:
    """When the stub VMs ran ``crunch-run --list`` inside [t0, t1)."""
    return sorted(rec.at for vm in cloud.vms for rec in list(vm.commands)
                  if t0 <= rec.at < t1 and rec.command.endswith("--list"))


class Counted:
    """Counts (and times) calls of a SchedulerActor method: the bench's only instrumentation."""

    def __init__(self, cls, name: str):
        self.calls: list[tuple[float, float]] = []  # (wall time, seconds taken)
        orig = getattr(cls, name)
        calls = self.calls

        def wrapper(actor, *a, **kw):
            t = time.perf_counter()
            try:
                return orig(actor, *a, **kw)
            finally:
                calls.append((time.time(), time.perf_counter() - t))
        setattr(cls, name, wrapper)

    def between(self, t0: float, t1: float) -> list[float]:
        return [d for at, d in list(self.calls) if t0 <= at < t1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=1000)
    ap.add_argument("--window", type=float, default=30.0, help="idle window, real seconds")
    ap.add_argument("--warmup-timeout", type=float, default=240.0,
                    help="first probes of 1,000 workers take 100 s at the default MaxProbesPerSecond 10")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    n = args.workers

    c = test_cluster(types=(1, 2, 4, 8), max_instances=max(n, 1), **DEFAULTS)
    clock = SystemClock()
    store = ContainerStore(":memory:", cluster_id=c.cluster_id, clock=clock)
    store.add_token(c.system_root_token, admin=True)
    api = LocalArvadosClient(store, c.system_root_token)
    cloud = StubCloud(clock, StubParams(boot_time=0.0, boot_time_jitter=0.0), seed=1, cluster=c,
                      api_factory=lambda host, token, **kw: LocalArvadosClient(store, token))
    set_id = instance_set_id(c.system_root_token)
    iset = cloud.instance_set(set_id)
    types = list(c.instance_types.values())
    for i in range(n):
        it = types[i % len(types)]
        iset.create(it, "img", {c.tag("InstanceSetID"): set_id, c.tag("InstanceType"): it.name,
                                c.tag("IdleBehavior"): "run"}, "", None)
    passes = Counted(SchedulerActor, "_pass")
    changes = Counted(SchedulerActor, "worker_changed")
    metrics = DispatchMetrics(c)
    d = Dispatcher(c, clock=clock, driver_set=iset, api_client=api, metrics=metrics)

    gc.collect()
    threads0 = threading.active_count()
    rss0 = rss_mib()
    print(f"{n} stub VMs created; RSS before the dispatcher starts: {rss0:.1f} MiB "
          f"(threads {threads0})", flush=True)
    t_start = time.monotonic()
    d.start()
    try:
        deadline = time.monotonic() + args.warmup_timeout
        while True:
            snap = d.box.snapshot
            idle = sum(1 for v in snap.instances if v.worker_state == "idle")
            if idle >= n:
                break
            if time.monotonic() > deadline:
                print(f"warm-up: only {idle}/{n} workers idle after {args.warmup_timeout:.0f}s", flush=True)
                return 1
            time.sleep(0.2)
        warm = time.monotonic() - t_start
        # let the first-probe burst and its publishes drain, then one full probe cycle
        time.sleep(c.cloud_vms.probe_interval * 1.1)
        gc.collect()
        rss1 = rss_mib()
        threads1 = threading.active_count()

        groups = thread_groups()
        cpu0, tc0, w0, t0 = time.process_time(), thread_cpu(), time.time(), time.perf_counter()
        # the window in slices of one ProbeInterval each: every slice holds one probe per worker
        slices, last_cpu, last_t = [], cpu0, t0
        end = t0 + args.window
        while (now := time.perf_counter()) < end - 0.01:
            time.sleep(min(c.cloud_vms.probe_interval, end - now))
            cpu, t = time.process_time(), time.perf_counter()
            slices.append(100 * (cpu - last_cpu) / (t - last_t))
            last_cpu, last_t = cpu, t
        cpu1, tc1, w1, t1 = time.process_time(), thread_cpu(), time.time(), time.perf_counter()
        groups.update(thread_groups())
        wall = t1 - t0
        ptimes = probe_times(cloud, w0, w1)
        probes = len(ptimes)
        per_sec: dict[int, int] = {}
        for at in ptimes:
            per_sec[int(at - w0)] = per_sec.get(int(at - w0), 0) + 1
        win_passes = passes.between(w0, w1)
        win_changes = len(changes.between(w0, w1))
        per_group: dict[str, float] = {}
        for tid, s in tc1.items():
            g = groups.get(tid, "other")
            per_group[g] = per_group.get(g, 0.0) + s - tc0.get(tid, 0.0)
        snap = d.box.snapshot
        idle_end = sum(1 for v in snap.instances if v.worker_state == "idle")
    finally:
        d.stop()
        cloud.stop()
        store.close()

    added = rss1 - rss0
    cpu_pct = 100 * (cpu1 - cpu0) / wall
    print(f"all {n} workers idle {warm:.1f}s after start; threads {threads0} -> {threads1}")
    print(f"RSS after warm-up: {rss1:.1f} MiB; added {added:.1f} MiB = {added * 1024 / n:.1f} KiB per worker "
          f"(target < 100 MiB per 1,000)")
    print(f"idle window {wall:.1f}s: process CPU {cpu1 - cpu0:.3f}s = {cpu_pct:.2f}% of one core "
          f"(target < 5%); probes {probes} = {probes / wall:.1f}/s "
          f"(expected {n / c.cloud_vms.probe_interval:.0f}/s); still idle at end: {idle_end}/{n}")
    print(f"CPU per {c.cloud_vms.probe_interval:g}s slice (% of one core): "
          + " ".join(f"{x:.2f}" for x in slices) + f"; median {statistics.median(slices):.2f}%")
    print(f"probe spread: probes fell in {len(per_sec)} of {int(wall)} one-second buckets, "
          f"busiest second {max(per_sec.values(), default=0)} probes")
    if win_passes:
        print(f"scheduler: {len(win_passes)} passes = {len(win_passes) / wall:.1f}/s, median "
              f"{statistics.median(win_passes) * 1e3:.2f} ms, total {sum(win_passes):.3f}s; "
              f"worker_changed messages {win_changes} = {win_changes / wall:.1f}/s")
    print("CPU by thread group in the window (seconds, % of one core):")
    for g, s in sorted(per_group.items(), key=lambda kv: -kv[1])[:8]:
        print(f"  {g:28} {s:7.3f}s {100 * s / wall:6.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
