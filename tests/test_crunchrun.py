"""dispatch-cloud-crunch-run: the crunch-run background protocol against a real container API.

Every test runs the command as the dispatcher would (a subprocess), with its own lock dir and work
dir, against :mod:`api.arvados.server` on 127.0.0.1 backed by a real SQLite store. Processes the
runner starts carry a marker in their environment; teardown kills exactly those, by pid.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from cloud.local import runner as crunchrun
from api.arvados.server import serve
from api.arvados.store import ContainerStore
from cloud.local.driver import _marked_pids
from cloud.local.vm import MARKER_ENV

from tests.util import wait_for as _wait_for

ROOT = Path(__file__).resolve().parent.parent


def wait_for(pred, timeout=10.0, what="condition"):
    """tests.util.wait_for with this file's default timeout."""
    return _wait_for(pred, timeout, what)


TOKEN = "crunch-run-test-token"


class Node:
    """One worker node's view: lock dir, work dir, and the API the runner talks to."""

    def __init__(self, tmp: Path, store: ContainerStore, api_host: str):
        self.tmp = tmp
        self.lockdir = tmp / "lock"
        self.workdir = tmp / "work"
        self.lockdir.mkdir()
        self.store = store
        self.admin = store.authenticate(TOKEN)
        self.api_host = api_host
        self.env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT),
                    "CRUNCH_RUN_LOCKDIR": str(self.lockdir), "CRUNCH_RUN_WORKDIR": str(self.workdir),
                    MARKER_ENV: str(tmp)}

    def crunch_run(self, *args, stdin: bytes = b"", timeout=20) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cloud.local.runner", *args], input=stdin,
                              capture_output=True, env=self.env, cwd=str(ROOT), timeout=timeout)

    def config(self) -> bytes:
        return json.dumps({"Env": {"ARVADOS_API_HOST": self.api_host, "ARVADOS_API_TOKEN": TOKEN,
                                   "InstanceType": "{}"}, "KeepBuffers": 0, "Cluster": None}).encode()

    def new_container(self, command, **fields) -> str:
        c = self.store.create({"container_image": "img", "command": command, **fields}, caller=self.admin)
        self.store.lock(c["uuid"], caller=self.admin)
        return c["uuid"]

    def container(self, uuid) -> dict:
        return self.store.get(uuid, caller=self.admin)

    def start(self, uuid, *extra) -> dict:
        r = self.crunch_run("--detach", "--stdin-config", "--runtime-engine=docker", *extra, uuid,
                            stdin=self.config())
        assert r.returncode == 0, r.stderr.decode()
        return json.loads(r.stdout)

    def listed(self) -> list[str]:
        r = self.crunch_run("--list")
        assert r.returncode == 0, r.stderr.decode()
        return r.stdout.decode().splitlines()

    def wait_state(self, uuid, state, timeout=10.0) -> dict:
        return wait_for(lambda: (c := self.container(uuid))["state"] == state and c,
                        timeout, f"{uuid} to be {state} (is {self.container(uuid)['state']})")


@pytest.fixture
def node(tmp_path):
    store = ContainerStore(":memory:")
    store.add_token(TOKEN, admin=True)
    server = serve(store)
    n = Node(tmp_path, store, urlsplit(server.url).netloc)
    yield n
    for _ in range(100):
        pids = _marked_pids(tmp_path)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.02)
    server.stop()
    store.close()


# ---------------------------------------------------------------------------------------------
# Pure parts


def test_parse_accepts_go_style_flags_and_ignores_unknown_ones():
    uuid = "zzzzz-dz642-000000000000001"
    inv = crunchrun.parse(["-detach", "-stdin-config", "--runtime-engine=stub", "--foo",
                           "--extra='args'", "-crunchstat-interval", "10s", uuid])
    assert inv.args.detach and inv.args.stdin_config
    assert inv.args.runtime_engine == "stub"
    assert inv.uuid == uuid
    assert "--foo" in inv.ignored and "--extra='args'" in inv.ignored
    kill = crunchrun.parse(["-kill", "15", uuid])
    assert kill.args.kill == 15 and kill.uuid == uuid
    assert crunchrun.parse(["--list"]).uuid is None


def test_container_env_and_cwd_rules(tmp_path):
    env = crunchrun.container_env({"FOO": "bar", "PATH": "/x"},
                                  {"PATH": "/usr/bin", "HOME": "/root", "SECRET": "no"})
    assert env == {"PATH": "/x", "HOME": "/root", "FOO": "bar"}
    assert crunchrun.resolve_cwd(".", "/w") == "/w"
    assert crunchrun.resolve_cwd("sub", "/w") == "/w/sub"
    assert crunchrun.resolve_cwd("/tmp", "/w") == "/tmp"
    assert crunchrun.exit_code_of(-15) == 143 and crunchrun.exit_code_of(3) == 3


def test_version_and_missing_uuid(node):
    v = node.crunch_run("-version")
    assert v.returncode == 0 and v.stdout.startswith(b"dispatch-cloud-crunch-run ")
    r = node.crunch_run("--detach")
    assert r.returncode == 2
    assert b"missing required argument: container-uuid" in r.stderr


# ---------------------------------------------------------------------------------------------
# The protocol, end to end


def test_detach_runs_container_to_complete(node):
    go = node.tmp / "go"
    uuid = node.new_container(["sh", "-c", f'echo "hello $FOO from $(pwd)"; while [ ! -e {go} ]; do sleep 0.02; done'],
                              environment={"FOO": "bar"})
    out = node.start(uuid, "--foo", "--broken-node-hook", "true")
    assert out["UUID"] == uuid and out["PID"] > 0
    lockfile = node.lockdir / f"crunch-run-{uuid}.lock"
    assert json.loads(lockfile.read_text()) == out
    assert (lockfile.stat().st_mode & 0o777) == 0o700
    running = node.wait_state(uuid, "Running")
    assert node.listed() == [uuid]
    go.touch()
    done = node.wait_state(uuid, "Complete")
    assert done["exit_code"] == 0
    workdir = node.workdir / uuid
    assert running["runtime_status"]["stdoutPath"] == str(workdir / "stdout.txt")
    assert (workdir / "stdout.txt").read_text() == f"hello bar from {workdir / 'work'}\n"
    wait_for(lambda: node.listed() == [], what="the runner to exit")
    assert not lockfile.exists()  # --list removed the released lock file


def test_an_api_container_gets_its_own_token_and_no_other_container_gets_one(node):
    """crunch-run gives a container with runtime_constraints.API its own token
    (v2/<auth uuid>/<secret>/<container uuid>), the API host and the insecure flag; it never
    passes on the dispatcher's token, and a container without API gets none."""
    go = node.tmp / "go"
    show = ('echo "${ARVADOS_API_TOKEN-unset}"; echo "${ARVADOS_API_HOST-unset}"; '
            f'while [ ! -e {go} ]; do sleep 0.02; done')
    api = node.new_container(["sh", "-c", show], runtime_constraints={"API": True, "vcpus": 1, "ram": 1 << 20})
    plain = node.new_container(["sh", "-c", show])
    node.start(api)
    node.start(plain)
    node.wait_state(api, "Running")
    node.wait_state(plain, "Running")
    out = node.workdir / api / "stdout.txt"
    wait_for(lambda: out.exists() and out.read_text().count("\n") == 2, what="the API container's output")
    token, host = out.read_text().splitlines()
    auth = node.store.auth(api, caller=node.admin)
    assert token == f"v2/{auth['uuid']}/{auth['api_token']}/{api}"
    assert host == node.api_host
    who = node.store.authenticate(token)  # the container can call the API as itself
    assert who is not None and who.uuid == auth["uuid"] and who.uuid != node.admin.uuid
    plain_out = node.workdir / plain / "stdout.txt"
    wait_for(lambda: plain_out.exists() and plain_out.read_text().count("\n") == 2, what="the other output")
    assert plain_out.read_text() == "unset\nunset\n"
    go.touch()
    node.wait_state(api, "Complete")
    assert node.store.authenticate(token) is None  # it died with the container


def test_failing_command_completes_with_its_exit_code(node):
    uuid = node.new_container(["sh", "-c", "echo oops >&2; exit 3"])
    node.start(uuid)
    done = node.wait_state(uuid, "Complete")
    assert done["exit_code"] == 3
    assert (node.workdir / uuid / "stderr.txt").read_text() == "oops\n"


def test_kill_15_cancels_a_running_container(node):
    uuid = node.new_container(["sleep", "300"])
    node.start(uuid)
    node.wait_state(uuid, "Running")
    sleeper = wait_for(lambda: [p for p in _marked_pids(node.tmp)
                                if Path(f"/proc/{p}/cmdline").read_bytes().startswith(b"sleep\0")],
                       what="the container process")[0]
    rcs = []
    wait_for(lambda: rcs.append(node.crunch_run("--kill", "15", uuid).returncode) or rcs[-1] == 0,
             timeout=15, what="--kill 15 to report the runner gone")
    assert node.container(uuid)["state"] == "Cancelled"
    assert not crunchrun.pid_alive(sleeper)
    assert node.listed() == []
    assert node.crunch_run("-kill", "15", uuid).returncode == 0  # not running any more


def test_a_command_that_cannot_start_cancels_the_container(node):
    uuid = node.new_container(["/nonexistent/program"])
    node.start(uuid)
    done = node.wait_state(uuid, "Cancelled")
    assert "cannot start container" in done["runtime_status"]["error"]
    assert "/nonexistent/program" in done["runtime_status"]["error"]


def test_duplicate_detach_fails(node):
    uuid = node.new_container(["sleep", "300"])
    node.start(uuid)
    r = node.crunch_run("--detach", "--stdin-config", uuid, stdin=node.config())
    assert r.returncode == 1
    assert r.stderr.decode().startswith(f"lock {node.lockdir}/crunch-run-{uuid}.lock: ")
    node.wait_state(uuid, "Running")
    assert node.listed() == [uuid]


def test_lock_held_by_a_descendant_after_the_runner_died_is_stale(node):
    # Like arv-mount outliving crunch-run: a grandchild that left the container's process group
    # still holds the inherited lock fd after the runner has finished and exited.
    held = node.tmp / "holder.pid"
    uuid = node.new_container(["sh", "-c", f"setsid sh -c 'echo $$ >{held}; exec sleep 300' & "
                                           f"while [ ! -s {held} ]; do sleep 0.01; done"])
    runner = node.start(uuid)["PID"]
    node.wait_state(uuid, "Complete")
    wait_for(lambda: not crunchrun.pid_alive(runner), what="the runner to exit")
    assert node.listed() == [f"{uuid} stale"]
    for pid in _marked_pids(node.tmp):  # "reboot": the holder goes away
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: node.listed() == [], what="the stale lock to be released and removed")
    assert not (node.lockdir / f"crunch-run-{uuid}.lock").exists()


def test_broken_file_and_prices(node):
    assert node.listed() == []
    (node.lockdir / "crunch-run-broken").touch()
    prices = b'[{"StartTime":"2026-01-01T00:00:00Z","Price":0.5}]'
    r = node.crunch_run("--list", "--stdin-prices", stdin=prices)
    assert r.stdout == b"broken\n"
    assert (node.lockdir / "crunch-run-prices.json").read_bytes() == prices


def test_kill_exit_codes(node):
    uuid = "zzzzz-dz642-aaaaaaaaaaaaaaa"
    assert node.crunch_run("--kill", "15", uuid).returncode == 0  # no lock file: not running
    (node.lockdir / f"crunch-run-{uuid}.lock").write_text('{"UUID":"zzzzz-dz642-bbbbbbbbbbbbbbb","PID":1}\n')
    assert node.crunch_run("--kill", "0", uuid).returncode == 1  # lock file describes another one


def test_kill_reports_a_process_that_survives_the_signal(node, tmp_path):
    uuid = "zzzzz-dz642-ccccccccccccccc"
    # A process that ignores SIGTERM, posing as the runner named in the lock file.
    stubborn = subprocess.Popen(["sh", "-c", "trap '' TERM; while :; do sleep 0.05; done"],
                                env={**node.env}, start_new_session=True)
    try:
        (node.lockdir / f"crunch-run-{uuid}.lock").write_text(json.dumps({"UUID": uuid, "PID": stubborn.pid}))
        r = node.crunch_run("--kill", "15", uuid)
        assert r.returncode == 1
        assert b"but process is still alive" in r.stderr
    finally:
        os.killpg(stubborn.pid, signal.SIGKILL)
        stubborn.wait()


def test_api_error_is_logged_and_the_runner_exits(node):
    uuid = "zzzzz-dz642-nosuchcontainer"
    runner = node.start(uuid)["PID"]
    wait_for(lambda: not crunchrun.pid_alive(runner), what="the runner to give up")
    err = (node.workdir / uuid / "stderr.txt").read_text()
    assert "container API" in err and "404" in err
    log = (node.workdir / uuid / "crunch-run.txt").read_text()
    assert '"container API call failed"' in log
    assert node.listed() == []


# ---------------------------------------------------------------------------------------------
# The Runner as a plain object (unit tests with a fake API client)


class FakeClient:
    def __init__(self, on_get=None):
        self.updates = []
        self._on_get = on_get

    def get_container(self, uuid):
        if self._on_get:
            self._on_get()
        return {"uuid": uuid, "state": "Locked", "command": ["true"]}

    def update(self, uuid, fields):
        self.updates.append(fields)
        return {}


def _runner(tmp_path, client, hook=""):
    import logging
    return crunchrun.Runner("zzzzz-dz642-000000000000001", client, str(tmp_path), None,
                            logging.getLogger("test"), hook)


def test_sigterm_before_running_leaves_the_container_locked(tmp_path):
    runner = None
    client = FakeClient(on_get=lambda: runner.on_sigterm(signal.SIGTERM, None))
    runner = _runner(tmp_path, client)
    assert runner.run() == 1
    assert client.updates == []  # never moved to Running: the dispatcher unlocks it


def test_broken_node_runs_the_hook_or_flags_the_node(tmp_path, monkeypatch):
    monkeypatch.setenv("CRUNCH_RUN_LOCKDIR", str(tmp_path))
    _runner(tmp_path, FakeClient())._broken_node("no space left on device")
    assert (tmp_path / "crunch-run-broken").exists()
    (tmp_path / "crunch-run-broken").unlink()
    _runner(tmp_path, FakeClient(), hook=f"touch {tmp_path}/hook-ran")._broken_node("ENOSPC")
    assert (tmp_path / "hook-ran").exists() and not (tmp_path / "crunch-run-broken").exists()
