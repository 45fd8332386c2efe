"""The driver conformance suite on every driver we ship: stub, azure (via the fake ARM), ec2 (via
moto's server), local."""

from __future__ import annotations

import dataclasses
import random

import pytest

from cloud.clock import FakeClock, SystemClock
from cloud.azure import driver as azure
from cloud.base import CapacityError, CloudError, QuotaError, RateLimitError
from cloud.conformance import (ErrorCase, all_ok, polling_wait, run_conformance, stepping_wait,
                               summary)
from cloud.stub.driver import StubCloud, StubParams
from conf.model import InstanceType
from tests.fakearm import FakeArm

IT = InstanceType("small", "Standard_D2s_v3", 2, 4 << 30, 8 << 30, 0, 0.1)


def _assert_all_ok(results):
    lines = "\n".join(r.line() for r in results)
    assert all_ok(results), lines
    assert len(results) >= 7, lines  # six steps and at least one typed error


# --- stub -----------------------------------------------------------------------------------


@pytest.fixture
def stub():
    clock = FakeClock()
    cloud = StubCloud(clock, StubParams(boot_time=5, boot_time_jitter=0))
    yield clock, cloud
    cloud.stop()


def _stub_capacity(cloud):
    def arm():
        def refuse(vm):
            raise CapacityError("no capacity", instance_type_specific=True)
        cloud.setup_vm = refuse

    def disarm():
        cloud.setup_vm = None
    return ErrorCase("no capacity", CapacityError, arm, disarm)


def test_stub_passes(stub):
    clock, cloud = stub
    results = run_conformance(cloud.instance_set, IT, wait=stepping_wait(clock, advance=cloud.advance),
                              error_cases=[_stub_capacity(cloud)])
    _assert_all_ok(results)
    assert any("CapacityError" in r.name for r in results)
    assert cloud.vms == []  # nothing left behind


def test_suite_catches_a_driver_that_forgets_tags(stub):
    """The suite must be able to fail: a driver whose set_tags is a no-op is caught."""
    clock, cloud = stub

    def make(set_id):
        s = cloud.instance_set(set_id)
        real_create = s.create

        def create(*a, **kw):
            inst = real_create(*a, **kw)
            inst.set_tags = lambda tags: None
            return inst
        s.create = create
        real_instances = s.instances

        def instances(tags):
            out = real_instances(tags)
            for i in out:
                i.set_tags = lambda tags: None
            return out
        s.instances = instances
        return s
    results = run_conformance(make, IT, wait=stepping_wait(clock, steps=5, advance=cloud.advance))
    status = summary(results)
    assert status["set_tags persists in a fresh listing"] == "FAIL"
    assert status["destroy: instance goes away"] == "ok"
    assert not all_ok(results) and cloud.vms == []


def test_suite_reports_wrong_error_class_and_still_cleans_up(stub):
    clock, cloud = stub
    wrong = ErrorCase("claims quota", QuotaError, lambda: setattr(cloud, "setup_vm", _raise_plain),
                      lambda: setattr(cloud, "setup_vm", None))
    results = run_conformance(cloud.instance_set, IT, wait=stepping_wait(clock, advance=cloud.advance),
                              error_cases=[wrong])
    assert summary(results)["typed error: claims quota -> QuotaError"] == "FAIL"
    assert cloud.vms == []


def _raise_plain(vm):
    raise CloudError("plain failure")


# --- azure (through the SDK, against the fake ARM) ------------------------------------------


def test_azure_passes():
    clock = FakeClock()
    with FakeArm(page_size=2, polls=1, now=clock.now) as arm:
        params = {"SubscriptionID": "sub", "ResourceGroup": "rg", "Network": "vnet", "Subnet": "default",
                  "ResourceManagerEndpoint": arm.url}

        def make(set_id):
            return azure.driver(params, set_id, clock=clock, polling_interval=0.01, op_timeout=20)
        cases = [
            ErrorCase("429", RateLimitError, lambda: arm.fail("PUT", "virtualMachines", 429, "TooManyRequests",
                                                              "slow down", headers={"Retry-After": "30"})),
            ErrorCase("quota", QuotaError, lambda: arm.fail("PUT", "virtualMachines", 409, "OperationNotAllowed",
                                                            "exceeding approved Total Regional Cores quota")),
            ErrorCase("allocation", CapacityError, lambda: arm.fail("PUT", "virtualMachines", 200,
                                                                    "AllocationFailed", "no capacity",
                                                                    async_=True)),
        ]
        results = run_conformance(make, IT, wait=stepping_wait(clock), error_cases=cases,
                                  public_key="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeKeyForTests d")
        _assert_all_ok(results)
        assert arm.of_kind("virtualMachines") == []
        clock.advance(3600)  # the leftover NICs are collected by the next listings
        s = make("zzzzz-zzzzz-conformancetest")
        s.instances({})
        s.stop()
        assert arm.of_kind("networkInterfaces") == []


# --- ec2 (through boto3, against moto's server behind the fault proxy) ----------------------


def test_ec2_passes(ec2_endpoint):
    from cloud.ec2 import driver as ec2
    from tests.ec2fake import ACCESS_KEY, REGION, SECRET_KEY
    moto, proxy = ec2_endpoint
    clock = FakeClock()
    params = {"AccessKeyID": ACCESS_KEY, "SecretAccessKey": SECRET_KEY, "Region": REGION, "EndpointURL": proxy.url}
    it = dataclasses.replace(IT, provider_type="t3.micro")

    def make(set_id):
        return ec2.driver(params, set_id, clock=clock)
    cases = [
        ErrorCase("RequestLimitExceeded", RateLimitError,
                  lambda: proxy.fail("RunInstances", "RequestLimitExceeded", "Request limit exceeded.", status=503)),
        ErrorCase("InstanceLimitExceeded", QuotaError,
                  lambda: proxy.fail("RunInstances", "InstanceLimitExceeded", "instance limit exceeded")),
        ErrorCase("InsufficientInstanceCapacity", CapacityError,
                  lambda: proxy.fail("RunInstances", "InsufficientInstanceCapacity", "no t3.micro capacity")),
    ]
    results = run_conformance(make, it, wait=stepping_wait(clock), image_id="ami-12c6146b", error_cases=cases,
                              public_key="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIIuSmmbQ9V9MbNDnBtGFL8QfbzVLpxT2EXgcCEdEY9fT test")
    _assert_all_ok(results)
    live = [i for r in moto.client().describe_instances()["Reservations"] for i in r["Instances"]
            if i["State"]["Name"] not in ("shutting-down", "terminated")]
    assert live == []  # everything it made is gone from the "cloud"
    assert len(proxy.calls("TerminateInstances")) >= 1


# --- local (real processes and SSH servers on 127.0.0.0/8) ----------------------------------


def test_local_passes(tmp_path):
    from cloud.local import driver as local
    base = f"127.{random.randint(100, 250)}.{random.randint(0, 250)}.2"  # away from other tests' VMs
    params = {"StateDir": str(tmp_path / "state"), "BootDelay": "0s", "AddressBase": base, "MaxInstances": 1}
    it = dataclasses.replace(IT, provider_type="local")

    def make(set_id):
        return local.driver(params, set_id, clock=SystemClock())
    results = run_conformance(make, it, wait=polling_wait(timeout=15, interval=0.1),
                              public_key="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIIuSmmbQ9V9MbNDnBtGFL8QfbzVLpxT2EXgcCEdEY9fT test",
                              error_cases=[ErrorCase("MaxInstances reached", QuotaError, lambda: None)])
    _assert_all_ok(results)
    assert local.driver(params, "x", clock=SystemClock()).instances({}) == []
