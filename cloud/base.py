"""The cloud driver contract, its error protocol, and the wrappers put around every driver.

Mirrors Arvados ``lib/cloud/interfaces.go`` and ``lib/dispatchcloud/driver.go``:

* a driver is an :class:`InstanceSet` factory; an InstanceSet creates and lists :class:`Instance` s;
* an :class:`Executor` runs shell commands on one instance (SSH in production, direct calls in
  the stub cloud);
* errors say what the dispatcher should do through three independent protocols
  (:func:`rate_limit_retry_at`, :func:`is_quota_error`, :func:`capacity_scope`), so one error can be
  a quota error and a rate-limit error at once;
* :func:`wrap` stacks instrumentation, the shared ops/second limiter, default resource tags and tag
  filtering on top of the driver, exactly in the Go order.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from conf.model import InstanceType

Tags = Mapping[str, str]

# ---------------------------------------------------------------------------------------------
# Errors


class CloudError(Exception):
    """Any error a driver raises. Plain CloudErrors are retried by the caller's normal loop."""


class NotSupported(CloudError):
    """The driver has no mechanism for this (Go's ``cloud.ErrNotImplemented``)."""


class RateLimitError(CloudError):
    """The cloud refuses calls until ``earliest_retry`` (unix seconds)."""

    def __init__(self, message: str, earliest_retry: float):
        super().__init__(message)
        self.earliest_retry = earliest_retry


class QuotaError(CloudError):
    """The account cannot have more instances until some are destroyed."""

    is_quota_error = True


class CapacityError(CloudError):
    """The provider has no capacity right now: for all types, one quota group, or one type."""

    def __init__(self, message: str, *, instance_type_specific: bool = False,
                 quota_group_specific: bool = False):
        super().__init__(message)
        self.instance_type_specific = instance_type_specific and not quota_group_specific
        self.quota_group_specific = quota_group_specific


def rate_limit_retry_at(err: BaseException) -> float | None:
    """Unix time before which calls of this kind must not be retried, or None."""
    t = getattr(err, "earliest_retry", None)
    return float(t) if t is not None else None


def is_quota_error(err: BaseException) -> bool:
    return bool(getattr(err, "is_quota_error", False))


def capacity_scope(err: BaseException, it: InstanceType, quota_group: str) -> tuple | None:
    """The capacity key an error blocks, as a tagged tuple (never Go's ambiguous "" key).

    ``("all",)``, ``("group", g)`` or ``("type", provider_type, preemptible)``; None if the error
    is not a capacity error.
    """
    if not isinstance(err, CapacityError):
        return None
    if err.quota_group_specific:
        return ("group", quota_group)
    if err.instance_type_specific:
        return ("type", it.provider_type, it.preemptible)
    return ("all",)


def capacity_keys(it: InstanceType, quota_group: str) -> tuple[tuple, ...]:
    """Every capacity key that, when blocked, blocks creating ``it``."""
    return (("all",), ("group", quota_group), ("type", it.provider_type, it.preemptible))


# ---------------------------------------------------------------------------------------------
# Contracts


@dataclass(frozen=True)
class InstancePrice:
    start_time: float  # unix seconds
    price: float

    def arvados_json(self) -> dict:
        from datetime import datetime, timezone
        ts = datetime.fromtimestamp(self.start_time, timezone.utc).isoformat().replace("+00:00", "Z")
        return {"StartTime": ts, "Price": self.price}


@runtime_checkable
class Instance(Protocol):
    """One cloud VM as the provider reports it. A snapshot: ``tags`` may be stale after set_tags."""

    @property
    def id(self) -> str: ...

    @property
    def address(self) -> str:
        """Host or IP, optionally ``host:port``; "" while unknown."""

    @property
    def remote_user(self) -> str: ...

    @property
    def provider_type(self) -> str: ...

    @property
    def tags(self) -> Tags: ...

    def set_tags(self, tags: Tags) -> None:
        """Replace the instance's tags with ``tags`` (callers pass the full merged set)."""

    def destroy(self) -> None: ...

    def verify_host_key(self, host_key, transport) -> None:
        """Raise unless ``host_key`` is this instance's; raise NotSupported if there is no way."""

    def price_history(self, it: InstanceType) -> list[InstancePrice]: ...


@runtime_checkable
class InstanceSet(Protocol):
    def create(self, it: InstanceType, image_id: str, tags: Tags, init_command: str,
               public_key: str | None) -> Instance: ...

    def instances(self, tags: Tags) -> list[Instance]:
        """All instances, booting and shutting-down ones included; filtering by tags is optional."""

    def instance_quota_group(self, it: InstanceType) -> str: ...

    def stop(self) -> None: ...


@dataclass(frozen=True)
class ExecResult:
    stdout: bytes
    stderr: bytes
    exit_status: int

    @property
    def ok(self) -> bool:
        return self.exit_status == 0


def split_host_port(address: str) -> tuple[str, str]:
    """``("host", "port")`` from an :attr:`Instance.address`: ``host``, ``host:port``,
    ``[v6]:port`` or a bare IPv6 address."""
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        return host, rest[1:] if rest.startswith(":") else ""
    if address.count(":") == 1:
        host, _, port = address.partition(":")
        return host, port
    return address, ""


def join_host_port(host: str, port: str) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ExecutorError(Exception):
    """The command could not be run at all (no address, refused, auth, host key, timeout)."""


class NoAddress(ExecutorError):
    def __init__(self):
        super().__init__("instance has no address")


class HostKeyError(ExecutorError):
    """The host did not prove its identity; nothing carrying a token was sent."""


@runtime_checkable
class Executor(Protocol):
    """Runs commands on one instance. One per worker; ``execute`` is called from one thread."""

    def execute(self, command: str, stdin: bytes = b"", timeout: float | None = None) -> ExecResult:
        """Run ``command``; a non-zero exit is an ExecResult, a transport failure ExecutorError.
        ``timeout``: seconds for this command instead of the executor's default (None)."""

    def set_target(self, instance: Instance) -> None:
        """Use this (fresher) instance snapshot from the next connection on."""

    def close(self) -> None: ...


# A driver: (driver_parameters, instance_set_id, logger) -> InstanceSet
DriverFactory = Callable[..., InstanceSet]


# ---------------------------------------------------------------------------------------------
# Wrapper stack (innermost first): instrumented, rate-limited, default tags, filtering.

OPERATIONS = ("Create", "List", "Destroy", "SetTags")


class _InstanceProxy:
    """An Instance whose set_tags/destroy go through a wrapper's ``_call``."""

    def __init__(self, inner: Instance, call: Callable):
        self._inner = inner
        self._call = call

    def __getattr__(self, name):
        return getattr(self._inner, name)

    @property
    def id(self):
        return self._inner.id

    @property
    def address(self):
        return self._inner.address

    @property
    def remote_user(self):
        return self._inner.remote_user

    @property
    def provider_type(self):
        return self._inner.provider_type

    @property
    def tags(self):
        return self._inner.tags

    @property
    def unwrapped(self) -> Instance:
        return getattr(self._inner, "unwrapped", self._inner)

    def set_tags(self, tags):
        return self._call("SetTags", self._inner.set_tags, tags)

    def destroy(self):
        return self._call("Destroy", self._inner.destroy)

    def verify_host_key(self, host_key, transport):
        return self._inner.verify_host_key(host_key, transport)

    def price_history(self, it):
        return self._inner.price_history(it)

    def __repr__(self):
        return f"<{self._inner.id}>"


class _CallingSet:
    """Base for wrappers that intercept every cloud call through ``_call(op, fn, *args)``."""

    def __init__(self, inner: InstanceSet):
        self._inner = inner

    def _call(self, op, fn, *args):
        return fn(*args)

    def create(self, it, image_id, tags, init_command, public_key):
        inst = self._call("Create", self._inner.create, it, image_id, tags, init_command, public_key)
        return _InstanceProxy(inst, self._call)

    def instances(self, tags):
        return [_InstanceProxy(i, self._call) for i in self._call("List", self._inner.instances, tags)]

    def instance_quota_group(self, it):
        return self._inner.instance_quota_group(it)

    def stop(self):
        self._inner.stop()


class InstrumentedInstanceSet(_CallingSet):
    """Counts every cloud call in ``arvados_dispatchcloud_driver_operations{operation,error}``."""

    def __init__(self, inner: InstanceSet, counter):
        super().__init__(inner)
        self._counter = counter
        for op in OPERATIONS:
            for e in ("0", "1"):
                counter.labels(operation=op, error=e)

    def _call(self, op, fn, *args):
        try:
            result = fn(*args)
        except BaseException:
            self._counter.labels(operation=op, error="1").inc()
            raise
        self._counter.labels(operation=op, error="0").inc()
        return result


class OpsLimiter:
    """One shared slot every ``1/ops_per_second`` seconds for all cloud calls.

    ``reserve(now)`` hands out the next slot and says when it is; callers that may block sleep
    until then (:class:`RateLimitedInstanceSet`), actors turn it into a deadline instead.
    """

    def __init__(self, ops_per_second: float):
        self.period = 1.0 / ops_per_second if ops_per_second > 0 else 0.0
        self._next = 0.0
        self._lock = threading.Lock()

    def reserve(self, now: float) -> float:
        if not self.period:
            return now
        with self._lock:
            at = max(now, self._next)
            self._next = at + self.period
            return at


class RateLimitedInstanceSet(_CallingSet):
    """Every Create, List, Destroy and SetTags waits for a slot of the shared :class:`OpsLimiter`."""

    def __init__(self, inner: InstanceSet, limiter: OpsLimiter,
                 now: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep):
        super().__init__(inner)
        self._limiter = limiter
        self._now = now
        self._sleep = sleep

    def _call(self, op, fn, *args):
        now = self._now()
        at = self._limiter.reserve(now)
        if at > now:
            self._sleep(at - now)
        return fn(*args)


class DefaultTaggingInstanceSet:
    """Merges ``CloudVMs.ResourceTags`` under the caller's tags on Create (the caller wins)."""

    def __init__(self, inner: InstanceSet, default_tags: Tags):
        self._inner = inner
        self._defaults = dict(default_tags)

    def create(self, it, image_id, tags, init_command, public_key):
        return self._inner.create(it, image_id, {**self._defaults, **tags}, init_command, public_key)

    def instances(self, tags):
        return self._inner.instances(tags)

    def instance_quota_group(self, it):
        return self._inner.instance_quota_group(it)

    def stop(self):
        self._inner.stop()


class FilteringInstanceSet(DefaultTaggingInstanceSet):
    """Drops listed instances that lack any requested tag, so drivers need not filter."""

    def __init__(self, inner: InstanceSet, logger=None):
        super().__init__(inner, {})
        self._logger = logger

    def instances(self, tags):
        listed = self._inner.instances(tags)
        keep = [i for i in listed if all(i.tags.get(k) == v for k, v in tags.items())]
        if self._logger is not None and len(keep) != len(listed):
            self._logger.debug("filtered instance list", extra={"returning": len(keep),
                                                                "skipped": len(listed) - len(keep)})
        return keep


def wrap(driver_set: InstanceSet, *, resource_tags: Tags, ops_counter=None,
         limiter: OpsLimiter | None = None, logger=None,
         now: Callable[[], float] = time.time,
         sleep: Callable[[float], None] = time.sleep) -> InstanceSet:
    """The Arvados wrapper stack around a driver's InstanceSet.

    ``limiter`` is None when the caller enforces MaxCloudOpsPerSecond itself (the
    InstanceSetActor does, with deadlines, so it never sleeps in a mailbox).
    """
    s: InstanceSet = driver_set
    if ops_counter is not None:
        s = InstrumentedInstanceSet(s, ops_counter)
    if limiter is not None and limiter.period:
        s = RateLimitedInstanceSet(s, limiter, now, sleep)
    s = DefaultTaggingInstanceSet(s, resource_tags)
    return FilteringInstanceSet(s, logger)
