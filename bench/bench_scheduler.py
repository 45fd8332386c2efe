"""One scheduling pass (plan + reconcile + publish) at scale, on an unstarted SchedulerActor.

Scenarios: 10,000 queued containers over 1,000 busy instances, and 100,000 over 5,000.
Prints the median and p90 of repeated passes; no assertions (the machine is shared and noisy).
Run: .venv/bin/python bench/bench_scheduler.py
"""

from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from actors.messages import Behavior, QueueEntry, State, WorkerView  # noqa: E402
from actors.scheduler import SchedulerActor, SnapshotBox, _Worker  # noqa: E402
from actors.resources import Resources  # noqa: E402
from tests.simcluster import cluster, instance_type, with_vms  # noqa: E402


class _Sink:
    """Absorbs the tells a pass makes (lock, unlock, start, create...)."""

    def __getattr__(self, name):
        return self

    def __call__(self, *a, **kw):
        return None

    def schedule(self, *a, **kw):
        return None


def build(n_queued: int, n_instances: int):
    types = [instance_type(i) for i in (1, 2, 4, 8, 16)]
    c = with_vms(cluster(types=types), max_instances=n_instances, max_concurrent_instance_create_ops=1)
    s = SchedulerActor(cluster=c, set_id="bench", ticker=_Sink(), box=SnapshotBox(),
                       worker_factory=None, public_key=None, first_now=1000.0)
    s._queue_inbox = s._iset = _Sink()
    s._loaded = s._queue_loaded = s._gate_open = True
    now = 1000.0
    entries = {}
    for i in range(n_queued):
        it = types[i % 3]
        uuid = f"zzzzz-dz642-{i:015d}"
        running = i < n_instances
        state = "Running" if running else ("Locked" if i % 10 == 0 else "Queued")
        ctr = {"uuid": uuid, "state": state, "priority": 1 + i % 1000, "locked_by_uuid": "me"}
        entries[uuid] = QueueEntry(uuid, state, 1 + i % 1000, ctr, (it, types[i % 3 + 1]),
                                   Resources(vcpus=it.vcpus, ram=it.ram // 2, scratch=0),
                                   first_seen_at=now - i, created_at=now - i)
    s._queue = entries
    for j in range(n_instances):
        it = types[j % 3]
        iid = f"i-{j:07d}"
        uuid = f"zzzzz-dz642-{j:015d}"
        view = WorkerView(instance_id=iid, instance_type=it, state=State.RUNNING,
                          idle_behavior=Behavior.RUN, address=f"10.1.{j // 250}.{j % 250}",
                          provider_type=it.provider_type, running=(uuid,), busy=now,
                          appeared=now - 600, probed=now - 3, probe_done=True)
        s._workers[iid] = _Worker(_Sink(), view, now - 600)
    return s


def measure(n_queued: int, n_instances: int, runs: int, queue_changed: bool) -> None:
    s = build(n_queued, n_instances)
    times = []
    for k in range(runs):
        s._ops.clear()
        if queue_changed:
            s._qver += 1  # as after a poll that changed something: the queue is sorted again
        t0 = time.perf_counter()
        s._pass(1000.0 + k)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    p90 = sorted(times)[int(len(times) * 0.9) - 1]
    snap = s._box.snapshot
    what = "queue changed" if queue_changed else "queue same  "
    print(f"pass {n_queued:>7,} queued x {n_instances:>5,} instances, {what}: median {med * 1000:7.2f} ms, "
          f"p90 {p90 * 1000:7.2f} ms, min {min(times) * 1000:7.2f} ms  "
          f"(runs={runs}, snapshot: {len(snap.queue)} entries, {len(snap.instances)} instances)")


if __name__ == "__main__":
    for changed in (False, True):
        measure(10_000, 1_000, 30, changed)
        measure(100_000, 5_000, 7, changed)
