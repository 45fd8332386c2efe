"""The EC2 driver: instances through boto3, with Arvados' DriverParameters and behaviour.

Follows Arvados ``lib/cloud/ec2`` (RunInstances parameters, key pairs by AWS fingerprint, subnet
failover, spot price history, quota groups, error mapping, metrics), with these differences:

* boto3 makes no retries of its own (Go uses NopRetryer too), and every call has a 10 s connect and
  60 s read timeout;
* instances get a ``Name`` tag (``arvados-dispatch-<instance type name>``) unless the caller's tags
  (ResourceTags included) set one; Go sets none;
* a spot instance's availability zone comes from DescribeInstances' Placement, so no extra
  DescribeInstanceStatus pages are read;
* throttling of DescribeKeyPairs/ImportKeyPair is a rate-limit error like RunInstances' (Go returns
  a plain error), and destroying an instance EC2 no longer knows (InvalidInstanceID.NotFound) is a
  success;
* ``EndpointURL`` points the client at another endpoint (tests, private endpoints; plain http only
  for loopback).
"""

from __future__ import annotations

import logging
import math
import threading
from datetime import datetime, timezone

import boto3
import botocore.config
import botocore.loaders
import botocore.session
from prometheus_client import CollectorRegistry, Counter, Gauge

from cloud.base import CloudError, InstancePrice, NotSupported
from cloud.ec2 import errors as ec2_errors
from cloud.ec2.config import EC2Config, EC2ConfigError, check_region, parse
from cloud.ec2.keys import aws_fingerprints
from cloud.ec2.prices import SpotPrices, ebs_hourly
from conf.model import InstanceType

__all__ = ["driver", "check_params", "EC2InstanceSet", "EC2Instance", "EC2ConfigError", "user_data",
           "quota_group"]

GIB = 1 << 30
KEY_NAME_PREFIX = "arvados-dispatch-keypair-"
SCRATCH_DEVICE = "/dev/xvdt"
MAX_PAGES = 10_000  # a listing that pages longer than this is a loop, not a cloud
GONE_STATES = ("shutting-down", "terminated")


# ---------------------------------------------------------------------------------------------
# Pure helpers


def user_data(init_command: str) -> str:
    """What cloud-init runs at first boot. Plain text: boto3 base64-encodes RunInstances' UserData
    itself (Go's SDK does not, so Go encodes it)."""
    return "#!/bin/sh\n" + init_command + "\n"


def quota_group(provider_type: str, preemptible: bool, groups) -> str:
    """Go's InstanceQuotaGroup: the alphabetic prefix of the lower-cased ProviderType, or the
    configured group of the longest prefix at least that long; ``-spot`` for preemptible types."""
    pt = provider_type.lower()
    group = ""
    for i, c in enumerate(pt):
        if not c.islower() and group == "":
            group = pt[:i]
        conf = groups.get(pt[:i], "")
        if conf and group:
            group = conf
    return group + "-spot" if preemptible else group


def run_instances_params(cfg: EC2Config, it: InstanceType, image_id: str, tags, init_command: str,
                         key_name: str | None) -> dict:
    """The RunInstances request (without SubnetId, which the failover loop sets)."""
    tag_list = [{"Key": k, "Value": v} for k, v in sorted(tags.items())]
    if "Name" not in tags:
        tag_list.append({"Key": "Name", "Value": f"arvados-dispatch-{it.name}"})
    nic = {"AssociatePublicIpAddress": False, "DeleteOnTermination": True, "DeviceIndex": 0}
    if cfg.security_group_ids:
        nic["Groups"] = list(cfg.security_group_ids)
    p = {
        "ImageId": image_id,
        "InstanceType": it.provider_type,
        "MinCount": 1,
        "MaxCount": 1,
        "NetworkInterfaces": [nic],
        "DisableApiTermination": False,
        "InstanceInitiatedShutdownBehavior": "terminate",
        "TagSpecifications": [{"ResourceType": "instance", "Tags": tag_list}],
        # Require IMDSv2, as Arvados does.
        "MetadataOptions": {"HttpEndpoint": "enabled", "HttpTokens": "required"},
        "UserData": user_data(init_command),
    }
    if key_name:
        p["KeyName"] = key_name
    if it.added_scratch > 0:
        p["BlockDeviceMappings"] = [{"DeviceName": SCRATCH_DEVICE, "Ebs": {
            "DeleteOnTermination": True, "VolumeSize": math.ceil(it.added_scratch / GIB),
            "VolumeType": cfg.ebs_volume_type}}]
    if it.preemptible:
        p["InstanceMarketOptions"] = {"MarketType": "spot", "SpotOptions": {
            "InstanceInterruptionBehavior": "terminate", "MaxPrice": _go_float(it.price)}}
    if cfg.iam_instance_profile:
        p["IamInstanceProfile"] = {"Name": cfg.iam_instance_profile}
    return p


def _go_float(x: float) -> str:
    """Go's ``%v`` of a float64 for ordinary prices: shortest repr, no trailing ``.0``."""
    s = repr(float(x))
    return s[:-2] if s.endswith(".0") else s


def _unix(t) -> float:
    if isinstance(t, datetime):
        return (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).timestamp()
    return float(t)


# ---------------------------------------------------------------------------------------------
# SDK plumbing


def default_region() -> str | None:
    """The region boto3 would use with none given (AWS_DEFAULT_REGION, ~/.aws/config)."""
    try:
        return botocore.session.get_session().get_config_variable("region")
    except Exception:  # an unreadable ~/.aws/config: as good as none
        return None


_loader_lock = threading.Lock()
_loader = None


def _shared_loader():
    """One botocore model loader per process: parsing EC2's service model takes ~0.2 s per session."""
    global _loader
    with _loader_lock:
        if _loader is None:
            _loader = botocore.loaders.create_loader()
        return _loader


def make_client(cfg: EC2Config):
    """A boto3 EC2 client: static keys if configured, else the default chain; no SDK retries."""
    kwargs = {}
    if cfg.static_credentials:
        kwargs = {"aws_access_key_id": cfg.access_key_id, "aws_secret_access_key": cfg.secret_access_key}
    core = botocore.session.get_session()
    core.register_component("data_loader", _shared_loader())
    session = boto3.session.Session(botocore_session=core, region_name=cfg.region or None, **kwargs)
    conf = botocore.config.Config(retries={"total_max_attempts": 1, "mode": "standard"}, connect_timeout=10,
                                  read_timeout=60, max_pool_connections=32)
    return session.client("ec2", endpoint_url=cfg.endpoint_url or None, config=conf)


# ---------------------------------------------------------------------------------------------
# The driver


def check_params(params, cluster=None) -> None:
    """``check-config``'s look at DriverParameters: raises EC2ConfigError naming the key."""
    cfg = parse(params)
    if bool(cfg.access_key_id) != bool(cfg.secret_access_key):
        missing = "SecretAccessKey" if cfg.access_key_id else "AccessKeyID"
        raise EC2ConfigError(f"DriverParameters.{missing}: is empty while the other key is set "
                             "(set both, or neither to use the instance profile / environment credentials)")
    check_region(cfg, default_region())
    if cluster is None:
        return
    for name, it in (cluster.instance_types or {}).items():
        if not it.provider_type:
            raise EC2ConfigError(f"InstanceTypes.{name}.ProviderType: empty (the ec2 driver needs an EC2 type)")
    if cluster.cloud_vms.deploy_public_key and cluster.containers.dispatch_private_key:
        from cloud.ssh import public_key_line
        kind = (public_key_line(cluster.containers.dispatch_private_key) or "").split(" ")[0]
        if kind not in ("ssh-rsa", "ssh-ed25519"):
            raise EC2ConfigError(f"Containers.DispatchPrivateKey: EC2 key pairs must be RSA or ed25519, got {kind} "
                                 "(or set CloudVMs.DeployPublicKey: false and put the key on the image)")


def driver(params, set_id: str, *, cluster=None, clock=None, logger=None, registry=None,
           client=None) -> "EC2InstanceSet":
    """An :class:`EC2InstanceSet` for raw DriverParameters; EC2ConfigError names a bad key."""
    cfg = parse(params)
    check_region(cfg, default_region())
    if clock is None:
        from cloud.clock import SystemClock
        clock = SystemClock()
    return EC2InstanceSet(cfg, set_id, client=client or make_client(cfg), clock=clock,
                          logger=logger or logging.getLogger("cloud.ec2.driver"), registry=registry)


class EC2InstanceSet:
    """This dispatcher's EC2 instances, found by their tags."""

    def __init__(self, cfg: EC2Config, set_id: str, *, client, clock, logger, registry=None):
        self.cfg = cfg
        self.set_id = set_id
        self._client = client
        self._clock = clock
        self._log = logger
        self._keys_lock = threading.Lock()
        self._keys: dict[str, str] = {}  # first AWS fingerprint -> key pair name
        self._subnet_index = 0
        self._subnet_lock = threading.Lock()
        self._backoff_create = ec2_errors.Backoff()
        self._backoff_instances = ec2_errors.Backoff()
        self._prices = SpotPrices()
        self.registry = registry if registry is not None else CollectorRegistry()
        self.m_instances = Gauge("arvados_dispatchcloud_ec2_instances", "Number of instances running",
                                 ["subnet_id"], registry=self.registry)
        self.m_starts = Counter("arvados_dispatchcloud_ec2_instance_starts",
                                "Number of attempts to start a new instance", ["subnet_id", "success"],
                                registry=self.registry)
        for subnet in cfg.subnet_ids or ("",):
            for ok in ("0", "1"):
                self.m_starts.labels(subnet_id=subnet, success=ok)

    # -- helpers ---------------------------------------------------------------------------

    def _error(self, err: BaseException, doing: str, backoff=None):
        typed = ec2_errors.wrap(err, self._clock.now(), doing, backoff)
        self._log.warning("ec2 call failed", extra={"operation": doing, "error": str(typed),
                                                     "errorClass": type(typed).__name__})
        return typed

    def _key_name(self, public_key: str) -> str:
        """The name of a key pair holding ``public_key``: found by fingerprint, else imported."""
        try:
            fingerprints = aws_fingerprints(public_key)
        except ValueError as e:
            raise CloudError(f"could not make key fingerprint: {e}") from None
        with self._keys_lock:
            name = self._keys.get(fingerprints[0])
            if name:
                return name
            try:
                found = self._client.describe_key_pairs(
                    Filters=[{"Name": "fingerprint", "Values": fingerprints}]).get("KeyPairs") or []
            except Exception as e:
                raise self._error(e, "search for key pair", self._backoff_create) from e
            if found:
                name = found[0]["KeyName"]
            else:
                name = KEY_NAME_PREFIX + fingerprints[0]
                try:
                    self._client.import_key_pair(KeyName=name, PublicKeyMaterial=public_key.strip().encode())
                except Exception as e:
                    raise self._error(e, "import key pair", self._backoff_create) from e
                self._log.info("imported key pair", extra={"KeyName": name})
            self._keys[fingerprints[0]] = name
            return name

    # -- InstanceSet -----------------------------------------------------------------------

    def create(self, it: InstanceType, image_id: str, tags, init_command: str,
               public_key: str | None) -> "EC2Instance":
        if not image_id:
            raise CloudError("CloudVMs.ImageID is empty: the ec2 driver needs an AMI to create an instance")
        key_name = self._key_name(public_key) if public_key else None
        params = run_instances_params(self.cfg, it, image_id, tags, init_command, key_name)
        subnets = self.cfg.subnet_ids
        with self._subnet_lock:
            start = self._subnet_index
        fields = {"InstanceType": it.name, "ProviderType": it.provider_type, "Preemptible": it.preemptible}
        result, to_raise, raising_capacity = None, None, False
        tried = start
        for offset in range(max(1, len(subnets))):
            subnet = ""
            if subnets:
                tried = (start + offset) % len(subnets)
                subnet = subnets[tried]
                params["NetworkInterfaces"][0]["SubnetId"] = subnet
            self._log.info("creating ec2 instance", extra={**fields, "SubnetID": subnet})
            try:
                result = self._client.run_instances(**params)
            except Exception as e:
                self.m_starts.labels(subnet_id=subnet, success="0").inc()
                code, message = ec2_errors.error_fields(e)
                inst_cap, group_cap = ec2_errors.capacity(code, message)
                if not raising_capacity or inst_cap or group_cap:
                    # the last capacity error if any, else the last error
                    to_raise, raising_capacity = e, inst_cap or group_cap
                if ec2_errors.is_subnet_specific(code, message) and offset < len(subnets) - 1:
                    self._log.warning("RunInstances failed, trying next subnet",
                                      extra={**fields, "SubnetID": subnet, "error": f"{code}: {message}"})
                    continue
                break
            self.m_starts.labels(subnet_id=subnet, success="1").inc()
            break
        with self._subnet_lock:
            # Remember where we stopped, even after a failure, so each subnet's error surfaces in turn.
            self._subnet_index = tried
        if result is None or not result.get("Instances"):
            if to_raise is None:
                raise CloudError("RunInstances returned no instance")
            raise self._error(to_raise, "RunInstances", self._backoff_create) from to_raise
        self._backoff_create.reset()
        inst = EC2Instance(self, result["Instances"][0])
        self._log.info("created ec2 instance", extra={**fields, "Instance": inst.id,
                                                      "SubnetID": inst.subnet_id})
        return inst

    def _pages(self, call, key: str, doing: str, backoff=None, **params):
        """Every item of a NextToken-paged call; "" ends the listing too (Arvados bug #22400)."""
        seen = set()
        for _ in range(MAX_PAGES):
            try:
                page = call(**params)
            except Exception as e:
                raise self._error(e, doing, backoff) from e
            yield from page.get(key) or ()
            token = page.get("NextToken")
            if not token or token in seen:
                return
            seen.add(token)
            params["NextToken"] = token
        raise CloudError(f"{doing}: more than {MAX_PAGES} pages")

    def instances(self, tags) -> list["EC2Instance"]:
        """Our instances (server-side tag filter), without shutting-down and terminated ones."""
        filters = [{"Name": f"tag:{k}", "Values": [v]} for k, v in sorted(tags.items())]
        params = {"Filters": filters} if filters else {}
        out = []
        for rsv in self._pages(self._client.describe_instances, "Reservations", "DescribeInstances",
                               self._backoff_instances, **params):
            for raw in rsv.get("Instances") or ():
                if (raw.get("State") or {}).get("Name") in GONE_STATES:
                    continue
                out.append(EC2Instance(self, raw))
        self._backoff_instances.reset()
        if self.cfg.spot_price_update_interval > 0 and any(i.spot for i in out):
            self._update_spot_prices(out)
        counts = dict.fromkeys(("",) + self.cfg.subnet_ids, 0)
        for i in out:
            counts[i.subnet_id] = counts.get(i.subnet_id, 0) + 1
        for subnet, n in counts.items():
            self.m_instances.labels(subnet_id=subnet).set(n)
        return out

    def _update_spot_prices(self, instances) -> None:
        """Refresh spot price history when any spot instance's (type, AZ) series is stale; errors
        are logged, never raised (a listing must not fail for want of prices)."""
        now = self._clock.now()
        interval = self.cfg.spot_price_update_interval
        keys = {(i.provider_type, i.availability_zone) for i in instances if i.spot}
        if not self._prices.stale(keys, now, interval):
            return
        types = sorted({k[0] for k in keys})
        start = datetime.fromtimestamp(now - 3 * interval, timezone.utc)
        entries = []
        try:
            for ent in self._pages(self._client.describe_spot_price_history, "SpotPriceHistory",
                                   "DescribeSpotPriceHistory", StartTime=start, Filters=[
                                       {"Name": "instance-type", "Values": types},
                                       {"Name": "product-description", "Values": ["Linux/UNIX"]}]):
                try:
                    price = float(ent["SpotPrice"])
                    entries.append((ent["InstanceType"], ent.get("AvailabilityZone") or "",
                                    InstancePrice(_unix(ent["Timestamp"]), price)))
                except (KeyError, TypeError, ValueError):
                    continue  # a bogus record
        except CloudError as e:
            self._log.warning("error retrieving spot instance prices", extra={"error": str(e)})
        self._prices.update(entries, now, interval)

    def price_history(self, ptype: str, az: str) -> list[InstancePrice]:
        return self._prices.history(ptype, az)

    def instance_quota_group(self, it: InstanceType) -> str:
        return quota_group(it.provider_type, it.preemptible, self.cfg.instance_type_quota_groups)

    def stop(self) -> None:
        close = getattr(self._client, "close", None)
        if close is not None:
            try:
                close()
            except Exception:  # closing a half-built client: nothing left to release
                pass


class EC2Instance:
    """One DescribeInstances/RunInstances entry (a snapshot: tags may be stale after set_tags)."""

    def __init__(self, owner: EC2InstanceSet, raw: dict):
        self._set = owner
        self._raw = raw
        self._tags = {t["Key"]: t.get("Value", "") for t in raw.get("Tags") or ()}

    @property
    def id(self) -> str:
        return self._raw["InstanceId"]

    @property
    def address(self) -> str:
        return self._raw.get("PrivateIpAddress") or ""

    @property
    def remote_user(self) -> str:
        return self._set.cfg.admin_username

    @property
    def provider_type(self) -> str:
        return self._raw.get("InstanceType") or ""

    @property
    def spot(self) -> bool:
        return self._raw.get("InstanceLifecycle") == "spot"

    @property
    def availability_zone(self) -> str:
        return (self._raw.get("Placement") or {}).get("AvailabilityZone") or ""

    @property
    def subnet_id(self) -> str:
        return self._raw.get("SubnetId") or ""

    @property
    def state(self) -> str:
        return (self._raw.get("State") or {}).get("Name") or ""

    @property
    def tags(self):
        return dict(self._tags)

    def set_tags(self, tags) -> None:
        """CreateTags: adds or overwrites, never removes (callers pass the full set)."""
        s = self._set
        try:
            s._client.create_tags(Resources=[self.id], Tags=[{"Key": k, "Value": v} for k, v in sorted(tags.items())])
        except Exception as e:
            raise s._error(e, f"CreateTags {self.id}") from e
        self._tags.update(tags)

    def destroy(self) -> None:
        s = self._set
        try:
            s._client.terminate_instances(InstanceIds=[self.id])
        except Exception as e:
            if ec2_errors.error_fields(e)[0] == "InvalidInstanceID.NotFound":
                return
            raise s._error(e, f"TerminateInstances {self.id}") from e
        s._log.info("terminated ec2 instance", extra={"Instance": self.id})

    def verify_host_key(self, host_key, transport) -> None:
        raise NotSupported("the ec2 driver cannot verify host keys; the instance secret is checked instead")

    def price_history(self, it: InstanceType) -> list[InstancePrice]:
        """Spot prices of this type in this AZ, newest first, plus AddedScratch's EBS cost; [] for
        on-demand instances (their price is the configured one)."""
        if not self.spot:
            return []
        extra = ebs_hourly(self._set.cfg.ebs_price, it.added_scratch)
        return [InstancePrice(p.start_time, p.price + extra)
                for p in self._set.price_history(self.provider_type, self.availability_zone)]

    def __repr__(self) -> str:
        return f"<EC2Instance {self.id}>"
