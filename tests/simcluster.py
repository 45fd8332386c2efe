"""Test clusters for actor-level simulations (built directly, no YAML)."""

from __future__ import annotations

from dataclasses import replace

from conf.model import CloudVMs, Cluster, Containers, InstanceType, freeze

GiB = 1 << 30


def instance_type(i: int, **kw) -> InstanceType:
    """Arvados' test fixture: type<i> with i VCPUs, 1.1*i GiB, i GiB scratch, $0.123*i."""
    return InstanceType(name=f"type{i}", provider_type=f"providertype{i}", vcpus=i,
                        ram=(i * GiB) * 11 // 10, included_scratch=i * GiB, added_scratch=0,
                        price=i * 0.123, **kw)


def cluster(types=(1, 2, 4, 8), driver_parameters=None, containers=None, **vms) -> Cluster:
    cv = dict(driver="stub", poll_interval=5.0, probe_interval=5.0, sync_interval=10.0,
              timeout_idle=60.0, timeout_booting=120.0, timeout_probe=120.0, timeout_shutdown=10.0,
              timeout_signal=5.0, timeout_term=60.0, timeout_stale_run_lock=10.0,
              boot_probe_command="true", max_cloud_ops_per_second=0,
              max_concurrent_instance_create_ops=0, max_instances=20, supervisor_fraction=0.5,
              driver_parameters=freeze(driver_parameters or {"BootTime": "10s", "BootTimeJitter": "0s",
                                                             "ContainerRunTime": "30s"}))
    cv.update(vms)
    c = dict(cloud_vms=CloudVMs(**cv), reserve_extra_ram=0, local_keep_blob_buffers_per_vcpu=0,
             stale_lock_timeout=60.0, runtime_engine="stub", crunch_run_command="crunch-run",
             max_dispatch_attempts=10)
    c.update(containers or {})
    its = [t if isinstance(t, InstanceType) else instance_type(t) for t in types]
    return Cluster(cluster_id="zzzzz", system_root_token="systemroottoken" + "x" * 20,
                   management_token="mgmttoken" + "y" * 24, controller_url="https://127.0.0.1:1",
                   containers=Containers(**c), instance_types=freeze({t.name: t for t in its}))


def with_vms(c: Cluster, **vms) -> Cluster:
    return replace(c, containers=replace(c.containers, cloud_vms=replace(c.cloud_vms, **vms)))
