"""A deterministic simulation: the real actors, a FakeClock, the stub cloud, and the container
API as an in-process SQLite store.

``step(dt)`` moves the clock from event to event (the next actor deadline or stub-cloud event),
delivers the ticks that are due, and runs until every mailbox and background job is drained
before moving on. No sleeps, no wall clock: a simulated day costs what its events cost.

By default the actors run on :class:`actors.simruntime.SimRuntime` (one thread, messages in send
order), so a seed fixes the whole run: container uuids, stub cloud draws, probe jitter and the
order of every message. ``runtime="threads"`` runs them on pykka's threads as in production
(for tests that call the actors from other threads, such as the management API's).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable

from actors.base import ACTIVITY
from cloud.clock import FakeClock
from actors.service import Dispatcher, instance_set_id
from actors.simruntime import SimRuntime
from actors.ticker import Ticker

log = logging.getLogger("dispatch.sim")

START = 1_700_000_000.0


class Simulation:
    def __init__(self, cluster, *, stub_params=None, seed: int = 0, store=None, cloud=None,
                 clock: FakeClock | None = None, metrics: bool = True, runtime: str = "deterministic",
                 wrap_api=None, worker_reports=None):
        """``wrap_api(client, role)`` wraps every container API client made here (role
        "dispatcher", or "crunch-run" for the stub VMs' runners), and ``worker_reports(proxy)``
        the scheduler proxy the workers report to: fault-injecting simulations use both (with
        ``runtime="threads"``: they park threads)."""
        from api.arvados.inprocess import LocalArvadosClient
        from api.arvados.store import ContainerStore
        from cloud.stub.driver import StubCloud, StubParams
        self.cluster = cluster
        if runtime not in ("deterministic", "threads"):
            raise ValueError(f"runtime: expected 'deterministic' or 'threads', got {runtime!r}")
        self.runtime = SimRuntime() if runtime == "deterministic" else None
        self.clock = clock or FakeClock(START)
        self.store = store or ContainerStore(":memory:", cluster_id=cluster.cluster_id,
                                             max_dispatch_attempts=cluster.containers.max_dispatch_attempts,
                                             clock=self.clock, rng=random.Random(f"uuids:{seed}"))
        self.token = cluster.system_root_token
        if self.store.authenticate(self.token) is None:  # a restart reuses the same store
            self.store.add_token(self.token, admin=True)
        wrap = wrap_api or (lambda client, role: client)
        self.api = wrap(LocalArvadosClient(self.store, self.token), "dispatcher")
        params = stub_params if stub_params is not None else StubParams.from_driver_parameters(
            cluster.cloud_vms.driver_parameters, "DriverParameters")
        self.cloud = cloud or StubCloud(self.clock, params, seed=seed, cluster=cluster,
                                        api_factory=lambda host, token, **kw: wrap(LocalArvadosClient(self.store, token),
                                                                                   "crunch-run"))
        self.cloud.configure(cluster)
        self.metrics = None
        if metrics:
            from api.metrics import DispatchMetrics
            self.metrics = DispatchMetrics(cluster, clock=self.clock.now, window_clock=self.clock.now)
        self.ticker = Ticker(self.clock)
        self.dispatcher = Dispatcher(cluster, clock=self.clock, ticker=self.ticker,
                                     driver_set=self.cloud.instance_set(instance_set_id(cluster.system_root_token)),
                                     api_client=self.api, metrics=self.metrics, seed=seed,
                                     runtime=self.runtime, worker_reports=worker_reports)
        self._started = False
        # Set by fault-injecting simulations that park calls until a simulated time: while it
        # says some are parked, a step may move the clock on although work waits behind them.
        self.blocked: Callable[[], object] | None = None
        self._stuck: tuple | None = None
        self.unsettled = 0  # instants a fault-injecting run moved on from without settling

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> Simulation:
        self.dispatcher.start(start_ticker=False)
        self._started = True
        self.settle()
        return self

    def stop(self) -> None:
        if self._started:
            self.settle()
            self.dispatcher.stop()
            self._started = False

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- time -----------------------------------------------------------------------------------------

    @property
    def now(self) -> float:
        return self.clock.now()

    def settle(self, max_rounds: int = 10_000) -> None:
        """Deliver everything due at the current instant until nothing more happens."""
        rt = self.runtime
        if rt is not None:
            now = self.clock.now()
            for _ in range(max_rounds):
                rt.run()
                if not self.cloud.advance() and not self.ticker.fire_due(now) and not rt.pending:
                    return
            raise RuntimeError(f"simulation did not settle at t={self.now - START:.3f}")
        for _ in range(max_rounds):
            self._wait()
            ran = self.cloud.advance()
            fired = self.ticker.fire_due(self.clock.now())
            if not ran and not fired:
                stuck = self._wait()
                if (self.ticker.next_deadline() or float("inf")) > self.clock.now() and (
                        ACTIVITY.pending == 0 or stuck):
                    return
        if self.blocked is not None and (self.ticker.next_deadline() or float("inf")) > self.clock.now():
            # A fault-injecting run: nothing is due at this instant, yet work keeps beginning and
            # ending on some thread. Let time move on, and say so (the harness counts these).
            self.unsettled += 1
            log.warning("simulation did not settle; moving on", extra={"t": self.now - START,
                                                                       "busy": self._busy_report()})
            return
        raise RuntimeError(f"simulation did not settle at t={self.now - START:.3f} "
                           f"({self._busy_report()})")

    def _busy_report(self) -> str:
        """Who keeps the instant busy: actors due now, the next cloud events, work pending."""
        import pykka
        now = self.clock.now()
        due = []
        for key, when in list(self.ticker._due.items()):
            if when <= now:
                ref = pykka.ActorRegistry.get_by_urn(key)
                due.append(ref.actor_class.__name__ if ref is not None else str(key))
        events = [label for at, _, label, _ in sorted(self.cloud._events)[:5] if at <= now]
        return f"due: {sorted(due)}; cloud events due: {events}; pending: {ACTIVITY.pending}"

    def _wait(self) -> bool:
        """Wait for the actor system to go idle; True if it is stuck behind parked calls
        (see ``blocked`` and :meth:`actors.base.Activity.wait_settled`)."""
        if self.blocked is None:
            ACTIVITY.wait_idle()
            return False
        self._stuck = ACTIVITY.wait_settled(self.blocked, known=self._stuck)
        return self._stuck is not None

    def _next_event(self) -> float | None:
        ts = [t for t in (self.ticker.next_deadline(), self.cloud.next_event_time()) if t is not None]
        return min(ts) if ts else None

    def step(self, dt: float) -> None:
        """Advance simulated time by ``dt``, event by event."""
        target = self.clock.now() + dt
        self.settle()
        while True:
            nxt = self._next_event()
            if nxt is None or nxt > target:
                self.clock.set(max(target, self.clock.now()))
                self.settle()
                return
            if nxt > self.clock.now():
                self.clock.set(nxt)
            self.settle()

    def run_until(self, cond: Callable[[], bool], max_seconds: float, step: float = 1.0) -> float:
        """Step until ``cond()`` holds; returns the simulated seconds it took. Fails past the limit."""
        t0 = self.now
        while not cond():
            if self.now - t0 >= max_seconds:
                raise AssertionError(f"condition not met after {max_seconds} simulated seconds")
            self.step(step)
        return self.now - t0

    # -- conveniences for tests ----------------------------------------------------------------------

    @property
    def snapshot(self):
        return self.dispatcher.box.snapshot

    def submit(self, **fields) -> str:
        base = {"command": ["true"], "priority": 1, "container_image": "arvados/jobs",
                "runtime_constraints": {"vcpus": 1, "ram": 256 << 20}, "output_path": "/out", "cwd": "/"}
        base.update(fields)
        return self.api.create_container(base)["uuid"]

    def containers(self) -> list[dict]:
        return list(self.api.iter_containers(select=["uuid", "state", "priority", "exit_code",
                                                     "runtime_status", "lock_count", "locked_by_uuid"]))

