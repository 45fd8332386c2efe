"""The scheduler's index of which workers report a container running (``_holders``) must say
exactly what a scan of every worker's view says, whatever order listings, reports, starts,
lock answers and a dead worker actor come in: the G2 check on a lock's answer trusts it."""
from __future__ import annotations

import pykka
from hypothesis import given, settings, strategies as st

from actors.messages import State
from tests.test_scenarios import Sched

IIDS = ("i-1", "i-2", "i-3")
UUIDS = tuple(f"zzzzz-dz642-{x * 15}" for x in "abcd")

_step = st.one_of(
    st.tuples(st.just("list"), st.sets(st.sampled_from(IIDS))),
    st.tuples(st.just("report"), st.sampled_from(IIDS),
              st.sets(st.sampled_from(UUIDS), max_size=2), st.integers(0, 3)),
    st.tuples(st.just("poll"), st.sampled_from(UUIDS), st.sampled_from(("Queued", "Locked", "Running"))),
    st.tuples(st.just("lock_ok"), st.sampled_from(UUIDS)),
    st.tuples(st.just("tick"), st.integers(0, 5)),
    st.tuples(st.just("die"), st.sampled_from(IIDS)),
)


def _scan(s) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for iid, w in s._workers.items():
        for u in w.view.running:
            out.setdefault(u, set()).add(iid)
    return out


@settings(max_examples=150, deadline=None)
@given(st.lists(_step, max_size=25))
def test_holders_index_matches_a_scan_of_every_worker(steps):
    s = Sched()
    s.list(*IIDS)
    s.report(*(s.view(iid, State.IDLE) for iid in IIDS))  # probed: the scheduling gate opens
    for step in steps:
        op = step[0]
        if op == "list":
            s.list(*sorted(step[1]))
        elif op == "report":
            _, iid, running, seen = step
            if iid in s.s._workers:
                state = State.RUNNING if running else State.IDLE
                s.report(s.view(iid, state, running=running, starts_seen=seen))
        elif op == "poll":
            s.poll(s.entry(step[1], step[2]))
        elif op == "lock_ok":
            s.s.container_op_done(step[1], "lock", s.entry(step[1], "Locked"), "")
        elif op == "tick":
            s.tick(step[1])
        elif op == "die" and step[1] in s.workers:
            # the next message to this worker actor finds it dead: a fresh one takes over
            s.workers[step[1]].start_container.side_effect = pykka.ActorDeadError("gone")
            s.workers[step[1]].update_instance.side_effect = pykka.ActorDeadError("gone")
        assert {u: set(h) for u, h in s.s._holders.items()} == _scan(s.s), step
