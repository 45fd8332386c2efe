#!/usr/bin/env python3
"""Dispatch throughput onto idle capacity, as a new user would see it.

The real ``dispatch-cloud run`` (a child process) on the stub cloud (BootTime 1s, ContainerRunTime
2s, MaxInstances N, MaxCloudOpsPerSecond 1000, MaxConcurrentInstanceCreateOps 50, PollInterval 1s)
against the dev container API server over HTTP (in a process of its own, as Arvados' API server
is, behind a counting WSGI middleware; this process only submits and watches). First N
containers, so that N instances exist and go idle (warm-up; containers that finish early are
reused, so further rounds of 2N top the pool up to N); then N more queued at once (8 client
threads) onto the N idle instances (the burst). Printed per run, and as medians:

* warm-up (round 1): seconds until its instances appeared, and instance creations/s;
* burst: starts/s from the burst's submission to the last ``crunch-run process started``;
  queue -> detach latency p50/p90/p99/max (submission time here, start time from the
  dispatcher's own log line);
* remote commands per container beyond probes (detaches + kill signals sent), kill decisions
  ("kill container because ...") and dispatcher cancels;
* container API calls per container during the burst, by kind, and any 422 answers.

    .venv/bin/python bench/bench_dispatch.py [--sizes 200,1000] [--runs 3] [--keep DIR]

With ``--keep DIR`` each run's config, API database and dispatcher log stay in DIR, with the
dispatcher's pid for a profiler (``py-spy record --pid $(cat DIR/n200-run1/pid) --threads``);
``--profile`` records py-spy (``--gil``) on the dispatcher and on the API server process during
each burst. BENCH_LOG_LEVEL=debug in the environment sets the dispatcher's SystemLogs
LogLevel (e.g. to see each "lock succeeded"; it slows the run).
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import requests  # noqa: E402
import yaml  # noqa: E402

from api.arvados.client import ArvadosClient  # noqa: E402
from api.arvados.server import make_app  # noqa: E402
from api.arvados.store import ContainerStore  # noqa: E402
from api.wsgi import CONTAINER_API_LIMITS, WsgiServer  # noqa: E402
from tests.dispatcher_proc import RunProcess  # noqa: E402
from tests.util import free_port as _free_port, process_cpu as _cpu, stop_process, wait_for  # noqa: E402

TOKEN = "systemroot" + "a" * 30
WATCH = "benchwatch" + "c" * 30  # the bench's own reads, left out of the counts
MGMT = "management" + "b" * 30
BASE = {"command": ["true"], "container_image": "img", "cwd": "/", "output_path": "/out"}


class Counting:
    """WSGI middleware: counts requests by (method, kind, status) while counting is on.

    ``PUT /_bench/counting`` (body ``on`` or ``off``; ``on`` starts from zero) switches it and
    ``GET /_bench/counts`` reads the counts, so the bench can drive a server in another process."""

    def __init__(self, app):
        self.app = app
        self.on = False
        self.counts: collections.Counter = collections.Counter()
        self._lock = threading.Lock()

    def __call__(self, environ, start_response):
        if environ.get("PATH_INFO", "").startswith("/_bench/"):
            return self._control(environ, start_response)
        if not self.on or environ.get("HTTP_AUTHORIZATION") == f"Bearer {WATCH}":
            return self.app(environ, start_response)
        method = environ.get("HTTP_X_HTTP_METHOD_OVERRIDE") or environ["REQUEST_METHOD"]
        parts = environ.get("PATH_INFO", "").strip("/").split("/")
        kind = parts[4] if len(parts) > 4 else ("item" if len(parts) > 3 else "list")

        def sr(status, headers, exc_info=None):
            with self._lock:
                self.counts[(method, kind, int(status.split()[0]))] += 1
            return start_response(status, headers, exc_info)
        return self.app(environ, sr)

    def _control(self, environ, start_response):
        if environ["REQUEST_METHOD"] == "PUT" and environ["PATH_INFO"] == "/_bench/counting":
            body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
            with self._lock:
                if body == b"on":
                    self.counts.clear()
                self.on = body == b"on"
            out = b"{}"
        elif environ["PATH_INFO"] == "/_bench/counts":
            with self._lock:
                out = json.dumps([[*k, v] for k, v in self.counts.items()]).encode()
        else:
            start_response("404 Not Found", [("Content-Type", "application/json")])
            return [b'{"errors": ["no such bench route"]}']
        start_response("200 OK", [("Content-Type", "application/json")])
        return [out]


def serve_api(db: str) -> int:
    """The API server process: print its URL, serve until stdin closes (the bench ended)."""
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)  # one line per queued request
    store = ContainerStore(db, cluster_id="zzzzz")
    store.add_token(TOKEN, admin=True)
    store.add_token(WATCH, admin=True)
    api = WsgiServer(Counting(make_app(store)), "127.0.0.1", 0, threads=16, name="arvados-api",
                     limits=CONTAINER_API_LIMITS).start()
    print(api.url, flush=True)
    try:
        sys.stdin.read()
    finally:
        api.stop()
        store.close()
    return 0


class ApiProcess:
    """The dev container API server in a process of its own (``serve_api``)."""

    def __init__(self, workdir: Path):
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve-api", str(workdir / "api.db")],
                                     cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=open(workdir / "api.log", "wb"))
        self.url = self.proc.stdout.readline().decode().strip()
        if not self.url.startswith("http://"):
            self.stop()
            raise RuntimeError(f"the API server did not start: see {workdir / 'api.log'}")

    def counting(self, on: bool) -> None:
        r = requests.put(self.url + "/_bench/counting", data=b"on" if on else b"off", timeout=30)
        r.raise_for_status()

    def counts(self) -> collections.Counter:
        r = requests.get(self.url + "/_bench/counts", timeout=30)
        r.raise_for_status()
        return collections.Counter({tuple(row[:3]): row[3] for row in r.json()})

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()  # serve_api returns
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _config(api_url: str, mgmt: str, n: int, max_probes: int) -> dict:
    return {"Clusters": {"zzzzz": {
        "SystemRootToken": TOKEN, "ManagementToken": MGMT,
        "Services": {"Controller": {"ExternalURL": api_url},
                     "DispatchCloud": {"InternalURLs": {mgmt: {}}}},
        "Containers": {"ReserveExtraRAM": 0, "LocalKeepBlobBuffersPerVCPU": 0, "CloudVMs": {
            "Driver": "stub", "BootProbeCommand": "true", "PollInterval": "1s", "ProbeInterval": "1s",
            "SyncInterval": "5s", "TimeoutIdle": "10m", "MaxInstances": n,
            "MaxCloudOpsPerSecond": 1000, "MaxConcurrentInstanceCreateOps": 50,
            "MaxProbesPerSecond": max_probes,
            "DriverParameters": {"BootTime": "1s", "BootTimeJitter": "0s", "ContainerRunTime": "2s",
                                 "ContainerRunTimeJitter": "0s", "MinTimeBetweenCreateCalls": "0s"}}},
        **({"SystemLogs": {"LogLevel": os.environ["BENCH_LOG_LEVEL"]}} if os.environ.get("BENCH_LOG_LEVEL") else {}),
        "InstanceTypes": {"small": {"VCPUs": 1, "RAM": "1GiB", "Price": 0.1}},
    }}}


class LogTail:
    """The dispatcher's JSON log, parsed once: each call reads only what was added since.

    (Re-parsing the whole log every 0.2 s cost seconds of CPU at 1,000 containers, on the same 2
    cores as the processes being measured.)"""

    # the only records the bench reads: other lines are not even JSON-decoded (a 1,000-container
    # burst logs ~10,000 other lines)
    WANTED = (b'"instance appeared in cloud"', b'"creating new instance"', b'"crunch-run process started"',
              b'"sending signal"', b'"kill container because', b'"cancelling container')

    def __init__(self, path: Path):
        self.path = path
        self.records: list[dict] = []
        self._offset = 0
        self._partial = b""

    def __call__(self) -> list[dict]:
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            if line.startswith(b"{") and any(w in line for w in self.WANTED):
                try:
                    self.records.append(json.loads(line))
                except ValueError:
                    pass
        return self.records


def _t(rec: dict) -> float:
    from datetime import datetime
    return datetime.fromisoformat(rec["time"].replace("Z", "+00:00")).timestamp()


_wait = functools.partial(wait_for, interval=0.2)  # raises a TimeoutError (WaitTimeout)


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def _profilers(pids: dict[str, int], out: Path | None) -> list[subprocess.Popen]:
    """py-spy (collapsed stacks, 100 Hz, idle threads left out) on each pid, for the burst only."""
    if out is None:
        return []
    import shutil
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    return [subprocess.Popen([spy, "record", "--pid", str(pid), "--format", "raw", "--rate", "100", "--nonblocking", "--gil",
                              "--output", str(out / f"burst-{name}.txt")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for name, pid in pids.items()]


def run_once(n: int, workdir: Path, max_probes: int, profile: bool = False) -> dict:
    api = run = None
    spies: list[subprocess.Popen] = []
    try:
        api = ApiProcess(workdir)
        mgmt = f"http://127.0.0.1:{_free_port()}"
        cfg = workdir / "config.yml"
        cfg.write_text(yaml.safe_dump(_config(api.url, mgmt, n, max_probes)))
        log = workdir / "run.log"
        run = RunProcess(cfg, log, state=workdir)  # its own lock file
        proc = run.proc
        (workdir / "pid").write_text(str(proc.pid))  # for a profiler to attach (py-spy record --pid)
        client = ArvadosClient(api.url, WATCH)
        auth = {"Authorization": f"Bearer {MGMT}"}

        def submit(k: int) -> dict[str, float]:
            """k containers at once: 8 client threads, each with its own HTTP session."""
            local = threading.local()

            def one(_):
                if not hasattr(local, "c"):
                    local.c = ArvadosClient(api.url, TOKEN)
                c = local.c.create_container({**BASE, "priority": 1,
                                              "runtime_constraints": {"vcpus": 1, "ram": 256 << 20}})
                return c["uuid"], time.time()
            with ThreadPoolExecutor(8) as ex:
                return dict(ex.map(one, range(k)))

        def states(uuids) -> collections.Counter:
            uuids, out = list(uuids), collections.Counter()
            for i in range(0, len(uuids), 500):  # the store's page limit is 1,000
                batch = uuids[i:i + 500]
                items = client.list_containers(filters=[["uuid", "in", batch]], select=["uuid", "state"],
                                               limit=len(batch))
                out.update(x["state"] for x in items)
            return out

        def finished(uuids) -> int:
            """Complete or Cancelled: a cancel (a bug's trace) must not hang the bench."""
            st = states(uuids)
            return st.get("Complete", 0) + st.get("Cancelled", 0)

        # warm-up: N containers, so N instances exist; then wait for all of them idle
        tail = LogTail(log)

        def all_idle():
            try:
                items = requests.get(mgmt + "/arvados/v1/dispatch/instances", headers=auth, timeout=10).json()["items"]
            except (requests.RequestException, ValueError, KeyError):
                return False
            last_seen[:] = [collections.Counter(x["worker_state"] for x in items)]
            return bool(items) and all(x["worker_state"] == "idle" for x in items) and len(items)
        last_seen: list = [None]
        t_warm = time.time()
        # Containers that finish early are reused by later ones, so a round may create fewer
        # than N instances (at N=1,000, ~870): another round then tops the pool up, so the
        # burst lands on N idle instances as the issue's shape says. Figures are round 1's.
        idle, rounds, warm_s, create_rate = 0, 0, float("nan"), float("nan")
        while idle < n and rounds < 4:
            rounds += 1
            k = n if rounds == 1 else 2 * n  # more containers than idle instances: creates happen
            warm = submit(k)
            _wait(lambda: finished(warm) == k, 60 + k * 0.5, "the warm-up containers")
            try:
                idle = _wait(all_idle, 60 + 2 * n / max_probes, "N idle instances")
            except TimeoutError:
                raise TimeoutError(f"not all instances idle after the warm-up: {last_seen[0]}") from None
            if rounds == 1:
                recs = tail()
                appeared = [_t(r) for r in recs if r.get("msg") == "instance appeared in cloud"]
                created = [_t(r) for r in recs if r.get("msg") == "creating new instance"]
                warm_s = (max(appeared) - t_warm) if appeared else float("nan")
                create_rate = len(created) / (max(created) - min(created)) if len(created) > 1 else float("nan")
                warm_n = len(appeared)
        recs = tail()

        # the burst onto idle capacity
        api.counting(True)
        mark = len(recs)
        spies[:] = _profilers({"dispatcher": proc.pid, "api": api.proc.pid}, workdir if profile else None)
        if spies:
            time.sleep(1.0)  # py-spy attaches
        cpu0 = (_cpu(proc.pid), _cpu(api.proc.pid), _cpu(os.getpid()), time.time())
        burst = submit(n)
        t_sub = min(burst.values())

        def started():
            got = {}
            for r in tail()[mark:]:
                if r.get("msg") == "crunch-run process started" and r.get("ContainerUUID") in burst:
                    got.setdefault(r["ContainerUUID"], _t(r))
            return got if len(got) == n else None
        starts = _wait(started, 120, "every burst container to start")
        cpu1 = (_cpu(proc.pid), _cpu(api.proc.pid), _cpu(os.getpid()), time.time())
        _stop_profilers(spies)
        _wait(lambda: finished(burst) == n, 60 + n * 0.2, "the burst to finish")
        time.sleep(3)  # let the dispatcher notice the ends and whatever it kills or cancels after them
        counts = api.counts()
        api.counting(False)
        after = tail()[mark:]
        lat = [starts[u] - burst[u] for u in burst]
        last = max(starts.values())
        per = collections.Counter()
        for r in after:
            if r.get("ContainerUUID") in burst and r.get("msg") in ("crunch-run process started", "sending signal"):
                per[r["ContainerUUID"]] += 1
        calls = collections.Counter()
        for (method, kind, status), k in counts.items():
            if (method, kind) != ("POST", "list"):  # the burst's own creates
                calls[f"{method} {kind}"] += k
        return {
            "n": n,
            "idle_before_burst": idle,
            "warmup_rounds": rounds,
            "warmup_instances": warm_n,
            "warmup_s": warm_s,
            "creates_per_s": create_rate,
            "starts_per_s": n / max(last - t_sub, 1e-9),
            "burst_to_last_start_s": last - t_sub,
            "submit_s": max(burst.values()) - t_sub,
            "lat_p50": _pct(lat, 0.5), "lat_p90": _pct(lat, 0.9), "lat_p99": _pct(lat, 0.99),
            "lat_max": max(lat),
            "remote_cmds_per_ctr": sum(per.values()) / n,
            "kill_decisions": sum(1 for r in after if str(r.get("msg", "")).startswith("kill container because")),
            "cancels": sum(1 for r in after if str(r.get("msg", "")).startswith("cancelling container")),
            "api_calls_per_ctr": sum(calls.values()) / n,
            "api_calls": dict(sorted(calls.items())),
            "cpu_dispatcher": (cpu1[0] - cpu0[0]) / (cpu1[3] - cpu0[3]),
            "cpu_api": (cpu1[1] - cpu0[1]) / (cpu1[3] - cpu0[3]),
            "cpu_bench": (cpu1[2] - cpu0[2]) / (cpu1[3] - cpu0[3]),
            "load": os.getloadavg()[0],
            "api_422": sum(k for (_, _, s), k in counts.items() if s == 422),
        }
    finally:
        _stop_profilers(spies)
        stop_process(run.proc if run is not None else None)
        if api is not None:
            api.stop()


def _stop_profilers(spies: list[subprocess.Popen]) -> None:
    """SIGINT: py-spy writes its file and exits (on every way out of a run)."""
    for spy in spies:
        stop_process(spy, signal.SIGINT)
    spies.clear()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="200,1000")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--keep", metavar="DIR", help="keep each run's config, API database and dispatcher log under DIR")
    p.add_argument("--max-probes", type=int, default=100,
                   help="MaxProbesPerSecond (Go's default 10 makes booting 1,000 VMs take 100 s+)")
    p.add_argument("--profile", action="store_true",
                   help="with --keep: py-spy the dispatcher and the API server process during "
                        "each burst; collapsed stacks in DIR/nN-runK/burst-*.txt")
    p.add_argument("--serve-api", metavar="DB", help=argparse.SUPPRESS)  # the API server process
    args = p.parse_args()
    if args.serve_api:
        return serve_api(args.serve_api)
    for n in (int(x) for x in args.sizes.split(",")):
        results = []
        for i in range(args.runs):
            if args.keep:
                d = Path(args.keep) / f"n{n}-run{i + 1}"
                d.mkdir(parents=True, exist_ok=True)
                r = run_once(n, d, args.max_probes, args.profile)
            else:
                with tempfile.TemporaryDirectory(prefix="bench-dispatch-") as d:
                    r = run_once(n, Path(d), args.max_probes)
            results.append(r)
            print(f"N={n} run {i + 1}: {r['idle_before_burst']} idle instances after {r['warmup_rounds']} warm-up round(s); round 1: {r['warmup_instances']} instances in {r['warmup_s']:.1f}s ({r['creates_per_s']:.0f} creates/s); "
                  f"burst {r['starts_per_s']:.0f} starts/s (submitted in {r['submit_s']:.2f}s), last start {r['burst_to_last_start_s']:.1f}s; "
                  f"queue->detach p50 {r['lat_p50']:.2f}s p90 {r['lat_p90']:.2f}s p99 {r['lat_p99']:.2f}s "
                  f"max {r['lat_max']:.2f}s; remote cmds/ctr {r['remote_cmds_per_ctr']:.2f}; "
                  f"kill decisions {r['kill_decisions']}; cancels {r['cancels']}; "
                  f"API calls/ctr {r['api_calls_per_ctr']:.1f} {r['api_calls']}; 422s {r['api_422']}; "
                  f"CPU in the burst (cores): dispatcher {r['cpu_dispatcher']:.2f}, API server "
                  f"{r['cpu_api']:.2f}, bench {r['cpu_bench']:.2f}; load average {r['load']:.1f}",
                  flush=True)
        med = {k: statistics.median(r[k] for r in results) for k in results[0]
               if isinstance(results[0][k], (int, float))}
        print(f"N={n} median of {len(results)}: starts/s {med['starts_per_s']:.0f}; "
              f"queue->detach p50 {med['lat_p50']:.2f}s p99 {med['lat_p99']:.2f}s max {med['lat_max']:.2f}s; "
              f"warm-up {med['warmup_s']:.1f}s ({med['creates_per_s']:.0f} creates/s); "
              f"remote cmds/ctr {med['remote_cmds_per_ctr']:.2f}; API calls/ctr {med['api_calls_per_ctr']:.1f}; "
              f"422s {med['api_422']:.0f}; load average {med['load']:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
