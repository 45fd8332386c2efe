"""InstanceSetActor: the only actor that talks to the cloud driver.

It lists instances every SyncInterval (filtered by our InstanceSetID tag), and creates, destroys
and re-tags instances on request. Every cloud call runs on a bounded thread pool, so a create
that takes minutes (Azure) never blocks the mailbox; results come back as messages. Each kind of
call has its own threads (listing one, creates MaxConcurrentInstanceCreateOps, destroys and tag
updates their own), so a dozen destroys that take minutes never starve listing or creates; all
still share the MaxCloudOpsPerSecond slots.

Throttles, as Arvados applies them:
* MaxCloudOpsPerSecond: one shared slot per 1/N s for every call; a call whose slot is in the
  future waits in a queue here until its deadline (the actor never sleeps);
* a RateLimitError's earliest-retry time holds off further calls of that kind (create, list);
* MaxConcurrentInstanceCreateOps is enforced by the scheduler, which owns the pending creates.
"""

from __future__ import annotations

import heapq
import itertools
import logging
from concurrent.futures import ThreadPoolExecutor

from actors.base import TickedActor
from actors.messages import CreateFailure, InstanceInfo
from cloud.base import OpsLimiter, capacity_scope, is_quota_error, rate_limit_retry_at

log = logging.getLogger("dispatch.instanceset")

MAX_POOL = 256  # cloud-op threads at most, whatever MaxConcurrentInstanceCreateOps says


class InstanceSetActor(TickedActor):
    critical = True

    def __init__(self, *, instance_set, set_id: str, cluster, scheduler, ticker, first_now: float,
                 pool_size: int | None = None):
        super().__init__(ticker)
        self._set = instance_set
        self._cluster = cluster
        self._cfg = cluster.cloud_vms
        self._scheduler = scheduler
        self._filter = {cluster.tag("InstanceSetID"): set_id}
        self._limiter = OpsLimiter(self._cfg.max_cloud_ops_per_second)
        # each kind of call its own threads (started on demand), so slow destroys never starve
        # listing or creates; creates get room for all MaxConcurrentInstanceCreateOps allows
        creates = pool_size or max(1, min(MAX_POOL, self._cfg.max_concurrent_instance_create_ops or 16))
        self._pools = {op: ThreadPoolExecutor(max_workers=n, thread_name_prefix=f"cloud-{op.lower()}")
                       for op, n in (("List", 1), ("Create", creates), ("Destroy", 8), ("SetTags", 4))}
        self._queue: list = []  # (slot time, seq, op name, fn, args)
        self._seq = itertools.count()
        self._next_sync = first_now
        self._listing = False
        self._hold = {"create": 0.0, "list": 0.0}  # rate-limit holdoffs

    def next_wake(self) -> float:
        return self._next_sync

    def on_stop(self) -> None:
        super().on_stop()
        for pool in self._pools.values():
            pool.shutdown(wait=False, cancel_futures=True)

    # -- scheduling of cloud calls ------------------------------------------------------------------

    def _enqueue(self, now: float, op: str, fn, *args, not_before: float = 0.0) -> None:
        at = self._limiter.reserve(max(now, not_before))
        if at <= now:
            self._off_mailbox(fn, *args, pool=self._pools[op])
        else:
            heapq.heappush(self._queue, (at, next(self._seq), op, fn, args))
            self.wake_at(at)

    def tick(self, now: float) -> None:
        while self._queue and self._queue[0][0] <= now:
            _, _, op, fn, args = heapq.heappop(self._queue)
            self._off_mailbox(fn, *args, pool=self._pools[op])
        if not self._listing and now >= self._next_sync:
            if now < self._hold["list"]:
                self._next_sync = self._hold["list"]
            else:
                self._listing = True
                self._next_sync = now + self._cfg.sync_interval
                self._enqueue(now, "List", self._list, now)
        # while a listing is in flight its answer books the next one: an overdue deadline
        # booked now would wake this actor again and again for nothing
        when = [] if self._listing else [self._next_sync]
        if self._queue:
            when.append(self._queue[0][0])
        if when:
            self.wake_at(min(when))

    # -- requests from the scheduler and workers -------------------------------------------------------

    def create(self, req_id: str, it, tags: dict, init_command: str, public_key: str | None,
               now: float) -> None:
        # A create sent before the scheduler heard of a rate-limit holdoff waits it out here.
        self._enqueue(now, "Create", self._create, req_id, it, tags, init_command, public_key, now,
                      not_before=self._hold["create"])

    def destroy(self, handle, now: float) -> None:
        self._enqueue(now, "Destroy", self._destroy, handle)

    def set_tags(self, handle, tags: dict, now: float) -> None:
        self._enqueue(now, "SetTags", self._set_tags, handle, tags)

    # -- cloud calls (pool threads; only tell results back) ---------------------------------------------

    def _list(self, started: float) -> None:
        try:
            listed = self._set.instances(self._filter)
            infos = tuple(sorted((InstanceInfo.of(i) for i in listed), key=lambda i: i.id))
        except Exception as e:
            self._self.listed.defer(None, started, self._classify(e))
            return
        self._self.listed.defer(infos, started, None)

    def listed(self, infos, started: float, failure: CreateFailure | None) -> None:
        self._listing = False
        self.wake_at(self._next_sync)
        if failure is not None:
            log.warning("sync failed", extra={"error": failure.message})
            if failure.retry_at:
                self._suspend("list", failure.retry_at)
            return
        self._scheduler.instances_listed(infos, started)

    def _create(self, req_id, it, tags, init_command, public_key, now) -> None:
        try:
            inst = self._set.create(it, self._cfg.image_id, tags, init_command, public_key)
        except Exception as e:
            failure = self._classify(e, it)
            self._self.created.defer(req_id, it, None, failure, now)
            return
        self._self.created.defer(req_id, it, InstanceInfo.of(inst), None, now)

    def created(self, req_id, it, info, failure, now) -> None:
        if failure is not None:
            if failure.retry_at:
                self._suspend("create", failure.retry_at)
            self._scheduler.create_failed(req_id, it, failure, now)
        else:
            self._scheduler.instance_created(req_id, it, info, now)

    def _destroy(self, handle) -> None:
        try:
            handle.destroy()
        except Exception as e:
            log.warning("shutdown failed", extra={"Instance": getattr(handle, "id", "?"), "error": str(e)})

    def _set_tags(self, handle, tags) -> None:
        try:
            handle.set_tags(tags)
        except Exception as e:
            log.warning("error updating tags", extra={"Instance": getattr(handle, "id", "?"), "error": str(e)})

    # -- errors ----------------------------------------------------------------------------------

    def _classify(self, e: Exception, it=None) -> CreateFailure:
        group = self._set.instance_quota_group(it) if it is not None else ""
        return CreateFailure(message=f"{type(e).__name__}: {e}" if not str(e) else str(e),
                             quota=is_quota_error(e),
                             capacity_scope=capacity_scope(e, it, group) if it is not None else None,
                             retry_at=rate_limit_retry_at(e))

    def _suspend(self, kind: str, until: float) -> None:
        if until > self._hold[kind]:
            self._hold[kind] = until
            log.info("suspending remote calls due to rate-limit error",
                     extra={"CallType": kind, "ResumeAt": until})
