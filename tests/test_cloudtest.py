"""``dispatch-cloud cloudtest`` as a real subprocess: stub driver in real time, and the local driver."""

from __future__ import annotations

import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

CONFIG = """\
Clusters:
  zzzzz:
    SystemRootToken: xyzzy
    ManagementToken: mgmt
    Services:
      Controller:
        ExternalURL: https://127.0.0.1:1
    Containers:
      DispatchPrivateKey: {key}
      CloudVMs:
        Driver: {driver}
        ImageID: test-image
        BootProbeCommand: "true"
        SSHPort: "{ssh_port}"
        ProbeInterval: 0.2s
        TimeoutBooting: {timeout_booting}
        TimeoutShutdown: 1s
        SyncInterval: 0.2s
        ResourceTags:
          team: tests
        DriverParameters:
{params}
    InstanceTypes:
      small:
        ProviderType: {ptype}
        VCPUs: 1
        RAM: 1GiB
        IncludedScratch: 1GB
        Price: 0.1
      bigger:
        ProviderType: {ptype}
        VCPUs: 2
        RAM: 2GiB
        IncludedScratch: 1GB
        Price: 0.2
"""


def write_config(tmp_path, *, driver="stub", params=None, timeout_booting="10s", ptype="s1", key='""',
                 ssh_port="22"):
    params = params if params is not None else {"BootTime": "0.3s", "BootTimeJitter": "0s"}
    if key == '""' and driver != "stub":  # SSH drivers need the dispatcher's key (check-config says so)
        from tests.sshd import _new_key_pem
        key = "|\n" + "".join(f"        {line}\n" for line in _new_key_pem().splitlines()).rstrip("\n")
    lines = "\n".join(f"          {k}: {v}" for k, v in params.items()) or "          {}"
    path = tmp_path / "config.yml"
    path.write_text(CONFIG.format(driver=driver, params=lines, timeout_booting=timeout_booting,
                                  ptype=ptype, key=key, ssh_port=ssh_port))
    return path


class Proc:
    """A cloudtest subprocess whose stdout lines arrive on a queue (read by a thread)."""

    def __init__(self, *args, env=None):
        self.p = subprocess.Popen([sys.executable, "-m", "actors.cli", "cloudtest", *args], cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
        self.lines: list[str] = []
        self._q: queue.Queue = queue.Queue()
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()
        self.stderr = ""

    def _read(self):
        for line in self.p.stdout:
            self._q.put(line.rstrip("\n"))
        self._q.put(None)

    def wait_line(self, prefix: str, timeout: float = 20) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._q.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            self.lines.append(line)
            if line.startswith(prefix):
                return line
        raise AssertionError(f"no line starting {prefix!r} within {timeout}s; got {self.lines}")

    def finish(self, timeout: float = 30) -> int:
        try:
            rc = self.p.wait(timeout)
        finally:
            if self.p.poll() is None:
                self.p.kill()
                self.p.wait(5)
        self._t.join(5)
        while True:
            try:
                line = self._q.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self.lines.append(line)
        self.stderr = self.p.stderr.read()
        self.p.stderr.close()
        return rc

    @property
    def out(self) -> str:
        return "\n".join(self.lines)


def steps(out: str) -> list[str]:
    return [line.split(" (")[0] for line in out.splitlines() if line.startswith("[")]


def run_to_end(*args, timeout=30):
    p = Proc(*args)
    rc = p.finish(timeout)
    return rc, p.out, p.stderr


# --- stub driver, real time -----------------------------------------------------------------


def test_happy_path_runs_every_step_and_destroys(tmp_path):
    cfg = write_config(tmp_path)
    rc, out, err = run_to_end("--config", str(cfg), "--command", "true")
    assert rc == 0, out + err
    assert steps(out) == ["[ok] initialize cloud driver", "[ok] check for existing instances",
                          "[ok] create instance", "[ok] instance listed with its tags", "[ok] boot probe",
                          "[ok] run command 'true'", "[ok] destroy instance"]
    assert "inst1,s1 is gone" in out
    assert "  created inst1,s1 (small, s1)" in out  # the cheapest type by default
    assert "Traceback" not in err


def test_named_instance_type_and_failed_command(tmp_path):
    cfg = write_config(tmp_path)
    rc, out, _ = run_to_end("--config", str(cfg), "--instance-type", "bigger", "--command", "no-such-cmd")
    assert rc == 1
    assert "  created inst1,s1 (bigger, s1)" in out
    assert "[FAIL] run command 'no-such-cmd'" in out and "command not found" in out
    assert "[ok] destroy instance" in out


def test_failing_boot_probe_still_destroys(tmp_path):
    cfg = write_config(tmp_path, params={"BootTime": "1h"}, timeout_booting="1s")
    rc, out, err = run_to_end("--config", str(cfg))
    assert rc == 1, out + err
    fail = [line for line in out.splitlines() if line.startswith("[FAIL] boot probe")]
    assert fail and "did not succeed within TimeoutBooting (1s)" in fail[0] and "stub is booting" in fail[0]
    assert steps(out)[-1] == "[ok] destroy instance"
    assert "inst1,s1 is gone" in out  # the absence check: a fresh listing no longer has it


def test_sigint_while_waiting_for_boot_destroys(tmp_path):
    cfg = write_config(tmp_path, params={"BootTime": "1h"}, timeout_booting="5m")
    p = Proc("--config", str(cfg))
    p.wait_line("[ok] instance listed with its tags")
    time.sleep(0.3)  # let it get into the boot-probe wait (the signal is the point of the test)
    p.p.send_signal(signal.SIGINT)
    rc = p.finish(30)
    assert rc == 130, p.out + p.stderr
    assert "[FAIL] interrupted by SIGINT: cleaning up" in p.out
    assert steps(p.out)[-1] == "[ok] destroy instance" and "inst1,s1 is gone" in p.out
    assert "Traceback" not in p.stderr


def test_sigterm_destroys_too(tmp_path):
    cfg = write_config(tmp_path, params={"BootTime": "1h"}, timeout_booting="5m")
    p = Proc("--config", str(cfg))
    p.wait_line("[ok] create instance")
    p.p.send_signal(signal.SIGTERM)
    assert p.finish(30) == 128 + signal.SIGTERM
    assert "inst1,s1 is gone" in p.out


def test_create_failure_is_reported(tmp_path):
    cfg = write_config(tmp_path, params={"ErrorRateCreate": 1}, timeout_booting="1s")
    rc, out, _ = run_to_end("--config", str(cfg))
    assert rc == 1
    assert any(line.startswith("[FAIL] create instance") and "ErrorRateCreate" in line for line in out.splitlines())
    assert "destroy instance" not in out  # nothing was created


@pytest.mark.parametrize("args,message", [
    (["--config", "/nonexistent/config.yml"], "/nonexistent/config.yml: no such file"),
    (["--instance-type", "huge"], "--instance-type 'huge': not in InstanceTypes (have: bigger, small)"),
])
def test_bad_input_is_one_clear_line(tmp_path, args, message):
    cfg = write_config(tmp_path)
    rc, out, err = run_to_end(*(["--config", str(cfg)] if "--config" not in args else []), *args)
    assert rc == 1 and message in err and "Traceback" not in err and out == ""


# --- local driver: state on disk, so the absence check is external --------------------------


def _local_setup(tmp_path, **kw):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519
    pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()).decode()
    key = "|\n" + "".join(f"        {line}\n" for line in pem.splitlines())
    state = tmp_path / "state"
    base = f"127.{random.randint(100, 250)}.{random.randint(0, 250)}.2"
    cfg = write_config(tmp_path, driver="local", ptype="local", key=key.rstrip("\n"),
                       params={"StateDir": str(state), "AddressBase": base, **kw})
    return cfg, state


def _vm_dirs(state: Path) -> list[Path]:
    return [d for d in state.iterdir() if d.is_dir()] if state.exists() else []


def test_local_driver_end_to_end_over_ssh(tmp_path):
    cfg, state = _local_setup(tmp_path, BootDelay="0s")
    rc, out, err = run_to_end("--config", str(cfg), "--command", "echo on-$(hostname) $CRUNCH_RUN_LOCKDIR")
    assert rc == 0, out + err
    assert "[ok] boot probe" in out and "  login: ssh -p2222 " in out
    assert "[ok] run command 'echo on-$(hostname) $CRUNCH_RUN_LOCKDIR'" in out
    # The command ran on the VM: its lock dir is the instance's own, under the state dir.
    ran = [line for line in out.splitlines() if line.startswith("on-")]
    assert len(ran) == 1 and ran[0].endswith("/lock") and str(state) in ran[0], out
    assert _vm_dirs(state) == []


def test_local_existing_instances_refused_then_destroyed(tmp_path):
    from cloud.clock import SystemClock
    from cloud.local import driver as local
    from conf.loader import load
    cfg, state = _local_setup(tmp_path, BootDelay="1h")
    cluster = load(str(cfg))
    s = local.driver(cluster.cloud_vms.driver_parameters, "x", cluster=cluster, clock=SystemClock())
    it = cluster.instance_types["small"]
    try:
        s.create(it, "img", {"ArvadosInstanceSetID": "zzzzz-zzzzz-zzzzzzcloudtest"}, "", None)
        rc, out, _ = run_to_end("--config", str(cfg))
        assert rc == 1 and "already exist" in out and len(_vm_dirs(state)) == 1
        p = Proc("--config", str(cfg), "--destroy-existing")
        p.wait_line("[ok] check for existing instances")
        p.wait_line("[ok] create instance")
        p.p.send_signal(signal.SIGINT)  # mid boot wait (BootDelay 1h)
        assert p.finish(30) == 130, p.out + p.stderr
        assert "destroying existing instance" in p.out and "[ok] destroy instance" in p.out
        assert _vm_dirs(state) == []  # nothing left on the "cloud"
    finally:
        for inst in s.instances({}):
            inst.destroy()


# --- azure driver through the SDK, against the fake ARM in this process ----------------------


def test_azure_create_tags_and_destroy_with_unreachable_vm(tmp_path):
    """The VM never answers SSH (there is none); cloudtest still reports and destroys it in ARM."""
    from tests.fakearm import FakeArm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519
    keyfile = tmp_path / "dispatch.key"  # the azure driver needs a key to deploy (check_params)
    keyfile.write_bytes(ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    keyfile.chmod(0o600)
    with FakeArm(polls=0, lro_retry_after="1", ip_prefix="127.0.0") as arm:
        cfg = write_config(tmp_path, driver="azure", ptype="Standard_D2s_v3", timeout_booting="1s", ssh_port="1",
                           key=f"file://{keyfile}",
                           params={"SubscriptionID": "sub", "ResourceGroup": "rg", "Network": "vnet",
                                   "Subnet": "default", "ResourceManagerEndpoint": arm.url})
        rc, out, err = run_to_end("--config", str(cfg), "--image-id", "other-image")
        assert rc == 1, out + err
        assert "[ok] create instance" in out, out + err
        assert steps(out) == ["[ok] initialize cloud driver", "[ok] check for existing instances",
                              "[ok] create instance", "[ok] instance listed with its tags", "[FAIL] boot probe",
                              "[ok] destroy instance"]
        vm = arm.sent("PUT", "virtualMachines")[0].body
        assert vm["properties"]["storageProfile"]["imageReference"]["id"].endswith("/images/other-image")
        assert vm["tags"]["ArvadosInstanceSetID"] == "zzzzz-zzzzz-zzzzzzcloudtest"
        assert vm["tags"]["team"] == "tests" and vm["tags"]["ArvadosCloudTestPID"].isdigit()
        assert len(vm["tags"]["ArvadosInstanceSecret"]) == 40 and "created-at" in vm["tags"]
        assert arm.of_kind("virtualMachines") == []  # destroyed in the "cloud" itself
        assert len(arm.sent("DELETE", "virtualMachines")) >= 1
        assert "ClientSecret" not in err and vm["tags"]["ArvadosInstanceSecret"] not in err


# --- ec2 driver through boto3, against moto's server (behind the proxy, in this process) -------


def test_ec2_create_tags_and_destroy_with_unreachable_vm(tmp_path, ec2_endpoint):
    """No SSH is possible to a moto instance; cloudtest still checks tags and terminates it in EC2."""
    from tests.ec2fake import ACCESS_KEY, REGION, SECRET_KEY
    moto, proxy = ec2_endpoint
    cfg = write_config(tmp_path, driver="ec2", ptype="t3.micro", timeout_booting="1s", ssh_port="1",
                       params={"AccessKeyID": ACCESS_KEY, "SecretAccessKey": SECRET_KEY, "Region": REGION,
                               "EndpointURL": proxy.url})
    rc, out, err = run_to_end("--config", str(cfg), "--image-id", "ami-12c6146b")
    assert rc == 1, out + err
    assert steps(out) == ["[ok] initialize cloud driver", "[ok] check for existing instances",
                          "[ok] create instance", "[ok] instance listed with its tags", "[FAIL] boot probe",
                          "[ok] destroy instance"]
    [run] = proxy.calls("RunInstances")
    sent = {run.params[k]: run.params[k.replace(".Key", ".Value")] for k in run.params
            if k.startswith("TagSpecification.1.Tag.") and k.endswith(".Key")}
    assert run.params["ImageId"] == "ami-12c6146b"
    assert sent["ArvadosInstanceSetID"] == "zzzzz-zzzzz-zzzzzzcloudtest"
    assert sent["team"] == "tests" and sent["ArvadosCloudTestPID"].isdigit() and len(sent["ArvadosInstanceSecret"]) == 40
    [term] = proxy.calls("TerminateInstances")
    [inst] = [i for r in moto.client().describe_instances()["Reservations"] for i in r["Instances"]]
    assert term.params["InstanceId.1"] == inst["InstanceId"] and inst["State"]["Name"] == "terminated"
    assert SECRET_KEY not in out + err and sent["ArvadosInstanceSecret"] not in err
