"""G5: the SystemRootToken never reaches a host whose key fails verification, and no secret is
logged. A real OpenSSH sshd records every command and stdin it receives; the dispatcher side
sends the real ``crunch-run --detach`` command with the real stdin config (which carries the
token) through the SSH executor, as a worker does."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from cloud import base, crunchrun, ssh
from conf.loader import load_text
from tests import g5
from tests.sshd import sshd, sshd_factory  # noqa: F401  (fixtures)

TOKEN = "g5-systemroottoken-0123456789abcdef"
MGMT = "g5-managementtoken-fedcba9876543210"
SECRET = "g5-instance-secret-5555aaaa5555aaaa5555"
UUID = "zzzzz-dz642-g5g5g5g5g5g5g5g"
CONFIG = f"""
Clusters:
  zzzzz:
    SystemRootToken: {TOKEN}
    ManagementToken: {MGMT}
    Services: {{Controller: {{ExternalURL: "https://zzzzz.example.com"}}}}
    Containers: {{CloudVMs: {{Driver: stub}}, LocalKeepBlobBuffersPerVCPU: 0}}
    InstanceTypes: {{small: {{RAM: 1GiB, Price: 0.1}}}}
"""


class Target:
    def __init__(self, address: str, verify):
        self.id = "inst-g5"
        self.address = address
        self.remote_user = "root"
        self.provider_type = "t"
        self.tags = {}
        self._verify = verify

    def verify_host_key(self, key, transport):
        return self._verify(key, transport)


def cannot(key, transport):
    raise base.NotSupported("driver cannot verify host keys")


def mismatch(key, transport):
    raise base.HostKeyError("host key does not match the one the cloud reported")


def start(ex: ssh.SSHExecutor, cluster):
    """What a worker sends to start a container: the real command line and stdin."""
    it = cluster.instance_types["small"]
    payload = crunchrun.config_data(cluster, it, ex._target.address, UUID)
    assert TOKEN.encode() in payload  # the token does travel in it
    cmd = crunchrun.detach_command("crunch-run", crunchrun.runner_args(cluster), UUID, False)
    return ex.execute(cmd, stdin=payload)


def reached(server) -> bool:
    """Whether the token reached the host: in any command, stdin, or the sshd log."""
    if any(TOKEN in r.command or TOKEN.encode() in r.stdin for r in server.received()):
        return True
    return any(TOKEN.encode() in p.read_bytes() for p in Path(server.dir).rglob("*") if p.is_file())


def make(server, verify, **kw) -> ssh.SSHExecutor:
    return ssh.SSHExecutor(Target(server.address, verify), private_key=server.client_key, secret=SECRET,
                           connect_timeout=3, auth_timeout=3, command_timeout=10, **kw)


@pytest.fixture
def cluster():
    return load_text(CONFIG)


@pytest.fixture
def logs(caplog):
    caplog.set_level(logging.DEBUG, logger="cloud")
    caplog.set_level(logging.DEBUG, logger="dispatch")
    yield caplog
    for s in (TOKEN, MGMT, SECRET):
        assert s not in caplog.text


def test_control_a_verified_host_does_get_the_token(sshd, cluster, logs):
    sshd.set_secret(SECRET)
    ex = make(sshd, cannot)
    try:
        start(ex, cluster)
    finally:
        ex.close()
    assert reached(sshd)  # so the checks below can fail


def test_wrong_host_key_never_gets_the_token(sshd, cluster, logs):
    sshd.set_secret(SECRET)
    ex = make(sshd, mismatch)
    try:
        with pytest.raises(base.HostKeyError) as e:
            start(ex, cluster)
    finally:
        ex.close()
    assert not reached(sshd) and sshd.received() == []
    assert TOKEN not in str(e.value) and SECRET not in str(e.value)


@pytest.mark.parametrize("served", ["an impostor", SECRET + "x", ""])
def test_wrong_instance_secret_never_gets_the_token(sshd, cluster, logs, served):
    sshd.set_secret(served)
    ex = make(sshd, cannot)
    try:
        for _ in range(2):  # and not on a second try either
            with pytest.raises(base.HostKeyError) as e:
                start(ex, cluster)
            assert TOKEN not in str(e.value) and SECRET not in str(e.value)
    finally:
        ex.close()
    assert not reached(sshd)
    assert [r.command for r in sshd.received()] == ["cat /var/run/arvados-instance-secret"] * 2


def test_host_key_changed_on_reconnect_never_gets_the_token(sshd, cluster, logs):
    sshd.set_secret(SECRET)
    ex = make(sshd, cannot)
    try:
        assert ex.execute("true").exit_status == 0  # verified once
        sshd.set_secret("an impostor")
        sshd.restart(new_host_key=True)  # another machine at the same address
        with pytest.raises(base.HostKeyError):
            start(ex, cluster)
    finally:
        ex.close()
    assert not reached(sshd)
    assert [r.command for r in sshd.received()] == ["cat /var/run/arvados-instance-secret", "true",
                                                    "cat /var/run/arvados-instance-secret"]


def test_the_run_wide_log_scan_finds_a_leak():
    """The session-wide scan (tests/g5.py) is not vacuous: a logged secret is found."""
    secret = "g5-scan-selftest-" + "9" * 20
    g5.register(secret)
    before = len(g5._lines)
    try:
        logging.getLogger("g5.selftest").error("oops", extra={"token": secret})
        assert any(secret[:6] in f for f in g5.leaks())
    finally:
        del g5._lines[before:]
        g5._secrets.discard(secret)
    assert not any(secret[:6] in f for f in g5.leaks())
