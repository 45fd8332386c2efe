"""actors.resources: the fit/take rule (Arvados InstanceResources.Accommodates/Sub), as a table,
and proof that the planner applies this very rule."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors import planner
from actors.messages import Behavior, QueueEntry, State
from actors.planner import Limits, Slot, plan
from actors.resources import Resources, fits, take, type_resources
from conf.model import GPU, InstanceType

GiB = 1 << 30


def itype(name, price, ram, vcpus, gpu=None):
    return InstanceType(name=name, provider_type=name, vcpus=vcpus, ram=ram, included_scratch=0,
                        added_scratch=0, price=price, **({"gpu": gpu} if gpu else {}))


@pytest.mark.parametrize("avail,shared,need,want_fits,shared_after", [
    (2, False, 0, True, True),
    (2, False, 1, True, False),
    (2, True, 0, True, True),
    (2, True, 1, True, True),
    (2, False, 2, True, False),
    (2, True, 2, False, True),  # the shared VCPU is taken: only 1 left for VCPU-hungry containers
    (1, True, 1, False, True),
    (1, True, 0, True, True),  # more 0-VCPU containers may share it
    (0, True, 0, False, True),  # no VCPU left: nothing fits
    (0, False, 0, False, True),
])
def test_instance_resources(avail, shared, need, want_fits, shared_after):
    a, n = Resources(vcpus=avail), Resources(vcpus=need)
    assert fits(a, n, shared) is want_fits
    left, now_shared = take(a, n, shared)
    assert now_shared is shared_after and left.vcpus == avail - need


def test_fits_every_dimension():
    avail = Resources(4, 8 * GiB, 100 * GiB, 2, 16 * GiB)
    assert fits(avail, avail, False)
    for field in ("vcpus", "ram", "scratch", "gpus", "gpu_vram"):
        need = avail._replace(**{field: getattr(avail, field) + 1})
        assert not fits(avail, need, False), field
    left, _ = take(avail, Resources(1, GiB, GiB, 1, GiB), False)
    assert left == Resources(3, 7 * GiB, 99 * GiB, 1, 15 * GiB)


def test_type_resources():
    it = itype("g", 1.0, 8 * GiB, 4, gpu=GPU("cuda", "12.0", "9.0", 2, 24 * GiB))
    it = InstanceType(**{**it.__dict__, "included_scratch": 10 * GiB, "added_scratch": 5 * GiB})
    assert type_resources(it) == Resources(4, 8 * GiB, 15 * GiB, 2, 24 * GiB)


@settings(max_examples=200, deadline=None)
@given(vcpus=st.integers(0, 8), shared=st.booleans(), need=st.integers(0, 8),
       ram=st.integers(0, 10), need_ram=st.integers(0, 10))
def test_fits_never_overcommits(vcpus, shared, need, ram, need_ram):
    avail, want = Resources(vcpus=vcpus, ram=ram), Resources(vcpus=need, ram=need_ram)
    if fits(avail, want, shared):
        left, now_shared = take(avail, want, shared)
        assert left.ram >= 0 and left.vcpus >= 0
        assert left.vcpus >= (1 if now_shared and need > 0 else 0)  # a VCPU stays for the sharers
        assert now_shared == (shared or need == 0)


def _entry(i: int, it: InstanceType, need: Resources) -> QueueEntry:
    uuid = f"zzzzz-dz642-{i:015d}"
    return QueueEntry(uuid=uuid, state="Locked", priority=10, container={"uuid": uuid},
                      instance_types=(it,), resources=need, first_seen_at=float(i))


@pytest.mark.parametrize("vcpus,needs", [
    (4, [1, 1, 1, 1, 1]), (2, [0, 0, 2]), (2, [0, 1, 1]), (1, [0, 0, 0]), (3, [2, 2]), (2, [1, 0, 1]),
])
def test_the_planner_starts_exactly_what_fits_and_take_allow(vcpus, needs):
    """The planner packs an idle instance as fits/take say, container by container."""
    it = itype("t", 1.0, 64 * GiB, vcpus)
    queue = [_entry(i, it, Resources(vcpus=n, ram=GiB)) for i, n in enumerate(needs)]
    avail, shared, want = type_resources(it), False, []
    for e in queue:
        if fits(avail, e.resources, shared):
            avail, shared = take(avail, e.resources, shared)
            want.append(e.uuid)
    limits = Limits(max_containers=0, max_supervisors=0, max_per_instance=0, max_instances=1,
                    max_concurrent_creates=0, n_workers=1, n_creating=0, at_quota=False,
                    create_throttled=True)
    p = plan(queue, {}, [Slot("i-1", it, State.IDLE, Behavior.RUN)], limits)
    assert [u for u, _ in p.starts] == want


def test_the_planner_calls_the_rule(monkeypatch):
    """No private copy: replacing resources.fits in the planner changes what it does."""
    it = itype("t", 1.0, 64 * GiB, 4)
    limits = Limits(max_containers=0, max_supervisors=0, max_per_instance=0, max_instances=1,
                    max_concurrent_creates=0, n_workers=1, n_creating=0, at_quota=False,
                    create_throttled=True)
    queue = [_entry(0, it, Resources(vcpus=1))]
    slots = [Slot("i-1", it, State.IDLE, Behavior.RUN)]
    assert plan(queue, {}, slots, limits).starts == [(queue[0].uuid, "i-1")]
    monkeypatch.setattr(planner, "fits", lambda avail, need, shared: False)
    assert plan(queue, {}, slots, limits).starts == []
