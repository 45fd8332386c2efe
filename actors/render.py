"""The scheduler's state rendered as the rows of a :class:`actors.snapshot.Snapshot` (pure).

Rows are reused while their source is the same object (a worker's view, a queue entry with the
same status): at 1,000 workers and 10,000 queued containers most rows of a snapshot are the
previous snapshot's, and building them again would cost more than the scheduling pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from types import MappingProxyType

from actors.messages import Behavior, QueueEntry, State, WorkerView
from actors.snapshot import InstanceView, QueueEntryView
from conf.model import InstanceType

WAITING = ("Queued", "Locked")


def instance_row(instance_id: str, v: WorkerView) -> InstanceView:
    it = v.instance_type
    return InstanceView(
        instance=instance_id, address=v.address, price=it.price if v.price is None else v.price,
        arvados_instance_type=it.name, provider_instance_type=v.provider_type,
        last_container_uuid=v.last_uuid, last_busy=v.busy, running_container_uuids=v.running, worker_state=str(v.state),
        idle_behavior=str(v.idle_behavior), vcpus=it.vcpus, ram=it.ram, probed=v.probed)


def pending_row(it: InstanceType) -> InstanceView:
    """A create still in flight: no instance id yet."""
    return InstanceView(
        instance="", address="", price=it.price, arvados_instance_type=it.name,
        provider_instance_type=it.provider_type, last_container_uuid="", last_busy=0.0,
        running_container_uuids=(), worker_state=str(State.BOOTING), idle_behavior=str(Behavior.RUN),
        vcpus=it.vcpus, ram=it.ram)


def instance_rows(views: Iterable[tuple[str, WorkerView]], pending: Iterable[InstanceType],
                  memo: Mapping[str, tuple[WorkerView, InstanceView]]
                  ) -> tuple[list[InstanceView], dict[str, tuple[WorkerView, InstanceView]]]:
    """Every instance's row, sorted by (instance id, type); and the memo for next time."""
    rows, new_memo = [], {}
    for iid, v in views:
        hit = memo.get(iid)
        row = hit[1] if hit is not None and hit[0] is v else instance_row(iid, v)
        new_memo[iid] = (v, row)
        rows.append(row)
    rows.extend(pending_row(it) for it in pending)
    rows.sort(key=lambda r: (r.instance, r.arvados_instance_type))
    return rows, new_memo


def queue_rows(order: Sequence[QueueEntry], statuses: Sequence[str], running: Mapping, now: float,
               memo: MutableMapping[str, tuple]) -> tuple[tuple[QueueEntryView, ...], Mapping, float]:
    """The queue's rows in scheduling order, the entry counts by (state, first eligible type),
    and the longest wait of a container not yet running (``memo`` is updated in place)."""
    out, counts, longest = [], {}, 0.0
    for e, st in zip(order, statuses):
        hit = memo.get(e.uuid)
        if hit is not None and hit[0] is e and hit[1] == st:
            qv = hit[2]
        else:
            qv = QueueEntryView(e.container, e.instance_types, e.resources, e.first_seen_at, st)
            memo[e.uuid] = (e, st, qv)
        out.append(qv)
        k = (e.state, e.instance_types[0].name if e.instance_types else "")
        counts[k] = counts.get(k, 0) + 1
        if e.priority > 0 and e.state in WAITING and e.uuid not in running and e.created_at:
            longest = max(longest, now - e.created_at)
    if len(memo) > 2 * len(order) + 1000:
        live = {e.uuid for e in order}
        for u in [u for u in memo if u not in live]:
            memo.pop(u, None)
    return tuple(out), MappingProxyType(counts), longest
