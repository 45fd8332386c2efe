#!/usr/bin/env python3
"""Latency of the management API and /metrics under 10 concurrent clients.

The server (ApiServer on Waitress over a SnapshotBackend holding 1,000 instances and 10,000 queue
entries) runs in a child process so the load generator does not share its GIL. Two scenarios:
``static`` (one snapshot: bodies come from the per-snapshot cache), ``republish`` (a new Snapshot
every second holding the same entry objects, as when a pass changes nothing: bodies are re-joined
from per-item fragments) and ``rebuild`` (every entry a new object every second: a full render
per second, the worst case). The lead adds the variant with a real scheduling pass running.

    .venv/bin/python bench/bench_api.py [--requests 100] [--clients 10]
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

from tests import api_data as d  # noqa: E402

PATHS = ("/arvados/v1/dispatch/instances", "/metrics", "/arvados/v1/dispatch/containers")


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


def client(url: str, path: str, n: int, out: list[float], sizes: list[int]) -> None:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    headers = {"Authorization": "Bearer " + d.TOKEN}
    for _ in range(n):
        t0 = time.perf_counter()
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        body = resp.read()
        out.append(time.perf_counter() - t0)
        if resp.status != 200:
            raise SystemExit(f"{path}: HTTP {resp.status}")
        sizes.append(len(body))
    conn.close()


def run(url: str, path: str, clients: int, n: int) -> dict:
    lat: list[float] = []
    sizes: list[int] = []
    threads = [threading.Thread(target=client, args=(url, path, n, lat, sizes)) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat.sort()
    return {"p50": statistics.median(lat) * 1e3, "p99": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3,
            "rps": len(lat) / wall, "n": len(lat), "bytes": max(sizes)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--requests", type=int, default=100,
                    help="per client and path (a tenth of it for the 13 MB /containers)")
    ap.add_argument("--instances", type=int, default=1000)
    ap.add_argument("--queue", type=int, default=10000)
    args = ap.parse_args()
    ctx = mp.get_context("fork")
    print(f"{args.clients} clients x {args.requests} requests; {args.instances} instances, {args.queue} queue entries")
    for scenario in ("static", "republish", "rebuild"):
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
