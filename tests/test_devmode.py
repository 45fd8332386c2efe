"""The embedded dev cluster end to end, as a user drives it: `dispatch-cloud run` as a
subprocess, containers submitted through the CLI, instances held and drained through the CLI,
the dispatcher SIGKILLed mid-run and restarted. Real processes, real SSH, real HTTP (all on
loopback); bounded polling, no fixed sleeps."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from actors.devmode import CLUSTER_ID, ensure_state
from tests.util import free_port, stop_process, wait_for

REPO = Path(__file__).resolve().parents[1]


def cli(env, *args, timeout=60, check=True):
    p = subprocess.run([sys.executable, "-m", "actors.cli", *args], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{args}: rc={p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


class Dev:
    def __init__(self, tmp: Path):
        self.state = tmp / "state"
        self.cfg = ensure_state(self.state / "dev")
        doc = yaml.safe_load(self.cfg.read_text())
        c = doc["Clusters"][CLUSTER_ID]
        api, mgmt = free_port(), free_port()
        c["Services"]["Controller"]["ExternalURL"] = f"http://127.0.0.1:{api}"
        c["Services"]["DispatchCloud"]["InternalURLs"] = {f"http://127.0.0.1:{mgmt}": {}}
        vms = c["Containers"]["CloudVMs"]
        vms["DriverParameters"]["AddressBase"] = "127.0.%d.2" % (10 + os.getpid() % 200)
        vms["SSHPort"] = str(free_port())
        vms["TimeoutIdle"] = "8s"
        vms["ProbeInterval"] = "1s"
        vms["SyncInterval"] = "2s"
        self.cfg.write_text(yaml.safe_dump(doc))
        self.env = {**os.environ, "DISPATCH_CLOUD_STATE": str(self.state),
                    "PYTHONPATH": str(REPO), "ARVADOS_CONFIG": str(tmp / "no-such-config.yml")}
        self.proc = None
        self.log = tmp / "dispatcher.log"

    def start(self):
        self.proc = subprocess.Popen([sys.executable, "-m", "actors.cli", "run"], env=self.env, cwd=REPO,
                                     stdout=subprocess.DEVNULL, stderr=open(self.log, "ab"))
        wait_for(lambda: cli(self.env, "instance", "list", check=False).returncode == 0, 30,
                 "the management API")

    def instances(self) -> list[list[str]]:
        out = cli(self.env, "instance", "list").stdout
        return [line.split("\t") for line in out.splitlines() if line.strip()]

    def vm_dirs(self) -> list[Path]:
        d = self.state / "dev" / "local"
        return [p for p in d.iterdir() if p.is_dir()] if d.exists() else []

    def stop(self, sig=signal.SIGINT):
        stop_process(self.proc, sig)


@pytest.fixture
def dev(tmp_path):
    d = Dev(tmp_path)
    yield d
    d.stop(signal.SIGINT)
    if d.vm_dirs():  # a failed test may leave VMs: clean them up by the driver, by pid
        from cloud.local import driver as local
        from conf.loader import load
        cluster = load(str(d.cfg))
        iset = local.driver(cluster.cloud_vms.driver_parameters, "cleanup", cluster=cluster)
        for inst in iset.instances({}):
            inst.destroy()


def submit(dev, *args, wait=False):
    cmd = ["submit", *(["--wait"] if wait else []), *args]
    return cli(dev.env, *cmd, timeout=180, check=not wait)


def container(dev, uuid):
    from api.arvados.client import ArvadosClient
    from cloud.crunchrun import api_host
    from conf.loader import load
    c = load(str(dev.cfg))
    return ArvadosClient(api_host(c.controller_url), c.system_root_token).get_container(uuid)


def test_dev_cluster_end_to_end(dev, tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    dev.start()
    # two sizes, with output and exit codes, through the CLI
    p = submit(dev, "--vcpus", "1", "--ram", "256MiB", "--", "sh", "-c", "echo small-out; exit 0", wait=True)
    assert p.returncode == 0 and "small-out" in p.stdout and "Complete" in p.stderr
    # hold the small one now: booting the medium one may take longer than TimeoutIdle (8 s)
    small = next(r[0] for r in dev.instances() if r[4] == "small")
    cli(dev.env, "instance", "hold", small)
    p = submit(dev, "--vcpus", "2", "--ram", "1GiB", "--", "sh", "-c", "echo big-err >&2; exit 3", wait=True)
    assert p.returncode == 3 and "big-err" in p.stderr and "exit code 3" in p.stderr
    rows = dev.instances()
    assert {r[4] for r in rows} == {"small", "medium"}  # config-type column
    assert all(r[2] in ("idle", "running", "booting") for r in rows)

    # drain the medium one
    medium = next(r[0] for r in rows if r[4] == "medium")
    cli(dev.env, "instance", "drain", medium)
    wait_for(lambda: medium not in [r[0] for r in dev.instances()], 30, "the drained instance to go")
    # the held one outlives TimeoutIdle (8 s) and gets nothing new
    u = submit(dev, "--", "sh", "-c", "echo x").stdout.strip()
    wait_for(lambda: container(dev, u)["state"] == "Complete", 60, "a container on a new instance")
    rows = {r[0]: r for r in dev.instances()}
    assert rows[small][3] == "hold" and rows[small][7] == "-"
    assert container(dev, u)["runtime_status"]["stdoutPath"]

    # long containers, then SIGKILL the dispatcher mid-run and start a new one
    uuids = [submit(dev, "--", "sh", "-c", f"echo ran >> {marks}/{i}; sleep 6").stdout.strip() for i in range(3)]
    wait_for(lambda: all(container(dev, x)["state"] == "Running" for x in uuids), 120, "containers running")  # three VMs boot: slow under load
    before = {r[0] for r in dev.instances()}
    dev.proc.kill()
    dev.proc.wait(10)
    assert {p.name for p in dev.vm_dirs()} >= {b for b in before}  # the VMs outlive the dispatcher
    dev.start()
    wait_for(lambda: all(container(dev, x)["state"] == "Complete" for x in uuids), 90, "adopted containers")
    for i in range(3):  # every container ran exactly once
        assert (marks / str(i)).read_text() == "ran\n"
    assert all(container(dev, x)["lock_count"] == 1 for x in uuids)
    # release the held instance; once idle, every instance goes: nothing lost, nothing leaked
    cli(dev.env, "instance", "run", small)
    wait_for(lambda: not dev.instances(), 60, "all instances to shut down")
    wait_for(lambda: not dev.vm_dirs(), 30, "the VM state dirs to be removed")
    dev.stop(signal.SIGINT)
    assert dev.proc.returncode == 0
