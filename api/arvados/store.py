"""The container table of an Arvados-compatible API server, in SQLite.

It holds what the dispatcher needs from Arvados' ``containers`` and ``api_client_authorizations``
tables and enforces the server side of the protocol (``services/api/app/models/container.rb``):
the state machine, ``lock_count`` and the ``Containers.MaxDispatchAttempts`` auto-cancel, the
container token of a Locked or Running container, and ``Containers.AlwaysUsePreemptibleInstances``
applied to child containers (``container_request.rb`` ``set_preemptible``), so the dispatcher can be
tested and run against the same rules it meets in production.

Thread-safe: the HTTP server calls it from several threads. The database runs in WAL mode;
every write takes one lock and is one ``BEGIN IMMEDIATE`` transaction, so a state change is
all-or-nothing and the queue survives a restart (reopen the same file). File-backed stores give
each reading thread its own connection so reads don't wait for writes; ``":memory:"`` stores
share one connection under the lock.

Filters and ordering are compiled by pure functions (:func:`compile_filters`,
:func:`compile_order`) against a fixed column table, so nothing a caller sends reaches SQL text.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import secrets
import sqlite3
import string
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

# ---------------------------------------------------------------------------------------------
# Errors: each carries the HTTP status the API server answers with.


class StoreError(Exception):
    status = 500

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class BadRequest(StoreError):
    status = 400


class NotLoggedIn(StoreError):
    status = 401


class PermissionDenied(StoreError):
    status = 403


class NotFound(StoreError):
    status = 404


class Unprocessable(StoreError):
    status = 422


# ---------------------------------------------------------------------------------------------
# Values

QUEUED, LOCKED, RUNNING, COMPLETE, CANCELLED = "Queued", "Locked", "Running", "Complete", "Cancelled"
STATES = (QUEUED, LOCKED, RUNNING, COMPLETE, CANCELLED)
FINAL_STATES = (COMPLETE, CANCELLED)

# State changes an update may make. Queued->Locked and Locked->Queued go through lock/unlock.
# (Arvados also allows Complete->Cancelled; nothing in the dispatcher needs it, so it is refused.)
UPDATE_TRANSITIONS: Mapping[str, frozenset] = {
    QUEUED: frozenset({CANCELLED}),
    LOCKED: frozenset({RUNNING, CANCELLED}),
    RUNNING: frozenset({COMPLETE, CANCELLED}),
    COMPLETE: frozenset(),
    CANCELLED: frozenset(),
}

MAX_DISPATCH_TEXT = ("Failed to start container.  Cancelled after exceeding "
                     "'Containers.MaxDispatchAttempts' (lock_count={n})")

# What the API server's lock/unlock responses select (containers_controller.rb).
LOCK_SELECT = ("uuid", "state", "priority", "auth_uuid", "locked_by_uuid")

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
DEFAULT_ORDER = ("modified_at desc",)


@dataclass(frozen=True)
class TokenInfo:
    """Who is calling: the token record's uuid (the lock owner) and whether it is an admin."""

    uuid: str
    admin: bool = False


# Column kinds: how a field is stored, rendered and compared.
STR, INT, FLOAT, TIME, MAP, LIST = "str", "int", "float", "time", "map", "list"

FIELDS: Mapping[str, str] = {
    "uuid": STR,
    "state": STR,
    "priority": INT,
    "locked_by_uuid": STR,
    "lock_count": INT,
    "auth_uuid": STR,
    "container_image": STR,
    "command": LIST,
    "cwd": STR,
    "environment": MAP,
    "mounts": MAP,
    "output_path": STR,
    "runtime_constraints": MAP,
    "scheduling_parameters": MAP,
    "created_at": TIME,
    "modified_at": TIME,
    "started_at": TIME,
    "finished_at": TIME,
    "exit_code": INT,
    "runtime_status": MAP,
    "log": STR,
    "output": STR,
    "cost": FLOAT,
    "progress": FLOAT,
    "gateway_address": STR,
}

FILTER_COLUMNS = ("uuid", "state", "priority", "locked_by_uuid", "created_at", "modified_at",
                  "lock_count")
ORDER_COLUMNS = FILTER_COLUMNS + ("started_at", "finished_at")
CREATE_FIELDS = ("container_image", "command", "cwd", "environment", "mounts", "output_path",
                 "priority", "runtime_constraints", "scheduling_parameters", "state")
UPDATE_FIELDS = ("state", "priority", "runtime_status", "progress", "log", "output", "cost",
                 "gateway_address", "exit_code")
# Fields only the dispatcher holding the lock may write while a container is locked.
PROGRESS_FIELDS = frozenset({"runtime_status", "progress", "log", "output", "cost",
                             "gateway_address", "exit_code"})
# Well-known runtime_status keys whose values must be strings (container.rb).
_RUNTIME_STATUS_STRINGS = ("error", "errorDetail", "warning", "warningDetail", "activity",
                           "preemptionNotice")

_ALNUM = string.ascii_lowercase + string.digits
_UUID_SPACE = 36 ** 15


def random_uuid(cluster_id: str, infix: str, rng=None) -> str:
    """A fresh uuid; from ``rng`` (a random.Random) when given, so a seeded simulation repeats.

    Without one, the 15 characters come from one ``secrets.randbelow`` (uniform over 36**15),
    not 15 ``secrets.choice`` calls: one OS random read per uuid instead of 15 (lock makes one).
    """
    if rng is not None:
        return f"{cluster_id}-{infix}-" + "".join(rng.choice(_ALNUM) for _ in range(15))
    n, out = secrets.randbelow(_UUID_SPACE), []
    for _ in range(15):
        n, d = divmod(n, 36)
        out.append(_ALNUM[d])
    return f"{cluster_id}-{infix}-" + "".join(out)


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def rfc3339(micros: int | None) -> str | None:
    """Integer microseconds since the epoch -> ``2026-01-02T03:04:05.123456Z``."""
    if micros is None:
        return None
    secs, us = divmod(int(micros), 1_000_000)
    return f"{_rfc3339_secs(secs)}.{us:06d}Z"


@functools.lru_cache(maxsize=4096)
def _rfc3339_secs(secs: int) -> str:
    """The seconds part, cached: a list renders a few timestamps per container, most of them
    from the same few seconds, and strftime was a tenth of the server's CPU in a burst."""
    return (_EPOCH + timedelta(seconds=secs)).strftime("%Y-%m-%dT%H:%M:%S")


def parse_time(value, what: str) -> int:
    """RFC3339 text -> integer microseconds; Unprocessable naming ``what`` if it isn't one."""
    if not isinstance(value, str):
        raise Unprocessable(f"{what}: expected an RFC3339 timestamp, got {value!r}")
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise Unprocessable(f"{what}: invalid timestamp {value!r}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return (dt - _EPOCH) // timedelta(microseconds=1)  # exact, unlike float timestamp()


def _token_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _split_v2(token: str) -> tuple[str | None, str, str]:
    """``v2/<uuid>/<secret>[/<container>]`` -> (uuid, secret, container or ""); a bare token ->
    (None, token, "").

    crunch-run appends the container's uuid to a container token (crunchrun.go ContainerToken);
    Arvados (api_client_authorization.rb validate) then also checks that container, if it exists:
    see :meth:`ContainerStore.authenticate`.
    """
    if token.startswith("v2/"):
        parts = token.split("/")
        if len(parts) in (3, 4) and parts[1] and parts[2]:
            return parts[1], parts[2], parts[3] if len(parts) == 4 else ""
    return None, token, ""


# ---------------------------------------------------------------------------------------------
# Filters, order, select: pure compilation into SQL fragments over whitelisted columns.

_COMPARE = {"=": "=", "!=": "!=", "<": "<", "<=": "<=", ">": ">", ">=": ">="}
FILTER_OPS = tuple(_COMPARE) + ("in", "not in", "like", "ilike", "is_a")


_INT64 = (-(2**63), 2**63 - 1)  # what SQLite (and Postgres' bigint) can hold


def _in_range(n, what: str):
    """An integer SQLite can store, or a finite float; Unprocessable (422) otherwise, not a 500."""
    if isinstance(n, int) and not _INT64[0] <= n <= _INT64[1]:
        raise Unprocessable(f"{what}: integer out of range")
    if isinstance(n, float) and not math.isfinite(n):
        raise Unprocessable(f"{what}: number out of range")
    return n


def _coerce(attr: str, value, where: str):
    kind = FIELDS[attr]
    if value is None:
        return None
    if kind == INT:
        if isinstance(value, bool):
            raise Unprocessable(f"{where}: operand {value!r} is not a number")
        if isinstance(value, (int, float)):
            return _in_range(value, where)
        if isinstance(value, str):
            # The Go dispatcher sends ["priority", ">", "0"]: compare numerically, as Postgres does.
            try:
                return _in_range(int(value), where)
            except ValueError:
                try:
                    return _in_range(float(value), where)
                except ValueError:
                    pass
        raise Unprocessable(f"{where}: operand {value!r} is not a number")
    if kind == TIME:
        return parse_time(value, where)
    if not isinstance(value, str):
        raise Unprocessable(f"{where}: operand {value!r} is not a string")
    return value


def compile_filters(filters) -> tuple[str, list]:
    """Arvados filters ``[[attr, op, operand], ...]`` -> (SQL condition, parameters).

    Raises Unprocessable naming the offending filter. ``!=`` and ``not in`` also match NULL,
    as Arvados' do; ``is_a`` matches everything for ``arvados#container`` and nothing otherwise.
    """
    if filters is None:
        return "1", []
    if not isinstance(filters, (list, tuple)):
        raise Unprocessable(f"filters: expected a list of [attribute, operator, operand], got {filters!r}")
    clauses, params = [], []
    for f in filters:
        where = f"filter {json.dumps(f, default=str)}"
        if not isinstance(f, (list, tuple)) or len(f) != 3:
            raise Unprocessable(f"{where}: expected [attribute, operator, operand]")
        attr, op, operand = f
        if isinstance(attr, str) and attr.startswith("containers."):
            attr = attr[len("containers."):]
        if attr not in FILTER_COLUMNS:
            raise Unprocessable(f"{where}: cannot filter on attribute {attr!r} "
                                f"(supported: {', '.join(FILTER_COLUMNS)})")
        if not isinstance(op, str) or op.lower() not in FILTER_OPS:
            raise Unprocessable(f"{where}: unsupported operator {op!r} (supported: {', '.join(FILTER_OPS)})")
        op = op.lower()
        kind = FIELDS[attr]
        if op in _COMPARE:
            value = _coerce(attr, operand, where)
            if value is None:
                if op not in ("=", "!="):
                    raise Unprocessable(f"{where}: operator {op!r} needs a non-null operand")
                clauses.append(f"{attr} IS {'NOT ' if op == '!=' else ''}NULL")
            elif op == "!=":
                clauses.append(f"({attr} != ? OR {attr} IS NULL)")
                params.append(value)
            else:
                clauses.append(f"{attr} {_COMPARE[op]} ?")
                params.append(value)
        elif op in ("in", "not in"):
            if not isinstance(operand, (list, tuple)):
                raise Unprocessable(f"{where}: operator {op!r} needs a list operand")
            values = [_coerce(attr, v, where) for v in operand]
            non_null = [v for v in values if v is not None]
            has_null = len(non_null) != len(values)
            marks = ",".join("?" * len(non_null))
            if op == "in":
                parts = [f"{attr} IN ({marks})"] if non_null else []
                if has_null:
                    parts.append(f"{attr} IS NULL")
                clauses.append("(" + " OR ".join(parts) + ")" if parts else "0")
            else:
                inner = f"{attr} NOT IN ({marks})" if non_null else "1"
                clauses.append(f"({inner} AND {attr} IS NOT NULL)" if has_null
                               else f"({inner} OR {attr} IS NULL)")
            params.extend(non_null)
        elif op in ("like", "ilike"):
            if kind != STR:
                raise Unprocessable(f"{where}: operator {op!r} only applies to text attributes")
            if not isinstance(operand, str):
                raise Unprocessable(f"{where}: operator {op!r} needs a string operand")
            # The connection has case_sensitive_like on, so LIKE is case-sensitive as in Postgres.
            if op == "like":
                clauses.append(f"{attr} LIKE ?")
                params.append(operand)
            else:
                clauses.append(f"lower({attr}) LIKE lower(?)")
                params.append(operand)
        else:  # is_a
            kinds = operand if isinstance(operand, (list, tuple)) else [operand]
            clauses.append("1" if "arvados#container" in kinds else "0")
    return (" AND ".join(clauses) or "1"), params


def compile_order(order) -> str:
    """``"priority desc"`` or ``["priority desc", "uuid"]`` -> SQL ORDER BY, uuid always last."""
    if order is None or order == "" or order == []:
        order = list(DEFAULT_ORDER)
    if isinstance(order, str):
        order = [o for o in order.split(",")]
    if not isinstance(order, (list, tuple)):
        raise Unprocessable(f"order: expected a string or a list of strings, got {order!r}")
    terms, seen = [], set()
    for item in order:
        if not isinstance(item, str):
            raise Unprocessable(f"order: expected \"attribute [asc|desc]\", got {item!r}")
        words = item.split()
        if not words or len(words) > 2:
            raise Unprocessable(f"order: invalid term {item!r}, expected \"attribute [asc|desc]\"")
        attr = words[0]
        if attr.startswith("containers."):
            attr = attr[len("containers."):]
        direction = words[1].lower() if len(words) == 2 else "asc"
        if attr not in ORDER_COLUMNS:
            raise Unprocessable(f"order: cannot order by {attr!r} (supported: {', '.join(ORDER_COLUMNS)})")
        if direction not in ("asc", "desc"):
            raise Unprocessable(f"order: invalid direction {words[1]!r} in {item!r} (asc or desc)")
        if attr in seen:
            continue
        seen.add(attr)
        terms.append(f"{attr} {direction.upper()}")
    if "uuid" not in seen:
        terms.append("uuid ASC")
    return ", ".join(terms)


def check_select(select) -> tuple[str, ...]:
    """A select list -> the field names, in the order given; Unprocessable for unknown ones."""
    if select is None:
        return tuple(FIELDS)
    if isinstance(select, str) or not isinstance(select, (list, tuple)):
        raise Unprocessable(f"select: expected a list of attribute names, got {select!r}")
    out = []
    for name in select:
        if not isinstance(name, str) or name not in FIELDS:
            raise Unprocessable(f"select: unknown attribute {name!r}")
        if name not in out:
            out.append(name)
    return tuple(out)


def _int_param(value, name: str, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool):
        raise Unprocessable(f"{name}: expected a non-negative integer, got {value!r}")
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise Unprocessable(f"{name}: expected a non-negative integer, got {value!r}") from None
    except OverflowError:  # int(inf)
        raise Unprocessable(f"{name}: integer out of range") from None
    if n < 0 or (isinstance(value, float) and value != n):
        raise Unprocessable(f"{name}: expected a non-negative integer, got {value!r}")
    return _in_range(n, name)


# ---------------------------------------------------------------------------------------------
# Value validation for create/update

def _check_value(name: str, value):
    kind = FIELDS[name]
    bad = None
    if kind == INT:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            bad = "an integer"
    elif kind == FLOAT:
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            bad = "a number"
    elif kind == STR:
        if value is not None and not isinstance(value, str):
            bad = "a string"
    elif kind == MAP:
        if not isinstance(value, dict):
            bad = "an object"
    elif kind == LIST:
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            bad = "a list of strings"
    if bad:
        raise Unprocessable(f"{name}: expected {bad}, got {value!r}")
    if kind in (INT, FLOAT) and value is not None:
        _in_range(value, name)
    if name == "priority" and (value is None or value < 0):
        raise Unprocessable(f"priority: must be an integer >= 0, got {value!r}")
    if name == "environment" and not all(isinstance(v, str) for v in value.values()):
        raise Unprocessable("environment: values must be strings")
    if name == "runtime_status":
        for k in _RUNTIME_STATUS_STRINGS:
            if k in value and not isinstance(value[k], str):
                raise Unprocessable(f"runtime_status: {k!r} value must be a string")


def _to_db(name: str, value):
    kind = FIELDS.get(name)  # None: a column the API never shows (auth_secret)
    if kind in (MAP, LIST):
        return json.dumps(value)
    return value


_JSON_KEY = {f: json.dumps(f) + ": " for f in FIELDS}


def _json_value(kind: str, value) -> str:
    """A column's value as JSON text: what ``json.dumps(_from_db(name, value))`` gives, without
    decoding the JSON text of object and list columns (json.dumps wrote it)."""
    if kind == MAP or kind == LIST:
        return value if value is not None else ("{}" if kind == MAP else "[]")
    if value is None:
        return "null"
    if kind == TIME:
        return f'"{rfc3339(value)}"'
    if kind == STR:
        return _json_str(value)
    if type(value) is int:
        return int.__repr__(value)
    return json.dumps(value)


_json_str = json.encoder.encode_basestring_ascii  # what json.dumps does to a str, without its set-up


def _from_db(name: str, value):
    kind = FIELDS[name]
    if kind in (MAP, LIST):
        return json.loads(value) if value is not None else ({} if kind == MAP else [])
    if kind == TIME:
        return rfc3339(value)
    return value


_SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (
    token_key TEXT PRIMARY KEY,
    uuid TEXT NOT NULL UNIQUE,
    admin INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS containers (
    uuid TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    priority INTEGER NOT NULL,
    locked_by_uuid TEXT,
    lock_count INTEGER NOT NULL DEFAULT 0,
    auth_uuid TEXT,
    container_image TEXT NOT NULL,
    command TEXT NOT NULL,
    cwd TEXT NOT NULL,
    environment TEXT NOT NULL,
    mounts TEXT NOT NULL,
    output_path TEXT NOT NULL,
    runtime_constraints TEXT NOT NULL,
    scheduling_parameters TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    modified_at INTEGER NOT NULL,
    started_at INTEGER,
    finished_at INTEGER,
    exit_code INTEGER,
    runtime_status TEXT NOT NULL,
    log TEXT,
    output TEXT,
    cost REAL,
    progress REAL,
    gateway_address TEXT,
    auth_secret TEXT
);
CREATE INDEX IF NOT EXISTS containers_state_priority ON containers (state, priority);
CREATE INDEX IF NOT EXISTS containers_locked_by ON containers (locked_by_uuid);
"""
# Columns added after the first schema, for files made before them: (name, SQL type).
_ADDED_COLUMNS = (("auth_secret", "TEXT"),)
_SCHEMA_VERSION = 2


class ContainerStore:
    """Containers and API tokens, with Arvados' server-side rules. See the module docstring.

    Every container method takes the caller's :class:`TokenInfo` (from :meth:`authenticate`).
    Any token may read; locking, unlocking and updating need an admin token (the dispatcher's
    SystemRootToken is one), as in Arvados; creating needs an admin token or the container token
    of a Locked or Running container (a workflow runner queueing its steps). Non-admins read
    every container here (Arvados would limit them to containers of their own container requests).

    ``always_use_preemptible_instances`` is ``Containers.AlwaysUsePreemptibleInstances``;
    ``preemptible_types`` says whether InstanceTypes has a preemptible type (None: not known, so
    the flag is applied as given and ``preemptible: true`` is not checked against the types).
    """

    def __init__(self, path_or_memory: str = ":memory:", *, cluster_id: str = "zzzzz",
                 max_dispatch_attempts: int = 10, clock: Callable[[], float] = time.time,
                 rng=None, always_use_preemptible_instances: bool = False,
                 preemptible_types: bool | None = None):
        self.path = str(path_or_memory)
        self._rng = rng  # a random.Random for uuids (simulations); None: the secrets module
        self.cluster_id = cluster_id
        self.max_dispatch_attempts = int(max_dispatch_attempts)
        self.always_use_preemptible_instances = bool(always_use_preemptible_instances)
        self.preemptible_types = preemptible_types
        self._now = clock.now if hasattr(clock, "now") else clock
        self._memory = self.path == ":memory:"
        self._write_lock = threading.Lock()
        self._readers = threading.local()
        self._reader_conns: list[sqlite3.Connection] = []
        self._reader_lock = threading.Lock()
        self._closed = False
        try:
            self._conn = self._connect()
            self._conn.executescript(_SCHEMA)
            self._migrate(self._conn)
        except sqlite3.Error as e:
            raise StoreError(f"container store {self.path}: cannot open ({e})") from e

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        conn.row_factory = sqlite3.Row
        if not self._memory:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA case_sensitive_like=ON")
        return conn

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> None:
        """Add the columns a file made by an older version lacks (its queue stays usable)."""
        have = {r["name"] for r in conn.execute("PRAGMA table_info(containers)")}
        for name, kind in _ADDED_COLUMNS:
            if name not in have:
                conn.execute(f"ALTER TABLE containers ADD COLUMN {name} {kind}")
        conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")

    def close(self) -> None:
        with self._write_lock:
            if self._closed:
                return
            self._closed = True
            with self._reader_lock:
                for c in self._reader_conns:
                    c.close()
                self._reader_conns.clear()
            self._conn.close()

    def __enter__(self) -> "ContainerStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- transactions -------------------------------------------------------------------------

    @contextmanager
    def _write(self):
        with self._write_lock, self._sqlite_errors():
            if self._closed:
                raise StoreError("container store is closed")
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    @contextmanager
    def _read(self, snapshot: bool = True):
        """A consistent snapshot (one read transaction) for this thread. A single statement
        is one by itself: ``snapshot=False`` spares it the BEGIN and COMMIT round trips."""
        if self._memory:
            with self._write_lock, self._sqlite_errors():
                if self._closed:
                    raise StoreError("container store is closed")
                yield self._conn
            return
        if self._closed:
            raise StoreError("container store is closed")
        with self._sqlite_errors():
            conn = getattr(self._readers, "conn", None)
            if conn is None:
                with self._reader_lock:
                    if self._closed:
                        raise StoreError("container store is closed")
                    conn = self._connect()
                    self._reader_conns.append(conn)
                self._readers.conn = conn
            if not snapshot:
                yield conn
                return
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                conn.execute("COMMIT")

    @contextmanager
    def _sqlite_errors(self):
        """SQLite failures (disk full, I/O, a corrupt file) surface as 500s naming the file."""
        try:
            yield
        except sqlite3.Error as e:
            raise StoreError(f"container store {self.path}: {type(e).__name__}: {e}") from e

    def _micros(self) -> int:
        return round(self._now() * 1_000_000)

    # -- tokens -------------------------------------------------------------------------------

    def add_token(self, token: str, uuid: str | None = None, admin: bool = False) -> str:
        """Register an API token; returns its uuid (``<cluster>-gj3su-...``). Only a hash is kept
        (a container's own token is also kept in clear with its container, as Arvados keeps it:
        ``GET containers/{uuid}/auth`` must hand it out)."""
        if not isinstance(token, str) or not token:
            raise BadRequest("token: must be a non-empty string")
        v2_uuid, secret, _ = _split_v2(token)
        if uuid is None:
            uuid = v2_uuid or random_uuid(self.cluster_id, "gj3su", self._rng)
        elif v2_uuid is not None and v2_uuid != uuid:
            raise BadRequest(f"token: v2 token names {v2_uuid}, not {uuid}")
        with self._write() as c:
            c.execute("INSERT OR REPLACE INTO tokens (token_key, uuid, admin) VALUES (?, ?, ?)",
                      (_token_key(secret), uuid, int(bool(admin))))
        return uuid

    def authenticate(self, token: str | None) -> TokenInfo | None:
        if not token:
            return None
        v2_uuid, secret, container = _split_v2(token)
        with self._read(snapshot=False) as c:
            row = c.execute("SELECT uuid, admin FROM tokens WHERE token_key = ?",
                            (_token_key(secret),)).fetchone()
            named = container and c.execute("SELECT state, auth_uuid FROM containers WHERE uuid = ?",
                                            (container,)).fetchone()
        if row is None or (v2_uuid is not None and v2_uuid != row["uuid"]):
            return None
        if named and ((named["auth_uuid"] is not None and named["auth_uuid"] != v2_uuid)
                      or named["state"] not in (LOCKED, RUNNING)):
            return None  # as Arvados: the container it names must be running on this token
        return TokenInfo(uuid=row["uuid"], admin=bool(row["admin"]))

    # -- containers: reads --------------------------------------------------------------------

    @staticmethod
    def _render(row: sqlite3.Row, fields: Sequence[str]) -> dict:
        out = {"kind": "arvados#container"}
        for f in fields:
            out[f] = _from_db(f, row[f])
        return out

    def get(self, uuid: str, select=None, *, caller: TokenInfo) -> dict:
        _require(caller)
        fields = check_select(select)
        with self._read(snapshot=False) as c:
            row = c.execute(f"SELECT {', '.join(fields)} FROM containers WHERE uuid = ?",
                            (uuid,)).fetchone()
        if row is None:
            raise NotFound(f"container {uuid} not found")
        return self._render(row, fields)

    def list(self, filters=None, order=None, select=None, limit=None, offset=None,
             count: str | None = "exact", *, caller: TokenInfo) -> dict:
        """One page, as the API's ``arvados#containerList`` response body."""
        rows, fields, limit, offset, total = self._page(filters, order, select, limit, offset, count, caller)
        out = {"kind": "arvados#containerList", "items": [self._render(r, fields) for r in rows],
               "limit": limit, "offset": offset}
        if total is not None:
            out["items_available"] = total
        return out

    def list_json(self, filters=None, order=None, select=None, limit=None, offset=None,
                  count: str | None = "exact", *, caller: TokenInfo) -> str:
        """:meth:`list`'s answer as JSON text, for the HTTP server. Object and list columns are
        stored as JSON text already: spliced in as they are, not decoded and encoded again
        (that was most of a 1,000-item queue poll's cost)."""
        rows, fields, limit, offset, total = self._page(filters, order, select, limit, offset, count, caller)
        keys = [(f, _JSON_KEY[f], FIELDS[f]) for f in fields]
        items = ", ".join(["{" + ", ".join(['"kind": "arvados#container"'] + [
            k + _json_value(kind, r[f]) for f, k, kind in keys]) + "}" for r in rows])
        tail = "" if total is None else f', "items_available": {total}'
        return (f'{{"kind": "arvados#containerList", "items": [{items}], "limit": {limit}, '
                f'"offset": {offset}{tail}}}')

    def _page(self, filters, order, select, limit, offset, count, caller):
        _require(caller)
        where, params = compile_filters(filters)
        order_sql = compile_order(order)
        fields = check_select(select)
        limit = min(_int_param(limit, "limit", DEFAULT_LIMIT), MAX_LIMIT)
        offset = _int_param(offset, "offset", 0)
        count = "exact" if count is None else count
        if count not in ("exact", "none"):
            raise Unprocessable(f"count: expected \"exact\" or \"none\", got {count!r}")
        with self._read(snapshot=count == "exact") as c:  # the count must see the same rows
            rows = c.execute(f"SELECT {', '.join(fields)} FROM containers WHERE {where} "
                             f"ORDER BY {order_sql} LIMIT ? OFFSET ?",
                             (*params, limit, offset)).fetchall()
            total = (c.execute(f"SELECT COUNT(*) FROM containers WHERE {where}", params).fetchone()[0]
                     if count == "exact" else None)
        return rows, fields, limit, offset, total

    # -- containers: writes -------------------------------------------------------------------

    def create(self, fields: Mapping, *, caller: TokenInfo) -> dict:
        """A new Queued container: what Arvados makes from a committed container request.

        A child container is one whose request names ``requesting_container_uuid`` or is made
        with a Locked or Running container's own token (``container_request.rb``
        get_requesting_container_uuid); with AlwaysUsePreemptibleInstances and a preemptible
        type configured, a child is made preemptible whatever it asked (set_preemptible).
        Top-level containers keep what they asked.
        """
        _require(caller)
        parent = None if caller.admin else self._container_of_token(caller)
        if not caller.admin and parent is None:
            raise PermissionDenied("permission denied: this needs an admin token or a container's token")
        if not isinstance(fields, Mapping):
            raise Unprocessable("container: expected an object")
        fields = dict(fields)
        requesting = fields.pop("requesting_container_uuid", None)
        if requesting is not None and not isinstance(requesting, str):
            raise Unprocessable(f"requesting_container_uuid: expected a string, got {requesting!r}")
        unknown = sorted(set(fields) - set(CREATE_FIELDS))
        if unknown:
            raise Unprocessable(f"container: cannot set {', '.join(map(repr, unknown))} on create "
                                f"(allowed: {', '.join(CREATE_FIELDS)}, requesting_container_uuid)")
        if fields.get("state", QUEUED) != QUEUED:
            raise Unprocessable(f"cannot create a container in state {fields['state']!r}")
        for required in ("container_image", "command"):
            if not fields.get(required):
                raise Unprocessable(f"container: {required} is required")
        values = {"cwd": ".", "environment": {}, "mounts": {}, "output_path": ".", "priority": 1,
                  "runtime_constraints": {}, "scheduling_parameters": {}}
        values.update({k: v for k, v in fields.items() if k != "state"})
        for k, v in values.items():
            _check_value(k, v)
        if values["scheduling_parameters"].get("preemptible") and self.preemptible_types is False:
            raise Unprocessable("scheduling_parameters: preemptible instances are not configured "
                                "in InstanceTypes")
        now = self._micros()
        uuid = random_uuid(self.cluster_id, "dz642", self._rng)
        with self._write() as c:
            # again inside the write: the parent may have been unlocked (its token expired) since
            if parent is not None and self._container_of_token(caller, c) != parent:
                raise PermissionDenied("permission denied: this container token expired")
            if requesting is not None and c.execute("SELECT 1 FROM containers WHERE uuid = ?",
                                                    (requesting,)).fetchone() is None:
                raise Unprocessable(f"requesting_container_uuid: container {requesting} not found")
            if (requesting or parent) and self._preemptible_children():
                values["scheduling_parameters"] = {**values["scheduling_parameters"], "preemptible": True}
            row = {k: _to_db(k, v) for k, v in values.items()}
            row.update(uuid=uuid, state=QUEUED, lock_count=0, created_at=now, modified_at=now,
                       runtime_status=json.dumps({}))
            cols = ", ".join(row)
            c.execute(f"INSERT INTO containers ({cols}) VALUES ({', '.join('?' * len(row))})",
                      tuple(row.values()))
            return self._render(self._fetch(c, uuid), tuple(FIELDS))

    def _preemptible_children(self) -> bool:
        """AlwaysUsePreemptibleInstances, which Arvados ignores when no type is preemptible."""
        return self.always_use_preemptible_instances and self.preemptible_types is not False

    def _container_of_token(self, caller: TokenInfo, c: sqlite3.Connection | None = None) -> str | None:
        """The Locked or Running container whose own token this is (Container.for_current_token);
        read in transaction ``c`` when given."""
        query = ("SELECT uuid FROM containers WHERE auth_uuid = ? AND state IN (?, ?)",
                 (caller.uuid, LOCKED, RUNNING))
        if c is not None:
            row = c.execute(*query).fetchone()
        else:
            with self._read(snapshot=False) as r:
                row = r.execute(*query).fetchone()
        return None if row is None else row["uuid"]

    def auth(self, uuid: str, *, caller: TokenInfo) -> dict:
        """The container's own token (``GET containers/{uuid}/auth``), for the token that locked it.

        crunch-run hands it to the container (as ``v2/<uuid>/<api_token>/<container uuid>``); it
        is made at lock and expires when the container is unlocked or ends, as in Arvados.
        """
        _require(caller)
        with self._read(snapshot=False) as c:
            row = self._fetch(c, uuid)
        if row["locked_by_uuid"] is None or row["locked_by_uuid"] != caller.uuid:
            raise PermissionDenied("Not locked by your token")
        if row["auth_secret"] is None:  # locked by a version of this store that made none
            raise NotFound(f"container {uuid} has no token")
        return {"kind": "arvados#apiClientAuthorization", "uuid": row["auth_uuid"],
                "api_token": row["auth_secret"], "scopes": ["all"]}

    @staticmethod
    def _expire_auth(c: sqlite3.Connection, row: sqlite3.Row, changes: dict) -> None:
        """Unlocked or ended: the container's token stops working (Arvados expires it)."""
        if row["auth_uuid"] is not None:
            c.execute("DELETE FROM tokens WHERE uuid = ?", (row["auth_uuid"],))
        changes.update(auth_uuid=None, auth_secret=None)

    @staticmethod
    def _fetch(c: sqlite3.Connection, uuid: str) -> sqlite3.Row:
        row = c.execute("SELECT * FROM containers WHERE uuid = ?", (uuid,)).fetchone()
        if row is None:
            raise NotFound(f"container {uuid} not found")
        return row

    @staticmethod
    def _set(c: sqlite3.Connection, uuid: str, changes: Mapping) -> None:
        cols = ", ".join(f"{k} = ?" for k in changes)
        c.execute(f"UPDATE containers SET {cols} WHERE uuid = ?",
                  (*(_to_db(k, v) for k, v in changes.items()), uuid))

    def _lock_op(self, uuid: str, caller: TokenInfo, verb: str, state: str,
                 changes: Callable[[sqlite3.Connection, sqlite3.Row], dict]) -> dict:
        """lock and unlock: one transaction of an admin on a container that must be in ``state``;
        ``changes(c, row)`` checks the rest and says what to set. Returns Arvados' lock selection."""
        _require_admin(caller)
        with self._write() as c:
            row = self._fetch(c, uuid)
            if row["state"] != state:
                raise Unprocessable(f"cannot {verb} when {row['state']}")
            ch = changes(c, row)
            self._set(c, uuid, ch)
            return self._render(_merged(row, ch), LOCK_SELECT)

    def lock(self, uuid: str, *, caller: TokenInfo) -> dict:
        """Queued -> Locked by the caller; lock_count + 1; the container's own token is made."""
        def changes(c: sqlite3.Connection, row: sqlite3.Row) -> dict:
            if row["priority"] <= 0:
                raise Unprocessable("cannot lock when priority<=0")
            auth_uuid, secret = random_uuid(self.cluster_id, "gj3su", self._rng), secrets.token_hex(20)
            c.execute("INSERT OR REPLACE INTO tokens (token_key, uuid, admin) VALUES (?, ?, 0)",
                      (_token_key(secret), auth_uuid))
            return {"state": LOCKED, "locked_by_uuid": caller.uuid, "lock_count": row["lock_count"] + 1,
                    "auth_uuid": auth_uuid, "auth_secret": secret, "modified_at": self._micros()}
        return self._lock_op(uuid, caller, "lock", QUEUED, changes)

    def unlock(self, uuid: str, *, caller: TokenInfo) -> dict:
        """Locked -> Queued by the locker, or -> Cancelled once lock_count reaches the limit."""
        def changes(c: sqlite3.Connection, row: sqlite3.Row) -> dict:
            if row["locked_by_uuid"] != caller.uuid:
                raise PermissionDenied("locked by a different token")
            now = self._micros()
            out = {"state": QUEUED, "locked_by_uuid": None, "modified_at": now}
            self._expire_auth(c, row, out)
            if 0 < self.max_dispatch_attempts <= row["lock_count"]:
                out.update(state=CANCELLED, finished_at=now, runtime_status={
                    "error": MAX_DISPATCH_TEXT.format(n=row["lock_count"])})
            return out
        return self._lock_op(uuid, caller, "unlock", LOCKED, changes)

    def update(self, uuid: str, fields: Mapping, *, caller: TokenInfo) -> dict:
        """Change state (per :data:`UPDATE_TRANSITIONS`) and/or progress fields.

        ``runtime_status`` is replaced, not merged, as the Arvados API server does (crunch-run
        merges on its side before sending).
        """
        _require_admin(caller)
        if not isinstance(fields, Mapping):
            raise Unprocessable("container: expected an object")
        for k in fields:
            if k not in FIELDS:
                raise Unprocessable(f"container: unknown attribute {k!r}")
            if k not in UPDATE_FIELDS:
                raise Unprocessable(f"container: {k!r} cannot be updated "
                                    f"(updatable: {', '.join(UPDATE_FIELDS)})")
        for k, v in fields.items():
            if k != "state":
                _check_value(k, v)
        with self._write() as c:
            row = self._fetch(c, uuid)
            old, new = row["state"], fields.get("state", row["state"])
            is_locker = row["locked_by_uuid"] is not None and row["locked_by_uuid"] == caller.uuid
            changes = {k: v for k, v in fields.items() if k != "state"}
            now = self._micros()
            if new != old:
                if new not in STATES:
                    raise Unprocessable(f"state: invalid value {new!r}")
                if new not in UPDATE_TRANSITIONS[old]:
                    raise Unprocessable(f"cannot change state from {old} to {new}")
                if new in (RUNNING, COMPLETE) and not is_locker:
                    raise PermissionDenied("locked by a different token")
                if new == COMPLETE and changes.get("exit_code", row["exit_code"]) is None:
                    raise Unprocessable("exit_code is required to change state to Complete")
                changes["state"] = new
                if new == RUNNING:
                    changes["started_at"] = now
                if new in FINAL_STATES:
                    changes.update(finished_at=now, locked_by_uuid=None)
                    self._expire_auth(c, row, changes)
            elif old in FINAL_STATES and changes:
                raise Unprocessable(f"cannot update {', '.join(sorted(changes))} when {old}")
            if (row["locked_by_uuid"] is not None and not is_locker
                    and PROGRESS_FIELDS.intersection(fields)):
                raise PermissionDenied("locked by a different token")
            if changes:
                changes["modified_at"] = now
                self._set(c, uuid, changes)
            return self._render(_merged(row, changes), tuple(FIELDS))

    def cancel(self, uuid: str, *, caller: TokenInfo) -> dict:
        return self.update(uuid, {"state": CANCELLED}, caller=caller)

    def count(self, states: tuple[str, ...] = ()) -> int:
        """How many containers the store holds, or how many in ``states`` (tests, dev tools,
        simulations: one COUNT instead of paging through them all)."""
        with self._read() as c:
            if not states:
                return c.execute("SELECT COUNT(*) FROM containers").fetchone()[0]
            return c.execute(f"SELECT COUNT(*) FROM containers WHERE state IN ({', '.join('?' * len(states))})",
                             tuple(states)).fetchone()[0]


def _merged(row: sqlite3.Row, changes: Mapping) -> dict:
    """The row as ``_set(c, uuid, changes)`` left it, without reading it back."""
    out = dict(zip(row.keys(), row))
    for k, v in changes.items():
        # a REAL column stores an integer as a float: read back, cost 3 is 3.0
        out[k] = float(v) if FIELDS.get(k) == FLOAT and isinstance(v, int) else _to_db(k, v)
    return out


def _require(caller: TokenInfo | None) -> None:
    if caller is None:
        raise NotLoggedIn("Not logged in")


def _require_admin(caller: TokenInfo | None) -> None:
    _require(caller)
    if not caller.admin:
        raise PermissionDenied("permission denied: this needs an admin token")
