"""Where the workers' SSH commands run: three bounded thread pools that every WorkerActor shares.

A worker never runs a remote command on its own thread (its mailbox must keep answering start,
kill, set_idle_behavior and shutdown while a probe waits). One thread per VM for that would not
scale to thousands of VMs, and one shared pool would let boot probes, which may wait for minutes
(``cloud-init status --wait`` in BootProbeCommand, bounded only by TimeoutBooting), take every
thread from the run probes and starts of booted VMs. So each kind of work has its own capacity:

* ``boot``: boot probes and the runner upload that follows them (DeployRunnerBinary). Waits that
  overlap a VM's own boot cost little: once the first probes return, the VMs behind them have
  booted meanwhile and answer at once.
* ``probe``: ``crunch-run --list``. Each is cut at 0.8 x ProbeInterval and MaxProbesPerSecond
  bounds how many begin per second, so a pool of MaxProbesPerSecond x that deadline never queues
  a probe behind VMs that do not answer.
* ``command``: ``crunch-run --detach`` and ``--kill``, so a burst of starts never waits for probes
  and probes never wait for starts. A start or kill on a VM that does not answer holds its thread
  for up to LONG_COMMAND_TIMEOUT (300 s), so each worker keeps at most ``per_worker`` of these in
  flight and queues the rest in order (``WorkerActor._command``): a few broken VMs with many
  containers each cannot take every thread from the healthy ones (it takes ``command /
  per_worker`` VMs hung at once). It also keeps a worker's concurrent sessions on its one SSH
  transport under OpenSSH's MaxSessions (10).

Threads are started on demand (``ThreadPoolExecutor``), so an idle dispatcher has few. A worker
keeps at most one probe in flight; MaxProbesPerSecond is still the shared slot limiter's.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

BOOT_THREADS = 256
COMMAND_THREADS = 64
COMMANDS_PER_WORKER = 4  # starts + kills in flight per worker (the rest wait in the worker)
PROBE_THREADS_MIN, PROBE_THREADS_MAX = 16, 256


def probe_threads(max_probes_per_second: float, probe_interval: float) -> int:
    """Enough threads for every run probe MaxProbesPerSecond lets begin within one probe deadline
    (0.8 x ProbeInterval, at most 10 s: ``cloud.ssh.executor_for``); unlimited rate: the cap."""
    if max_probes_per_second <= 0:
        return PROBE_THREADS_MAX
    deadline = max(0.5, min(10.0, probe_interval * 0.8))
    return max(PROBE_THREADS_MIN, min(PROBE_THREADS_MAX, math.ceil(max_probes_per_second * deadline)))


@dataclass(frozen=True)
class WorkerPools:
    boot: ThreadPoolExecutor
    probe: ThreadPoolExecutor
    command: ThreadPoolExecutor
    per_worker: int = COMMANDS_PER_WORKER  # of the command pool's threads, one worker holds at most this

    @classmethod
    def create(cls, *, boot: int = BOOT_THREADS, probe: int = PROBE_THREADS_MIN,
               command: int = COMMAND_THREADS, per_worker: int = COMMANDS_PER_WORKER) -> WorkerPools:
        return cls(boot=ThreadPoolExecutor(boot, thread_name_prefix="ssh-boot"),
                   probe=ThreadPoolExecutor(probe, thread_name_prefix="ssh-probe"),
                   command=ThreadPoolExecutor(command, thread_name_prefix="ssh-command"),
                   per_worker=max(1, per_worker))

    @classmethod
    def for_cluster(cls, cluster) -> WorkerPools:
        vms = cluster.cloud_vms
        return cls.create(probe=probe_threads(vms.max_probes_per_second, vms.probe_interval))

    def get(self, kind: str) -> ThreadPoolExecutor:
        return getattr(self, kind)

    def shutdown(self) -> None:
        """Jobs not yet begun are cancelled (``BaseActor._off_mailbox`` uncounts them); those
        running finish on their own deadlines and tell a stopped actor nothing."""
        for pool in (self.boot, self.probe, self.command):
            pool.shutdown(wait=False, cancel_futures=True)
