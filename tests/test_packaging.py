"""Install and run as a service: the wheel installs into a fresh virtualenv (dependencies from the
package index, package data included), its commands work outside the source tree, and the systemd
unit in packaging/ passes ``systemd-analyze verify`` and starts the installed dispatcher the way
systemd would (its ExecStart, $STATE_DIRECTORY, READY=1 on $NOTIFY_SOCKET, SIGTERM to stop)."""

from __future__ import annotations

import configparser
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from api.arvados.server import serve
from api.arvados.store import ContainerStore
from tests.util import free_port, wait_for

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "packaging" / "dispatch-cloud.service"


def clean_env(**extra) -> dict:
    """No PYTHONPATH, no source tree on the path: only what the wheel installed."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, **extra}


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pkg")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp / "dist"), str(REPO)],
                   check=True, capture_output=True, timeout=300, cwd=tmp)
    [wheel] = (tmp / "dist").glob("dispatch_cloud-*.whl")
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(tmp / "venv")], check=True, timeout=120, env=clean_env())
    subprocess.run([str(tmp / "venv" / "bin" / "pip"), "install", "-q", "--no-compile", str(wheel)],
                   check=True, capture_output=True, timeout=400, cwd=tmp, env=clean_env())
    return tmp / "venv"


def site_config(path: Path, controller: str, mgmt: str) -> Path:
    path.write_text(yaml.safe_dump({"Clusters": {"zzzzz": {
        "SystemRootToken": "s" * 40, "ManagementToken": "m" * 40,
        "Services": {"Controller": {"ExternalURL": controller}, "DispatchCloud": {"InternalURLs": {mgmt: {}}}},
        "Containers": {"CloudVMs": {"Driver": "stub"}},
        "InstanceTypes": {"small": {"VCPUs": 1, "RAM": "1GiB", "Price": 0.1}}}}}))
    return path


def test_version_and_check_config_from_the_installed_wheel(venv, tmp_path):
    exe = venv / "bin" / "dispatch-cloud"
    setup_version = re.search(r'version="([^"]+)"', (REPO / "setup.py").read_text()).group(1)
    p = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                       env=clean_env())
    assert p.returncode == 0 and p.stdout.strip() == f"dispatch-cloud {setup_version}"
    cfg = site_config(tmp_path / "config.yml", "https://arvados.example", "http://127.0.0.1:9006")
    p = subprocess.run([str(exe), "check-config", "--config", str(cfg)], capture_output=True, text=True,
                       timeout=60, cwd=tmp_path, env=clean_env())
    assert p.returncode == 0, p.stderr
    assert "small" in p.stdout and "stub" in p.stdout
    # the defaults came from the installed package, not from this checkout
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import conf; print(conf.__file__)"],
                           capture_output=True, text=True, timeout=60, cwd=tmp_path, env=clean_env()).stdout
    assert str(venv) in where and str(REPO) not in where
    assert (Path(where.strip()).parent / "defaults.yml").exists()
    assert (venv / "bin" / "dispatch-cloud-crunch-run").exists()


def unit_for(venv: Path, cfg: Path, dest: Path) -> Path:
    text = UNIT.read_text().replace("/opt/dispatch-cloud", str(venv)).replace("/etc/arvados/config.yml", str(cfg))
    dest.write_text(text)
    return dest


def test_unit_file_is_sound(venv, tmp_path):
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read(UNIT)
    svc = unit["Service"]
    assert svc["Restart"] == "always" and svc["Type"] == "notify" and int(svc["LimitNOFILE"]) >= 10000
    assert svc["ExecStart"].split()[:4] == ["/opt/dispatch-cloud/bin/dispatch-cloud", "run", "--config",
                                            "/etc/arvados/config.yml"]
    assert unit["Unit"]["AssertPathExists"] == "/etc/arvados/config.yml"
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed")
    cfg = site_config(tmp_path / "config.yml", "https://arvados.example", "http://127.0.0.1:9006")
    local = unit_for(venv, cfg, tmp_path / "dispatch-cloud.service")
    p = subprocess.run([analyze, "verify", str(local)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and not p.stderr.strip() and not p.stdout.strip(), p.stderr + p.stdout


def test_unit_exec_start_runs_the_dispatcher_as_systemd_would(venv, tmp_path):
    store = ContainerStore(str(tmp_path / "c.db"), cluster_id="zzzzz")
    store.add_token("s" * 40, admin=True)
    api = serve(store)
    cfg = site_config(tmp_path / "config.yml", api.url, f"http://127.0.0.1:{free_port()}")
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(unit_for(venv, cfg, tmp_path / "dispatch-cloud.service"))
    argv = [a for a in shlex.split(unit["Service"]["ExecStart"]) if a != "$EXTRA_OPTS"]
    notify = tmp_path / "notify"
    state = tmp_path / "state"
    state.mkdir()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify))
    sock.settimeout(60)
    log = tmp_path / "run.log"
    proc = subprocess.Popen(argv, cwd="/", stdout=subprocess.DEVNULL, stderr=open(log, "wb"),
                            env=clean_env(NOTIFY_SOCKET=str(notify), STATE_DIRECTORY=str(state)))
    try:
        assert sock.recv(64) == b"READY=1"
        # READY comes as soon as the API listens; the lock is taken next, in StateDirectory
        wait_for(lambda: f"pid {proc.pid}" in (state / "dispatch-zzzzz.lock").read_text()
                 if (state / "dispatch-zzzzz.lock").exists() else False, 30, "the lock file")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(int(unit["Service"]["TimeoutStopSec"])) == 0
        assert "Traceback" not in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        sock.close()
        api.stop()
        store.close()
