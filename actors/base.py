"""What every actor here shares: a counted inbox (for the ``wait_idle`` barrier) and a failure policy.

``ACTIVITY`` counts work in flight across the whole actor system: every message put in an inbox,
and every background job an actor hands to a thread pool. It drops back to zero only when all
mailboxes are drained and no job is running, which is what a simulation step waits for. In
production the counter costs one lock per message and is never waited on.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
from collections.abc import Callable

import pykka

log = logging.getLogger("dispatch.actors")


class Activity:
    """A counter of in-flight work with a barrier: ``wait_idle`` returns when it is zero."""

    def __init__(self):
        self._n = 0
        self._changes = 0  # every begin/end: a barrier that sees it stand still knows nothing moves
        self._cond = threading.Condition()
        self._stall_waiters = 0
        self._forgiven = 0  # counts dropped by reset whose end may still come

    def begin(self, n: int = 1) -> None:
        with self._cond:
            self._n += n
            self._changes += 1
            if self._stall_waiters:
                self._cond.notify_all()

    def end(self, n: int = 1) -> None:
        with self._cond:
            self._n -= n
            self._changes += 1
            if self._n < 0 and self._forgiven:
                paid = min(self._forgiven, -self._n)
                self._forgiven -= paid
                self._n += paid
            under = -self._n if self._n < 0 else 0
            if self._n <= 0:
                self._n = 0
                self._cond.notify_all()
            elif self._stall_waiters:
                self._cond.notify_all()
        if under:
            # More ends than begins: the count is wrong from here on (a later begin it cannot
            # pair leaves the barrier waiting forever). Say so where it happens.
            log.error("activity count went below zero", extra={"by": under})

    @property
    def pending(self) -> int:
        return self._n

    def reset(self) -> int:
        """Forget every count (a test that leaked some must not stall the next); returns how many.
        Should that work end after all, its end is not taken from later work."""
        with self._cond:
            n, self._n = self._n, 0
            self._forgiven += n
            self._changes += 1
            self._cond.notify_all()
        return n

    def wait_idle(self, timeout: float = 30.0) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: self._n == 0, timeout=timeout):
                raise TimeoutError(f"actor system still busy after {timeout}s ({self._n} pending)")

    def wait_settled(self, blocked: Callable[[], object], stall: float = 0.01, timeout: float = 30.0,
                      known: tuple | None = None) -> tuple | None:
        """Like :meth:`wait_idle`, for a simulation where some calls are slow on purpose (parked
        until a later simulated time). ``blocked()`` is None when no call is parked, else a token
        that changes with every park and release. Returns None when idle; else, once what is left
        waits behind parked calls (nothing has begun or ended for ``stall`` seconds), the stall as
        ``(token, pending)``. Given a stall already seen (``known``), the same token with the same
        pending count is the same stall (only a release can shrink stuck work): no waiting."""
        waited = 0.0
        with self._cond:
            self._stall_waiters += 1
            try:
                while True:
                    if self._n == 0:
                        return None
                    if known is not None and (blocked(), self._n) == known:
                        return known
                    seen = self._changes
                    self._cond.wait(stall)
                    if self._n == 0:
                        return None
                    if self._changes == seen:
                        token = blocked()
                        if token is not None:
                            return (token, self._n)
                        waited += stall
                        if waited >= timeout:
                            raise TimeoutError(f"actor system still busy after {timeout}s ({self._n} pending)")
            finally:
                self._stall_waiters -= 1


ACTIVITY = Activity()


class _CountingQueue(queue.Queue):
    """An inbox that counts what is put in it, until its actor's loop closes it.

    pykka checks that an actor is alive, then puts: a message from another thread can land after
    the stopped actor has drained its inbox for the last time. Counted, it would never be handled
    nor uncounted; so once closed, a put is refused as pykka refuses a message to a dead actor."""

    def __init__(self):
        super().__init__()
        self._gate = threading.Lock()
        self._closed = False

    def put(self, item, block=True, timeout=None):
        with self._gate:
            if not self._closed:
                ACTIVITY.begin()
                super().put(item, block, timeout)
                return
        reply = getattr(item, "reply_to", None)
        if reply is not None:
            err = pykka.ActorDeadError("actor stopped before the message was put in its inbox")
            reply.set_exception(exc_info=(pykka.ActorDeadError, err, None))

    def close(self) -> int:
        """Take no more messages; returns how many are left in the inbox (counted, never handled)."""
        with self._gate:
            self._closed = True
            return self.qsize()


# What the current thread runs that the barrier counts: a message being handled, a background job.
_held = threading.local()


def holds_count() -> bool:
    """Whether the calling thread runs counted work (a handler or a :func:`background` job). A
    thread that such work started itself (say, a pool inside a job) holds nothing of its own."""
    return getattr(_held, "n", 0) > 0


def background(fn: Callable, *args) -> Callable[[], None]:
    """Wrap a job for a thread pool so the barrier counts it from submission to completion."""
    ACTIVITY.begin()

    def run():
        _held.n = getattr(_held, "n", 0) + 1
        try:
            fn(*args)
        except pykka.ActorDeadError as e:
            log.debug("result dropped: its actor has stopped", extra={"error": str(e)})
        finally:
            _held.n -= 1
            ACTIVITY.end()

    return run


# The runtime an actor being constructed on this thread joins (None: its own pykka thread).
# Set only around ``Actor.start`` by :meth:`actors.simruntime.SimRuntime.start`.
_starting = threading.local()


def starting_on(runtime) -> object:
    """Make actors started on this thread join ``runtime`` (None: pykka threads); returns the
    previous setting, to restore."""
    prev = getattr(_starting, "runtime", None)
    _starting.runtime = runtime
    return prev


class Future(pykka.ThreadingFuture):
    """pykka's future; on a simulation runtime, ``get`` runs that runtime until the reply is set
    (there is no other thread to wait for)."""

    runtime = None

    def get(self, *, timeout: float | None = None):
        if self.runtime is not None and self._result is None and self._get_hook is None:
            self.runtime.run_until_set(self)
        return super().get(timeout=timeout)
class BaseActor(pykka.ThreadingActor):
    """A pykka actor whose messages are counted and whose crashes are never silent.

    ``critical`` actors (the singletons) call ``on_crash`` when an exception escapes a handler,
    which the main program turns into a non-zero exit so a service manager restarts it.

    The same class runs on pykka's threads (production) or, in a simulation, on the single-thread
    :class:`actors.simruntime.SimRuntime`: the inbox decides (:func:`starting_on`).
    """

    use_daemon_thread = True
    critical = False
    on_crash: Callable[[BaseException], None] | None = None

    @staticmethod
    def _create_actor_inbox():
        rt = getattr(_starting, "runtime", None)
        return _CountingQueue() if rt is None else rt.inbox()

    @staticmethod
    def _create_future():
        return Future()

    def _start_actor_loop(self):
        adopt = getattr(self.actor_inbox, "adopt", None)
        if adopt is not None:
            adopt(self)
        else:
            super()._start_actor_loop()

    def _off_mailbox(self, fn: Callable, *args, pool=None, name: str = "") -> None:
        """Run ``fn(*args)`` away from this actor's mailbox (counted by the barrier): on
        ``pool``, else on a new daemon thread; on a simulation runtime, as its next job in order."""
        job = background(fn, *args)
        submit = getattr(self.actor_inbox, "submit", None)
        if submit is not None:
            submit(job)
        elif pool is not None:
            fut = pool.submit(job)
            # a job its pool's shutdown cancels never runs: uncount it, or the barrier waits forever
            fut.add_done_callback(lambda f: ACTIVITY.end() if f.cancelled() else None)
        else:
            threading.Thread(target=job, name=name or None, daemon=True).start()

    def _handle_receive(self, message):
        _held.n = getattr(_held, "n", 0) + 1
        try:
            return super()._handle_receive(message)
        except pykka.ActorDeadError as e:
            # A peer stopped first: the dispatcher is stopping (in order, but a message already in
            # this inbox can outlive the peer it reports to). Not a crash of this actor.
            log.info("message to a stopped actor dropped", extra={"actor": type(self).__name__, "error": str(e)})
            return None
        finally:
            _held.n -= 1
            ACTIVITY.end()

    def _actor_loop_teardown(self):
        # Messages left in the inbox of a stopped actor will never be handled: uncount them, and
        # take no more (a put racing the stop would be counted forever).
        close = getattr(self.actor_inbox, "close", None)
        n = close() if close is not None else self.actor_inbox.qsize()
        super()._actor_loop_teardown()
        if n:
            ACTIVITY.end(n)

    def on_failure(self, exc_type, exc_value, tb):
        log.error("actor crashed", extra={"actor": type(self).__name__, "error": repr(exc_value)},
                  exc_info=(exc_type, exc_value, tb))
        if self.critical and self.on_crash is not None:
            self.on_crash(exc_value)


class TickedActor(BaseActor):
    """An actor woken by the :class:`actors.ticker.Ticker` at the deadlines it books.

    It registers with the Ticker when it starts (and books :meth:`next_wake`), unregisters when
    it stops; :meth:`wake_at` books a deadline, after which the Ticker tells it ``tick(now)``.
    Subclasses that extend ``on_start``/``on_stop`` call ``super()``.
    """

    def __init__(self, ticker):
        super().__init__()
        self._ticker = ticker

    def next_wake(self) -> float | None:
        """The deadline to book now (on start, and whenever a subclass reschedules); None: none."""
        raise NotImplementedError

    def tick(self, now: float) -> None:
        raise NotImplementedError

    def on_start(self) -> None:
        self._self = self.actor_ref.proxy()
        self._ticker.register(self.actor_urn, self._deliver_tick)
        when = self.next_wake()
        if when is not None:
            self.wake_at(when)

    def on_stop(self) -> None:
        self._ticker.unregister(self.actor_urn)

    def _deliver_tick(self, now: float) -> None:
        self._self.tick.defer(now)

    def wake_at(self, when: float) -> None:
        self._ticker.schedule(self.actor_urn, when)


def dump_threads() -> str:
    """Every thread's stack, for SIGUSR1."""
    import traceback
    frames = sys._current_frames()
    out = []
    for t in threading.enumerate():
        f = frames.get(t.ident)
        if f is not None:
            out.append(f"Thread {t.name} ({t.ident}):\n" + "".join(traceback.format_stack(f)))
    return "\n".join(out)


def small_thread_stacks() -> None:
    """One thread per worker VM: keep each stack's reservation small (RSS is what's touched)."""
    if os.environ.get("DISPATCH_CLOUD_THREAD_STACK") != "default":
        threading.stack_size(512 * 1024)
