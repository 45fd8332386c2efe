"""The ``local`` cloud driver: VMs that are process trees on this machine, reached by real SSH.

Like Arvados' loopback driver it lets a whole cluster run on one host through the same SSH path a
cloud uses, but it has many instances, each with its own loopback address 127.0.0.N (Linux routes
all of 127/8 to ``lo``), SSH server, host key, lock dir and secret file, and they live in a state
directory rather than in memory, so they survive a dispatcher restart (or SIGKILL) the way cloud
VMs do. The VM process itself is :mod:`cloud.local.vm`.

State: ``<StateDir>/<id>/`` holds ``instance.json`` (id, provider type, address, tags, pid,
created_at, ...), the host key, ``authorized_keys``, ``init.sh``, ``lock/``, ``run/``, ``work/``.

A VM whose process has died (a crash, a host reboot) is still listed, as a provider lists a VM
that stopped responding: its SSH probes fail and the dispatcher's boot/probe timeouts destroy it.
Destroy kills the VM process (which kills its whole tree), then, as a fallback for a VM that died
first, any process still carrying the VM's marker in its environment, then removes the directory.

Like a cloud VM's disk, a VM's work dir (where dispatch-cloud-crunch-run keeps each container's
stdout.txt/stderr.txt) goes with it at destroy. Addresses are unique within one StateDir; two
StateDirs in use at once need different AddressBase values (or SSH ports).

DriverParameters: StateDir (default ``$XDG_STATE_HOME/dispatch-cloud/local``, else
``~/.local/state/dispatch-cloud/local``), MaxInstances (default CloudVMs.MaxInstances, else 8),
BootDelay (default ``1s``), SSHServer (``embedded`` | ``openssh``), AddressBase (default
``127.0.0.2``). SSH listens on CloudVMs.SSHPort, or 2222 when that is the default ``22``.
"""

from __future__ import annotations

import base64
import fcntl
import ipaddress
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from cloud.base import CloudError, HostKeyError, InstancePrice, QuotaError
from cloud.local.vm import MARKER_ENV, VMFiles, current_user, descendants, kill_all, source_root
from conf.drivers import LOCAL_PROVIDER_TYPE, local_state_dir
from conf.model import InstanceType, thaw
from conf.units import parse_duration

__all__ = ["LocalParams", "LocalParamsError", "LocalInstanceSet", "LocalInstance", "driver",
           "parse_params", "check_params"]

_log = logging.getLogger("cloud.local.driver")
PROVIDER_TYPE = LOCAL_PROVIDER_TYPE
DEFAULT_PORT = 2222
DESTROY_WAIT = 5.0  # seconds a VM gets to power off after SIGTERM before SIGKILL
SERVERS = ("embedded", "openssh")


class LocalParamsError(ValueError):
    """Bad DriverParameters; the message names the key."""


@dataclass(frozen=True)
class LocalParams:
    state_dir: str
    max_instances: int
    boot_delay: float
    ssh_server: str
    address_base: str
    ssh_port: int


def parse_params(params: Mapping | None, cluster=None, where: str = "DriverParameters") -> LocalParams:
    """Validate DriverParameters (pure, apart from reading ``$XDG_STATE_HOME``)."""
    params = dict(params or {})
    known = {"StateDir", "MaxInstances", "BootDelay", "SSHServer", "AddressBase"}
    unknown = sorted(set(params) - known)
    if unknown:
        raise LocalParamsError(f"{where}.{unknown[0]}: unknown parameter for the local driver "
                               f"(known: {', '.join(sorted(known))})")
    cvm = cluster.cloud_vms if cluster is not None else None
    try:
        state_dir = local_state_dir(params)
    except ValueError:
        raise LocalParamsError(f"{where}.StateDir: expected a path, got {params['StateDir']!r}") from None
    mi = params.get("MaxInstances", cvm.max_instances if cvm is not None else 8)
    if isinstance(mi, bool) or not isinstance(mi, int) or mi < 1:
        raise LocalParamsError(f"{where}.MaxInstances: expected an integer >= 1, got {mi!r}")
    try:
        boot_delay = parse_duration(params.get("BootDelay", "1s"))
    except ValueError as e:
        raise LocalParamsError(f"{where}.BootDelay: {e} (expected a duration like '1s')") from None
    if boot_delay < 0:
        raise LocalParamsError(f"{where}.BootDelay: must not be negative")
    server = params.get("SSHServer", "embedded")
    if server not in SERVERS:
        raise LocalParamsError(f"{where}.SSHServer: expected one of {', '.join(SERVERS)}, got {server!r}")
    base = params.get("AddressBase", "127.0.0.2")
    try:
        addr = ipaddress.IPv4Address(base)
    except ValueError:
        raise LocalParamsError(f"{where}.AddressBase: expected an IPv4 address, got {base!r}") from None
    if not addr.is_loopback:
        raise LocalParamsError(f"{where}.AddressBase: {base} is not in 127.0.0.0/8")
    port = DEFAULT_PORT
    if cvm is not None and str(cvm.ssh_port) not in ("", "22", "ssh"):
        try:
            port = int(cvm.ssh_port)
        except ValueError:
            raise LocalParamsError(f"Containers.CloudVMs.SSHPort: expected a port number, "
                                   f"got {cvm.ssh_port!r}") from None
    return LocalParams(state_dir, mi, boot_delay, server,
                       str(addr), port)


def _rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat().replace("+00:00", "Z")


def _write_json_atomic(path: Path, value: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Processes of a VM


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _is_vm_process(pid: int, root: Path) -> bool:
    """Whether ``pid`` is (still) the localvm process of ``root`` — not a recycled pid."""
    args = _cmdline(pid)
    return "cloud.local.vm" in args and str(root) in args


def _alive(pid: int) -> bool:
    from cloud.local.runner import pid_alive
    return pid_alive(pid)


def _marked_pids(root: Path) -> list[int]:
    """Processes whose environment carries this VM's marker (for VMs whose process died first)."""
    want = f"{MARKER_ENV}={root}".encode()
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != os.getpid():
            try:
                with open(f"/proc/{d}/environ", "rb") as f:
                    if want in f.read().split(b"\0"):
                        out.append(int(d))
            except OSError:
                continue
    return out


# ---------------------------------------------------------------------------------------------
# Instances


class LocalInstance:
    """A snapshot of one local VM (tags as of the listing; ``set_tags`` writes through)."""

    def __init__(self, iset: "LocalInstanceSet", files: VMFiles, info: dict):
        self._set = iset
        self._files = files
        self._info = info

    @property
    def id(self) -> str:
        return self._info["id"]

    @property
    def address(self) -> str:
        return f"{self._info['host']}:{self._info['ssh_port']}"

    @property
    def remote_user(self) -> str:
        return self._info["remote_user"]

    @property
    def provider_type(self) -> str:
        return self._info["provider_type"]

    @property
    def tags(self) -> Mapping[str, str]:
        return dict(self._info.get("tags") or {})

    @property
    def pid(self) -> int:
        return int(self._info.get("pid") or 0)

    @property
    def state_dir(self) -> Path:
        return self._files.root

    def running(self) -> bool:
        """Whether the VM process is alive (a dead one is still listed; see the module doc)."""
        return bool(self.pid) and _alive(self.pid) and _is_vm_process(self.pid, self._files.root)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        with self._set._locked():
            try:
                info = self._files.read_info()
            except FileNotFoundError:
                raise CloudError(f"instance {self.id} not found (destroyed?)") from None
            info["tags"] = {str(k): str(v) for k, v in tags.items()}
            _write_json_atomic(self._files.instance_json, info)
        self._info = info

    def destroy(self) -> None:
        self._set._destroy(self._files, self._info)

    def verify_host_key(self, host_key, transport=None) -> None:
        """Byte comparison with the host key generated at create (as Arvados loopback does)."""
        try:
            want = base64.b64decode(self._files.host_key_pub.read_text().split()[1])
        except (OSError, IndexError, ValueError) as e:
            raise HostKeyError(f"instance {self.id}: cannot read its host key: {e}") from None
        got = host_key.asbytes() if hasattr(host_key, "asbytes") else bytes(host_key)
        if got != want:
            raise HostKeyError(f"instance {self.id}: host key does not match the one generated at create")

    def price_history(self, it: InstanceType) -> list[InstancePrice]:
        return []

    def __repr__(self):
        return f"<local {self.id} {self.address}>"


class LocalInstanceSet:
    """All local VMs under one StateDir. Safe to use from several threads and processes: writes
    to the state dir happen under an flock on ``<StateDir>/.lock``."""

    def __init__(self, params: LocalParams, set_id: str, *, clock=None, logger=None):
        self.params = params
        self.set_id = set_id
        self._clock = clock
        self._log = logger or _log
        self._root = Path(params.state_dir)
        self._root.mkdir(parents=True, exist_ok=True)
        self._children: dict[str, subprocess.Popen] = {}  # VMs this process started, to reap

    # -- InstanceSet

    def create(self, it: InstanceType, image_id: str, tags: Mapping[str, str], init_command: str,
               public_key: str | None) -> LocalInstance:
        try:
            return self._create(it, image_id, tags, init_command, public_key)
        except OSError as e:  # the state dir: full disk, permissions, ...
            raise CloudError(f"local driver: create in {self._root}: {e}") from e

    def _create(self, it, image_id, tags, init_command, public_key) -> LocalInstance:
        with self._locked():
            existing = self._read_all()
            if len(existing) >= self.params.max_instances:
                raise QuotaError(f"local driver: MaxInstances ({self.params.max_instances}) reached")
            host = self._free_address({i["host"] for _, i in existing})
            iid = f"local-{secrets.token_hex(6)}"
            files = VMFiles(self._root / iid)
            files.root.mkdir(mode=0o700)
            for d in (files.lock, files.run, files.work):
                d.mkdir()
            _write_host_key(files)
            files.authorized_keys.write_text(_authorized_line(public_key))
            files.init_command.write_text(init_command or "")
            now = self._clock.now() if self._clock is not None else time.time()
            info = {"id": iid, "provider_type": it.provider_type or PROVIDER_TYPE,
                    "instance_type": it.name, "image_id": image_id, "host": host,
                    "address": f"{host}:{self.params.ssh_port}",
                    "ssh_port": self.params.ssh_port, "remote_user": current_user(),
                    "tags": {str(k): str(v) for k, v in tags.items()},
                    "created_at": _rfc3339(now), "boot_delay": self.params.boot_delay,
                    "ssh_server": self.params.ssh_server, "pid": 0}
            _write_json_atomic(files.instance_json, info)
            try:
                proc = self._start_vm(files)
            except OSError as e:
                shutil.rmtree(files.root, ignore_errors=True)
                raise CloudError(f"local driver: cannot start VM process for {iid}: {e}") from e
            info["pid"] = proc.pid
            _write_json_atomic(files.instance_json, info)
        self._children[iid] = proc
        self._log.info("local instance created", extra={"Instance": iid, "Address": f"{host}:{self.params.ssh_port}",
                                                         "PID": proc.pid, "InstanceType": it.name})
        return LocalInstance(self, files, info)

    def instances(self, tags: Mapping[str, str]) -> list[LocalInstance]:
        """Every VM in the state dir (tags are not filtered here; the wrapper stack does that)."""
        return [LocalInstance(self, files, info) for files, info in self._read_all()]

    def instance_quota_group(self, it: InstanceType) -> str:
        return ""

    def stop(self) -> None:
        """Nothing to stop: the VMs belong to the "cloud" and outlive this object."""

    # -- internals

    @contextmanager
    def _locked(self):
        fd = os.open(self._root / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _read_all(self) -> list[tuple[VMFiles, dict]]:
        out = []
        for d in sorted(self._root.iterdir()):
            files = VMFiles(d)
            if d.name.startswith(".") or not d.is_dir():
                continue
            try:
                out.append((files, files.read_info()))
            except FileNotFoundError:
                continue  # being created or destroyed
            except (OSError, ValueError) as e:
                self._log.warning("unreadable local instance state", extra={"path": str(files.instance_json),
                                                                            "error": str(e)})
        return out

    def _free_address(self, used: set[str]) -> str:
        """The first 127.x.y.z from AddressBase that no instance uses and where the port is free."""
        addr = ipaddress.IPv4Address(self.params.address_base)
        while addr.is_loopback and addr != ipaddress.IPv4Address("127.255.255.255"):
            host = str(addr)
            if host not in used and _port_free(host, self.params.ssh_port):
                return host
            addr += 1
        raise QuotaError(f"local driver: no free loopback address from {self.params.address_base} "
                         f"with port {self.params.ssh_port} free")

    def _start_vm(self, files: VMFiles) -> subprocess.Popen:
        env = dict(os.environ)
        env["PYTHONPATH"] = source_root() + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        with open(files.log, "ab") as out:
            return subprocess.Popen([sys.executable, "-m", "cloud.local.vm", "--state-dir", str(files.root)],
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env,
                                    cwd=str(files.root), start_new_session=True)

    def _destroy(self, files: VMFiles, info: dict) -> None:
        iid, pid = info["id"], int(info.get("pid") or 0)
        if pid and _alive(pid) and _is_vm_process(pid, files.root):
            os.kill(pid, signal.SIGTERM)
            if not self._wait_gone(iid, pid, DESTROY_WAIT):
                self._log.warning("local VM did not power off; killing it",
                                  extra={"Instance": iid, "PID": pid})
                kill_all([pid, *descendants(pid)])
                self._wait_gone(iid, pid, DESTROY_WAIT)
        for _ in range(50):  # leftovers of a VM that died before its processes
            left = _marked_pids(files.root)
            if not left:
                break
            kill_all(left)
            time.sleep(0.02)
        else:
            raise CloudError(f"local driver: processes of {iid} survive SIGKILL: {left}")
        proc = self._children.pop(iid, None)
        if proc is not None:
            proc.poll()  # reap our child, if it was ours
        shutil.rmtree(files.root, ignore_errors=True)
        if files.root.exists():
            raise CloudError(f"local driver: cannot remove {files.root}")
        self._log.info("local instance destroyed", extra={"Instance": iid})

    def _wait_gone(self, iid: str, pid: int, timeout: float) -> bool:
        proc = self._children.get(iid)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                self._children.pop(iid, None)
                return True
            if proc is None and not _alive(pid):
                return True
            time.sleep(0.02)
        return False


def _authorized_line(public_key) -> str:
    """An authorized_keys line from an OpenSSH public key line or a paramiko key (None: no key)."""
    if public_key is None or public_key == "":
        return ""
    if hasattr(public_key, "get_base64"):
        return f"{public_key.get_name()} {public_key.get_base64()}\n"
    return str(public_key).strip() + "\n"


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _write_host_key(files: VMFiles) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                            serialization.NoEncryption())
    fd = os.open(files.host_key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    files.host_key_pub.write_bytes(pub + b"\n")


def check_params(params: Mapping | None, cluster) -> None:
    """:mod:`cloud.drivers` hook: raise :class:`LocalParamsError` naming the key."""
    parse_params(thaw(params or {}), cluster, f"Clusters.{cluster.cluster_id}.Containers.CloudVMs.DriverParameters")


def driver(params: Mapping | None, set_id: str, *, cluster=None, clock=None, logger=None) -> LocalInstanceSet:
    """The ``local`` driver entry point (see :mod:`cloud.drivers`). Bad DriverParameters raise
    :class:`LocalParamsError` naming the key."""
    where = "Containers.CloudVMs.DriverParameters"
    if cluster is not None and getattr(cluster, "source", ""):
        where = f"{cluster.source}: {where}"
    p = parse_params(params, cluster, where)
    try:
        return LocalInstanceSet(p, set_id, clock=clock, logger=logger)
    except OSError as e:
        raise LocalParamsError(f"{where}.StateDir: cannot use {p.state_dir}: {e.strerror or e}") from None
