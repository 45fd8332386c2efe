"""A realistic cluster and Snapshot for the management API, metrics and admin CLI tests (and the bench)."""

from __future__ import annotations

from types import MappingProxyType

from actors.resources import Resources
from actors.snapshot import InstanceView, QueueEntryView, Snapshot
from conf.model import GPU, Cluster, InstanceType, freeze

GiB = 1 << 30
NOW = 1_700_000_000.0
TOKEN = "mgmt-token-abc123"

SMALL = InstanceType("small", "Standard_D2s_v3", 2, 8 * GiB, 16_000_000_000, 0, 0.096)
BIG = InstanceType("big", "Standard_E4s_v3", 4, 32 * GiB, 64_000_000_000, 50_000_000_000, 0.252)
GPU1 = InstanceType("gpu", "Standard_NC4as_T4_v3", 4, 28 * GiB, 176_000_000_000, 0, 0.526,
                    gpu=GPU("cuda", "12.0", "7.5", 1, 16 * GiB))
TYPES = {t.name: t for t in (SMALL, BIG, GPU1)}

CTR_RUNNING_1 = "zzzzz-dz642-running00000001"
CTR_RUNNING_2 = "zzzzz-dz642-running00000002"
CTR_QUEUED = "zzzzz-dz642-queued000000003"
CTR_GPU = "zzzzz-dz642-gpuqueued000004"


def cluster(token: str = TOKEN) -> Cluster:
    return Cluster(cluster_id="zzzzz", management_token=token, instance_types=MappingProxyType(TYPES),
                   dispatch_urls=("http://127.0.0.1:0",))


def _iv(instance, itype, state, behavior="run", running=(), last_busy=0.0, last="", probed=NOW - 5,
        address="10.1.2.3"):
    return InstanceView(instance=instance, address=address if instance else "", price=itype.price,
                        arvados_instance_type=itype.name, provider_instance_type=itype.provider_type,
                        last_container_uuid=last, last_busy=last_busy, running_container_uuids=tuple(running),
                        worker_state=state, idle_behavior=behavior, vcpus=itype.vcpus, ram=itype.ram,
                        probed=probed if instance else 0.0)


INSTANCES = (
    # deliberately out of order: the API sorts by instance, then type
    _iv("i-0003", SMALL, "running", running=(CTR_RUNNING_2, CTR_RUNNING_1), last_busy=NOW - 0.5,
        last=CTR_RUNNING_2, probed=NOW - 20, address="10.1.2.5"),
    _iv("i-0001", SMALL, "idle", last_busy=1_699_999_000.123456, last="zzzzz-dz642-finished0000009",
        probed=NOW - 2, address="10.1.2.3"),
    _iv("i-0005", BIG, "idle", behavior="hold", probed=NOW - 4, address="10.1.2.7"),
    _iv("i-0002", BIG, "booting", probed=NOW - 30, address="10.1.2.4"),
    _iv("i-0004", GPU1, "unknown", probed=NOW - 60, address="10.1.2.6"),
    _iv("i-0006", SMALL, "shutdown", probed=NOW - 10, address="10.1.2.8"),
    _iv("", SMALL, "booting"),  # a pending create
)


def _ctr(uuid, state, priority, vcpus, ram, gpu=None):
    rc = {"API": False, "ram": ram, "vcpus": vcpus, "keep_cache_ram": 0, "keep_cache_disk": 0,
          "gpu": gpu or {"stack": "", "driver_version": "", "hardware_target": [], "device_count": 0, "vram": 0}}
    return freeze({"uuid": uuid, "state": state, "priority": priority, "created_at": "2023-11-14T22:00:00Z",
                   "runtime_constraints": rc, "scheduling_parameters": {
                       "partitions": [], "preemptible": False, "max_run_time": 0, "supervisor": False},
                   "mounts": None, "command": None, "started_at": None})


QUEUE = (
    QueueEntryView(_ctr(CTR_RUNNING_1, "Running", 562948375092493200, 1, 2 * GiB), (SMALL, BIG),
                   Resources(1, 2 * GiB + (550 << 20), 1 << 30), NOW - 600.25, ""),
    QueueEntryView(_ctr(CTR_RUNNING_2, "Locked", 10, 2, 4 * GiB), (SMALL, BIG),
                   Resources(2, 4 * GiB + (550 << 20), 1 << 30), NOW - 300, ""),
    QueueEntryView(_ctr(CTR_QUEUED, "Queued", 5, 4, 16 * GiB), (BIG,),
                   Resources(4, 16 * GiB + (550 << 20), 1 << 30), NOW - 60, "waiting for new instance to be ready"),
    QueueEntryView(_ctr(CTR_GPU, "Queued", 1, 4, 8 * GiB, gpu={"stack": "cuda", "driver_version": "12.0",
                                                                 "hardware_target": ["7.5"], "device_count": 1,
                                                                 "vram": 8 * GiB}),
                   (GPU1,), Resources(4, 8 * GiB + (550 << 20), 1 << 30, 1, 8 * GiB), NOW - 30,
                   "waiting in queue at position 2"),
)


def snapshot() -> Snapshot:
    return Snapshot(
        taken_at=NOW, instances=INSTANCES, queue=QUEUE,
        runners=MappingProxyType({CTR_RUNNING_1: "i-0003", CTR_RUNNING_2: "i-0003"}),
        at_quota=True, max_concurrent_containers=42, containers_allocated_not_started=1,
        containers_not_allocated_over_quota=2, containers_longest_wait_time_seconds=60.0,
        last_503_time=NOW - 100, ready=True)


def big_snapshot(n_instances: int = 1000, n_queue: int = 10000) -> Snapshot:
    """Bench scale: n_instances workers (half running one container) and n_queue queue entries."""
    types = (SMALL, BIG, GPU1)
    instances, queue, runners = [], [], {}
    for i in range(n_instances):
        t = types[i % 3]
        running = (f"zzzzz-dz642-{i:015d}",) if i % 2 == 0 else ()
        if running:
            runners[running[0]] = f"i-{i:06d}"
        instances.append(_iv(f"i-{i:06d}", t, "running" if running else "idle", running=running,
                             last_busy=NOW - i, probed=NOW - (i % 17)))
    for j in range(n_queue):
        t = types[j % 3]
        uuid = f"zzzzz-dz642-{j:015d}"
        queue.append(QueueEntryView(_ctr(uuid, "Running" if uuid in runners else "Queued", n_queue - j,
                                         t.vcpus, t.ram // 2), (t,) + types[j % 3 + 1:],
                                    Resources(t.vcpus, t.ram // 2, 1 << 30), NOW - j, ""))
    return Snapshot(taken_at=NOW, instances=tuple(instances), queue=tuple(queue),
                    runners=MappingProxyType(runners), ready=True)
