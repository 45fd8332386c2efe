"""QueueActor: the dispatcher's cache of the containers it cares about.

Every PollInterval it asks the container API for (1) containers locked by us, (2) Queued
containers with priority > 0, highest first, and (3) any cached container the first two no longer
return, so nothing is silently lost. A poll runs in a helper thread, so lock/unlock/cancel
requests from the scheduler never wait behind a slow listing; a change we make ourselves while a
poll is in flight is never overwritten by that (older) poll's result (Arvados' ``dontupdate``).
The next poll starts max(PollInterval, the last poll's duration) after it ended, as in Go, so an
overloaded API server gets room to recover.

Lock, unlock, cancel (and the cancel of unsatisfiable containers) run on a small pool of threads
and their results come back as ``op_done`` messages: a container API that hangs or retries for
minutes never stalls this actor's mailbox. Neither the poll thread nor the pool touch actor
state; what they need arrives as arguments. The API's last 503 reaches the scheduler as an
``api_503`` message.

The scheduler hears about changes as ``queue_update(changed, removed, updated_at)`` diffs, not as
whole copies of a 10,000-entry queue.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime

from actors.base import TickedActor
from actors.messages import QueueEntry

log = logging.getLogger("dispatch.queue")

SELECT = ["uuid", "state", "priority", "runtime_constraints", "container_image",
          "scheduling_parameters", "created_at", "locked_by_uuid"]
QUEUED_TARGET = 100  # like Arvados: stop listing Queued pages once this many non-supervisors
PAGE = 1000
MISSING_BATCH = 20
MOUNTS_BATCH = 50  # containers whose mounts one list call fetches (50 uuids: a POST-as-GET)
MOUNTS_PARALLEL = 4  # mounts list calls in flight at once during a poll
FINAL = ("Complete", "Cancelled")
# A container UUID goes into URLs and crunch-run command lines: anything else is refused at the door.
UUID_RE = re.compile(r"[a-z0-9]{5}-dz642-[a-z0-9]{15}")


def valid_uuid(uuid) -> bool:
    return isinstance(uuid, str) and UUID_RE.fullmatch(uuid) is not None
# lock/unlock/cancel calls in flight at most; how many actually go at once is the API client's
# RequestLimiter's (16 with Arvados' default API.MaxConcurrentRequests, halved by 503s)
OP_THREADS = 32


def parse_time(v) -> float:
    """RFC 3339 (nanosecond precision allowed) -> unix seconds; 0.0 for empty/None."""
    if not v:
        return 0.0
    if isinstance(v, (int, float)):
        return float(v)
    s = str(v).replace("Z", "+00:00")
    if "." in s:
        head, rest = s.split(".", 1)
        digits = "".join(c for c in rest if c.isdigit())
        tz = rest[len(digits):]
        s = f"{head}.{digits[:6]}{tz}"
    try:
        return datetime.fromisoformat(s).timestamp()
    except ValueError:
        return 0.0


def fetch_mounts(client, uuids: list[str]) -> dict[str, Mapping]:
    """uuid -> mounts for containers new to the cache. Go's addEnt GETs each one
    (select=["mounts"]); here one list call by uuid (select uuid and mounts, the same field) covers
    MOUNTS_BATCH of them, MOUNTS_PARALLEL calls at a time. One GET per container cost the API
    server and the dispatcher a request each: 1,000 new containers made a poll take 1.6-2 s on a
    2-core machine before any of them could be locked. A container the answer leaves out (deleted
    meanwhile) is left for the next poll; a batch that fails fails the poll (nothing of it is
    applied): skipping its containers would leave Running ones out of the queue, and "not in
    queue" kills them (after a restart every container is new here)."""
    def one(batch: list[str]) -> dict[str, Mapping]:
        try:
            got = client.list_containers(filters=[["uuid", "in", batch]], select=["uuid", "mounts"],
                                         limit=len(batch), count="none")
        except Exception as e:
            log.warning("error getting mounts", extra={"ContainerUUID": batch[0], "N": len(batch),
                                                       "error": str(e)})
            raise
        want = set(batch)
        return {c["uuid"]: c.get("mounts") or {} for c in got
                if isinstance(c, dict) and c.get("uuid") in want}
    batches = [uuids[i:i + MOUNTS_BATCH] for i in range(0, len(uuids), MOUNTS_BATCH)]
    if len(batches) <= 1:
        got = [one(b) for b in batches]
    else:
        with ThreadPoolExecutor(min(MOUNTS_PARALLEL, len(batches)), thread_name_prefix="queue-mounts") as ex:
            got = list(ex.map(one, batches))
    return {u: m for part in got for u, m in part.items()}


@dataclass(frozen=True)
class PollResult:
    started_at: float
    containers: tuple  # dicts, as returned by the API
    mounts: Mapping  # uuid -> mounts for containers new to the cache
    deleted: tuple  # uuids the controller no longer has
    error: str = ""
    ended_at: float = 0.0
    me: str = ""  # our token's uuid, learnt by the first poll
    last_503: float = 0.0


class QueueActor(TickedActor):
    critical = True

    def __init__(self, *, client, chooser, scheduler, ticker, cluster, first_now: float):
        super().__init__(ticker)
        self._client = client
        self._chooser = chooser
        self._scheduler = scheduler
        self._cluster = cluster
        self._poll_interval = cluster.cloud_vms.poll_interval
        self._entries: dict[str, QueueEntry] = {}
        self._me = ""
        self._polling = False
        self._dontupdate: set[str] = set()
        self._skipped: set[str] = set()  # malformed UUIDs already logged
        self._next_poll = first_now
        self._loaded = False
        self._inflight: dict[str, int] = {}  # uuid -> our calls about it in flight
        self._last_503 = 0.0
        self._ops = ThreadPoolExecutor(max_workers=OP_THREADS, thread_name_prefix="queue-op")

    def on_stop(self) -> None:
        super().on_stop()
        # queued calls are dropped (a stopped dispatcher locks nothing); those in flight finish
        self._ops.shutdown(wait=False, cancel_futures=True)

    # -- lifecycle --------------------------------------------------------------------------------

    def next_wake(self) -> float:
        return self._next_poll

    def tick(self, now: float) -> None:
        if not self._polling and now >= self._next_poll:
            self._polling = True
            self._dontupdate = set(self._inflight)  # their answers are newer than this poll
            known = {u for u, e in self._entries.items() if e.state not in FINAL}
            self._off_mailbox(self._poll, now, known, frozenset(self._entries), self._me, name="queue-poll")
        self.wake_at(self._next_poll if not self._polling else now + self._poll_interval)

    # -- polling (runs in a helper thread; touches no actor state) -------------------------------

    def _poll(self, started: float, known: set[str], have: frozenset, me: str) -> None:
        try:
            res = self._fetch(started, known, have, me)
        except Exception as e:  # any API failure: report, retry later
            res = PollResult(started, (), {}, (), error=f"{type(e).__name__}: {e}")
        res = replace(res, ended_at=self._ticker.clock.now(), last_503=self._client_503())
        self._self.poll_done.defer(res)

    def _client_503(self) -> float:
        return getattr(self._client, "last_503", 0.0) or 0.0

    def _fetch(self, started: float, known: set[str], have: frozenset = frozenset(), me: str = "") -> PollResult:
        c = self._client
        if not me:
            me = c.current_token_uuid()
        seen: dict[str, dict] = {}
        for ctr in c.iter_containers(filters=[["locked_by_uuid", "=", me]], select=SELECT):
            if self._acceptable(ctr):
                seen[ctr["uuid"]] = ctr
        offset, nonsuper = 0, 0
        while nonsuper < QUEUED_TARGET:
            page = c.list_containers(filters=[["state", "=", "Queued"], ["priority", ">", "0"]],
                                     order=["priority desc"], select=SELECT, limit=PAGE,
                                     offset=offset, count="none")
            if not page:
                break
            offset += len(page)
            for ctr in page:
                if not self._acceptable(ctr):
                    continue
                seen.setdefault(ctr["uuid"], ctr)
                if not (ctr.get("scheduling_parameters") or {}).get("supervisor"):
                    nonsuper += 1
        missing = sorted(known - set(seen))
        deleted = []
        for i in range(0, len(missing), MISSING_BATCH):
            batch = missing[i:i + MISSING_BATCH]
            got = c.list_containers(filters=[["uuid", "in", batch]], select=SELECT,
                                    limit=len(batch), count="none")
            if not got:
                deleted.extend(batch)
            for ctr in got:
                if ctr["uuid"] not in batch:
                    raise RuntimeError("BUG? server response did not match requested filters")
                seen[ctr["uuid"]] = ctr
        new = [uuid for uuid, ctr in seen.items()
               if uuid not in known and uuid not in have and ctr.get("state") not in FINAL]
        return PollResult(started, tuple(seen.values()), fetch_mounts(c, new), tuple(deleted), me=me)

    def _acceptable(self, ctr) -> bool:
        """Skip (and log once) a record whose uuid is not a container UUID (a malicious or
        broken API server): it would end up in a URL and a shell command line on a VM."""
        uuid = ctr.get("uuid") if isinstance(ctr, dict) else None
        if valid_uuid(uuid):
            return True
        shown = repr(uuid)[:80]
        if shown not in self._skipped and len(self._skipped) < 1000:
            self._skipped.add(shown)  # only the poll thread touches this set (one poll at a time)
            log.warning("skipping a container with a malformed UUID", extra={"ContainerUUID": shown})
        return False

    # -- applying results (actor thread) -----------------------------------------------------------

    def _note_503(self, at: float) -> None:
        if at > self._last_503:
            self._last_503 = at
            self._scheduler.api_503(at)

    def poll_done(self, res: PollResult) -> None:
        self._polling = False
        self._note_503(res.last_503)
        ended = max(res.ended_at, res.started_at)
        took = ended - res.started_at
        if res.error:
            retry = max(self._poll_interval / 10, 1.0) if not self._loaded else self._poll_interval
            log.error("error updating queue: %s", res.error, extra={"error": res.error})
            self._next_poll = ended + max(took, retry)
            self.wake_at(self._next_poll)
            return
        if res.me:
            self._me = res.me
        # a slow poll means an overloaded API server: wait as long as it took (Go does)
        self._next_poll = ended + max(took, self._poll_interval) if took else res.started_at + self._poll_interval
        self.wake_at(self._next_poll)
        changed, removed = [], []
        returned = set()
        for ctr in res.containers:
            uuid = ctr["uuid"]
            returned.add(uuid)
            if uuid in self._dontupdate:
                continue
            old = self._entries.get(uuid)
            if old is None:
                if ctr.get("state") in FINAL:
                    continue  # never add a finished container we hadn't seen
                if uuid not in res.mounts:
                    continue  # deleted before its mounts were fetched: the next poll knows
                entry = self._new_entry(ctr, res.mounts[uuid], res.started_at)
                if entry is None:
                    continue
            else:
                if (old.state, old.priority, old.locked_by_uuid) == (
                        ctr.get("state"), int(ctr.get("priority") or 0), ctr.get("locked_by_uuid") or ""):
                    continue
                entry = old.with_update(ctr)
            self._entries[uuid] = entry
            changed.append(entry)
        for uuid in list(self._entries):
            if uuid in self._dontupdate:
                continue
            if uuid in res.deleted:
                log.warning("container not found by controller (deleted?)", extra={"ContainerUUID": uuid})
            elif uuid in returned:
                continue
            e = self._entries.pop(uuid)
            log.info("dropping container from queue", extra={"ContainerUUID": uuid, "State": e.state})
            removed.append(uuid)
        self._dontupdate = set()
        self._loaded = True
        self._scheduler.queue_update(tuple(changed), tuple(removed), res.started_at)

    def _new_entry(self, ctr: dict, mounts: Mapping, now: float) -> QueueEntry | None:
        from actors.instancetype import ConstraintsNotSatisfiable
        full = {**ctr, "mounts": mounts}
        try:
            types = self._chooser.choose(full)
            need = self._chooser.needed(full)
        except ConstraintsNotSatisfiable as e:
            if ctr.get("state") in ("Queued", "Locked"):
                log.warning("cancel container with no suitable instance type",
                            extra={"ContainerUUID": ctr["uuid"], "error": e.reason})
                self._off_mailbox(self._cancel_unsatisfiable, ctr, e.reason, pool=self._ops)
                return None
            # Running (say, its type was retired and we restarted): track it, with no type to
            # choose, so it is neither cancelled nor killed as "not in queue" (issue 10 item 3)
            try:
                types, need = (), self._chooser.needed(full)
            except Exception:
                return None
            log.info("tracking running container that fits no configured instance type",
                     extra={"ContainerUUID": ctr["uuid"], "error": e.reason})
        log.info("adding container to queue", extra={
            "ContainerUUID": ctr["uuid"], "State": ctr.get("state"), "Priority": ctr.get("priority"),
            "InstanceTypes": ",".join(t.name for t in types)})
        sp = ctr.get("scheduling_parameters") or {}
        return QueueEntry(uuid=ctr["uuid"], state=ctr.get("state", ""),
                          priority=int(ctr.get("priority") or 0), container=ctr,
                          instance_types=tuple(types), resources=need, first_seen_at=now,
                          created_at=parse_time(ctr.get("created_at")),
                          supervisor=bool(sp.get("supervisor")),
                          locked_by_uuid=ctr.get("locked_by_uuid") or "")

    def _cancel_unsatisfiable(self, ctr: dict, reason: str) -> None:
        """(pool thread)"""
        uuid = ctr["uuid"]
        try:
            if ctr.get("state") == "Queued":
                self._client.lock(uuid)
            self._client.update(uuid, {"runtime_status": {"error": reason}})
            self._client.update(uuid, {"state": "Cancelled"})
        except Exception as e:
            log.warning("error while trying to cancel unsatisfiable container",
                        extra={"ContainerUUID": uuid, "error": str(e)})

    # -- scheduler requests ------------------------------------------------------------------------

    def _apply(self, uuid: str, op: str, call, reason: str = "") -> None:
        self._inflight[uuid] = self._inflight.get(uuid, 0) + 1
        if self._polling:
            self._dontupdate.add(uuid)
        self._off_mailbox(self._call, uuid, op, call, reason, pool=self._ops)

    def _call(self, uuid: str, op: str, call, reason: str) -> None:
        """(pool thread) One API call; the answer, or the refreshed record, goes back as op_done."""
        err = ""
        try:
            resp = call(uuid)
        except Exception as e:
            err = f"{type(e).__name__}: {e}"
            level = logging.ERROR if op == "requeue" else logging.WARNING
            log.log(level, "error locking container" if op == "lock" else f"error {op}ing container",
                    extra={"ContainerUUID": uuid, "error": err, "Reason": reason})
            resp = self._refresh(uuid)  # our view was stale? learn the real state now
        else:
            log.debug(f"{op} succeeded", extra={"ContainerUUID": uuid})
        try:
            self._self.op_done.defer(uuid, op, resp, err, self._client_503())
        except Exception:
            pass  # stopped meanwhile

    def op_done(self, uuid: str, op: str, resp: dict | None, err: str, last_503: float) -> None:
        n = self._inflight.get(uuid, 0) - 1
        if n > 0:
            self._inflight[uuid] = n
        else:
            self._inflight.pop(uuid, None)
        self._note_503(last_503)
        entry = None
        if resp is not None:
            if self._polling:
                self._dontupdate.add(uuid)
            old = self._entries.get(uuid)
            if old is not None:
                entry = old.with_update(resp)
                self._entries[uuid] = entry
        self._scheduler.container_op_done(uuid, op, entry, err)

    def _refresh(self, uuid: str) -> dict | None:
        try:
            return self._client.get_container(uuid, select=["uuid", "state", "priority", "locked_by_uuid"])
        except Exception:
            return None

    def lock(self, uuid: str) -> None:
        e = self._entries.get(uuid)
        if e is None or e.state != "Queued":
            log.debug("container no longer queued by the time we decided to lock it, doing nothing",
                      extra={"ContainerUUID": uuid})
            self._scheduler.container_op_done(uuid, "lock", e, "not queued")
            return
        self._apply(uuid, "lock", self._client.lock)

    def unlock(self, uuid: str, reason: str) -> None:
        log.info("unlocking container", extra={"ContainerUUID": uuid, "Reason": reason})
        self._apply(uuid, "unlock", self._client.unlock, reason)

    def cancel(self, uuid: str, reason: str) -> None:
        """Cancel, saying why in runtime_status.error (Arvados leaves it empty here)."""
        log.info("cancelling container because %s", reason, extra={"ContainerUUID": uuid, "Reason": reason})
        self._apply(uuid, "cancel", lambda u: self._cancel_call(u, reason), reason)

    def _cancel_call(self, uuid: str, reason: str) -> dict:
        """(pool thread) Cancelled, with our reason added to runtime_status only if it holds no
        error yet: crunch-run's own error and warnings stay (the API replaces the whole field)."""
        status = dict(self._client.get_container(uuid, select=["runtime_status"]).get("runtime_status") or {})
        if not status.get("error"):
            status["error"] = f"Cancelled by the dispatcher: {reason}"
        return self._client.update(uuid, {"state": "Cancelled", "runtime_status": status})

    def forget(self, uuid: str) -> None:
        """Drop a finished (or priority-0 Queued) container the scheduler is done with."""
        e = self._entries.get(uuid)
        if e is not None and (e.state in FINAL or (e.state == "Queued" and e.priority <= 0)):
            del self._entries[uuid]
            self._scheduler.queue_update((), (uuid,), None)
