"""The stub cloud's values: its knobs (:class:`StubParams`), one VM (:class:`StubVM`), one fake
crunch-run process (:class:`FakeCrunchRun`), and the pure parsing the fake shell needs.

Nothing here touches a clock or a lock; :mod:`cloud.stub.driver` owns time, events and threads.
"""

from __future__ import annotations

import functools
import json
import shlex
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from enum import Enum

from cloud import crunchrun
from conf.model import InstanceType
from conf.units import parse_duration

COMMAND_HISTORY = 1000  # commands remembered per VM, for tests


class StubParamsError(ValueError):
    """A DriverParameters value the stub driver cannot use; the message names the key."""


# ---------------------------------------------------------------------------------------------
# Knobs


@dataclass(frozen=True)
class StubParams:
    """Cloud-wide knobs, from ``Containers.CloudVMs.DriverParameters`` (CamelCase keys).

    Defaults make a small queue finish within a minute of real time; rates are probabilities
    (0..1), durations seconds. Per-VM knobs are drawn from these at create time and can then be
    overridden on the :class:`StubVM` by a ``setup_vm`` hook.
    """

    error_rate_create: float = 0.0
    error_rate_destroy: float = 0.0
    min_time_between_create_calls: float = 0.0
    min_time_between_instances_calls: float = 0.0
    quota_max_instances: int = 0  # 0 = unlimited
    capacity_error_types: tuple[str, ...] = ()
    capacity_error_quota_groups: tuple[str, ...] = ()
    capacity_error_all: bool = False
    boot_time: float = 3.0
    boot_time_jitter: float = 1.0
    broken_rate: float = 0.0
    broken_after: float = 60.0
    report_broken_rate: float = 0.0
    report_broken_after: float = 60.0
    crunch_run_missing_rate: float = 0.0
    crunch_run_crash_rate: float = 0.0
    crunch_run_detach_delay: float = 0.0
    arv_mount_max_exit_lag: float = 0.0
    arv_mount_deadlock_rate: float = 0.0
    container_run_time: float = 3.0
    container_run_time_jitter: float = 0.0
    container_exit_code: int = 0
    destroy_delay: float = 0.0
    seed: int = 0

    @classmethod
    def from_driver_parameters(cls, raw: Mapping | None,
                               where: str = "Containers.CloudVMs.DriverParameters") -> StubParams:
        """Parse CamelCase DriverParameters; unknown keys and bad values raise StubParamsError."""
        if raw is None:
            return cls()
        if not isinstance(raw, Mapping):
            raise StubParamsError(f"{where}: expected a mapping of stub driver parameters, "
                                  f"got {type(raw).__name__}")
        by_key = {_camel(f.name): f for f in fields(cls)}
        values = {}
        for key, value in raw.items():
            f = by_key.get(key)
            if f is None:
                known = ", ".join(sorted(by_key))
                raise StubParamsError(f"{where}.{key}: unknown stub driver parameter "
                                      f"(known: {known})")
            values[f.name] = _convert(f"{where}.{key}", f.name, value)
        return cls(**values)


_RATES = {"error_rate_create", "error_rate_destroy", "broken_rate", "report_broken_rate",
          "crunch_run_missing_rate", "crunch_run_crash_rate", "arv_mount_deadlock_rate"}
_INTS = {"quota_max_instances", "container_exit_code", "seed"}
_LISTS = {"capacity_error_types", "capacity_error_quota_groups"}
_BOOLS = {"capacity_error_all"}


def _camel(name: str) -> str:
    return "".join(w.capitalize() for w in name.split("_"))


def _convert(key: str, name: str, value):
    if name in _BOOLS:
        if not isinstance(value, bool):
            raise StubParamsError(f"{key}: expected true or false, got {value!r}")
        return value
    if name in _LISTS:
        if isinstance(value, str) or not isinstance(value, (list, tuple)) or \
                not all(isinstance(v, str) for v in value):
            raise StubParamsError(f"{key}: expected a list of strings, got {value!r}")
        return tuple(value)
    if name in _INTS:
        if isinstance(value, bool) or not isinstance(value, int):
            raise StubParamsError(f"{key}: expected an integer, got {value!r}")
        if name == "quota_max_instances" and value < 0:
            raise StubParamsError(f"{key}: must be >= 0, got {value}")
        return value
    if name in _RATES:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise StubParamsError(f"{key}: expected a probability between 0 and 1, got {value!r}")
        return float(value)
    # everything else is a duration: a Go duration string, or a number of seconds
    if isinstance(value, bool):
        raise StubParamsError(f"{key}: expected a duration like \"3s\", got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        try:
            seconds = float(parse_duration(value))
        except ValueError as e:
            raise StubParamsError(f"{key}: {e}") from None
    else:
        raise StubParamsError(f"{key}: expected a duration like \"3s\", got {value!r}")
    if seconds < 0:
        raise StubParamsError(f"{key}: must not be negative, got {value!r}")
    return seconds


# ---------------------------------------------------------------------------------------------
# A VM and its fake crunch-run processes


class Phase(Enum):
    STARTING = "starting"  # detached, not yet Running in the API
    RUNNING = "running"    # the container is Running in the API
    EXITED = "exited"      # the process is gone; its lock may linger ("<uuid> stale")


@dataclass(eq=False)
class FakeCrunchRun:
    """One detached crunch-run on a stub VM, with the credentials it was started with."""

    uuid: str
    pid: int
    api_host: str
    api_token: str
    insecure: bool
    crash: str | None  # None, "early" (before Running) or "late" (after Running)
    phase: Phase = Phase.STARTING
    container: object = None  # what get_container returned
    busy: bool = False  # an API call is in flight (outside the cloud lock)
    kill_requested: bool = False
    deadlocked: bool = False
    exit_reason: str = ""

    @property
    def ended(self) -> bool:
        return self.phase is Phase.EXITED


@dataclass(frozen=True)
class ExecRecord:
    at: float
    command: str
    exit_status: int


@dataclass(eq=False)
class StubVM:
    """One stub VM: the instance as the cloud sees it, plus knobs a ``setup_vm`` hook may change.

    Times are clock seconds; ``None`` means "never".
    """

    id: str
    instance_type: InstanceType
    image_id: str
    tags: dict
    init_command: str
    public_key: str | None
    created_at: float
    boot_at: float
    broken_at: float | None = None
    report_broken_at: float | None = None
    crunch_run_missing: bool = False
    crash_rate: float = 0.0
    detach_delay: float = 0.0
    arv_mount_max_exit_lag: float = 0.0
    deadlock_rate: float = 0.0
    execute_container: Callable[[object], int] = lambda ctr: 0
    destroying: bool = False
    destroyed_at: float | None = None
    ready_at: float | None = None  # when the boot probe first answered
    procs: dict = field(default_factory=dict)  # uuid -> FakeCrunchRun, in start order
    commands: deque = field(default_factory=lambda: deque(maxlen=COMMAND_HISTORY))
    prices: bytes = b""  # last --stdin-prices payload

    @property
    def provider_type(self) -> str:
        return self.instance_type.provider_type

    @property
    def address(self) -> str:
        return "stub-" + self.id.split(",", 1)[0]

    @property
    def secret(self) -> str | None:
        """The instance secret the init command writes, if it writes one."""
        return crunchrun.secret_from_init_command(self.init_command)


# ---------------------------------------------------------------------------------------------
# The fake shell's parsing: pure functions


@dataclass(frozen=True)
class RunnerCall:
    """A parsed crunch-run command line (Go ``flag`` syntax: ``-x`` and ``--x`` both work)."""

    detach: bool = False
    stdin_config: bool = False
    list: bool = False
    stdin_prices: bool = False
    kill: int | None = None
    uuid: str = ""
    error: str = ""  # usage error: crunch-run exits 2


_BOOL_FLAGS = {"detach", "stdin-config", "list", "stdin-prices", "no-detach", "sleep",
               "enable-memory-limit", "version", "help"}
_VALUE_FLAGS = {"kill", "runtime-engine", "broken-node-hook", "config", "crunchstat-interval",
                "ca-certs", "container-enable-networking", "container-network-mode",
                "memprofile", "cgroup-parent-subsystem", "cgroup-root", "cgroup-parent"}


def parse_runner_args(args: list[str]) -> RunnerCall:
    """Parse crunch-run's arguments; unknown ``--flag[=v]`` args are accepted and ignored."""
    seen: dict[str, str] = {}
    positional: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        i += 1
        if positional or not a.startswith("-") or a in ("-", "--"):
            if a == "--" and not positional:
                positional.extend(args[i:])
                break
            positional.append(a)
            continue
        name, eq, value = a.lstrip("-").partition("=")
        if name in _VALUE_FLAGS and not eq:
            if i >= len(args):
                return RunnerCall(error=f"flag needs an argument: -{name}")
            value = args[i]
            i += 1
        seen[name] = value if (eq or name in _VALUE_FLAGS) else "true"
    kill = None
    if "kill" in seen:
        try:
            kill = int(seen["kill"])
        except ValueError:
            return RunnerCall(error=f'invalid value "{seen["kill"]}" for flag -kill')
    call = RunnerCall(detach="detach" in seen, stdin_config="stdin-config" in seen,
                      list="list" in seen, stdin_prices="stdin-prices" in seen,
                      kill=kill if kill is not None and kill >= 0 else None)
    if call.list and not (call.detach or call.kill is not None):
        if positional:
            return RunnerCall(error=f"unexpected argument {positional[0]!r}")
        return call
    if len(positional) != 1:
        return RunnerCall(error="missing required argument: container-uuid (try -help)")
    return RunnerCall(detach=call.detach, stdin_config=call.stdin_config, list=call.list,
                      stdin_prices=call.stdin_prices, kill=call.kill, uuid=positional[0])


def runner_args(argv: list[str], runner_commands: frozenset[tuple[str, ...]]) -> list[str] | None:
    """The arguments after the crunch-run program in ``argv``, or None if it is not crunch-run.

    A program counts as crunch-run if its basename starts with ``crunch-run`` (which covers the
    deployed ``crunch-run~<md5>``) or if ``argv`` starts with a configured runner command.
    """
    if not argv:
        return None
    for words in sorted(runner_commands, key=len, reverse=True):
        if words and tuple(argv[:len(words)]) == words:
            return argv[len(words):]
    if argv[0].rsplit("/", 1)[-1].startswith("crunch-run"):
        return argv[1:]
    return None


def split_command(command: str) -> tuple[str, list[str]]:
    """Strip a leading ``sudo `` and split the rest as sh would (ValueError on bad quoting)."""
    cmd, argv = _split(command)
    return cmd, list(argv)


@functools.lru_cache(maxsize=4096)
def _split(command: str) -> tuple[str, tuple[str, ...]]:
    """Memoized: a simulation sends the same probe commands hundreds of thousands of times, and
    shlex costs ~10 us each."""
    cmd = command.strip()
    if cmd.startswith("sudo "):
        cmd = cmd[5:].lstrip()
    return cmd, tuple(shlex.split(cmd))


def parse_config_data(stdin: bytes) -> tuple[str, str, bool]:
    """(api_host, api_token, insecure) from crunch-run's stdin ConfigData; ValueError says why."""
    try:
        data = json.loads(stdin.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"error decoding stdin config: {e}") from None
    env = data.get("Env") if isinstance(data, dict) else None
    if not isinstance(env, dict):
        raise ValueError("stdin config has no Env object")
    host, token = env.get("ARVADOS_API_HOST"), env.get("ARVADOS_API_TOKEN")
    if not isinstance(host, str) or not host:
        raise ValueError("stdin config: Env.ARVADOS_API_HOST is missing or empty")
    if not isinstance(token, str) or not token:
        raise ValueError("stdin config: Env.ARVADOS_API_TOKEN is missing or empty")
    insecure = str(env.get("ARVADOS_API_HOST_INSECURE", "")).lower() in ("1", "true", "yes")
    return host, token, insecure


def list_output(vm: StubVM, now: float) -> str:
    """``crunch-run --list`` output: ``<uuid>`` / ``<uuid> stale`` per lock, then ``broken``."""
    return crunchrun.format_list([(p.uuid, p.ended) for p in sorted(vm.procs.values(), key=lambda p: p.pid)],
                                 vm.report_broken_at is not None and now >= vm.report_broken_at)


def container_field(ctr, name: str):
    """A field of a container as the API client returns it (a dict or an object)."""
    if isinstance(ctr, Mapping):
        return ctr.get(name)
    return getattr(ctr, name, None)
