"""One worker's decisions as pure functions: what a probe means, when it goes, when it wakes.

The WorkerActor keeps the state (its view, its runners, the executor) and does the I/O; these
say what follows from a probe's answers or from the clock, so they are tested with tables.
Behaviour is Arvados ``worker/worker.go`` (probeAndUpdate, shutdownIfIdle), with the
differences the worker module's docstring names.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from actors.messages import Behavior, State, WorkerView
from conf.model import CloudVMs

NEW = (State.UNKNOWN, State.BOOTING)


def wants_run_probe(state: State, booted: bool) -> bool:
    """``crunch-run --list`` runs once booted, and on an unknown (adopted) VM even before, to find
    containers it may already be running."""
    return booted or state is State.UNKNOWN


def probe_failed(ok: bool, booted: bool, listed: list[str], has_runners: bool) -> bool:
    """A probe round failed: the run probe did not answer, or a VM not yet booted showed nothing."""
    return not ok or (not booted and not listed and not has_runners)


@dataclass(frozen=True)
class AfterProbe:
    state: State  # the worker's state after a successful probe round
    ready: bool = False  # it just came into service (boot outcome: success)
    drain: bool = False  # found running containers while its boot probe fails: drain it


def after_probe(state: State, behavior: Behavior, booted: bool, has_runners: bool) -> AfterProbe:
    """The state after a successful probe round, given what the run probe found."""
    if booted and state in NEW:
        return AfterProbe(State.RUNNING if has_runners else State.IDLE, ready=True)
    if state is State.UNKNOWN and has_runners:
        return AfterProbe(state, drain=behavior is Behavior.RUN)
    if state is State.IDLE and has_runners:
        return AfterProbe(State.RUNNING)
    if state is State.RUNNING and not has_runners:
        return AfterProbe(State.IDLE)
    return AfterProbe(state)


def stale_lock(any_stale: bool, since: float | None, now: float,
               timeout: float) -> tuple[float | None, bool]:
    """(when the stale run lock was first seen, whether to report the VM broken now): a lock
    left by a dead crunch-run is reported broken once it stays longer than TimeoutStaleRunLock."""
    if not any_stale:
        return None, False
    if since is None:
        return now, False
    return since, now - since > timeout


def unresponsive(view: WorkerView, now: float, cfg: CloudVMs) -> bool:
    """After a failed probe: has it failed for too long (TimeoutBooting while new, else
    TimeoutProbe, counted from the last successful probe)? Never on hold or once shut down.

    An adopted (unknown, draining) worker with containers also ends up here once its run probe
    fails: ``probed`` is its last successful run probe, so it goes only after TimeoutBooting
    without any answer, as in Arvados; while the run probe answers it stays.
    """
    if view.state is State.SHUTDOWN or view.idle_behavior is Behavior.HOLD:
        return False
    limit = cfg.timeout_booting if view.state in NEW else cfg.timeout_probe
    return now - view.probed >= limit


def age_deadline(view: WorkerView, timeout_idle: float, timeout_booting: float) -> float | None:
    """When this worker becomes due for shutdown by age alone (None: never by age). The one rule
    both :func:`eligible_for_shutdown` and :func:`next_wake` read, so the worker never books a
    deadline at which its tick cannot act (that drift once woke an unknown VM for ever).

    Idle: TimeoutIdle after it was last busy. Unknown: never while it runs containers (the seed:
    drain, don't kill), nor before a first probe has had the chance to find its containers; then,
    as in Arvados, TimeoutBooting after it appeared. Never on hold."""
    if view.idle_behavior is Behavior.HOLD:
        return None
    if view.state is State.IDLE:
        return view.busy + timeout_idle
    if view.state is State.UNKNOWN and not view.running and view.probe_done:
        return view.appeared + timeout_booting
    return None


def eligible_for_shutdown(view: WorkerView, now: float, timeout_idle: float,
                          timeout_booting: float, all_given_up: bool) -> bool:
    """Should this worker be shut down now, by its idle behaviour and state?

    Ages are compared as ``now >= start + timeout``, the very deadline the worker asks the Ticker
    for: ``now - start`` can round below the timeout at that instant (T0 + 0.3 - T0 < 0.3), and a
    simulation would then wake the worker at the same time forever.
    """
    b, s = view.idle_behavior, view.state
    if b is Behavior.HOLD or s is State.SHUTDOWN:
        return False
    if s in (State.BOOTING, State.IDLE) and b is Behavior.DRAIN:
        return True
    if s is State.BOOTING:
        return False
    if s is State.RUNNING:
        return b is Behavior.DRAIN and all_given_up
    # idle, unknown: by age only (drain does not hurry an unknown VM: a failed probe has not
    # shown it idle)
    due = age_deadline(view, timeout_idle, timeout_booting)
    return due is not None and now >= due


def next_wake(view: WorkerView, next_probe: float, cfg: CloudVMs,
              signals: Iterable[float] = ()) -> float | None:
    """The worker's next deadline: its probe, its idle or boot timeout, or the next kill signal
    of a runner being killed (giving up happens at a signal time after TimeoutTERM, as with
    Arvados' signal ticker, so there is never a wake that does nothing). None once shut down:
    a VM still listed long after destroy is retried by the next sync, nothing to time here."""
    if view.state is State.SHUTDOWN:
        return None
    due = age_deadline(view, cfg.timeout_idle, cfg.timeout_booting)
    return min([next_probe, *signals, *([] if due is None else [due])])

