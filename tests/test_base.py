"""The driver contract's error protocol and the wrapper stack Arvados puts around every driver."""

from __future__ import annotations

import prometheus_client
import pytest

from cloud.base import (CapacityError, CloudError, OpsLimiter, QuotaError, RateLimitError,
                        capacity_keys, capacity_scope, is_quota_error, rate_limit_retry_at, wrap)
from tests.simcluster import instance_type


class FakeInstance:
    def __init__(self, iid, tags):
        self.id, self.address, self.remote_user, self.provider_type = iid, "10.9.9.9", "root", "pt"
        self.tags = dict(tags)
        self.destroyed = False

    def set_tags(self, tags):
        self.tags = dict(tags)

    def destroy(self):
        self.destroyed = True

    def verify_host_key(self, key, transport):
        return None

    def price_history(self, it):
        return []


class FakeSet:
    def __init__(self, fail: Exception | None = None):
        self.made: list[FakeInstance] = []
        self.fail = fail

    def create(self, it, image_id, tags, init_command, public_key):
        if self.fail:
            raise self.fail
        inst = FakeInstance(f"i-{len(self.made)}", tags)
        self.made.append(inst)
        return inst

    def instances(self, tags):
        return list(self.made)

    def instance_quota_group(self, it):
        return it.provider_type[:1]

    def stop(self):
        pass


def counter():
    return prometheus_client.Counter("driver_operations", "ops", ["operation", "error"],
                                     registry=prometheus_client.CollectorRegistry())


def value(c, op, err):
    return c.labels(operation=op, error=err)._value.get()


def test_default_tags_merge_under_callers_tags_and_filter_drops_foreign_instances():
    inner = FakeSet()
    s = wrap(inner, resource_tags={"team": "default", "cost": "a"})
    s.create(instance_type(1), "img", {"team": "mine", "ArvadosInstanceSetID": "me"}, "init", None)
    inner.made.append(FakeInstance("foreign", {"ArvadosInstanceSetID": "someone-else"}))
    inner.made.append(FakeInstance("untagged", {}))
    listed = s.instances({"ArvadosInstanceSetID": "me"})
    assert [i.id for i in listed] == ["i-0"]
    assert listed[0].tags == {"team": "mine", "cost": "a", "ArvadosInstanceSetID": "me"}


def test_instrumented_counts_every_operation_with_error_label():
    c = counter()
    inner = FakeSet()
    s = wrap(inner, resource_tags={}, ops_counter=c)
    # all eight series exist at zero before any call
    assert all(value(c, op, e) == 0 for op in ("Create", "List", "Destroy", "SetTags") for e in ("0", "1"))
    inst = s.create(instance_type(1), "img", {}, "", None)
    s.instances({})
    inst.set_tags({"a": "b"})
    inst.destroy()
    assert inner.made[0].destroyed and inner.made[0].tags == {"a": "b"}
    assert [value(c, op, "0") for op in ("Create", "List", "Destroy", "SetTags")] == [1, 1, 1, 1]
    inner.fail = QuotaError("no more")
    with pytest.raises(QuotaError):
        s.create(instance_type(1), "img", {}, "", None)
    assert value(c, "Create", "1") == 1


def test_rate_limited_stack_spaces_calls_on_one_shared_limiter():
    clock = {"t": 100.0}
    slept = []

    def sleep(d):
        slept.append(round(d, 6))
        clock["t"] += d

    s = wrap(FakeSet(), resource_tags={}, limiter=OpsLimiter(4), now=lambda: clock["t"], sleep=sleep)
    inst = s.create(instance_type(1), "img", {}, "", None)  # slot at 100.0
    s.instances({})  # 100.25
    inst.destroy()  # 100.5
    assert slept == [0.25, 0.25]
    assert clock["t"] == pytest.approx(100.5)


def test_ops_limiter_reserves_consecutive_slots_and_zero_means_unlimited():
    lim = OpsLimiter(2)
    assert [lim.reserve(10.0) for _ in range(3)] == [10.0, 10.5, 11.0]
    assert lim.reserve(20.0) == 20.0
    assert OpsLimiter(0).reserve(5.0) == 5.0


def test_error_protocols_are_independent():
    class Both(QuotaError, RateLimitError):
        def __init__(self):
            RateLimitError.__init__(self, "slow down and no quota", 123.0)

    e = Both()
    assert is_quota_error(e) and rate_limit_retry_at(e) == 123.0
    assert capacity_scope(e, instance_type(1), "p") is None
    plain = CloudError("boom")
    assert not is_quota_error(plain) and rate_limit_retry_at(plain) is None


def test_capacity_scope_keys_are_tagged_tuples():
    it = instance_type(4)
    assert capacity_scope(CapacityError("x"), it, "p") == ("all",)
    assert capacity_scope(CapacityError("x", quota_group_specific=True), it, "p") == ("group", "p")
    assert capacity_scope(CapacityError("x", instance_type_specific=True), it, "p") == (
        "type", "providertype4", False)
    # a quota-group-specific error is never also type-specific
    assert not CapacityError("x", instance_type_specific=True, quota_group_specific=True).instance_type_specific
    # every key that can block a type, and Go's ambiguous "" is not among them
    assert capacity_keys(it, "") == (("all",), ("group", ""), ("type", "providertype4", False))
