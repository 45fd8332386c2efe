"""Bad input at the edges (issue 11): config files built to hang or crash the loader, secrets
written with the wrong YAML type, key files anyone can read, dev state another user could have
written, URLs that look local, container UUIDs built to run a shell command, and numbers too big
for the dev container API. Each answer is one clear line, never a traceback or a secret."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from api.arvados.client import base_url
from conf.loader import ConfigError, MAX_EXPANDED_NODES, load, load_text

REPO = Path(__file__).resolve().parents[1]
C = "Clusters.zzzzz"
SITE = """
Clusters:
  zzzzz:
    ManagementToken: mmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmm
    SystemRootToken: ssssssssssssssssssssssssssssssssssssssss
    Containers: {CloudVMs: {Driver: stub}}
    InstanceTypes: {m5: {RAM: 8GiB, Price: 0.2}}
"""


def site(**cluster) -> dict:
    doc = yaml.safe_load(SITE)
    c = doc["Clusters"]["zzzzz"]
    for k, v in cluster.items():
        if isinstance(v, dict) and isinstance(c.get(k), dict):
            c[k] = {**c[k], **v}
        else:
            c[k] = v
    return doc


def write(tmp_path, doc, name="config.yml") -> str:
    p = tmp_path / name
    p.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return str(p)


def bounded(fn, seconds: float):
    """Run ``fn`` and fail if it took longer than ``seconds`` (the bug was a hang)."""
    t0 = time.monotonic()
    try:
        return fn()
    finally:
        took = time.monotonic() - t0
        assert took < seconds, f"took {took:.2f}s"


# --- the config loader -------------------------------------------------------------------------------

BOMB = "\n".join(["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
                 + [f"a{i}: &a{i} [*a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}]"
                    for i in range(1, 9)])


@pytest.mark.parametrize("where", ["top", "ignored section"])
def test_yaml_alias_bomb_is_refused_quickly(where):
    bomb = "\n".join("  " + line for line in BOMB.splitlines())
    if where == "top":
        text = "Bomb:\n" + bomb + SITE
    else:  # inside a section the dispatcher does not read (Workbench), so nothing else touches it
        text = SITE + "    Workbench:\n" + "\n".join("    " + line for line in bomb.splitlines()) + "\n"
    with pytest.raises(ConfigError) as e:
        bounded(lambda: load_text(text, source="bomb.yml"), 2.0)
    assert str(e.value) == f"bomb.yml: YAML aliases expand the document past {MAX_EXPANDED_NODES} nodes"


def test_modest_aliases_still_load():
    text = SITE.replace("InstanceTypes: {m5: {RAM: 8GiB, Price: 0.2}}",
                        "InstanceTypes:\n      m5: &t {RAM: 8GiB, Price: 0.2}\n      m6: *t")
    c = load_text(text)
    assert set(c.instance_types) == {"m5", "m6"}


def test_recursive_alias_is_refused():
    with pytest.raises(ConfigError, match="refers to itself"):
        load_text("Loop: &l [*l]\n" + SITE, source="loop.yml")


@pytest.mark.parametrize("value", ["1" * 30000, "1" * 30000 + "x", "1" * 4000 + "GiB", "1e999999999", "9" * 70 + "s"])
def test_huge_sizes_and_durations_are_refused_quickly(tmp_path, value):
    for key, section in (("RAM", "InstanceTypes"), ("PollInterval", "CloudVMs")):
        if section == "InstanceTypes":
            doc = site(InstanceTypes={"m5": {"RAM": value, "Price": 0.2}})
            where = f"{C}.InstanceTypes.m5.RAM"
        else:
            doc = site(Containers={"CloudVMs": {"Driver": "stub", "PollInterval": value}})
            where = f"{C}.Containers.CloudVMs.PollInterval"
        path = write(tmp_path, doc)
        with pytest.raises(ConfigError) as e:
            bounded(lambda: load(path), 1.0)
        msg = str(e.value)
        assert msg.startswith(f"{path}: {where}: ") and len(msg) < 400 and "\n" not in msg


def test_huge_integer_literal_is_a_message_not_a_traceback(tmp_path):
    text = SITE.replace("Price: 0.2", "Price: " + "7" * 30000)
    with pytest.raises(ConfigError) as e:
        bounded(lambda: load_text(text, source="big.yml"), 1.0)
    assert str(e.value).startswith("big.yml: invalid YAML: a value cannot be read")


def _key_pem() -> str:
    return ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()).decode()


def test_private_key_file_reads_are_capped(tmp_path):
    path = write(tmp_path, site(Containers={"DispatchPrivateKey": "file:///dev/zero"}))
    with pytest.raises(ConfigError) as e:
        bounded(lambda: load(path), 1.0)
    assert str(e.value) == f"{path}: {C}.Containers.DispatchPrivateKey: /dev/zero is not a regular file"
    big = tmp_path / "big.key"
    big.write_bytes(b"A" * (1 << 20))
    big.chmod(0o600)
    path = write(tmp_path, site(Containers={"DispatchPrivateKey": f"file://{big}"}))
    with pytest.raises(ConfigError) as e:
        load(path)
    assert str(e.value) == f"{path}: {C}.Containers.DispatchPrivateKey: {big} is larger than 64 KiB: not an SSH private key"


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_private_key_file_readable_by_others_is_refused(tmp_path, mode):
    key = tmp_path / "dispatch.key"
    key.write_text(_key_pem())
    key.chmod(mode)
    path = write(tmp_path, site(Containers={"DispatchPrivateKey": f"file://{key}"}))
    with pytest.raises(ConfigError) as e:
        load(path)
    assert str(e.value) == (f"{path}: {C}.Containers.DispatchPrivateKey: {key} is readable by group or "
                            f"others (mode {mode:04o}); run: chmod 600 {key}")
    key.chmod(0o600)
    assert load(path).containers.dispatch_private_key == key.read_text()


NUMERIC_SECRET = 11112222333344445555


@pytest.mark.parametrize("key", ["ManagementToken", "SystemRootToken"])
def test_numeric_secret_is_not_echoed(tmp_path, caplog, key):
    caplog.set_level(logging.DEBUG)
    path = write(tmp_path, SITE.replace(f"{key}: " + key[0].lower() * 40, f"{key}: {NUMERIC_SECRET}"))
    with pytest.raises(ConfigError) as e:
        load(path)
    assert str(e.value) == f"{path}: {C}.{key}: expected a string, got a number (put it in quotes)"
    assert str(NUMERIC_SECRET) not in caplog.text


def _cloud_site(driver, secret, key_file=None) -> str:
    containers = {}
    if key_file:  # the azure driver's check wants the key it deploys (Azure refuses a VM without)
        containers["DispatchPrivateKey"] = f"file://{key_file}"
    if driver == "azure":
        params = {"SubscriptionID": "sub", "ClientID": "cid", "ClientSecret": secret, "TenantID": "tid",
                  "ResourceGroup": "rg", "Location": "eastus", "Network": "net", "Subnet": "sn",
                  "ImageResourceGroup": "img"}
    else:
        params = {"AccessKeyID": "AKIAEXAMPLE", "SecretAccessKey": secret, "Region": "us-east-1"}
    return yaml.safe_dump(site(Services={"Controller": {"ExternalURL": "https://zzzzz.example.org"}},
                               Containers={**containers, "CloudVMs": {"Driver": driver, "DriverParameters": params}}))


@pytest.mark.parametrize("driver,key", [("azure", "ClientSecret"), ("ec2", "SecretAccessKey")])
def test_check_config_rejects_a_numeric_cloud_secret_without_echoing_it(tmp_path, driver, key):
    """What `run` rejects, `check-config` rejects first, and neither shows the secret."""
    path = write(tmp_path, _cloud_site(driver, NUMERIC_SECRET))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    outs = []
    for cmd in (["check-config", "--config", path], ["run", "--config", path]):
        p = subprocess.run([sys.executable, "-m", "actors.cli", *cmd], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=60)
        assert p.returncode != 0, p.stdout
        outs.append(p.stdout + p.stderr)
        assert f"{key}: expected a string" in p.stderr, p.stderr
        assert "Traceback" not in p.stderr
    assert all(str(NUMERIC_SECRET) not in o for o in outs), outs
    key_file = tmp_path / "dispatch.key"
    key_file.write_bytes(ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    key_file.chmod(0o600)
    good = write(tmp_path, _cloud_site(driver, "a-quoted-secret", key_file), "good.yml")
    p = subprocess.run([sys.executable, "-m", "actors.cli", "check-config", "--config", good], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "a-quoted-secret" not in p.stdout + p.stderr


# --- dev mode state ------------------------------------------------------------------------------------

def test_dev_mode_refuses_state_others_can_write(tmp_path):
    from actors.devmode import UnsafeState, ensure_state, find_config
    root = tmp_path / "dev"
    cfg = ensure_state(root)
    assert (root.stat().st_mode & 0o777) == 0o700 and (cfg.stat().st_mode & 0o777) == 0o600
    assert ensure_state(root) == cfg and find_config(str(tmp_path)) == cfg
    cfg.chmod(0o666)
    for check in (lambda: ensure_state(root), lambda: find_config(str(tmp_path))):
        with pytest.raises(UnsafeState, match="config.yml is writable by group or others"):
            check()
    cfg.chmod(0o600)
    root.chmod(0o777)
    with pytest.raises(UnsafeState, match="writable by group or others"):
        ensure_state(root)
    root.chmod(0o700)
    assert ensure_state(root) == cfg


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a file to another user")
def test_dev_mode_refuses_a_config_owned_by_another_user(tmp_path):
    state = tmp_path / "state"
    from actors.devmode import ensure_state
    cfg = ensure_state(state / "dev")
    os.chown(cfg, 4242, 4242)
    env = {**os.environ, "DISPATCH_CLOUD_STATE": str(state), "PYTHONPATH": str(REPO)}
    for cmd in (["run"], ["submit", "--", "true"]):
        p = subprocess.run([sys.executable, "-m", "actors.cli", *cmd], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 1
        assert p.stderr.strip() == (f"dispatch-cloud: {cfg} is owned by uid 4242, not by the current user "
                                    f"({os.geteuid()}): refusing to use it"), p.stderr


# --- URLs keep their scheme ------------------------------------------------------------------------------

@pytest.mark.parametrize("given,want", [
    ("https://127.0.0.1.example.com", "https://127.0.0.1.example.com"),
    ("https://localhost", "https://localhost"),
    ("https://localhost:8443/", "https://localhost:8443"),
    ("https://[::1]:9", "https://[::1]:9"),
    ("127.0.0.1.example.com:443", "https://127.0.0.1.example.com:443"),
    ("127.attacker.example:443", "https://127.attacker.example:443"),
    ("127.0.0.9:80", "http://127.0.0.9:80"),
    ("http://ctrl.example", "http://ctrl.example"),
])
def test_urls_keep_their_scheme(given, want):
    assert base_url(given) == want


def test_the_service_client_keeps_https_for_a_local_looking_host(tmp_path):
    from actors.service import build_real
    from cloud.clock import SystemClock
    for url in ("https://127.0.0.1.example.com", "https://localhost:8443"):
        c = load_text(SITE.replace("Containers:", f"Services: {{Controller: {{ExternalURL: '{url}'}}}}\n    Containers:"))
        driver_set, client, _ = build_real(c, SystemClock())
        try:
            assert client.base_url == url.rstrip("/")
        finally:
            driver_set.stop()


# --- container UUIDs ---------------------------------------------------------------------------------------

def test_queue_skips_and_logs_malformed_uuids(caplog):
    from actors.queue import QueueActor
    from api.arvados.inprocess import LocalArvadosClient
    from api.arvados.store import ContainerStore
    store = ContainerStore(":memory:", cluster_id="zzzzz")
    token = "t" * 40
    store.add_token(token, admin=True)
    client = LocalArvadosClient(store, token)
    body = {"command": ["true"], "container_image": "img", "cwd": "/", "output_path": "/out", "priority": 1,
            "runtime_constraints": {"vcpus": 1, "ram": 1 << 20}}
    good = client.create_container(body)["uuid"]
    evil = [client.create_container(body)["uuid"] for _ in range(3)]
    bad = ["x'; touch PWNED; '", "zzzzz-dz642-AAAAAAAAAAAAAAA", "zzzzz-dz642-aaaaaaaaaaaaaaa\n"]
    with store._write_lock:
        for old, new in zip(evil, bad):  # what a malicious (or spoofed) API server could return
            store._conn.execute("UPDATE containers SET uuid = ? WHERE uuid = ?", (new, old))
    q = QueueActor(client=client, chooser=None, scheduler=None, ticker=None, cluster=load_text(SITE),
                   first_now=0.0)
    caplog.set_level(logging.WARNING, logger="dispatch.queue")
    for _ in range(2):
        res = q._fetch(0.0, set(), frozenset(), "")
        assert [c["uuid"] for c in res.containers] == [good] and set(res.mounts) == {good}
    skipped = [r for r in caplog.records if r.getMessage() == "skipping a container with a malformed UUID"]
    assert sorted(r.ContainerUUID for r in skipped) == sorted(repr(b) for b in bad)  # once each
    store.close()


# --- the dev container API: 422, not 500 -------------------------------------------------------------------

@pytest.fixture
def devapi():
    import requests
    from api.arvados.server import serve
    from api.arvados.store import ContainerStore
    store = ContainerStore(":memory:")
    store.add_token("a" * 30, admin=True)
    server = serve(store)
    s = requests.Session()
    s.headers["Authorization"] = "Bearer " + "a" * 30
    yield s, server.url + "/arvados/v1"
    server.stop()
    store.close()


HUGE = 10**30


@pytest.mark.parametrize("params", [
    {"filters": f'[["priority", ">", {HUGE}]]'},
    {"filters": f'[["priority", "in", [1, {HUGE}]]]'},
    {"filters": f'[["priority", ">", "{HUGE}"]]'},
    {"filters": '[["priority", ">", 1e999]]'},
    {"offset": str(HUGE)},
    {"limit": str(HUGE)},
    {"offset": "1e999"},
    {"select": '["uuid", [1]]'},
    {"select": '["uuid", {"a": 1}]'},
    {"order": '[["uuid"]]'},
    {"filters": '[[["uuid"], "=", "x"]]'},
    {"filters": '[["uuid", ["="], "x"]]'},
])
def test_out_of_range_and_malformed_list_parameters_are_422(devapi, caplog, params):
    s, base = devapi
    r = s.get(base + "/containers", params=params, timeout=10)
    assert r.status_code == 422, r.text
    assert r.headers["Content-Type"].startswith("application/json") and r.json()["errors"]
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR]


@pytest.mark.parametrize("fields", [{"priority": HUGE}, {"priority": -HUGE}, {"exit_code": HUGE},
                                    {"cost": float("inf")}])
def test_out_of_range_values_in_writes_are_422(devapi, fields):
    s, base = devapi
    body = {"container": {"container_image": "img", "command": ["true"], **fields}}
    import json
    r = s.post(base + "/containers", data=json.dumps(body, allow_nan=True),
               headers={"Content-Type": "application/json"}, timeout=10)
    assert r.status_code == 422, r.text
