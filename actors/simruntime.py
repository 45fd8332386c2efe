"""A deterministic single-threaded runtime for the actors, for simulations.

The same actor classes that run on pykka's threads in production run here on the caller's
thread: every ``tell``/``ask``/``defer`` to an actor started on this runtime, and every job an
actor hands off its mailbox (:meth:`actors.base.BaseActor._off_mailbox`), goes into one FIFO
queue, and :meth:`SimRuntime.run` handles them one at a time in the order they were sent. An
actor's ``on_start`` is queued when it starts, so it runs before any message to it. A reply's
``get()`` from outside a handler runs the queue until the reply is set.

So a simulation's order of events depends only on its inputs: the same seed gives the same
run on any machine at any load, and no message costs a thread hand-off (which dominated the
simulated day's profile on threads). What pykka's threads give that this does not: a blocking
call in one actor does not stall the others — in a simulation nothing blocks (FakeClock, stub
cloud, in-process API) — and an ``ask(...).get()`` inside a handler, which the design forbids
anyway (rule 2), raises here instead of deadlocking.

Production keeps pykka's threads; :mod:`actors.sim` chooses this runtime.
"""

from __future__ import annotations

import logging
import sys
from collections import deque

import pykka
from pykka import messages as pykka_messages

from actors.base import ACTIVITY, starting_on

log = logging.getLogger("pykka")
log_jobs = logging.getLogger("dispatch.sim")

_START = object()  # the queue item that runs an actor's on_start


class SimInbox:
    """One actor's inbox on a :class:`SimRuntime`: puts go to the runtime's single queue."""

    __slots__ = ("runtime", "actor", "pending")

    def __init__(self, runtime: SimRuntime):
        self.runtime = runtime
        self.actor = None
        self.pending = 0

    def put(self, envelope, block=True, timeout=None) -> None:
        ACTIVITY.begin()
        if envelope.reply_to is not None:
            envelope.reply_to.runtime = self.runtime
        self.pending += 1
        self.runtime._queue.append((self, envelope))

    def get(self, block=True, timeout=None):
        raise RuntimeError("a simulation runtime's inbox is read by the runtime only")

    def empty(self) -> bool:
        return self.pending == 0

    def qsize(self) -> int:
        return self.pending

    def adopt(self, actor) -> None:
        """Called instead of starting a thread: queue the actor's on_start."""
        self.actor = actor
        self.runtime._queue.append((self, _START))

    def submit(self, job) -> None:
        """A job the actor hands off its mailbox: run it in queue order."""
        self.runtime._queue.append((None, job))


class SimRuntime:
    """Runs actors started with :meth:`start` on the calling thread, in send order."""

    def __init__(self):
        self._queue: deque = deque()
        self._depth = 0  # > 0 while a handler runs
        self.handled = 0  # queue items run so far (messages, starts, jobs)

    # -- starting actors --------------------------------------------------------------------------

    def inbox(self) -> SimInbox:
        return SimInbox(self)

    def start(self, cls, *args, **kwargs):
        """``cls.start(...)`` on this runtime; returns the ActorRef."""
        prev = starting_on(self)
        try:
            return cls.start(*args, **kwargs)
        finally:
            starting_on(prev)

    # -- running -------------------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        return len(self._queue)

    def run(self, limit: int | None = None) -> int:
        """Handle queued items until the queue is empty (or ``limit`` items); returns how many."""
        q = self._queue
        n = 0
        while q and (limit is None or n < limit):
            inbox, item = q.popleft()
            self._run_one(inbox, item)
            n += 1
        self.handled += n
        return n

    def run_until_set(self, future) -> None:
        """Run the queue until ``future`` has a result; pykka.Timeout if it never will."""
        if self._depth:
            raise RuntimeError("blocking get() inside an actor handler on the simulation runtime "
                               "(actor -> actor is tell only)")
        q = self._queue
        while future._result is None and q:
            inbox, item = q.popleft()
            self._run_one(inbox, item)
            self.handled += 1
        if future._result is None:
            raise pykka.Timeout("the simulation ran out of messages before the reply was set")

    def _run_one(self, inbox, item) -> None:
        self._depth += 1
        try:
            if inbox is None:  # a background job (already counted by actors.base.background)
                try:
                    item()
                except Exception:  # as a pool thread would: the job's owner may have stopped
                    log_jobs.warning("background job failed", exc_info=True)
                return
            actor = inbox.actor
            if item is _START:
                actor._actor_loop_setup()
                return
            inbox.pending -= 1
            if actor.actor_stopped.is_set():
                self._dead_letter(actor, item)
                return
            self._handle(actor, item)
        finally:
            self._depth -= 1

    @staticmethod
    def _dead_letter(actor, envelope) -> None:
        """A message for an actor that has stopped: as pykka's loop teardown treats it."""
        ACTIVITY.end()
        reply = envelope.reply_to
        if reply is None:
            return
        if isinstance(envelope.message, pykka_messages._ActorStop):  # noqa: SLF001
            reply.set(None)
        else:
            err = pykka.ActorDeadError(f"{actor.actor_ref} stopped before handling the message")
            reply.set_exception(exc_info=(pykka.ActorDeadError, err, None))

    @staticmethod
    def _handle(actor, envelope) -> None:
        """One turn of pykka's actor loop (``Actor._actor_loop_running``) for one envelope."""
        try:
            response = actor._handle_receive(envelope.message)
            if envelope.reply_to is not None:
                envelope.reply_to.set(response)
        except Exception:
            if envelope.reply_to is not None:
                log.info(f"Exception returned from {actor} to caller:", exc_info=sys.exc_info())
                envelope.reply_to.set_exception()
            else:
                actor._handle_failure(*sys.exc_info())
                try:
                    actor.on_failure(*sys.exc_info())
                except Exception:
                    actor._handle_failure(*sys.exc_info())
