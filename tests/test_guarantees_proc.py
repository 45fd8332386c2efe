"""The guarantees for the real process (issue 11): ``dispatch-cloud run`` on the local driver
(VMs are process trees with their own SSH servers on 127.x addresses, crunch-run is
dispatch-cloud-crunch-run) against the container API server over HTTP on loopback.

* SIGKILL at random moments, restarted each time: every container runs and completes exactly
  once, none is left Locked, and no VM is left once the queue is empty and TimeoutIdle passed.
* A container API outage (connections refused) while containers run: nothing is shut down or
  cancelled for it, and dispatch resumes within one PollInterval of the API's return.
* 1,100 descriptors already open in the process: the management API answers and a VM boots and
  runs a container over SSH.
* G5 for all of them: no configured secret in any log line the dispatcher wrote.

Wall-clock waits are bounded polls (this is a process-level test, not an actor test)."""

from __future__ import annotations

import os
import random
import resource
import subprocess
import sys
import time

import pytest
import requests

from tests.dispatcher_proc import Cluster, assert_no_secrets
from tests.util import closing_each, wait_for

SEED = int(os.environ.get("DISPATCH_TEST_SEED", "0")) or random.randrange(1 << 30)


@pytest.fixture
def cluster(tmp_path):
    with closing_each(lambda **kw: Cluster(tmp_path, **kw)) as make:
        yield make


def no_secrets_logged(c: Cluster) -> None:
    assert_no_secrets(c.log.read_text(errors="replace"), c.secrets(), "the dispatcher's log")


CONTAINERS = 40
KILLS = 5


def test_sigkill_at_random_moments_every_container_completes_exactly_once(cluster):
    rng = random.Random(SEED)
    print(f"seed {SEED} (DISPATCH_TEST_SEED={SEED} reproduces the kill times)")
    c = cluster(max_instances=4, vcpus=1, idle="3s")
    uuids = [c.submit(i, seconds=rng.choice((0.2, 0.5, 1))) for i in range(CONTAINERS)]
    t0 = time.monotonic()
    c.start()
    kills = 0
    while kills < KILLS:
        time.sleep(rng.uniform(0.5, 3.0))  # a random moment: booting, starting, running, finishing
        states = {r["state"] for r in c.containers(uuids).values()}
        assert states != {"Complete"}, f"the queue finished after only {kills} kills: make it longer"
        c.kill()
        kills += 1
        c.start(wait=rng.random() < 0.5)  # sometimes killed again before it even listens
    wait_for(lambda: all(r["state"] in ("Complete", "Cancelled") for r in c.containers(uuids).values()),
             120, "every container to finish", interval=0.25)
    took = time.monotonic() - t0
    recs = c.containers(uuids)
    cancelled = {u: (r["runtime_status"], r["lock_count"]) for u, r in recs.items() if r["state"] != "Complete"}
    assert not cancelled, cancelled
    assert all(r["exit_code"] == 0 and not r["locked_by_uuid"] for r in recs.values())
    assert [c.runs(i) for i in range(CONTAINERS)] == [1] * CONTAINERS  # each ran exactly once
    wait_for(lambda: not c.vm_dirs() and c.mgmt_get("/arvados/v1/dispatch/instances") == {"items": []}, 30,
             "every VM to be shut down after TimeoutIdle")
    assert c.stop() == 0
    print(f"{CONTAINERS} containers, {kills} SIGKILLs survived, {c.starts} starts, {took:.1f}s")
    no_secrets_logged(c)


OUTAGE = 8.0  # seconds of refused connections: several PollIntervals and the client's retries
POLL = 1.0


def test_container_api_outage_shuts_nothing_down_and_dispatch_resumes_within_a_poll_interval(cluster):
    # one container per instance: two run through the outage, two instances wait idle for the
    # containers queued during it
    c = cluster(max_instances=4, vcpus=1, idle="60s", poll="1s")
    running = [c.submit(i, seconds=OUTAGE + 4) for i in range(2)]
    warmup = [c.submit(20 + i, seconds=0) for i in range(2)]
    c.start()
    wait_for(lambda: all(r["state"] == "Running" for r in c.containers(running).values())
             and all(r["state"] == "Complete" for r in c.containers(warmup).values()), 40,
             "two containers running and two idle instances before the outage", interval=0.1)
    vms_before = sorted(p.name for p in c.vm_dirs())
    lines_before = len(c.log_lines())
    c.api.stop()  # connections refused from now on
    t_down = time.monotonic()
    time.sleep(OUTAGE / 2)
    late = [c.submit(10 + i, seconds=0.5) for i in range(2)]  # queued while the API is away
    time.sleep(OUTAGE / 2)
    assert sorted(p.name for p in c.vm_dirs()) == vms_before  # nothing shut down during it
    c.api.restart()
    t_up = time.monotonic()
    wait_for(lambda: any(r["state"] != "Queued" for r in c.containers(late).values()), 10,
             "dispatch to resume (a late container locked)", interval=0.02)
    resumed = time.monotonic() - t_up
    print(f"outage {t_up - t_down:.1f}s (PollInterval {POLL:g}s): dispatch resumed {resumed:.2f}s after")
    assert resumed <= POLL + 0.5, resumed  # one PollInterval, plus a pass and a lock call
    wait_for(lambda: all(r["state"] == "Complete" for r in c.containers(running + late).values()), 60,
             "every container to complete", interval=0.2)
    recs = c.containers(running + late)
    assert all(r["exit_code"] == 0 for r in recs.values())
    assert all(c.runs(i) == 1 for i in (0, 1, 10, 11))
    assert set(vms_before) <= {p.name for p in c.vm_dirs()}  # the VMs outlived the outage
    during = c.log_lines()[lines_before:]
    assert not [ln for ln in during if ln.get("msg") in ("shutting down", "cancelling container")
                or "Cancel" in str(ln.get("msg", ""))], during
    assert c.stop() == 0
    no_secrets_logged(c)


def test_1100_descriptors_held_the_api_answers_and_a_vm_runs_a_container(cluster, tmp_path):
    held = []
    try:
        devnull = os.open(os.devnull, os.O_RDONLY)
        held = [os.dup(devnull) for _ in range(1100)]
        os.close(devnull)
        assert max(held) > 1100
        c = cluster(max_instances=1, vcpus=1, idle="2s", extra_fds=held)
        c.start()
        assert c.mgmt_get("/arvados/v1/dispatch/instances") == {"items": []}
        uuid = c.submit(0, seconds=0)
        wait_for(lambda: c.containers([uuid])[uuid]["state"] == "Complete", 60, "the container", interval=0.2)
        assert c.containers([uuid])[uuid]["exit_code"] == 0 and c.runs(0) == 1
        r = requests.get(c.mgmt + "/metrics", headers={"Authorization": "Bearer " + c.mgmt_token}, timeout=5)
        assert r.status_code == 200 and "dispatchcloud" in r.text
        assert c.mgmt_get("/_health/ping") == {"health": "OK"}
        wait_for(lambda: not c.vm_dirs(), 30, "the VM to be shut down")
        assert c.stop() == 0
        lines = c.log_lines()
        limit = [ln for ln in lines if ln.get("msg") == "open file limit"]
        assert limit and limit[0]["RLIMIT_NOFILE"] > 1200
        assert not [ln for ln in lines if "filedescriptor out of range" in str(ln)]
        no_secrets_logged(c)
    finally:
        for fd in held:
            os.close(fd)


def test_the_service_raises_its_open_file_limit_and_says_so():
    code = ("import resource, logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stdout, "
            "format='%(message)s %(RLIMIT_NOFILE)s'); "
            "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE); "
            "resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard)); "
            "from actors.fdlimit import raise_nofile_limit; n = raise_nofile_limit(); "
            "assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == n == hard, (n, hard)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == f"open file limit {resource.getrlimit(resource.RLIMIT_NOFILE)[1]}"


def test_out_of_descriptors_is_a_logged_probe_failure_not_a_crash():
    """With no descriptor left, an SSH connect fails as an ExecutorError (what a probe handles)
    and the log says why. In a subprocess: it exhausts its own descriptors."""
    code = """
import logging, os, resource, sys
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(levelname)s %(message)s")
from cloud import base, ssh
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
pem = ed25519.Ed25519PrivateKey.generate().private_bytes(serialization.Encoding.PEM,
      serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()).decode()
class T:
    id = "i-1"; address = "127.0.0.1:1"; remote_user = "root"
ex = ssh.SSHExecutor(T(), private_key=ssh.load_private_key(pem), connect_timeout=1)
resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
held = []
try:
    while True:
        held.append(os.open(os.devnull, os.O_RDONLY))
except OSError:
    pass
try:
    ex.execute("true")
except base.ExecutorError as e:
    print("EXECUTOR-ERROR", type(e).__name__, e)
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert p.returncode == 0, p.stderr
    assert "EXECUTOR-ERROR ConnectError ssh 127.0.0.1:1: cannot connect: Too many open files" in p.stdout, p.stdout
    assert "ERROR out of file descriptors: cannot open an SSH connection" in p.stdout
