"""``dispatch-cloud-crunch-run``: the worker-side runner, speaking crunch-run's background protocol.

The dispatcher drives workers only through four command lines (``--detach``, ``--list``,
``--kill N``, and the boot probe), so this module reproduces exactly what Arvados crunch-run's
``background.go`` shows the dispatcher: the lock files in the lock dir, the ``--list`` grammar and
the ``--kill`` exit codes. What runs inside is much smaller than crunch-run: the container's
``command`` as a plain process (no Docker, no arv-mount, no output collection).

Lock dir: ``$CRUNCH_RUN_LOCKDIR`` or ``/var/lock``. Work dir (per-container logs and default cwd):
``$CRUNCH_RUN_WORKDIR``, else ``<parent of $CRUNCH_RUN_LOCKDIR>/work`` when that is set, else
``/var/tmp/crunch-run-work``. Each container gets ``<work>/<uuid>/`` holding ``stdout.txt``,
``stderr.txt`` (the command's) and ``crunch-run.txt`` (this runner's JSON log); their paths are
recorded in the container's ``runtime_status`` (keys ``stdoutPath``, ``stderrPath``,
``crunchRunLogPath``), never in ``log``, which Arvados reserves for a collection.

Differences from crunch-run: ``--runtime-engine`` is accepted and ignored (there is only the
process engine); SIGUSR2 from ``--list`` is handled but no ``cost`` is computed from
``crunch-run-prices.json`` (which is still written); a container killed by signal N completes
with exit_code 128+N; the only "broken node" condition detected is ENOSPC when starting a
container (it runs ``--broken-node-hook``, or creates ``crunch-run-broken``); unknown arguments
are ignored rather than rejected, since the dispatcher passes CrunchRunArgumentsList through.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

PROG = "dispatch-cloud-crunch-run"
BROKEN_FILE = "crunch-run-broken"
PRICES_FILE = "crunch-run-prices.json"
ALL_LOCK = "crunch-run-all.lock"
LOCK_FD_ENV = "DISPATCH_CLOUD_CRUNCH_RUN_LOCK_FD"  # the child's inherited lock fd
READY_FD_ENV = "DISPATCH_CLOUD_CRUNCH_RUN_READY_FD"  # the child writes one byte here when ready
_LOCKNAME = re.compile(r"^crunch-run-(.+)\.lock$")
UUID_LEN = 27
# Environment passed from the runner's own environment into a container (besides its own
# ``environment``): enough for a shell to work, plus the local-VM marker so that destroying a
# local VM can find processes that escaped its process tree.
_PASS_ENV = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "TMPDIR", "DISPATCH_CLOUD_LOCALVM")
API_RETRIES = 4  # after the first attempt, for connection errors and 5xx answers
API_BACKOFF = 0.5  # seconds before the first retry, doubled each time (7.5 s in all)
KILL_GRACE = 0.8  # seconds between SIGTERM and SIGKILL for the container's process group


def lock_dir() -> str:
    return os.environ.get("CRUNCH_RUN_LOCKDIR") or "/var/lock"


def work_root() -> str:
    if os.environ.get("CRUNCH_RUN_WORKDIR"):
        return os.environ["CRUNCH_RUN_WORKDIR"]
    if os.environ.get("CRUNCH_RUN_LOCKDIR"):
        return os.path.join(os.path.dirname(os.path.abspath(os.environ["CRUNCH_RUN_LOCKDIR"])), "work")
    return "/var/tmp/crunch-run-work"


def lock_path(uuid: str) -> str:
    return os.path.join(lock_dir(), f"crunch-run-{uuid}.lock")


# ---------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    """Go ``flag`` style: every long flag is accepted with one dash or two."""
    p = argparse.ArgumentParser(prog=PROG, add_help=False, allow_abbrev=False,
                                description="Run one container and speak crunch-run's background protocol.")

    def flag(name, **kw):
        p.add_argument(f"-{name}", f"--{name}", **kw)

    flag("help", action="help", help="show this help and exit")
    flag("detach", action="store_true", help="start the container in the background and exit")
    flag("no-detach", dest="no_detach", action="store_true", help=argparse.SUPPRESS)
    flag("stdin-config", dest="stdin_config", action="store_true",
         help="read ConfigData JSON (Env, ...) from stdin")
    flag("list", action="store_true", help="list running containers (and 'broken')")
    flag("stdin-prices", dest="stdin_prices", action="store_true",
         help="with --list: save the price history JSON read from stdin")
    flag("kill", type=int, default=-1, metavar="N", help="send signal N to the container's runner")
    flag("version", action="store_true", help="print the version and exit")
    flag("runtime-engine", dest="runtime_engine", default="process",
         help="accepted for compatibility; containers always run as plain processes")
    flag("broken-node-hook", dest="broken_node_hook", default="",
         help="command to run instead of creating the crunch-run-broken file")
    # crunch-run flags that take a value: accepted so their values are not taken for the UUID.
    for ignored in ("config", "crunchstat-interval", "ca-certs", "container-enable-networking",
                    "container-network-mode", "memprofile", "cgroup-parent-subsystem",
                    "cgroup-root", "cgroup-parent"):
        flag(ignored, dest="ignored_" + ignored.replace("-", "_"), help=argparse.SUPPRESS)
    p.add_argument("positional", nargs="*", help="container UUID")
    return p


@dataclass(frozen=True)
class Invocation:
    args: argparse.Namespace
    uuid: str | None
    ignored: tuple[str, ...]


def parse(argv: list[str]) -> Invocation:
    """Parse ``argv``; unknown flags (the dispatcher passes CrunchRunArgumentsList through) are kept
    in ``ignored``. The container UUID is the last positional argument."""
    p = build_parser()
    args, extra = p.parse_known_args(argv)
    positional = list(args.positional) + [e for e in extra if not e.startswith("-")]
    ignored = tuple(e for e in extra if e.startswith("-")) + tuple(positional[:-1])
    return Invocation(args, positional[-1] if positional else None, ignored)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        inv = parse(argv)
    except SystemExit as e:  # argparse: usage error (2) or --help (0)
        return int(e.code or 0)
    a = inv.args
    if a.version:
        print(f"{PROG} {_version()} (python {sys.version.split()[0]})")
        return 0
    if not a.list and inv.uuid is None:
        print("missing required argument: container-uuid (try -help)", file=sys.stderr)
        return 2
    if a.no_detach:
        _child_ready()
    try:
        if a.detach and not a.no_detach:
            return detach(inv.uuid, argv, sys.stdin.buffer if a.stdin_config else None)
        if a.kill >= 0:
            return kill_process(inv.uuid, a.kill)
        if a.list:
            return list_processes(sys.stdin.buffer if a.stdin_prices else None, sys.stdout)
        return run(inv)
    except OSError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1


def _child_ready() -> None:
    """In the detached child: take over SIGUSR2 (--list's liveness ping), then tell the parent."""
    signal.signal(signal.SIGUSR2, lambda *_: None)  # prices are not used: see the module doc
    fd = os.environ.pop(READY_FD_ENV, "")
    if fd:
        try:
            os.write(int(fd), b"1")
            os.close(int(fd))
        except (OSError, ValueError):
            pass


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("dispatch-cloud")
    except Exception:  # not installed (running from a source tree)
        return "dev"


# ---------------------------------------------------------------------------------------------
# Locks


class DirLock:
    """``crunch-run-all.lock``: serializes creating per-container locks and deleting stale ones."""

    def __init__(self, directory: str):
        self._path = os.path.join(directory, ALL_LOCK)
        self._fd = -1

    def __enter__(self):
        self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        os.close(self._fd)  # closing releases the flock
        self._fd = -1


def detach(uuid: str, argv: list[str], stdin) -> int:
    """Lock, start the runner child in its own session, print ``{"UUID":...,"PID":...}``."""
    d = lock_dir()
    os.makedirs(d, exist_ok=True)
    path = lock_path(uuid)
    with DirLock(d):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o700)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            print(f"lock {path}: {os.strerror(e.errno)}", file=sys.stderr)
            return 1
    os.ftruncate(fd, 0)
    work = os.path.join(work_root(), uuid)
    os.makedirs(work, exist_ok=True)
    ready_r, ready_w = os.pipe()
    env = dict(os.environ, **{LOCK_FD_ENV: str(fd), READY_FD_ENV: str(ready_w)})
    try:
        with open(os.path.join(work, "crunch-run.txt"), "ab") as log:
            child = subprocess.Popen(
                [sys.executable, "-m", "cloud.local.runner", "--no-detach", *argv],
                stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                stdout=log, stderr=log, pass_fds=(fd, ready_w), start_new_session=True, env=env,
                cwd=_source_root())
        os.close(ready_w)
        child.returncode = 0  # never waited for: it outlives us on purpose
        if stdin is not None:
            try:
                child.stdin.write(stdin.read())
            finally:
                child.stdin.close()
        # Publish the PID only once the child handles SIGUSR2: --list sends it to every runner it
        # finds, and the default action would kill a runner that is still starting.
        ready = os.read(ready_r, 1)
    finally:
        os.close(ready_r)
    if not ready:
        print(f"{PROG}: runner for {uuid} exited while starting; see {work}/crunch-run.txt",
              file=sys.stderr)
        return 1
    line = json.dumps({"UUID": uuid, "PID": child.pid}, separators=(",", ":")) + "\n"
    os.write(fd, line.encode())
    sys.stdout.write(line)
    sys.stdout.flush()
    return 0


def _source_root() -> str:
    """The directory holding the ``cloud`` package, so ``python -m cloud.local.runner`` finds it."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read_procinfo(path: str) -> dict:
    with open(path, "rb") as f:
        return json.loads(f.read() or b"null") or {}


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie is not: it is dead, just not yet reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return _proc_state(pid) not in ("Z", "X", None)


def _proc_state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return None
    return stat[stat.rfind(")") + 2:][:1]


# ---------------------------------------------------------------------------------------------
# --list and --kill


def list_processes(prices_in, out) -> int:
    """Print ``<uuid>``, ``<uuid> stale`` or ``broken`` lines, in directory order."""
    d = lock_dir()
    if prices_in is not None:
        data = prices_in.read()
        if data:
            try:
                _write_atomic(os.path.join(d, PRICES_FILE), data)
            except OSError as e:
                print(f"error writing price data: {e}", file=sys.stderr)
    try:
        entries = list(os.scandir(os.path.join(d, ".")))
    except FileNotFoundError:
        return 0
    except OSError as e:
        print(f"error listing {d}: {e}", file=sys.stderr)
        return 1
    for ent in entries:
        if ent.is_dir(follow_symlinks=False):
            continue
        if ent.name == BROKEN_FILE:
            out.write("broken\n")
            continue
        if not _LOCKNAME.match(ent.name):
            continue
        line = _probe_lock(d, ent.path)
        if line:
            out.write(line + "\n")
    out.flush()
    return 0


def _probe_lock(d: str, path: str) -> str | None:
    try:
        if os.stat(path).st_size == 0:  # still starting, or the dir lock
            return None
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        with DirLock(d):
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                pass  # held: someone is running
            else:  # nobody holds it: stale file, delete it
                try:
                    os.unlink(path)
                except OSError as e:
                    print(f"unlink {path}: {e}", file=sys.stderr)
                return None
        try:
            info = json.loads(os.pread(fd, 4096, 0) or b"null") or {}
            uuid, pid = str(info.get("UUID") or ""), int(info.get("PID") or 0)
        except (ValueError, TypeError, AttributeError) as e:
            print(f"{path}: bad lock file content: {e}", file=sys.stderr)
            return None
        if not uuid or not pid:
            print(f"{path}: lock file has no UUID or PID", file=sys.stderr)
            return None
        try:
            os.kill(pid, signal.SIGUSR2)  # the live runner takes it as "prices changed"
        except OSError:
            return f"{uuid} stale"
        return uuid if pid_alive(pid) else f"{uuid} stale"
    finally:
        os.close(fd)


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}~{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o777)
    os.replace(tmp, path)


def kill_process(uuid: str, signum: int, *, timeout: float = 1.0, interval: float = 0.01) -> int:
    """Signal the runner once, then poll: 0 when gone (or never running), 1 while still alive."""
    path = lock_path(uuid)
    try:
        info = _read_procinfo(path)
    except FileNotFoundError:
        return 0
    except (OSError, ValueError) as e:
        print(f"{path}: {e}", file=sys.stderr)
        return 1
    pid = int(info.get("PID") or 0) if isinstance(info, dict) else 0
    if not isinstance(info, dict) or info.get("UUID") != uuid or not pid:
        print(f"{path}: lock file does not describe {uuid}", file=sys.stderr)
        return 1
    deadline = time.monotonic() + timeout
    sig = signum
    while True:
        try:
            if sig == 0 and not pid_alive(pid):
                raise ProcessLookupError(errno.ESRCH, os.strerror(errno.ESRCH))
            os.kill(pid, sig)
        except OSError as e:
            print(f"{uuid}: pid {pid}: {e.strerror or e}", file=sys.stderr)
            return 0
        sig = 0
        if time.monotonic() >= deadline:
            print(f"{uuid}: pid {pid}: sent signal {signum} ({_signame(signum)}) but process is still alive",
                  file=sys.stderr)
            return 1
        time.sleep(interval)


def _signame(n: int) -> str:
    try:
        return signal.Signals(n).name
    except ValueError:
        return f"signal {n}"


# ---------------------------------------------------------------------------------------------
# Run mode: the detached child


class Cancelled(Exception):
    """SIGTERM arrived before the container's process was started."""


def _api_call(log: logging.Logger, what: str, fn: Callable, *args):
    """One container API call. The client itself retries connection failures and 5xx answers with
    backoff (API_RETRIES, API_BACKOFF); a 4xx is final. Failures are logged with context."""
    try:
        return fn(*args)
    except Exception as e:
        log.error("container API call failed", extra={"call": what, "error": str(e)})
        raise


def container_env(environment: dict, base: dict | None = None) -> dict:
    """The container's environment: a few variables of ours, then the container's on top."""
    base = os.environ if base is None else base
    env = {k: base[k] for k in _PASS_ENV if k in base}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env.update({str(k): str(v) for k, v in (environment or {}).items()})
    return env


def resolve_cwd(cwd: str | None, workdir: str) -> str:
    """Relative (or empty) cwd: under the container's work dir; absolute: as given."""
    if not cwd or cwd == ".":
        return workdir
    return cwd if os.path.isabs(cwd) else os.path.join(workdir, cwd)


def exit_code_of(returncode: int) -> int:
    """A shell's convention: killed by signal N -> 128+N."""
    return 128 - returncode if returncode < 0 else returncode


class Runner:
    """Runs one container: Locked -> Running -> Complete (or Cancelled on SIGTERM)."""

    def __init__(self, uuid: str, client, workdir: str, lock_fd: int | None, log: logging.Logger,
                 broken_node_hook: str = ""):
        self.uuid = uuid
        self.client = client
        self.workdir = workdir
        self.lock_fd = lock_fd
        self.log = log
        self.broken_node_hook = broken_node_hook
        self.proc: subprocess.Popen | None = None
        self.terminating = False

    def on_sigterm(self, signum, frame):
        self.log.info("received signal, stopping container", extra={"signal": signum})
        self.terminating = True
        if self.proc is not None:
            _killpg(self.proc.pid, signal.SIGTERM)

    def run(self) -> int:
        paths = {"stdoutPath": os.path.join(self.workdir, "stdout.txt"),
                 "stderrPath": os.path.join(self.workdir, "stderr.txt"),
                 "crunchRunLogPath": os.path.join(self.workdir, "crunch-run.txt")}
        try:
            ctr = _api_call(self.log, "get", self.client.get_container, self.uuid)
            if ctr.get("state") != "Locked":
                self.log.error("container is not Locked", extra={"state": ctr.get("state")})
                return 1
            if self.terminating:
                raise Cancelled()
            api_env = self._api_env(ctr)
            _api_call(self.log, "update", self.client.update, self.uuid,
                      {"state": "Running", "runtime_status": paths})
        except Cancelled:
            self.log.info("cancelled before start; leaving the container Locked")
            return 1
        except Exception as e:
            self._fatal(f"container API: {e}")
            return 1
        try:
            self.proc = self._spawn(ctr, paths, api_env)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                self._broken_node(str(e))
            return self._finish({"state": "Cancelled",
                                 "runtime_status": dict(paths, error=f"cannot start container: {e}")})
        if self.terminating:  # SIGTERM arrived while spawning
            _killpg(self.proc.pid, signal.SIGTERM)
        rc = self._wait()
        if self.terminating:
            return self._finish({"state": "Cancelled"})
        return self._finish({"state": "Complete", "exit_code": exit_code_of(rc)})

    def _api_env(self, ctr: dict) -> dict:
        """What a container with ``runtime_constraints.API`` gets to call the API as itself, as
        crunch-run gives it: the container's own token (``v2/<auth uuid>/<secret>/<container>``,
        crunch-run's ContainerToken), never the dispatcher's; nothing for other containers."""
        if not (ctr.get("runtime_constraints") or {}).get("API"):
            return {}
        auth = _api_call(self.log, "auth", self.client.container_auth, self.uuid)
        return {"ARVADOS_API_TOKEN": f"v2/{auth['uuid']}/{auth['api_token']}/{self.uuid}",
                "ARVADOS_API_HOST": os.environ.get("ARVADOS_API_HOST", ""),
                "ARVADOS_API_HOST_INSECURE": os.environ.get("ARVADOS_API_HOST_INSECURE", "")}

    def _spawn(self, ctr: dict, paths: dict, api_env: dict | None = None) -> subprocess.Popen:
        command = ctr.get("command") or []
        if not isinstance(command, list) or not command:
            raise OSError(errno.EINVAL, "container command is empty or not a list")
        cwd = resolve_cwd(ctr.get("cwd"), os.path.join(self.workdir, "work"))
        if cwd.startswith(self.workdir):
            os.makedirs(cwd, exist_ok=True)
        with open(paths["stdoutPath"], "ab") as out, open(paths["stderrPath"], "ab") as err:
            proc = subprocess.Popen(
                [str(c) for c in command], stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                cwd=cwd, env={**container_env(ctr.get("environment") or {}), **(api_env or {})},
                start_new_session=True,
                pass_fds=(self.lock_fd,) if self.lock_fd is not None else ())
        self.log.info("container started", extra={"pid": proc.pid, "command": command, "cwd": cwd})
        return proc

    def _wait(self) -> int:
        """Wait for the container's main process. After SIGTERM its process group gets KILL_GRACE
        seconds, then SIGKILL. Whatever of the group outlives the main process is killed too, as
        Docker would stop a finished container."""
        killed_at = None
        while True:
            try:
                rc = self.proc.wait(timeout=0.1)
                break
            except subprocess.TimeoutExpired:
                pass
            if self.terminating:
                killed_at = killed_at or time.monotonic()
                if time.monotonic() - killed_at > KILL_GRACE:
                    _killpg(self.proc.pid, signal.SIGKILL)
        _killpg(self.proc.pid, signal.SIGKILL)
        self.log.info("container exited", extra={"returncode": rc})
        return rc

    def _finish(self, fields: dict) -> int:
        try:
            _api_call(self.log, "update", self.client.update, self.uuid, fields)
        except Exception as e:
            self._fatal(f"container API: {e}")
            return 1
        self.log.info("container finished", extra=fields)
        return 0

    def _fatal(self, msg: str) -> None:
        self.log.error(msg)
        try:
            with open(os.path.join(self.workdir, "stderr.txt"), "a") as f:
                f.write(f"{PROG}: {msg}\n")
        except OSError:
            pass

    def _broken_node(self, reason: str) -> None:
        """crunch-run's runBrokenNodeHook: run the hook, or flag the node broken for --list."""
        self.log.error("broken node", extra={"reason": reason})
        if self.broken_node_hook:
            subprocess.run(self.broken_node_hook, shell=True, check=False)
        else:
            open(os.path.join(lock_dir(), BROKEN_FILE), "a").close()


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def run(inv: Invocation) -> int:
    """The child: configure from stdin/env, build the API client, run the container."""
    uuid = inv.uuid
    if len(uuid) != UUID_LEN:
        print(f"{PROG}: {uuid!r} is not a container UUID", file=sys.stderr)
        return 1
    if inv.args.stdin_config:
        try:
            cfg = json.loads(sys.stdin.buffer.read() or b"{}")
            env = cfg.get("Env") or {}
            if not isinstance(env, dict):
                raise ValueError("Env is not an object")
        except (ValueError, AttributeError) as e:
            print(f"{PROG}: --stdin-config: bad ConfigData JSON on stdin: {e}", file=sys.stderr)
            return 1
        os.environ.update({str(k): str(v) for k, v in env.items()})
    workdir = os.path.join(work_root(), uuid)
    os.makedirs(workdir, exist_ok=True)
    log = _runner_logger(uuid)
    if inv.ignored:
        log.info("ignoring arguments", extra={"ignored_args": list(inv.ignored)})
    if inv.args.runtime_engine not in ("process",):
        log.info("runtime engine not available; running the container as a plain process",
                 extra={"runtime_engine": inv.args.runtime_engine})
    lock_fd = int(os.environ.pop(LOCK_FD_ENV)) if os.environ.get(LOCK_FD_ENV) else None
    host = os.environ.get("ARVADOS_API_HOST", "")
    token = os.environ.get("ARVADOS_API_TOKEN", "")
    if not host or not token:
        msg = "ARVADOS_API_HOST and ARVADOS_API_TOKEN must be set (ConfigData Env)"
        print(f"{PROG}: {msg}", file=sys.stderr)
        Runner(uuid, None, workdir, lock_fd, log)._fatal(msg)
        return 1
    insecure = os.environ.get("ARVADOS_API_HOST_INSECURE", "") not in ("", "0", "false")
    from api.arvados.client import ArvadosClient
    client = ArvadosClient(host, token, insecure=insecure, retries=API_RETRIES, backoff=API_BACKOFF)
    runner = Runner(uuid, client, workdir, lock_fd, log, inv.args.broken_node_hook)
    signal.signal(signal.SIGTERM, runner.on_sigterm)
    signal.signal(signal.SIGINT, runner.on_sigterm)
    try:
        return runner.run()
    except Exception as e:  # a bug: still leave a trace where the operator looks
        log.exception("runner failed")
        runner._fatal(f"internal error: {type(e).__name__}: {e}")
        return 1


class _Fields(logging.LoggerAdapter):
    """Adds fixed fields to every record, keeping the caller's ``extra`` (3.11 would drop them)."""

    def process(self, msg, kwargs):
        kwargs["extra"] = {**self.extra, **kwargs.get("extra", {})}
        return msg, kwargs


def _runner_logger(uuid: str) -> logging.Logger:
    from conf import logsetup
    logsetup.setup("info")  # stderr is crunch-run.txt (see detach)
    return _Fields(logging.getLogger("crunch-run"), {"ContainerUUID": uuid})


if __name__ == "__main__":
    sys.exit(main())
