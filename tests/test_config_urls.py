"""Issue 10 item 15, URLs: every URL ``run`` uses (the controller's ExternalURL, the management
API's InternalURLs and ListenURLs, the drivers' endpoint overrides) and the PostgreSQL address are
checked once, by :mod:`conf.urls`, so ``check-config`` and ``run`` refuse the same bad value with
the same one line naming file and key, before any cloud call, never showing a secret."""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import yaml

from conf.loader import load
from conf.urls import check_listen_url, check_url, shown, valid_host
from tests.dispatcher_proc import RunProcess, dispatch_cli, dispatch_key
from tests.util import free_port, wait_for

C = "Clusters.zzzzz"
SECRET = "hunter2-" + "q" * 24
EXTERNAL = "https://zzzzz.example.org"


def site(**over) -> dict:
    doc = {"Clusters": {"zzzzz": {
        "ManagementToken": "m" * 40, "SystemRootToken": "s" * 40,
        "Services": {"Controller": {"ExternalURL": EXTERNAL}},
        "Containers": {"CloudVMs": {"Driver": "stub"}},
        "InstanceTypes": {"m5": {"RAM": "8GiB", "Price": 0.2}},
    }}}
    cluster = doc["Clusters"]["zzzzz"]
    for k, v in over.items():
        if v is None:
            cluster.pop(k, None)
        else:
            cluster[k] = v
    return doc


def services(external=EXTERNAL, internal=None) -> dict:
    out = {"Controller": {"ExternalURL": external}}
    if internal is not None:
        out["DispatchCloud"] = {"InternalURLs": internal}
    return out


def write(tmp_path: Path, doc: dict, name: str = "config.yml") -> str:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(doc))
    p.chmod(0o600)
    return str(p)


# --- conf.urls -------------------------------------------------------------------------------------

@pytest.mark.parametrize("url, kw, needle", [
    ("", {}, "is empty"),
    ("zzzzz.example.org", {}, "is not an http:// or https:// URL with a host"),
    ("ftp://h.example", {}, "is not an http:// or https:// URL with a host"),
    ("https://", {}, "with a host"),
    ("https://h.example:99999", {}, "Port out of range"),
    ("https://h.example:https", {}, "is not a valid URL"),
    ("https://h.example:", {}, "has an empty port"),
    ("https://h.example:0", {}, "has port 0"),
    ("https://u:pw@h.example", {}, "must not hold a user name or password"),
    ("https://u@h.example", {}, "must not hold a user name or password"),
    ("https://h.example/?t=1", {}, "must not have a query or fragment"),
    ("https://h.example/#x", {}, "must not have a query or fragment"),
    ("https://h.example/api", {"path": False}, "must not have a path"),
    ("https://h..example", {}, "invalid host name"),
    ("https://-h.example", {}, "invalid host name"),
    ("http://*:9006", {}, "invalid host name"),
    ("https://h.example/a b", {}, "holds a space"),
    ("http://h.example", {"http_loopback_only": True}, "plain http to a host that is not loopback"),
    ("http://127.0.0.1.example.com", {"http_loopback_only": True}, "not loopback"),
])
def test_check_url_refuses(url, kw, needle):
    with pytest.raises(ValueError, match=needle.replace("?", r"\?")):
        check_url(url, **kw)


@pytest.mark.parametrize("url, kw", [
    ("https://zzzzz.example.org", {}), ("https://zzzzz.example.org/", {"path": False}),
    ("http://10.1.2.3:9006", {}), ("https://[2001:db8::1]:443/", {}), ("https://h.example/sub/path", {}),
    ("http://127.0.0.1:8080", {"http_loopback_only": True}), ("http://[::1]:1", {"http_loopback_only": True}),
    ("http://localhost:1", {"http_loopback_only": True}), ("https://bücher.example", {}),
])
def test_check_url_accepts(url, kw):
    assert check_url(url, **kw).hostname


def test_listen_url_rules():
    assert check_listen_url("http://0.0.0.0:0").port == 0  # any free port: a listen address only
    assert check_listen_url("http://[::]:9006/").port == 9006
    for bad, needle in (("https://0.0.0.0:9006", "is https"), ("http://h:1/x", "must not have a path"),
                        ("http://h:port", "not a valid URL")):
        with pytest.raises(ValueError, match=needle):
            check_listen_url(bad)


def test_shown_hides_user_info_and_query():
    assert shown(f"https://dispatch:{SECRET}@h.example:443/p?sig={SECRET}") == "https://***@h.example:443/p?..."
    assert shown("https://h.example/") == "https://h.example/"
    assert shown(f"https://[u:{SECRET}@host/?t={SECRET}") == "https://***@host/?..."  # unparseable
    assert valid_host("a_b.example") and not valid_host("a b") and not valid_host("x" * 64 + ".org")


def test_a_secret_read_as_a_port_or_a_fragment_is_never_shown():
    """"https://KEY:SECRET" with the "@host" left off parses the secret as a port: neither the
    reason nor the shown URL may repeat it; nor a token in a fragment."""
    url = f"https://AKIA:{SECRET}"
    with pytest.raises(ValueError) as e:
        check_url(url)
    assert SECRET not in str(e.value) and SECRET not in shown(url) and shown(url) == "https://AKIA:***"
    assert shown(f"https://h.example/p#tok={SECRET}") == "https://h.example/p#..."


@pytest.mark.parametrize("secret", ["wJalr/K7MDENG/bPxRfi", "ab?cd/ef", "ab#cd/ef", "a@b/c:d"])
def test_a_secret_holding_url_delimiters_is_never_shown(secret):
    """AWS secret keys hold "/": urlsplit ends the user info there, so masking the netloc left
    the rest of the secret in the path; with no "@host", the rest after a "/" was shown too. (A
    secret holding "@" without the "@host" reads as a host and path: no rule can tell.)"""
    urls = [f"https://dispatch:{secret}@zzzzz.example.org/p"] + ([f"https://AKIA:{secret}"] if "@" not in secret else [])
    for url in urls:
        tail = secret.split("/")[-1]
        assert secret not in shown(url) and tail not in shown(url), shown(url)
        with pytest.raises(ValueError) as e:
            check_url(url)
        assert tail not in str(e.value)
    assert shown(urls[0]) == "https://***@zzzzz.example.org/p"


# --- the loader ---------------------------------------------------------------------------------------
# (its one-line errors for bad URLs: tests/test_config.py, BAD)

D = f"{C}.Services.DispatchCloud.InternalURLs"


def test_loader_keeps_listen_urls_and_good_postgresql(tmp_path):
    c = load(write(tmp_path, site(
        Services=services(internal={"https://dispatch.example:9006/": {"ListenURL": "http://0.0.0.0:9006"},
                                    "http://127.0.0.1:9007": {}}),
        PostgreSQL={"Connection": {"host": "/var/run/postgresql,db2.example", "port": "5432,5433",
                                   "dbname": "arvados", "user": "arvados", "password": SECRET,
                                   "sslmode": "require", "client_encoding": "utf8"}})))
    assert c.dispatch_urls == ("http://127.0.0.1:9007", "https://dispatch.example:9006/")
    assert dict(c.dispatch_listen) == {"https://dispatch.example:9006/": "http://0.0.0.0:9006"}
    assert c.postgresql_connection["port"] == "5432,5433"
    from actors.checkconfig import summary
    assert ("management URLs:   http://127.0.0.1:9007, https://dispatch.example:9006/ (listening on "
            "http://0.0.0.0:9006)") in summary(c)


def test_management_api_listens_on_each_listen_url(monkeypatch):
    from actors.service import listen_urls
    from conf.model import Cluster
    c = Cluster(dispatch_urls=("http://a.internal:9006/", "http://b.internal:9006"),
                dispatch_listen={"http://a.internal:9006/": "http://127.0.0.1:9106"})
    monkeypatch.delenv("ARVADOS_SERVICE_INTERNAL_URL", raising=False)
    assert listen_urls(c) == ("http://127.0.0.1:9106", "http://b.internal:9006")
    monkeypatch.setenv("ARVADOS_SERVICE_INTERNAL_URL", "http://a.internal:9006")  # Go matches it with or without "/"
    assert listen_urls(c) == ("http://127.0.0.1:9106",)
    monkeypatch.setenv("ARVADOS_SERVICE_INTERNAL_URL", "http://c.internal:9006")
    assert listen_urls(c) == ("http://c.internal:9006",)


# --- check-config and run, as processes: the same line, no secret, before any cloud call ---------------

def _key_file(tmp_path: Path) -> str:
    dispatch_key(tmp_path / "dispatch.key")
    return f"file://{tmp_path / 'dispatch.key'}"


def _driver(driver: str, key: str, **params) -> dict:
    base = {"ec2": {"AccessKeyID": "AKIAEXAMPLE", "SecretAccessKey": SECRET, "Region": "us-east-1"},
            "azure": {"SubscriptionID": "sub", "ClientID": "cid", "ClientSecret": SECRET, "TenantID": "tid",
                      "ResourceGroup": "rg", "Location": "eastus", "Network": "net", "Subnet": "sn",
                      "ImageResourceGroup": "img"}}[driver]
    return {"DispatchPrivateKey": key, "CloudVMs": {"Driver": driver, "ImageID": "img-1",
                                                    "DriverParameters": {**base, **params}}}


# (overlay, key named in the error); the overlay may name the dispatch key as "KEY"
PROCESS_CASES = [
    (dict(Services=services(f"https://dispatch:{SECRET}@zzzzz.example.org")), f"{C}.Services.Controller.ExternalURL"),
    (dict(Services=services("")), f"{C}.Services.Controller.ExternalURL"),
    (dict(Services=None), f"{C}.Services.Controller.ExternalURL"),
    (dict(SystemRootToken=""), f"{C}.SystemRootToken"),
    (dict(Services=services(internal={"https://dispatch.example:9006": {}})), D),
    (dict(Services=services(internal={"http://127.0.0.1:9006": {"ListenURL": "http://127.0.0.1:x"}})),
     f"{D}.http://127.0.0.1:9006.ListenURL"),
    (dict(PostgreSQL={"Connection": {"host": "db.example", "port": "fivefourthreetwo", "password": SECRET}}),
     f"{C}.PostgreSQL.Connection.port"),
    (dict(Containers=("ec2", {"EndpointURL": "http://ec2.example.com"})), "DriverParameters.EndpointURL"),
    (dict(Containers=("azure", {"ResourceManagerEndpoint": f"https://arm:{SECRET}@arm.example"})),
     "DriverParameters.ResourceManagerEndpoint"),
    (dict(Containers=("azure", {"AuthorityHost": "https://login.example:70000"})), "DriverParameters.AuthorityHost"),
]


def _cli(args, tmp_path, env=None):
    return dispatch_cli(args, tmp_path / "state", env=env)


@pytest.mark.parametrize("over, key", PROCESS_CASES, ids=[f"{k.rsplit('.', 1)[-1]}-{i}" for i, (_, k) in enumerate(PROCESS_CASES)])
def test_check_config_and_run_refuse_the_same_bad_url(tmp_path, over, key):
    over = copy.deepcopy(over)
    if "Containers" in over:
        driver, params = over["Containers"]
        over["Containers"] = _driver(driver, _key_file(tmp_path), **params)
    path = write(tmp_path, site(**over))
    with ThreadPoolExecutor(2) as pool:
        check, run = pool.map(lambda args: _cli(args, tmp_path), (["check-config", "--config", path],
                                                                  ["run", "--config", path]))
    assert check.returncode == 1 and run.returncode == 1, (check.stderr, run.stderr)
    line = check.stderr.splitlines()[-1]
    assert line.startswith(f"dispatch-cloud: {path}: ") and key in line, line
    assert line in run.stderr.splitlines(), run.stderr
    assert check.stdout == "" and "Traceback" not in check.stderr + run.stderr
    assert SECRET not in check.stdout + check.stderr + run.stdout + run.stderr
    assert not (tmp_path / "state").exists() or not any((tmp_path / "state").iterdir())  # no lock taken


def test_run_refuses_a_bad_service_internal_url_before_the_cloud(tmp_path):
    """$ARVADOS_SERVICE_INTERNAL_URL is no config, so only ``run`` sees it: still before the cloud."""
    path = write(tmp_path, site(Containers={"CloudVMs": {"Driver": "local", "DriverParameters": {
        "StateDir": str(tmp_path / "vms")}}, "DispatchPrivateKey": _key_file(tmp_path)}))
    r = _cli(["run", "--config", path], tmp_path, env={"ARVADOS_SERVICE_INTERNAL_URL": "https://127.0.0.1:9"})
    assert r.returncode == 1
    assert "cannot start: listen URL 'https://127.0.0.1:9' is https" in r.stderr
    assert not (tmp_path / "vms").exists()  # the local driver's instance set was never made


def test_run_serves_the_management_api_on_the_listen_url(tmp_path):
    """An InternalURL behind a proxy (https, a name) is served on its ListenURL."""
    port = free_port()
    path = write(tmp_path, site(Services=services(
        "http://127.0.0.1:9", {"https://dispatch.zzzzz.example:9006": {"ListenURL": f"http://127.0.0.1:{port}"}})))
    proc = RunProcess(path, tmp_path / "run.log")
    try:
        def ping():
            try:
                return requests.get(f"http://127.0.0.1:{port}/_health/ping",
                                    headers={"Authorization": "Bearer " + "m" * 40}, timeout=2).json()
            except requests.RequestException:
                return None
        assert wait_for(ping, 30, "the management API on the ListenURL") == {"health": "OK"}
    finally:
        assert proc.stop() == 0, proc.text()[-2000:]
