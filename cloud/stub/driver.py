"""The stub cloud driver: an in-memory cloud whose VMs run a simulated crunch-run.

Used three ways: actor simulations on a FakeClock, ``Driver: stub`` from the command line in real
time, and the driver conformance suite. Like Arvados' ``lib/dispatchcloud/test/stub_driver.go``,
but nothing sleeps: every delay (boot, detach, run time, arv-mount exit lag, tag application,
destroy) is an event at a clock time, and :meth:`StubCloud.advance` runs the due ones in time
order. With one seed and one thread the whole cloud is deterministic.

The fake crunch-run moves its container Locked -> Running -> Complete through the container API
(``api_factory(api_host, token)``) with the host and token it was given on stdin, exactly as the
real one does, so a simulation exercises the same credentials path.

Locks: ``_lock`` guards all state and is never held during an API call or a hold; ``_events_lock``
makes one thread at a time run due events (API calls happen there, outside ``_lock``).
"""

from __future__ import annotations

import heapq
import itertools
import json
import logging
import random
import shlex
import threading
from collections.abc import Callable, Mapping
from types import MappingProxyType

from cloud import crunchrun
from cloud.base import (CapacityError, CloudError, ExecResult, ExecutorError, QuotaError,
                        RateLimitError)
from cloud.stub.vm import (ExecRecord, FakeCrunchRun, Phase, StubParams,
                          StubParamsError, StubVM, container_field, list_output,
                          parse_config_data, parse_runner_args, runner_args, split_command)
from conf.model import InstanceType, thaw

__all__ = ["StubCloud", "StubInstanceSet", "StubInstance", "StubExecutor", "StubParams",
           "StubParamsError", "StubVM", "driver"]

OWN_EXECUTOR = True  # commands reach stub VMs without SSH: no DispatchPrivateKey needed
REALTIME_INTERVAL = 0.1  # seconds between advance() calls in real-time mode
DUE_WAIT = 1.0  # how long a call waits for another thread that is running due events
KILL_WAIT = 1.0  # like crunch-run --kill, which polls the process for up to 1 s

_log = logging.getLogger("cloud.stub.driver")


def _default_api_factory(api_host: str, token: str, *, insecure: bool = False):
    from api.arvados.client import ArvadosClient  # lazily: the stub itself needs no HTTP client
    return ArvadosClient(api_host, token, insecure=insecure)


class StubCloud:
    """The stub provider: VMs, their fake crunch-runs and the event queue that moves time.

    It outlives :class:`StubInstanceSet` objects, so a "restarted dispatcher" can build a second
    instance set over the same cloud and find the same VMs, tags and running processes.
    """

    def __init__(self, clock, params: StubParams | None = None, *,
                 api_factory: Callable[[str, str], object] | None = None,
                 seed: int | None = None, cluster=None, logger: logging.Logger | None = None):
        self.clock = clock
        self.params = params or StubParams()
        self.api_factory = api_factory or _default_api_factory
        self.logger = logger or _log
        # Called under the cloud lock for each new VM, to set its knobs; raising (say, a
        # CapacityError) fails the Create. It must not call back into the cloud.
        self.setup_vm: Callable[[StubVM], None] | None = None
        # Simulations: a container's run time (None: drawn from the params), and a listener told
        # of each milestone as listener(event, vm, at, container_uuid): create, ready (first
        # boot probe answered), detach, running, exit (process gone), release (its lock gone),
        # destroy, remove. Both are called under the cloud lock and must not call back into it.
        self.run_time_of: Callable[[object], float | None] | None = None
        self.listener: Callable[[str, StubVM, float, str], None] | None = None
        # Called outside every lock as ``fault_hook(op, target, command)`` when a cloud call
        # ("create": target is the InstanceType, "instances", "destroy", "set_tags": the instance
        # id) or a command ("exec": the instance id and the command line) begins. It may raise
        # (a CloudError, an ExecutorError for a dropped SSH connection) to fail the call, or block
        # to make it slow. Fault-injecting simulations use it; it must not call back into the cloud.
        self.fault_hook: Callable[[str, object, str], None] | None = None
        self._rng = random.Random(self.params.seed if seed is None else seed)
        self._lock = threading.RLock()
        self._events_lock = threading.RLock()
        self._exited = threading.Condition(self._lock)  # a fake crunch-run ended (real time)
        self._events: list = []  # heap of (time, seq, label, fn(event_time))
        self._seq = itertools.count()
        self._vms: dict[str, StubVM] = {}
        self._n = 0
        self._pid = 1000
        self._allow_create = float("-inf")
        self._allow_instances = float("-inf")
        self._clients: dict = {}
        self._runner_commands: set[tuple[str, ...]] = {("crunch-run",)}
        self._boot_probes: set[str] = {"true", "systemctl is-system-running"}
        self._hold = threading.Condition()
        self._holding = False
        self._permits = 0
        self._waiting = 0
        self._rt_thread: threading.Thread | None = None
        self._rt_stop = threading.Event()
        if cluster is not None:
            self.configure(cluster)

    # --- configuration -----------------------------------------------------------------------

    def configure(self, cluster) -> None:
        """Learn the runner command and boot probe the dispatcher of ``cluster`` will send."""
        cmd = cluster.containers.crunch_run_command
        try:
            words = tuple(shlex.split(cmd)) if cmd else ()
        except ValueError:
            words = (cmd,)
        with self._lock:
            if words:
                self._runner_commands.add(words)
            probe = cluster.cloud_vms.boot_probe_command.strip()
            if probe:
                self._boot_probes.add(probe)

    def instance_set(self, set_id: str, *, owns_cloud: bool = False) -> StubInstanceSet:
        return StubInstanceSet(self, set_id, owns_cloud=owns_cloud)

    @property
    def vms(self) -> list[StubVM]:
        """Every VM not yet removed, in creation order (destroying ones included)."""
        with self._lock:
            return list(self._vms.values())

    def vm(self, instance_id: str) -> StubVM | None:
        with self._lock:
            return self._vms.get(instance_id)

    # --- time ----------------------------------------------------------------------------------

    def advance(self) -> int:
        """Run every event due at ``clock.now()``, in time order; returns how many ran."""
        return self._run_due(wait=-1)

    def next_event_time(self) -> float | None:
        with self._lock:
            return self._events[0][0] if self._events else None

    def call_at(self, at: float, label: str, fn: Callable[[float], None]) -> None:
        """Run ``fn(at)`` as a cloud event at clock time ``at`` (simulations use it to time their
        own faults: :meth:`next_event_time` then steps the clock to it)."""
        self._schedule(at, label, fn)

    def _fault(self, op: str, target, command: str = "") -> None:
        hook = self.fault_hook
        if hook is not None:
            hook(op, target, command)

    def _schedule(self, at: float, label: str, fn: Callable[[float], None]) -> None:
        with self._lock:
            heapq.heappush(self._events, (at, next(self._seq), label, fn))

    def _run_due(self, wait: float | None = None) -> int:
        # Another thread may be running events (and waiting on the API): wait for it a bounded
        # time, then carry on; its results show up on the next call. In real time the clock
        # thread runs them, and a call neither waits for it nor runs them itself: VMs are
        # independent, and one VM's command must not queue behind other VMs' crunch-runs talking
        # to the API (with 1,000 of those due, a detach waited 1 s for the clock thread, or ran
        # their backlog itself for 45 s).
        if wait is None:
            if self.realtime:
                return 0
            wait = DUE_WAIT
        if not self._events_lock.acquire(timeout=wait):
            return 0
        try:
            ran = 0
            while True:
                with self._lock:
                    if not self._events or self._events[0][0] > self.clock.now():
                        return ran
                    at, _, label, fn = heapq.heappop(self._events)
                try:
                    fn(at)
                except Exception:
                    self.logger.exception("stub cloud event failed", extra={"Event": label})
                ran += 1
        finally:
            self._events_lock.release()

    def start_realtime(self, interval: float = REALTIME_INTERVAL) -> None:
        """Run due events from a daemon thread every ``interval`` seconds until :meth:`stop`."""
        with self._lock:
            if self._rt_thread is not None:
                return
            self._rt_stop.clear()
            self._rt_thread = threading.Thread(target=self._realtime_loop, args=(interval,),
                                               name="stub-cloud-clock", daemon=True)
            self._rt_thread.start()

    @property
    def realtime(self) -> bool:
        t = self._rt_thread
        return t is not None and t.is_alive()

    def _realtime_loop(self, interval: float) -> None:
        while not self._rt_stop.wait(interval):
            self.advance()

    def stop(self) -> None:
        """Stop the real-time thread, let held cloud ops through, close cached API clients.

        The VMs stay: a later instance set over this cloud still finds them.
        """
        self._rt_stop.set()
        t, self._rt_thread = self._rt_thread, None
        if t is not None and t is not threading.current_thread():
            t.join(timeout=5)
            if t.is_alive():
                self.logger.warning("stub cloud clock thread did not stop within 5 s "
                                    "(an API call is probably still retrying)")
        self.release_cloud_ops(0, stop_holding=True)
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            close = getattr(client, "close", None)
            if callable(close):
                close()

    # --- holding cloud ops (tests with real threads) -------------------------------------------

    def hold_cloud_ops(self) -> None:
        """From now on Create and Destroy block until :meth:`release_cloud_ops` lets them go."""
        with self._hold:
            self._holding = True

    def release_cloud_ops(self, n: int, *, stop_holding: bool = False) -> None:
        """Let ``n`` held (or future) Create/Destroy calls proceed; optionally stop holding."""
        with self._hold:
            self._permits += n
            if stop_holding:
                self._holding = False
            self._hold.notify_all()

    def wait_held(self, n: int, timeout: float) -> bool:
        """Wait until at least ``n`` cloud ops are blocked on the hold; False on timeout."""
        with self._hold:
            return self._hold.wait_for(lambda: self._waiting >= n, timeout)

    def _pass_hold(self) -> None:
        with self._hold:
            if not self._holding:
                return
            self._waiting += 1
            self._hold.notify_all()
            self._hold.wait_for(lambda: self._permits > 0 or not self._holding)
            self._waiting -= 1
            if self._permits > 0:
                self._permits -= 1

    # --- cloud operations ----------------------------------------------------------------------

    def _roll(self, rate: float) -> bool:
        """True with probability ``rate``; draws nothing when the rate is 0 (stable sequences)."""
        return rate > 0 and self._rng.random() < rate

    def create(self, set_id: str, it: InstanceType, image_id: str, tags: Mapping,
               init_command: str, public_key: str | None) -> StubInstance:
        self._pass_hold()
        self._fault("create", it)
        self._run_due()
        p = self.params
        with self._lock:
            now = self.clock.now()
            if now < self._allow_create:
                raise RateLimitError("StubInstanceSet: rate limited: MinTimeBetweenCreateCalls",
                                     earliest_retry=self._allow_create)
            if self._roll(p.error_rate_create):
                raise CloudError("StubInstanceSet: rand < ErrorRateCreate")
            if p.quota_max_instances and len(self._vms) >= p.quota_max_instances:
                raise QuotaError(f"StubInstanceSet: reached QuotaMaxInstances {p.quota_max_instances}")
            group = quota_group(it)
            if p.capacity_error_all:
                raise CapacityError("StubInstanceSet: insufficient capacity")
            if group in p.capacity_error_quota_groups:
                raise CapacityError(f"StubInstanceSet: insufficient capacity in quota group {group}",
                                    quota_group_specific=True)
            if it.provider_type in p.capacity_error_types:
                raise CapacityError(f"StubInstanceSet: insufficient capacity for {it.provider_type}",
                                    instance_type_specific=True)
            self._allow_create = now + p.min_time_between_create_calls
            self._n += 1
            vm = self._new_vm(f"inst{self._n},{it.provider_type}", it, image_id, tags,
                              init_command, public_key, now)
            if self.setup_vm is not None:
                self.setup_vm(vm)  # may raise a CloudError: the VM is discarded
            self._vms[vm.id] = vm
            self._schedule_milestones(vm)
            self._notify("create", vm, now)
            self.logger.info("stub VM created", extra={
                "Instance": vm.id, "InstanceSetID": set_id, "ProviderType": it.provider_type,
                "BootAt": vm.boot_at})
            return self._snapshot(vm)

    def _new_vm(self, vm_id, it, image_id, tags, init_command, public_key, now) -> StubVM:
        p, rng = self.params, self._rng
        boot_at = now + p.boot_time + (rng.random() * p.boot_time_jitter if p.boot_time_jitter else 0)
        broken_at = boot_at + rng.random() * p.broken_after if self._roll(p.broken_rate) else None
        report_at = (boot_at + rng.random() * p.report_broken_after
                     if self._roll(p.report_broken_rate) else None)
        code = p.container_exit_code
        return StubVM(
            id=vm_id, instance_type=it, image_id=image_id, tags=dict(tags),
            init_command=init_command, public_key=public_key, created_at=now, boot_at=boot_at,
            broken_at=broken_at, report_broken_at=report_at,
            crunch_run_missing=self._roll(p.crunch_run_missing_rate),
            crash_rate=p.crunch_run_crash_rate, detach_delay=p.crunch_run_detach_delay,
            arv_mount_max_exit_lag=p.arv_mount_max_exit_lag, deadlock_rate=p.arv_mount_deadlock_rate,
            execute_container=lambda ctr: code)

    def _notify(self, event: str, vm: StubVM, at: float, uuid: str = "") -> None:
        if self.listener is not None:
            self.listener(event, vm, at, uuid)

    def _schedule_milestones(self, vm: StubVM) -> None:
        """Boot/broken times are gates checked on exec; events only log them and let a
        simulation step straight to them with :meth:`next_event_time`."""
        def note(msg, level=logging.INFO):
            return lambda at: self.logger.log(level, msg, extra={"Instance": vm.id})
        self._schedule(vm.boot_at, "boot " + vm.id, note("stub VM booted"))
        if vm.broken_at is not None:
            self._schedule(vm.broken_at, "broken " + vm.id,
                           note("stub VM broken: every command now fails", logging.WARNING))
        if vm.report_broken_at is not None:
            self._schedule(vm.report_broken_at, "report-broken " + vm.id,
                           note("stub VM reports broken in crunch-run --list", logging.WARNING))

    def instances(self) -> list[StubInstance]:
        self._fault("instances", None)
        self._run_due()
        with self._lock:
            now = self.clock.now()
            if now < self._allow_instances:
                raise RateLimitError("StubInstanceSet: rate limited: MinTimeBetweenInstancesCalls",
                                     earliest_retry=self._allow_instances)
            self._allow_instances = now + self.params.min_time_between_instances_calls
            return [self._snapshot(vm) for vm in self._vms.values()]

    def _snapshot(self, vm: StubVM) -> StubInstance:
        return StubInstance(self, vm.id, vm.address, vm.provider_type, dict(vm.tags))

    def set_tags(self, instance_id: str, tags: Mapping) -> None:
        """Applied by the next advance (like Arvados' goroutine), so listings lag a little."""
        new = dict(tags)
        self._fault("set_tags", instance_id)
        with self._lock:
            if instance_id not in self._vms:
                raise CloudError(f"StubInstanceSet: SetTags: no such instance {instance_id}")
            now = self.clock.now()

        def apply(at):
            with self._lock:
                vm = self._vms.get(instance_id)
                if vm is not None:
                    vm.tags = new
        self._schedule(now, "set-tags " + instance_id, apply)

    def destroy(self, instance_id: str) -> None:
        self._pass_hold()
        self._fault("destroy", instance_id)
        self._run_due()
        with self._lock:
            vm = self._vms.get(instance_id)
            if vm is None or vm.destroying:
                return  # already gone or going: destroying twice is harmless
            if self._roll(self.params.error_rate_destroy):
                raise CloudError(f"StubInstanceSet: {instance_id}: instance could not be destroyed")
            now = self.clock.now()
            vm.destroying = True
            vm.destroyed_at = now
            for proc in vm.procs.values():
                if not proc.ended:
                    proc.phase = Phase.EXITED
                    proc.exit_reason = "killed by system shutdown"
            vm.procs.clear()
            self._notify("destroy", vm, now)
            self.logger.info("stub VM destroying", extra={"Instance": vm.id,
                                                            "RemoveAt": now + self.params.destroy_delay})

        def remove(at):
            with self._lock:
                if self._vms.get(instance_id) is vm:
                    del self._vms[instance_id]
                    self._notify("remove", vm, at)
                    self.logger.info("stub VM removed", extra={"Instance": instance_id})
        self._schedule(now + self.params.destroy_delay, "remove " + instance_id, remove)

    # --- the fake shell --------------------------------------------------------------------------

    def execute(self, instance_id: str, command: str, stdin: bytes = b"") -> ExecResult:
        """Run ``command`` on a stub VM; ExecutorError if the VM is gone (nothing to connect to)."""
        self._fault("exec", instance_id, command)
        self._run_due()
        with self._lock:
            vm = self._vms.get(instance_id)
            if vm is None:
                raise ExecutorError(f"stub instance {instance_id}: connection refused (no such VM)")
            now = self.clock.now()
            result = self._exec(vm, command, stdin or b"", now)
        if isinstance(result, FakeCrunchRun):  # a kill: wait for the process like crunch-run does
            result = self._await_kill(result)
        with self._lock:
            vm.commands.append(ExecRecord(now, command, result.exit_status))
        self.logger.debug("stub exec", extra={"Instance": instance_id, "Command": command,
                                              "ExitStatus": result.exit_status})
        return result

    def _exec(self, vm: StubVM, command: str, stdin: bytes, now: float):
        if vm.destroying:
            return _fail(1, "stub VM is shutting down")
        if now < vm.boot_at:
            return _fail(1, f"stub is booting, ETA {vm.boot_at - now:.3f}s")
        if vm.broken_at is not None and now >= vm.broken_at:
            return _fail(2, "cannot fork")
        try:
            cmd, argv = split_command(command)
        except ValueError as e:
            return _fail(2, f"sh: syntax error: {e}")
        args = runner_args(argv, frozenset(self._runner_commands))
        if vm.crunch_run_missing and (args is not None or "crunch-run" in cmd):
            return _fail(1, "crunch-run: command not found")
        if args is not None:
            return self._crunch_run(vm, parse_runner_args(args), stdin, now)
        if cmd in self._boot_probes:
            if vm.ready_at is None:
                vm.ready_at = now
                self._notify("ready", vm, now)
            return ExecResult(b"running\n" if cmd == "systemctl is-system-running" else b"", b"", 0)
        if argv == ["cat", crunchrun.SECRET_FILE]:
            secret = vm.secret
            if secret is None:
                return _fail(1, f"cat: {crunchrun.SECRET_FILE}: No such file or directory")
            return ExecResult(secret.encode(), b"", 0)
        return _fail(1, f'"{cmd}": command not found')

    def _crunch_run(self, vm: StubVM, call, stdin: bytes, now: float):
        if call.error:
            return _fail(2, call.error)
        if call.detach:
            return self._detach(vm, call, stdin, now)
        if call.kill is not None:
            return self._kill(vm, call, now)
        if call.list:
            if call.stdin_prices and stdin:
                vm.prices = stdin
            return ExecResult(list_output(vm, now).encode(), b"", 0)
        return _fail(1, "stub crunch-run: only --detach, --list and --kill are supported")

    def _detach(self, vm: StubVM, call, stdin: bytes, now: float) -> ExecResult:
        if not call.stdin_config:
            return _fail(1, "stub crunch-run: --detach needs --stdin-config")
        try:
            host, token, insecure = parse_config_data(stdin)
        except ValueError as e:
            return _fail(1, str(e))
        uuid = call.uuid
        if uuid in vm.procs:
            return _fail(1, f"lock /var/lock/crunch-run-{uuid}.lock: resource temporarily unavailable")
        crash = None
        if vm.crash_rate > 0:
            luck = self._rng.random()
            crash = "early" if luck < vm.crash_rate / 2 else "late" if luck < vm.crash_rate else None
        self._pid += 1
        proc = FakeCrunchRun(uuid=uuid, pid=self._pid, api_host=host, api_token=token,
                             insecure=insecure, crash=crash)
        vm.procs[uuid] = proc
        self._notify("detach", vm, now, uuid)
        self.logger.info("stub crunch-run detached", extra={
            "Instance": vm.id, "ContainerUUID": uuid, "PID": proc.pid, "Crash": crash})
        self._schedule(now + vm.detach_delay, f"start {uuid}", lambda at: self._proc_start(vm, proc, at))
        return ExecResult(json.dumps({"UUID": uuid, "PID": proc.pid},
                                     separators=(",", ":")).encode() + b"\n", b"", 0)

    def _kill(self, vm: StubVM, call, now: float):
        proc = vm.procs.get(call.uuid)
        if proc is None or proc.ended:
            return ExecResult(b"", f"{call.uuid}: not running\n".encode(), 0)
        proc.kill_requested = True
        if not proc.busy and proc.phase is Phase.STARTING:
            self._proc_exit(vm, proc, f"killed by signal {call.kill} before Running", now)
        elif not proc.busy and proc.phase is Phase.RUNNING:
            self._schedule(now, f"terminate {proc.uuid}", lambda at: self._proc_terminate(vm, proc, at))
        return proc

    def _await_kill(self, proc: FakeCrunchRun) -> ExecResult:
        if self.realtime:  # the clock thread runs the termination; wait for this process only
            with self._lock:
                self._exited.wait_for(lambda: proc.ended, timeout=KILL_WAIT)
        else:
            self._run_due(wait=KILL_WAIT)
        with self._lock:
            if proc.ended:
                return ExecResult(b"", f"{proc.uuid}: pid {proc.pid}: process finished\n".encode(), 0)
        return _fail(1, f"{proc.uuid}: pid {proc.pid}: sent signal 15 but process is still alive")

    # --- the fake crunch-run's life (event handlers; API calls happen outside _lock) -----------

    def _client(self, proc: FakeCrunchRun):
        key = (proc.api_host, proc.api_token, proc.insecure)
        with self._lock:
            client = self._clients.get(key)
        if client is None:
            if proc.insecure and self.api_factory is _default_api_factory:
                client = _default_api_factory(proc.api_host, proc.api_token, insecure=True)
            else:
                client = self.api_factory(proc.api_host, proc.api_token)
            with self._lock:
                client = self._clients.setdefault(key, client)
        return client

    def _api(self, vm: StubVM, proc: FakeCrunchRun, what: str, call: Callable) -> tuple[bool, object]:
        """Run one API call for ``proc`` with ``busy`` set; log a failure, never raise it."""
        with self._lock:
            if proc.ended or proc.busy:
                return False, None
            proc.busy = True
        try:
            return True, call(self._client(proc))
        except Exception as e:
            self.logger.warning("stub crunch-run: API call failed", extra={
                "Instance": vm.id, "ContainerUUID": proc.uuid, "Call": what, "error": str(e)})
            return False, e
        finally:
            with self._lock:
                proc.busy = False

    def _proc_start(self, vm: StubVM, proc: FakeCrunchRun, at: float) -> None:
        with self._lock:
            if proc.ended:
                return
            if proc.kill_requested:
                return self._proc_exit(vm, proc, "killed before Running", at)
            if proc.crash == "early":
                return self._proc_exit(vm, proc, "crashed before Running", at)

        def to_running(api):
            ctr = api.get_container(proc.uuid)
            state = container_field(ctr, "state")
            if state != "Locked":
                raise CloudError(f"container state is {state!r}, not 'Locked'")
            api.update(proc.uuid, {"state": "Running"})
            return ctr
        ok, ctr = self._api(vm, proc, "get/update Running", to_running)
        with self._lock:
            if proc.ended:
                return
            if not ok:
                return self._proc_exit(vm, proc, "could not start the container", at)
            proc.phase = Phase.RUNNING
            proc.container = ctr
            self._notify("running", vm, at, proc.uuid)
            self.logger.info("stub crunch-run: container Running", extra={
                "Instance": vm.id, "ContainerUUID": proc.uuid, "PID": proc.pid})
            if proc.kill_requested:
                self._schedule(at, f"terminate {proc.uuid}", lambda t: self._proc_terminate(vm, proc, t))
                return
            p = self.params
            run_for = self.run_time_of(ctr) if self.run_time_of is not None else None
            if run_for is None:
                run_for = p.container_run_time + (self._rng.random() * p.container_run_time_jitter
                                                  if p.container_run_time_jitter else 0)
            if proc.crash == "late":
                self._schedule(at + self._rng.random() * run_for, f"crash {proc.uuid}",
                               lambda t: self._proc_crash(vm, proc, t))
            else:
                self._schedule(at + run_for, f"finish {proc.uuid}",
                               lambda t: self._proc_finish(vm, proc, t))

    def _proc_finish(self, vm: StubVM, proc: FakeCrunchRun, at: float) -> None:
        with self._lock:
            if proc.ended or proc.busy:
                return
        try:
            code = int(vm.execute_container(proc.container))
        except Exception as e:
            self.logger.warning("stub crunch-run: execute_container raised; crashing", extra={
                "Instance": vm.id, "ContainerUUID": proc.uuid, "error": repr(e)})
            with self._lock:
                return self._proc_exit(vm, proc, "crashed in execute_container", at)
        ok, _ = self._api(vm, proc, "update Complete",
                          lambda api: api.update(proc.uuid, {"state": "Complete", "exit_code": code}))
        with self._lock:
            self._proc_exit(vm, proc, f"completed, exit code {code}" if ok else
                            "could not complete the container", at)

    def _proc_terminate(self, vm: StubVM, proc: FakeCrunchRun, at: float) -> None:
        """SIGTERM after Running: a real crunch-run stops the container and records Cancelled."""
        ok, _ = self._api(vm, proc, "update Cancelled",
                          lambda api: api.update(proc.uuid, {"state": "Cancelled"}))
        with self._lock:
            if not ok and proc.busy:
                return
            self._proc_exit(vm, proc, "killed after Running" if ok else
                            "killed after Running; could not record Cancelled", at)

    def _proc_crash(self, vm: StubVM, proc: FakeCrunchRun, at: float) -> None:
        with self._lock:
            if not proc.busy:
                self._proc_exit(vm, proc, "crashed after Running", at)

    def _proc_exit(self, vm: StubVM, proc: FakeCrunchRun, reason: str, at: float) -> None:
        """The process is gone; its lock lingers for the arv-mount lag, or forever (deadlock)."""
        if proc.ended:
            return
        with self._lock:
            proc.phase = Phase.EXITED
            self._exited.notify_all()
        proc.exit_reason = reason
        self._notify("exit", vm, at, proc.uuid)
        proc.deadlocked = self._roll(vm.deadlock_rate)
        lag = self._rng.random() * vm.arv_mount_max_exit_lag if vm.arv_mount_max_exit_lag else 0.0
        self.logger.info("stub crunch-run exited", extra={
            "Instance": vm.id, "ContainerUUID": proc.uuid, "PID": proc.pid, "Reason": reason,
            "Deadlocked": proc.deadlocked, "LockReleaseAt": None if proc.deadlocked else at + lag})
        if proc.deadlocked:
            return

        def release(t):
            with self._lock:
                if vm.procs.get(proc.uuid) is proc:
                    del vm.procs[proc.uuid]
                    self._notify("release", vm, t, proc.uuid)
        self._schedule(at + lag, f"unlock {proc.uuid}", release)


def _fail(status: int, message: str) -> ExecResult:
    return ExecResult(b"", (message + "\n").encode(), status)


def quota_group(it: InstanceType) -> str:
    return it.provider_type[:1] + ("-p" if it.preemptible else "")


class StubInstance:
    """A listing's view of one VM: id and address are stable, ``tags`` is a copy from then."""

    remote_user = "root"

    def __init__(self, cloud: StubCloud, instance_id: str, address: str, provider_type: str,
                 tags: dict):
        self._cloud = cloud
        self._id = instance_id
        self._address = address
        self._provider_type = provider_type
        self._tags = MappingProxyType(tags)

    @property
    def id(self) -> str:
        return self._id

    @property
    def address(self) -> str:
        return self._address

    @property
    def provider_type(self) -> str:
        return self._provider_type

    @property
    def tags(self) -> Mapping:
        return self._tags

    def set_tags(self, tags: Mapping) -> None:
        self._cloud.set_tags(self._id, tags)

    def destroy(self) -> None:
        self._cloud.destroy(self._id)

    def verify_host_key(self, host_key, transport) -> None:
        """Stub VMs have no SSH server (the executor calls the cloud directly): nothing to verify."""
        return None

    def price_history(self, it: InstanceType) -> list:
        return []

    def __repr__(self) -> str:
        return self._id

    __str__ = __repr__


class StubExecutor:
    """Runs commands on a stub VM by calling the cloud directly (the stub has no SSH)."""

    def __init__(self, cloud: StubCloud, instance):
        self._cloud = cloud
        self._instance_id = instance.id
        self._closed = False

    def execute(self, command: str, stdin: bytes = b"", timeout: float | None = None) -> ExecResult:
        if self._closed:
            raise ExecutorError("executor is closed")
        return self._cloud.execute(self._instance_id, command, stdin)

    def set_target(self, instance) -> None:
        self._instance_id = instance.id

    def close(self) -> None:
        self._closed = True


class StubInstanceSet:
    """One dispatcher's handle on a :class:`StubCloud` (many may share a cloud)."""

    def __init__(self, cloud: StubCloud, set_id: str, *, owns_cloud: bool = False):
        self.cloud = cloud
        self.set_id = set_id
        self._owns_cloud = owns_cloud
        self._stopped = False

    def create(self, it: InstanceType, image_id: str, tags: Mapping, init_command: str,
               public_key: str | None) -> StubInstance:
        if self._stopped:
            raise CloudError("StubInstanceSet: Create called after Stop")
        return self.cloud.create(self.set_id, it, image_id, tags, init_command, public_key)

    def instances(self, tags: Mapping) -> list[StubInstance]:
        """Every VM, booting and destroying ones included; tag filtering is the wrapper's job."""
        return self.cloud.instances()

    def instance_quota_group(self, it: InstanceType) -> str:
        return quota_group(it)

    def make_executor(self, instance) -> StubExecutor:
        return StubExecutor(self.cloud, instance)

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._owns_cloud:
            self.cloud.stop()


def check_params(params: Mapping | None, cluster) -> None:
    """:mod:`cloud.drivers` hook: raise :class:`StubParamsError` naming the key."""
    StubParams.from_driver_parameters(thaw(params) if params is not None else None)


def driver(params: Mapping | None, set_id: str, *, cluster, clock, logger=None, cloud=None,
           api_factory=None) -> StubInstanceSet:
    """The ``stub`` driver entry point (see :mod:`cloud.drivers`).

    Without ``cloud`` it builds its own StubCloud in real-time mode (a thread advancing it every
    100 ms, stopped with the instance set); with one, it shares it and leaves time to the caller.
    Bad DriverParameters raise :class:`StubParamsError` naming the key.
    """
    if cloud is not None:
        if cluster is not None:
            cloud.configure(cluster)
        return cloud.instance_set(set_id)
    where = "Containers.CloudVMs.DriverParameters"
    if cluster is not None and getattr(cluster, "source", ""):
        where = f"{cluster.source}: {where}"
    stub_params = StubParams.from_driver_parameters(params, where)
    cloud = StubCloud(clock, stub_params, api_factory=api_factory, cluster=cluster,
                      logger=logger or _log)
    cloud.start_realtime()
    return cloud.instance_set(set_id, owns_cloud=True)
