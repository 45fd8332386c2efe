"""Azure DriverParameters: parsed, defaulted and checked once, before any SDK client exists.

Keys are matched case-insensitively (Go's encoding/json does, and Arvados' own test config spells
``TenantId``), so an operator's Arvados config loads unchanged. Every error names the key.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from urllib.parse import urlsplit

from cloud.params import DriverParamsError, endpoint, known, string
from conf import units
from conf.hosts import is_loopback_host


@dataclass(frozen=True)
class CloudEnvironment:
    """The endpoints go-autorest's ``EnvironmentFromName`` gives for one sovereign cloud."""

    name: str
    resource_manager: str
    authority_host: str
    storage_suffix: str


ENVIRONMENTS = {e.name.lower(): e for e in (
    CloudEnvironment("AzurePublicCloud", "https://management.azure.com/",
                     "https://login.microsoftonline.com/", "core.windows.net"),
    CloudEnvironment("AzureUSGovernmentCloud", "https://management.usgovcloudapi.net/",
                     "https://login.microsoftonline.us/", "core.usgovcloudapi.net"),
    CloudEnvironment("AzureChinaCloud", "https://management.chinacloudapi.cn/",
                     "https://login.chinacloudapi.cn/", "core.chinacloudapi.cn"),
    CloudEnvironment("AzureGermanCloud", "https://management.microsoftazure.de/",
                     "https://login.microsoftonline.de/", "core.cloudapi.de"),
)}


AzureConfigError = DriverParamsError  # a DriverParameters value is missing or wrong; names the key


@dataclass(frozen=True)
class AzureConfig:
    subscription_id: str = ""
    client_id: str = ""
    client_secret: str = ""
    tenant_id: str = ""
    cloud_environment: str = "AzurePublicCloud"
    resource_group: str = ""
    image_resource_group: str = ""
    location: str = "centralus"
    network: str = ""
    network_resource_group: str = ""
    subnet: str = ""
    storage_account: str = ""
    blob_container: str = ""
    shared_image_gallery_name: str = ""
    shared_image_gallery_image_version: str = ""
    delete_dangling_resources_after: float = 20.0
    admin_username: str = "crunch"
    resource_manager_endpoint: str = ""  # "" = the environment's
    authority_host: str = ""  # "" = the environment's

    def __repr__(self) -> str:  # never print the client secret
        return f"AzureConfig(subscription_id={self.subscription_id!r}, resource_group={self.resource_group!r}, ...)"

    @property
    def environment(self) -> CloudEnvironment:
        return ENVIRONMENTS[self.cloud_environment.lower()]

    @property
    def arm_endpoint(self) -> str:
        return (self.resource_manager_endpoint or self.environment.resource_manager).rstrip("/")

    @property
    def aad_authority(self) -> str:
        return (self.authority_host or self.environment.authority_host).rstrip("/")

    @property
    def arm_is_loopback_http(self) -> bool:
        u = urlsplit(self.arm_endpoint)
        return u.scheme == "http" and is_loopback_host(u.hostname or "")

    @property
    def effective_image_resource_group(self) -> str:
        return self.image_resource_group or self.resource_group

    @property
    def subnet_id(self) -> str:
        rg = self.network_resource_group or self.resource_group
        return (f"/subscriptions/{self.subscription_id}/resourceGroups/{rg}/providers/"
                f"Microsoft.Network/virtualnetworks/{self.network}/subnets/{self.subnet}")


# DriverParameters key -> AzureConfig field (the Arvados spelling, for messages).
KEYS = {
    "SubscriptionID": "subscription_id", "ClientID": "client_id", "ClientSecret": "client_secret",
    "TenantID": "tenant_id", "CloudEnvironment": "cloud_environment",
    "ResourceGroup": "resource_group", "ImageResourceGroup": "image_resource_group",
    "Location": "location", "Network": "network", "NetworkResourceGroup": "network_resource_group",
    "Subnet": "subnet", "StorageAccount": "storage_account", "BlobContainer": "blob_container",
    "SharedImageGalleryName": "shared_image_gallery_name",
    "SharedImageGalleryImageVersion": "shared_image_gallery_image_version",
    "DeleteDanglingResourcesAfter": "delete_dangling_resources_after",
    "AdminUsername": "admin_username", "ResourceManagerEndpoint": "resource_manager_endpoint",
    "AuthorityHost": "authority_host",
}
REQUIRED = ("SubscriptionID", "ResourceGroup", "Network", "Subnet", "Location")
RETIRED_VHD = ("unmanaged VHD images are retired (Azure retired unmanaged disks in September 2025): "
               "use a managed image or a Shared Image Gallery")
_DEFAULTS = {f.name: f.default for f in fields(AzureConfig)}


def parse_duration(value, key: str) -> float:
    """Seconds from a Go duration string (``20s``, ``1m30s``), as Go's ``arvados.Duration`` reads
    it: a bare number other than 0 is an error (missing unit), not seconds."""
    if value == "":
        return 0.0
    try:
        return units.parse_duration(value)
    except ValueError as e:
        raise AzureConfigError(f"DriverParameters.{key}: {e}: expected a duration like '20s', "
                               f"got {value!r}") from None


def parse(params: Mapping | None) -> AzureConfig:
    """An :class:`AzureConfig` from raw DriverParameters (defaults applied, required keys checked).

    Keys of other drivers (the EC2 defaults are always merged in) are ignored, as in Arvados.
    """
    values = dict(_DEFAULTS)
    for key, v in known(params, KEYS):
        name = KEYS[key]
        if name == "delete_dangling_resources_after":
            v = parse_duration(v, key)
            if v < 0:
                raise AzureConfigError(f"DriverParameters.{key}: must not be negative")
        else:
            v = string(v, key) or _DEFAULTS[name]
            # (None or an explicit "" keeps the Arvados default, as the merged defaults do)
        values[name] = v
    cfg = AzureConfig(**values)
    for key in REQUIRED:
        if not getattr(cfg, KEYS[key]):
            raise AzureConfigError(f"DriverParameters.{key} is required for the azure driver")
    if cfg.cloud_environment.lower() not in ENVIRONMENTS:
        names = ", ".join(e.name for e in ENVIRONMENTS.values())
        raise AzureConfigError(f"DriverParameters.CloudEnvironment: unknown environment "
                               f"{cfg.cloud_environment!r} (one of {names})")
    endpoint(cfg.arm_endpoint, "ResourceManagerEndpoint")
    endpoint(cfg.aad_authority, "AuthorityHost")
    for key in ("StorageAccount", "BlobContainer"):
        if getattr(cfg, KEYS[key]):
            raise AzureConfigError(f"DriverParameters.{key}: {RETIRED_VHD}")
    if bool(cfg.shared_image_gallery_name) != bool(cfg.shared_image_gallery_image_version):
        raise AzureConfigError("DriverParameters.SharedImageGalleryName and "
                               "DriverParameters.SharedImageGalleryImageVersion must both be empty or both be set")
    if not cfg.arm_is_loopback_http:
        for key in ("ClientID", "ClientSecret", "TenantID"):
            if not getattr(cfg, KEYS[key]):
                raise AzureConfigError(f"DriverParameters.{key} is required for the azure driver")
    return cfg
