#!/usr/bin/env python3
"""One simulated day at scale: up to 1,000 instances, 10,000 containers, real actors, FakeClock.

The workload (all knobs are flags; the defaults are the figures reported):

* 10,000 containers arrive over 24 h: a steady Poisson stream carrying 40% of them, plus 30
  workflow bursts (100-400 containers each, submitted within ~2 minutes) at random times,
  weighted towards working hours, so the cluster climbs to MaxInstances (1,000) several times.
* sizes: 1/2/4/8/16 VCPUs with weights 35/25/20/12/8 %, RAM 1.5 GiB per VCPU (a container fits
  the type with as many VCPUs, as in tests.simcluster); priority 1-1000.
* runtimes: the stub cloud's ContainerRunTime + uniform ContainerRunTimeJitter, 3 min + [0, 2 h)
  (mean ~63 min; the stub has one run-time distribution for every container).
* VMs boot in 60-120 s; Arvados defaults for the dispatcher (PollInterval 10s, SyncInterval 1m,
  TimeoutIdle 1m, ...), MaxInstances 1,000, MaxConcurrentInstanceCreateOps 0 (unlimited) and
  MaxCloudOpsPerSecond 0: a cloud that creates as fast as asked, to stress the dispatcher.

Time moves in 1 s quanta (``--quantum``): the clock jumps 1 s and everything due is delivered
before the next jump, so a tick arrives up to 1 s late. ``--quantum 0`` uses ``Simulation.step``
(event to event), exact but ~2x slower here: 1,000 workers with jittered probe times make ~100
distinct instants per simulated second, each a round of thread hand-offs. ``--probe-interval``
sets ProbeInterval (default 10 s, the Arvados default); a larger value is cheaper to simulate.
No assertions: figures only.

    .venv/bin/python bench/bench_sim_day.py [--probe-interval 10] [--hours 24] [--scale 1.0]
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actors.scheduler import SchedulerActor  # noqa: E402
from actors.sim import START, Simulation  # noqa: E402
from conf.model import InstanceType  # noqa: E402
from tests.simcluster import GiB, cluster  # noqa: E402

SIZES = ((1, 35), (2, 25), (4, 20), (8, 12), (16, 8))  # (vcpus, weight %)
RAM_PER_VCPU = 3 * GiB // 2


def instance_types() -> tuple[InstanceType, ...]:
    return tuple(InstanceType(name=f"t{v}", provider_type=f"p{v}", vcpus=v, ram=v * RAM_PER_VCPU * 11 // 10 + GiB,
                              included_scratch=v * 10 * GiB, added_scratch=0, price=0.05 * v)
                 for v, _ in SIZES)


def arrivals(n: int, seconds: float, rng: random.Random) -> list[tuple[float, int, int]]:
    """``n`` (offset, vcpus, priority) tuples, sorted: a Poisson stream plus workflow bursts."""
    n_stream = int(n * 0.4)
    out = [rng.uniform(0, seconds) for _ in range(n_stream)]
    left = n - n_stream
    bursts = 30
    sizes = [rng.randint(100, 400) for _ in range(bursts)]
    scale = left / sum(sizes)
    sizes = [max(1, round(s * scale)) for s in sizes]
    sizes[-1] += left - sum(sizes)
    for size in sizes:
        # working hours (08-18 of the simulated day) get two thirds of the bursts
        day = seconds / 24
        at = rng.uniform(8 * day, 18 * day) if rng.random() < 2 / 3 else rng.uniform(0, seconds)
        out += [min(seconds - 1, at + rng.uniform(0, 120)) for _ in range(size)]
    out.sort()
    vcpus = [v for v, w in SIZES for _ in range(w)]
    return [(t, rng.choice(vcpus), rng.randint(1, 1000)) for t in out]


class Counted:
    """Times every call of ``cls.name`` (the bench's only instrumentation)."""

    def __init__(self, cls, name: str):
        self.times: list[float] = []
        orig, times = getattr(cls, name), self.times

        def wrapper(obj, *a, **kw):
            t = time.perf_counter()
            try:
                return orig(obj, *a, **kw)
            finally:
                times.append(time.perf_counter() - t)
        setattr(cls, name, wrapper)


def worker_states(snap) -> str:
    counts: dict[str, int] = {}
    for v in snap.instances:
        counts[v.worker_state] = counts.get(v.worker_state, 0) + 1
    return " ".join(f"{k}:{v}" for k, v in sorted(counts.items()))


def advance_quantized(sim: Simulation, dt: float, quantum: float) -> None:
    """Move time in fixed ``quantum`` increments, delivering everything due at each one.

    ``Simulation.step`` visits every distinct deadline; 1,000 workers with jittered probe times
    make that ~100 settle rounds per simulated second, each a thread hand-off. Batching them
    delivers a tick up to ``quantum`` late, which actors tolerate (they compare ``now`` with
    their own deadlines), in exchange for far fewer rounds.
    """
    target = sim.now + dt
    while sim.now < target:
        sim.clock.set(min(target, sim.now + quantum))
        sim.settle()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--probe-interval", type=float, default=10.0)
    ap.add_argument("--hours", type=float, default=24.0, help="simulated hours of arrivals")
    ap.add_argument("--scale", type=float, default=1.0,
                    help="multiply containers and MaxInstances (0.1 for a quick look)")
    ap.add_argument("--step", type=float, default=60.0, help="simulated seconds per step() call")
    ap.add_argument("--quantum", type=float, default=1.0,
                    help="0: step event by event (Simulation.step); >0: advance time in steps of this "
                         "many seconds and deliver everything due at each")
    ap.add_argument("--wall-limit", type=float, default=290.0, help="give up after this many real seconds")
    ap.add_argument("--report-every", type=float, default=3600.0, help="simulated seconds between progress lines")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--runtime", choices=("deterministic", "threads"), default="deterministic",
                    help="the actors on the single-thread simulation runtime, or on pykka threads")
    args = ap.parse_args()
    logging.basicConfig(level=getattr(logging, os.environ.get("BENCH_LOG", "WARNING")), stream=sys.stderr,
                        format="%(name)s %(message)s")
    logging.getLogger("cloud.stub.driver").setLevel(logging.ERROR)

    n_ctr = int(10_000 * args.scale)
    max_inst = max(1, int(1000 * args.scale))
    seconds = args.hours * 3600
    c = cluster(types=instance_types(), max_instances=max_inst, probe_interval=args.probe_interval,
                poll_interval=10.0, sync_interval=60.0, timeout_idle=60.0, timeout_booting=600.0,
                timeout_probe=600.0, timeout_shutdown=10.0, timeout_signal=5.0, timeout_term=120.0,
                max_concurrent_instance_create_ops=0, max_cloud_ops_per_second=0,
                driver_parameters={"BootTime": "60s", "BootTimeJitter": "60s",
                                   "ContainerRunTime": "3m", "ContainerRunTimeJitter": "2h"})
    rng = random.Random(args.seed)
    work = arrivals(n_ctr, seconds, rng)
    print(f"workload: {n_ctr} containers over {args.hours:g} h (seed {args.seed}), MaxInstances {max_inst}, "
          f"ProbeInterval {args.probe_interval:g}s, "
          f"{'quantum %gs' % args.quantum if args.quantum > 0 else 'event-by-event steps'}, {args.runtime} runtime, runtimes 3 min + U[0, 2 h), boot 60-120 s", flush=True)

    passes = Counted(SchedulerActor, "_pass")
    sim = Simulation(c, seed=args.seed, metrics=True, runtime=args.runtime)
    fired = [0]
    orig_fire, orig_adv = sim.ticker.fire_due, sim.cloud.advance

    def fire_due(now=None):
        n = orig_fire(now)
        fired[0] += n
        return n

    def advance():
        n = orig_adv()
        fired[0] += n
        return n
    sim.ticker.fire_due, sim.cloud.advance = fire_due, advance

    peak = peak_running = 0
    from actors.simulate.runner import GC_THRESHOLDS
    gc.set_threshold(*GC_THRESHOLDS)  # as dispatch-cloud simulate does
    t_wall0 = time.perf_counter()
    t_cpu0 = time.process_time()
    gave_up = False
    sim.start()
    try:
        i = 0
        end = START + seconds
        next_report = START + args.report_every
        # after the last arrival, run on until everything has finished (runtimes <= ~2 h)
        while sim.now < end + 3 * 3600:
            while i < len(work) and START + work[i][0] <= sim.now:
                _, v, prio = work[i]
                sim.submit(runtime_constraints={"vcpus": v, "ram": v * RAM_PER_VCPU}, priority=prio)
                i += 1
            if args.quantum > 0:
                advance_quantized(sim, args.step, args.quantum)
            else:
                sim.step(args.step)
            snap = sim.snapshot
            peak = max(peak, len(sim.cloud.vms))
            peak_running = max(peak_running, len(snap.runners))
            if sim.now >= next_report:
                next_report += args.report_every
                print(f"  t={(sim.now - START) / 3600:5.1f} h  wall {time.perf_counter() - t_wall0:6.1f}s  "
                      f"submitted {i:5d}  instances {len(sim.cloud.vms):4d}  running {len(snap.runners):4d}  "
                      f"queue {len(snap.queue):5d}  workers " + worker_states(snap), flush=True)
            if i >= len(work) and sim.now >= end and not snap.runners and not snap.queue:
                break
            if time.perf_counter() - t_wall0 > args.wall_limit:
                gave_up = True
                print(f"  giving up: wall limit {args.wall_limit:.0f}s reached", flush=True)
                break
        wall = time.perf_counter() - t_wall0
        cpu = time.process_time() - t_cpu0
        sim_s = sim.now - START
        states: dict[str, int] = {}
        for ctr in sim.containers():
            states[ctr["state"]] = states.get(ctr["state"], 0) + 1
    finally:
        sim.stop()

    p = sorted(passes.times)
    print(f"{'gave up after' if gave_up else 'done:'} {sim_s / 3600:.2f} simulated h in {wall:.1f}s wall "
          f"({sim_s / wall:.0f}x real time); {cpu:.1f}s CPU ({sim_s / cpu:.0f}x real time per CPU second: "
          f"what the wall figure would be on an idle core)")
    print(f"events (ticks delivered + stub cloud events): {fired[0]:,} = {fired[0] / wall:,.0f}/s wall")
    print(f"peak instances {peak}, peak running containers {peak_running}; containers by state: "
          + ", ".join(f"{k} {v}" for k, v in sorted(states.items())))
    if p:
        q = lambda f: p[min(len(p) - 1, int(len(p) * f))] * 1e3  # noqa: E731
        print(f"scheduler passes: {len(p):,} ({len(p) / max(sim_s, 1):.2f} per simulated s), "
              f"median {statistics.median(p) * 1e3:.2f} ms, p90 {q(0.9):.2f} ms, p99 {q(0.99):.2f} ms, "
              f"max {p[-1] * 1e3:.1f} ms, total {sum(p):.1f}s = {100 * sum(p) / wall:.0f}% of wall")
    return 0


if __name__ == "__main__":
    sys.exit(main())
