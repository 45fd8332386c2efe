"""EC2 DriverParameters: parsed, defaulted and checked once, before any boto3 client exists.

Keys are matched case-insensitively (Go's encoding/json does), defaults are Arvados'
``config.default.yml`` ones, and every error is one line naming the key. Pure: no boto3 here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from cloud.params import DriverParamsError, endpoint, known, string
from conf import units

# Arvados' default InstanceTypeQuotaGroups; a site map is merged over it, as Arvados' loader does.
DEFAULT_QUOTA_GROUPS = {**dict.fromkeys("acdhimrtz", "standard"), "vt": "g", "p5": "p5"}
# The EBS volume types RunInstances accepts.
VOLUME_TYPES = ("standard", "io1", "io2", "gp2", "sc1", "st1", "gp3")


EC2ConfigError = DriverParamsError  # a DriverParameters value is wrong; the message names the key


@dataclass(frozen=True)
class EC2Config:
    access_key_id: str = ""
    secret_access_key: str = ""
    region: str = ""
    security_group_ids: tuple[str, ...] = ()
    subnet_ids: tuple[str, ...] = ()
    admin_username: str = "crunch"
    ebs_volume_type: str = "gp2"
    ebs_price: float = 0.10
    iam_instance_profile: str = ""
    spot_price_update_interval: float = 24 * 3600.0
    instance_type_quota_groups: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_QUOTA_GROUPS))
    endpoint_url: str = ""  # "" = boto3's endpoint for the region

    def __repr__(self) -> str:  # never print the secret key
        return (f"EC2Config(region={self.region!r}, subnet_ids={self.subnet_ids!r}, "
                f"static_credentials={self.static_credentials}, ...)")

    @property
    def static_credentials(self) -> bool:
        """Go uses the static keys if either is set, else the SDK's default credential chain."""
        return bool(self.access_key_id or self.secret_access_key)


# DriverParameters key -> EC2Config field (the Arvados spelling, for messages).
KEYS = {
    "AccessKeyID": "access_key_id", "SecretAccessKey": "secret_access_key", "Region": "region",
    "SecurityGroupIDs": "security_group_ids", "SubnetID": "subnet_ids",
    "AdminUsername": "admin_username", "EBSVolumeType": "ebs_volume_type", "EBSPrice": "ebs_price",
    "IAMInstanceProfile": "iam_instance_profile", "SpotPriceUpdateInterval": "spot_price_update_interval",
    "InstanceTypeQuotaGroups": "instance_type_quota_groups", "EndpointURL": "endpoint_url",
}
_STRINGS = ("AccessKeyID", "SecretAccessKey", "Region", "AdminUsername", "IAMInstanceProfile", "EndpointURL")


def _err(key: str, msg: str) -> EC2ConfigError:
    return EC2ConfigError(f"DriverParameters.{key}: {msg}")


def _id_list(v, key: str, *, allow_map: bool) -> tuple[str, ...]:
    """SubnetID (``""``, ``"subnet-a"`` or a list) and SecurityGroupIDs (a list or a map of ids)."""
    if v is None or v == "":
        return ()
    if isinstance(v, str) and not allow_map:
        items = [v]
    elif isinstance(v, Mapping) and allow_map:
        items = list(v)  # Arvados' StringSet: {"sg-1": {}, ...}
    elif isinstance(v, (list, tuple)):
        items = list(v)
    else:
        shape = "a list or a map of ids" if allow_map else "a string or a list of strings"
        raise _err(key, f"expected {shape}, got {v!r}")
    out = []
    for item in items:
        if not isinstance(item, str) or not item.strip():
            raise _err(key, f"every entry must be a non-empty string, got {item!r}")
        if item not in out:
            out.append(item)
    return tuple(out)


def _quota_groups(v, key: str) -> dict[str, str]:
    if v is None:
        return dict(DEFAULT_QUOTA_GROUPS)
    if not isinstance(v, Mapping):
        raise _err(key, f"expected a map of instance type prefix to quota group, got {v!r}")
    out = dict(DEFAULT_QUOTA_GROUPS)
    for prefix, group in v.items():
        if not isinstance(prefix, str) or not re.fullmatch(r"[a-z][a-z0-9-]*", prefix):
            raise _err(f"{key}.{prefix}", "keys must be lower-case instance type prefixes like 'm' or 'p5'")
        if not isinstance(group, str) or not group:
            raise _err(f"{key}.{prefix}", f"expected a quota group name, got {group!r}")
        out[prefix] = group
    return out


def parse(params: Mapping | None) -> EC2Config:
    """An :class:`EC2Config` from raw DriverParameters. Keys of other drivers are ignored."""
    values: dict = {}
    for key, v in known(params, KEYS):
        name = KEYS[key]
        if key in _STRINGS:
            v = string(v, key)
            if key == "AdminUsername" and not v:
                continue  # an explicit "" keeps the Arvados default, as the merged defaults do
            if key == "EndpointURL":
                v = endpoint(v, key)
        elif key == "SubnetID":
            v = _id_list(v, key, allow_map=False)
        elif key == "SecurityGroupIDs":
            v = _id_list(v, key, allow_map=True)
        elif key == "EBSVolumeType":
            v = string(v, key) or "gp2"  # Go defaults an empty value to gp2 too
            if v not in VOLUME_TYPES:
                raise _err(key, f"unknown EBS volume type {v!r} (one of {', '.join(VOLUME_TYPES)})")
        elif key == "EBSPrice":
            if v is None or v == "":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise _err(key, f"expected a non-negative price per GiB-month, got {v!r}")
            v = float(v)
        elif key == "SpotPriceUpdateInterval":
            try:
                v = units.parse_duration(v) if isinstance(v, str) else v
            except ValueError as e:
                raise _err(key, f"{e}: expected a duration like '24h' or 0") from None
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise _err(key, f"expected a non-negative duration like '24h' (0 disables), got {v!r}")
            v = float(v)
        elif key == "InstanceTypeQuotaGroups":
            v = _quota_groups(v, key)
        values[name] = v
    return EC2Config(**values)


def check_region(cfg: EC2Config, default_region: str | None) -> None:
    """Region may be empty only when boto3's own configuration (AWS_DEFAULT_REGION, ~/.aws/config) has one;
    it must look like an AWS region unless EndpointURL points somewhere else."""
    if not cfg.region and not default_region:
        raise _err("Region", "is empty and no default region is configured (AWS_DEFAULT_REGION or ~/.aws/config)")
    if cfg.region and not cfg.endpoint_url and not re.fullmatch(r"[a-z]{2}(-[a-z0-9]+)+-\d+", cfg.region):
        raise _err("Region", f"expected a region name like 'us-east-1', got {cfg.region!r}")
