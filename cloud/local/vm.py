"""One ``local`` VM: a process tree on this machine with its own SSH server on 127.0.0.N.

``python -m cloud.local.vm --state-dir DIR`` is what :mod:`cloud.local.driver` starts for each instance,
in its own session with stdio to files in DIR, so it outlives the dispatcher that created it, as a
cloud VM would. It

* becomes a child subreaper (``prctl(PR_SET_CHILD_SUBREAPER)``), so everything started on the VM
  (including ``crunch-run --detach`` children, which start their own sessions) stays in its process
  tree, and a SIGTERM (the driver's destroy) kills that whole tree: a power-off;
* "boots": waits BootDelay, runs the init command once, then listens for SSH at the address and
  port recorded in ``instance.json``; the embedded paramiko server (default) accepts only the
  keys in ``authorized_keys`` for the current user name and runs each exec request as
  ``sh -c <command>`` with a leading ``sudo `` stripped; with ``ssh_server: openssh`` it runs
  OpenSSH's sshd instead, with a ForceCommand that applies the same rules.

Path rewrite: an instance has no /var/run or /var/lock of its own, so in the init command and in
every exec'd command the path components ``/var/run`` and ``/var/lock`` are rewritten to
``DIR/run`` and ``DIR/lock`` (see :func:`rewrite_paths`). That is what makes the dispatcher's
``cat /var/run/arvados-instance-secret`` and a boot probe like ``rm -f
/var/lock/crunch-run-broken`` work per instance. Commands also get ``CRUNCH_RUN_LOCKDIR=DIR/lock``,
``CRUNCH_RUN_WORKDIR=DIR/work`` and a PATH starting with ``DIR/bin``, which holds ``crunch-run``
and ``dispatch-cloud-crunch-run`` wrappers for :mod:`cloud.local.runner` (so they work whether or not
this package is installed) and a ``systemctl`` that only answers ``is-system-running`` with
``running`` (the default BootProbeCommand).
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import json
import logging
import os
import pwd
import re
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import paramiko
from paramiko.common import MSG_CHANNEL_REQUEST

log = logging.getLogger("cloud.local.vm")

PR_SET_CHILD_SUBREAPER = 36
MARKER_ENV = "DISPATCH_CLOUD_LOCALVM"  # set in every VM process's environment: its state dir
SSHD = "/usr/sbin/sshd"
_REWRITE = re.compile(r"(?<![\w.\-/])/var/(run|lock)(?![\w.\-])")
_CHUNK = 32768


# ---------------------------------------------------------------------------------------------
# The state directory: shared with cloud.local.driver, which writes it at create.


@dataclass(frozen=True)
class VMFiles:
    """The layout of one instance's state directory."""

    root: Path

    @property
    def instance_json(self) -> Path:
        return self.root / "instance.json"

    @property
    def host_key(self) -> Path:
        return self.root / "ssh_host_ed25519_key"

    @property
    def host_key_pub(self) -> Path:
        return self.root / "ssh_host_ed25519_key.pub"

    @property
    def authorized_keys(self) -> Path:
        return self.root / "authorized_keys"

    @property
    def init_command(self) -> Path:
        return self.root / "init.sh"

    @property
    def lock(self) -> Path:
        return self.root / "lock"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def work(self) -> Path:
        return self.root / "work"

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    @property
    def log(self) -> Path:
        return self.root / "vm.log"

    def read_info(self) -> dict:
        return json.loads(self.instance_json.read_text())


# ---------------------------------------------------------------------------------------------
# Pure helpers


def rewrite_paths(command: str, root: Path | str) -> str:
    """``/var/run`` and ``/var/lock`` (as whole path components) -> ``<root>/run``, ``<root>/lock``."""
    return _REWRITE.sub(lambda m: f"{root}/{m.group(1)}", command)


def strip_sudo(command: str) -> str:
    """The VM's user already owns everything there: ``sudo X`` is just ``X``."""
    stripped = command.lstrip()
    return stripped[5:] if stripped.startswith("sudo ") else command


def shell_command(command: str, root: Path | str) -> str:
    return rewrite_paths(strip_sudo(command), root)


def source_root() -> str:
    """The directory holding the ``cloud`` package."""
    return str(Path(__file__).resolve().parent.parent)


def vm_env(files: VMFiles, extra: dict | None = None) -> dict:
    """The whole environment of a command on the VM: minimal, plus SSH ``env`` requests."""
    user = current_user()
    env = {
        "PATH": os.pathsep.join([str(files.bin), os.path.dirname(sys.executable), "/usr/local/sbin",
                                 "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"]),
        "HOME": pwd.getpwuid(os.getuid()).pw_dir or "/",
        "USER": user,
        "LOGNAME": user,
        "SHELL": "/bin/sh",
        "LANG": "C.UTF-8",
        "CRUNCH_RUN_LOCKDIR": str(files.lock),
        "CRUNCH_RUN_WORKDIR": str(files.work),
        MARKER_ENV: str(files.root),
    }
    env.update(extra or {})
    return env


def current_user() -> str:
    return pwd.getpwuid(os.getuid()).pw_name


def authorized_blobs(text: str) -> set[bytes]:
    """The key blobs in an authorized_keys text (options before the key type are not supported)."""
    import base64
    out = set()
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and not line.lstrip().startswith("#"):
            try:
                out.add(base64.b64decode(parts[1], validate=True))
            except ValueError:
                continue
    return out


_SYSTEMCTL = """#!/bin/sh
# A local VM has no systemd of its own: answer the dispatcher's default boot probe only.
if [ "$*" = is-system-running ]; then echo running; exit 0; fi
echo "systemctl: not available on a local VM" >&2
exit 1
"""


def write_shims(files: VMFiles) -> None:
    """The VM's "image": ``crunch-run`` and ``dispatch-cloud-crunch-run`` in DIR/bin, running
    :mod:`cloud.local.runner` with this interpreter, and a ``systemctl`` that answers only
    ``is-system-running`` (the default BootProbeCommand), so a config needs no local overrides."""
    files.bin.mkdir(exist_ok=True)
    runner = (f"#!/bin/sh\nPYTHONPATH='{source_root()}'${{PYTHONPATH:+:$PYTHONPATH}} "
              f"exec '{sys.executable}' -m cloud.local.runner \"$@\"\n")
    for name, script in (("crunch-run", runner), ("dispatch-cloud-crunch-run", runner),
                         ("systemctl", _SYSTEMCTL)):
        p = files.bin / name
        tmp = p.with_name(name + ".tmp")
        tmp.write_text(script)
        tmp.chmod(0o755)
        os.replace(tmp, p)


# ---------------------------------------------------------------------------------------------
# Processes


def process_table() -> dict[int, int]:
    """pid -> ppid for every process visible in /proc."""
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat", "rb") as f:
                    stat = f.read().decode(errors="replace")
            except OSError:
                continue
            parent[int(d)] = int(stat[stat.rfind(")") + 2:].split()[1])
    return parent


def descendants(pid: int, table: dict[int, int] | None = None) -> list[int]:
    table = process_table() if table is None else table
    children: dict[int, list[int]] = {}
    for c, p in table.items():
        children.setdefault(p, []).append(c)
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def kill_all(pids, sig: int = signal.SIGKILL) -> None:
    for p in pids:
        try:
            os.kill(p, sig)
        except OSError:
            pass


class Reaper:
    """The one place that reaps children: as a subreaper this process inherits orphans, which a
    ``waitpid(-1)`` must collect, so ``Popen.wait`` cannot be used; :meth:`spawn` registers a
    child whose exit status :meth:`wait` then hands out."""

    def __init__(self):
        self._cond = threading.Condition()
        self._watched: set[int] = set()
        self._status: dict[int, int] = {}
        self._spawned = threading.Event()
        threading.Thread(target=self._loop, name="reaper", daemon=True).start()

    def spawn(self, *args, **kwargs) -> subprocess.Popen:
        with self._cond:
            proc = subprocess.Popen(*args, **kwargs)
            self._watched.add(proc.pid)
        self._spawned.set()
        return proc

    def wait(self, proc: subprocess.Popen, timeout: float | None = None) -> int | None:
        with self._cond:
            if not self._cond.wait_for(lambda: proc.pid in self._status, timeout):
                return None
            self._watched.discard(proc.pid)
            proc.returncode = self._status.pop(proc.pid)
            return proc.returncode

    def _loop(self):
        while True:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                # No children, hence no descendants to inherit either: sleep until a spawn.
                self._spawned.wait(1.0)
                self._spawned.clear()
                continue
            with self._cond:
                if pid in self._watched:
                    self._status[pid] = os.waitstatus_to_exitcode(status)
                    self._cond.notify_all()


def exit_status(code: int) -> int:
    """An exit status for SSH: killed by signal N -> 128+N, as a shell reports it."""
    return 128 - code if code < 0 else code


# ---------------------------------------------------------------------------------------------
# The embedded SSH server


class _Session(paramiko.ServerInterface):
    """One SSH connection's policy. Exec and shell requests are only *accepted* here; what they
    run starts from :class:`_ServerTransport` once paramiko has replied to the request."""

    def __init__(self, vm: "LocalVM"):
        self._vm = vm
        self._env: dict[int, dict] = {}
        self._pty: dict[int, tuple] = {}
        self._masters: dict[int, int] = {}  # channel id -> pty master fd of its shell
        self._accepted: dict[int, tuple] = {}  # channel id -> (target, args, name), not started

    def start_accepted(self, chan: paramiko.Channel) -> None:
        """Start what the channel's last request accepted; called after the reply was sent."""
        job = self._accepted.pop(chan.get_id(), None)
        if job is not None:
            threading.Thread(target=job[0], args=job[1], name=job[2], daemon=True).start()

    def get_allowed_auths(self, username):
        return "publickey"

    def check_auth_publickey(self, username, key):
        if username == self._vm.user and key.asbytes() in self._vm.authorized():
            return paramiko.AUTH_SUCCESSFUL
        log.info("ssh key refused", extra={"user": username, "key": key.fingerprint})
        return paramiko.AUTH_FAILED

    def check_channel_request(self, kind, chanid):
        if kind == "session":
            return paramiko.OPEN_SUCCEEDED
        return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_channel_env_request(self, channel, name, value):
        self._env.setdefault(channel.get_id(), {})[_text(name)] = _text(value)
        return True

    def check_channel_exec_request(self, channel, command):
        env = self._env.pop(channel.get_id(), {})
        self._pty.pop(channel.get_id(), None)  # commands get pipes, as the dispatcher expects
        self._accepted[channel.get_id()] = (self._vm.exec_channel, (channel, _text(command), env), "exec")
        return True

    # An operator's interactive login (``ssh -p PORT user@127.0.0.N``).

    def check_channel_pty_request(self, channel, term, width, height, pixelwidth, pixelheight, modes):
        self._pty[channel.get_id()] = (_text(term), width, height)
        return True

    def check_channel_window_change_request(self, channel, width, height, pixelwidth, pixelheight):
        fd = self._masters.get(channel.get_id())
        if fd is not None:
            _set_winsize(fd, width, height)
        return True

    def check_channel_shell_request(self, channel):
        env = self._env.pop(channel.get_id(), {})
        pty = self._pty.pop(channel.get_id(), None)
        if pty is None:
            target, args = self._vm.exec_channel, (channel, "exec sh -i", env)
        else:
            target, args = self._vm.shell_channel, (channel, env, pty, self._masters)
        self._accepted[channel.get_id()] = (target, args, "shell")
        return True


def _request_then_start(chan: paramiko.Channel, m) -> None:
    paramiko.Channel._handle_request(chan, m)  # asks _Session, then sends the reply
    server = chan.get_transport().server_object
    if isinstance(server, _Session):
        server.start_accepted(chan)


class _ServerTransport(paramiko.Transport):
    """A server transport that starts a command only after replying to its exec request.

    paramiko sends CHANNEL_SUCCESS from the transport thread *after* ``check_channel_exec_request``
    returns. A command started inside that call can finish, send its exit status and CLOSE first
    (it takes ~2 ms); the reply then follows a CLOSE, which RFC 4254 forbids, and a paramiko client
    waiting in ``exec_command`` sees the channel closed before its request was answered and raises
    ``SSHException("Channel closed.")``: the command ran, the caller got an error. paramiko has no
    public hook after the reply, so this wraps its channel-request handler. That table is private
    to paramiko: should a release rename it, this class fails at import; should it stop using it,
    no command would start at all (tests/test_local.py covers both, and the ordering itself).
    """

    _channel_handler_table = {**paramiko.Transport._channel_handler_table,
                              MSG_CHANNEL_REQUEST: _request_then_start}


def _text(b) -> str:
    return b.decode("utf-8", "surrogateescape") if isinstance(b, bytes) else str(b)


class LocalVM:
    """The VM process: boot, serve SSH, run commands, and power off on SIGTERM."""

    def __init__(self, files: VMFiles):
        self.files = files
        self.info = files.read_info()
        missing = [k for k in ("id", "host", "ssh_port") if k not in self.info]
        if missing:
            raise ValueError(f"missing keys: {', '.join(missing)}")
        self.user = current_user()
        self.reaper = Reaper()
        self.stopping = threading.Event()
        self._listener: socket.socket | None = None
        self._sshd: subprocess.Popen | None = None

    # -- lifecycle

    def run(self) -> int:
        _set_subreaper()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda *_: self.stopping.set())
        for d in (self.files.lock, self.files.run, self.files.work):
            d.mkdir(exist_ok=True)
        write_shims(self.files)
        addr = (self.info["host"], int(self.info["ssh_port"]))
        log.info("booting", extra={"Instance": self.info["id"], "Address": f"{addr[0]}:{addr[1]}"})
        if self.stopping.wait(float(self.info.get("boot_delay", 0))):
            return self.power_off()
        self._first_boot()
        if self.stopping.is_set():
            return self.power_off()
        try:
            if self.info.get("ssh_server") == "openssh":
                self._start_sshd(addr)
            else:
                self._start_embedded(addr)
        except OSError as e:
            log.error("cannot start the SSH server", extra={"Address": f"{addr[0]}:{addr[1]}",
                                                            "error": str(e)})
            self.power_off()
            return 1
        log.info("ssh server listening", extra={"Address": f"{addr[0]}:{addr[1]}",
                                                "server": self.info.get("ssh_server", "embedded")})
        while not self.stopping.wait(1.0):
            if self._sshd is not None and self.reaper.wait(self._sshd, 0) is not None:
                log.error("sshd exited", extra={"returncode": self._sshd.returncode})
                break
        return self.power_off()

    def _first_boot(self) -> None:
        """Run the init command (cloud-init's user data) once per instance."""
        done = self.files.run / ".init-done"
        if done.exists() or not self.files.init_command.exists():
            return
        cmd = rewrite_paths(self.files.init_command.read_text(), self.files.root)
        with open(self.files.root / "init.log", "ab") as out:
            proc = self.reaper.spawn(["sh", "-c", cmd], stdin=subprocess.DEVNULL, stdout=out,
                                     stderr=out, env=vm_env(self.files), cwd=str(self.files.work))
            rc = None
            while rc is None and not self.stopping.is_set():
                rc = self.reaper.wait(proc, 0.5)
        if rc:
            log.error("init command failed", extra={"returncode": rc})
        done.touch()

    def power_off(self) -> int:
        """Kill everything this VM started (it is their subreaper, so they are all in its tree)."""
        log.info("powering off")
        if self._listener is not None:
            self._listener.close()
        me = os.getpid()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            pids = descendants(me)
            if not pids:
                break
            kill_all(pids)
            time.sleep(0.02)
        return 0

    # -- exec

    def authorized(self) -> set[bytes]:
        try:
            return authorized_blobs(self.files.authorized_keys.read_text())
        except OSError:
            return set()

    def exec_channel(self, chan: paramiko.Channel, command: str, env: dict) -> None:
        """Run one exec request: stdio wired to the channel, exit status sent back."""
        cmd = shell_command(command, self.files.root)
        try:
            proc = self.reaper.spawn(["sh", "-c", cmd], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=vm_env(self.files, env),
                                     cwd=str(self.files.work), start_new_session=True)
        except OSError as e:
            chan.sendall_stderr(f"cannot run command: {e}\n".encode())
            chan.send_exit_status(1)
            chan.close()
            return
        pumps = [threading.Thread(target=_copy_out, args=(proc.stdout, chan.sendall), daemon=True),
                 threading.Thread(target=_copy_out, args=(proc.stderr, chan.sendall_stderr), daemon=True)]
        threading.Thread(target=_copy_in, args=(chan, proc.stdin), daemon=True).start()
        for t in pumps:
            t.start()
        code = self.reaper.wait(proc)
        for t in pumps:
            t.join()
        try:
            chan.send_exit_status(exit_status(code))
            chan.shutdown_write()
            chan.close()
        except (OSError, EOFError, paramiko.SSHException):
            pass  # the client went away

    def shell_channel(self, chan: paramiko.Channel, env: dict, pty: tuple, masters: dict) -> None:
        """An interactive shell on a pseudo-terminal (no controlling tty: no job control).
        Typed commands are not path-rewritten; only exec requests are."""
        term, width, height = pty
        master, slave = os.openpty()
        _set_winsize(slave, width, height)
        try:
            proc = self.reaper.spawn(["sh", "-i"], stdin=slave, stdout=slave, stderr=slave,
                                     env=vm_env(self.files, {"TERM": term, **env}),
                                     cwd=str(self.files.work), start_new_session=True)
        finally:
            os.close(slave)
        masters[chan.get_id()] = master
        term_io = _PtyMaster(master)
        out = threading.Thread(target=_copy_out, args=(term_io, chan.sendall), daemon=True)
        out.start()
        threading.Thread(target=_copy_in, args=(chan, term_io), daemon=True).start()
        code = self.reaper.wait(proc)
        out.join(2)  # EIO on the master once the last holder of the terminal is gone
        masters.pop(chan.get_id(), None)
        try:
            chan.send_exit_status(exit_status(code))
            chan.close()
        except (OSError, EOFError, paramiko.SSHException):
            pass
        term_io.release()

    # -- servers

    def _start_embedded(self, addr) -> None:
        host_key = paramiko.Ed25519Key.from_private_key_file(str(self.files.host_key))
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(64)
        self._listener = sock
        threading.Thread(target=self._accept_loop, args=(sock, host_key), name="ssh-accept",
                         daemon=True).start()

    def _accept_loop(self, sock: socket.socket, host_key) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                return  # closed at power-off
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve_connection, args=(conn, host_key),
                             name="ssh-conn", daemon=True).start()

    def _serve_connection(self, conn: socket.socket, host_key) -> None:
        t = _ServerTransport(conn)
        t.add_server_key(host_key)
        try:
            t.start_server(server=_Session(self))
        except (paramiko.SSHException, EOFError, OSError) as e:
            log.info("ssh handshake failed", extra={"error": str(e)})
            t.close()
            return
        # paramiko keeps channels by weak reference: hold every open one until it closes (the
        # thread serving an exec or shell request also holds its channel while it runs).
        held: list[paramiko.Channel] = []
        while t.is_active():
            chan = t.accept(5)
            held = [c for c in held if not c.closed] + ([chan] if chan is not None else [])

    def _start_sshd(self, addr) -> None:
        """OpenSSH's sshd, foreground, as this VM's child; its sessions run :func:`exec_main`."""
        if not os.access(SSHD, os.X_OK):
            raise OSError(f"{SSHD} not found (install openssh-server)")
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation directory
        force = (f"PYTHONPATH='{source_root()}' '{sys.executable}' -m cloud.local.vm "
                 f"--exec-for '{self.files.root}'")
        cfg = self.files.root / "sshd_config"
        cfg.write_text("\n".join([
            f"ListenAddress {addr[0]}:{addr[1]}",
            f"HostKey {self.files.host_key}",
            f"AuthorizedKeysFile {self.files.authorized_keys}",
            f"PidFile {self.files.run / 'sshd.pid'}",
            f"AllowUsers {self.user}",
            "PermitRootLogin prohibit-password",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes no",
            "UseDNS no",
            "MaxSessions 1000",
            "MaxStartups 100",
            f"ForceCommand {force}",
        ]) + "\n")
        with open(self.files.root / "sshd.log", "ab") as out:
            self._sshd = self.reaper.spawn([SSHD, "-D", "-e", "-f", str(cfg)], stdin=subprocess.DEVNULL,
                                           stdout=out, stderr=out)
        if self.reaper.wait(self._sshd, 0.3) is not None:
            raise OSError(f"sshd exited with {self._sshd.returncode}; see {self.files.root}/sshd.log")


def _copy_out(pipe, send) -> None:
    try:
        while True:
            data = pipe.read1(_CHUNK)
            if not data:
                return
            send(data)
    except (OSError, EOFError, paramiko.SSHException):
        pass
    finally:
        pipe.close()


def _copy_in(chan: paramiko.Channel, pipe) -> None:
    try:
        while True:
            data = chan.recv(_CHUNK)
            if not data:
                return
            pipe.write(data)
            pipe.flush()
    except (OSError, EOFError, paramiko.SSHException):
        pass
    finally:
        try:
            pipe.close()
        except OSError:
            pass


class _PtyMaster:
    """A pty master fd shared by the two copy threads; only :meth:`release` closes it, under a
    lock, so a late write can never hit a recycled fd number."""

    def __init__(self, fd: int):
        self.fd = fd
        self._lock = threading.Lock()

    def read1(self, n: int) -> bytes:
        try:
            return os.read(self.fd, n)
        except OSError:  # EIO: the terminal's other side is closed
            return b""

    def write(self, data: bytes) -> None:
        with self._lock:
            if self.fd < 0:
                raise OSError("terminal closed")
            os.write(self.fd, data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass  # see release()

    def release(self) -> None:
        with self._lock:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1


def _set_winsize(fd: int, width: int, height: int) -> None:
    try:
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))
    except OSError:
        pass


def _set_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def exec_main(root: str) -> int:
    """sshd's ForceCommand: run ``$SSH_ORIGINAL_COMMAND`` as the embedded server would."""
    files = VMFiles(Path(root))
    env = vm_env(files, {"TERM": os.environ["TERM"]} if "TERM" in os.environ else {})
    os.chdir(files.work)
    if "SSH_ORIGINAL_COMMAND" not in os.environ:  # an interactive login
        os.execve("/bin/sh", ["sh", "-i"], env)
    cmd = shell_command(os.environ["SSH_ORIGINAL_COMMAND"], files.root)
    os.execve("/bin/sh", ["sh", "-c", cmd], env)
    return 127  # not reached


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cloud.local.vm",
                                description="One local VM: an SSH server on 127.0.0.N and what it runs.")
    p.add_argument("--state-dir", help="the instance's state directory (holds instance.json)")
    p.add_argument("--exec-for", metavar="DIR", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.exec_for:
        return exec_main(args.exec_for)
    if not args.state_dir:
        p.error("--state-dir is required")
    files = VMFiles(Path(args.state_dir))
    from conf import logsetup
    logsetup.setup("info")
    try:
        vm = LocalVM(files)
    except (OSError, ValueError) as e:
        print(f"localvm: {files.instance_json}: {e}", file=sys.stderr)
        return 1
    rc = vm.run()
    sys.stdout.flush()
    os._exit(rc)  # daemon threads may sit in accept()/recv(); the tree is already gone


if __name__ == "__main__":
    sys.exit(main())
