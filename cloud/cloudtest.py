"""``dispatch-cloud cloudtest``: try the configured driver and image once, end to end, like
``arvados-server cloudtest``.

It builds the instance set exactly as the dispatcher does (driver + wrapper stack), creates one
instance with the instance secret in its init command, checks its tags, waits for the boot probe
over SSH (or the driver's own executor), optionally runs a command, then destroys the instance and
waits until the cloud no longer lists it. Each step prints ``[ok] <step> (<seconds>s)`` or
``[FAIL] <step> (<seconds>s): <why>`` on stdout; the exit status is 0 only if every step passed.

Whatever happens — a failed step, an exception, Ctrl-C or SIGTERM — an instance it created is
destroyed before it exits.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import signal
import sys
import threading
import time

from cloud import crunchrun
from cloud.base import CloudError, OpsLimiter, wrap

DEFAULT_SET_ID = "zzzzz-zzzzz-zzzzzzcloudtest"
PROG = "dispatch-cloud cloudtest"
log = logging.getLogger("cloudtest")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "cloudtest", help="create, boot-probe and destroy one instance to test the cloud config",
        description="Smoke-test the configured cloud driver: create one instance, check its tags, "
                    "wait for the boot probe, optionally run a command, destroy it. Always destroys "
                    "what it created, also on Ctrl-C.")
    p.add_argument("--config", metavar="FILE", default=None,
                   help="config file (default: $ARVADOS_CONFIG or /etc/arvados/config.yml)")
    p.add_argument("--cluster", metavar="ID", default=None, help="cluster id, when the file has several")
    p.add_argument("--instance-type", metavar="NAME", default=None,
                   help="InstanceTypes entry to create (default: the cheapest)")
    p.add_argument("--instance-set-id", metavar="ID", default=DEFAULT_SET_ID,
                   help=f"instance set id to tag the instance with (default {DEFAULT_SET_ID})")
    p.add_argument("--image-id", metavar="ID", default=None, help="image (default: CloudVMs.ImageID)")
    p.add_argument("--command", metavar="CMD", default="", help="run this on the instance after it boots")
    p.add_argument("--destroy-existing", action="store_true",
                   help="destroy instances already tagged with this instance set id (else fail)")
    p.add_argument("--pause-before-destroy", action="store_true",
                   help="wait for Enter before destroying the instance")
    p.set_defaults(func=run)


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived: stop waiting, clean up (a BaseException, so no step swallows it)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def run(args: argparse.Namespace) -> int:
    from cloud.drivers import load_config
    from conf.loader import ConfigError, default_path
    from conf.logsetup import setup
    setup("info", sys.stderr)  # JSON logs on stderr; stdout carries the step report only
    try:
        cluster = load_config(args.config or default_path(), cluster_id=args.cluster, service=False)
    except ConfigError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    types = {t.name: t for t in cluster.types_by_price()}
    if not types:
        print(f"{PROG}: {cluster.source}: InstanceTypes: no instance types configured", file=sys.stderr)
        return 1
    if args.instance_type is not None and args.instance_type not in types:
        print(f"{PROG}: --instance-type {args.instance_type!r}: not in InstanceTypes "
              f"(have: {', '.join(sorted(types))})", file=sys.stderr)
        return 1
    it = types[args.instance_type] if args.instance_type else next(iter(types.values()))
    image_id = args.image_id if args.image_id is not None else cluster.cloud_vms.image_id
    tester = Tester(cluster, it, image_id=image_id, set_id=args.instance_set_id, command=args.command,
                    destroy_existing=args.destroy_existing, pause=args.pause_before_destroy)
    return tester.run()


class Tester:
    """One cloudtest run; ``out`` gets the step lines."""

    def __init__(self, cluster, it, *, image_id: str, set_id: str, command: str = "",
                 destroy_existing: bool = False, pause: bool = False, out=None, clock=None):
        from cloud.clock import SystemClock
        self.cluster = cluster
        self.vms = cluster.cloud_vms
        self.it = it
        self.image_id = image_id
        self.set_id = set_id
        self.command = command
        self.destroy_existing = destroy_existing
        self.pause = pause
        self.out = out or sys.stdout
        self.clock = clock or SystemClock()
        self.secret = secrets.token_hex(20)
        self.failed = False
        self.instance = None  # what we created (or found after a failed create): always destroyed
        self.iset = None
        self.executor = None
        self._interrupted: Interrupted | None = None

    # -- reporting ------------------------------------------------------------------------------

    def _line(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def step(self, name: str, fn):
        """Run ``fn``; a CloudError/AssertionError/RuntimeError is a failed step, not a crash."""
        t0 = time.monotonic()
        try:
            result = fn()
        except (CloudError, StepFailed, ValueError, OSError) as e:
            self.failed = True
            self._line(f"[FAIL] {name} ({time.monotonic() - t0:.1f}s): {e}")
            return _FAILED
        except Exception as e:  # a driver bug must still end in cleanup and a report
            self.failed = True
            self._line(f"[FAIL] {name} ({time.monotonic() - t0:.1f}s): {type(e).__name__}: {e}")
            return _FAILED
        self._line(f"[ok] {name} ({time.monotonic() - t0:.1f}s)")
        return result

    def _sleep(self, seconds: float) -> None:
        time.sleep(max(0.0, seconds))

    def _tag(self, name: str) -> str:
        return self.cluster.tag(name)

    # -- the run --------------------------------------------------------------------------------

    def run(self) -> int:
        # Signal handlers can only be set from the main thread; elsewhere (an embedding test) the
        # caller owns interruption, and try/finally still destroys what was created.
        main = threading.current_thread() is threading.main_thread()
        old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}

        def on_signal(signum, frame):
            raise Interrupted(signum)
        for s in old:
            signal.signal(s, on_signal)
        try:
            self._steps()
        except (Interrupted, KeyboardInterrupt) as e:
            self._interrupted = e if isinstance(e, Interrupted) else Interrupted(signal.SIGINT)
            self.failed = True
            self._line(f"[FAIL] interrupted by {self._interrupted}: cleaning up")
        finally:
            # A second Ctrl-C must not abandon a half-destroyed instance.
            for s in old:
                signal.signal(s, lambda signum, frame: self._line("  (still cleaning up; please wait)"))
            try:
                self._cleanup()
            finally:
                for s, h in old.items():
                    signal.signal(s, h)
        if self._interrupted is not None:
            return 128 + self._interrupted.signum
        return 1 if self.failed else 0

    def _steps(self) -> None:
        if self.step("initialize cloud driver", self._init_driver) is _FAILED:
            return
        if self.step("check for existing instances", self._check_existing) is _FAILED:
            return
        if self.step("create instance", self._create) is _FAILED:
            return
        if self.step("instance listed with its tags", self._check_tags) is _FAILED:
            return
        if self.step("boot probe", self._boot) is _FAILED:
            return
        if self.command:
            self.step(f"run command {self.command!r}", self._run_command)
        if self.pause:
            self._line("Press Enter to destroy the instance.")
            sys.stdin.readline()

    def _cleanup(self) -> None:
        if self.executor is not None:
            try:
                self.executor.close()
            except Exception:
                pass
        if self.instance is not None:
            self.step("destroy instance", self._destroy)
        if self.iset is not None:
            try:
                self.iset.stop()
            except Exception as e:
                self._line(f"[FAIL] stop cloud driver: {e}")
                self.failed = True

    # -- steps ----------------------------------------------------------------------------------

    def _init_driver(self) -> None:
        from cloud import drivers
        try:
            mod = drivers.load(self.vms.driver)
        except KeyError:
            raise StepFailed(f"Containers.CloudVMs.Driver: unknown driver {self.vms.driver!r}") from None
        raw = mod.driver(self.vms.driver_parameters, self.set_id, cluster=self.cluster, clock=self.clock,
                         logger=logging.getLogger("cloudtest.driver"))
        resource_tags = {**self.vms.resource_tags, self._tag("CloudTestPID"): str(os.getpid())}
        limiter = OpsLimiter(self.vms.max_cloud_ops_per_second) if self.vms.max_cloud_ops_per_second else None
        self.iset = wrap(raw, resource_tags=resource_tags, limiter=limiter, logger=log)

    def _ours(self):
        return [i for i in self.iset.instances({}) if i.tags.get(self._tag("InstanceSetID")) == self.set_id]

    def _check_existing(self) -> None:
        found = self._ours()
        if not found:
            return
        ids = ", ".join(i.id for i in found)
        if not self.destroy_existing:
            raise StepFailed(f"instances with instance set id {self.set_id} already exist ({ids}); "
                             "use --destroy-existing to destroy them")
        deadline = time.monotonic() + max(self.vms.timeout_booting, 10 * self.vms.sync_interval)
        while found:
            for inst in found:
                self._line(f"  destroying existing instance {inst.id}")
                try:
                    inst.destroy()
                except CloudError as e:
                    self._line(f"  destroy {inst.id}: {e}")
            if time.monotonic() > deadline:
                raise StepFailed(f"existing instances still listed: {', '.join(i.id for i in found)}")
            self._sleep(self.vms.sync_interval)
            found = self._ours()

    def _create(self) -> str:
        from cloud.ssh import public_key_line
        tags = {self._tag("InstanceSetID"): self.set_id, self._tag("InstanceSecret"): self.secret}
        self.tags = {**self.vms.resource_tags, self._tag("CloudTestPID"): str(os.getpid()), **tags}
        init = crunchrun.init_command(self.secret, self.vms.instance_init_command)
        key = public_key_line(self.cluster.containers.dispatch_private_key) if self.vms.deploy_public_key else None
        try:
            self.instance = self.iset.create(self.it, self.image_id, tags, init, key)
        except CloudError as e:
            # The cloud may have made the VM anyway: find it by its secret so cleanup destroys it.
            deadline = time.monotonic() + self.vms.timeout_booting
            while self.instance is None and time.monotonic() < deadline:
                try:
                    self.instance = next((i for i in self._ours()
                                          if i.tags.get(self._tag("InstanceSecret")) == self.secret), None)
                except CloudError:
                    pass
                if self.instance is None:
                    self._sleep(self.vms.sync_interval)
            extra = f"; found {self.instance.id} anyway, will destroy it" if self.instance else ""
            raise StepFailed(f"{type(e).__name__}: {e}{extra}") from e
        self._line(f"  created {self.instance.id} ({self.it.name}, {self.it.provider_type})")
        return self.instance.id

    def _fresh(self):
        """Our instance from a new listing (addresses appear there), or None if not listed."""
        return next((i for i in self._ours() if i.id == self.instance.id), None)

    def _check_tags(self) -> None:
        deadline = time.monotonic() + self.vms.timeout_booting
        while (inst := self._fresh()) is None:
            if time.monotonic() > deadline:
                raise StepFailed(f"{self.instance.id} not in the instance list")
            self._sleep(self.vms.sync_interval)
        wrong = {k: inst.tags.get(k) for k, v in self.tags.items() if inst.tags.get(k) != v}
        if wrong:
            raise StepFailed("tags missing or wrong: " + ", ".join(
                f"{k}={v!r} (want {self.tags[k]!r})" for k, v in sorted(wrong.items())))

    def _boot(self) -> None:
        from cloud.ssh import executor_for
        probe = crunchrun.boot_probe_command(self.vms.boot_probe_command)
        deadline = time.monotonic() + self.vms.timeout_booting
        last = "no attempt yet"
        while True:
            try:
                inst = self._fresh() or self.instance
                if self.executor is None:
                    self.executor = executor_for(self.cluster, self.iset, inst, secret=self.secret,
                                                 logger=logging.getLogger("cloudtest.ssh"))
                else:
                    self.executor.set_target(inst)
                res = self.executor.execute(probe)
                if res.ok:
                    break
                last = f"exit {res.exit_status}: {res.stderr.decode(errors='replace').strip()[:200]}"
            except Exception as e:  # ExecutorError, CloudError: the VM is not up yet
                last = f"{type(e).__name__}: {e}"
            if time.monotonic() + self.vms.probe_interval > deadline:
                raise StepFailed(f"boot probe {probe!r} did not succeed within TimeoutBooting "
                                 f"({self.vms.timeout_booting:g}s); last: {last}")
            self._sleep(self.vms.probe_interval)
        addr = getattr(inst, "address", "")
        if addr:
            host, _, port = addr.partition(":")
            self._line(f"  login: ssh -p{port or self.vms.ssh_port} {inst.remote_user}@{host}")

    def _run_command(self) -> None:
        res = self.executor.execute(self.command)
        self.out.write(res.stdout.decode(errors="replace"))
        self.out.flush()
        if not res.ok:
            raise StepFailed(f"exit {res.exit_status}: {res.stderr.decode(errors='replace').strip()[:500]}")

    def _destroy(self) -> None:
        """Destroy, then wait until it is no longer listed, re-destroying every TimeoutShutdown."""
        deadline = time.monotonic() + max(self.vms.timeout_booting, 60.0)
        next_destroy = 0.0
        while True:
            now = time.monotonic()
            if now >= next_destroy:
                try:
                    self.instance.destroy()
                except CloudError as e:
                    self._line(f"  destroy {self.instance.id}: {e} (will retry)")
                next_destroy = now + self.vms.timeout_shutdown
            try:
                if self._fresh() is None:
                    self._line(f"  {self.instance.id} is gone")
                    self.instance = None
                    return
            except CloudError as e:
                self._line(f"  list: {e} (will retry)")
            if time.monotonic() > deadline:
                raise StepFailed(f"{self.instance.id} still listed; destroy it by hand")
            self._sleep(min(self.vms.sync_interval, 5.0))


class StepFailed(Exception):
    pass


_FAILED = object()
