"""The SSH executor against a real OpenSSH sshd on loopback, and the exact command lines."""

from __future__ import annotations

import os
import socket
import threading
import time

import paramiko
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, rsa

from cloud import base, ssh
from conf.model import Cluster, CloudVMs, Containers
from tests.sshd import sshd, sshd_factory  # noqa: F401  (fixtures)
from tests.util import run_threads

TOKEN = "xyzzy-systemroottoken-f00"
SECRET = "0123456789abcdef0123456789abcdef01234567"


class Target:
    """A minimal cloud.base.Instance whose host-key check is scripted per test."""

    def __init__(self, address: str, user: str = "root", verify=None):
        self.id = "inst-1"
        self.address = address
        self.remote_user = self.user = user
        self.provider_type = "t"
        self.tags = {}
        self._verify = verify or self.not_supported
        self.verified_keys: list[bytes] = []

    @staticmethod
    def not_supported(key, transport):
        raise base.NotSupported("driver cannot verify host keys")

    def verify_host_key(self, key, transport):
        self.verified_keys.append(key.asbytes())
        return self._verify(key, transport)


def accept(key, transport):
    return None


def executor(server, target=None, **kw) -> ssh.SSHExecutor:
    """An executor for ``server``; without a target or secret the driver accepts the host key."""
    if target is None:
        target = Target(server.address, verify=None if kw.get("secret") else accept)
    kw.setdefault("connect_timeout", 3)
    kw.setdefault("auth_timeout", 3)
    kw.setdefault("command_timeout", 10)
    return ssh.SSHExecutor(target, private_key=server.client_key, **kw)


@pytest.fixture
def closing():
    """Executors registered here are closed after the test."""
    made: list[ssh.SSHExecutor] = []
    yield made.append
    for e in made:
        e.close()


# ---------------------------------------------------------------------------------------------
# Keys


def _pem(key, fmt) -> str:
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption()).decode()


@pytest.mark.parametrize("make,fmt,cls", [
    (ed25519.Ed25519PrivateKey.generate, serialization.PrivateFormat.OpenSSH, paramiko.Ed25519Key),
    (ed25519.Ed25519PrivateKey.generate, serialization.PrivateFormat.PKCS8, paramiko.Ed25519Key),
    (lambda: ec.generate_private_key(ec.SECP256R1()), serialization.PrivateFormat.TraditionalOpenSSL,
     paramiko.ECDSAKey),
    (lambda: rsa.generate_private_key(65537, 2048), serialization.PrivateFormat.TraditionalOpenSSL,
     paramiko.RSAKey),
    (lambda: rsa.generate_private_key(65537, 2048), serialization.PrivateFormat.PKCS8, paramiko.RSAKey),
    (lambda: rsa.generate_private_key(65537, 2048), serialization.PrivateFormat.OpenSSH, paramiko.RSAKey),
])
def test_load_private_key_formats(make, fmt, cls):
    key = make()
    loaded = ssh.load_private_key(_pem(key, fmt))
    assert isinstance(loaded, cls)
    assert loaded.can_sign()


def test_load_private_key_errors_never_echo_the_key():
    garbage = "-----BEGIN OPENSSH PRIVATE KEY-----\nbm90IGEga2V5\n-----END OPENSSH PRIVATE KEY-----\n"
    with pytest.raises(ValueError, match="DispatchPrivateKey is not a readable private key") as e:
        ssh.load_private_key(garbage)
    assert "bm90IGEga2V5" not in str(e.value)
    with pytest.raises(ValueError, match="empty"):
        ssh.load_private_key("  \n")
    enc = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.BestAvailableEncryption(b"pw")).decode()
    with pytest.raises(ValueError, match="passphrase"):
        ssh.load_private_key(enc)
    with pytest.raises(ValueError, match="unsupported key type"):
        ssh.load_private_key(_pem(dsa.generate_private_key(1024), serialization.PrivateFormat.PKCS8))


@pytest.mark.parametrize("asked,got", [(0, 0), (-1, 0), (0.2, 1), (1, 1), (30, 30)])
def test_keepalive_never_more_than_once_a_second(asked, got):
    assert ssh.keepalive_interval(asked) == got


# ---------------------------------------------------------------------------------------------
# executor_for


class _StubSet:
    def __init__(self):
        self.asked = []

    def make_executor(self, instance):
        self.asked.append(instance)
        return "stub-executor"

    def create(self, *a):
        raise AssertionError

    def instances(self, tags):
        return []

    def instance_quota_group(self, it):
        return ""

    def stop(self):
        pass


def test_executor_for_prefers_driver_executor_through_wrappers():
    stub = _StubSet()
    wrapped = base.wrap(stub, resource_tags={})
    inst = Target("")
    assert ssh.executor_for(Cluster(), wrapped, inst) == "stub-executor"
    assert stub.asked == [inst]


def test_executor_for_builds_ssh_executor_from_config():
    pem = _pem(ed25519.Ed25519PrivateKey.generate(), serialization.PrivateFormat.OpenSSH)
    cluster = Cluster(containers=Containers(dispatch_private_key=pem,
                                            cloud_vms=CloudVMs(ssh_port="2222", probe_interval=5)))
    ex = ssh.executor_for(cluster, object(), Target("10.0.0.1"), secret="s")
    assert isinstance(ex, ssh.SSHExecutor) and isinstance(ex, base.Executor)
    assert ex._host_port() == ("10.0.0.1", "2222")
    assert ex._connect_timeout < 5 and ex._auth_timeout < 5 and ex._command_timeout < 5
    with pytest.raises(ValueError, match="DispatchPrivateKey"):
        ssh.executor_for(Cluster(), object(), Target("10.0.0.1"))


# ---------------------------------------------------------------------------------------------
# Against a real sshd


def test_commands_share_one_transport(sshd, closing):
    ex = executor(sshd)
    closing(ex)
    results = [ex.execute(f"echo {i}; echo e{i} >&2", stdin=b"") for i in range(5)]
    assert [r.stdout for r in results] == [f"{i}\n".encode() for i in range(5)]
    assert [r.stderr for r in results] == [f"e{i}\n".encode() for i in range(5)]
    assert ex.connects == 1
    assert sshd.accepted_logins() == 1
    assert [r.command for r in sshd.received()][-5:] == [f"echo {i}; echo e{i} >&2" for i in range(5)]


def test_exit_status_and_stdin(sshd, closing):
    ex = executor(sshd)
    closing(ex)
    r = ex.execute("cat; echo oops >&2; exit 7", stdin=b"hello")
    assert (r.stdout, r.stderr, r.exit_status, r.ok) == (b"hello", b"oops\n", 7, False)
    assert sshd.received()[-1].stdin == b"hello"
    assert ex.execute("true").ok


def test_large_stdin_stdout_stderr_without_deadlock(sshd_factory, closing):
    # No recording wrapper: cat streams stdin back while we are still sending, so the executor
    # must read stdout and stderr while it writes or both sides stall on the SSH window.
    server = sshd_factory(record=False)
    ex = executor(server, command_timeout=20)
    closing(ex)
    data = bytes(range(256)) * (16 << 10)  # 4 MiB
    r = ex.execute("head -c 3000000 /dev/zero >&2 & cat; wait", stdin=data)
    assert r.exit_status == 0
    assert r.stdout == data
    assert r.stderr == b"\0" * 3000000


def test_secret_verification_passes_then_commands_run(sshd, closing):
    sshd.set_secret(SECRET)
    target = Target(sshd.address)
    seen = []
    ex = executor(sshd, target, secret=SECRET, on_verified=lambda: seen.append(1))
    closing(ex)
    assert ex.execute("echo ok", stdin=TOKEN.encode()).stdout == b"ok\n"
    ex.execute("true")
    got = sshd.received()
    assert [g.command for g in got] == ["cat /var/run/arvados-instance-secret", "echo ok", "true"]
    assert got[0].stdin == b""
    assert seen == [1] and len(target.verified_keys) == 1
    assert target.verified_keys[0] == sshd.host_key.asbytes()


@pytest.mark.parametrize("served", ["wrong-secret", SECRET + "\n", ""])
def test_bad_secret_fails_and_no_token_is_sent(sshd, closing, served):
    sshd.set_secret(served)
    ex = executor(sshd, secret=SECRET)
    closing(ex)
    for _ in range(2):  # a retry must not slip the command through either
        with pytest.raises(base.HostKeyError, match="bad instance secret") as e:
            ex.execute("crunch-run --detach", stdin=b'{"ARVADOS_API_TOKEN":"' + TOKEN.encode() + b'"}')
        assert sshd.address in str(e.value)
    got = sshd.received()
    assert [g.command for g in got] == ["cat /var/run/arvados-instance-secret"] * 2
    assert not any(TOKEN.encode() in g.stdin for g in got)


def test_driver_rejection_is_final(sshd, closing):
    def mismatch(key, transport):
        raise base.HostKeyError("key does not match the one the cloud reported")

    sshd.set_secret(SECRET)
    ex = executor(sshd, Target(sshd.address, verify=mismatch), secret=SECRET)
    closing(ex)
    with pytest.raises(base.HostKeyError, match="does not match"):
        ex.execute("crunch-run --detach", stdin=TOKEN.encode())
    assert sshd.received() == []  # not even the secret check: the driver's answer is final


def test_driver_approval_skips_secret_check(sshd, closing):
    ex = executor(sshd, Target(sshd.address, verify=accept), secret=SECRET)
    closing(ex)
    assert ex.execute("echo hi").stdout == b"hi\n"
    assert [g.command for g in sshd.received()] == ["echo hi"]


def test_no_driver_support_and_no_secret_fails(sshd, closing):
    ex = executor(sshd, Target(sshd.address))
    closing(ex)
    with pytest.raises(base.HostKeyError, match="no secret"):
        ex.execute("true")
    assert sshd.received() == []


def test_reconnect_after_restart_and_reverify_changed_host_key(sshd, closing):
    sshd.set_secret(SECRET)
    target = Target(sshd.address)
    seen = []
    ex = executor(sshd, target, secret=SECRET, on_verified=lambda: seen.append(1))
    closing(ex)
    assert ex.execute("echo 1").stdout == b"1\n"

    sshd.restart()  # same host key: reconnect without verifying again
    assert ex.execute("echo 2").stdout == b"2\n"
    assert ex.connects == 2 and len(target.verified_keys) == 1 and seen == [1]

    old = sshd.host_key.asbytes()
    sshd.restart(new_host_key=True)
    assert ex.execute("echo 3").stdout == b"3\n"
    assert ex.connects == 3 and seen == [1, 1]
    assert target.verified_keys == [old, sshd.host_key.asbytes()]
    cmds = [g.command for g in sshd.received()]
    assert cmds == ["cat /var/run/arvados-instance-secret", "echo 1", "echo 2",
                    "cat /var/run/arvados-instance-secret", "echo 3"]


def test_changed_host_key_with_wrong_secret_is_refused(sshd, closing):
    sshd.set_secret(SECRET)
    ex = executor(sshd, secret=SECRET)
    closing(ex)
    ex.execute("true")
    sshd.set_secret("an impostor")
    sshd.restart(new_host_key=True)
    with pytest.raises(base.HostKeyError):
        ex.execute("echo token", stdin=TOKEN.encode())
    assert "echo token" not in [g.command for g in sshd.received()]


def test_wrong_port_fails_fast_with_clear_error(closing):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens here
    ex = ssh.SSHExecutor(Target(f"127.0.0.1:{port}"), private_key=_key())
    closing(ex)
    t0 = time.monotonic()
    with pytest.raises(ssh.ConnectError, match=f"127.0.0.1:{port}: connection refused"):
        ex.execute("true")
    assert time.monotonic() - t0 < 2


def _key():
    return ssh.load_private_key(_pem(ed25519.Ed25519PrivateKey.generate(), serialization.PrivateFormat.OpenSSH))


def test_port_comes_from_config_when_address_has_none(sshd, closing):
    ex = ssh.SSHExecutor(Target("127.0.0.1", verify=accept), private_key=sshd.client_key,
                         port=str(sshd.port))
    closing(ex)
    assert ex.execute("echo p").stdout == b"p\n"


def test_silent_host_times_out_with_clear_error(closing):
    with socket.socket() as s:  # accepts TCP (kernel backlog) but never speaks SSH
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        port = s.getsockname()[1]
        ex = ssh.SSHExecutor(Target(f"127.0.0.1:{port}"), private_key=_key(), connect_timeout=0.5)
        closing(ex)
        t0 = time.monotonic()
        with pytest.raises(ssh.ConnectError, match=f"127.0.0.1:{port}: handshake (failed|timed out)"):
            ex.execute("true")
        assert time.monotonic() - t0 < 3


def test_no_address(closing):
    ex = ssh.SSHExecutor(Target(""), private_key=_key())
    closing(ex)
    with pytest.raises(base.NoAddress):
        ex.execute("true")


def test_auth_failure_names_user_and_address(sshd, closing):
    ex = ssh.SSHExecutor(Target(sshd.address, user="root"), private_key=_key(), auth_timeout=3)
    closing(ex)
    with pytest.raises(ssh.AuthError, match=f"{sshd.address}: authentication failed for user 'root'"):
        ex.execute("true")
    assert sshd.received() == []


def test_command_timeout_keeps_transport(sshd, closing):
    ex = executor(sshd, Target(sshd.address, verify=accept), command_timeout=0.5)
    closing(ex)
    t0 = time.monotonic()
    with pytest.raises(ssh.CommandTimeout, match="timed out after 0.5s"):
        ex.execute("sleep 5")
    assert time.monotonic() - t0 < 2
    assert ex.execute("echo after").stdout == b"after\n"
    assert ex.connects == 1


def test_watchdog_fires_once_unless_cancelled():
    ran = threading.Event()
    w = ssh._Watchdog()
    entry = w.arm(time.monotonic() + 0.05, ran.set)
    assert ran.wait(2)
    assert not w.cancel(entry)  # already fired
    later = threading.Event()
    entry = w.arm(time.monotonic() + 0.2, later.set)
    assert w.cancel(entry)
    assert not later.wait(0.4)


def test_close_refuses_further_commands(sshd):
    ex = executor(sshd, Target(sshd.address, verify=accept))
    assert ex.execute("true").ok
    t = ex._transport
    ex.close()
    with pytest.raises(base.ExecutorError, match="closed"):
        ex.execute("true")
    t.join(2)
    assert not t.is_alive()


def test_set_target_used_at_next_connection(sshd_factory, closing):
    a, b = sshd_factory(), sshd_factory()
    b.client_key = a.client_key
    (b.dir / "authorized_keys").write_text((a.dir / "authorized_keys").read_text())
    target = Target(a.address, verify=accept)
    ex = executor(a, target)
    closing(ex)
    ex.execute("echo a")
    ex.set_target(Target(b.address, verify=accept))
    ex.execute("echo still-a")  # the live transport is kept
    a.stop()
    assert ex.execute("echo b").stdout == b"b\n"
    assert [g.command for g in b.received()] == ["echo b"]


@pytest.mark.parametrize("keepalive,poll", [(0, ssh.IDLE_POLL), (2, 2)])
def test_idle_transport_polls_rarely_and_keepalive_is_set(sshd, closing, keepalive, poll):
    ex = executor(sshd, keepalive=keepalive)
    closing(ex)
    ex.execute("true")
    t = ex._transport
    # paramiko's own 0.1 s poll would wake 10 times a second per idle transport (bench_ssh.py).
    assert t.sock.gettimeout() == poll
    assert t.packetizer._Packetizer__keepalive_interval == keepalive
    assert t.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def test_threads_that_all_lose_the_transport_make_one_new_one(sshd, closing):
    """Several threads whose shared transport died reconnect once, and nobody hangs up the new
    transport under another thread's command (which showed as 'Unable to open channel.' and
    'Channel closed.' in a stress loop)."""
    ex = executor(sshd, Target(sshd.address, verify=accept))
    closing(ex)
    assert ex.execute("true").ok
    dead = ex._transport
    ssh._hang_up(dead)
    dead.join(2)
    start = threading.Barrier(6)
    results: dict[int, object] = {}

    def run(k):
        start.wait(5)
        try:
            results[k] = ex.execute(f"sleep 0.2; echo {k}").stdout
        except base.ExecutorError as e:
            results[k] = e
    run_threads(run, [(k,) for k in range(6)], 30)
    assert results == {k: f"{k}\n".encode() for k in range(6)}
    assert ex.connects == 2


def test_a_failing_channel_close_never_escapes_as_a_non_executor_error(sshd, closing, monkeypatch):
    """On a transport being hung up, paramiko's Channel.close() raises EOFError while sending
    CLOSE; the command's own outcome (result, timeout) must still be what execute() reports."""
    ex = executor(sshd, Target(sshd.address, verify=accept), command_timeout=0.5)
    closing(ex)
    assert ex.execute("true").ok

    def close_on_dead_transport(self):
        raise EOFError()
    monkeypatch.setattr(paramiko.Channel, "close", close_on_dead_transport)
    assert ex.execute("echo done").stdout == b"done\n"
    with pytest.raises(ssh.CommandTimeout):
        ex.execute("sleep 5")


class _SilentChannel:
    """A channel whose data arrives without its poll fd turning readable: what paramiko's
    OrPipe/PosixPipe do when the transport thread feeds one buffer while the reader drains the
    other (their set/clear flags have no lock, so the last set can be undone by a clear)."""

    def __init__(self):
        self._rfd, self._wfd = os.pipe()
        self.polls = 0
        self.eof_received = self.closed = False
        self.status_event = threading.Event()
        self.exit_status = -1
        self._out = []

    def exec_command(self, command): pass
    def settimeout(self, t): pass
    def fileno(self): return self._rfd
    def send_ready(self): return False
    def shutdown_write(self): pass
    def recv_stderr_ready(self): return False

    def recv_ready(self):
        # The data and the EOF land on the second look, with no byte on the fd.
        self.polls += 1
        if self.polls == 2:
            self._out.append(b"late")
            self.eof_received = True
            self.exit_status = 0
            self.status_event.set()
        return bool(self._out)

    def recv(self, n):
        return self._out.pop()

    def close(self):
        os.close(self._rfd)
        os.close(self._wfd)


def test_exchange_survives_a_lost_wakeup_from_paramikos_pipe():
    """CI hung here for the whole deadline (test_large_stdin_... on paramiko 3.5): stdout data
    sat in the buffer while poll() waited on an fd the racy OrPipe had cleared. The wait is now
    bounded, so data that arrives without a wake-up is read within a fraction of a second."""
    chan = _SilentChannel()
    try:
        began = time.monotonic()
        r = ssh._exchange(chan, "cat", b"", began + 10)
        assert (r.stdout, r.exit_status) == (b"late", 0)
        assert time.monotonic() - began < ssh.LOST_WAKEUP_BOUND + 2
    finally:
        chan.close()
