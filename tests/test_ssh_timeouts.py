"""Per-command SSH deadlines against a real OpenSSH sshd: a boot probe that legitimately waits
(``cloud-init status --wait``) and a slow ``--detach``/``--kill`` are not cut off by the short
deadline that keeps ``--list`` probes below ProbeInterval."""

from __future__ import annotations

import os
import time
from dataclasses import replace
from unittest.mock import Mock

import pytest

from actors.messages import Behavior, InstanceInfo, State
from actors.worker import WorkerActor
from cloud import ssh
from tests.simcluster import cluster, instance_type, with_vms
from tests.sshd import sshd, sshd_factory  # noqa: F401  (fixtures)
from tests.test_ssh import Target, accept
from tests.test_worker import FakeExecutor, OK, ZeroJitter, entry

T0 = 1_700_000_000.0
SHORT = 0.8  # what executor_for gives a ProbeInterval of 1 s
SLOW = 2.0   # seconds the slow commands take: well past SHORT


@pytest.fixture
def runner(tmp_path):
    """A crunch-run stand-in: --detach and --kill take SLOW seconds, --list answers at once."""
    path = tmp_path / "crunch-run"
    path.write_text(f"#!/bin/sh\ncase \"$1\" in --detach|--kill) sleep {SLOW}; exit 0;; esac\nexit 0\n")
    path.chmod(0o755)
    os.chmod(tmp_path, 0o755)
    return str(path)


def _worker(ex, runner_cmd: str, state: State, boot_probe: str = "true"):
    cl = with_vms(cluster(), boot_probe_command=boot_probe, probe_interval=1.0, timeout_booting=600.0)
    cl = replace(cl, containers=replace(cl.containers, crunch_run_command=runner_cmd))
    info = InstanceInfo(id="i-1", address=ex._target.address, provider_type="providertype1",
                        remote_user="root", tags={}, handle=object())
    return WorkerActor(instance=info, instance_type=instance_type(1), state=state, behavior=Behavior.RUN,
                       now=T0, executor_factory=lambda on_verified: ex, scheduler=Mock(),
                       instance_set=Mock(), ticker=Mock(), cluster=cl, rng=ZeroJitter())


def _executor(server):
    return ssh.SSHExecutor(Target(server.address, verify=accept), private_key=server.client_key,
                           connect_timeout=3, auth_timeout=3, command_timeout=SHORT)


def test_executor_takes_a_deadline_per_command(sshd):
    ex = _executor(sshd)
    try:
        with pytest.raises(ssh.CommandTimeout):
            ex.execute(f"sleep {SLOW}")
        assert ex.execute(f"sleep {SLOW}; echo done", timeout=SLOW + 5).stdout == b"done\n"
    finally:
        ex.close()


def test_waiting_boot_probe_succeeds_and_list_keeps_the_short_deadline(sshd, runner):
    ex = _executor(sshd)
    w = _worker(ex, runner, State.BOOTING, boot_probe=f"sleep {SLOW}; true")
    try:
        t0 = time.monotonic()
        w._probe(T0 + 1)
        assert time.monotonic() - t0 >= SLOW
        assert w.view.state is State.IDLE  # booted: the probe was allowed to wait
        assert ex.connects == 1  # and no deadline hung up the connection
    finally:
        ex.close()


def test_slow_detach_and_kill_complete_on_the_same_connection(sshd, runner):
    ex = _executor(sshd)
    w = _worker(ex, runner, State.IDLE)
    try:
        w.start_container(entry(), T0)
        cmds = [r.command for r in sshd.received()]
        assert any("--detach" in c for c in cmds)
        w.kill_container(entry().uuid, "test", T0 + 1)
        assert entry().uuid not in w.view.running  # the kill's exit 0 was seen: it did not time out
        assert ex.connects == 1
    finally:
        ex.close()


def test_worker_passes_each_command_its_deadline():
    ex = FakeExecutor({"bootprobe": OK, "crunch-run --list": OK, "crunch-run --detach": OK,
                       "crunch-run --kill": OK})
    cl = with_vms(cluster(), boot_probe_command="bootprobe", timeout_booting=600.0, probe_interval=10.0)
    info = InstanceInfo(id="i-1", address="10.0.0.1", provider_type="p", remote_user="root", tags={},
                        handle=object())
    w = WorkerActor(instance=info, instance_type=instance_type(1), state=State.BOOTING,
                    behavior=Behavior.RUN, now=T0, executor_factory=lambda cb: ex, scheduler=Mock(),
                    instance_set=Mock(), ticker=Mock(), cluster=cl, rng=ZeroJitter())
    w._now = T0 + 100
    w._probe(T0 + 100)
    w.start_container(entry(), T0 + 101)
    w.kill_container(entry().uuid, "test", T0 + 102)
    by_cmd = {c.split(" --")[0] if " --" not in c else "crunch-run --" + c.split(" --")[1].split()[0]: t
              for c, t in zip(ex.calls, ex.timeouts)}
    assert by_cmd["bootprobe"] == pytest.approx(500.0)  # what is left of TimeoutBooting
    assert by_cmd["crunch-run --list"] is None  # the executor's short default
    assert by_cmd["crunch-run --detach"] == ssh.LONG_COMMAND_TIMEOUT
    assert by_cmd["crunch-run --kill"] == ssh.LONG_COMMAND_TIMEOUT
