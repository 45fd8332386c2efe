"""The ``local`` driver: VMs as process trees on 127.0.0.N, used through real SSH.

Each test gets its own StateDir, a random 127.x.y.2 address base and a free port, so tests never
meet each other's (or another engineer's) servers. Teardown destroys what is left in the state
dir and then kills, by pid, any process still carrying one of its VMs' markers.
"""

from __future__ import annotations

import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import paramiko
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from cloud import base
from cloud.local import driver as local
from conf.drivers import local_default_instance_type
from cloud.local import vm as localvm
from cloud.local.runner import pid_alive
from cloud.crunchrun import detach_command, instance_secret_command, list_command
from cloud.ssh import AuthError, SSHExecutor
from conf.model import CloudVMs, Cluster, Containers, InstanceType

from tests.dispatcher_proc import LoopbackApi, RunProcess, dispatch_key
from tests.util import free_port, run_threads, wait_for as _wait_for

ROOT = Path(__file__).resolve().parent.parent
def wait_for(pred, timeout=15.0, what="condition"):
    """tests.util.wait_for with this file's default timeout."""
    return _wait_for(pred, timeout, what)


TOKEN = "local-driver-test-token"
IT = InstanceType("local", "local", 2, 1 << 30, 1 << 30, 0, 0.01)
SECRET = "0123456789abcdef0123456789abcdef01234567"
INIT = f'umask 0177 && echo -n "{SECRET}" >/var/run/arvados-instance-secret\ntouch /var/lock/init-ran'


def new_key() -> tuple[paramiko.PKey, str]:
    pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()).decode()
    key = paramiko.Ed25519Key.from_private_key(io.StringIO(pem))
    return key, f"{key.get_name()} {key.get_base64()} test"


class Env:
    def __init__(self, tmp: Path):
        self.state = tmp / "state"
        self.port = free_port()
        self.base = f"127.{random.randint(1, 250)}.{random.randint(1, 250)}.2"
        self.cluster = Cluster(containers=Containers(cloud_vms=CloudVMs(ssh_port=str(self.port),
                                                                        max_instances=3)))
        self.key, self.pub = new_key()
        self.executors: list[SSHExecutor] = []

    def params(self, **kw) -> dict:
        return {"StateDir": str(self.state), "BootDelay": "0s", "AddressBase": self.base, **kw}

    def instance_set(self, **kw) -> local.LocalInstanceSet:
        return local.driver(self.params(**kw), "set-1", cluster=self.cluster, clock=None)

    def executor(self, inst, key=None) -> SSHExecutor:
        ex = SSHExecutor(inst, private_key=key or self.key, connect_timeout=2, auth_timeout=5,
                         command_timeout=20)
        self.executors.append(ex)
        return ex

    def wait_ssh(self, inst) -> SSHExecutor:
        """Bounded polling, as the boot probe does, until the VM's SSH server answers."""
        ex = self.executor(inst)

        def up():
            try:
                return ex.execute("true").ok
            except base.ExecutorError:
                return False
        wait_for(up, what=f"ssh on {inst.address}")
        return ex


@pytest.fixture
def env(tmp_path):
    e = Env(tmp_path)
    yield e
    for ex in e.executors:
        ex.close()
    roots = []
    if e.state.exists():
        s = local.LocalInstanceSet(local.parse_params(e.params()), "cleanup")
        for inst in s.instances({}):
            roots.append(inst.state_dir)
            inst.destroy()
    for root in roots:  # belt and braces: nothing of ours may outlive the test
        for pid in local._marked_pids(root):
            os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------------------------------------
# Pure parts


@pytest.mark.parametrize("params, key", [
    ({"BootDelay": "soon"}, "BootDelay"),
    ({"MaxInstances": 0}, "MaxInstances"),
    ({"SSHServer": "dropbear"}, "SSHServer"),
    ({"AddressBase": "10.0.0.2"}, "AddressBase"),
    ({"Flavor": "x"}, "Flavor"),
])
def test_bad_driver_parameters_name_the_key(params, key):
    with pytest.raises(local.LocalParamsError, match=rf"DriverParameters\.{key}: "):
        local.parse_params(params)


def test_parameter_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    p = local.parse_params({}, Cluster())
    assert p.state_dir == str(tmp_path / "dispatch-cloud" / "local")
    assert (p.max_instances, p.boot_delay, p.ssh_server, p.address_base, p.ssh_port) == \
        (64, 1.0, "embedded", "127.0.0.2", 2222)
    assert local.parse_params({}).max_instances == 8


def test_default_instance_type_is_sized_from_this_host(tmp_path):
    t = local_default_instance_type({"StateDir": str(tmp_path / "not-yet")})
    assert list(t) == ["local"]
    assert t["local"]["ProviderType"] == "local" and t["local"]["Price"] == 0.01
    assert t["local"]["VCPUs"] == os.cpu_count()
    assert t["local"]["RAM"] > 0 and t["local"]["IncludedScratch"] > 0


def test_path_rewrite_and_sudo():
    assert localvm.shell_command("sudo cat /var/run/arvados-instance-secret", "/s") == \
        "cat /s/run/arvados-instance-secret"
    assert localvm.rewrite_paths("rm -f /var/lock/crunch-run-broken; ls /var/lock", "/s") == \
        "rm -f /s/lock/crunch-run-broken; ls /s/lock"
    assert localvm.rewrite_paths("/usr/var/run /var/runner x/var/run", "/s") == "/usr/var/run /var/runner x/var/run"
    assert localvm.strip_sudo("echo sudo ") == "echo sudo "


# ---------------------------------------------------------------------------------------------
# Real VMs


def test_vm_boots_runs_commands_over_ssh_and_verifies_its_host_key(env):
    s = env.instance_set()
    inst = s.create(IT, "image-1", {"ArvadosInstanceSetID": "set-1"}, INIT, env.pub)
    assert inst.address == f"{env.base}:{env.port}"
    assert inst.remote_user == localvm.current_user()
    ex = env.wait_ssh(inst)
    r = ex.execute("echo out; echo err >&2; cat; exit 4", stdin=b"from stdin\n")
    assert (r.stdout, r.stderr, r.exit_status) == (b"out\nfrom stdin\n", b"err\n", 4)
    # The init command ran at first boot, with /var/run and /var/lock rewritten per instance.
    assert ex.execute(instance_secret_command(sudo=True)).stdout == SECRET.encode()
    assert (inst.state_dir / "lock" / "init-ran").exists()
    assert ex.execute("echo $CRUNCH_RUN_LOCKDIR").stdout.decode().strip() == str(inst.state_dir / "lock")
    assert ex.execute(CloudVMs().boot_probe_command).stdout == b"running\n"  # the default probe works
    # Host key: the one generated at create passes, any other is refused.
    inst.verify_host_key(_server_key(inst.address), None)
    with pytest.raises(base.HostKeyError):
        inst.verify_host_key(new_key()[0], None)
    # Only the authorized key gets in.
    with pytest.raises(AuthError):
        env.executor(inst, key=new_key()[0]).execute("true")
    assert s.instance_quota_group(IT) == "" and inst.price_history(IT) == []
    # An operator can log in interactively (pty + shell).
    out, status = _interactive(inst, env.key, b"echo in-$CRUNCH_RUN_LOCKDIR; exit 7\n")
    assert f"in-{inst.state_dir}/lock".encode() in out and status == 7


def _interactive(inst, key, typed: bytes, timeout=10.0) -> tuple[bytes, int]:
    host, port = inst.address.split(":")
    t = paramiko.Transport(socket.create_connection((host, int(port))))
    try:
        t.start_client(timeout=5)
        t.auth_publickey(inst.remote_user, key)
        chan = t.open_session()
        chan.get_pty("xterm", 80, 24)
        chan.invoke_shell()
        chan.sendall(typed)
        chan.settimeout(timeout)
        out = b""
        while data := chan.recv(4096):
            out += data
        assert chan.status_event.wait(timeout)
        return out, chan.exit_status
    finally:
        t.close()


def test_tags_persist_for_a_restarted_dispatcher_and_quota_is_enforced(env):
    s = env.instance_set(MaxInstances=2)
    a = s.create(IT, "img", {"ArvadosInstanceSetID": "set-1", "ArvadosIdleBehavior": "run"}, "", env.pub)
    b = s.create(IT, "img", {"ArvadosInstanceSetID": "set-1"}, "", None)
    assert a.address != b.address
    with pytest.raises(base.QuotaError) as exc:
        s.create(IT, "img", {}, "", env.pub)
    assert base.is_quota_error(exc.value)
    a.set_tags({"ArvadosInstanceSetID": "set-1", "ArvadosIdleBehavior": "hold"})
    restarted = env.instance_set(MaxInstances=2)  # a new process would build exactly this
    found = {i.id: i for i in restarted.instances({})}
    assert set(found) == {a.id, b.id}
    assert found[a.id].tags == {"ArvadosInstanceSetID": "set-1", "ArvadosIdleBehavior": "hold"}
    assert found[a.id].address == a.address and found[a.id].provider_type == "local"
    info = json.loads((a.state_dir / "instance.json").read_text())
    assert info["pid"] == a.pid and info["created_at"].endswith("Z")
    found[b.id].destroy()
    assert [i.id for i in s.instances({})] == [a.id]
    s.create(IT, "img", {}, "", env.pub)  # room again


def test_vm_outlives_its_creator_killed_with_sigkill(env):
    code = (
        "import json, sys, time\n"
        "from cloud.local import driver as local\n"
        "from conf.model import InstanceType\n"
        "s = local.driver(json.loads(sys.argv[1]), 'set-1', cluster=None, clock=None)\n"
        "i = s.create(InstanceType('local', 'local', 1, 1, 1, 0, 0.01), 'img', {}, '', sys.argv[2])\n"
        "print(i.id, flush=True)\n"
        "time.sleep(600)\n")
    params = json.dumps(env.params(MaxInstances=3))
    creator = subprocess.Popen([sys.executable, "-c", code, params, env.pub], cwd=str(ROOT),
                               stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        iid = creator.stdout.readline().decode().strip()
    finally:
        creator.send_signal(signal.SIGKILL)
        creator.wait()
        creator.stdout.close()
    inst = {i.id: i for i in env.instance_set().instances({})}[iid]
    assert inst.running()
    ex = env.executor(inst)
    wait_for(lambda: _ok(ex, "true"), what="ssh after the creator died")
    assert ex.execute("echo alive").stdout == b"alive\n"


def _ok(ex, cmd) -> bool:
    try:
        return ex.execute(cmd).ok
    except base.ExecutorError:
        return False


def test_crunch_run_over_ssh_and_destroy_kills_everything(env):
    api = LoopbackApi(TOKEN)
    try:
        s = env.instance_set()
        inst = s.create(IT, "img", {}, INIT, env.pub)
        ex = env.wait_ssh(inst)
        config = json.dumps({"Env": {"ARVADOS_API_HOST": urlsplit(api.url).netloc,
                                     "ARVADOS_API_TOKEN": TOKEN}}).encode()

        def start(command) -> str:
            uuid = api.create({"container_image": "i", "command": command})
            api.store.lock(uuid, caller=api.admin)
            r = ex.execute(detach_command("crunch-run", ["--runtime-engine=docker"], uuid, sudo=True),
                           stdin=config)
            assert r.ok, r.stderr
            assert json.loads(r.stdout)["UUID"] == uuid
            return uuid

        def state(uuid):
            return api.get(uuid)["state"]

        quick = start(["sh", "-c", "exit 3"])
        wait_for(lambda: state(quick) == "Complete", what="the quick container to complete")
        assert api.get(quick)["exit_code"] == 3

        slow = start(["sleep", "300"])
        wait_for(lambda: state(slow) == "Running", what="the slow container to run")
        assert ex.execute(list_command("dispatch-cloud-crunch-run", sudo=True)).stdout == \
            f"{slow}\n".encode()
        ours = local._marked_pids(inst.state_dir)
        cmdlines = [Path(f"/proc/{p}/cmdline").read_bytes() for p in ours]
        assert any(c.startswith(b"sleep\x00300\x00") for c in cmdlines), cmdlines
        assert (inst.state_dir / "lock" / "init-ran").exists()
        vm_pid = inst.pid

        ex.close()
        inst.destroy()
        assert not pid_alive(vm_pid)
        assert not any(pid_alive(p) for p in ours)
        assert not inst.state_dir.exists()
        assert s.instances({}) == []
        with pytest.raises(base.ExecutorError):  # nobody listens there any more
            SSHExecutor(inst, private_key=env.key, connect_timeout=1).execute("true")
        # The runner was powered off with its VM, not asked to stop: nothing reported the
        # container finished (the dispatcher's job is to notice and give it up).
        assert state(slow) == "Running"
    finally:
        api.close()


def test_a_crashed_vm_is_still_listed_and_destroy_cleans_up_after_it(env):
    s = env.instance_set()
    inst = s.create(IT, "img", {}, "", env.pub)
    ex = env.wait_ssh(inst)
    assert ex.execute("setsid sleep 300 </dev/null >/dev/null 2>&1 &").ok
    orphan = wait_for(lambda: [p for p in local._marked_pids(inst.state_dir)
                               if Path(f"/proc/{p}/cmdline").read_bytes() == b"sleep\x00300\x00"],
                      what="the background process")[0]
    ex.close()
    os.kill(inst.pid, signal.SIGKILL)  # the VM "crashes"; its processes are orphaned
    wait_for(lambda: not inst.running(), what="the VM process to die")
    listed = {i.id: i for i in s.instances({})}
    assert inst.id in listed and not listed[inst.id].running()
    assert pid_alive(orphan)
    listed[inst.id].destroy()
    assert not pid_alive(orphan)
    assert s.instances({}) == []


def test_openssh_server(env):
    if not os.access(localvm.SSHD, os.X_OK):
        pytest.skip("OpenSSH sshd not installed (make sysdeps)")
    s = env.instance_set(SSHServer="openssh")
    inst = s.create(IT, "img", {}, INIT, env.pub)
    ex = env.wait_ssh(inst)
    assert ex.execute(instance_secret_command(sudo=True)).stdout == SECRET.encode()
    r = ex.execute("cat; echo $CRUNCH_RUN_LOCKDIR >&2; exit 5", stdin=b"x")
    assert (r.stdout, r.stderr, r.exit_status) == (b"x", f"{inst.state_dir}/lock\n".encode(), 5)
    inst.verify_host_key(_server_key(inst.address), None)
    out, status = _interactive(inst, env.key, b"echo in-$CRUNCH_RUN_LOCKDIR; exit 7\n")
    assert f"in-{inst.state_dir}/lock".encode() in out and status == 7
    sessions = localvm.descendants(inst.pid)
    assert sessions  # sshd (and its session processes) live in the VM's tree
    ex.close()
    inst.destroy()
    assert not any(pid_alive(p) for p in sessions)


def _server_key(address: str) -> paramiko.PKey:
    host, port = address.split(":")
    t = paramiko.Transport(socket.create_connection((host, int(port))))
    try:
        t.start_client(timeout=5)
        return t.get_remote_server_key()
    finally:
        t.close()


# ---------------------------------------------------------------------------------------------
# The whole chain: the real dispatcher, this driver, SSH, dispatch-cloud-crunch-run, the API


E2E_CONFIG = """\
Clusters:
  zzzzz:
    SystemRootToken: {token}
    ManagementToken: e2e-management-token
    Services:
      Controller:
        ExternalURL: {api}
      DispatchCloud:
        InternalURLs:
          "http://127.0.0.1:{mport}": {{}}
    Containers:
      DispatchPrivateKey: {key}
      CrunchRunCommand: dispatch-cloud-crunch-run
      CloudVMs:
        Driver: local
        SSHPort: "{port}"
        ProbeInterval: 0.5s
        PollInterval: 0.5s
        SyncInterval: 1s
        TimeoutIdle: 1s
        DriverParameters:
          StateDir: {state}
          BootDelay: 0s
          AddressBase: {base}
    InstanceTypes:
      local:
        ProviderType: local
        VCPUs: 1
        RAM: 1GiB
        IncludedScratch: 1GiB
        Price: 0.01
"""


def run_one_container(env, tmp_path, *, edit=lambda text: text, timeout: float = 30.0, then=None):
    """``dispatch-cloud run`` on :data:`E2E_CONFIG` (``edit`` may change its text) with one
    container that prints and exits 6; waits for it to end, then for ``then()`` if given, and
    stops the dispatcher. Returns (the container's final record, the stopped RunProcess, its exit
    status)."""
    api = LoopbackApi(TOKEN)
    pem = dispatch_key(tmp_path / "dispatch.key")
    cfg = tmp_path / "config.yml"
    cfg.write_text(edit(E2E_CONFIG.format(token=TOKEN, api=api.url, mport=free_port(), port=env.port,
                                          key=json.dumps(pem), state=env.state, base=env.base)))
    uuid = api.create({"container_image": "i", "command": ["sh", "-c", "echo hi; exit 6"],
                       "runtime_constraints": {"vcpus": 1, "ram": 100 << 20}})
    proc = RunProcess(cfg, tmp_path / "dispatcher.log", state=tmp_path / "dispatch-state")  # not the VMs' dir
    try:
        try:
            done = wait_for(lambda: (c := api.get(uuid))["state"] in ("Complete", "Cancelled") and c,
                            timeout=timeout, what="the dispatcher to run the container")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{proc.text()[-4000:]}") from None
        if then is not None:
            then()
    finally:
        rc = proc.stop(wait=10)
        api.close()
    return done, proc, rc


def test_dispatcher_runs_a_container_on_a_local_vm(env, tmp_path):
    # TimeoutIdle: the dispatcher destroys the idle VM, and with it the whole process tree.
    done, proc, rc = run_one_container(env, tmp_path, then=lambda: wait_for(
        lambda: env.state.exists() and not [d for d in env.state.iterdir() if d.is_dir()],
        timeout=20, what="the idle VM to be destroyed"))
    assert (done["state"], done["exit_code"]) == ("Complete", 6)
    assert rc == 0, proc.text()[-3000:]


def test_an_unusable_state_dir_is_a_config_error_naming_the_key(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(local.LocalParamsError, match=r"DriverParameters\.StateDir: cannot use .*/file/state"):
        local.driver({"StateDir": str(tmp_path / "file" / "state")}, "x")


# ---------------------------------------------------------------------------------------------
# Regression: a command that finishes before paramiko has answered its exec request

# The VM process with the transport thread held up for 0.3 s right after it accepts an exec
# request, before paramiko sends CHANNEL_SUCCESS (what a busy host or the GIL does by chance).
_SLOW_REPLY_VM = """
import sys, time
from cloud.local import vm as localvm
accept = localvm._Session.check_channel_exec_request
def slow(self, channel, command):
    ok = accept(self, channel, command)
    time.sleep(0.3)
    return ok
localvm._Session.check_channel_exec_request = slow
sys.exit(localvm.main(["--state-dir", sys.argv[2]]))
"""


def test_a_command_never_closes_its_channel_before_the_exec_reply(env, monkeypatch):
    """A command that ended (exit status + CLOSE sent) before the server's reply to the exec
    request made the client raise 'Channel closed.' for a command that had run. The server must
    start the command only after that reply."""
    def start_vm(self, files):
        pythonpath = os.pathsep.join(filter(None, [localvm.source_root(), os.environ.get("PYTHONPATH")]))
        with open(files.log, "ab") as out:
            # "cloud.local.vm" and the state dir in argv: how the driver recognizes its VM process
            return subprocess.Popen([sys.executable, "-c", _SLOW_REPLY_VM, "cloud.local.vm", str(files.root)],
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=str(files.root),
                                    env={**os.environ, "PYTHONPATH": pythonpath}, start_new_session=True)
    monkeypatch.setattr(local.LocalInstanceSet, "_start_vm", start_vm)
    inst = env.instance_set().create(IT, "image-1", {}, INIT, env.pub)
    ex = env.wait_ssh(inst)  # polls until a "true" succeeds: without the fix, none ever does
    results = [ex.execute(f"echo {i}; exit {i}") for i in range(3)]
    assert [(r.stdout, r.exit_status) for r in results] == [(f"{i}\n".encode(), i) for i in range(3)]
    assert ex.connects == 1
    inst.destroy()
    assert not pid_alive(inst.pid)


def test_many_sequential_and_concurrent_commands_on_one_transport(env):
    """The reported flake as a bounded stress: one VM, one executor, sequential then 8 threads."""
    inst = env.instance_set().create(IT, "image-1", {}, INIT, env.pub)
    ex = env.wait_ssh(inst)
    for i in range(100):
        assert ex.execute(f"echo {i}").stdout == f"{i}\n".encode()
    failures: list[str] = []

    def worker(k):
        for i in range(25):
            try:
                if ex.execute(f"echo {k}-{i}").stdout != f"{k}-{i}\n".encode():
                    failures.append(f"{k}-{i}: wrong output")
            except base.ExecutorError as e:
                failures.append(f"{k}-{i}: {e}")
    run_threads(worker, [(k,) for k in range(8)], 60)
    assert failures == [] and ex.connects == 1
