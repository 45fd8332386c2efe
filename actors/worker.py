"""WorkerActor: one cloud VM. Probes it, starts and kills its containers, decides when it goes.

Behaviour follows Arvados ``worker/worker.go`` (states unknown/booting/idle/running/shutdown,
idle behaviours run/hold/drain, boot probe then run probe, the timeouts), with one deliberate
difference the seed asks for: an instance found at startup whose boot probe fails but which is
running containers is *drained* (its containers finish, then it is shut down), never killed by
the TimeoutBooting age rule; only if no probe at all answers for TimeoutBooting does it go, as in
Go. Also different: the idle clock (``busy``) starts when a worker becomes ready, so a boot slower
than TimeoutIdle does not make a new worker eligible for shutdown before it got any work.

No SSH runs on this actor's thread: probes (and the runner upload after a boot probe), starts and
kills are jobs on the shared pools of :mod:`actors.workerpools` (boot probes apart from run probes,
starts and kills), and their results come back as messages, so start, kill, set_idle_behavior and
shutdown are handled while a probe waits; the thread itself only hangs up the SSH transport when
the actor stops. Starts and kills share one pool across all workers, and one on a VM that does not
answer holds a thread for up to 300 s, so a worker keeps at most ``pools.per_worker`` of them in
flight and queues the rest in order (``_command``; Go bounds nothing here, its goroutines are
free); a kill drops its container's start still queued, a shutdown drops the whole queue. As in Go
(``probeAndUpdate``): at most one probe in flight; a probe whose result arrives after a start, a
kill's exit or a shutdown it did not see (the generation ``_gen``, Go's ``updated``) counts as an
answer (``probed``) but changes no runner and no state. A worker used as a plain object (not
started: tests) runs those jobs in the caller's thread and applies them at once. Time arrives with
``tick(now)``; the actor tells the Ticker its next deadline after every handler.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import pykka

from actors.base import TickedActor
from actors.lifecycle import (after_probe, eligible_for_shutdown, next_wake, probe_failed, stale_lock,
                              unresponsive, wants_run_probe)
from actors.messages import BOOTED, Behavior, InstanceInfo, QueueEntry, State, WorkerView
from actors.workerpools import COMMANDS_PER_WORKER
from cloud import crunchrun, runner_deploy
from cloud.base import ExecResult, ExecutorError, NoAddress
from cloud.ssh import LONG_COMMAND_TIMEOUT
from conf.model import Cluster, InstanceType

log = logging.getLogger("dispatch.worker")

BOOT_PROBE_MIN_TIMEOUT = 10.0  # even a probe that starts at the end of TimeoutBooting gets this


@dataclass
class _Runner:
    """One crunch-run process on this worker (mutable, private to the actor)."""

    uuid: str
    started: float
    starting: bool = True
    kill_started: float | None = None
    kill_reason: str = ""
    next_signal: float = 0.0
    given_up: bool = False
    seq: int = 0  # which start (or detection) this is: a late result for an earlier one is ignored
    killing: bool = False  # a --kill is out (one at a time, as Go's signal loop)


@dataclass(frozen=True)
class _Command:
    """A start or kill waiting in the worker for a place on the command pool."""

    kind: str  # "start" or "kill": its result comes back as ``<kind>_done``
    uuid: str
    seq: int  # the runner's: a command for one that ended meanwhile is not sent
    fn: Callable
    args: tuple


@dataclass(frozen=True)
class ProbeRequest:
    """What a probe job needs, taken on the actor's thread when it begins."""

    gen: int
    started: float
    initial: State
    boot_cmd: str
    boot_timeout: float
    list_stdin: bytes
    prices: bool
    fields: dict = field(hash=False)


@dataclass(frozen=True)
class ProbeResult:
    """What a probe found (pool thread -> actor)."""

    gen: int  # the worker's generation when the probe began
    started: float
    ended: float
    booted: bool = False
    boot_ok: bool = False  # the boot probe itself answered (not just "already booted")
    boot_err: str = ""
    runner: str | None = None  # the deployed runner's path
    ok: bool = False  # the run probe ran and answered
    uuids: tuple[str, ...] = ()
    broken: bool = False
    stale: bool = False
    list_at: float = 0.0  # when its --list began (see _seen_at)


@dataclass(frozen=True)
class CommandResult:
    """A --detach or --kill's outcome (pool thread -> actor)."""

    uuid: str
    seq: int
    ok: bool
    sent: float  # when the command began
    ended: float


def price_history(instance: InstanceInfo, it: InstanceType) -> list:
    """The driver's price history for this instance, newest first ([] if it keeps none: the
    instance costs its type's configured Price). In-memory in the driver, so cheap to ask often."""
    fn = getattr(instance.handle, "price_history", None)
    if fn is None:
        return []
    try:
        return list(fn(it) or ())
    except Exception:  # a driver bug must not stop the probes; the configured price still holds
        log.warning("price_history failed", extra={"Instance": instance.id}, exc_info=True)
        return []


def _current_price(history) -> float | None:
    return history[0].price if history else None


def _handler(fn):
    """A message handler: what it changed in the view is told to the scheduler once, at the end
    (or earlier by an explicit ``_publish``), then the Ticker gets the next deadline. (Handlers
    never call each other: a job run inline calls the undecorated ``_apply_*``.)"""

    @functools.wraps(fn)
    def handle(self, *args):
        self._before = self._view
        fn(self, *args)
        self._publish()
        self._reschedule()

    return handle


class WorkerActor(TickedActor):
    def __init__(self, *, instance: InstanceInfo, instance_type: InstanceType, state: State,
                 behavior: Behavior, now: float, executor_factory, scheduler, instance_set, ticker,
                 cluster: Cluster, metrics=None, rng: random.Random | None = None,
                 probe_limiter=None, clock=None, pools=None):
        super().__init__(ticker)
        self._clock = clock  # read only by jobs, to date what they saw (see _seen_at)
        self._cluster = cluster
        self._cfg = cluster.cloud_vms
        # the factory gets our SSH-verified hook: it runs inside execute(), on a pool thread
        self._exec = executor_factory(self._ssh_verified_hook)
        self._pools = pools  # actors.workerpools.WorkerPools; None: a new thread per job
        self._inline = True  # not started: jobs run in the caller's thread (a plain object in tests)
        self._probing = False  # a probe job is out: at most one
        # starts and kills on the shared command pool: at most this many out, the rest queued
        self._cmd_limit = COMMANDS_PER_WORKER if pools is None else pools.per_worker
        self._cmd_out = 0
        self._cmd_queue: deque[_Command] = deque()
        self._gen = 0  # Go's ``updated``: bumped by starts, a start's answer, a runner's end, shutdown
        self._seq = itertools.count(1)
        self._scheduler = scheduler
        self._iset = instance_set
        self._metrics = metrics
        self._rng = rng or random.Random()
        self._probe_limiter = probe_limiter  # shared cloud.base.OpsLimiter(MaxProbesPerSecond)
        self._probe_slot: float | None = None
        self._instance = instance
        self._runners: dict[str, _Runner] = {}
        self._first_ssh: float = 0.0
        self._boot_outcome_reported = False
        self._stale_since: float | None = None
        self._now = now
        self._next_probe = now + self._rng.uniform(0, self._cfg.probe_interval / 23)
        self._view = WorkerView(
            instance_id=instance.id, instance_type=instance_type, state=state,
            idle_behavior=behavior, address=instance.address, provider_type=instance.provider_type,
            busy=now, appeared=now, probed=now, price=_current_price(price_history(instance, instance_type)))
        self._before = self._view  # what the scheduler last heard (see _handler)
        self._runner = cluster.containers.crunch_run_command  # or the deployed binary's path
        self._sudo = crunchrun.needs_sudo(instance.remote_user)
        self._log = log

    # -- helpers ---------------------------------------------------------------------------------

    @property
    def view(self) -> WorkerView:
        return self._view

    def _fields(self, **kw) -> dict:
        return {"Instance": self._view.instance_id, "InstanceType": self._view.instance_type.name,
                "Address": self._view.address, **kw}

    def _set(self, **changes) -> None:
        running = tuple(sorted(self._runners))
        self._view = replace(self._view, running=running, **changes)

    def _publish(self) -> None:
        if self._view != self._before:
            self._before = self._view
            self._scheduler.worker_changed(self._view)

    def _reschedule(self) -> None:
        when = self.next_wake()
        if when is not None:
            self.wake_at(when)

    def next_wake(self) -> float | None:
        # while a probe is out its answer books the next one: an overdue probe deadline would
        # wake us again and again for nothing
        when = next_wake(self._view, math.inf if self._probing else self._next_probe, self._cfg,
                         (r.next_signal for r in self._runners.values()
                          if r.kill_started is not None and not r.given_up))
        return None if when is None or when == math.inf else when

    def _report_boot_outcome(self, outcome: str) -> None:
        if self._boot_outcome_reported:
            return
        self._boot_outcome_reported = True
        if self._metrics is not None:
            self._metrics.boot_outcomes.labels(outcome=outcome).inc()

    def _run(self, command: str, stdin: bytes = b"", timeout: float | None = None) -> ExecResult:
        """(pool thread) ``timeout`` None: the executor's short default, for ``--list`` probes."""
        if timeout is None:
            return self._exec.execute(command, stdin)
        return self._exec.execute(command, stdin, timeout=timeout)

    def _seen_at(self, now: float) -> float:
        """When a command that shows a crunch-run gone actually began: a job starts later than the
        handler that sent it (the pool, the GIL), and an exit dated by the handler's ``now``
        looked older than a queue poll that still saw the container Running, so the scheduler
        cancelled a container crunch-run had just completed (422). Go dates it with time.Now()."""
        return max(now, self._clock.now()) if self._clock is not None else now

    def _job(self, kind: str, fn: Callable, args: tuple, apply: str) -> None:
        """Run ``fn(*args)`` off the mailbox on the ``kind`` pool and hand its result back as the
        message ``<apply>_done``. ``fn`` reads only its arguments and what never changes after
        __init__ (executor, cluster, logger, metrics, clock). Not started (a plain object in
        tests): run now, and apply the result as that message's handler would."""
        if self._inline:
            self._job_done(apply, fn(*args))
            return
        done = self._done[apply]

        def job():
            done.defer(fn(*args))

        self._off_mailbox(job, pool=None if self._pools is None else self._pools.get(kind),
                          name=f"worker-{kind}")

    def _command(self, kind: str, uuid: str, seq: int, fn: Callable, args: tuple) -> None:
        """A start or kill: sent now if this worker has fewer than ``_cmd_limit`` out and none
        waiting before it, else queued (``_send_queued`` sends it when an earlier one answers)."""
        cmd = _Command(kind, uuid, seq, fn, args)
        if self._cmd_out < self._cmd_limit and not self._cmd_queue:
            self._send(cmd)
        else:
            self._cmd_queue.append(cmd)

    def _send(self, cmd: _Command) -> None:
        self._cmd_out += 1
        self._job("command", cmd.fn, cmd.args, cmd.kind)

    def _send_queued(self) -> None:
        while self._cmd_queue and self._cmd_out < self._cmd_limit:
            cmd = self._cmd_queue.popleft()
            r = self._runners.get(cmd.uuid)
            if r is None or r.seq != cmd.seq or (cmd.kind == "start" and not r.starting):
                continue  # its runner ended (or was found by a probe) while it waited
            self._send(cmd)

    def _drop_queued(self, why: str, uuid: str | None = None) -> int:
        """Forget queued commands (all, or ``uuid``'s start); never sent, so nothing counted them."""
        keep, dropped = deque(), []
        for cmd in self._cmd_queue:
            (dropped if uuid is None or (cmd.uuid == uuid and cmd.kind == "start") else keep).append(cmd)
        self._cmd_queue = keep
        if dropped:
            self._log.info("queued crunch-run commands dropped", extra=self._fields(
                Reason=why, Commands=len(dropped), **({"ContainerUUID": uuid} if uuid else {})))
        return len(dropped)

    def _ssh_verified_hook(self) -> None:
        """(pool thread, inside execute()) The host proved its identity: tell ourselves when."""
        at = self._seen_at(self._now)  # now, not when the message is handled
        if self._inline:
            self.on_ssh_verified(at)
            return
        try:
            self._self.on_ssh_verified.defer(at)
        except pykka.ActorDeadError:  # stopped meanwhile
            pass

    def on_ssh_verified(self, at: float | None = None) -> None:
        """The executor verified the host at ``at`` (first time: the metric of time to SSH)."""
        if not self._first_ssh:
            now = self._now if at is None else at
            self._first_ssh = now
            if self._view.state is State.BOOTING and self._metrics is not None:
                self._metrics.time_to_ssh.observe(now - self._view.appeared)

    # -- messages --------------------------------------------------------------------------------

    def on_start(self) -> None:
        self._inline = False
        super().on_start()
        self._done = {k: getattr(self._self, k + "_done") for k in ("probe", "start", "kill")}

    def on_stop(self) -> None:
        super().on_stop()
        try:
            self._exec.close()  # a job still running on it fails and tells a stopped actor
        except Exception:
            pass

    @_handler
    def tick(self, now: float) -> None:
        self._now = now
        if self._view.state is not State.SHUTDOWN:
            self._kill_loop(now)
            if (not self._shutdown_if_idle(now) and not self._probing and now >= self._next_probe
                    and self._probe_slot_due(now)):
                self._next_probe = now + self._cfg.probe_interval * self._rng.uniform(0.97, 1.03)
                self._probe(now)

    def _probe_slot_due(self, now: float) -> bool:
        """MaxProbesPerSecond across all workers: take a slot from the shared limiter; if it is
        later than now, wait for it (as a deadline) instead of probing now."""
        if self._probe_limiter is None:
            return True
        if self._probe_slot is None:
            self._probe_slot = self._probe_limiter.reserve(now)
        if now >= self._probe_slot:
            self._probe_slot = None
            return True
        self._next_probe = self._probe_slot
        return False

    @_handler
    def update_instance(self, instance: InstanceInfo, now: float) -> None:
        """A fresher listing of our instance (every sync): new address, tags; retry a destroy."""
        self._now = now
        before = self._view
        self._instance = instance
        self._exec.set_target(instance.handle)
        if instance.address != before.address:
            self._set(address=instance.address)
        price = _current_price(price_history(instance, before.instance_type))
        if price != before.price:
            self._set(price=price)
        if before.state is State.SHUTDOWN:
            if now - before.destroyed > self._cfg.timeout_shutdown:
                self._log.info("worker still listed after shutdown; retrying", extra=self._fields())
                self._set(destroyed=now)
                self._iset.destroy(instance.handle, now)
        else:
            self._save_tags()

    @_handler
    def set_idle_behavior(self, behavior: Behavior, now: float) -> None:
        self._now = now
        self._log.info("set idle behavior", extra=self._fields(IdleBehavior=str(behavior)))
        self._set(idle_behavior=behavior)
        self._save_tags()
        self._shutdown_if_idle(now)

    @_handler
    def start_container(self, entry: QueueEntry, now: float) -> None:
        self._now = now
        self._set(starts_seen=self._view.starts_seen + 1)
        v = self._view
        uuid = entry.uuid
        if v.state not in BOOTED or v.idle_behavior is not Behavior.RUN or uuid in self._runners:
            self._scheduler.container_start_failed(uuid, v.instance_id,
                                                   f"worker is {v.state}/{v.idle_behavior}")
            return
        seq = next(self._seq)
        self._runners[uuid] = _Runner(uuid, now, seq=seq)
        self._gen += 1
        self._set(state=State.RUNNING)
        self._publish()  # the scheduler hears of the start before the (slow) command runs
        cmd = crunchrun.detach_command(self._runner, crunchrun.runner_args(self._cluster), uuid,
                                       sudo=crunchrun.needs_sudo(self._instance.remote_user))
        # its stdin (the whole cluster config as Go JSON, ~0.5 ms of CPU) is made on the pool
        # thread, not on this mailbox
        where = (v.instance_type, self._instance.address)
        self._command("start", uuid, seq, self._start_job,
                      (cmd, where, uuid, seq, now, entry.created_at, self._fields(ContainerUUID=uuid)))

    def _start_job(self, cmd: str, where: tuple, uuid: str, seq: int, now: float,
                   created_at: float, fields: dict) -> CommandResult:
        """(pool thread) ``crunch-run --detach``, its ConfigData on stdin. Whether or not it
        worked, the next probe decides (as Arvados does)."""
        ok = False
        try:
            stdin = crunchrun.config_data(self._cluster, *where, uuid)
            res = self._run(cmd, stdin, LONG_COMMAND_TIMEOUT)
            ok = res.ok
            if res.ok:
                self._log.info("crunch-run process started", extra=fields)
            else:
                self._log.error("error starting crunch-run process", extra={
                    **fields, "stdout": res.stdout.decode(errors="replace")[-2000:],
                    "stderr": res.stderr.decode(errors="replace")[-2000:]})
        except ExecutorError as e:
            self._log.error("error starting crunch-run process", extra={**fields, "error": str(e)})
        except Exception as e:  # a bug must not leave the runner starting forever
            self._log.exception("error starting crunch-run process", extra={**fields, "error": repr(e)})
        ended = self._seen_at(now)
        if self._metrics is not None and created_at:
            self._metrics.time_from_queue_to_crunch_run.observe(max(0.0, ended - created_at))
        return CommandResult(uuid, seq, ok, now, ended)

    @_handler
    def start_done(self, res: CommandResult) -> None:
        self._job_done("start", res)

    def _job_done(self, kind: str, res) -> None:
        """A job's result, whether it came as a message or ran inline: one path for both."""
        if kind == "probe":
            self._apply_probe(res)
        else:
            self._command_done(res, self._apply_start if kind == "start" else self._apply_kill)

    def _command_done(self, res: CommandResult, apply: Callable[[CommandResult], None]) -> None:
        """A start's or kill's answer: one fewer in flight, apply it, send the next one queued."""
        self._cmd_out -= 1
        apply(res)
        self._send_queued()

    def _answered(self, res: CommandResult) -> _Runner | None:
        """The runner a command's answer is about, if it is still that attempt."""
        self._now = max(self._now, res.ended)
        r = self._runners.get(res.uuid)
        return r if r is not None and r.seq == res.seq else None

    def _apply_start(self, res: CommandResult) -> None:
        r = self._answered(res)
        now = self._now
        if r is None or not r.starting:
            return  # ended, killed or listed by a probe meanwhile (Go: no longer in ``starting``)
        r.starting = False
        self._gen += 1
        self._set(busy=now, last_uuid=res.uuid)

    @_handler
    def kill_container(self, uuid: str, reason: str, now: float) -> None:
        self._now = now
        r = self._runners.get(uuid)
        if r is None or r.kill_started is not None or self._view.state is State.SHUTDOWN:
            return  # (being destroyed: its processes go with it; a --kill would wait on a dying VM)
        self._log.info("killing crunch-run process", extra=self._fields(ContainerUUID=uuid, Reason=reason))
        r.kill_started, r.kill_reason, r.next_signal = now, reason, now
        if r.starting and self._drop_queued("killed before its start was sent", uuid):
            # crunch-run never ran there: nothing to signal (Go's kill would find no process)
            self._close_runner(uuid, now)
            return
        self._kill_loop(now)

    @_handler
    def shutdown_if_allowed(self, reason: str, now: float) -> None:
        """The scheduler's Shutdown(): only booting/idle workers, never on hold."""
        self._now = now
        v = self._view
        if v.idle_behavior is Behavior.HOLD or v.state not in (State.BOOTING, State.IDLE):
            # repeated by every pass until our new state reaches the scheduler: not news
            self._log.debug("shutdown requested", extra=self._fields(Reason=reason))
            return
        self._log.info("shutdown requested", extra=self._fields(Reason=reason))
        self._report_boot_outcome("aborted")
        self._shutdown(now, reason)

    @_handler
    def kill_instance(self, reason: str, now: float) -> None:
        """The management API's kill: shut down in any state, hold included."""
        self._now = now
        if self._view.state is State.SHUTDOWN:
            return
        self._report_boot_outcome("aborted")
        self._shutdown(now, reason)

    def abandon(self) -> None:
        """Our instance vanished from the cloud listing: forget its runners, then stop."""
        for uuid in sorted(self._runners):
            self._log.info("crunch-run process abandoned", extra=self._fields(ContainerUUID=uuid))
        self._runners.clear()
        self.actor_ref.stop(block=False)

    # -- internals -------------------------------------------------------------------------------

    def _save_tags(self) -> None:
        tags = self._instance.tags
        want = {self._cluster.tag("InstanceType"): self._view.instance_type.name,
                self._cluster.tag("IdleBehavior"): str(self._view.idle_behavior)}
        if any(tags.get(k) != v for k, v in want.items()):
            merged = {**tags, **want}
            self._instance = replace(self._instance, tags=merged)
            self._iset.set_tags(self._instance.handle, merged, self._now)

    def _shutdown(self, now: float, reason: str) -> None:
        self._log.info("shutting down", extra=self._fields(Reason=reason, State=str(self._view.state)))
        self._gen += 1
        self._drop_queued("shutdown")
        self._set(state=State.SHUTDOWN, destroyed=now)
        self._iset.destroy(self._instance.handle, now)

    def _shutdown_if_idle(self, now: float) -> bool:
        v = self._view
        all_given_up = bool(self._runners) and all(r.given_up for r in self._runners.values())
        if not eligible_for_shutdown(v, now, self._cfg.timeout_idle, self._cfg.timeout_booting,
                                     all_given_up):
            return False
        self._log.info("shutdown worker", extra=self._fields(
            State=str(v.state), IdleDuration=round(now - v.busy, 3), IdleBehavior=str(v.idle_behavior)))
        self._report_boot_outcome("aborted")
        self._shutdown(now, "idle" if v.idle_behavior is Behavior.RUN else str(v.idle_behavior))
        return True

    def _close_runner(self, uuid: str, now: float, seen: float | None = None) -> None:
        if self._runners.pop(uuid, None) is None:
            return
        self._log.info("crunch-run process ended", extra=self._fields(ContainerUUID=uuid))
        self._gen += 1
        self._scheduler.container_ended(uuid, self._view.instance_id, now if seen is None else seen)
        self._set(busy=now)
        if self._view.state is State.RUNNING and not self._runners:
            self._set(state=State.IDLE)

    def _kill_loop(self, now: float) -> None:
        for r in list(self._runners.values()):
            if r.kill_started is None or r.given_up:
                continue
            if now > r.kill_started + self._cfg.timeout_term:
                r.given_up = True
                if self._view.idle_behavior is Behavior.HOLD:
                    self._log.warning("unkillable container, but worker has IdleBehavior=Hold",
                                      extra=self._fields(ContainerUUID=r.uuid))
                else:
                    self._log.warning("unkillable container, draining worker",
                                      extra=self._fields(ContainerUUID=r.uuid))
                    self._set(idle_behavior=Behavior.DRAIN)
                    self._save_tags()
                continue
            if now < r.next_signal:
                continue
            r.next_signal = now + self._cfg.timeout_signal
            if r.killing or r.starting:
                # the last signal's command is still out; or the start's: a --kill sent now could
                # reach the VM before crunch-run exists and the --detach start it after all
                continue
            self._log.info("sending signal", extra=self._fields(ContainerUUID=r.uuid, Signal=15,
                                                               Reason=r.kill_reason))
            r.killing = True
            self._command("kill", r.uuid, r.seq, self._kill_job,
                          (crunchrun.kill_command(self._runner, r.uuid, self._sudo), r.uuid, r.seq, now,
                           self._fields(ContainerUUID=r.uuid)))

    def _kill_job(self, cmd: str, uuid: str, seq: int, now: float, fields: dict) -> CommandResult:
        """(pool thread) One ``crunch-run --kill 15``."""
        sent = self._seen_at(now)
        ok = False
        try:
            res = self._run(cmd, timeout=LONG_COMMAND_TIMEOUT)
            ok = res.ok
            if not ok:
                self._log.info("kill attempt unsuccessful", extra={
                    **fields, "stderr": res.stderr.decode(errors="replace")[-500:]})
        except ExecutorError as e:
            self._log.info("kill attempt unsuccessful", extra={**fields, "error": str(e)})
        except Exception as e:
            self._log.exception("kill attempt unsuccessful", extra={**fields, "error": repr(e)})
        return CommandResult(uuid, seq, ok, sent, self._seen_at(now))

    @_handler
    def kill_done(self, res: CommandResult) -> None:
        self._job_done("kill", res)

    def _apply_kill(self, res: CommandResult) -> None:
        r = self._answered(res)
        now = self._now
        if r is None:
            return
        r.killing = False
        if res.ok:
            self._close_runner(res.uuid, now, res.sent)

    def _probe(self, now: float) -> None:
        """Begin a probe round (boot probe, runner upload, run probe: whichever this state needs)
        as a job: on the boot pool until the VM has booted, then on the probe pool."""
        v = self._view
        if self._probing or v.state is State.SHUTDOWN:
            return
        self._probing = True
        prices = price_history(self._instance, v.instance_type)
        # Go sets no deadline on the boot probe: it may wait (cloud-init status --wait); what is
        # left of TimeoutBooting bounds it, since after that the instance goes anyway
        req = ProbeRequest(
            gen=self._gen, started=now, initial=v.state,
            boot_cmd=crunchrun.boot_probe_command(self._cfg.boot_probe_command),
            boot_timeout=max(BOOT_PROBE_MIN_TIMEOUT, v.appeared + self._cfg.timeout_booting - now),
            # as Arvados: crunch-run records the instance's price history for cost reports
            list_stdin=crunchrun.go_json([p.arvados_json() for p in prices]).encode() if prices else b"",
            prices=bool(prices), fields=self._fields())
        self._job("probe" if v.state in BOOTED else "boot", self._probe_job, (req, self._runner), "probe")

    def _probe_job(self, req: ProbeRequest, runner: str) -> ProbeResult:
        """(pool thread) Go's probeAndUpdate up to taking the lock: the remote commands."""
        try:
            return self._probe_commands(req, runner)
        except Exception as e:  # a bug must not leave the worker probing forever
            self._log.exception("probe failed", extra={**req.fields, "error": repr(e)})
            return ProbeResult(req.gen, req.started, self._seen_at(req.started), boot_err=repr(e))

    def _probe_commands(self, req: ProbeRequest, runner: str) -> ProbeResult:
        booted = req.initial in BOOTED
        boot_ok, boot_err, deployed = False, "", None
        if not booted:
            booted, boot_err = self._probe_booted(req)
            boot_ok = booted
            if booted or req.initial is State.UNKNOWN:
                copied, copy_err, deployed = self._deploy_runner(req.fields)
                if not copied:
                    booted, boot_err = False, copy_err
                elif deployed:
                    runner = deployed
            if booted:
                self._log.info("instance booted; will try probeRunning", extra=req.fields)
        ok = broken = stale = False
        uuids, list_at = (), 0.0
        if wants_run_probe(req.initial, booted):
            list_at = self._seen_at(req.started)
            uuids, broken, stale, ok = self._probe_running(req, runner, booted)
        return ProbeResult(req.gen, req.started, self._seen_at(req.started), booted=booted,
                           boot_ok=boot_ok, boot_err=boot_err, runner=deployed, ok=ok,
                           uuids=uuids, broken=broken, stale=stale, list_at=list_at)

    def _probe_booted(self, req: ProbeRequest) -> tuple[bool, str]:
        cmd = req.boot_cmd
        try:
            res = self._run(cmd, timeout=req.boot_timeout)
        except ExecutorError as e:
            level = logging.DEBUG if isinstance(e, NoAddress) or "refused" in str(e) or "timed out" in str(e) else logging.WARNING
            self._log.log(level, "boot probe failed", extra={**req.fields, "Command": cmd, "error": str(e)})
            return False, str(e)
        if not res.ok:
            stderr = res.stderr.decode(errors="replace")
            self._log.debug("boot probe failed", extra={
                **req.fields, "Command": cmd, "stdout": res.stdout.decode(errors="replace")[-500:],
                "stderr": stderr[-500:]})
            return False, stderr
        self._log.info("boot probe succeeded", extra=req.fields)
        return True, ""

    def _deploy_runner(self, fields: dict) -> tuple[bool, str, str | None]:
        """Go's copyRunnerData: with DeployRunnerBinary set, make sure the VM has that exact
        binary at ``<DeployRunnerDirectory>/crunch-run~<md5>`` and use it as the runner command.
        (False, reason, None) fails the boot probe, as in Go; else the path to use, if any."""
        vms = self._cfg
        if not runner_deploy.deploy_source(vms.deploy_runner_binary):
            return True, "", None
        try:
            rb = runner_deploy.load(vms.deploy_runner_binary, vms.deploy_runner_directory)
        except OSError as e:
            self._log.warning("cannot boot worker: error loading runner binary",
                              extra={**fields, "error": f"{vms.deploy_runner_binary}: {e.strerror or e}"})
            return False, str(e), None
        fields = {**fields, "hash": rb.md5, "path": rb.path}
        try:
            res = self._run(crunchrun.runner_md5sum_command(rb.path), timeout=LONG_COMMAND_TIMEOUT)
            if crunchrun.runner_installed(rb.md5, rb.path, res.stdout, res.stderr, res.exit_status):
                self._log.info("runner binary already exists on worker, with correct hash", extra=fields)
                return True, "", rb.path
            self._log.info("installing runner binary on worker", extra=fields)
            res = self._run(crunchrun.runner_install_command(rb.path, self._sudo), rb.data,
                            LONG_COMMAND_TIMEOUT)
        except ExecutorError as e:
            self._log.warning("error copying runner binary", extra={**fields, "error": str(e)})
            return False, str(e), None
        if not res.ok:
            stderr = res.stderr.decode(errors="replace")
            self._log.warning("error copying runner binary", extra={**fields, "stderr": stderr[-2000:]})
            return False, stderr, None
        return True, "", rb.path

    def _probe_running(self, req: ProbeRequest, runner: str, booted: bool) -> tuple[tuple, bool, bool, bool]:
        """(containers listed, broken, stale run lock, answered)"""
        cmd = crunchrun.list_command(runner, self._sudo, stdin_prices=req.prices)
        t0 = time.perf_counter()  # a duration for the metric only; decisions use ``now``
        try:
            out = self._run(cmd, req.list_stdin)
            err = "" if out.ok else out.stderr.decode(errors="replace")
        except ExecutorError as e:
            out, err = None, str(e)
        if out is None or not out.ok:
            if self._metrics is not None:
                self._metrics.run_probe_duration.labels(outcome="fail").observe(time.perf_counter() - t0)
            if booted:
                # every failure after boot is logged, with the command's stderr
                self._log.warning("probe failed", extra={
                    **req.fields, "Command": cmd,
                    "stdout": (out.stdout.decode(errors="replace")[-500:] if out else ""), "stderr": err[-2000:]})
            return (), False, False, False
        if self._metrics is not None:
            self._metrics.run_probe_duration.labels(outcome="success").observe(time.perf_counter() - t0)
        running, stale, broken = crunchrun.parse_list(out.stdout.decode(errors="replace"),
                                                      self._cluster.cluster_id)
        if stale:
            self._log.info("probe reported stale run lock", extra={**req.fields, "ContainerUUID": stale[0]})
        return tuple(running), broken, bool(stale), True

    @_handler
    def probe_done(self, res: ProbeResult) -> None:
        self._job_done("probe", res)

    def _apply_probe(self, res: ProbeResult) -> None:
        """Go's probeAndUpdate once it holds the lock: what the answers mean for this worker."""
        self._probing = False
        now = self._now = max(self._now, res.ended)
        try:
            self._apply_probe1(res, now)
        finally:
            if not self._view.probe_done:
                self._set(probe_done=True)

    def _apply_probe1(self, res: ProbeResult, now: float) -> None:
        if res.runner:
            self._runner = res.runner
        if res.boot_ok:
            self.on_ssh_verified(res.ended)  # executors without SSH never call it; first success is as good
        if self._view.state is State.SHUTDOWN:
            return  # shut down while it ran (Go skips the logging noise too)
        booted, uuids, broken, ok = res.booted, list(res.uuids), res.broken, res.ok
        if ok:
            self._stale_since, too_long = stale_lock(res.stale, self._stale_since, res.started,
                                                     self._cfg.timeout_stale_run_lock)
            if too_long:
                self._log.warning("reporting broken after reporting stale run lock for too long",
                                  extra=self._fields())
                broken = True
            if not self._view.run_probed:
                self._set(run_probed=True)
        if broken and self._view.idle_behavior is Behavior.RUN:
            self._log.info("probe reported broken instance", extra=self._fields())
            self._report_boot_outcome("failure")
            self._set(idle_behavior=Behavior.DRAIN)
            self._save_tags()
        if probe_failed(ok, booted, uuids, bool(self._runners)):
            self._probe_failed(res.started, now, booted, res.boot_err)
            return
        if res.gen != self._gen:
            # A start, a start's answer or a runner's end happened after this probe began: its
            # list may miss a container we just started, or show one whose end we already told.
            # Leave the runners alone; the next probe catches up (Go: "probe/sync race").
            self._log.debug("skipping worker state update due to probe/sync race",
                            extra=self._fields(ProbeGen=res.gen, Gen=self._gen))
            self._set(probed=now)
            return
        if uuids or self._runners:
            if not self._view.last_uuid and uuids:
                self._set(probed=now, busy=now, last_uuid=uuids[0])
            else:
                self._set(probed=now, busy=now)
        else:
            self._set(probed=now)
        self._update_running(uuids, now, res.list_at)
        v = self._view
        verdict = after_probe(v.state, v.idle_behavior, booted, bool(self._runners))
        if verdict.ready:
            if v.state is State.BOOTING and self._metrics is not None and self._first_ssh:
                self._metrics.time_to_ready_for_container.observe(max(0.0, now - self._first_ssh))
            # The idle clock starts now: with ``busy`` left at the appearance time, a boot slower
            # than TimeoutIdle made the worker eligible for shutdown the moment it was ready,
            # before the scheduler could give it work (Arvados is saved by only checking at the
            # next probe round; here the idle deadline wakes the worker at once).
            if v.draining:
                self._log.info("boot probe succeeded again; the instance's own idle behavior applies",
                               extra=self._fields(IdleBehavior=str(v.idle_behavior)))
            self._set(state=verdict.state, busy=now, draining="")
            self._report_boot_outcome("success")
            self._log.info("probes succeeded, instance is in service", extra=self._fields())
        elif verdict.drain and not v.draining:
            # Found at startup running containers but failing its boot probe: drain it, for as
            # long as that lasts; the operator's setting (and the tag) stay as they are.
            self._log.info("crunch-run probe succeeded, but boot probe is still failing; draining",
                           extra=self._fields(RunningContainers=len(self._runners)))
            self._set(draining="boot probe failing")
        elif verdict.state is not v.state:
            self._set(state=verdict.state)

    def _update_running(self, uuids: list[str], now: float, list_at: float) -> None:
        listed = set(uuids)
        for uuid in uuids:
            r = self._runners.get(uuid)
            if r is None:
                self._log.info("crunch-run process detected", extra=self._fields(ContainerUUID=uuid))
                self._runners[uuid] = _Runner(uuid, now, starting=False, seq=next(self._seq))
            elif r.starting:
                r.starting = False
        for uuid, r in list(self._runners.items()):
            if uuid not in listed and not r.starting:
                self._close_runner(uuid, now, list_at)
        self._set()

    def _probe_failed(self, started: float, now: float, booted: bool, boot_err: str) -> None:
        """Go measures from the probe's start, so a probe that began before the timeout but failed
        after it does not shut down an instance that had recovered in time."""
        v = self._view
        if not unresponsive(v, started, self._cfg):
            return
        dur = started - v.probed
        new = v.state in (State.UNKNOWN, State.BOOTING)
        self._log.warning(("new " if new else "") + "instance unresponsive, shutting down" +
                          (" -- `dispatch-cloud cloudtest` might help troubleshoot" if new else ""),
                          extra=self._fields(Duration=round(dur, 3), Since=v.probed, State=str(v.state)))
        self._shutdown(now, "unresponsive")
        if not booted:
            self._report_boot_outcome("failure")
            self._log.info("boot failed", extra=self._fields(Duration=round(dur, 3), stderr=boot_err[-2000:]))
