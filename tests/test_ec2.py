"""The EC2 driver through boto3 against moto's EC2 server on 127.0.0.1, behind a fault proxy.

Nothing in boto3 is patched: requests go over HTTP to the proxy (``tests/ec2fake.py``), which records
them, forwards them to moto, or answers with a real EC2 error document.
"""

from __future__ import annotations

import base64
import io
import logging
import re
import subprocess

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from prometheus_client import generate_latest

from cloud.base import (CapacityError, CloudError, NotSupported, QuotaError, RateLimitError, capacity_scope,
                        is_quota_error, rate_limit_retry_at, wrap)
from cloud.clock import FakeClock
from cloud.ec2 import driver as ec2
from cloud.ec2 import errors as ec2_errors
from cloud.ec2.config import DEFAULT_QUOTA_GROUPS, EC2ConfigError, parse
from cloud.ec2.keys import aws_fingerprints
from cloud.ec2.prices import normalize_price_history
from cloud.base import InstancePrice
from conf.model import InstanceType
from tests.ec2fake import ACCESS_KEY, REGION, SECRET_KEY, SpotPrice

SET_ID = "zzzzz-test-ec2"
SECRET = "0123456789abcdef0123456789abcdef01234567"
AMI = "ami-12c6146b"  # one of moto's built-in images
IT = InstanceType("tiny", "t3.micro", 1, 1 << 30, 8 << 30, 0, 0.02)
SCRATCH = InstanceType("tiny-scratch", "t3.micro", 1, 1 << 30, 8 << 30, 20_000_000_000, 0.02)
SPOT = InstanceType("tiny-spot", "t3.micro", 1, 1 << 30, 8 << 30, 0, 0.02, preemptible=True)
INIT = f'umask 0177 && echo -n "{SECRET}" >/var/run/arvados-instance-secret\necho booted'


def tags(**extra):
    return {"ArvadosInstanceSetID": SET_ID, "ArvadosInstanceType": "tiny", "ArvadosInstanceSecret": SECRET,
            "ArvadosIdleBehavior": "run", **extra}


def rsa_pub() -> str:
    k = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return k.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def ed_pub() -> str:
    k = ed25519.Ed25519PrivateKey.generate()
    return k.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


@pytest.fixture
def clock():
    return FakeClock(1_800_000_000.0)


@pytest.fixture
def env(ec2_endpoint):
    return ec2_endpoint


@pytest.fixture
def make_set(env, clock):
    moto, proxy = env
    made = []

    def make(logger=None, registry=None, **extra):
        p = {"AccessKeyID": ACCESS_KEY, "SecretAccessKey": SECRET_KEY, "Region": REGION,
             "EndpointURL": proxy.url, **extra}
        s = ec2.driver(p, SET_ID, clock=clock, logger=logger, registry=registry)
        made.append(s)
        return s
    yield make
    for s in made:
        s.stop()


def subnets(moto, n=2):
    return sorted(s["SubnetId"] for s in moto.client().describe_subnets()["Subnets"])[:n]


def sent(proxy, action):
    return [c.params for c in proxy.calls(action)]


def metric_lines(registry, name):
    return sorted(l for l in generate_latest(registry).decode().splitlines() if l.startswith(name + "{"))


# --- create ---------------------------------------------------------------------------------


def test_create_sends_arvados_run_instances_request(env, make_set):
    moto, proxy = env
    sg = moto.client().describe_security_groups()["SecurityGroups"][0]["GroupId"]
    subnet = subnets(moto, 1)[0]
    s = make_set(SecurityGroupIDs={sg: {}}, SubnetID=subnet, AdminUsername="arvados")
    key = rsa_pub()
    inst = s.create(IT, AMI, tags(), INIT, key)

    [p] = sent(proxy, "RunInstances")
    assert (p["ImageId"], p["InstanceType"], p["MinCount"], p["MaxCount"]) == (AMI, "t3.micro", "1", "1")
    assert p["NetworkInterface.1.AssociatePublicIpAddress"] == "false"
    assert p["NetworkInterface.1.DeleteOnTermination"] == "true"
    assert p["NetworkInterface.1.DeviceIndex"] == "0"
    assert p["NetworkInterface.1.SecurityGroupId.1"] == sg
    assert p["NetworkInterface.1.SubnetId"] == subnet
    assert p["DisableApiTermination"] == "false" and p["InstanceInitiatedShutdownBehavior"] == "terminate"
    assert p["MetadataOptions.HttpEndpoint"] == "enabled" and p["MetadataOptions.HttpTokens"] == "required"
    assert base64.b64decode(p["UserData"]).decode() == "#!/bin/sh\n" + INIT + "\n"
    assert p["TagSpecification.1.ResourceType"] == "instance"
    sent_tags = {p[k]: p[k.replace(".Key", ".Value")] for k in p
                 if re.fullmatch(r"TagSpecification\.1\.Tag\.\d+\.Key", k)}
    assert sent_tags == {**tags(), "Name": "arvados-dispatch-tiny"}
    assert p["KeyName"] == "arvados-dispatch-keypair-" + aws_fingerprints(key)[0]
    assert not any(k.startswith(("BlockDeviceMapping", "InstanceMarketOptions", "IamInstanceProfile")) for k in p)

    assert inst.id.startswith("i-") and re.fullmatch(r"127\.\d+\.\d+\.\d+", inst.address)  # see ec2fake
    assert (inst.provider_type, inst.remote_user, inst.subnet_id) == ("t3.micro", "arvados", subnet)
    assert inst.tags["ArvadosInstanceSecret"] == SECRET
    assert inst.price_history(IT) == []  # on demand: the configured price
    with pytest.raises(NotSupported):
        inst.verify_host_key(None, None)
    listed = {i.id: i for i in s.instances({"ArvadosInstanceSetID": SET_ID})}
    assert listed[inst.id].address == inst.address and listed[inst.id].tags["Name"] == "arvados-dispatch-tiny"


def test_added_scratch_spot_iam_profile_and_own_name_tag(env, make_set):
    moto, proxy = env
    moto.client("iam").create_instance_profile(InstanceProfileName="compute-role")
    s = make_set(EBSVolumeType="gp3", IAMInstanceProfile="compute-role")
    s.create(SCRATCH, AMI, tags(Name="mine"), INIT, None)
    s.create(SPOT, AMI, tags(), INIT, None)
    scratch, spot = sent(proxy, "RunInstances")
    assert scratch["BlockDeviceMapping.1.DeviceName"] == "/dev/xvdt"
    assert scratch["BlockDeviceMapping.1.Ebs.VolumeSize"] == "19"  # ceil(20e9 / GiB)
    assert scratch["BlockDeviceMapping.1.Ebs.VolumeType"] == "gp3"
    assert scratch["BlockDeviceMapping.1.Ebs.DeleteOnTermination"] == "true"
    assert scratch["IamInstanceProfile.Name"] == "compute-role"
    assert "KeyName" not in scratch and not sent(proxy, "DescribeKeyPairs")  # no key given
    assert "mine" in scratch.values() and "arvados-dispatch-tiny-scratch" not in scratch.values()
    assert spot["InstanceMarketOptions.MarketType"] == "spot"
    assert spot["InstanceMarketOptions.SpotOptions.InstanceInterruptionBehavior"] == "terminate"
    assert spot["InstanceMarketOptions.SpotOptions.MaxPrice"] == "0.02"
    assert "BlockDeviceMapping.1.DeviceName" not in spot
    found = s.instances({"ArvadosInstanceSetID": SET_ID})
    assert sorted(i.spot for i in found) == [False, True]


def test_missing_image_is_refused_before_any_call(env, make_set):
    moto, proxy = env
    with pytest.raises(CloudError, match="ImageID is empty"):
        make_set().create(IT, "", tags(), INIT, None)
    assert proxy.calls() == []


# --- key pairs ------------------------------------------------------------------------------


@pytest.mark.parametrize("make_key", [rsa_pub, ed_pub], ids=["rsa", "ed25519"])
def test_key_pair_imported_once_then_found_by_fingerprint(env, make_set, make_key):
    moto, proxy = env
    key = make_key()
    fps = aws_fingerprints(key)
    s = make_set()
    s.create(IT, AMI, tags(), INIT, key)
    s.create(IT, AMI, tags(), INIT, key)
    assert len(sent(proxy, "DescribeKeyPairs")) == 1  # then cached
    [imp] = sent(proxy, "ImportKeyPair")
    assert imp["KeyName"] == "arvados-dispatch-keypair-" + fps[0]
    assert base64.b64decode(imp["PublicKeyMaterial"]).decode().strip() == key.strip()
    described = sent(proxy, "DescribeKeyPairs")[0]
    assert described["Filter.1.Name"] == "fingerprint"
    assert [described["Filter.1.Value.1"], described["Filter.1.Value.2"]] == fps

    again = make_set()  # a restarted dispatcher finds the pair by fingerprint, imports nothing
    again.create(IT, AMI, tags(), INIT, key)
    assert len(sent(proxy, "ImportKeyPair")) == 1 and len(sent(proxy, "DescribeKeyPairs")) == 2
    names = {c.params["KeyName"] for c in proxy.calls("RunInstances")}
    assert names == {"arvados-dispatch-keypair-" + fps[0]}
    if make_key is rsa_pub:  # moto computes RSA fingerprints as EC2 does: compare without the proxy
        [pair] = moto.client().describe_key_pairs()["KeyPairs"]
        assert pair["KeyFingerprint"] == fps[0]


def test_key_pair_lookup_failure_is_mapped(env, make_set):
    moto, proxy = env
    proxy.fail("DescribeKeyPairs", "RequestLimitExceeded", "Request limit exceeded.", status=503)
    with pytest.raises(RateLimitError, match="search for key pair: RequestLimitExceeded"):
        make_set().create(IT, AMI, tags(), INIT, ed_pub())
    assert sent(proxy, "RunInstances") == []
    with pytest.raises(CloudError, match="fingerprint"):
        make_set().create(IT, AMI, tags(), INIT, "ssh-ed25519 not-base64!")


@pytest.mark.parametrize("keytype", ["rsa", "ed25519"])
def test_fingerprints_match_openssl_and_ssh_keygen(tmp_path, keytype):
    """Independently computed, as Arvados' test does: openssl over the PKIX DER for RSA, ssh-keygen -l."""
    key = tmp_path / "key"
    subprocess.run(["ssh-keygen", "-q", "-t", keytype, "-N", "", "-f", str(key)], check=True)
    if keytype == "rsa":
        expect = []
        for h in ("md5", "sha1"):
            out = subprocess.run(f"set -e -o pipefail; ssh-keygen -ef {key} -m PEM | openssl rsa -RSAPublicKey_in "
                                 f"-outform DER 2>/dev/null | openssl {h} -c", shell=True, executable="/bin/bash",
                                 check=True, capture_output=True, text=True).stdout
            expect.append(re.search(r"[0-9a-f:]{20,}", out).group(0))
    else:
        out = subprocess.run(["ssh-keygen", "-l", "-f", str(key)], check=True, capture_output=True, text=True).stdout
        sha = re.search(r"SHA256:\S+", out).group(0)
        expect = [sha + "=", sha]
    assert aws_fingerprints((tmp_path / "key.pub").read_text()) == expect


# --- listing --------------------------------------------------------------------------------


def test_list_filters_by_tag_pages_and_skips_terminated(env, make_set):
    moto, proxy = env
    s = make_set()
    ours = [s.create(IT, AMI, tags(), INIT, None) for _ in range(7)]
    other = s.create(IT, AMI, tags(ArvadosInstanceSetID="someone-else"), INIT, None)
    ours[0].destroy()
    proxy.page_size = 2
    found = s.instances({"ArvadosInstanceSetID": SET_ID})
    assert sorted(i.id for i in found) == sorted(i.id for i in ours[1:])
    assert other.id not in {i.id for i in found}
    pages = sent(proxy, "DescribeInstances")
    assert len(pages) >= 4 and all(p["MaxResults"] == "2" for p in pages)
    assert "NextToken" not in pages[0] and all("NextToken" in p for p in pages[1:])
    assert pages[0]["Filter.1.Name"] == "tag:ArvadosInstanceSetID" and pages[0]["Filter.1.Value.1"] == SET_ID
    # the dispatcher's wrapper stack on top sees the same
    assert len(wrap(s, resource_tags={}).instances({"ArvadosInstanceSetID": SET_ID})) == 6


def test_set_tags_adds_and_keeps_then_destroy(env, make_set):
    moto, proxy = env
    s = make_set()
    inst = s.create(IT, AMI, tags(), INIT, None)
    inst.set_tags({**tags(), "ArvadosIdleBehavior": "hold"})
    [ct] = sent(proxy, "CreateTags")
    assert ct["ResourceId.1"] == inst.id
    [fresh] = s.instances({"ArvadosInstanceSetID": SET_ID})
    assert fresh.tags["ArvadosIdleBehavior"] == "hold" and fresh.tags["Name"] == "arvados-dispatch-tiny"
    fresh.destroy()
    assert sent(proxy, "TerminateInstances")[0]["InstanceId.1"] == inst.id
    assert s.instances({"ArvadosInstanceSetID": SET_ID}) == []
    proxy.fail("TerminateInstances", "InvalidInstanceID.NotFound", "The instance ID 'i-x' does not exist")
    fresh.destroy()  # gone entirely: done too
    proxy.fail("CreateTags", "RequestLimitExceeded", status=503)
    with pytest.raises(RateLimitError):
        fresh.set_tags({"a": "b"})


# --- subnet failover (Arvados' three cases, against moto's real subnets) --------------------


def _subnet_is(subnet):
    return lambda params: params.get("NetworkInterface.1.SubnetId") == subnet


def test_failover_to_second_subnet_and_remember_it(env, make_set):
    moto, proxy = env
    full, good = subnets(moto)
    s = make_set(SubnetID=[full, good])
    proxy.fail("RunInstances", "InsufficientFreeAddressesInSubnet", "subnet is full", times=None,
               match=_subnet_is(full))
    inst = s.create(IT, AMI, tags(), INIT, None)
    assert inst.subnet_id == good
    assert [c["NetworkInterface.1.SubnetId"] for c in sent(proxy, "RunInstances")] == [full, good]
    s.create(IT, AMI, tags(), INIT, None)  # the working subnet first now
    assert [c["NetworkInterface.1.SubnetId"] for c in sent(proxy, "RunInstances")][2:] == [good]
    assert metric_lines(s.registry, "arvados_dispatchcloud_ec2_instance_starts_total") == [
        f'arvados_dispatchcloud_ec2_instance_starts_total{{subnet_id="{full}",success="0"}} 1.0',
        f'arvados_dispatchcloud_ec2_instance_starts_total{{subnet_id="{full}",success="1"}} 0.0',
        f'arvados_dispatchcloud_ec2_instance_starts_total{{subnet_id="{good}",success="0"}} 0.0',
        f'arvados_dispatchcloud_ec2_instance_starts_total{{subnet_id="{good}",success="1"}} 2.0',
    ]
    s.instances({})
    gauge = metric_lines(s.registry, "arvados_dispatchcloud_ec2_instances")
    assert f'arvados_dispatchcloud_ec2_instances{{subnet_id="{good}"}} 2.0' in gauge
    assert f'arvados_dispatchcloud_ec2_instances{{subnet_id="{full}"}} 0.0' in gauge


def test_all_subnets_failing_surface_each_error_in_turn(env, make_set):
    moto, proxy = env
    full = subnets(moto, 1)[0]
    s = make_set(SubnetID=[full, "subnet-0000000000broken"])  # moto itself refuses the unknown one
    proxy.fail("RunInstances", "InsufficientFreeAddressesInSubnet", "subnet is full", times=None,
               match=_subnet_is(full))
    with pytest.raises(CloudError, match=r"InvalidSubnetI[dD]\.NotFound") as e:
        s.create(IT, AMI, tags(), INIT, None)
    assert not is_quota_error(e.value)
    with pytest.raises(QuotaError, match="InsufficientFreeAddressesInSubnet"):
        s.create(IT, AMI, tags(), INIT, None)
    assert len(sent(proxy, "RunInstances")) == 4
    assert s.instances({}) == []


def test_capacity_error_wins_over_subnet_errors(env, make_set):
    moto, proxy = env
    full, other = subnets(moto)
    s = make_set(SubnetID=[full, other])
    proxy.fail("RunInstances", "InsufficientFreeAddressesInSubnet", "subnet is full", times=None,
               match=_subnet_is(full))
    proxy.fail("RunInstances", "InsufficientInstanceCapacity", "insufficient capacity", times=None,
               match=_subnet_is(other))
    for _ in range(3):
        with pytest.raises(CapacityError, match="InsufficientInstanceCapacity") as e:
            s.create(IT, AMI, tags(), INIT, None)
        assert capacity_scope(e.value, IT, s.instance_quota_group(IT)) == ("type", "t3.micro", False)
    assert len(sent(proxy, "RunInstances")) == 6
    starts = metric_lines(s.registry, "arvados_dispatchcloud_ec2_instance_starts_total")
    assert sum(float(l.split()[-1]) for l in starts if 'success="0"' in l) == 6


def test_non_subnet_error_does_not_fail_over(env, make_set):
    moto, proxy = env
    a, b = subnets(moto)
    s = make_set(SubnetID=[a, b])
    proxy.fail("RunInstances", "VcpuLimitExceeded", "You have requested more vCPU capacity", match=_subnet_is(a))
    with pytest.raises(CapacityError):
        s.create(IT, AMI, tags(), INIT, None)
    assert len(sent(proxy, "RunInstances")) == 1


# --- error mapping --------------------------------------------------------------------------


@pytest.mark.parametrize("code,message,expect,scope", [
    ("InstanceLimitExceeded", "Your quota allows for 0 more running instance(s).", QuotaError, None),
    ("InsufficientAddressCapacity", "no addresses", QuotaError, None),
    ("InsufficientVolumeCapacity", "no volumes", QuotaError, None),
    ("MaxSpotInstanceCountExceeded", "Max spot instance count exceeded", QuotaError, None),
    ("VcpuLimitExceeded", "You have requested more vCPU capacity than your current vCPU limit of 64 allows",
     CapacityError, ("group", "standard")),
    ("InsufficientInstanceCapacity", "We currently do not have sufficient t3.micro capacity", CapacityError,
     ("type", "t3.micro", False)),
    ("Unsupported", "Your requested instance type (t3.micro) is not supported in your requested Availability Zone "
     "(us-east-1e).", CapacityError, ("type", "t3.micro", False)),
    ("Unsupported", "The requested configuration is currently not supported.", CloudError, None),
    ("InvalidAMIID.NotFound", "The image id '[ami-x]' does not exist", CloudError, None),
])
def test_create_error_mapping(env, make_set, code, message, expect, scope):
    moto, proxy = env
    s = make_set()
    proxy.fail("RunInstances", code, message)
    with pytest.raises(CloudError) as e:
        s.create(IT, AMI, tags(), INIT, None)
    if expect is CloudError:
        assert type(e.value) is CloudError
    else:
        assert isinstance(e.value, expect)
    assert code in str(e.value) and rate_limit_retry_at(e.value) is None
    assert capacity_scope(e.value, IT, s.instance_quota_group(IT)) == scope


@pytest.mark.parametrize("code", sorted(ec2_errors.THROTTLE_CODES))
def test_every_go_throttle_code_is_a_rate_limit(code):
    err = ec2_errors.classify(code, "slow down", 100.0, ec2_errors.Backoff())
    assert isinstance(err, RateLimitError) and err.earliest_retry == 101.0


def test_throttling_backs_off_per_call_kind_and_resets(env, make_set, clock):
    moto, proxy = env
    s = make_set()
    now = clock.now()
    delays = []
    for _ in range(3):
        proxy.fail("RunInstances", "RequestLimitExceeded", "Request limit exceeded.", status=503)
        with pytest.raises(RateLimitError) as e:
            s.create(IT, AMI, tags(), INIT, None)
        delays.append(e.value.earliest_retry - now)
    assert delays == [1.0, 2.5, 4.75]  # d*3/2 + 1s
    proxy.fail("DescribeInstances", "Throttling", "Rate exceeded", status=400)
    with pytest.raises(RateLimitError) as e:
        s.instances({})
    assert e.value.earliest_retry - now == 1.0  # listing has its own backoff
    s.create(IT, AMI, tags(), INIT, None)  # a success resets
    proxy.fail("RunInstances", "RequestLimitExceeded", status=503)
    with pytest.raises(RateLimitError) as e:
        s.create(IT, AMI, tags(), INIT, None)
    assert e.value.earliest_retry - now == 1.0
    for _ in range(12):
        ec2_errors.classify("Throttling", "", 0, s._backoff_create)
    assert s._backoff_create.delay == 60.0  # clamped


def test_subnet_specific_table():
    assert ec2_errors.is_subnet_specific("InsufficientInstanceCapacity", "")
    assert ec2_errors.is_subnet_specific("InsufficientVolumeCapacity", "")
    assert ec2_errors.is_subnet_specific("InsufficientFreeAddressesInSubnet", "Not enough free addresses in subnet x")
    assert ec2_errors.is_subnet_specific("InvalidParameterValue",
                                         "Not enough free addresses in subnet subnet-abc\n\tstatus")
    assert ec2_errors.is_subnet_specific("Client.InvalidParameterValue", "There aren't sufficient free Ipv4 addresses")
    assert ec2_errors.is_subnet_specific("ClientInvalidParameterValue", "There aren't sufficient free Ipv6 addresses")
    assert not ec2_errors.is_subnet_specific("InvalidParameterValue", "Some other invalid parameter error")
    assert not ec2_errors.is_subnet_specific("", "misc error")


def test_connection_failure_is_a_plain_cloud_error(clock):
    s = ec2.driver({"Region": REGION, "AccessKeyID": "a", "SecretAccessKey": "b",
                    "EndpointURL": "http://127.0.0.1:1"}, SET_ID, clock=clock)
    try:
        with pytest.raises(CloudError, match="DescribeInstances") as e:
            s.instances({})
        assert type(e.value) is CloudError
    finally:
        s.stop()


# --- spot prices ----------------------------------------------------------------------------


def test_spot_price_history_becomes_instance_price_history(env, make_set, clock):
    moto, proxy = env
    s = make_set(SpotPriceUpdateInterval="1h", EBSPrice=0.1)
    spot1 = s.create(SPOT, AMI, tags(), INIT, None)
    s.create(SPOT, AMI, tags(), INIT, None)
    ondemand = s.create(IT, AMI, tags(), INIT, None)
    az = moto.client().describe_instances(InstanceIds=[spot1.id])["Reservations"][0]["Instances"][0][
        "Placement"]["AvailabilityZone"]
    t = clock.now()
    proxy.serve_spot_prices(
        [SpotPrice("t3.micro", az, "0.005", t - 540), SpotPrice("t3.micro", az, "0.015", t - 300),
         SpotPrice("t3.micro", "us-east-1z", "0.9", t - 300)],
        [SpotPrice("t3.micro", az, "0.01", t - 120), SpotPrice("t3.micro", az, "0.01", t - 60)])
    listed = {i.id: i for i in s.instances({})}
    calls = sent(proxy, "DescribeSpotPriceHistory")
    assert len(calls) == 2 and calls[1]["NextToken"] == "p1"
    assert calls[0]["Filter.1.Name"] == "instance-type" and calls[0]["Filter.1.Value.1"] == "t3.micro"
    assert calls[0]["Filter.2.Name"] == "product-description" and calls[0]["Filter.2.Value.1"] == "Linux/UNIX"
    assert calls[0]["StartTime"].startswith("2027-01-15T05:")  # now - 3h
    hist = listed[spot1.id].price_history(SPOT)
    # newest first; of the two 0.01 points the older stays
    assert hist == [InstancePrice(t - 120, 0.01), InstancePrice(t - 300, 0.015), InstancePrice(t - 540, 0.005)]
    with_scratch = listed[spot1.id].price_history(SCRATCH)
    assert [round(p.price - q.price, 9) for p, q in zip(with_scratch, hist)] == [round(0.1 * 19 / 30 / 24, 9)] * 3
    assert listed[ondemand.id].price_history(IT) == []
    s.instances({})  # fresh enough: no new lookup
    assert len(sent(proxy, "DescribeSpotPriceHistory")) == 2
    clock.advance(3601)
    proxy.fail("DescribeSpotPriceHistory", "RequestLimitExceeded", status=503)
    assert len(s.instances({})) == 3  # a failed price lookup does not fail the listing
    again = {i.id: i for i in s.instances({})}  # the next listing retries (still stale)
    assert again[spot1.id].price_history(SPOT) == hist
    assert len(sent(proxy, "DescribeSpotPriceHistory")) == 5


def test_no_spot_lookups_when_disabled_or_no_spot_instances(env, make_set):
    moto, proxy = env
    s = make_set(SpotPriceUpdateInterval=0)
    s.create(SPOT, AMI, tags(), INIT, None)
    s.instances({})
    t = make_set()
    t.create(IT, AMI, tags(ArvadosInstanceSetID="x"), INIT, None)
    t.instances({"ArvadosInstanceSetID": "x"})
    assert sent(proxy, "DescribeSpotPriceHistory") == []


def test_normalize_price_history():
    P = InstancePrice
    assert normalize_price_history([P(1, 0.1), P(5, 0.2), P(2, 0.1), P(3, 0.3), P(4, 0.2)]) == [
        P(4, 0.2), P(3, 0.3), P(1, 0.1)]
    assert len(normalize_price_history([P(6, 0.5), P(6, 0.6)])) == 1


# --- quota groups ---------------------------------------------------------------------------


@pytest.mark.parametrize("ptype,spot,group", [
    ("g1.large", False, "g"), ("x1.large", False, "x"), ("inf1.2xlarge", False, "inf"),
    ("a1.small", False, "standard"), ("m1.xlarge", False, "standard"), ("m1.xlarge", True, "standard-spot"),
    ("p4.xlarge", True, "p-spot"), ("p5.xlarge", True, "p5-spot"), ("t3.2xlarge", False, "standard"),
    ("trn1.2xlarge", False, "trn"), ("trn1.2xlarge", True, "trn-spot"), ("imaginary9.5xlarge", False, "imaginary"),
    ("", False, ""), ("vt1.3xlarge", False, "g"), ("M5.Large", False, "standard"),
])
def test_quota_groups_as_go(ptype, spot, group):
    assert ec2.quota_group(ptype, spot, DEFAULT_QUOTA_GROUPS) == group


def test_quota_groups_configurable():
    cfg = parse({"InstanceTypeQuotaGroups": {"trn1": "trainium", "g": "gpu"}})
    assert cfg.instance_type_quota_groups["m"] == "standard"  # merged over Arvados' defaults
    assert ec2.quota_group("trn1.2xlarge", False, cfg.instance_type_quota_groups) == "trainium"
    assert ec2.quota_group("g5.xlarge", True, cfg.instance_type_quota_groups) == "gpu-spot"


# --- configuration, credentials, secrets ----------------------------------------------------


def test_params_case_insensitive_with_arvados_defaults():
    cfg = parse({"accesskeyid": "a", "SECRETACCESSKEY": "s3cr3t-key", "region": "eu-west-1", "SubnetId": "subnet-1",
                 "SecurityGroupIDs": ["sg-1", "sg-2"], "SubscriptionID": "azure-key-ignored"})
    assert (cfg.access_key_id, cfg.region, cfg.subnet_ids, cfg.security_group_ids) == (
        "a", "eu-west-1", ("subnet-1",), ("sg-1", "sg-2"))
    assert (cfg.admin_username, cfg.ebs_volume_type, cfg.ebs_price, cfg.spot_price_update_interval) == (
        "crunch", "gp2", 0.10, 86400.0)
    assert "s3cr3t" not in repr(cfg) and "s3cr3t" not in str(cfg)
    d = parse({})
    assert d.subnet_ids == () and d.security_group_ids == () and d.instance_type_quota_groups == DEFAULT_QUOTA_GROUPS


@pytest.mark.parametrize("value,expect", [
    ("", ()), (None, ()), ([], ()), ("subnet-a", ("subnet-a",)), (["subnet-a"], ("subnet-a",)),
    (["subnet-a", "subnet-b"], ("subnet-a", "subnet-b")),
])
def test_subnet_id_forms(value, expect):
    assert parse({"SubnetID": value}).subnet_ids == expect


@pytest.mark.parametrize("change,key", [
    ({"SubnetID": 5}, "SubnetID"),
    ({"SubnetID": ["subnet-a", ""]}, "SubnetID"),
    ({"SecurityGroupIDs": "sg-1"}, "SecurityGroupIDs"),
    ({"EBSVolumeType": "fast"}, "EBSVolumeType"),
    ({"EBSPrice": -1}, "EBSPrice"),
    ({"EBSPrice": "cheap"}, "EBSPrice"),
    ({"SpotPriceUpdateInterval": "often"}, "SpotPriceUpdateInterval"),
    ({"SpotPriceUpdateInterval": "-1h"}, "SpotPriceUpdateInterval"),
    ({"InstanceTypeQuotaGroups": {"M": "standard"}}, "InstanceTypeQuotaGroups.M"),
    ({"InstanceTypeQuotaGroups": ["m"]}, "InstanceTypeQuotaGroups"),
    ({"Region": 1}, "Region"),
    ({"AdminUsername": ["x"]}, "AdminUsername"),
    ({"EndpointURL": "http://ec2.example.com"}, "EndpointURL"),
    ({"EndpointURL": "ftp://127.0.0.1"}, "EndpointURL"),
    ({"AccessKeyID": "only-one"}, "SecretAccessKey"),
    ({"SecretAccessKey": "only-one"}, "AccessKeyID"),
    ({"Region": "Mars"}, "Region"),
])
def test_bad_params_name_the_key(change, key, monkeypatch):
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with pytest.raises(EC2ConfigError, match=re.escape(f"DriverParameters.{key}")):
        ec2.check_params({"Region": "us-east-1", **change})


def test_region_may_come_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    with pytest.raises(EC2ConfigError, match="DriverParameters.Region: is empty"):
        ec2.check_params({})
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-north-1")
    ec2.check_params({})


@pytest.mark.parametrize("url", ["http://127.0.0.1:1", "http://127.8.9.10:1", "http://localhost:1",
                                 "http://[::1]:1", "https://ec2.us-east-1.amazonaws.com"])
def test_http_only_for_loopback(url):
    assert parse({"EndpointURL": url}).endpoint_url == url


def _credential(call) -> str:
    return re.search(r"Credential=([^/]+)/", call.headers.get("Authorization", "")).group(1)


def test_static_keys_else_the_default_credential_chain(env, clock, monkeypatch, tmp_path):
    moto, proxy = env
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never reach for 169.254.169.254
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAFROMTHEENVIRONMENT")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    for params, expect in (({"AccessKeyID": ACCESS_KEY, "SecretAccessKey": SECRET_KEY}, ACCESS_KEY),
                           ({"AccessKeyID": "", "SecretAccessKey": ""}, "AKIAFROMTHEENVIRONMENT")):
        s = ec2.driver({**params, "Region": REGION, "EndpointURL": proxy.url}, SET_ID, clock=clock)
        s.instances({})
        s.stop()
        assert _credential(proxy.calls("DescribeInstances")[-1]) == expect


def test_no_secrets_in_logs_even_at_debug(env, make_set):
    """With the dispatcher's own log setup at debug level: driver logs carry no credential, no
    instance secret, no user data (botocore's debug output, which holds request bodies, is muted)."""
    from conf import logsetup
    moto, proxy = env
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    saved_levels = {n: logging.getLogger(n).level for n in ("botocore", "boto3", "paramiko", "azure", "urllib3",
                                                             "waitress")}
    stream = io.StringIO()
    logsetup.setup("debug", stream=stream)
    try:
        s = make_set(logger=logging.getLogger("dispatch.driver"))
        proxy.fail("RunInstances", "InsufficientInstanceCapacity", "no capacity")
        with pytest.raises(CapacityError):
            s.create(IT, AMI, tags(), INIT, ed_pub())
        s.create(IT, AMI, tags(), INIT, None).destroy()
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        for n, lvl in saved_levels.items():
            logging.getLogger(n).setLevel(lvl)
    text = stream.getvalue()
    assert "creating ec2 instance" in text and "InsufficientInstanceCapacity" in text
    for secret in (SECRET, SECRET_KEY, base64.b64encode(ec2.user_data(INIT).encode()).decode()):
        assert secret not in text


def test_driver_metrics_join_the_dispatcher_registry(env, make_set, tmp_path):
    from api.metrics import DispatchMetrics
    from cloud import drivers
    from conf.loader import load_text
    from tests.sshd import _new_key_pem
    moto, proxy = env
    key = "".join(f"\n        {line}" for line in _new_key_pem().splitlines())
    cluster = load_text(f"""
Clusters:
  zzzzz:
    SystemRootToken: xyzzy
    Containers:
      DispatchPrivateKey: |{key}
      CloudVMs:
        Driver: ec2
        ImageID: {AMI}
        DriverParameters:
          AccessKeyID: {ACCESS_KEY}
          SecretAccessKey: {SECRET_KEY}
          Region: {REGION}
          EndpointURL: {proxy.url}
          SubnetID: ""
    InstanceTypes:
      tiny: {{ProviderType: t3.micro, VCPUs: 1, RAM: 1GiB, Price: 0.02}}
""", source="test.yml")
    drivers.check(cluster)
    metrics = DispatchMetrics(cluster)
    s = drivers.instance_set(drivers.load("ec2"), cluster, SET_ID, clock=FakeClock(), logger=None,
                             registry=metrics.registry)
    try:
        s.create(cluster.instance_types["tiny"], cluster.cloud_vms.image_id, tags(), INIT, None)
        s.instances({})
    finally:
        s.stop()
    text = generate_latest(metrics.registry).decode()
    assert 'arvados_dispatchcloud_ec2_instance_starts_total{subnet_id="",success="1"} 1.0' in text
    # moto put the instance in its default subnet
    assert re.search(r'^arvados_dispatchcloud_ec2_instances\{subnet_id="subnet-\w+"\} 1\.0$', text, re.M)
    assert "arvados_dispatchcloud_driver_operations_total" in text  # the dispatcher's own, same registry


# --- check-config on an Arvados EC2 config as the install docs write it ----------------------


def _check_config(path, env_extra=None):
    import os
    import sys
    from pathlib import Path
    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_REGION", "AWS_DEFAULT_REGION")}
    return subprocess.run([sys.executable, "-m", "actors.cli", "check-config", "--config", str(path)], cwd=repo,
                          capture_output=True, text=True, timeout=60,
                          env={**env, "PYTHONPATH": str(repo), "AWS_CONFIG_FILE": "/nonexistent", **(env_extra or {})})


def test_check_config_accepts_the_arvados_install_doc_config():
    from pathlib import Path
    from cloud.drivers import load_config
    path = Path(__file__).parent / "data" / "arvados-ec2.yml"
    r = _check_config(path)
    assert r.returncode == 0, r.stderr
    assert "driver:            ec2" in r.stdout and r.stderr == ""
    cfg = parse(load_config(str(path)).cloud_vms.driver_parameters)
    assert (cfg.region, cfg.subnet_ids, cfg.security_group_ids, cfg.admin_username) == (
        "us-east-1", ("subnet-0123abcd",), ("sg-0123abcd",), "arvados")
    assert cfg.static_credentials and "YYYY" not in r.stdout


def test_check_config_bad_driver_parameter_is_one_line(tmp_path):
    from pathlib import Path
    text = (Path(__file__).parent / "data" / "arvados-ec2.yml").read_text()
    path = tmp_path / "config.yml"
    path.write_text(text.replace("EBSVolumeType: gp2", "EBSVolumeType: fast"))
    r = _check_config(path)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == (f"dispatch-cloud: {path}: DriverParameters.EBSVolumeType: unknown EBS volume type 'fast' "
                        "(one of standard, io1, io2, gp2, sc1, st1, gp3)\n")



def test_empty_region_needs_the_sdks_default_region(tmp_path, monkeypatch):
    from pathlib import Path
    from cloud.drivers import load_config
    from conf.loader import ConfigError
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    path = tmp_path / "config.yml"
    path.write_text((Path(__file__).parent / "data" / "arvados-ec2.yml").read_text().replace(
        "Region: us-east-1", 'Region: ""'))
    with pytest.raises(ConfigError, match=f"^{path}: DriverParameters.Region: is empty"):
        load_config(str(path))  # what check-config and run call
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    load_config(str(path))


def test_check_config_refuses_a_key_ec2_cannot_import(tmp_path):
    from pathlib import Path
    from cryptography.hazmat.primitives.asymmetric import ec
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()).decode()
    (tmp_path / "ecdsa").write_text(pem)
    (tmp_path / "ecdsa").chmod(0o600)  # a key file others can read is refused first
    text = (Path(__file__).parent / "data" / "arvados-ec2.yml").read_text()
    text = re.sub(r"DispatchPrivateKey: \|\n(        .*\n)+", f"DispatchPrivateKey: file://{tmp_path}/ecdsa\n", text)
    path = tmp_path / "config.yml"
    path.write_text(text)
    from cloud.drivers import load_config
    from conf.loader import ConfigError
    with pytest.raises(ConfigError, match="DispatchPrivateKey: EC2 key pairs must be RSA or ed25519, got ecdsa"):
        load_config(str(path))
    path.write_text(text.replace("      CloudVMs:\n", "      CloudVMs:\n        DeployPublicKey: false\n"))
    load_config(str(path))
