"""cloud.crunchrun: the exact command lines Go's dispatcher sends, their quoting, the init command
round trip, ``--list`` parsing, and the ``--detach`` stdin ConfigData (all pure)."""

from __future__ import annotations

import hashlib
import hmac
import json
import shlex

import pytest

from cloud import crunchrun
from cloud.base import join_host_port, split_host_port
from conf.model import GPU, Cluster, CloudVMs, Containers, InstanceType

TOKEN = "xyzzy-systemroottoken-f00"
SECRET = "0123456789abcdef0123456789abcdef01234567"
UUID = "zzzzz-dz642-000000000000001"
UUID2 = "zzzzz-dz642-000000000000002"


def test_detach_command_matches_arvados_example():
    args = ["--runtime-engine=stub", "--foo", "--extra='args'"]
    cmd = crunchrun.detach_command("crunch-run", args, UUID, sudo=False)
    assert cmd == ("crunch-run --detach --stdin-config '--runtime-engine=stub' '--foo' "
                   "'--extra='\\''args'\\''' 'zzzzz-dz642-000000000000001'")
    assert crunchrun.detach_command("R", [], "u", sudo=True) == "sudo R --detach --stdin-config 'u'"


def test_runner_args_from_config():
    c = Cluster(containers=Containers(runtime_engine="singularity", crunch_run_arguments_list=("--a", "b'c")))
    assert crunchrun.runner_args(c) == ["--runtime-engine=singularity", "--a", "b'c"]


@pytest.mark.parametrize("sudo,prefix", [(False, ""), (True, "sudo ")])
def test_list_kill_secret_commands(sudo, prefix):
    assert crunchrun.list_command("/x/crunch-run~ab", sudo) == prefix + "/x/crunch-run~ab --list"
    assert crunchrun.list_command("R", sudo, stdin_prices=True) == prefix + "R --list --stdin-prices"
    assert crunchrun.kill_command("R", UUID, sudo) == prefix + "R --kill 15 zzzzz-dz642-000000000000001"
    assert crunchrun.instance_secret_command(sudo) == prefix + "cat /var/run/arvados-instance-secret"


def test_sudo_rule_and_go_quoting():
    assert not crunchrun.needs_sudo("root") and crunchrun.needs_sudo("admin")
    assert crunchrun.go_quote("it's") == "'it'\\''s'"


@pytest.mark.parametrize("uuid", ["x; rm -rf /", "$(reboot)", "a'b", "a b", ""])
def test_a_hostile_uuid_stays_one_word(uuid):
    """Every value placed in a command is quoted: the shell sees the UUID as one argument."""
    for cmd, tail in ((crunchrun.kill_command("R", uuid, False), ["R", "--kill", "15"]),
                      (crunchrun.detach_command("R", ["--a"], uuid, False),
                       ["R", "--detach", "--stdin-config", "--a"])):
        assert shlex.split(cmd) == tail + [uuid]


def test_boot_probe_command():
    assert crunchrun.boot_probe_command("") == "true"
    assert crunchrun.boot_probe_command("docker ps -q") == "docker ps -q"


def test_init_command_matches_go_and_reads_back():
    cmd = crunchrun.init_command(SECRET, "echo 'instance init command goes here'")
    assert cmd == (f'umask 0177 && echo -n "{SECRET}" >/var/run/arvados-instance-secret\n'
                   "echo 'instance init command goes here'")
    assert crunchrun.secret_from_init_command(cmd) == SECRET
    assert crunchrun.init_command(SECRET) == f'umask 0177 && echo -n "{SECRET}" >/var/run/arvados-instance-secret\n'


@pytest.mark.parametrize("secret", ['has "quotes" and $x', "it's"])
def test_init_command_quotes_other_secrets(secret):
    cmd = crunchrun.init_command(secret)
    assert shlex.split(cmd.split("\n")[0])[5] == secret
    assert crunchrun.secret_from_init_command(cmd) == secret


@pytest.mark.parametrize("cmd", ["", "echo hello", "umask 0177 && echo -n x >/tmp/elsewhere",
                                 'umask 0177 && echo -n "unterminated >/var/run/arvados-instance-secret'])
def test_no_secret_in_other_init_commands(cmd):
    assert crunchrun.secret_from_init_command(cmd) is None


@pytest.mark.parametrize("out,want", [
    ("", ([], [], False)),
    (f"{UUID}\n", ([UUID], [], False)),
    (f"{UUID}\n{UUID2} stale\n\nbroken\n", ([UUID], [UUID2], True)),
    ("yyyyy-dz642-abcdefghijklmno\n", ([], [], False)),  # another cluster's container
    ("broken", ([], [], True)),
    (f"{UUID} something\n", ([], [], False)),
])
def test_parse_list(out, want):
    assert crunchrun.parse_list(out, "zzzzz") == want


def test_format_list_round_trips():
    out = crunchrun.format_list([(UUID, False), (UUID2, True)], broken=True)
    assert out == f"{UUID}\n{UUID2} stale\nbroken\n"
    assert crunchrun.parse_list(out, "zzzzz") == ([UUID], [UUID2], True)
    assert crunchrun.format_list([], broken=False) == ""


def _itype(**kw):
    d = dict(name="small", provider_type="Standard_D2s_v3", vcpus=2, ram=8 << 30,
             included_scratch=16 << 30, added_scratch=0, price=1.0)
    d.update(kw)
    return InstanceType(**d)


def test_config_data_env():
    cluster = Cluster(controller_url="https://zzzzz.example.com:8443/", system_root_token=TOKEN,
                      containers=Containers(local_keep_blob_buffers_per_vcpu=0))
    cfg = json.loads(crunchrun.config_data(cluster, _itype(), "10.1.2.3:2222", UUID))
    assert list(cfg) == ["Env", "KeepBuffers", "EC2SpotCheck", "Cluster"]
    env = cfg["Env"]
    assert list(env) == sorted(env)
    assert env["ARVADOS_API_HOST"] == "zzzzz.example.com:8443"
    assert env["ARVADOS_API_TOKEN"] == TOKEN
    assert env["GatewayAddress"] == "10.1.2.3:0"
    assert env["GatewayAuthSecret"] == hmac.new(TOKEN.encode(), UUID.encode(), hashlib.sha256).hexdigest()
    assert "ARVADOS_API_HOST_INSECURE" not in env
    assert cfg["KeepBuffers"] == 0 and cfg["EC2SpotCheck"] is False and cfg["Cluster"] is None
    # Go's json.Encoder with SetIndent("", "    "): no Name/Scratch, integral floats without ".0".
    assert env["InstanceType"] == (
        '{\n    "ProviderType": "Standard_D2s_v3",\n    "VCPUs": 2,\n    "RAM": 8589934592,\n'
        '    "IncludedScratch": 17179869184,\n    "AddedScratch": 0,\n    "Price": 1,\n'
        '    "Preemptible": false,\n    "GPU": {\n        "Stack": "",\n        "DriverVersion": "",\n'
        '        "HardwareTarget": "",\n        "DeviceCount": 0,\n        "VRAM": 0\n    }\n}\n')


def test_config_data_options():
    cluster = Cluster(controller_url="https://ctrl.example", system_root_token=TOKEN, tls_insecure=True,
                      raw={"ClusterID": "zzzzz", "Containers": {"LocalKeepBlobBuffersPerVCPU": 3}},
                      containers=Containers(local_keep_blob_buffers_per_vcpu=3,
                                            cloud_vms=CloudVMs(driver="ec2")))
    it = _itype(vcpus=4, preemptible=True, price=0.25, gpu=GPU(stack="cuda", device_count=1))
    raw = crunchrun.config_data(cluster, it, "fd00::7", UUID2)
    cfg = json.loads(raw)
    assert cfg["Env"]["ARVADOS_API_HOST"] == "ctrl.example"
    assert cfg["Env"]["ARVADOS_API_HOST_INSECURE"] == "1"
    assert cfg["Env"]["GatewayAddress"] == "[fd00::7]:0"
    assert cfg["KeepBuffers"] == 12 and cfg["EC2SpotCheck"] is True
    assert cfg["Cluster"] == {"ClusterID": "zzzzz", "Containers": {"LocalKeepBlobBuffersPerVCPU": 3}}
    assert json.loads(cfg["Env"]["InstanceType"])["GPU"]["Stack"] == "cuda"
    assert b'"Price": 0.25' in json.loads(raw)["Env"]["InstanceType"].encode()


@pytest.mark.parametrize("x,go", [(1.0, "1"), (0.1, "0.1"), (1.5e-05, "0.000015"), (1e-07, "1e-7"),
                                  (1e21, "1e+21"), (-2.0, "-2")])
def test_go_float(x, go):
    assert crunchrun.go_float(x) == go


def test_go_json_escapes_like_go():
    assert crunchrun.go_json({"a": "<b>&", "n": [1.0, None, True]}) == '{"a":"\\u003cb\\u003e\\u0026","n":[1,null,true]}'


@pytest.mark.parametrize("addr,host,port", [
    ("10.0.0.5", "10.0.0.5", ""), ("10.0.0.5:2222", "10.0.0.5", "2222"),
    ("[fd00::1]:22", "fd00::1", "22"), ("fd00::1", "fd00::1", ""), ("vm.example", "vm.example", ""),
])
def test_split_host_port(addr, host, port):
    assert split_host_port(addr) == (host, port)
    assert join_host_port(host, port or "0").endswith(":" + (port or "0"))
