"""DeployRunnerBinary as Go does it: md5sum on the VM, upload when missing, then that path is the
runner command. Against a real OpenSSH sshd, then end to end through the local driver."""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import replace
from unittest.mock import Mock

import pytest

from actors.messages import Behavior, InstanceInfo, State
from actors.worker import WorkerActor
from cloud import crunchrun, runner_deploy, ssh
from cloud.local import vm as localvm
from tests.simcluster import cluster, instance_type, with_vms
from tests.sshd import sshd, sshd_factory  # noqa: F401  (fixtures)
from tests.test_local import ROOT, env, run_one_container  # noqa: F401  (env: fixture)
from tests.test_ssh import Target, accept
from tests.test_worker import ZeroJitter, entry

T0 = 1_700_000_000.0


@pytest.fixture
def binary(tmp_path):
    """A crunch-run stand-in that says which file it is: --list prints nothing, --detach works."""
    path = tmp_path / "src" / "crunch-run"
    path.parent.mkdir()
    path.write_text("#!/bin/sh\necho \"$0 $*\" >>\"$(dirname \"$0\")/calls\"\nexit 0\n")
    return path


def _worker(server, binary, deploy_dir, state=State.BOOTING):
    ex = ssh.SSHExecutor(Target(server.address, verify=accept), private_key=server.client_key,
                         connect_timeout=3, auth_timeout=3, command_timeout=5)
    cl = with_vms(cluster(), boot_probe_command="true", deploy_runner_binary=str(binary),
                  deploy_runner_directory=str(deploy_dir))
    cl = replace(cl, containers=replace(cl.containers, crunch_run_command="/nonexistent/crunch-run"))
    info = InstanceInfo(id="i-1", address=server.address, provider_type="providertype1", remote_user="root",
                        tags={}, handle=object())
    w = WorkerActor(instance=info, instance_type=instance_type(1), state=state, behavior=Behavior.RUN,
                    now=T0, executor_factory=lambda on_verified: ex, scheduler=Mock(), instance_set=Mock(),
                    ticker=Mock(), cluster=cl, rng=ZeroJitter())
    return w, ex


def test_commands_match_go():
    path = "/tmp/arvados-crunch-run/crunch-run~9dd4e461268c8034f5c8564e155c67a6"
    assert crunchrun.runner_md5sum_command(path) == "md5sum " + path
    assert crunchrun.runner_install_command(path, sudo=False) == (
        f'set -e; dstdir="/tmp/arvados-crunch-run/"; dstfile="{path}"; '
        'mkdir -p "$dstdir"; touch "$dstfile"; chmod 0755 "$dstdir" "$dstfile"; cat >"$dstfile"')
    assert crunchrun.runner_install_command(path, sudo=True).startswith("sudo sh -c 'set -e; dstdir=")
    assert crunchrun.runner_installed("9dd4e461268c8034f5c8564e155c67a6", path,
                                      f"9dd4e461268c8034f5c8564e155c67a6  {path}\n".encode(), b"", 0)
    assert runner_deploy.deploy_source("/proc/self/exe") == "" and runner_deploy.deploy_source("") == ""


def test_worker_installs_the_binary_once_and_runs_it(sshd, binary, tmp_path):
    deploy = tmp_path / "deploy"
    md5 = hashlib.md5(binary.read_bytes()).hexdigest()
    installed = deploy / f"crunch-run~{md5}"
    w, ex = _worker(sshd, binary, deploy)
    try:
        w._probe(T0 + 1)
        assert w.view.state is State.IDLE
        assert installed.read_bytes() == binary.read_bytes()
        assert installed.stat().st_mode & 0o777 == 0o755
        cmds = [r.command for r in sshd.received()]
        assert f"md5sum {installed}" in cmds
        assert any(c.startswith(f"{installed} --list") for c in cmds)
        w.start_container(entry(), T0 + 2)
        assert any(c.startswith(f"{installed} --detach --stdin-config") for c in
                   (r.command for r in sshd.received()))
        assert (deploy / "calls").read_text().count(str(installed)) == 2  # --list, --detach
    finally:
        ex.close()
    # another worker on the same VM (a restarted dispatcher adopting it): md5sum matches, no upload
    uploads = sum("cat >" in r.command for r in sshd.received())
    w2, ex2 = _worker(sshd, binary, deploy, state=State.UNKNOWN)
    try:
        w2._probe(T0 + 3)
        assert sum("cat >" in r.command for r in sshd.received()) == uploads == 1
        assert w2.view.state is State.IDLE
    finally:
        ex2.close()


def test_a_failed_upload_fails_the_boot_probe(sshd, binary, tmp_path):
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("")
    w, ex = _worker(sshd, binary, blocker / "deploy")  # mkdir -p fails under a regular file
    try:
        w._probe(T0 + 1)
        assert w.view.state is State.BOOTING
    finally:
        ex.close()


def test_dispatcher_deploys_the_runner_to_a_local_openssh_vm_and_runs_a_container(env, tmp_path):  # noqa: F811
    if not os.access(localvm.SSHD, os.X_OK):
        pytest.skip("OpenSSH sshd not installed (make sysdeps)")
    runner = tmp_path / "crunch-run"  # our crunch-run compatible runner, as the file to deploy
    runner.write_bytes((ROOT / ".venv" / "bin" / "dispatch-cloud-crunch-run").read_bytes()
                       if (ROOT / ".venv" / "bin" / "dispatch-cloud-crunch-run").exists()
                       else f"#!{sys.executable}\nfrom cloud.local.runner import main\nmain()\n".encode())
    md5 = hashlib.md5(runner.read_bytes()).hexdigest()
    deploy = tmp_path / "deploy"

    def edit(text: str) -> str:
        changes = [
            ("      CrunchRunCommand: dispatch-cloud-crunch-run\n", "      CrunchRunCommand: /nonexistent/crunch-run\n"),
            ("        Driver: local\n", f"        Driver: local\n        DeployRunnerBinary: {runner}\n"
                                      f"        DeployRunnerDirectory: {deploy}\n"),
            ("          BootDelay: 0s\n", "          BootDelay: 0s\n          SSHServer: openssh\n"),
            # --list starts a Python runner through a fresh OpenSSH session: give it 1.6 s, not 0.4
            ("        ProbeInterval: 0.5s\n", "        ProbeInterval: 2s\n"),
            ("        TimeoutIdle: 1s\n", "        TimeoutIdle: 30s\n"),
        ]
        for old, new in changes:  # a key that moved in E2E_CONFIG must fail here, not go unset
            assert old in text, f"E2E_CONFIG no longer has {old!r}"
            text = text.replace(old, new)
        return text
    done, proc, _ = run_one_container(env, tmp_path, edit=edit, timeout=40)
    assert (done["state"], done["exit_code"]) == ("Complete", 6), proc.text()[-3000:]
    installed = deploy / f"crunch-run~{md5}"
    assert installed.read_bytes() == runner.read_bytes()
    text = proc.text()
    assert "installing runner binary on worker" in text
    assert "/nonexistent/crunch-run" not in text.replace("CrunchRunCommand", "")
