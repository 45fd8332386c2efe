"""actors.lifecycle: what a probe round means for a worker, and when it wakes (tables).

(Shutdown eligibility is tabled in test_worker.py, next to the Arvados trials it ports.)"""

from __future__ import annotations

import pytest

from actors.lifecycle import (AfterProbe, after_probe, next_wake, probe_failed, stale_lock,
                              unresponsive, wants_run_probe)
from actors.messages import Behavior, State, WorkerView
from conf.model import CloudVMs
from tests.simcluster import instance_type

S, B = State, Behavior
CFG = CloudVMs(timeout_booting=60.0, timeout_probe=10.0, timeout_idle=30.0)
T0 = 1000.0


def view(state=S.IDLE, behavior=B.RUN, running=(), probed=T0, busy=T0, appeared=T0, probe_done=True):
    return WorkerView(instance_id="i", instance_type=instance_type(1), state=state,
                      idle_behavior=behavior, address="", provider_type="", running=running,
                      busy=busy, appeared=appeared, probed=probed, probe_done=probe_done)


@pytest.mark.parametrize("state,booted,want", [
    (S.BOOTING, False, False), (S.BOOTING, True, True), (S.UNKNOWN, False, True),
    (S.IDLE, True, True), (S.RUNNING, True, True),
])
def test_wants_run_probe(state, booted, want):
    assert wants_run_probe(state, booted) is want


@pytest.mark.parametrize("ok,booted,listed,runners,want", [
    (False, True, [], False, True),     # the run probe failed
    (True, True, [], False, False),     # booted, nothing running: a good answer
    (True, False, [], False, True),     # not booted and nothing found: still failing
    (True, False, ["u"], False, False),  # not booted, but runs containers (adopted)
    (True, False, [], True, False),     # not booted, but we know it has runners
])
def test_probe_failed(ok, booted, listed, runners, want):
    assert probe_failed(ok, booted, listed, runners) is want


@pytest.mark.parametrize("state,behavior,booted,runners,want", [
    (S.BOOTING, B.RUN, True, False, AfterProbe(S.IDLE, ready=True)),
    (S.BOOTING, B.RUN, True, True, AfterProbe(S.RUNNING, ready=True)),
    (S.UNKNOWN, B.HOLD, True, False, AfterProbe(S.IDLE, ready=True)),
    (S.UNKNOWN, B.RUN, False, True, AfterProbe(S.UNKNOWN, drain=True)),  # boot probe failing
    (S.UNKNOWN, B.DRAIN, False, True, AfterProbe(S.UNKNOWN)),  # already draining
    (S.IDLE, B.RUN, True, True, AfterProbe(S.RUNNING)),
    (S.RUNNING, B.RUN, True, False, AfterProbe(S.IDLE)),
    (S.RUNNING, B.RUN, True, True, AfterProbe(S.RUNNING)),
    (S.IDLE, B.RUN, True, False, AfterProbe(S.IDLE)),
])
def test_after_probe(state, behavior, booted, runners, want):
    assert after_probe(state, behavior, booted, runners) == want


@pytest.mark.parametrize("stale,since,now,want", [
    (False, 990.0, T0, (None, False)),   # no stale lock: forget it
    (True, None, T0, (T0, False)),       # first seen now
    (True, 990.0, T0, (990.0, False)),   # 10 s: not longer than the timeout
    (True, 989.0, T0, (989.0, True)),    # 11 s: report broken
])
def test_stale_lock(stale, since, now, want):
    assert stale_lock(stale, since, now, 10.0) == want


@pytest.mark.parametrize("v,now,want", [
    (view(S.BOOTING, probed=T0), T0 + 59, False),
    (view(S.BOOTING, probed=T0), T0 + 60, True),   # TimeoutBooting while new
    (view(S.UNKNOWN, probed=T0), T0 + 60, True),
    (view(S.IDLE, probed=T0), T0 + 9, False),
    (view(S.IDLE, probed=T0), T0 + 10, True),      # TimeoutProbe once in service
    (view(S.IDLE, B.HOLD, probed=T0), T0 + 999, False),  # never on hold
    (view(S.SHUTDOWN, probed=T0), T0 + 999, False),
])
def test_unresponsive(v, now, want):
    assert unresponsive(v, now, CFG) is want


@pytest.mark.parametrize("v,next_probe,signals,want", [
    (view(S.RUNNING), T0 + 5, (), T0 + 5),
    (view(S.IDLE, busy=T0 - 28), T0 + 5, (), T0 + 2),         # idle timeout first
    (view(S.IDLE, B.HOLD, busy=T0 - 28), T0 + 5, (), T0 + 5),  # no idle timeout on hold
    (view(S.UNKNOWN, appeared=T0 - 58), T0 + 5, (), T0 + 2),  # boot timeout of an unknown VM
    (view(S.UNKNOWN, running=("u",), appeared=T0 - 58), T0 + 5, (), T0 + 5),  # not while it runs
    # nor on hold, nor before its first probe: the tick could not act at that deadline, and once
    # past it woke the worker again at once, for ever (a busy loop)
    (view(S.UNKNOWN, B.HOLD, appeared=T0 - 300), T0 + 5, (), T0 + 5),
    (view(S.UNKNOWN, appeared=T0 - 300, probe_done=False), T0 + 5, (), T0 + 5),
    (view(S.RUNNING), T0 + 5, (T0 + 1, T0 + 3), T0 + 1),      # a kill signal
    (view(S.SHUTDOWN), T0 + 5, (T0 + 1,), None),
])
def test_next_wake(v, next_probe, signals, want):
    assert next_wake(v, next_probe, CFG, signals) == want
