"""The composition root: build the actors for one cluster, start them in order, stop them in reverse.

``Dispatcher`` is used three ways: by ``dispatch-cloud run`` (real clock, real driver), by the
simulation harness (FakeClock, stub cloud, in-process container API), and by tests. Stopping a
dispatcher never destroys a VM: the next one finds them by their InstanceSetID tag.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable

import pykka

from actors import dispatchlock
from actors.base import BaseActor, dump_threads, small_thread_stacks
from actors.inbox import InstanceSetInbox, QueueInbox, SchedulerAsks, SchedulerInbox, WorkerInbox, tell
from actors.instance_set import InstanceSetActor
from actors.queue import QueueActor
from actors.scheduler import NotFound as SchedNotFound
from actors.scheduler import SchedulerActor, SnapshotBox
from actors.ticker import Ticker
from actors.worker import WorkerActor
from actors.workerpools import WorkerPools
from cloud.base import OpsLimiter, wrap

log = logging.getLogger("dispatch.main")

ASK_TIMEOUT = 5.0


def instance_set_id(token: str) -> str:
    """Arvados: the UUID part of a v2 token, else the hex MD5 of the token."""
    if token.startswith("v2/"):
        return token.split("/")[1]
    return hashlib.md5(token.encode()).hexdigest()



class Dispatcher:
    def __init__(self, cluster, *, clock, driver_set, api_client, metrics=None, ticker=None,
                 logger=None, seed: int | None = None, runtime=None, worker_reports=None):
        from actors.instancetype import TypeChooser
        from cloud.ssh import executor_for, public_key_line
        self.cluster = cluster
        self.clock = clock
        self.ticker = ticker or Ticker(clock)
        self.box = SnapshotBox()
        self.metrics = metrics
        self.api_client = api_client
        self.driver_set = driver_set
        self.set_id = instance_set_id(cluster.system_root_token)
        self.seed = seed  # simulations seed each worker's probe jitter, so runs repeat exactly
        # where the actors run: None, pykka's threads; a simulation passes an actors.simruntime.SimRuntime
        self.runtime = runtime
        # what workers report to: the scheduler's proxy, or a simulation's wrapper around it
        # that delays reports (``worker_reports(proxy) -> proxy-like``)
        self._worker_reports = worker_reports or (lambda proxy: proxy)
        self.probe_limiter = OpsLimiter(cluster.cloud_vms.max_probes_per_second)
        self.worker_pools: WorkerPools | None = None  # the workers' SSH commands run here
        self.crashed = threading.Event()
        self.crash_error: BaseException | None = None
        self.instance_set = wrap(driver_set, resource_tags=cluster.cloud_vms.resource_tags,
                                 ops_counter=metrics.driver_operations if metrics else None,
                                 logger=logging.getLogger("dispatch.cloud"))
        if metrics is not None:
            metrics.set_snapshot_source(lambda: self.box.snapshot)
        self.chooser = TypeChooser(cluster)
        pub = public_key_line(cluster.containers.dispatch_private_key) if cluster.cloud_vms.deploy_public_key else None
        self._executor_for = executor_for
        self._public_key = pub
        self.scheduler = self.queue = self.iset = None  # the actors' proxies, once started
        self._scheduler_inbox: SchedulerInbox | None = None
        self._iset_inbox: InstanceSetInbox | None = None

    # -- actors ---------------------------------------------------------------------------------------

    def _on_crash(self, exc: BaseException) -> None:
        self.crash_error = exc
        self.crashed.set()

    def _start(self, cls, **kwargs):
        return cls.start(**kwargs) if self.runtime is None else self.runtime.start(cls, **kwargs)

    def _make_worker(self, info, it, state, behavior, now, secret):
        cluster, driver_set, metrics = self.cluster, self.driver_set, self.metrics
        handle = getattr(info.handle, "unwrapped", info.handle)

        def executor_factory(on_verified):
            return self._executor_for(cluster, driver_set, handle, secret=secret or None,
                                      on_verified=on_verified)

        return tell(self._start(
            WorkerActor, instance=info, instance_type=it, state=state, behavior=behavior, now=now,
            executor_factory=executor_factory, scheduler=self._worker_reports(self._scheduler_inbox),
            instance_set=self._iset_inbox, ticker=self.ticker, cluster=cluster, metrics=metrics,
            clock=self.clock,
            rng=None if self.seed is None else random.Random(f"{self.seed}:{info.id}"),
            probe_limiter=self.probe_limiter, pools=self.worker_pools).proxy(), WorkerInbox)

    def start(self, start_ticker: bool = True) -> None:
        small_thread_stacks()
        if self.runtime is None:  # a simulation runtime runs the jobs itself, in order
            self.worker_pools = WorkerPools.for_cluster(self.cluster)
        BaseActor.on_crash = staticmethod(self._on_crash)
        now = self.clock.now()
        quota_group = self.instance_set.instance_quota_group
        self.scheduler = self._start(
            SchedulerActor, cluster=self.cluster, set_id=self.set_id, ticker=self.ticker, box=self.box,
            worker_factory=self._make_worker, public_key=self._public_key,
            api_client=self.api_client, metrics=self.metrics, quota_group=quota_group,
            first_now=now).proxy()
        self._scheduler_inbox = tell(self.scheduler, SchedulerInbox)
        self.iset = self._start(
            InstanceSetActor, instance_set=self.instance_set, set_id=self.set_id, cluster=self.cluster,
            scheduler=self._scheduler_inbox, ticker=self.ticker, first_now=now).proxy()
        self._iset_inbox = tell(self.iset, InstanceSetInbox)
        self.queue = self._start(
            QueueActor, client=self.api_client, chooser=self.chooser, scheduler=self._scheduler_inbox,
            ticker=self.ticker, cluster=self.cluster, first_now=now).proxy()
        self.scheduler.wire(tell(self.queue, QueueInbox), self._iset_inbox).get(timeout=ASK_TIMEOUT)
        if start_ticker:
            self.ticker.start()
        log.info("dispatcher started", extra={"InstanceSetID": self.set_id,
                                              "Driver": self.cluster.cloud_vms.driver})

    def stop(self) -> None:
        """Stop in reverse order; leave every VM as it is."""
        self.ticker.stop()
        for proxy in (self.queue, self.iset, self.scheduler):
            if proxy is not None:
                try:
                    proxy.actor_ref.stop(block=True, timeout=10)
                except pykka.ActorDeadError:
                    pass
                except pykka.Timeout:
                    log.warning("actor did not stop in time", extra={"actor": str(proxy.actor_ref)})
        # workers are stopped by the scheduler's on_stop; wait for them to finish
        for ref in pykka.ActorRegistry.get_by_class(WorkerActor):
            try:
                ref.stop(block=True, timeout=10)
            except (pykka.ActorDeadError, pykka.Timeout):
                pass
        if self.worker_pools is not None:
            self.worker_pools.shutdown()
        if self.runtime is not None:
            self.runtime.run()  # what the stopped actors left queued (pool jobs) ends here

    # -- the management API's view (called from API threads) ---------------------------------------

    def backend(self):
        return ActorBackend(self)


class ActorBackend:
    """api.backend.Backend over the actors: asks the scheduler with a timeout, never waits longer."""

    def __init__(self, d: Dispatcher, timeout: float = ASK_TIMEOUT):
        self._d = d
        self._timeout = timeout

    def snapshot(self):
        return self._d.box.snapshot

    def _asks(self) -> SchedulerAsks:
        return self._d.scheduler  # a pykka proxy: each call returns a future

    def _ask(self, request: Callable[[SchedulerAsks], object]) -> None:
        from api.backend import BackendTimeout, NotFound
        try:
            request(self._asks()).get(timeout=self._timeout)
        except SchedNotFound as e:
            raise NotFound(str(e)) from None
        except pykka.Timeout:
            raise BackendTimeout("dispatcher is busy, try again") from None
        except pykka.ActorDeadError:
            raise BackendTimeout("dispatcher is stopping") from None

    def set_idle_behavior(self, instance_id: str, behavior: str) -> None:
        self._ask(lambda s: s.set_idle_behavior(instance_id, behavior))

    def kill_instance(self, instance_id: str, reason: str) -> None:
        self._ask(lambda s: s.kill_instance(instance_id, reason))

    def kill_container(self, uuid: str, reason: str) -> None:
        self._ask(lambda s: s.kill_container(uuid, reason))

    def dispatching(self) -> str:
        return ""

    def health(self) -> dict:
        if self._d.crashed.is_set():
            return {"health": "ERROR", "error": f"actor crashed: {self._d.crash_error!r}"}
        return {"health": "OK"}


def api_request_limit(cluster) -> int:
    """API.MaxConcurrentRequests / 4 (Arvados' default 64 -> 16), 0 (no limit) if it is 0."""
    n = cluster.api_max_concurrent_requests
    return max(1, n // 4) if n > 0 else 0


def build_real(cluster, clock):
    """The driver set, container API client and metrics for a real (non-simulated) run."""
    from api.metrics import DispatchMetrics
    from cloud import drivers
    from api.arvados.client import ArvadosClient
    from api.arvados.limiter import RequestLimiter
    metrics = DispatchMetrics(cluster)
    mod = drivers.load(cluster.cloud_vms.driver)
    driver_set = drivers.instance_set(mod, cluster, instance_set_id(cluster.system_root_token), clock=clock,
                                      logger=logging.getLogger("dispatch.driver"), registry=metrics.registry)
    # No retry pause longer than PollInterval: after an API outage, a poll sleeping in its
    # backoff must not hold dispatch back past the next PollInterval.
    # Requests in flight: the Go SDK's limiter, at most API.MaxConcurrentRequests / 4 (as
    # arvados.NewClientFromConfig sets it); 503s halve it.
    client = ArvadosClient(cluster.controller_url, cluster.system_root_token,
                           insecure=cluster.tls_insecure,
                           max_delay=max(0.1, cluster.cloud_vms.poll_interval),
                           limiter=RequestLimiter(api_request_limit(cluster)))
    return driver_set, client, metrics


class RoleBackend:
    """The management API's backend across dispatch terms: the running dispatcher's, or nothing
    while this process is a standby (reads are empty, actions get 503, /_health/dispatch says why)."""

    def __init__(self):
        self.current: ActorBackend | None = None
        self.standby_reason = "starting"

    def snapshot(self):
        cur = self.current
        return cur.snapshot() if cur is not None else _EMPTY_SNAPSHOT

    def _live(self) -> "ActorBackend":
        from api.backend import BackendTimeout
        cur = self.current
        if cur is None:
            raise BackendTimeout(f"this dispatcher is a standby ({self.standby_reason})")
        return cur

    def set_idle_behavior(self, instance_id: str, behavior: str) -> None:
        self._live().set_idle_behavior(instance_id, behavior)

    def kill_instance(self, instance_id: str, reason: str) -> None:
        self._live().kill_instance(instance_id, reason)

    def kill_container(self, uuid: str, reason: str) -> None:
        self._live().kill_container(uuid, reason)

    def health(self) -> dict:
        cur = self.current
        return cur.health() if cur is not None else {"health": "OK"}

    def dispatching(self) -> str:
        """"" while dispatching, else why not."""
        return "" if self.current is not None else self.standby_reason


def _empty_snapshot():
    from actors.snapshot import Snapshot
    return Snapshot()


_EMPTY_SNAPSHOT = _empty_snapshot()


def _wait_for_lock(lock, stop: threading.Event, role: RoleBackend) -> bool:
    """Retry until this process holds ``lock`` (True) or ``stop`` is set (False). Logs who holds it
    once per holder, as Go's dblock does."""
    last_holder = None
    while not stop.is_set():
        try:
            if lock.try_acquire():
                log.info("acquired the dispatch lock", extra={"Lock": lock.describe()})
                return True
            holder = lock.holder()
            role.standby_reason = f"waiting for the dispatch lock held by {holder or 'another process'}"
            if holder != last_holder:
                log.info("waiting for other process to release lock",
                         extra={"Lock": lock.describe(), "DBClient": holder})
                last_holder = holder
        except Exception as e:
            role.standby_reason = f"cannot take the dispatch lock: {e}"
            log.info("error getting the dispatch lock", extra={"Lock": lock.describe(), "error": str(e)})
        stop.wait(dispatchlock.RETRY_INTERVAL)
    return False


def notify_ready() -> None:
    """systemd ``Type=notify``: tell the service manager we serve (sd_notify ``READY=1``)."""
    import socket
    addr = os.environ.get("NOTIFY_SOCKET", "")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.sendall(b"READY=1")
    except OSError as e:
        log.warning("cannot notify systemd", extra={"error": str(e)})


def listen_urls(cluster) -> tuple[str, ...]:
    """Where the management API listens: each InternalURL's ListenURL (or the InternalURL
    itself), or only ``$ARVADOS_SERVICE_INTERNAL_URL``'s when set: as in Arvados, the way two
    dispatchers on one host (an active one and a standby) share one config."""
    listen = {u.rstrip("/"): cluster.dispatch_listen.get(u, u) for u in cluster.dispatch_urls}
    want = os.environ.get("ARVADOS_SERVICE_INTERNAL_URL", "")
    if not want:
        return tuple(listen.values())
    if want.rstrip("/") not in listen:
        log.warning("possible configuration error: listening on $ARVADOS_SERVICE_INTERNAL_URL even though "
                    "Services.DispatchCloud.InternalURLs has no matching entry", extra={"URL": want})
        return (want,)
    return (listen[want.rstrip("/")],)


def serve(cluster, *, on_ready=None, state_dir=None) -> int:
    """Serve the management API at once; dispatch only while holding the cluster's dispatch lock.

    Runs until SIGTERM/SIGINT. Losing the lock stops dispatching at once and goes back to waiting
    for it. Returns non-zero if a singleton actor crashed.
    """
    from cloud.clock import SystemClock
    from api.app import make_app
    from api.server import ApiServer
    from api.wsgi import parse_listen_url
    from actors.statusline import INTERVAL, status
    from actors.fdlimit import raise_nofile_limit
    sys.setswitchinterval(0.001)  # keep the API responsive while a pass holds the GIL
    raise_nofile_limit()
    clock = SystemClock()
    try:
        listen = listen_urls(cluster)
        for url in listen:  # $ARVADOS_SERVICE_INTERNAL_URL is no config: checked here, before the cloud
            parse_listen_url(url)
        driver_set, client, metrics = build_real(cluster, clock)
        lock = dispatchlock.for_cluster(cluster, dispatchlock.state_dir(state_dir))
    except Exception as e:
        log.error("cannot start: %s", e, extra={"error": str(e)})
        print(f"dispatch-cloud: cannot start: {e}", file=sys.stderr)
        return 1
    stop = threading.Event()
    say_status = threading.Event()

    def on_signal(signum, frame):
        log.info("received signal, stopping", extra={"Signal": signum})
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGUSR1, lambda s, f: log.info("thread dump", extra={"stacks": dump_threads()}))
    signal.signal(signal.SIGUSR2, lambda s, f: say_status.set())
    role = RoleBackend()
    metrics.standby = True
    try:
        api = ApiServer(make_app(cluster, role, metrics), listen).start()
    except (OSError, ValueError) as e:
        log.error("cannot start: %s", e, extra={"error": str(e)})
        print(f"dispatch-cloud: cannot start: {e}", file=sys.stderr)
        return 1
    notify_ready()  # the management API answers, as a standby until the lock is ours
    d = None
    ready_called = False
    try:
        while _wait_for_lock(lock, stop, role):
            d = Dispatcher(cluster, clock=clock, driver_set=driver_set, api_client=client, metrics=metrics)
            d.start()
            role.current, metrics.standby = d.backend(), False
            if on_ready is not None and not ready_called:
                ready_called = True
                on_ready(d, api)
            next_check = next_status = time.monotonic()
            next_status += INTERVAL
            lost = False
            while not stop.is_set() and not d.crashed.is_set():
                now = time.monotonic()
                if now >= next_check:
                    if not lock.check():
                        lost = True
                        break
                    next_check = now + dispatchlock.CHECK_INTERVAL
                if now >= next_status or say_status.is_set():
                    say_status.clear()
                    msg, fields = status(d.box.snapshot)
                    log.info(msg, extra=fields)
                    next_status = now + INTERVAL
                stop.wait(0.25)
            role.standby_reason = "lost the dispatch lock" if lost else "stopping"
            role.current, metrics.standby = None, True
            metrics.set_snapshot_source(lambda: None)
            if lost:
                log.error("lost the dispatch lock: stopped dispatching", extra={"Lock": lock.describe()})
            d.stop()
            if not lost:
                break
    finally:
        api.stop()
        if d is not None and role.current is not None:
            d.stop()
        lock.release()
        try:
            driver_set.stop()
        except Exception:
            log.warning("driver stop failed", exc_info=True)
    if d is not None and d.crashed.is_set():
        log.error("exiting after an actor crash", extra={"error": repr(d.crash_error)})
        return 2
    return 0
