#!/usr/bin/env python3
"""Requests per second of the dev container API server (api/arvados/server.py + store.py).

The server (WsgiServer + the Bottle app over a file-backed SQLite ContainerStore, --threads 16
as bench_dispatch.py runs it) lives in a child process, so the clients don't share its GIL. The
clients are ArvadosClient (requests, keep-alive sessions), one per thread. For 1 client
(sequential) and --clients (8) concurrent ones, each over its own share of fresh Queued
containers: ``lock`` (Queued -> Locked), ``update`` (Locked -> Running, as crunch-run does),
and ``list`` (the dispatcher's queue poll: a page of 100 of the Locked/Running containers).
Prints calls/s (median of --runs) and the server process's CPU per call.

    .venv/bin/python bench/bench_arvados_api.py [--n 2000] [--clients 8] [--runs 3]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from api.arvados.client import ArvadosClient  # noqa: E402
from tests.util import process_cpu as _cpu  # noqa: E402

TOKEN = "bench-arvados-api-token"
BASE = {"container_image": "arvados/jobs", "command": ["true"], "priority": 1,
        "runtime_constraints": {"vcpus": 1, "ram": 256 << 20}}


def serve(conn, db: str, threads: int) -> None:
    import logging
    from api.arvados.server import serve as serve_api
    from api.arvados.store import ContainerStore

    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    store = ContainerStore(db, cluster_id="zzzzz")
    store.add_token(TOKEN, admin=True)
    server = serve_api(store, "127.0.0.1", 0, threads=threads)
    conn.send(server.url)
    conn.recv()  # until the parent is done
    server.stop()
    store.close()


def _timed(pid: int, clients: int, work, items) -> tuple[float, float]:
    """calls/s and server CPU ms per call for ``work(client, item)`` over ``items``."""
    local = __import__("threading").local()

    def one(item):
        if not hasattr(local, "c"):
            local.c = ARGS_CLIENT()
        work(local.c, item)
    cpu0, t0 = _cpu(pid), time.perf_counter()
    if clients == 1:
        for it in items:
            one(it)
    else:
        with ThreadPoolExecutor(clients) as ex:
            list(ex.map(one, items))
    dt, cpu = time.perf_counter() - t0, _cpu(pid) - cpu0
    return len(items) / dt, 1000 * cpu / len(items)


ARGS_CLIENT = None


def main() -> int:
    global ARGS_CLIENT
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=2000, help="containers locked/updated per measurement")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=16, help="the server's worker threads (bench_dispatch: 16)")
    p.add_argument("--profile", metavar="FILE",
                   help="py-spy (--gil, collapsed stacks) the server process into FILE while measuring")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        parent, child = mp.Pipe()
        proc = mp.get_context("spawn").Process(target=serve, args=(child, str(Path(tmp) / "api.db"), args.threads), daemon=True)
        proc.start()
        child.close()  # only the server holds that end: if it dies, recv() ends instead of hanging
        if not parent.poll(60):
            proc.terminate()
            raise SystemExit("the API server process did not start within 60 s")
        url = parent.recv()
        ARGS_CLIENT = lambda: ArvadosClient(url, TOKEN)  # noqa: E731
        admin = ARGS_CLIENT()
        spy = None
        if args.profile:
            import subprocess
            spy = subprocess.Popen([str(Path(sys.executable).with_name("py-spy")), "record", "--pid",
                                    str(proc.pid), "--format", "raw", "--rate", "200", "--nonblocking",
                                    "--gil", "--output", args.profile],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)  # py-spy attaches
        results: dict[tuple[str, int], list[tuple[float, float]]] = {}
        try:
            for _ in range(args.runs):
                for clients in (1, args.clients):
                    with ThreadPoolExecutor(8) as ex:
                        uuids = list(ex.map(lambda _: admin.create_container(BASE)["uuid"], range(args.n)))
                    for op, work, items in (
                            ("lock", lambda c, u: c.lock(u), uuids),
                            ("update", lambda c, u: c.update(u, {"state": "Running"}), uuids),
                            ("list", lambda c, _: c.list_containers(
                                [["state", "in", ["Locked", "Running"]]], limit=100),
                             range(max(50, args.n // 10)))):
                        results.setdefault((op, clients), []).append(_timed(proc.pid, clients, work, items))
                    for u in uuids:  # out of the way of the next round's lists
                        admin.update(u, {"state": "Cancelled"})
        finally:
            if spy is not None:
                spy.send_signal(__import__("signal").SIGINT)  # py-spy writes its file on SIGINT
                spy.wait(30)
            parent.send("stop")
            proc.join(10)
    print(f"dev container API server ({args.threads} threads), file-backed SQLite, {args.n} containers per measurement, "
          f"medians of {args.runs}; load average {os.getloadavg()[0]:.2f}")
    for (op, clients), rs in results.items():
        rate = statistics.median(r[0] for r in rs)
        cpu = statistics.median(r[1] for r in rs)
        print(f"  {op:<7} {clients} client{'s' if clients > 1 else ' '}  {rate:7.0f} calls/s   "
              f"server CPU {cpu:5.2f} ms/call")
    return 0


if __name__ == "__main__":
    sys.exit(main())
