"""The loaded cluster configuration, as frozen dataclasses.

Field names are the snake_case forms of the Arvados keys (``Containers.CloudVMs.TimeoutIdle`` ->
``cluster.containers.cloud_vms.timeout_idle``). Durations are float seconds, sizes int bytes.
Mappings are read-only (``types.MappingProxyType``) so a Cluster can be shared between threads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

EMPTY: Mapping = MappingProxyType({})


@dataclass(frozen=True)
class GPU:
    stack: str = ""  # "", "cuda" or "rocm"
    driver_version: str = ""
    hardware_target: str = ""
    device_count: int = 0
    vram: int = 0  # bytes per device


@dataclass(frozen=True)
class InstanceType:
    name: str
    provider_type: str
    vcpus: int
    ram: int
    included_scratch: int
    added_scratch: int
    price: float
    preemptible: bool = False
    gpu: GPU = GPU()

    @property
    def scratch(self) -> int:
        return self.included_scratch + self.added_scratch

    def arvados_json(self) -> dict:
        """The Go ``arvados.InstanceType`` JSON: no Name and no Scratch key (both ``json:"-"``)."""
        return {
            "ProviderType": self.provider_type,
            "VCPUs": self.vcpus,
            "RAM": self.ram,
            "IncludedScratch": self.included_scratch,
            "AddedScratch": self.added_scratch,
            "Price": self.price,
            "Preemptible": self.preemptible,
            "GPU": {
                "Stack": self.gpu.stack,
                "DriverVersion": self.gpu.driver_version,
                "HardwareTarget": self.gpu.hardware_target,
                "DeviceCount": self.gpu.device_count,
                "VRAM": self.gpu.vram,
            },
        }

    def documented_json(self) -> dict:
        """The shape the management API doc shows for ``instance_type`` (with Name and Scratch)."""
        return {
            "Name": self.name,
            "ProviderType": self.provider_type,
            "VCPUs": self.vcpus,
            "RAM": self.ram,
            "Scratch": self.scratch,
            "IncludedScratch": self.included_scratch,
            "AddedScratch": self.added_scratch,
            "Price": self.price,
            "Preemptible": self.preemptible,
        }


@dataclass(frozen=True)
class CloudVMs:
    enable: bool = False
    driver: str = "ec2"
    driver_parameters: Mapping = field(default_factory=lambda: EMPTY)  # raw, with the driver's defaults merged in
    ssh_port: str = "22"
    poll_interval: float = 10.0
    boot_probe_command: str = "systemctl is-system-running"
    probe_interval: float = 10.0
    max_probes_per_second: int = 10
    timeout_signal: float = 5.0
    timeout_stale_run_lock: float = 5.0
    timeout_term: float = 120.0
    max_cloud_ops_per_second: int = 10
    max_concurrent_instance_create_ops: int = 1
    max_instances: int = 64
    max_running_containers_per_instance: int = 0
    initial_quota_estimate: int = 0
    supervisor_fraction: float = 0.5
    sync_interval: float = 60.0
    timeout_idle: float = 60.0
    timeout_booting: float = 600.0
    timeout_probe: float = 600.0
    timeout_shutdown: float = 10.0
    image_id: str = ""
    instance_init_command: str = ""
    deploy_runner_binary: str = ""
    deploy_runner_directory: str = "/tmp/arvados-crunch-run"
    deploy_public_key: bool = True
    resource_tags: Mapping = field(default_factory=lambda: EMPTY)
    tag_key_prefix: str = "Arvados"


@dataclass(frozen=True)
class Containers:
    cloud_vms: CloudVMs = CloudVMs()
    default_keep_cache_ram: int = 0
    max_dispatch_attempts: int = 10
    always_use_preemptible_instances: bool = False
    preemptible_price_factor: float = 0.0
    maximum_price_factor: float = 1.5
    dispatch_private_key: str = ""
    stale_lock_timeout: float = 60.0
    crunch_run_command: str = "crunch-run"
    crunch_run_arguments_list: tuple[str, ...] = ()
    reserve_extra_ram: int = 550 << 20
    runtime_engine: str = "docker"
    local_keep_blob_buffers_per_vcpu: int = 1


LOG_LEVELS = ("error", "warning", "info", "debug")
LOG_FORMATS = ("json", "text")


@dataclass(frozen=True)
class Cluster:
    cluster_id: str = "zzzzz"
    system_root_token: str = ""
    management_token: str = ""
    controller_url: str = ""  # Services.Controller.ExternalURL
    dispatch_urls: tuple[str, ...] = ("http://localhost:9006",)  # Services.DispatchCloud.InternalURLs
    # InternalURL -> its ListenURL, for those that have one; the others are served on themselves
    dispatch_listen: Mapping = field(default_factory=lambda: EMPTY)
    tls_insecure: bool = False
    postgresql_connection: Mapping = field(default_factory=lambda: EMPTY)  # libpq keyword -> value
    api_max_concurrent_requests: int = 64  # API.MaxConcurrentRequests (0: no limit)
    log_level: str = "info"  # SystemLogs.LogLevel, normalized to LOG_LEVELS
    log_format: str = ""  # SystemLogs.Format: json, text, or "" (json for a service, text on a tty/dev)
    containers: Containers = Containers()
    instance_types: Mapping = field(default_factory=lambda: EMPTY)  # name -> InstanceType
    source: str = ""  # the file this came from, for messages
    raw: Mapping = field(default_factory=lambda: EMPTY)  # the merged cluster section, as crunch-run's ConfigData.Cluster

    @property
    def cloud_vms(self) -> CloudVMs:
        return self.containers.cloud_vms

    def tag(self, name: str) -> str:
        """A dispatcher tag key with the configured prefix, e.g. ``ArvadosInstanceType``."""
        return self.containers.cloud_vms.tag_key_prefix + name

    def types_by_price(self) -> list[InstanceType]:
        return sorted(self.instance_types.values(), key=lambda t: (t.price, -t.ram, -t.vcpus, t.name))


def _thaw(v):
    if isinstance(v, Mapping):
        return {k: _thaw(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_thaw(x) for x in v]
    return v


def freeze(v):
    """Deep-convert dicts to read-only mappings and lists to tuples."""
    if isinstance(v, Mapping):
        return MappingProxyType({k: freeze(x) for k, x in v.items()})
    if isinstance(v, (list, tuple)):
        return tuple(freeze(x) for x in v)
    return v


def thaw(v):
    """Inverse of :func:`freeze`: plain dicts and lists, for JSON."""
    return _thaw(v)


def replace(obj, **changes):
    """``dataclasses.replace`` re-exported so tests can tweak a loaded config."""
    return dataclasses.replace(obj, **changes)
