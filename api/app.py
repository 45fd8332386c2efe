"""The management API as a Bottle app: routes, token check, JSON bodies and JSON errors.

Every response is built from the backend's last published Snapshot or is one short backend call,
so a request never waits on a scheduling pass. Arvados' behaviour is the contract (reference §5);
where it returns ``null`` for an empty list we return ``[]``, and every error body is JSON,
including the router's 404/405 and our own 500s (which never carry a traceback).
"""

from __future__ import annotations

import base64
import functools
import hmac
import json
import logging
import threading
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from urllib.parse import parse_qsl

import bottle

from actors.snapshot import InstanceView, QueueEntryView, Snapshot
from api.backend import Backend, BackendTimeout, NotFound
from api.metrics import CONTENT_TYPE
from api.wsgi import MANAGEMENT_LIMITS
from conf.model import Cluster, InstanceType

log = logging.getLogger(__name__)

PREFIX = "/arvados/v1/dispatch"
ZERO_TIME = "0001-01-01T00:00:00Z"  # Go's time.Time{} in RFC 3339
JSON_TYPE = "application/json"
REASON_PREFIX = "via management API: "


# -- pure rendering ------------------------------------------------------------------------------

def rfc3339(ts: float) -> str:
    """Unix seconds -> RFC 3339 UTC with trailing zeros trimmed, as Go's RFC3339Nano; 0 -> zero time."""
    if ts <= 0:
        return ZERO_TIME
    dt = datetime.fromtimestamp(ts, timezone.utc)
    out = dt.strftime("%Y-%m-%dT%H:%M:%S")
    if dt.microsecond:
        out += "." + f"{dt.microsecond:06d}".rstrip("0")
    return out + "Z"


@functools.lru_cache(maxsize=1024)
def _type_json(it: InstanceType) -> tuple[dict, dict]:
    # Types repeat across thousands of queue entries; build their dicts once.
    return it.documented_json(), it.arvados_json()


def queue_entry_json(ent: QueueEntryView) -> dict:
    """One ``/containers`` item: the documented ``instance_type`` object *and* today's fields."""
    types = [_type_json(t) for t in ent.instance_types]
    return {
        "container": ent.container,
        "instance_type": types[0][0] if types else None,
        "instance_types": [t[1] for t in types],
        "instance_resources": ent.resources.arvados_json(),
        "first_seen_at": rfc3339(ent.first_seen_at),
        "scheduling_status": ent.scheduling_status,
    }


def instance_json(v: InstanceView) -> dict:
    return {
        "instance": v.instance,
        "address": v.address,
        "price": v.price,
        "arvados_instance_type": v.arvados_instance_type,
        "provider_instance_type": v.provider_instance_type,
        "last_container_uuid": v.last_container_uuid,
        "last_busy": rfc3339(v.last_busy),
        "running_container_uuids": sorted(v.running_container_uuids or ()),
        "worker_state": v.worker_state,
        "idle_behavior": v.idle_behavior,
    }


def sorted_instances(snap: Snapshot) -> list[InstanceView]:
    return sorted(snap.instances, key=lambda v: (v.instance, v.arvados_instance_type))


def _json_default(o):
    # Snapshots hold read-only mappings (MappingProxyType) and tuples; JSON wants dicts and lists.
    if isinstance(o, Mapping):
        return dict(o)
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    raise TypeError(f"cannot encode {type(o).__name__} as JSON")


def _dumps(obj) -> str:
    return json.dumps(obj, separators=(",", ":"), default=_json_default)


def encode(obj) -> str:
    """Compact JSON with a trailing newline, like Go's json.Encoder."""
    return _dumps(obj) + "\n"


class ItemsRenderer:
    """``{"items":[...]}`` for a Snapshot, rendered once per snapshot and once per item object.

    10,000 queue entries are ~13 MB of JSON and ~0.2 s of CPU to encode. A Snapshot is immutable,
    so the body is cached per snapshot; and each item's JSON is cached per item object (by
    identity, holding the object so its id cannot be reused), so a scheduler that re-publishes
    unchanged entries as the same objects pays only for what changed. One lock: concurrent
    requests for a new snapshot wait for a single render instead of each doing it.
    """

    def __init__(self, items_of, item_json):
        self._items_of = items_of
        self._item_json = item_json
        self._lock = threading.Lock()
        self._body: tuple[Snapshot | None, bytes] = (None, b"")
        self._fragments: dict[int, tuple[object, str]] = {}

    def body(self, snap: Snapshot) -> bytes:
        cached = self._body
        if cached[0] is snap:
            return cached[1]
        with self._lock:
            cached = self._body
            if cached[0] is snap:
                return cached[1]
            old, new, parts = self._fragments, {}, []
            for item in self._items_of(snap):
                hit = old.get(id(item))
                if hit is None or hit[0] is not item:
                    hit = (item, _dumps(self._item_json(item)))
                new[id(item)] = hit
                parts.append(hit[1])
            body = ('{"items":[' + ",".join(parts) + "]}\n").encode()
            self._fragments, self._body = new, (snap, body)
            return body


def error_response(status: int, message: str, headers: dict | None = None) -> bottle.HTTPResponse:
    return bottle.HTTPResponse(body=encode({"errors": [message]}), status=status,
                               headers={"Content-Type": JSON_TYPE, **(headers or {})})


# -- auth ------------------------------------------------------------------------------------------

class _RequestLog:
    """One warning line per client per ``every`` seconds for requests we cannot even read.

    Undecodable headers and malformed bodies are the client's problem: they get a JSON 400, and
    the log gets a line naming the client and the kind of problem (never a value, never a
    traceback), at most once a minute per client, so no client can grow the log at will.
    """

    def __init__(self, every: float = 60.0, clock=time.monotonic, max_clients: int = 10000):
        self._every, self._clock, self._max = every, clock, max_clients
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def should_log(self, client: str) -> bool:
        now = self._clock()
        with self._lock:
            last = self._last.get(client)
            if last is not None and now - last < self._every:
                return False
            if len(self._last) >= self._max:  # forget the old ones rather than grow without bound
                self._last = {k: t for k, t in self._last.items() if now - t < self._every}
            self._last[client] = now
            return True

    def bad_request(self, req: bottle.BaseRequest, what: str) -> None:
        client = req.environ.get("REMOTE_ADDR", "")
        if self.should_log(client):
            log.warning("management API: malformed request",
                        extra={"RemoteAddr": client, "method": _latin1(req.environ.get("REQUEST_METHOD", "")),
                               "problem": what})


class MalformedRequest(Exception):
    """The request's headers or body cannot be read; the message says which part, never a value."""


def _latin1(s: str) -> str:
    return s.encode("latin-1", "replace").decode("utf-8", "replace")


def _text(raw: bytes) -> str:
    """Request bytes as str without loss: undecodable bytes survive as surrogates, so a token
    compares byte for byte and nothing raises."""
    return raw.decode("utf-8", "surrogateescape")


def _wsgi_bytes(value: str) -> bytes:
    """A WSGI environ string is the raw bytes decoded as latin-1 (PEP 3333)."""
    return value.encode("latin-1", "replace")


def _parse_form(raw: bytes) -> dict[str, str]:
    """``a=1&b=%ff`` -> {"a": "1", "b": "\udcff"}: percent-decoded to bytes, then to text without
    loss (first value of each name wins). parse_qsl on bytes cannot do this: it re-encodes
    non-ASCII results as ASCII and raises."""
    out: dict[str, str] = {}
    for k, v in parse_qsl(raw.decode("latin-1"), keep_blank_values=True, encoding="latin-1"):
        out.setdefault(_text(k.encode("latin-1")), _text(v.encode("latin-1")))
    return out


def query_params(environ) -> dict[str, str]:
    """The query string, parsed from its raw bytes."""
    return _parse_form(_wsgi_bytes(environ.get("QUERY_STRING", "")))


def form_params(req: bottle.BaseRequest) -> dict[str, str]:
    """A urlencoded POST body (Go's r.FormValue); other bodies carry no parameters here.

    The body is at most :data:`api.wsgi.MANAGEMENT_LIMITS`.max_body bytes (Waitress refuses a
    larger one before reading it). Parsed once per request; MalformedRequest if unreadable.
    """
    environ = req.environ
    cached = environ.get("dispatch.form")
    if cached is not None:
        return cached
    out: dict[str, str] = {}
    ctype = environ.get("CONTENT_TYPE", "").split(";")[0].strip().lower()
    if environ.get("REQUEST_METHOD") == "POST" and ctype == "application/x-www-form-urlencoded":
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            raise MalformedRequest("bad Content-Length") from None
        if length < 0 or length > MANAGEMENT_LIMITS.max_body:
            raise MalformedRequest("body too large")
        try:
            raw = environ["wsgi.input"].read(length) if length else b""
        except Exception:  # noqa: BLE001 - a client that hangs up mid-body
            raise MalformedRequest("unreadable body") from None
        out = _parse_form(raw)
    environ["dispatch.form"] = out
    return out


def request_tokens(req: bottle.BaseRequest) -> list[str]:
    """Every token the request offers, where Arvados looks: Bearer/OAuth2 header, Basic password,
    ``api_token`` parameter, ``arvados_api_token`` cookie (base64url).

    Headers are read from their raw bytes, so no header value can make this raise. The body is
    only looked at when nothing else offered a token.
    """
    environ = req.environ
    found = []
    auth = _wsgi_bytes(environ.get("HTTP_AUTHORIZATION", ""))
    scheme, _, value = auth.partition(b" ")
    if scheme in (b"Bearer", b"OAuth2") and value.strip():
        found.append(_text(value.strip()))
    elif scheme == b"Basic" and value.strip():
        try:
            _, _, password = base64.b64decode(value.strip(), validate=True).partition(b":")
        except ValueError:
            raise MalformedRequest("bad Basic authorization header") from None
        if password:
            found.append(_text(password))
    param = query_params(environ).get("api_token", "")
    if param:
        found.append(param)
    for part in _wsgi_bytes(environ.get("HTTP_COOKIE", "")).split(b";"):
        name, eq, cookie = part.strip().partition(b"=")
        if eq and name == b"arvados_api_token" and cookie:
            try:
                found.append(_text(base64.urlsafe_b64decode(cookie + b"=" * (-len(cookie) % 4))))
            except ValueError:
                found.append(_text(cookie))
    if not found:
        param = form_params(req).get("api_token", "")
        if param:
            found.append(param)
    return found


def check_token(expected: str, offered: list[str]) -> tuple[int, str] | None:
    """None when allowed, else (status, message). Pure, so the rules are tested as a table."""
    if not expected:
        return 403, "Management API authentication is not configured"
    if not offered:
        return 401, "Unauthorized: this API requires the cluster's ManagementToken"
    want = expected.encode()
    # Compare against every offered token so timing does not depend on which one matched.
    ok = False
    for tok in offered:
        ok |= hmac.compare_digest(tok.encode("utf-8", "surrogateescape"), want)
    return None if ok else (403, "Forbidden: management token does not match")


# -- the app ---------------------------------------------------------------------------------------

class _Handlers:
    """Route callbacks, with the render caches (valid per Snapshot: it is immutable)."""

    def __init__(self, cluster: Cluster, backend: Backend, metrics):
        self.cluster = cluster
        self.backend = backend
        self.metrics = metrics
        self._containers = ItemsRenderer(lambda s: s.queue, queue_entry_json)
        self._instances = ItemsRenderer(sorted_instances, instance_json)
        self._index: tuple[Snapshot, dict] | None = None

    def _json(self, body):
        bottle.response.content_type = JSON_TYPE
        return body

    # GET /containers
    def containers(self):
        return self._json(self._containers.body(self.backend.snapshot()))

    # GET /container?container_uuid=
    def container(self):
        uuid = _param("container_uuid")
        snap = self.backend.snapshot()
        index = self._index
        if index is None or index[0] is not snap:
            index = (snap, {e.uuid: e for e in snap.queue})
            self._index = index
        ent = index[1].get(uuid) if uuid else None
        if ent is None:
            return error_response(404, "container not found")
        return self._json(encode(queue_entry_json(ent)))

    def _act(self, param: str, not_found: str, log_what: str, log_key: str, call,
             with_reason: bool = False, **log_extra):
        """An action endpoint: a required id parameter (400), then the backend call (404)."""
        ident = _param(param)
        if not ident:
            return error_response(400, f"{param} parameter not provided")
        args = (REASON_PREFIX + _param("reason"),) if with_reason else ()
        _log_action(log_what, **{log_key: ident, **log_extra, **({"reason": args[0]} if args else {})})
        try:
            call(ident, *args)
        except NotFound:
            return error_response(404, not_found)
        return ""

    # POST /containers/kill
    def kill_container(self):
        return self._act("container_uuid", "container not found", "kill container", "ContainerUUID",
                         self.backend.kill_container, with_reason=True)

    # GET /instances
    def instances(self):
        return self._json(self._instances.body(self.backend.snapshot()))

    # POST /instances/{hold,drain,run}
    def set_idle_behavior(self, behavior: str):
        return self._act("instance_id", "requested instance does not exist", "set idle behavior",
                         "Instance", lambda iid: self.backend.set_idle_behavior(iid, behavior),
                         IdleBehavior=behavior)

    # POST /instances/kill
    def kill_instance(self):
        return self._act("instance_id", "instance not found", "kill instance", "Instance",
                         self.backend.kill_instance, with_reason=True)

    # GET /metrics, /metrics.json
    def metrics_text(self):
        bottle.response.content_type = CONTENT_TYPE
        return self.metrics.exposition()

    # GET /_health/<check>
    def health(self, check: str):
        if check == "ping":
            return self._json(encode(self.backend.health()))
        if check == "dispatch":  # ours: is this process the one dispatching, or a standby?
            why = self.backend.dispatching()
            return self._json(encode({"health": "OK"} if not why else
                                     {"health": "ERROR", "error": f"standby: {why}"}))
        return error_response(404, f"unknown health check {check!r}")


def _param(name: str) -> str:
    """A parameter from the query string or a urlencoded POST body (Go's r.FormValue)."""
    req = bottle.request
    value = query_params(req.environ).get(name)
    if value is None:
        value = form_params(req).get(name)
    # A value that is not UTF-8 names nothing we have (ids and uuids are ASCII): keep it harmless.
    return (value or "").encode("utf-8", "surrogateescape").decode("utf-8", "replace")


_bad_requests = _RequestLog()


def _log_action(msg: str, **fields) -> None:
    log.info("management API: " + msg, extra={**fields, "RemoteAddr": bottle.request.remote_addr})


def _guard(callback):
    """Bottle plugin: a busy backend is a 503, anything unexpected a logged JSON 500."""

    @functools.wraps(callback)
    def wrapper(*args, **kwargs):
        try:
            return callback(*args, **kwargs)
        except bottle.HTTPResponse:
            raise
        except MalformedRequest as e:
            _bad_requests.bad_request(bottle.request, str(e))
            return error_response(400, f"malformed request: {e}")
        except BackendTimeout as e:
            log.warning("management API: dispatcher did not answer in time",
                        extra={"path": bottle.request.path, "method": bottle.request.method, "error": str(e)})
            return error_response(503, str(e) or "dispatcher is busy, try again")
        except Exception:
            log.exception("management API: request failed",
                          extra={"path": bottle.request.path, "method": bottle.request.method})
            return error_response(500, "internal server error")

    return wrapper


def _json_error_handler(res: bottle.HTTPError) -> str:
    """Router and framework errors (404, 405, 500) as JSON instead of Bottle's HTML page."""
    bottle.response.content_type = JSON_TYPE
    if res.status_code >= 500:
        if res.exception is not None:
            log.error("management API: unhandled error", exc_info=res.exception,
                      extra={"path": bottle.request.path, "method": bottle.request.method})
        message = "internal server error"
    elif res.status_code == 404:
        message = f"not found: {bottle.request.path}"
    elif res.status_code == 405:
        message = f"method {bottle.request.method} not allowed for {bottle.request.path}"
    else:
        message = res.body if isinstance(res.body, str) and res.body else res.status_line
    return encode({"errors": [message]})


def make_app(cluster: Cluster, backend: Backend, metrics) -> bottle.Bottle:
    """The management API for ``cluster``, served from ``backend``; ``metrics`` is a DispatchMetrics."""
    app = bottle.Bottle(catchall=True)
    app.default_error_handler = _json_error_handler
    h = _Handlers(cluster, backend, metrics)
    token = cluster.management_token

    def authenticate():
        # A hook, not a route plugin: it runs before routing, so unknown paths need a token too.
        try:
            denied = check_token(token, request_tokens(bottle.request))
        except MalformedRequest as e:
            _bad_requests.bad_request(bottle.request, str(e))
            denied = 400, f"malformed request: {e}"
        if denied is not None:
            status, message = denied
            headers = {"WWW-Authenticate": 'Bearer realm="dispatch-cloud"'} if status == 401 else None
            raise error_response(status, message, headers)

    app.add_hook("before_request", authenticate)
    app.install(_guard)

    app.route(PREFIX + "/containers", "GET", h.containers)
    app.route(PREFIX + "/container", "GET", h.container)
    app.route(PREFIX + "/containers/kill", "POST", h.kill_container)
    app.route(PREFIX + "/instances", "GET", h.instances)
    for behavior in ("hold", "drain", "run"):
        app.route(f"{PREFIX}/instances/{behavior}", "POST",
                  functools.partial(h.set_idle_behavior, behavior))
    app.route(PREFIX + "/instances/kill", "POST", h.kill_instance)
    app.route("/metrics", "GET", h.metrics_text)
    app.route("/metrics.json", "GET", h.metrics_text)
    app.route("/_health/<check>", "GET", h.health)
    return app
