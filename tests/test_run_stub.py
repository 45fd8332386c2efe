"""`dispatch-cloud run --config` as a real process on the stub cloud in real time: it finishes a
small queue within a minute, serves the management API, dumps thread stacks on SIGUSR1, and stops
cleanly on SIGTERM. The container API is the SQLite-backed server on loopback."""

from __future__ import annotations

import json
import signal
import time

import requests
import yaml

from api.arvados.client import ArvadosClient
from tests.dispatcher_proc import LoopbackApi, RunProcess, dispatch_cli, stub_site
from tests.util import free_port, wait_for

TOKEN = "systemroot" + "a" * 30
MGMT = "management" + "b" * 30


def test_run_on_stub_cloud_in_real_time(tmp_path):
    api = LoopbackApi(TOKEN, tmp_path / "c.db")
    mgmt = f"http://127.0.0.1:{free_port()}"
    cfg = tmp_path / "config.yml"
    cfg.write_text(yaml.safe_dump(stub_site(api.url, mgmt, TOKEN, MGMT)))
    log = tmp_path / "run.log"
    proc = RunProcess(cfg, log)
    try:
        client = ArvadosClient(api.url, TOKEN)
        base = {"command": ["true"], "container_image": "img", "cwd": "/", "output_path": "/out"}
        uuids = [client.create_container({**base, "priority": 1,
                                          "runtime_constraints": {"vcpus": v, "ram": 256 << 20}})["uuid"]
                 for v in (1, 1, 3)]
        t0 = time.time()
        wait_for(lambda: all(client.get_container(u)["state"] == "Complete" for u in uuids), 60,
                 "the queue to finish")
        took = time.time() - t0
        assert took < 60
        auth = {"Authorization": f"Bearer {MGMT}"}
        r = requests.get(mgmt + "/arvados/v1/dispatch/instances", headers=auth, timeout=10)
        assert r.status_code == 200
        # the 3-VCPU container needed the big type, the others the cheapest
        created = [json.loads(x).get("InstanceType") for x in log.read_text().splitlines()
                   if '"creating new instance"' in x]
        assert "big" in created and "small" in created and set(created) <= {"small", "big"}
        assert requests.get(mgmt + "/arvados/v1/dispatch/instances", timeout=10).status_code == 401
        # idle instances go after TimeoutIdle
        wait_for(lambda: requests.get(mgmt + "/arvados/v1/dispatch/instances", headers=auth,
                                      timeout=10).json()["items"] == [], 30, "idle shutdown")
        # SIGUSR1: every thread's stack, as one JSON log line
        proc.send(signal.SIGUSR1)

        def dumped():
            for line in log.read_text().splitlines():
                if '"thread dump"' in line:
                    return json.loads(line)
            return None
        rec = wait_for(dumped, 10, "the thread dump")
        assert "SchedulerActor" in rec["stacks"] and "Ticker" in rec["stacks"]
        assert proc.stop() == 0
        lines = [x for x in proc.records() if "level" in x]
        assert not [x for x in lines if x["level"] in ("error", "fatal") and "create failed" not in x["msg"]]
        assert "Traceback" not in proc.text()
    finally:
        proc.stop(signal.SIGKILL)
        api.close()


def test_run_with_a_bad_config_is_one_line_and_no_traceback(tmp_path):
    cfg = tmp_path / "bad.yml"
    cfg.write_text("Clusters:\n  zzzzz:\n    Containers: {CloudVMs: {Driver: stub}}\n"
                   "    InstanceTypes:\n      m5: {RAM: 16 gigs, Price: 1}\n")
    p = dispatch_cli(["run", "--config", cfg], tmp_path / "state")
    assert p.returncode == 1
    err = [x for x in p.stderr.splitlines() if x.startswith("dispatch-cloud:")]
    assert len(err) == 1 and "InstanceTypes.m5.RAM" in err[0] and str(cfg) in err[0]
    assert "Traceback" not in p.stderr
