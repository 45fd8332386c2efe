"""The admin command line as a real subprocess against the management API on 127.0.0.1:0."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from api.app import make_app
from api.backend import SnapshotBackend
from api.admin import config_candidates, dev_config_path, instance_row
from api.metrics import DispatchMetrics
from api.server import ApiServer
from tests import api_data as d

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def dispatcher():
    backend = SnapshotBackend(d.snapshot())
    server = ApiServer(make_app(d.cluster(), backend, DispatchMetrics(d.cluster())), ["http://127.0.0.1:0"],
                       loopback_only=True).start()
    server.backend = backend
    yield server
    server.stop()


@pytest.fixture
def env(tmp_path):
    # never pick up a real /etc/arvados/config.yml or the user's dev cluster
    e = dict(os.environ, ARVADOS_CONFIG=str(tmp_path / "absent.yml"), DISPATCH_CLOUD_STATE=str(tmp_path / "state"))
    return e


def cli(env, *args, timeout=30):
    return subprocess.run([sys.executable, "-m", "actors.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def target(server, token=d.TOKEN):
    return ["--url", server.urls[0], "--token", token]


def dead_url() -> str:
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_instance_list(dispatcher, env):
    r = cli(env, "instance", "list", *target(dispatcher))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == len(d.INSTANCES)
    assert lines[0] == "-\t-\tbooting\trun\tsmall\tStandard_D2s_v3\t0.096000\t-"  # pending create sorts first
    assert lines[1] == "i-0001\t10.1.2.3\tidle\trun\tsmall\tStandard_D2s_v3\t0.096000\t-"
    assert lines[3] == (f"i-0003\t10.1.2.5\trunning\trun\tsmall\tStandard_D2s_v3\t0.096000\t"
                        f"{d.CTR_RUNNING_1},{d.CTR_RUNNING_2}")
    assert all(len(line.split("\t")) == 8 for line in lines)

    r = cli(env, "instance", "list", "--header", *target(dispatcher))
    assert r.returncode == 0
    assert r.stdout.splitlines()[0] == ("instance\taddress\tstate\tidle-behavior\tconfig-type\tprovider-type\t"
                                        "price\trunning-containers")
    assert r.stdout.splitlines()[1:] == lines


def test_container_list(dispatcher, env):
    r = cli(env, "container", "list", "--header", *target(dispatcher))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "uuid\tstate\tpriority\tinstance-type\tscheduling-status"
    assert lines[1] == f"{d.CTR_RUNNING_1}\tRunning\t562948375092493200\tsmall\t-"
    assert lines[3] == f"{d.CTR_QUEUED}\tQueued\t5\tbig\twaiting for new instance to be ready"
    assert len(lines) == 1 + len(d.QUEUE)


@pytest.mark.parametrize("action", ["hold", "drain", "run"])
def test_idle_behavior_actions(dispatcher, env, action):
    r = cli(env, "instance", action, "i-0001", "i-0002", *target(dispatcher))
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines() == [f"i-0001: 200 OK ({dispatcher.urls[0]})", f"i-0002: 200 OK ({dispatcher.urls[0]})"]
    assert dispatcher.backend.calls == [("set_idle_behavior", "i-0001", action),
                                        ("set_idle_behavior", "i-0002", action)]


def test_instance_kill_with_reason(dispatcher, env):
    r = cli(env, "instance", "kill", "--reason", "stuck at boot", "i-0002", *target(dispatcher))
    assert r.returncode == 0, r.stderr
    assert dispatcher.backend.calls == [("kill_instance", "i-0002", "via management API: stuck at boot")]


def test_container_kill(dispatcher, env):
    r = cli(env, "container", "kill", "--reason", "operator", d.CTR_RUNNING_2, *target(dispatcher))
    assert r.returncode == 0, r.stderr
    assert dispatcher.backend.calls == [("kill_container", d.CTR_RUNNING_2, "via management API: operator")]
    r = cli(env, "container", "kill", d.CTR_QUEUED, *target(dispatcher))
    assert r.returncode == 1
    assert r.stderr.strip() == f"{d.CTR_QUEUED}: 404 Not Found ({dispatcher.urls[0]}): container not found"


def test_unknown_instance_exits_1_but_others_still_run(dispatcher, env):
    r = cli(env, "instance", "hold", "i-9999", "i-0001", *target(dispatcher))
    assert r.returncode == 1
    assert r.stderr.splitlines() == [
        f"i-9999: 404 Not Found ({dispatcher.urls[0]}): requested instance does not exist",
        f"i-0001: 200 OK ({dispatcher.urls[0]})"]
    assert dispatcher.backend.calls == [("set_idle_behavior", "i-0001", "hold")]


def test_one_of_two_urls_is_enough(dispatcher, env):
    dead = dead_url()
    r = cli(env, "instance", "drain", "i-0001", "--url", dead, *target(dispatcher))
    assert r.returncode == 0, r.stderr
    assert f"i-0001: cannot reach dispatcher at {dead}: Connection refused" in r.stderr.splitlines()


def test_unreachable_dispatcher(env):
    url = dead_url()
    for args in (("instance", "list"), ("container", "list"), ("instance", "kill", "i-1")):
        r = cli(env, *args, "--url", url, "--token", "t")
        assert r.returncode == 1
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
        assert f"cannot reach dispatcher at {url}: Connection refused" in r.stderr


def test_bad_token(dispatcher, env):
    r = cli(env, "instance", "list", *target(dispatcher, token="wrong"))
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip() == (f"dispatch-cloud: 403 Forbidden ({dispatcher.urls[0]}): management token rejected")
    r = cli(env, "instance", "hold", "i-0001", *target(dispatcher, token="wrong"))
    assert r.returncode == 1 and "management token rejected" in r.stderr
    assert dispatcher.backend.calls == []


def test_usage_errors_exit_2(env):
    assert cli(env, "instance", "hold", "--url", "http://127.0.0.1:1", "--token", "t").returncode == 2
    assert cli(env, "instance", "frobnicate").returncode == 2
    assert cli(env, "container").returncode == 2


def test_no_config_anywhere(env, tmp_path):
    r = cli(env, "instance", "list")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip() == (f"dispatch-cloud: no config file found (tried {tmp_path / 'absent.yml'}, "
                                f"{tmp_path / 'state' / 'dev' / 'config.yml'}); give --config FILE, or --url and --token")


CONFIG = """\
Clusters:
  zzzzz:
    ManagementToken: {token}
    SystemRootToken: xyz
    Services:
      DispatchCloud:
        InternalURLs:
          "{url}": {{}}
      Controller:
        ExternalURL: https://127.0.0.1:9999
    Containers:
      CloudVMs:
        Driver: stub
    InstanceTypes:
      small:
        ProviderType: Standard_D2s_v3
        VCPUs: 2
        RAM: 8GiB
        Price: 0.1
"""


def test_config_file_and_dev_mode_fallback(dispatcher, env, tmp_path):
    cfg = tmp_path / "cluster.yml"
    cfg.write_text(CONFIG.format(token=d.TOKEN, url=dispatcher.urls[0]))
    r = cli(env, "instance", "hold", "--config", str(cfg), "i-0005")
    assert r.returncode == 0, r.stderr
    # no --config and no default file: the dev cluster's config is used
    dev = tmp_path / "state" / "dev" / "config.yml"
    dev.parent.mkdir(parents=True)
    dev.write_text(CONFIG.format(token=d.TOKEN, url=dispatcher.urls[0]))
    r = cli(env, "instance", "list")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == len(d.INSTANCES)
    # --token overrides the config's token
    r = cli(env, "instance", "list", "--token", "wrong")
    assert r.returncode == 1 and "management token rejected" in r.stderr


def test_bad_config_is_one_line(env, tmp_path):
    cfg = tmp_path / "bad.yml"
    cfg.write_text("Clusters: [this is not, a map\n")
    r = cli(env, "instance", "list", "--config", str(cfg))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and str(cfg) in r.stderr


def test_config_candidates_unit(tmp_path):
    env = {"ARVADOS_CONFIG": "/x/a.yml", "DISPATCH_CLOUD_STATE": str(tmp_path)}
    assert config_candidates(None, env) == [Path("/x/a.yml"), tmp_path / "dev" / "config.yml"]
    assert config_candidates("/given.yml", env) == [Path("/given.yml")]
    assert config_candidates(None, {"HOME": "/home/op"})[0] == Path("/etc/arvados/config.yml")
    assert dev_config_path({}) == Path("~/.local/state/dispatch-cloud/dev/config.yml").expanduser()
    assert instance_row({"instance": "i", "price": 1.5, "running_container_uuids": None}) == "i\t-\t-\t-\t-\t-\t1.500000\t-"
