"""Real ``dispatch-cloud`` processes for tests, and what they run against.

The parts (each used by the process-level tests on every driver: stub, local, ec2):

* :class:`LoopbackApi`: the SQLite container API server on 127.0.0.1 in the test process, with an
  admin token (a test can stop it, restart it on the same port, and read the store directly);
* :class:`RunProcess`: ``dispatch-cloud run --config`` as a child, stderr to a log file, its lock
  file in a state directory of the test's own (DISPATCH_CLOUD_STATE), stopped by pid;
* :func:`dispatch_cli`: any other ``dispatch-cloud`` command, run to completion;
* :func:`dispatch_key`: a fresh DispatchPrivateKey file.

:class:`Cluster` puts them together on the local driver for the guarantee tests.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

import requests
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from actors.devmode import crunch_run_path
from api.arvados.server import serve
from api.arvados.store import ContainerStore
from tests.util import free_port, stop_process, wait_for

REPO = Path(__file__).resolve().parents[1]


def dispatch_key(path: Path) -> str:
    """A fresh ed25519 DispatchPrivateKey written to ``path`` (mode 0600); returns the PEM."""
    pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()).decode()
    path.write_text(pem)
    path.chmod(0o600)
    return pem


class LoopbackApi:
    """The SQLite container API server on 127.0.0.1, with ``token`` as an admin token."""

    def __init__(self, token: str, db: str | Path = ":memory:", *, cluster_id: str = "zzzzz", **store_kw):
        self.store = ContainerStore(str(db), cluster_id=cluster_id, **store_kw)
        self.store.add_token(token, admin=True)
        self.admin = self.store.authenticate(token)
        self.server = serve(self.store, "127.0.0.1", 0)
        self.port = self.server.port
        self.url = self.server.url

    def create(self, fields: dict) -> str:
        """A Queued container (image and command defaulted); its uuid."""
        return self.store.create({"container_image": "img", "command": ["true"], **fields}, caller=self.admin)["uuid"]

    def get(self, uuid: str) -> dict:
        return self.store.get(uuid, caller=self.admin)

    def stop(self) -> None:
        """Connections refused from now on (an outage); :meth:`restart` ends it."""
        self.server.stop()

    def restart(self) -> None:
        self.server = serve(self.store, "127.0.0.1", self.port)

    def close(self) -> None:
        self.server.stop()
        self.store.close()


def stub_site(api_url: str, mgmt_url: str, token: str, mgmt_token: str, **vms) -> dict:
    """A cluster config on the stub cloud, quick to boot and run (CloudVMs keys in ``vms`` win),
    with a 1-VCPU ``small`` and a 4-VCPU ``big`` type."""
    return {"Clusters": {"zzzzz": {
        "SystemRootToken": token, "ManagementToken": mgmt_token,
        "Services": {"Controller": {"ExternalURL": api_url}, "DispatchCloud": {"InternalURLs": {mgmt_url: {}}}},
        "Containers": {"ReserveExtraRAM": 0, "LocalKeepBlobBuffersPerVCPU": 0, "CloudVMs": {
            "Driver": "stub", "BootProbeCommand": "true", "PollInterval": "1s", "ProbeInterval": "1s",
            "SyncInterval": "2s", "TimeoutIdle": "3s",
            "DriverParameters": {"BootTime": "1s", "BootTimeJitter": "0s", "ContainerRunTime": "2s"}, **vms}},
        "InstanceTypes": {"small": {"VCPUs": 1, "RAM": "1GiB", "Price": 0.1},
                          "big": {"VCPUs": 4, "RAM": "4GiB", "Price": 0.4}},
    }}}


def _env(state: Path, env: dict | None) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "DISPATCH_CLOUD_STATE": str(state), **(env or {})}


class RunProcess:
    """``dispatch-cloud run --config cfg`` as a child of the test: stderr appended to ``log``, its
    dispatch lock file under ``state`` (default: beside the log), never the user's own."""

    def __init__(self, cfg: Path | str, log: Path, *, state: Path | None = None, env: dict | None = None,
                 pass_fds: tuple[int, ...] = ()):
        self.log = Path(log)
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "actors.cli", "run", "--config", str(cfg)], cwd=REPO,
                env=_env(state or self.log.parent / "state", env), stdout=subprocess.DEVNULL, stderr=err,
                pass_fds=pass_fds)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def records(self) -> list[dict]:
        """The JSON log lines (others as ``{"msg": line}``)."""
        out = []
        for line in self.text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"msg": line})
        return out

    def send(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, sig: int = signal.SIGTERM, wait: float = 30.0) -> int:
        """``sig``, then SIGKILL after ``wait`` seconds; the exit status."""
        return stop_process(self.proc, sig, wait)


def dispatch_cli(args, state: Path, *, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """``dispatch-cloud ARGS...`` run to completion, output captured, state under ``state``."""
    return subprocess.run([sys.executable, "-m", "actors.cli", *map(str, args)], cwd=REPO, env=_env(state, env),
                          capture_output=True, text=True, timeout=timeout)


class Cluster:
    """The config, the API server and the dispatcher process(es) of one test."""

    def __init__(self, tmp: Path, *, poll: str = "1s", probe: str = "2s", idle: str = "3s", max_instances: int = 3,
                 vcpus: int = 4, extra_fds: list[int] | None = None):
        self.tmp = tmp
        self.token = "sys" + secrets.token_hex(20)
        self.mgmt_token = "mgmt" + secrets.token_hex(20)
        keyfile = tmp / "dispatch_key"
        self.key_pem = dispatch_key(keyfile)
        self.api = LoopbackApi(self.token, tmp / "containers.db", max_dispatch_attempts=10)
        self.store, self.admin, self.api_port = self.api.store, self.api.admin, self.api.port
        self.mgmt = f"http://127.0.0.1:{free_port()}"
        self.state_dir = tmp / "vms"
        self.marks = tmp / "marks"
        self.marks.mkdir()
        self.poll = poll
        doc = {"Clusters": {"zzzzz": {
            "SystemRootToken": self.token, "ManagementToken": self.mgmt_token,
            "Services": {"Controller": {"ExternalURL": f"http://127.0.0.1:{self.api_port}"},
                         "DispatchCloud": {"InternalURLs": {self.mgmt: {}}}},
            "Containers": {
                "DispatchPrivateKey": f"file://{keyfile}", "CrunchRunCommand": crunch_run_path(),
                "RuntimeEngine": "process", "ReserveExtraRAM": 0, "LocalKeepBlobBuffersPerVCPU": 0,
                "StaleLockTimeout": "10s", "MaxDispatchAttempts": 10,
                "CloudVMs": {
                    "Driver": "local", "BootProbeCommand": "true", "SSHPort": str(free_port()),
                    "DriverParameters": {"StateDir": str(self.state_dir), "BootDelay": "0s",
                                         "AddressBase": "127.1.%d.2" % (os.getpid() % 250)},
                    "PollInterval": poll, "ProbeInterval": probe, "SyncInterval": "2s", "TimeoutIdle": idle,
                    "TimeoutBooting": "30s", "TimeoutProbe": "30s", "TimeoutShutdown": "10s",
                    "MaxInstances": max_instances, "MaxConcurrentInstanceCreateOps": max_instances},
            },
            # (ProbeInterval also bounds SSH command timeouts: 80% of it, so 1.6 s for --detach)
            "InstanceTypes": {"small": {"ProviderType": "local-small", "VCPUs": vcpus, "RAM": "4GiB",
                                        "IncludedScratch": "1GB", "Price": 0.01}},
        }}}
        self.cfg = tmp / "config.yml"
        self.cfg.write_text(yaml.safe_dump(doc))
        self.cfg.chmod(0o600)
        self.log = tmp / "dispatcher.log"
        self.extra_fds = extra_fds or []
        self.run: RunProcess | None = None
        self.starts = 0

    # -- the dispatcher process

    def start(self, wait: bool = True) -> None:
        self.run = RunProcess(self.cfg, self.log, state=self.tmp / "state", pass_fds=tuple(self.extra_fds))
        self.starts += 1
        if wait:
            wait_for(lambda: self.mgmt_get("/_health/ping") is not None, 30, "the management API")

    def kill(self) -> None:
        self.run.kill()

    def stop(self) -> int:
        return (self.run.stop() if self.run is not None else 0) or 0

    def mgmt_get(self, path: str, timeout: float = 2.0):
        try:
            r = requests.get(self.mgmt + path, headers={"Authorization": "Bearer " + self.mgmt_token},
                             timeout=timeout)
        except requests.RequestException:
            return None
        return r.json() if r.status_code == 200 else None

    # -- containers

    def submit(self, i: int, seconds: float = 1.0) -> str:
        """Container ``i``: appends one line to marks/i each time it runs, then sleeps."""
        cmd = ["sh", "-c", f"echo ran >> {self.marks}/{i}; sleep {seconds}"]
        rec = self.store.create({"command": cmd, "container_image": "local", "cwd": "/tmp", "output_path": "/tmp",
                                 "priority": 1, "runtime_constraints": {"vcpus": 1, "ram": 64 << 20},
                                 "mounts": {}, "environment": {}}, caller=self.admin)
        return rec["uuid"]

    def containers(self, uuids) -> dict[str, dict]:
        return {u: self.store.get(u, caller=self.admin) for u in uuids}

    def runs(self, i: int) -> int:
        p = self.marks / str(i)
        return len(p.read_text().splitlines()) if p.exists() else 0

    def vm_dirs(self) -> list[Path]:
        return [p for p in self.state_dir.iterdir() if p.is_dir()] if self.state_dir.exists() else []

    def log_lines(self) -> list[dict]:
        return self.run.records() if self.run is not None else []

    def secrets(self) -> list[str]:
        """Every secret this cluster's config holds (the key by its base64 lines)."""
        lines = [ln for ln in self.key_pem.splitlines() if ln and not ln.startswith("-----")]
        return [self.token, self.mgmt_token, *lines]

    # -- cleanup

    def close(self) -> None:
        self.stop()
        self.api.server.stop()
        if self.vm_dirs():  # a failed test may leave VMs: destroy them by the driver, by pid
            from cloud.local import driver as local
            from conf.loader import load
            cluster = load(str(self.cfg))
            iset = local.driver(cluster.cloud_vms.driver_parameters, "cleanup", cluster=cluster)
            for inst in iset.instances({}):
                inst.destroy()
            iset.stop()
        self.store.close()


def assert_no_secrets(text: str, secrets_: list[str], where: str) -> None:
    """G5: no configured secret appears in captured output."""
    leaked = [s[:6] + "…" for s in secrets_ if s and s in text]
    assert not leaked, f"secrets found in {where}: {leaked}"

