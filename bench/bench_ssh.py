"""SSH executor figures against a real OpenSSH sshd on loopback (prints, asserts nothing).

* probes per second over already-open transports, sequential and from a few threads;
* idle CPU of this process over 10 s with 200 open transports, with paramiko's default
  0.1 s socket poll and with cloud.ssh's IDLE_POLL;
* memory per open transport (RSS delta / 200).

Targets (issue "Real SSH to workers"): >= 200 probes/s, idle CPU < 2 % of a core with 200
transports, < 128 KiB per transport. Run: ``.venv/bin/python bench/bench_ssh.py [--quick]``.
"""

from __future__ import annotations

import gc
import resource
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cloud import ssh  # noqa: E402
from tests.sshd import SSHServer  # noqa: E402

PROBE = "true"  # what a boot probe costs on the wire; the remote command is trivial


class _Target:
    def __init__(self, address):
        self.id = "bench"
        self.address = address
        self.remote_user = "root"

    def verify_host_key(self, key, transport):
        return None  # the driver vouches: no secret round-trip, as with a host-key-aware driver


def _open(server: SSHServer, n: int) -> list[ssh.SSHExecutor]:
    out = []
    for _ in range(n):
        ex = ssh.SSHExecutor(_Target(server.address), private_key=server.client_key,
                             connect_timeout=10, auth_timeout=10, command_timeout=10)
        ex.execute(PROBE)
        out.append(ex)
    return out


def _close(exs):
    for ex in exs:
        ex.close()


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def probes_per_second(exs, seconds: float, threads: int) -> tuple[float, float]:
    """(probes per second, this process's CPU ms per probe): the rest of the time is sshd's."""
    c0 = _cpu()
    stop = time.monotonic() + seconds
    counts = [0] * threads

    def run(i):
        mine = exs[i::threads]
        n = 0
        while time.monotonic() < stop:
            for ex in mine:
                ex.execute(PROBE)
                n += 1
        counts[i] = n

    t0 = time.monotonic()
    ts = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    n = sum(counts)
    return n / (time.monotonic() - t0), 1000 * (_cpu() - c0) / n


def idle_cpu_percent(server: SSHServer, n: int, seconds: float, poll: float) -> tuple[float, float]:
    """(% of one core while idle, KiB of RSS per transport) with ``n`` open transports."""
    saved = ssh.IDLE_POLL
    ssh.IDLE_POLL = poll
    try:
        gc.collect()
        rss0 = _rss_kib()
        exs = _open(server, n)
        gc.collect()
        rss1 = _rss_kib()
        time.sleep(0.5)  # let the handshake traffic settle
        c0, t0 = _cpu(), time.monotonic()
        time.sleep(seconds)
        pct = 100 * (_cpu() - c0) / (time.monotonic() - t0)
        _close(exs)
        return pct, (rss1 - rss0) / n
    finally:
        ssh.IDLE_POLL = saved


def main(argv=None) -> int:
    quick = "--quick" in (argv or sys.argv[1:])
    reps, secs, idle_secs, n_idle = (1, 1.0, 3.0, 50) if quick else (3, 3.0, 10.0, 200)
    server = SSHServer(record=False, max_startups=50).start()
    try:
        _open(server, 3)  # warm up imports, crypto backends and the watchdog thread
        exs = _open(server, 16)
        for threads in (1, 4):
            runs = [probes_per_second(exs, secs, threads) for _ in range(reps)]
            rate = statistics.median(r[0] for r in runs)
            cpu = statistics.median(r[1] for r in runs)
            print(f"probes/s over 16 open transports, {threads} thread(s): median {rate:6.1f}"
                  f" ({', '.join(f'{r[0]:.0f}' for r in runs)}); dispatcher CPU {cpu:.2f} ms/probe"
                  f" (= {1000 / cpu:.0f} probes/s per core)")
        _close(exs)
        for label, poll in (("paramiko default 0.1 s poll", 0.1), (f"IDLE_POLL {ssh.IDLE_POLL:g} s", ssh.IDLE_POLL)):
            pct, kib = idle_cpu_percent(server, n_idle, idle_secs, poll)
            print(f"{n_idle} idle transports, {label:28s}: CPU {pct:5.2f} % of a core over {idle_secs:g} s,"
                  f" RSS {kib:6.1f} KiB per transport")
    finally:
        server.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
