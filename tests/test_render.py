"""actors.render: the scheduler's state as snapshot rows (pure; rows reused while unchanged)."""

from __future__ import annotations

import pytest

from actors import render
from actors.messages import Behavior, QueueEntry, State, WorkerView
from actors.resources import Resources
from tests.simcluster import instance_type

T1, T2 = instance_type(1), instance_type(2)
NOW = 5000.0


def view(iid="i-1", it=T1, state=State.RUNNING, behavior=Behavior.HOLD, running=("u1",)):
    return WorkerView(instance_id=iid, instance_type=it, state=state, idle_behavior=behavior,
                      address="10.0.0.1", provider_type=it.provider_type, running=running,
                      last_uuid="u1", busy=NOW - 5, appeared=NOW - 60, probed=NOW - 2)


def entry(uuid, state="Queued", priority=1, created_at=NOW - 100, types=(T1,)):
    return QueueEntry(uuid=uuid, state=state, priority=priority, container={"uuid": uuid},
                      instance_types=types, resources=Resources(1), first_seen_at=NOW - 50,
                      created_at=created_at)


def test_instance_row_copies_the_view():
    r = render.instance_row("i-1", view())
    assert (r.instance, r.address, r.price, r.arvados_instance_type, r.provider_instance_type) == (
        "i-1", "10.0.0.1", T1.price, T1.name, T1.provider_type)
    assert (r.worker_state, r.idle_behavior, r.running_container_uuids, r.last_container_uuid) == (
        "running", "hold", ("u1",), "u1")
    assert (r.last_busy, r.probed, r.vcpus, r.ram) == (NOW - 5, NOW - 2, T1.vcpus, T1.ram)


def test_pending_row():
    r = render.pending_row(T2)
    assert (r.instance, r.worker_state, r.idle_behavior, r.arvados_instance_type, r.price) == (
        "", "booting", "run", T2.name, T2.price)


def test_instance_rows_sorted_and_reused():
    a, b = view("i-2"), view("i-1", it=T2)
    rows, memo = render.instance_rows([("i-2", a), ("i-1", b)], [T1], {})
    assert [(r.instance, r.arvados_instance_type) for r in rows] == [("", T1.name), ("i-1", T2.name),
                                                                     ("i-2", T1.name)]
    again, _ = render.instance_rows([("i-2", a), ("i-1", view("i-1", it=T2))], [], memo)
    assert again[1] is rows[2]  # same view object: same row
    assert again[0] is not rows[1] and again[0] == rows[1]  # equal but new view: rebuilt


@pytest.mark.parametrize("entries,statuses,running,counts,longest", [
    ([], [], {}, {}, 0.0),
    ([entry("a"), entry("b", "Locked", created_at=NOW - 300)], ["s1", "s2"], {},
     {("Queued", T1.name): 1, ("Locked", T1.name): 1}, 300.0),
    # running, priority 0, finished or never created: not waiting
    ([entry("a", created_at=NOW - 999), entry("b", priority=0, created_at=NOW - 500),
      entry("c", "Running", created_at=NOW - 400), entry("d", created_at=0.0), entry("e", types=())],
     [""] * 5, {"a": None}, {("Queued", T1.name): 3, ("Running", T1.name): 1, ("Queued", ""): 1}, 100.0),
])
def test_queue_rows(entries, statuses, running, counts, longest):
    rows, got_counts, got_longest = render.queue_rows(entries, statuses, running, NOW, {})
    assert [(r.uuid, r.scheduling_status) for r in rows] == [(e.uuid, s) for e, s in zip(entries, statuses)]
    assert dict(got_counts) == counts and got_longest == longest


def test_queue_rows_reuse_and_prune():
    e = entry("a")
    memo: dict = {}
    first = render.queue_rows([e], ["s"], {}, NOW, memo)[0][0]
    assert render.queue_rows([e], ["s"], {}, NOW, memo)[0][0] is first
    assert render.queue_rows([e], ["t"], {}, NOW, memo)[0][0] is not first  # status changed
    memo.update({f"gone-{i}": None for i in range(1100)})
    render.queue_rows([e], ["t"], {}, NOW, memo)
    assert set(memo) == {"a"}
