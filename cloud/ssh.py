"""The SSH executor (paramiko): how the dispatcher runs crunch-run's command lines on a VM.

The command lines themselves are :mod:`cloud.crunchrun`'s.

Behaviour follows Arvados ``lib/dispatchcloud/sshexecutor`` and ``worker/verify.go``:

* one persistent SSH transport per worker; every command is a fresh session channel on it;
  if a session cannot be opened the executor reconnects once and retries;
* any host key is accepted during the handshake, but before anything else runs on a new
  transport whose key differs from the last *verified* one, the key is verified: the driver's
  ``verify_host_key`` first, then (if the driver cannot, and the instance has a secret) the
  instance secret file written by the init command must read back exactly;
* environment variables are never sent: everything crunch-run needs travels as stdin JSON.

Two things Arvados does not have: every command has a deadline (enforced by one shared watchdog
thread that hangs up a stuck transport), and idle transports poll their socket every
``IDLE_POLL`` seconds instead of paramiko's 0.1 s, which is what makes hundreds of open
transports cheap (see bench/bench_ssh.py). Go sets no deadline on commands; ours are chosen per
command by the caller: the executor's short default (below ProbeInterval) for ``--list`` probes,
what is left of TimeoutBooting for the boot probe (which may legitimately wait, e.g.
``cloud-init status --wait``), and ``LONG_COMMAND_TIMEOUT`` for ``--detach``, ``--kill`` and
deploying the runner binary.
"""

from __future__ import annotations

import errno
import heapq
import io
import itertools
import logging
import select
import socket
import threading
import time
from collections.abc import Callable

import paramiko
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from cloud import base
from cloud.base import join_host_port, split_host_port
from cloud.crunchrun import instance_secret_command, needs_sudo
from conf.model import Cluster

# How long an idle transport thread sleeps in recv() before checking for close/keepalive.
# paramiko's default is 0.1 s: 10 wakeups per second per transport.
IDLE_POLL = 5.0
# Minimum stdin upload rate assumed when stretching a command's deadline for a big stdin
# (deploying a crunch-run binary of tens of MB must not hit a probe-sized timeout).
MIN_UPLOAD_RATE = 1 << 20  # bytes per second
# Deadline for commands that must not be cut short by a probe-sized timeout but must not hang a
# worker forever either: crunch-run --detach / --kill, the runner upload.
LONG_COMMAND_TIMEOUT = 300.0
_CHUNK = 1 << 15
# The watchdog hangs up a transport this long after a command's own deadline.
WATCHDOG_GRACE = 2.0
# Longest wait on a channel's fd before looking at its buffers again. paramiko's fd is fed by
# OrPipe/PosixPipe, whose set/clear flags have no lock: when the transport thread feeds stdout
# while this thread drains stderr (or the reverse) the fd can end up clear with data waiting,
# and nothing wakes a wait on it until more data or the deadline (seen on CI: a 4 MiB exchange
# hung for its whole 24 s).
LOST_WAKEUP_BOUND = 0.25

_log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Errors: all are base.ExecutorError, so callers need not know SSH.


class ConnectError(base.ExecutorError):
    """host:port could not be reached, or the SSH handshake failed or the connection dropped."""


class AuthError(base.ExecutorError):
    """The server refused the dispatcher's key for this user."""


class CommandTimeout(base.ExecutorError):
    """The command did not finish before its deadline; the transport was hung up."""


# ---------------------------------------------------------------------------------------------
# Keys


def load_private_key(text: str) -> paramiko.PKey:
    """The dispatcher's private key from PEM/OpenSSH text (Ed25519, ECDSA or RSA, unencrypted).

    Raises ValueError naming the problem, never echoing the key material.
    """
    data = text.strip().encode()
    if not data:
        raise ValueError("DispatchPrivateKey is empty")
    try:
        if b"OPENSSH PRIVATE KEY" in data:
            key = serialization.load_ssh_private_key(data, password=None)
        else:
            key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ValueError("DispatchPrivateKey is encrypted; a key without a passphrase is required") from None
    except (ValueError, UnsupportedAlgorithm) as e:
        raise ValueError(f"DispatchPrivateKey is not a readable private key ({type(e).__name__})") from None
    classes = ((ed25519.Ed25519PrivateKey, paramiko.Ed25519Key),
               (ec.EllipticCurvePrivateKey, paramiko.ECDSAKey),
               (rsa.RSAPrivateKey, paramiko.RSAKey))
    for ctype, ptype in classes:
        if isinstance(key, ctype):
            # paramiko reads every supported type from the OpenSSH container format.
            openssh = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                        serialization.NoEncryption()).decode()
            return ptype.from_private_key(io.StringIO(openssh))
    raise ValueError(f"DispatchPrivateKey has unsupported key type {type(key).__name__}; "
                     "use Ed25519, ECDSA or RSA")


# ---------------------------------------------------------------------------------------------
# Deadlines: one thread for every executor in the process.


class _Watchdog:
    """Calls ``action`` at ``deadline`` unless cancelled first. One thread, a heap of timers."""

    def __init__(self):
        self._heap: list = []
        self._cv = threading.Condition()
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._sleeping_until = float("inf")  # the thread's current wake-up time

    def arm(self, deadline: float, action: Callable[[], None]) -> list:
        entry = [deadline, next(self._seq), action]
        with self._cv:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="ssh-watchdog", daemon=True)
                self._thread.start()
            heapq.heappush(self._heap, entry)
            # Only wake the thread if it would sleep past this deadline: commands arm and cancel
            # one timer each, and waking a thread per command costs a context switch.
            if deadline < self._sleeping_until:
                self._cv.notify()
        return entry

    def cancel(self, entry: list) -> bool:
        """True if the action had not run (and now never will)."""
        with self._cv:
            fired = entry[2] is None
            entry[2] = None
            return not fired

    def _run(self):
        while True:
            with self._cv:
                while self._heap and self._heap[0][2] is None:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._sleeping_until = float("inf")
                    self._cv.wait()
                    continue
                delay = self._heap[0][0] - time.monotonic()
                if delay > 0:
                    self._sleeping_until = self._heap[0][0]
                    self._cv.wait(delay)
                    continue
                self._sleeping_until = float("-inf")  # busy: arm() need not notify
                entry = heapq.heappop(self._heap)
                action, entry[2] = entry[2], None
            try:
                action()
            except Exception:  # a failing hang-up must not kill every executor's deadlines
                _log.exception("ssh watchdog action failed")


_watchdog = _Watchdog()


# ---------------------------------------------------------------------------------------------
# The executor


def keepalive_interval(requested: float) -> int:
    """Seconds between keep-alives: 0 (off), else at least 1 — never more than once a second."""
    return 0 if requested <= 0 else max(1, int(round(requested)))


class SSHExecutor:
    """Runs commands on one instance over one persistent, host-key-verified SSH transport.

    ``execute`` is called from the worker pools' threads, several at once for one worker (a probe
    beside a start or a kill): they share the transport, and reconnects are serialized so that threads which all saw it fail make
    one new transport instead of hanging up each other's. ``set_target`` and ``close`` may come
    from other threads and never wait for a running command.
    """

    def __init__(self, target: base.Instance, *, private_key: paramiko.PKey, port: str = "22",
                 secret: str | None = None, connect_timeout: float = 10, auth_timeout: float = 10,
                 command_timeout: float = 60, keepalive: float = 0,
                 on_verified: Callable[[], None] | None = None, logger=None):
        self._target = target
        self._key = private_key
        self._port = port
        self._secret = secret or None
        self._connect_timeout = connect_timeout
        self._auth_timeout = auth_timeout
        self._command_timeout = command_timeout
        self._keepalive = keepalive_interval(keepalive)
        self._on_verified = on_verified
        self._log = logger or _log
        self._lock = threading.Lock()  # guards _transport and _closed
        self._connecting = threading.Lock()  # one reconnect at a time (never taken by close)
        self._transport: paramiko.Transport | None = None
        self._closed = False
        self._verified_key: bytes | None = None
        self.connects = 0  # transports successfully set up (for tests and metrics)

    # -- Executor protocol

    def set_target(self, instance: base.Instance) -> None:
        self._target = instance

    def close(self) -> None:
        with self._lock:
            self._closed = True
            t, self._transport = self._transport, None
        if t is not None:
            _hang_up(t)

    def execute(self, command: str, stdin: bytes = b"", timeout: float | None = None) -> base.ExecResult:
        """Run ``command``; a non-zero exit is a result, anything else an ExecutorError.

        ``timeout`` (seconds) replaces the executor's command timeout for this command."""
        t = self._current()
        chan = None
        if t is not None:
            try:
                chan = t.open_session(timeout=self._auth_timeout)
            except (paramiko.SSHException, EOFError, OSError) as e:
                self._log.info("ssh session failed, reconnecting", extra=self._fields(error=str(e)))
        if chan is None:
            t = self._reconnect(t)
            try:
                chan = t.open_session(timeout=self._auth_timeout)
            except (paramiko.SSHException, EOFError, OSError) as e:
                raise ConnectError(f"ssh {self._where()}: cannot open session: {e}") from None
        return self._run(t, chan, command, stdin, timeout)

    # -- connection

    def _current(self) -> paramiko.Transport | None:
        with self._lock:
            if self._closed:
                raise base.ExecutorError("executor is closed")
            t = self._transport
        return t if t is not None and t.is_active() else None

    def _reconnect(self, failed: paramiko.Transport | None) -> paramiko.Transport:
        """A new transport in place of ``failed`` (None: the current one was not active), unless
        another thread has already replaced it with a working one while this one waited."""
        with self._connecting:
            with self._lock:
                if self._closed:
                    raise base.ExecutorError("executor is closed")
                old = self._transport
            if old is not None and old is not failed and old.is_active():
                return old
            if old is not None:
                _hang_up(old)
            t = self._connect()
            with self._lock:
                if self._closed:
                    _hang_up(t)
                    raise base.ExecutorError("executor is closed")
                self._transport = t
            self.connects += 1
            return t

    def _host_port(self, target: base.Instance | None = None) -> tuple[str, str]:
        addr = (target or self._target).address
        if not addr:
            raise base.NoAddress()
        host, port = split_host_port(addr)
        return host, port or self._port or "22"

    def _where(self) -> str:
        try:
            return join_host_port(*self._host_port())
        except base.NoAddress:
            return "(no address)"

    def _fields(self, **kw) -> dict:
        return {"Instance": getattr(self._target, "id", ""), "Address": self._where(), **kw}

    def _connect(self) -> paramiko.Transport:
        target = self._target  # one snapshot for the whole connection, whatever set_target does
        host, port = self._host_port(target)
        where = join_host_port(host, port)
        try:
            portnum = int(port) if port.isdigit() else socket.getservbyname(port, "tcp")
        except OSError:
            raise ConnectError(f"ssh {where}: unknown port {port!r}") from None
        try:
            sock = socket.create_connection((host, portnum), timeout=self._connect_timeout)
        except ConnectionRefusedError:
            raise ConnectError(f"ssh {where}: connection refused") from None
        except TimeoutError:
            raise ConnectError(f"ssh {where}: connect timed out after {self._connect_timeout:g}s") from None
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE):
                self._log.error("out of file descriptors: cannot open an SSH connection",
                                extra=self._fields(error=e.strerror or str(e)))
            raise ConnectError(f"ssh {where}: cannot connect: {e.strerror or e}") from None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            t = paramiko.Transport(sock)
        except BaseException:
            sock.close()
            raise
        t.banner_timeout = t.handshake_timeout = self._connect_timeout
        t.auth_timeout = self._auth_timeout
        try:
            done = threading.Event()
            t.start_client(event=done)  # returns at once; the transport thread negotiates
            if not done.wait(self._connect_timeout):
                raise ConnectError(f"ssh {where}: handshake timed out after {self._connect_timeout:g}s")
            if not t.is_active():
                e = t.get_exception()
                raise ConnectError(f"ssh {where}: handshake failed: {e or 'connection closed'}")
            # The handshake is done: from now on the transport thread only needs to wake for
            # data, close and keep-alive, so poll the socket rarely (idle CPU, see module doc).
            sock.settimeout(min(IDLE_POLL, self._keepalive) if self._keepalive else IDLE_POLL)
            if self._keepalive:
                t.set_keepalive(self._keepalive)
            user = target.remote_user
            try:
                t.auth_publickey(user, self._key)
            except paramiko.AuthenticationException as e:
                raise AuthError(f"ssh {where}: authentication failed for user {user!r}: {e}") from None
            except (paramiko.SSHException, EOFError, OSError) as e:
                raise ConnectError(f"ssh {where}: authentication did not complete: {e}") from None
            key = t.get_remote_server_key()
            if key.asbytes() != self._verified_key:
                self._verify(t, key, where, target)
                self._verified_key = key.asbytes()
        except BaseException:
            _hang_up(t)
            raise
        self._log.debug("ssh connected", extra=self._fields())
        return t

    def _verify(self, t: paramiko.Transport, key: paramiko.PKey, where: str,
                target: base.Instance) -> None:
        """TagVerifier.VerifyHostKey: driver first, then the instance secret; nothing else runs."""
        if self._on_verified is not None:
            try:
                self._on_verified()
            except Exception:  # a metrics callback must not decide whether a host is trusted
                self._log.exception("on_verified callback failed", extra=self._fields())
        fields = self._fields(HostKey=f"{key.get_name()} {key.fingerprint}")
        try:
            target.verify_host_key(key, t)
            return
        except base.NotSupported as e:
            if self._secret is None:
                self._log.warning("cannot verify host key", extra={**fields, "error": str(e)})
                raise base.HostKeyError(f"ssh {where}: cannot verify host key: driver cannot ({e}) "
                                        "and the instance has no secret") from None
        except base.HostKeyError as e:
            self._log.warning("host key rejected", extra={**fields, "error": str(e)})
            raise base.HostKeyError(f"ssh {where}: host key rejected: {e}") from None
        except Exception as e:
            self._log.warning("host key rejected", extra={**fields, "error": str(e)})
            raise base.HostKeyError(f"ssh {where}: host key rejected: {type(e).__name__}: {e}") from None
        cmd = instance_secret_command(needs_sudo(target.remote_user))
        try:
            chan = t.open_session(timeout=self._auth_timeout)
        except (paramiko.SSHException, EOFError, OSError) as e:
            raise ConnectError(f"ssh {where}: cannot open session to check instance secret: {e}") from None
        res = self._run(t, chan, cmd, b"")
        if res.exit_status != 0 or res.stdout.decode(errors="replace") != self._secret:
            self._log.warning("bad instance secret", extra={**fields, "ExitStatus": res.exit_status,
                                                            "stderr": res.stderr[:200].decode(errors="replace")})
            raise base.HostKeyError(f"ssh {where}: bad instance secret")

    # -- one command

    def _run(self, t: paramiko.Transport, chan: paramiko.Channel, command: str,
             stdin: bytes, timeout: float | None = None) -> base.ExecResult:
        where = self._where()
        timeout = (self._command_timeout if timeout is None else timeout) + len(stdin) / MIN_UPLOAD_RATE
        deadline = time.monotonic() + timeout
        # The read loop honours the deadline itself and keeps the transport; the watchdog (a
        # little later) covers the waits paramiko gives no timeout for (the exec reply).
        timer = _watchdog.arm(deadline + WATCHDOG_GRACE, lambda: _hang_up(t))
        try:
            return _exchange(chan, command, stdin, deadline)
        except _Deadline:
            raise CommandTimeout(f"ssh {where}: command timed out after {timeout:g}s") from None
        except (paramiko.SSHException, EOFError, OSError, _Lost) as e:
            if _watchdog.cancel(timer):
                raise ConnectError(f"ssh {where}: connection lost during command: "
                                   f"{e or type(e).__name__}") from None
            raise CommandTimeout(f"ssh {where}: command timed out after {timeout:g}s "
                                 "(connection hung up)") from None
        finally:
            _watchdog.cancel(timer)
            _close_quietly(chan)


class _Lost(Exception):
    """The channel closed without an exit status."""


class _Deadline(Exception):
    """The command's deadline passed while waiting for its output or exit status."""


def _exchange(chan: paramiko.Channel, command: str, stdin: bytes, deadline: float) -> base.ExecResult:
    """Exec, stream stdin while draining stdout and stderr (no window deadlock), collect status."""
    chan.exec_command(command)
    chan.settimeout(0.0)
    # readable while stdout or stderr has data (or the channel closed); poll(), not select(),
    # which raises ValueError once the process holds more than 1024 descriptors
    poller = select.poll()
    poller.register(chan.fileno(), select.POLLIN)
    out: list[bytes] = []
    err: list[bytes] = []
    view = memoryview(stdin)
    sent = 0
    eof_sent = False
    while True:
        if not eof_sent:
            while sent < len(view) and chan.send_ready():
                sent += chan.send(view[sent:sent + _CHUNK])
            if sent >= len(view):
                chan.shutdown_write()
                eof_sent = True
        while chan.recv_ready():
            out.append(chan.recv(_CHUNK * 2))
        while chan.recv_stderr_ready():
            err.append(chan.recv_stderr(_CHUNK * 2))
        if chan.eof_received or chan.closed:
            break
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Deadline()
        # Writable-readiness has no fd: poll briefly while stdin is blocked on the window. The fd
        # itself can miss a wake-up (LOST_WAKEUP_BOUND), so no wait is longer than that.
        poller.poll(1000 * min(remaining, 0.02 if not eof_sent else LOST_WAKEUP_BOUND))
    # EOF closed both buffers: drain what is left, then wait for the exit status.
    while chan.recv_ready():
        out.append(chan.recv(_CHUNK * 2))
    while chan.recv_stderr_ready():
        err.append(chan.recv_stderr(_CHUNK * 2))
    if not chan.status_event.wait(max(0.0, deadline - time.monotonic())):
        raise _Deadline()
    status = chan.exit_status
    if status == -1:
        raise _Lost()
    return base.ExecResult(b"".join(out), b"".join(err), status)


def _close_quietly(chan: paramiko.Channel) -> None:
    """Close a channel whose outcome is already decided. On a transport that is being hung up
    (watchdog, another thread's reconnect, the host going away) paramiko's close() can raise
    EOFError or OSError while sending CLOSE; that must neither replace the command's error nor
    escape as something other than an ExecutorError (the next execute() reconnects)."""
    try:
        chan.close()
    except (paramiko.SSHException, EOFError, OSError):
        pass


def _hang_up(t: paramiko.Transport) -> None:
    """Close a transport now: shutdown() wakes its thread out of the long recv()."""
    sock = t.sock
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    t.close()


# ---------------------------------------------------------------------------------------------
# Wiring


def _driver_set(instance_set):
    """The innermost InstanceSet under the wrapper stack of cloud.base.wrap."""
    s, seen = instance_set, set()
    while s is not None and id(s) not in seen:
        if hasattr(s, "make_executor"):
            return s
        seen.add(id(s))
        s = getattr(s, "_inner", None)
    return None


def executor_for(cluster: Cluster, instance_set, instance: base.Instance, *, secret: str | None = None,
                 on_verified: Callable[[], None] | None = None, logger=None) -> base.Executor:
    """The driver's own executor if it has one (stub cloud), else SSH with the dispatcher key.

    Connect, auth and the default command timeout (used by ``--list`` probes) stay below
    ProbeInterval so a dead VM costs one probe slot, not several; callers pass longer ones for the
    boot probe and ``--detach``/``--kill``.
    """
    driver = _driver_set(instance_set)
    if driver is not None:
        return driver.make_executor(instance)
    vms = cluster.cloud_vms
    t = max(0.5, min(10.0, vms.probe_interval * 0.8))
    return SSHExecutor(instance, private_key=load_private_key(cluster.containers.dispatch_private_key),
                       port=vms.ssh_port, secret=secret, connect_timeout=t, auth_timeout=t,
                       command_timeout=max(t, min(60.0, vms.probe_interval * 0.8)),
                       on_verified=on_verified, logger=logger)


def public_key_line(private_pem: str) -> str | None:
    """The ``authorized_keys`` line for the dispatcher's key (None without a key)."""
    if not private_pem:
        return None
    k = load_private_key(private_pem)
    return f"{k.get_name()} {k.get_base64()}"
