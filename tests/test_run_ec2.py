"""`dispatch-cloud run` with ``Driver: ec2`` as a real process: boto3 against moto's EC2 server
(behind the fault proxy) and the SQLite container API server, both on loopback.

No instance can boot (moto runs nothing; the proxy reports loopback addresses whose SSH port is
closed), so this run stops at "instance appeared in cloud": the dispatcher creates instances of the
right types for the queue (a spot one priced from the spot price history), keeps them booting, and
once the queue is empty nothing replaces them when TimeoutBooting shuts them down, so every instance
it created ends terminated in EC2.
"""

from __future__ import annotations

import hashlib
import signal
import time

import requests
import yaml

from api.arvados.client import ArvadosClient
from tests.dispatcher_proc import LoopbackApi, RunProcess, dispatch_key
from tests.ec2fake import ACCESS_KEY, REGION, SECRET_KEY, SpotPrice
from tests.util import free_port, wait_for

TOKEN = "systemroot" + "c" * 30
MGMT = "management" + "d" * 30
AMI = "ami-12c6146b"


def _ec2_instances(moto):
    return [i for r in moto.client().describe_instances()["Reservations"] for i in r["Instances"]]


def test_run_creates_for_the_queue_and_destroys_when_it_empties(tmp_path, ec2_endpoint):
    moto, proxy = ec2_endpoint
    key = tmp_path / "dispatch.key"
    dispatch_key(key)
    api = LoopbackApi(TOKEN, tmp_path / "c.db")
    mgmt = f"http://127.0.0.1:{free_port()}"
    cfg = tmp_path / "config.yml"
    cfg.write_text(yaml.safe_dump({"Clusters": {"zzzzz": {
        "SystemRootToken": TOKEN, "ManagementToken": MGMT,
        "Services": {"Controller": {"ExternalURL": api.url}, "DispatchCloud": {"InternalURLs": {mgmt: {}}}},
        "Containers": {"ReserveExtraRAM": 0, "LocalKeepBlobBuffersPerVCPU": 0,
                       "DispatchPrivateKey": f"file://{key}", "CloudVMs": {
            "Driver": "ec2", "ImageID": AMI, "BootProbeCommand": "true", "SSHPort": "1",
            "PollInterval": "1s", "ProbeInterval": "0.5s", "SyncInterval": "1s", "TimeoutBooting": "4s",
            "TimeoutIdle": "2s", "TimeoutShutdown": "2s", "ResourceTags": {"team": "ec2-test"},
            "DriverParameters": {"AccessKeyID": ACCESS_KEY, "SecretAccessKey": SECRET_KEY, "Region": REGION,
                                 "EndpointURL": proxy.url, "SubnetID": ""}}},
        "InstanceTypes": {"small": {"ProviderType": "t3.micro", "VCPUs": 1, "RAM": "1GiB", "Price": 0.02},
                          "big": {"ProviderType": "m5.large", "VCPUs": 2, "RAM": "4GiB", "Price": 0.1},
                          "small.spot": {"ProviderType": "t3.micro", "VCPUs": 1, "RAM": "1GiB", "Price": 0.05,
                                         "Preemptible": True}},
    }}}))
    now = time.time()  # spot prices in every AZ moto may choose; the newest is what a spot VM costs
    proxy.serve_spot_prices([SpotPrice("t3.micro", f"{REGION}{z}", p, now - age) for z in "abcdef"
                             for p, age in (("0.0123", 600), ("0.0456", 7200))])
    proc = RunProcess(cfg, tmp_path / "run.log")
    auth = {"Authorization": f"Bearer {MGMT}"}
    set_id = hashlib.md5(TOKEN.encode()).hexdigest()
    try:
        client = ArvadosClient(api.url, TOKEN)
        base = {"command": ["true"], "container_image": "img", "cwd": "/", "output_path": "/out", "priority": 1}
        uuids = [client.create_container({**base, "runtime_constraints": {"vcpus": v, "ram": 256 << 20},
                                          "scheduling_parameters": {"preemptible": spot}})["uuid"]
                 for v, spot in ((1, False), (2, False), (1, True))]

        def all_types_created():
            types = {(i["InstanceType"], i.get("InstanceLifecycle") == "spot") for i in _ec2_instances(moto)}
            return {("t3.micro", False), ("m5.large", False), ("t3.micro", True)} <= types
        wait_for(all_types_created, 30, "on-demand instances of both types and a spot one in EC2")
        for inst in _ec2_instances(moto):
            t = {x["Key"]: x["Value"] for x in inst["Tags"]}
            assert t["ArvadosInstanceSetID"] == set_id and t["team"] == "ec2-test"
            want = {("t3.micro", False): "small", ("m5.large", False): "big", ("t3.micro", True): "small.spot"}
            assert t["ArvadosInstanceType"] == want[inst["InstanceType"], inst.get("InstanceLifecycle") == "spot"]
            assert inst["KeyName"].startswith("arvados-dispatch-keypair-SHA256:")

        def priced():  # the spot VM is reported at its spot price, not its configured 0.05 bid
            items = requests.get(mgmt + "/arvados/v1/dispatch/instances", headers=auth, timeout=10).json()["items"]
            return items if any(i["price"] == 0.0123 for i in items if i["arvados_instance_type"] == "small.spot"
                                and i["instance"]) else None
        listed = wait_for(priced, 30, "the spot price in /instances")
        assert {i["price"] for i in listed if i["instance"]} <= {0.02, 0.1, 0.0123}
        assert all(i["worker_state"] in ("booting", "shutdown") for i in listed)
        metrics = requests.get(mgmt + "/metrics", headers=auth, timeout=10).text
        assert proxy.calls("DescribeSpotPriceHistory") and "arvados_dispatchcloud_ec2_instances" in metrics
        assert 'arvados_dispatchcloud_ec2_instance_starts_total{subnet_id="",success="1"}' in metrics

        for u in uuids:  # the queue empties
            client.cancel(u)

        def all_gone():
            live = [i for i in _ec2_instances(moto) if i["State"]["Name"] != "terminated"]
            items = requests.get(mgmt + "/arvados/v1/dispatch/instances", headers=auth, timeout=10).json()["items"]
            return not live and not items
        wait_for(all_gone, 30, "every instance terminated after the queue emptied")
        created = len(proxy.calls("RunInstances"))
        time.sleep(3)  # three sync intervals: nothing is created for an empty queue
        assert len(proxy.calls("RunInstances")) == created
        assert len(proxy.calls("TerminateInstances")) >= created

        assert proc.stop() == 0
        text = proc.text()
        lines = [x for x in proc.records() if "level" in x]
        msgs = {x["msg"] for x in lines}
        shutdowns = [(x.get("Reason"), x.get("State")) for x in lines if x["msg"] == "shutting down"]
        assert len(shutdowns) >= 2 and set(shutdowns) == {("unresponsive", "booting")}  # after TimeoutBooting
        assert {"creating new instance", "instance appeared in cloud", "shutting down"} <= msgs, sorted(msgs)
        assert not [x for x in lines if x["level"] in ("error", "fatal")]
        assert "Traceback" not in text and SECRET_KEY not in text
    finally:
        proc.stop(signal.SIGKILL)
        api.close()
