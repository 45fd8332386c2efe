#!/usr/bin/env python3
"""Latency of the management API and /metrics under 10 concurrent clients.

The server (ApiServer on Waitress) runs in a child process so the load generator does not share
its GIL. Scenarios over a SnapshotBackend holding 1,000 instances and 10,000 queue entries:
``static`` (one snapshot: bodies come from the per-snapshot cache), ``republish`` (a new Snapshot
every second holding the same entry objects, as when a pass changes nothing: bodies are re-joined
from per-item fragments) and ``rebuild`` (every entry a new object every second: a full render
per second, the worst case).

Scenarios with a real scheduling pass in the same process (an unstarted SchedulerActor built as
bench_scheduler.py builds it: 10,000 queued containers x 1,000 busy instances; its ``_pass`` runs
from a thread once a second and publishes into the SnapshotBox the API reads; every 10th pass
sees a changed queue, as after a poll every PollInterval; ``--resort-every 1`` makes every pass
re-sort, the heavier case): ``pass-alone`` (one pass, then no
more: the API alone over the same data), ``pass`` (a pass every second, default
sys.setswitchinterval, 5 ms) and ``pass-1ms`` (the same with sys.setswitchinterval(0.001), as
actors.service.serve sets it). ``heavy`` and ``heavy-1ms`` add --heavy-ms (250) of pure-Python work to
each pass: a stand-in for an unsliced pass ~50x slower than today's, to show what the switch
interval does when a pass holds the GIL. Pass times are reported with and without client load.

    .venv/bin/python bench/bench_api.py [--seconds 6] [--clients 10] [--scenarios pass-alone,pass,pass-1ms]
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import logging
import multiprocessing as mp
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_scheduler.build

from tests import api_data as d  # noqa: E402

PATHS = ("/arvados/v1/dispatch/instances", "/metrics", "/arvados/v1/dispatch/containers")
PASS_PATHS = PATHS[:2]
SNAPSHOT_SCENARIOS = ("static", "republish", "rebuild")
PASS_SCENARIOS = ("pass-alone", "pass", "pass-1ms", "heavy", "heavy-1ms")


def serve(conn, n_instances: int, n_queue: int, scenario: str) -> None:
    from api.app import make_app
    from api.backend import SnapshotBackend
    from api.metrics import DispatchMetrics
    from api.server import ApiServer

    logging.getLogger("waitress.queue").setLevel(logging.ERROR)  # "Task queue depth" under load is expected
    backend = SnapshotBackend(d.big_snapshot(n_instances, n_queue))
    metrics = DispatchMetrics(d.cluster())
    metrics.set_snapshot_source(backend.snapshot)
    server = ApiServer(make_app(d.cluster(), backend, metrics), ["http://127.0.0.1:0"],
                       loopback_only=True, threads=10).start()
    conn.send(server.urls[0])
    try:
        while not conn.poll(None if scenario == "static" else 1.0):
            snap = dataclasses.replace(backend.snapshot(), taken_at=time.time())
            if scenario == "rebuild":
                snap = dataclasses.replace(snap, queue=tuple(dataclasses.replace(e) for e in snap.queue),
                                           instances=tuple(dataclasses.replace(v) for v in snap.instances))
            backend.publish(snap)
    finally:
        server.stop()


def spin(seconds: float) -> None:
    """Pure-Python CPU work holding the GIL (released only at the switch interval)."""
    end = time.perf_counter() + seconds
    x = 0
    while time.perf_counter() < end:
        for i in range(200):
            x += i * i


class BoxBackend:
    """The Backend the API needs, over the SnapshotBox a scheduler publishes into (read-only bench)."""

    def __init__(self, box):
        self._box = box

    def snapshot(self):
        return self._box.snapshot

    def set_idle_behavior(self, instance_id: str, behavior: str) -> None:
        raise NotImplementedError("read-only bench backend")

    kill_instance = kill_container = set_idle_behavior

    def health(self) -> dict:
        return {"health": "OK"}


def serve_pass(conn, n_instances: int, n_queue: int, scenario: str, resort_every: int = 10,
               heavy_ms: float = 250.0) -> None:
    """The API plus a scheduling pass every second in one process; ``conn`` carries commands.

    Commands: ("load", bool) marks whether clients are running (pass times are kept per phase),
    ("stats",) answers {phase: [pass seconds]}, ("stop",) ends.
    """
    from api.app import make_app
    from api.metrics import DispatchMetrics
    from api.server import ApiServer
    from bench_scheduler import build

    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    if scenario.endswith("-1ms"):
        sys.setswitchinterval(0.001)
    s = build(n_queue, n_instances)
    s._pass(1000.0)
    cluster = s._cluster
    metrics = DispatchMetrics(cluster)
    metrics.set_snapshot_source(lambda: s._box.snapshot)
    server = ApiServer(make_app(cluster, BoxBackend(s._box), metrics), ["http://127.0.0.1:0"],
                       loopback_only=True, threads=10).start()
    times: dict[str, list[float]] = {"idle": [], "load": []}
    phase = ["idle"]
    stop = threading.Event()

    def passes():
        k, nxt = 1, time.monotonic()
        while not stop.wait(max(0.0, nxt - time.monotonic())):
            nxt += 1.0
            s._ops.clear()
            if resort_every and k % resort_every == 0:
                s._qver += 1  # as after a queue poll that changed something: re-sort
            t0 = time.perf_counter()
            s._pass(1000.0 + k)
            if scenario.startswith("heavy"):
                spin(heavy_ms / 1e3)
            times[phase[0]].append(time.perf_counter() - t0)
            k += 1

    t = threading.Thread(target=passes, name="pass", daemon=True)
    if scenario != "pass-alone":
        t.start()
    conn.send((server.urls[0], cluster.management_token))
    try:
        while True:
            msg = conn.recv()
            if msg[0] == "load":
                phase[0] = "load" if msg[1] else "idle"
            elif msg[0] == "stats":
                conn.send({k: list(v) for k, v in times.items()})
            else:
                break
    finally:
        stop.set()
        if t.is_alive():
            t.join(10)
        server.stop()


def client(url: str, path: str, n: int, out: list[float], sizes: list[int], token: str = d.TOKEN,
           deadline: float | None = None) -> None:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    headers = {"Authorization": "Bearer " + token}
    for _ in range(n):
        if deadline is not None and time.perf_counter() >= deadline:
            break
        t0 = time.perf_counter()
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        body = resp.read()
        out.append(time.perf_counter() - t0)
        if resp.status != 200:
            raise SystemExit(f"{path}: HTTP {resp.status}")
        sizes.append(len(body))
    conn.close()


def run(url: str, path: str, clients: int, n: int, token: str = d.TOKEN, seconds: float | None = None) -> dict:
    """``clients`` threads each send ``n`` requests (or until ``seconds`` have passed)."""
    lat: list[float] = []
    sizes: list[int] = []
    deadline = time.perf_counter() + seconds if seconds else None
    threads = [threading.Thread(target=client, args=(url, path, n, lat, sizes, token, deadline))
               for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat.sort()
    return {"p50": statistics.median(lat) * 1e3, "p99": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3,
            "max": lat[-1] * 1e3, "rps": len(lat) / wall, "n": len(lat), "bytes": max(sizes)}


def pass_scenario(ctx, scenario: str, args) -> dict:
    """Run the clients against one pass scenario; returns {path: result} and the pass times."""
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=serve_pass, args=(child, args.instances, args.queue, scenario, args.resort_every, args.heavy_ms),
                       daemon=True)
    proc.start()
    out = {}
    try:
        url, token = parent.recv()
        if scenario != "pass-alone":
            time.sleep(args.seconds)  # pass times without client load
        parent.send(("load", True))
        for path in PASS_PATHS:
            run(url, path, 1, 2, token)  # warm up: first render, connections
            out[path] = r = run(url, path, args.clients, 10 ** 9, token, seconds=args.seconds)
            print(f"{scenario:10} {path:34} p50 {r['p50']:7.1f} ms  p99 {r['p99']:7.1f} ms  max {r['max']:7.1f} ms  "
                  f"{r['rps']:6.0f} req/s  (n={r['n']})", flush=True)
        parent.send(("load", False))
        parent.send(("stats",))
        times = parent.recv()
        for phase in ("idle", "load"):
            ts = times[phase]
            if ts:
                print(f"{scenario:10} pass {n_q(args)} {'without' if phase == 'idle' else 'with   '} API load: "
                      f"median {statistics.median(ts) * 1e3:6.1f} ms  max {max(ts) * 1e3:6.1f} ms  (n={len(ts)})",
                      flush=True)
        out["passes"] = times
    finally:
        parent.send(("stop",))
        proc.join(15)
        if proc.is_alive():
            proc.terminate()
            proc.join(5)
    return out


def n_q(args) -> str:
    return f"{args.queue:,} x {args.instances:,}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--requests", type=int, default=100,
                    help="per client and path (a tenth of it for the 13 MB /containers)")
    ap.add_argument("--instances", type=int, default=1000)
    ap.add_argument("--queue", type=int, default=10000)
    ap.add_argument("--seconds", type=float, default=6.0,
                    help="pass scenarios: seconds of load per path (and of idle passes before it)")
    ap.add_argument("--resort-every", type=int, default=10,
                    help="pass scenarios: every Nth pass sees a changed queue and re-sorts it (1: every pass)")
    ap.add_argument("--heavy-ms", type=float, default=250.0,
                    help="heavy scenarios: pure-Python CPU work added to each pass, in ms")
    ap.add_argument("--scenarios", default=",".join(SNAPSHOT_SCENARIOS + PASS_SCENARIOS),
                    help="comma-separated, from: " + ", ".join(SNAPSHOT_SCENARIOS + PASS_SCENARIOS))
    args = ap.parse_args()
    chosen = [x.strip() for x in args.scenarios.split(",") if x.strip()]
    unknown = [x for x in chosen if x not in SNAPSHOT_SCENARIOS + PASS_SCENARIOS]
    if unknown:
        ap.error(f"--scenarios: unknown scenario {unknown[0]!r}")
    ctx = mp.get_context("fork")
    print(f"{args.clients} clients x {args.requests} requests (pass scenarios: {args.seconds:g}s per path); "
          f"{args.instances} instances, {args.queue} queue entries; re-sort every {args.resort_every} passes")
    for scenario in [x for x in chosen if x in SNAPSHOT_SCENARIOS]:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=serve, args=(child, args.instances, args.queue, scenario), daemon=True)
        proc.start()
        try:
            url = parent.recv()
            for path in PATHS:
                run(url, path, 1, 2)  # warm up: first render, connections
                n = max(2, args.requests // 10) if path.endswith("/containers") else args.requests
                r = run(url, path, args.clients, n)
                print(f"{scenario:9} {path:34} p50 {r['p50']:7.1f} ms  p99 {r['p99']:7.1f} ms  "
                      f"{r['rps']:7.0f} req/s  body {r['bytes'] / 1e6:.2f} MB  (n={r['n']})", flush=True)
        finally:
            parent.send("stop")
            proc.join(15)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
    results = {sc: pass_scenario(ctx, sc, args) for sc in chosen if sc in PASS_SCENARIOS}
    if len(results) > 1:
        print("\nsummary (p99 ms; pass median ms without -> with API load):")
        for sc, out in results.items():
            idle, load = out["passes"]["idle"], out["passes"]["load"]
            med = lambda ts: f"{statistics.median(ts) * 1e3:.1f}" if ts else "-"  # noqa: E731
            print(f"  {sc:10} instances {out[PASS_PATHS[0]]['p99']:7.1f}  metrics {out[PASS_PATHS[1]]['p99']:7.1f}  "
                  f"pass {med(idle)} -> {med(load)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
