"""The Azure driver through the real azure-mgmt SDK clients, against a fake ARM on 127.0.0.1."""

from __future__ import annotations

import base64
import logging
import re
import threading
import time
from email.utils import format_datetime
from datetime import datetime, timezone

import pytest
from hypothesis import given, strategies as st

from cloud.clock import FakeClock
from cloud.azure import driver as azure
from cloud.azure import errors as azure_errors
from cloud.azure.config import AzureConfigError, parse, parse_duration
from cloud.base import (CapacityError, CloudError, NotSupported, QuotaError, RateLimitError,
                        capacity_scope, is_quota_error, rate_limit_retry_at, wrap)
from conf.model import InstanceType
from tests.fakearm import FakeArm, iso

SET_ID = "abc123"
SECRET = "0123456789abcdef0123456789abcdef01234567"
CLIENT_SECRET = "very-secret-client-password"
IT = InstanceType("small", "Standard_D2s_v3", 2, 8 << 30, 16 << 30, 0, 0.1)
SPOT = InstanceType("small.spot", "Standard_D2s_v3", 2, 8 << 30, 16 << 30, 0, 0.03, preemptible=True)
INIT = f'umask 0177 && echo -n "{SECRET}" >/var/run/arvados-instance-secret\necho booted'
PUBKEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeKeyForTests dispatcher"


@pytest.fixture
def clock():
    return FakeClock(1_700_000_000.0)


@pytest.fixture
def arm(clock):
    fake = FakeArm(page_size=100, polls=1, now=clock.now).start()
    yield fake
    fake.stop()


def params(arm, **extra):
    p = {"SubscriptionID": "sub", "ResourceGroup": "rg", "Network": "vnet", "Subnet": "default",
         "ClientSecret": CLIENT_SECRET, "ResourceManagerEndpoint": arm.url}
    p.update(extra)
    return p


@pytest.fixture
def make_set(arm, clock):
    made = []

    def make(logger=None, **extra):
        s = azure.driver(params(arm, **extra), SET_ID, clock=clock, polling_interval=0.01,
                         op_timeout=20, logger=logger)
        made.append(s)
        return s
    yield make
    for s in made:
        s.stop()


def tags():
    return {"ArvadosInstanceSetID": SET_ID, "ArvadosInstanceType": "small", "ArvadosInstanceSecret": SECRET}


def vm_body(arm):
    return arm.sent("PUT", "virtualMachines")[-1].body


# --- create ---------------------------------------------------------------------------------


def test_create_makes_nic_then_vm_with_tags_custom_data_and_key(arm, make_set, clock):
    s = make_set()
    inst = s.create(IT, "my-image", tags(), INIT, PUBKEY)

    puts = [r for r in arm.requests if r.method == "PUT"]
    assert [r.kind for r in puts] == ["networkInterfaces", "virtualMachines"]
    assert all("api-version" in r.query for r in arm.requests)
    name = inst.name
    assert name.startswith(f"compute-{SET_ID}-") and len(name) == len(f"compute-{SET_ID}-") + 15
    assert puts[0].path.endswith(f"/networkInterfaces/{name}-nic")
    nic = puts[0].body
    ipc = nic["properties"]["ipConfigurations"][0]
    assert ipc["name"] == "ip1" and ipc["properties"]["privateIPAllocationMethod"] == "Dynamic"
    assert ipc["properties"]["subnet"]["id"] == (
        "/subscriptions/sub/resourceGroups/rg/providers/Microsoft.Network/virtualnetworks/vnet/subnets/default")
    created_at = "2023-11-14T22:13:20Z"
    assert nic["tags"] == {**tags(), "created-at": created_at}
    assert nic["location"] == "centralus"

    vm = puts[1].body
    assert vm["tags"] == {**tags(), "created-at": created_at}
    p = vm["properties"]
    assert p["hardwareProfile"]["vmSize"] == "Standard_D2s_v3"
    assert p["networkProfile"]["networkInterfaces"][0]["id"].endswith(f"/networkInterfaces/{name}-nic")
    assert p["storageProfile"]["imageReference"]["id"] == (
        "/subscriptions/sub/resourceGroups/rg/providers/Microsoft.Compute/images/my-image")
    assert p["storageProfile"]["osDisk"] == {"osType": "Linux", "name": f"{name}-os", "createOption": "FromImage"}
    osp = p["osProfile"]
    assert osp["computerName"] == name and osp["adminUsername"] == "crunch"
    assert base64.b64decode(osp["customData"]).decode() == "#!/bin/sh\n" + INIT + "\n"
    lin = osp["linuxConfiguration"]
    assert lin["disablePasswordAuthentication"] is True
    assert lin["ssh"]["publicKeys"] == [{"path": "/home/crunch/.ssh/authorized_keys", "keyData": PUBKEY}]
    assert "priority" not in p and "billingProfile" not in p

    assert inst.id == f"/subscriptions/sub/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/{name}"
    assert inst.address.startswith("10.1.")
    assert inst.provider_type == "Standard_D2s_v3"
    assert inst.remote_user == "crunch"
    assert inst.tags["ArvadosInstanceSecret"] == SECRET
    assert s.instance_quota_group(IT) == ""
    with pytest.raises(NotSupported):
        inst.verify_host_key(None, None)


def test_create_honours_admin_user_and_location(arm, make_set):
    s = make_set(AdminUsername="ops", Location="westeurope")
    s.create(IT, "img", tags(), INIT, PUBKEY)
    body = vm_body(arm)
    assert body["properties"]["osProfile"]["linuxConfiguration"]["ssh"]["publicKeys"][0]["path"] == (
        "/home/ops/.ssh/authorized_keys")
    assert body["properties"]["osProfile"]["adminUsername"] == "ops"
    assert body["location"] == "westeurope"


def test_create_without_key_is_refused_by_arm_as_go_would_be(arm, make_set):
    """No key and password login disabled: ARM answers 400 (check-config rejects this config)."""
    s = make_set()
    with pytest.raises(CloudError, match="Authentication using either SSH") as ei:
        s.create(IT, "img", tags(), INIT, None)
    assert not isinstance(ei.value, (CapacityError, QuotaError, RateLimitError))
    assert "ssh" not in vm_body(arm)["properties"]["osProfile"]["linuxConfiguration"]
    assert arm.of_kind("networkInterfaces") == []  # a synchronous rejection: cleaned up


def test_preemptible_is_spot_with_its_own_quota_group(arm, make_set):
    s = make_set()
    s.create(SPOT, "img", tags(), INIT, PUBKEY)
    p = vm_body(arm)["properties"]
    assert p["priority"] == "Spot" and p["evictionPolicy"] == "Delete"
    assert p["billingProfile"] == {"maxPrice": -1}
    assert s.instance_quota_group(SPOT) == "spot"


def test_gallery_and_vhd_image_forms(arm, make_set):
    s = make_set(ImageResourceGroup="images", SharedImageGalleryName="gal",
                 SharedImageGalleryImageVersion="1.0.0")
    s.create(IT, "def", tags(), INIT, PUBKEY)
    assert vm_body(arm)["properties"]["storageProfile"]["imageReference"]["id"] == (
        "/subscriptions/sub/resourceGroups/images/providers/Microsoft.Compute/galleries/gal/images/def/versions/1.0.0")
    with pytest.raises(CloudError, match="retired"):  # unmanaged VHDs: retired by Azure
        s.create(IT, "https://acct.blob.core.windows.net/system/img.vhd", tags(), INIT, PUBKEY)
    assert len(arm.sent("PUT", "virtualMachines")) == 1


def test_create_refuses_added_scratch_and_missing_image(arm, make_set):
    s = make_set()
    big = InstanceType("big", "Standard_D4", 4, 16 << 30, 0, 100 << 30, 0.2)
    with pytest.raises(CloudError, match=r"cannot create instance type 'big': driver does not implement "
                                         r"non-zero AddedScratch \(107374182400\)"):
        s.create(big, "img", tags(), INIT, PUBKEY)
    with pytest.raises(CloudError, match="ImageID"):
        s.create(IT, "", tags(), INIT, PUBKEY)
    with pytest.raises(CloudError, match="VHD URI"):
        s.create(IT, "https://x/y.vhd", tags(), INIT, PUBKEY)
    assert arm.sent("PUT") == []


# --- list -----------------------------------------------------------------------------------


def test_list_pages_through_next_links(arm, make_set):
    arm.page_size = 2
    s = make_set()
    made = {s.create(IT, "img", tags(), INIT, PUBKEY).id for _ in range(5)}
    arm.put_raw("virtualMachines", "rg", "someone-else", {"tags": {}, "properties": {
        "hardwareProfile": {"vmSize": "Standard_A1"}}})  # foreign VM without a network profile
    listed = s.instances({})
    assert {i.id for i in listed} == made | {arm.get("virtualMachines", "rg", "someone-else")["id"]}
    vm_lists = [r for r in arm.sent("GET", "virtualMachines") if r.path.endswith("/virtualMachines")]
    assert len(vm_lists) == 3 and vm_lists[-1].query["$skiptoken"] == "4"
    assert len([r for r in arm.sent("GET", "networkInterfaces") if r.path.endswith("/networkInterfaces")]) == 3
    by_id = {i.id: i for i in listed}
    assert all(by_id[i].address.startswith("10.1.") for i in made)
    foreign = [i for i in listed if i.name == "someone-else"][0]
    assert foreign.address == "" and foreign.provider_type == "Standard_A1"
    # through the wrapper stack, only ours (the filter is what makes Azure's unfiltered list safe)
    wrapped = wrap(s, resource_tags={})
    assert {i.id for i in wrapped.instances({"ArvadosInstanceSetID": SET_ID})} == made


def test_list_after_restart_sees_the_same_ids(arm, make_set):
    first = make_set()
    ids = {first.create(IT, "img", tags(), INIT, PUBKEY).id for _ in range(2)}
    first.stop()
    again = make_set()
    assert {i.id for i in again.instances({})} == ids
    assert all(i.tags["ArvadosInstanceSecret"] == SECRET for i in again.instances({}))


def test_long_running_operations_are_polled_until_succeeded(arm, make_set):
    arm.polls = 3
    s = make_set()
    inst = s.create(IT, "img", tags(), INIT, PUBKEY)
    polls = [r for r in arm.requests if r.path.startswith("/fakearm/operations/")]
    assert len(polls) == 2 * (3 + 1)  # NIC and VM: 3 InProgress + 1 Succeeded each
    assert arm.get("virtualMachines", "rg", inst.name)["properties"]["provisioningState"] == "Succeeded"


def test_set_tags_patches_merged_tags(arm, make_set):
    s = make_set()
    inst = s.create(IT, "img", tags(), INIT, PUBKEY)
    inst.set_tags({"ArvadosIdleBehavior": "hold"})
    patch = arm.sent("PATCH", "virtualMachines")[-1]
    assert patch.body == {"tags": {**tags(), "created-at": inst.tags["created-at"], "ArvadosIdleBehavior": "hold"}}
    assert inst.tags["ArvadosIdleBehavior"] == "hold"
    fresh = [i for i in s.instances({}) if i.id == inst.id][0]
    assert fresh.tags["ArvadosIdleBehavior"] == "hold"


def test_destroy_deletes_vm_and_leaves_nic_and_disk_to_gc(arm, make_set):
    s = make_set()
    inst = s.create(IT, "img", tags(), INIT, PUBKEY)
    inst.destroy()
    assert arm.get("virtualMachines", "rg", inst.name) is None
    assert arm.get("networkInterfaces", "rg", inst.name + "-nic") is not None
    assert arm.get("disks", "rg", inst.name + "-os")["properties"]["diskState"] == "Unattached"
    assert s.instances({}) == [] or all(i.id != inst.id for i in s.instances({}))
    inst.destroy()  # already gone: not an error


# --- garbage collection ---------------------------------------------------------------------


def test_dangling_nics_and_disks_are_collected_by_age(arm, make_set, clock):
    s = make_set()
    inst = s.create(IT, "img", tags(), INIT, PUBKEY)
    inst.destroy()
    arm.put_raw("networkInterfaces", "rg", "foreign-nic", {"tags": {"created-at": iso(clock.now() - 3600)},
                                                            "properties": {}})
    arm.put_raw("disks", "rg", "foreign-os", {"properties": {"diskState": "Unattached",
                                                             "timeCreated": iso(clock.now() - 3600)}})
    s.instances({})  # too young: kept (and this was the first disk sweep)
    assert arm.get("networkInterfaces", "rg", inst.name + "-nic") is not None
    assert arm.get("disks", "rg", inst.name + "-os") is not None
    clock.advance(21)
    s.instances({})
    assert arm.get("networkInterfaces", "rg", inst.name + "-nic") is None  # NICs: every list
    assert arm.get("disks", "rg", inst.name + "-os") is not None  # disks: at most every 5 minutes
    clock.advance(300)
    s.instances({})
    assert arm.get("disks", "rg", inst.name + "-os") is None
    assert arm.get("networkInterfaces", "rg", "foreign-nic") is not None  # not ours: never touched
    assert arm.get("disks", "rg", "foreign-os") is not None
    assert len(arm.sent("GET", "disks")) == 2


def test_attached_nic_is_never_collected(arm, make_set, clock):
    s = make_set()
    inst = s.create(IT, "img", tags(), INIT, PUBKEY)
    clock.advance(3600)
    assert [i.id for i in s.instances({})] == [inst.id]
    assert arm.get("networkInterfaces", "rg", inst.name + "-nic") is not None
    assert arm.sent("DELETE") == []


# --- errors ---------------------------------------------------------------------------------


def _create_error(arm, make_set, **fail):
    arm.fail("PUT", "virtualMachines", **fail)
    s = make_set()
    with pytest.raises(CloudError) as ei:
        s.create(IT, "img", tags(), INIT, PUBKEY)
    return s, ei.value


def test_429_with_seconds_is_a_rate_limit(arm, make_set, clock):
    _, err = _create_error(arm, make_set, status=429, code="TooManyRequests", message="slow down",
                           headers={"Retry-After": "123"})
    assert isinstance(err, RateLimitError) and rate_limit_retry_at(err) == clock.now() + 123
    assert len(arm.sent("PUT", "virtualMachines")) == 1  # the SDK did not retry it


def test_429_with_http_date_is_a_rate_limit(arm, make_set):
    when = datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    _, err = _create_error(arm, make_set, status=429, code="TooManyRequests", message="slow down",
                           headers={"Retry-After": format_datetime(when, usegmt=True)})
    assert rate_limit_retry_at(err) == when.timestamp()


def test_429_without_retry_after_defaults_to_20s(arm, make_set, clock):
    _, err = _create_error(arm, make_set, status=429, code="TooManyRequests", message="slow down")
    assert isinstance(err, RateLimitError) and rate_limit_retry_at(err) == clock.now() + 20


def test_quota_error(arm, make_set):
    _, err = _create_error(arm, make_set, status=409, code="OperationNotAllowed",
                           message="Operation could not be completed as it results in exceeding approved "
                                   "standardDSv3Family Cores quota.")
    assert isinstance(err, QuotaError) and is_quota_error(err) and rate_limit_retry_at(err) is None


def test_allocation_failure_is_a_type_capacity_error(arm, make_set):
    _, err = _create_error(arm, make_set, status=409, code="AllocationFailed", async_=True,
                           message="Allocation failed. We do not have sufficient capacity for the requested VM size.")
    assert isinstance(err, CapacityError) and not is_quota_error(err)
    assert capacity_scope(err, IT, "") == ("type", "Standard_D2s_v3", False)
    assert "AllocationFailed" in str(err)


def test_500_is_a_plain_cloud_error_after_a_short_retry(arm, make_set):
    _, err = _create_error(arm, make_set, status=500, code="InternalServerError", message="oops", times=5)
    assert type(err) is CloudError and "InternalServerError" in str(err)
    assert len(arm.sent("PUT", "virtualMachines")) == 3  # retry_total=2


@pytest.mark.parametrize("async_", [False, True])
def test_failed_vm_create_deletes_the_nic(arm, make_set, async_):
    s, err = _create_error(arm, make_set, status=409, code="SkuNotAvailable", message="no", async_=async_)
    assert isinstance(err, CapacityError)
    assert arm.of_kind("networkInterfaces") == [] and arm.of_kind("virtualMachines") == []
    assert s.instances({}) == []


def test_list_error_is_mapped(arm, make_set, clock):
    arm.fail("GET", "networkInterfaces", status=429, code="TooManyRequests", message="x",
             headers={"Retry-After": "7"})
    with pytest.raises(RateLimitError) as ei:
        make_set().instances({})
    assert ei.value.earliest_retry == clock.now() + 7


@pytest.mark.parametrize("status,code,message,header,expect", [
    (429, "TooManyRequests", "x", "5", RateLimitError),
    (503, "ServiceUnavailable", "No more quota", None, QuotaError),
    (200, "ZonalAllocationFailed", "no capacity", None, CapacityError),
    (400, "OverconstrainedAllocationRequest", "limit", None, CapacityError),
    (409, "Conflict", "limit reached", "3", RateLimitError),  # any Retry-After wins
    (400, "InvalidParameter", "bad name", None, CloudError),
])
def test_classify_table(status, code, message, header, expect):
    err = azure_errors.classify(status, code, message, header, 1000.0)
    assert type(err).__mro__[1] is expect or type(err) is expect


def test_stop_abandons_a_pending_create(arm, make_set):
    arm.polls = 10**9  # never finishes
    s = make_set()
    errors = []
    t = threading.Thread(target=lambda: errors.append(_try(s.create, IT, "img", tags(), INIT, PUBKEY)))
    t.start()
    deadline = time.monotonic() + 10
    while not arm.sent("GET") and time.monotonic() < deadline:
        time.sleep(0.01)
    s.stop()
    t.join(10)
    assert not t.is_alive()
    assert isinstance(errors[0], CloudError) and "stopping" in str(errors[0])


def _try(fn, *args):
    try:
        fn(*args)
    except Exception as e:
        return e
    return None


# --- configuration and secrets --------------------------------------------------------------


def test_params_are_case_insensitive_with_arvados_defaults():
    cfg = parse({"subscriptionid": "s", "RESOURCEGROUP": "r", "network": "n", "SubNet": "x",
                 "TenantId": "t", "ClientID": "c", "ClientSecret": "z", "cloudenvironment": "azurechinacloud",
                 "DeleteDanglingResourcesAfter": "1m30s", "ImageID": "ignored-ec2-style-key"})
    assert (cfg.tenant_id, cfg.location, cfg.admin_username) == ("t", "centralus", "crunch")
    assert cfg.arm_endpoint == "https://management.chinacloudapi.cn"
    assert cfg.delete_dangling_resources_after == 90
    assert parse_duration("20s", "x") == 20 and CLIENT_SECRET not in repr(parse({**_req(), "ClientSecret": CLIENT_SECRET}))


def _req():
    return {"SubscriptionID": "s", "ResourceGroup": "r", "Network": "n", "Subnet": "x", "TenantID": "t",
            "ClientID": "c", "ClientSecret": "z"}


@pytest.mark.parametrize("change,key", [
    ({"SubscriptionID": ""}, "SubscriptionID"),
    ({"ResourceGroup": None}, "ResourceGroup"),
    ({"Subnet": ""}, "Subnet"),
    ({"ClientSecret": ""}, "ClientSecret"),
    ({"CloudEnvironment": "Mars"}, "CloudEnvironment"),
    ({"DeleteDanglingResourcesAfter": "soon"}, "DeleteDanglingResourcesAfter"),
    ({"ResourceManagerEndpoint": "http://arm.example.com"}, "ResourceManagerEndpoint"),
    ({"ResourceManagerEndpoint": "ftp://127.0.0.1"}, "ResourceManagerEndpoint"),
    ({"AuthorityHost": "http://login.example.com"}, "AuthorityHost"),
    ({"StorageAccount": "a"}, "StorageAccount"),
    ({"BlobContainer": "b"}, "BlobContainer"),
    ({"DeleteDanglingResourcesAfter": 30}, "DeleteDanglingResourcesAfter"),  # Go: missing unit
    ({"SharedImageGalleryName": "g"}, "SharedImageGalleryImageVersion"),
])
def test_bad_params_name_the_key(change, key):
    with pytest.raises(AzureConfigError, match=key):
        parse({**_req(), **change})


@pytest.mark.parametrize("url", ["http://127.0.0.1:1", "http://127.8.9.10:1", "http://localhost:1",
                                 "http://[::1]:1", "https://arm.example.com"])
def test_http_only_for_loopback(url):
    assert parse({**_req(), "ResourceManagerEndpoint": url}).arm_endpoint == url


def test_no_secrets_in_logs(arm, make_set, caplog):
    caplog.set_level(logging.DEBUG)
    log = logging.getLogger("test.azure")
    s = make_set(logger=log)
    arm.fail("PUT", "virtualMachines", status=409, code="AllocationFailed", message="no")
    with pytest.raises(CapacityError):
        s.create(IT, "img", tags(), INIT, PUBKEY)
    s.create(IT, "img", tags(), INIT, PUBKEY).destroy()
    text = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert "creating azure instance" in text and "AllocationFailed" in text
    for secret in (SECRET, CLIENT_SECRET, azure.custom_data(INIT), "loopback-fake-arm-token"):
        assert secret not in text


def test_https_endpoint_uses_client_secret_credential_with_authority():
    from azure.identity import ClientSecretCredential
    cfg = parse({**_req(), "CloudEnvironment": "AzureUSGovernmentCloud"})
    compute, network, cred = azure.make_clients(cfg)
    try:
        assert isinstance(cred, ClientSecretCredential)
        assert cred._authority.rstrip("/").endswith("login.microsoftonline.us")
        def base_url(client):  # where it lives differs between SDK releases setup.py allows
            url = getattr(client._config, "base_url", None)
            return url if url else client._client._base_url
        assert base_url(compute) == base_url(network) == "https://management.usgovcloudapi.net"
        assert compute._config.credential_scopes == ["https://management.usgovcloudapi.net/.default"]
    finally:
        compute.close()
        network.close()


def test_driver_from_a_loaded_config_file(arm, clock):
    from cloud import drivers
    from conf.loader import load_text
    cluster = load_text(f"""
Clusters:
  zzzzz:
    SystemRootToken: xyzzy
    Containers:
      CloudVMs:
        Driver: azure
        ImageID: img
        DriverParameters:
          SubscriptionID: sub
          ResourceGroup: rg
          Network: vnet
          Subnet: default
          ResourceManagerEndpoint: {arm.url}
          DeleteDanglingResourcesAfter: 1m
    InstanceTypes:
      small: {{ProviderType: Standard_D2s_v3, VCPUs: 2, RAM: 8GiB, IncludedScratch: 16GB, Price: 0.1}}
""", source="test.yml")
    s = drivers.load(cluster.cloud_vms.driver).driver(cluster.cloud_vms.driver_parameters, SET_ID,
                                                       cluster=cluster, clock=clock, logger=None,
                                                       polling_interval=0.01)
    try:
        assert s.cfg.delete_dangling_resources_after == 60 and s.cfg.location == "centralus"
        inst = s.create(cluster.instance_types["small"], cluster.cloud_vms.image_id, tags(), INIT, PUBKEY)
        assert [i.id for i in s.instances({})] == [inst.id]
    finally:
        s.stop()



@given(st.floats(min_value=0, max_value=4_000_000_000, allow_nan=False))
def test_created_at_round_trips(t):
    s = azure.rfc3339nano(t)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d*[1-9])?Z", s), s  # Go's RFC3339Nano shape
    assert abs(azure.parse_rfc3339(s) - t) < 2e-6


@given(st.integers(min_value=0, max_value=10**6))
def test_retry_after_seconds(n):
    assert azure_errors.retry_after(str(n), 1000.0) == 1000.0 + n
    assert azure_errors.retry_after("soon", 1000.0) is None


# --- polling through throttled and failing status polls (Go keeps polling; never deletes) ----------


def test_throttled_status_polls_are_retried_and_the_create_succeeds(arm, make_set):
    arm.polls = 2
    arm.fail("GET", "operations", status=429, code="TooManyRequests", message="slow down",
             headers={"Retry-After": "0"}, times=3)
    s = make_set()
    inst = s.create(IT, "img", tags(), INIT, PUBKEY)
    assert arm.get("virtualMachines", "rg", inst.name)["properties"]["provisioningState"] == "Succeeded"
    assert arm.sent("DELETE") == []
    assert not [f for f in arm.faults if f.kind == "operations"]  # all three were met


def test_failing_status_polls_are_retried(arm, make_set):
    arm.fail("GET", "operations", status=503, code="ServiceUnavailable", message="busy", times=4)
    inst = make_set().create(IT, "img", tags(), INIT, PUBKEY)
    assert arm.get("virtualMachines", "rg", inst.name) is not None and arm.sent("DELETE") == []


def test_polls_failing_until_the_deadline_leave_the_vm_for_the_next_listing(arm, make_set, clock):
    arm.polls = 1
    s = azure.driver(params(arm), SET_ID, clock=clock, polling_interval=0.01, op_timeout=1.5)
    s.create(IT, "img", tags(), INIT, PUBKEY)
    arm.fail("GET", "operations:virtualMachines", status=429, code="TooManyRequests", message="slow down",
             times=10**6)
    try:
        with pytest.raises(CloudError):
            s.create(IT, "img", tags(), INIT, PUBKEY)
        assert arm.sent("DELETE") == []  # nothing ARM may still be building is deleted
        arm.faults.clear()
        names = {i.name for i in s.instances({})}
        assert len(names) == 2 and len(arm.of_kind("networkInterfaces")) == 2  # adopted, NIC kept
    finally:
        s.stop()


def test_terminal_failed_status_still_cleans_up(arm, make_set):
    arm.fail("PUT", "virtualMachines", status=409, code="AllocationFailed", message="no", async_=True)
    arm.lro_retry_after = "0"
    with pytest.raises(CapacityError):
        make_set().create(IT, "img", tags(), INIT, PUBKEY)
    assert arm.of_kind("virtualMachines") == [] and arm.of_kind("networkInterfaces") == []


def test_default_polling_delay_is_gos():
    assert azure.DEFAULT_POLLING_INTERVAL == 60.0


@pytest.mark.parametrize("status,header,expect", [
    (200, "30", CapacityError),    # the final status of a failed operation carries Retry-After
    (409, "30", RateLimitError),   # an error answer with Retry-After is a rate limit
    (429, None, RateLimitError),
])
def test_retry_after_counts_only_on_error_answers(status, header, expect):
    err = azure_errors.classify(status, "AllocationFailed", "no capacity", header, 1000.0)
    assert isinstance(err, expect)


# --- spot quota, retired modes and settings Azure would refuse -------------------------------------

SPOT_QUOTA = ("Operation could not be completed as it results in exceeding approved Low Priority Cores "
              "quota. Additional details - Deployment Model: Resource Manager, Location: eastus, "
              "Current Limit: 10, Current Usage: 8, Additional Required: 4")


def test_spot_quota_error_blocks_only_the_spot_quota_group(arm, make_set):
    s = make_set()
    arm.fail("PUT", "virtualMachines", status=409, code="OperationNotAllowed", message=SPOT_QUOTA)
    with pytest.raises(CapacityError) as ei:
        s.create(SPOT, "img", tags(), INIT, PUBKEY)
    err = ei.value
    assert not is_quota_error(err)
    assert capacity_scope(err, SPOT, s.instance_quota_group(SPOT)) == ("group", "spot")
    # a regular family quota stays what Go makes of it: a quota error for everything
    _, family = _create_error(arm, make_set, status=409, code="OperationNotAllowed",
                              message="Operation could not be completed as it results in exceeding approved "
                                      "standardDSv3Family Cores quota.")
    assert is_quota_error(family) and not isinstance(family, CapacityError)


def _cluster(tmp_path, **vms):
    from conf.loader import load_text
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519
    pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()).decode()
    keyfile = tmp_path / "key"
    keyfile.write_text(pem)
    keyfile.chmod(0o600)
    lines = "".join(f"        {k}: {v}\n" for k, v in vms.items())
    return load_text(f"""
Clusters:
  zzzzz:
    SystemRootToken: xyzzy
    Containers:
      DispatchPrivateKey: "file://{keyfile}"
      CloudVMs:
        Driver: azure
{lines}        DriverParameters: {{SubscriptionID: s, ResourceGroup: r, Network: n, Subnet: x, TenantID: t,
                            ClientID: c, ClientSecret: z}}
    InstanceTypes:
      small: {{ProviderType: Standard_D2s_v3, VCPUs: 2, RAM: 8GiB, Price: 0.1}}
""", source="site.yml")


@pytest.mark.parametrize("vms,key,words", [
    ({"DeployPublicKey": "false", "ImageID": "img"}, "Containers.CloudVMs.DeployPublicKey", "password login"),
    ({"ImageID": "https://acct.blob.core.windows.net/system/img.vhd"}, "Containers.CloudVMs.ImageID",
     "September 2025"),
])
def test_check_config_rejects_what_azure_would_refuse(tmp_path, vms, key, words):
    from cloud import drivers
    from conf.loader import ConfigError
    cluster = _cluster(tmp_path, **vms)
    with pytest.raises(ConfigError) as ei:
        drivers.check(cluster)
    assert key in str(ei.value) and words in str(ei.value)
    drivers.check(_cluster(tmp_path, ImageID="img"))  # the same with a managed image and the key: fine
