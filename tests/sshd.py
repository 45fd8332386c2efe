"""A real OpenSSH sshd on loopback for the SSH executor's tests and benchmark.

Each server gets a temporary directory with its own host key, an authorized client key, and a
``ForceCommand`` wrapper that records every command line and its stdin before running it (so a
test can assert what the *server* received), and that answers ``[sudo ]cat
/var/run/arvados-instance-secret`` from a file in the directory. sshd runs in the foreground
(``-D -e``) with its log in ``sshd.log``; it is stopped by pid, together with the per-connection
processes it forked.

Use from a test module: ``from tests.sshd import sshd, sshd_factory  # noqa: F401`` (fixtures).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import paramiko
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

SSHD = "/usr/sbin/sshd"
SECRET_FILE = "/var/run/arvados-instance-secret"

_WRAPPER = r"""#!/bin/sh
# Record the command and its stdin, then run it (ForceCommand; the command is in
# SSH_ORIGINAL_COMMAND). Stdin is read completely first, which is all these tests need.
dir=@DIR@
id=$(date +%s%N)-$$
printf '%s' "$SSH_ORIGINAL_COMMAND" >"$dir/log/$id.cmd"
cat >"$dir/log/$id.stdin"
case "$SSH_ORIGINAL_COMMAND" in
  "cat @SECRET@"|"sudo cat @SECRET@")
    exec cat "$dir/instance-secret" ;;
esac
exec /bin/sh -c "$SSH_ORIGINAL_COMMAND" <"$dir/log/$id.stdin"
"""


def ensure_sshd() -> str:
    """The sshd binary, installed with apt-get if missing (the Makefile's sysdeps does this too)."""
    if not os.access(SSHD, os.X_OK):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], check=True, capture_output=True, env=env, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-q", "openssh-server"], check=True,
                       capture_output=True, env=env, timeout=600)
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation directory
    return SSHD


def _sshd_version() -> tuple[int, int]:
    out = subprocess.run([SSHD, "-V"], capture_output=True, text=True).stderr
    m = re.search(r"OpenSSH_(\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _new_key_pem() -> str:
    key = ed25519.Ed25519PrivateKey.generate()
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                             serialization.NoEncryption()).decode()


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    """Descendants of ``pid`` (sshd forks one process per connection, which calls setsid)."""
    parent: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            parent[int(d)] = int(stat.rpartition(")")[2].split()[1])
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        todo += kids
    return out


@dataclass(frozen=True)
class Received:
    """One command as the server side received it."""
    command: str
    stdin: bytes


class SSHServer:
    """One sshd on ``host:port`` (loopback), its files under ``dir``."""

    def __init__(self, host: str = "127.0.0.1", record: bool = True, secret: str = "",
                 max_startups: int = 10):
        ensure_sshd()
        self.host = host
        self.port = _free_port(host)
        self.dir = Path(tempfile.mkdtemp(prefix="sshd-"))
        (self.dir / "log").mkdir()
        self.client_key_pem = _new_key_pem()
        self.client_key = paramiko.Ed25519Key.from_private_key(io.StringIO(self.client_key_pem))
        pub = f"{self.client_key.get_name()} {self.client_key.get_base64()} test-client\n"
        (self.dir / "authorized_keys").write_text(pub)
        self.set_secret(secret)
        wrapper = self.dir / "record.sh"
        wrapper.write_text(_WRAPPER.replace("@DIR@", str(self.dir)).replace("@SECRET@", SECRET_FILE))
        wrapper.chmod(0o755)
        self._record = record
        self._max_startups = max_startups
        self.proc: subprocess.Popen | None = None
        self._log = None
        self.new_host_key()

    # -- files

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.dir / "sshd.log"

    def set_secret(self, secret: str) -> None:
        """What ``cat /var/run/arvados-instance-secret`` prints on this server."""
        p = self.dir / "instance-secret"
        p.write_text(secret)
        p.chmod(0o600)

    def new_host_key(self) -> paramiko.PKey:
        """Write a fresh host key (takes effect at the next start)."""
        pem = _new_key_pem()
        p = self.dir / "host_ed25519"
        p.write_text(pem)
        p.chmod(0o600)
        self.host_key = paramiko.Ed25519Key.from_private_key(io.StringIO(pem))
        return self.host_key

    def _write_config(self) -> Path:
        lines = [
            f"ListenAddress {self.host}:{self.port}",
            f"HostKey {self.dir / 'host_ed25519'}",
            f"AuthorizedKeysFile {self.dir / 'authorized_keys'}",
            f"PidFile {self.dir / 'sshd.pid'}",
            "PermitRootLogin prohibit-password",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes no",
            "UseDNS no",
            "LogLevel INFO",
            "MaxSessions 1000",
            f"MaxStartups {self._max_startups}",
            # bash sources ~/.bashrc when started by sshd; a developer's rc (pyenv init: ~100
            # forks) would dominate every command's latency. Give sessions an empty home.
            f"SetEnv HOME={self.dir}",
        ]
        if self._record:
            lines.append(f"ForceCommand {self.dir / 'record.sh'}")
        if _sshd_version() >= (9, 8):
            lines.append("PerSourcePenalties no")  # failed-auth tests must not lock out loopback
        cfg = self.dir / "sshd_config"
        cfg.write_text("\n".join(lines) + "\n")
        return cfg

    # -- process

    def start(self, timeout: float = 10.0) -> "SSHServer":
        cfg = self._write_config()
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(cfg)], stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited with {self.proc.returncode}: {self.log_path.read_text()[-2000:]}")
            try:
                with socket.create_connection((self.host, self.port), timeout=1) as s:
                    if s.recv(64).startswith(b"SSH-2.0"):
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"sshd on {self.address} not ready after {timeout}s")
            time.sleep(0.02)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM the listener and every connection process it forked; wait for them."""
        if self.proc is None:
            return
        pids = _children(self.proc.pid) if self.proc.poll() is None else []
        for pid in [self.proc.pid, *pids]:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout)
        deadline = time.monotonic() + timeout
        for pid in pids:
            while os.path.exists(f"/proc/{pid}") and _state(pid) != "Z" and time.monotonic() < deadline:
                time.sleep(0.01)
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def restart(self, new_host_key: bool = False) -> None:
        """Stop (dropping open connections) and start again on the same address."""
        self.stop()
        if new_host_key:
            self.new_host_key()
        self.start()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- what the server saw

    def received(self) -> list[Received]:
        """Commands the ForceCommand wrapper recorded, in arrival order."""
        logdir = self.dir / "log"
        names = sorted({p.stem for p in logdir.glob("*.cmd")},
                       key=lambda n: (int(n.split("-")[0]), n))
        out = []
        for n in names:
            stdin_path = logdir / f"{n}.stdin"
            out.append(Received((logdir / f"{n}.cmd").read_text(),
                                stdin_path.read_bytes() if stdin_path.exists() else b""))
        return out

    def accepted_logins(self) -> int:
        """Connections that authenticated ("Accepted publickey" lines in sshd's log)."""
        return self.log_path.read_text(errors="replace").count("Accepted publickey")


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return "X"


@pytest.fixture
def sshd_factory():
    """Start servers on demand: ``sshd_factory(secret="...", record=True)``; all stopped after."""
    servers: list[SSHServer] = []

    def make(**kw) -> SSHServer:
        s = SSHServer(**kw)
        servers.append(s)
        return s.start()

    yield make
    for s in servers:
        s.cleanup()


@pytest.fixture
def sshd(sshd_factory) -> SSHServer:
    """One running sshd with recording on and no instance secret set."""
    return sshd_factory()
