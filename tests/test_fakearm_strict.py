"""The fake ARM is as strict as ARM where our requests could be wrong.

For each rule: the driver's real request (through the Azure SDK) passes it, and the same request
broken in that one way is refused with ARM's error code. Then the states ARM shows that a happy
path never does: throttled and failing polls, a failing final GET, VMs Deleting or deallocated,
spot eviction, resource-group names in another case.
"""

from __future__ import annotations

import copy

import pytest
import requests

from cloud.azure import driver as azure
from cloud.base import CloudError
from cloud.clock import FakeClock
from tests.fakearm import API_VERSIONS, FakeArm
from tests.test_azure import INIT, IT, PUBKEY, SET_ID, SPOT, params, tags


@pytest.fixture
def clock():
    return FakeClock(1_700_000_000.0)


@pytest.fixture
def arm(clock):
    fake = FakeArm(polls=0, now=clock.now).start()
    yield fake
    fake.stop()


@pytest.fixture
def az(arm, clock):
    s = azure.driver(params(arm), SET_ID, clock=clock, polling_interval=0.01, op_timeout=20)
    yield s
    s.stop()


def _resend(arm, recorded, body, path=None, api_version=None):
    """Send ``body`` as the driver's recorded PUT was sent (same path, api-version, token)."""
    q = {"api-version": api_version or recorded.query["api-version"]}
    r = requests.put(arm.url + (path or recorded.path), params=q, json=body,
                     headers={"Authorization": recorded.headers["Authorization"]}, timeout=10)
    return r.status_code, (r.json().get("error") or {}).get("code") if r.content else None


def _vm_put(arm):
    return arm.sent("PUT", "virtualMachines")[-1]


def _set(d, path, value):
    *head, last = path.split(".")
    for p in head:
        d = d.setdefault(p, {})
    if value is _DROP:
        d.pop(last, None)
    else:
        d[last] = value


_DROP = object()

VM_BREAKS = [
    ("location", _DROP, "LocationRequired"),
    ("properties.hardwareProfile.vmSize", _DROP, "InvalidParameter"),
    ("properties.osProfile.adminUsername", _DROP, "InvalidParameter"),
    ("properties.osProfile.computerName", _DROP, "InvalidParameter"),
    ("properties.osProfile.computerName", "x" * 65, "InvalidParameter"),
    ("properties.osProfile.computerName", "compute_with_underscore", "InvalidParameter"),
    ("properties.osProfile.linuxConfiguration.ssh", _DROP, "InvalidParameter"),
    ("properties.priority", "Cheap", "InvalidParameter"),
    ("properties.evictionPolicy", "Delete", "InvalidParameter"),  # spot field on a regular VM
    ("properties.billingProfile", {"maxPrice": -1}, "InvalidParameter"),
    ("properties.storageProfile.osDisk.createOption", "FromNowhere", "InvalidParameter"),
    ("properties.networkProfile.networkInterfaces", [], "InvalidParameter"),
    ("tags", {f"t{i}": "v" for i in range(51)}, "InvalidTagCount"),
    ("tags", {"a/b": "v"}, "InvalidTagNameCharacters"),
    ("tags", {"k" * 513: "v"}, "InvalidTagNameCharacters"),
    ("tags", {"azure-thing": "v"}, "InvalidTagName"),
    ("tags", {"MicrosoftX": "v"}, "InvalidTagName"),
    ("tags", {"k": "v" * 257}, "InvalidTagValueLength"),
]


def test_driver_requests_pass_every_rule(arm, az):
    inst = az.create(IT, "img", tags(), INIT, PUBKEY)
    spot = az.create(SPOT, "img", tags(), INIT, PUBKEY)
    inst.set_tags({"ArvadosIdleBehavior": "hold"})
    assert {i.id for i in az.instances({})} == {inst.id, spot.id}
    assert all(r.query["api-version"] in API_VERSIONS[r.kind.lower()]
               for r in arm.requests if r.kind)
    for put in arm.sent("PUT"):  # re-sent verbatim: accepted again (an update)
        assert _resend(arm, put, put.body)[0] in (200, 201)


@pytest.mark.parametrize("path,value,code", VM_BREAKS, ids=[f"{p}={str(v)[:20]}" for p, v, _ in VM_BREAKS])
def test_each_broken_vm_request_is_refused(arm, az, path, value, code):
    az.create(IT, "img", tags(), INIT, PUBKEY)
    put = _vm_put(arm)
    body = copy.deepcopy(put.body)
    _set(body, path, value)
    assert _resend(arm, put, body) == (400, code)


def test_spot_fields_are_accepted_with_priority_spot(arm, az):
    az.create(SPOT, "img", tags(), INIT, PUBKEY)
    put = _vm_put(arm)
    assert put.body["properties"]["priority"] == "Spot"
    body = copy.deepcopy(put.body)
    body["properties"]["priority"] = "Regular"
    assert _resend(arm, put, body) == (400, "InvalidParameter")


@pytest.mark.parametrize("name", ["x" * 65, "-starts-with-dash", "ends-with-dash-", "has space"])
def test_vm_name_limits(arm, az, name):
    az.create(IT, "img", tags(), INIT, PUBKEY)
    put = _vm_put(arm)
    path = put.path.rsplit("/", 1)[0] + "/" + name
    assert _resend(arm, put, put.body, path=path) == (400, "InvalidResourceName")
    # our names are well inside the limits
    assert len(put.path.rsplit("/", 1)[1]) <= 64


@pytest.mark.parametrize("change,code", [
    (("location", _DROP), "LocationRequired"),
    (("properties.ipConfigurations", []), "InvalidRequestFormat"),
    (("properties.ipConfigurations.0.properties.privateIPAllocationMethod", "Sometimes"), "InvalidRequestFormat"),
])
def test_each_broken_nic_request_is_refused(arm, az, change, code):
    az.create(IT, "img", tags(), INIT, PUBKEY)
    put = arm.sent("PUT", "networkInterfaces")[-1]
    body = copy.deepcopy(put.body)
    path, value = change
    if ".0." in path:
        body["properties"]["ipConfigurations"][0]["properties"]["privateIPAllocationMethod"] = value
    else:
        _set(body, path, value)
    assert _resend(arm, put, body) == (400, code)


def test_unknown_api_version_is_refused(arm, az):
    az.create(IT, "img", tags(), INIT, PUBKEY)
    put = _vm_put(arm)
    assert _resend(arm, put, put.body, api_version="2017-13-45") == (400, "InvalidApiVersionParameter")


def test_tag_rules_apply_to_updates(arm, az):
    inst = az.create(IT, "img", tags(), INIT, PUBKEY)
    with pytest.raises(CloudError, match="InvalidTagName"):
        inst.set_tags({"windowsUpdate": "x"})


def test_resource_group_and_ids_match_in_any_case(arm, clock):
    s = azure.driver(params(arm, ResourceGroup="MyRG"), SET_ID, clock=clock, polling_interval=0.01)
    try:
        inst = s.create(IT, "img", tags(), INIT, PUBKEY)
        assert arm.get("virtualMachines", "myrg", inst.name) is not None
        other = azure.driver(params(arm, ResourceGroup="myrg"), SET_ID, clock=clock, polling_interval=0.01)
        try:
            assert [i.name for i in other.instances({})] == [inst.name]
            assert other.instances({})[0].address  # the NIC reference matched case-insensitively
        finally:
            other.stop()
    finally:
        s.stop()


def test_failing_final_get_is_not_a_failed_create(arm, az):
    """The operation succeeded but reading the VM back failed: nothing is deleted, and the next
    listing finds the VM."""
    arm.fail("GET", "virtualMachines", status=500, code="InternalServerError", message="oops", times=3)
    with pytest.raises(CloudError):
        az.create(IT, "img", tags(), INIT, PUBKEY)
    assert arm.sent("DELETE") == []
    assert len(az.instances({})) == 1


def test_vms_deleting_or_deallocated_are_listed_and_destroyable(arm, az):
    a = az.create(IT, "img", tags(), INIT, PUBKEY)
    b = az.create(IT, "img", tags(), INIT, PUBKEY)
    arm.set_vm_state(a.name, provisioning="Deleting")
    arm.set_vm_state(b.name, power="deallocated")
    listed = {i.name: i for i in az.instances({})}
    assert set(listed) == {a.name, b.name}
    for inst in listed.values():
        inst.destroy()
    assert arm.of_kind("virtualMachines") == []


def test_spot_eviction_leaves_a_nic_that_is_collected(arm, az, clock):
    inst = az.create(SPOT, "img", tags(), INIT, PUBKEY)
    arm.evict(inst.name)
    assert arm.get("disks", "rg", inst.name + "-os") is None
    assert az.instances({}) == []
    assert arm.get("networkInterfaces", "rg", inst.name + "-nic") is not None
    clock.advance(21)
    az.instances({})
    assert arm.get("networkInterfaces", "rg", inst.name + "-nic") is None
