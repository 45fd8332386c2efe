"""An Arvados-compatible container API server: Bottle routes over a :class:`ContainerStore`.

It speaks the subset of the Arvados REST API the dispatcher uses (``/arvados/v1/containers`` list,
get, lock, unlock, update, auth (the container's own token, for crunch-run), and
``api_client_authorizations/current``), with Arvados' parameter
encoding (each parameter a JSON value, in the query string or, for long queries, a POST form body
with ``X-Http-Method-Override: GET``) and Arvados' error shape ``{"errors": [...]}`` for every
failure, including unknown routes and wrong methods.

``POST /arvados/v1/containers`` (create) is a development convenience: Arvados itself creates
containers from container requests, which this server does not model; create applies what Arvados
applies to a committed request (``requesting_container_uuid``, AlwaysUsePreemptibleInstances for
child containers: see :meth:`ContainerStore.create`).

Run one by hand with ``python -m api.arvados.server --db queue.sqlite --token SECRET``.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading

import bottle

from api.wsgi import CONTAINER_API_LIMITS, WsgiServer
from api.arvados.store import (BadRequest, ContainerStore, NotLoggedIn, StoreError, TokenInfo,
                                  check_select)

log = logging.getLogger(__name__)

PREFIX = "/arvados/v1"
_CALLER = "arvados.caller"  # environ key: the header token's TokenInfo, authenticated once
_LIST_PARAMS = ("filters", "order", "select", "limit", "offset", "count")


def _json_error(status: int, message: str) -> bottle.HTTPResponse:
    return bottle.HTTPResponse(json.dumps({"errors": [message]}), status=status,
                               headers={"Content-Type": "application/json"})


def _decode(value: str):
    """A parameter as the Go SDK sends it (JSON); a bare word like ``uuid`` stays a string."""
    try:
        return json.loads(value)
    except ValueError:
        return value


def _params() -> dict:
    """Request parameters: query string, then form body (POST-as-GET, PUT forms), JSON-decoded.

    A token in the Authorization header is checked before the body is read (``before_request``);
    the body itself is capped by :data:`api.wsgi.CONTAINER_API_LIMITS` before it reaches us.
    """
    try:
        return _read_params()
    except StoreError:
        raise
    except Exception as e:  # noqa: BLE001 - undecodable bytes, a malformed multipart body, ...
        raise BadRequest(f"malformed request ({type(e).__name__})") from None


def _read_params() -> dict:
    out = {k: _decode(v) for k, v in bottle.request.query.decode().allitems()}
    if bottle.request.method in ("POST", "PUT", "PATCH"):
        ctype = bottle.request.content_type.split(";")[0].strip().lower()
        if ctype == "application/json":
            raw = bottle.request.body.read()
            if raw.strip():
                try:
                    body = json.loads(raw)
                except ValueError as e:
                    raise BadRequest(f"request body: invalid JSON ({e})") from None
                if not isinstance(body, dict):
                    raise BadRequest("request body: expected a JSON object")
                out.update(body)
        else:
            out.update({k: _decode(v) for k, v in bottle.request.forms.decode().allitems()})
    return out


def _is_get_override(params: dict) -> bool:
    hdr = bottle.request.get_header("X-Http-Method-Override", "")
    return hdr.upper() == "GET" or str(params.get("_method", "")).upper() == "GET"


def _header_token() -> str | None:
    """The Authorization header's token, from the raw bytes (an undecodable one cannot match)."""
    auth = bottle.request.environ.get("HTTP_AUTHORIZATION", "").encode("latin-1", "replace")
    scheme, _, value = auth.partition(b" ")
    if scheme.lower() in (b"bearer", b"oauth2") and value.strip():
        return value.strip().decode("utf-8", "replace")
    return None


def _token(params: dict) -> str | None:
    tok = _header_token()
    if tok is not None:
        return tok
    tok = params.get("api_token")
    return tok if isinstance(tok, str) and tok else None


def _select(params: dict):
    select = params.get("select")
    return None if select is None else check_select(select)


def _pick(record: dict, select) -> dict:
    if select is None:
        return record
    return {"kind": record.get("kind"), **{k: record[k] for k in select if k in record}}


def make_app(store: ContainerStore) -> bottle.Bottle:
    """The WSGI app. Each route authenticates, then calls the store; StoreErrors become JSON."""
    app = bottle.Bottle(catchall=True)

    def caller(params: dict) -> TokenInfo:
        env = bottle.request.environ
        info = env[_CALLER] if _CALLER in env else store.authenticate(_token(params))
        if info is None:
            raise NotLoggedIn("Not logged in")
        return info

    def errors_as_json(callback):
        def wrapper(*args, **kwargs):
            try:
                return callback(*args, **kwargs)
            except StoreError as e:
                if e.status >= 500:
                    log.error("container store error", extra={"path": bottle.request.path,
                                                              "error": e.message})
                return _json_error(e.status, e.message)
        return wrapper

    app.install(errors_as_json)

    @app.hook("before_request")
    def header_token_first():
        # A request whose header token is wrong is refused before its body is parsed.
        tok = _header_token()
        if tok is not None:
            info = store.authenticate(tok)
            if info is None:
                raise _json_error(401, "Not logged in")
            bottle.request.environ[_CALLER] = info  # the header wins over api_token: once per request

    def list_containers(params: dict) -> str:
        who = caller(params)
        kw = {k: params.get(k) for k in _LIST_PARAMS}
        body = store.list_json(**kw, caller=who)
        bottle.response.content_type = "application/json"
        return body

    def get_container(uuid: str, params: dict) -> dict:
        who = caller(params)
        return store.get(uuid, params.get("select"), caller=who)

    def container_fields(params: dict) -> dict:
        fields = params.get("container")
        if fields is None:
            raise BadRequest('missing parameter "container" (a JSON object of attributes)')
        if not isinstance(fields, dict):
            raise BadRequest('parameter "container": expected a JSON object')
        return fields

    @app.get(f"{PREFIX}/containers")
    def index():
        return list_containers(_params())

    @app.post(f"{PREFIX}/containers")
    def create_or_index():
        params = _params()
        if _is_get_override(params):
            return list_containers(params)
        who = caller(params)
        select = _select(params)
        return _pick(store.create(container_fields(params), caller=who), select)

    @app.get(f"{PREFIX}/containers/<uuid>")
    def show(uuid):
        return get_container(uuid, _params())

    @app.post(f"{PREFIX}/containers/<uuid>")
    def show_override(uuid):
        params = _params()
        if not _is_get_override(params):
            return _json_error(405, f"method POST not allowed on {bottle.request.path}")
        return get_container(uuid, params)

    @app.route(f"{PREFIX}/containers/<uuid>", method=["PUT", "PATCH"])
    def update(uuid):
        params = _params()
        who = caller(params)
        select = _select(params)
        return _pick(store.update(uuid, container_fields(params), caller=who), select)

    @app.post(f"{PREFIX}/containers/<uuid>/lock")
    def lock(uuid):
        return store.lock(uuid, caller=caller(_params()))

    @app.post(f"{PREFIX}/containers/<uuid>/unlock")
    def unlock(uuid):
        return store.unlock(uuid, caller=caller(_params()))

    @app.get(f"{PREFIX}/containers/<uuid>/auth")
    def auth(uuid):
        return store.auth(uuid, caller=caller(_params()))

    @app.get(f"{PREFIX}/api_client_authorizations/current")
    def current():
        who = caller(_params())
        return {"kind": "arvados#apiClientAuthorization", "uuid": who.uuid}

    def error_page(err: bottle.HTTPError) -> str:
        bottle.response.content_type = "application/json"
        if err.status_code == 404:
            msg = f"{bottle.request.method} {bottle.request.path}: no such route"
        elif err.status_code == 405:
            msg = f"method {bottle.request.method} not allowed on {bottle.request.path}"
        elif err.status_code >= 500:
            log.error("API request failed", extra={"method": bottle.request.method,
                                                   "path": bottle.request.path,
                                                   "error": repr(err.exception),
                                                   "traceback": err.traceback})
            msg = "internal server error"
        else:
            msg = str(err.body) or err.status_line
        return json.dumps({"errors": [msg]})

    for code in (400, 401, 403, 404, 405, 413, 422, 500):
        app.error(code)(error_page)
    return app


def serve(store: ContainerStore, host: str = "127.0.0.1", port: int = 0, threads: int = 8) -> WsgiServer:
    """Start the API server on ``host:port`` (0 = any free port) and return it, listening."""
    return WsgiServer(make_app(store), host, port, threads, name="arvados-api",
                      limits=CONTAINER_API_LIMITS).start()


def main(argv: list[str] | None = None) -> int:
    from conf import logsetup

    p = argparse.ArgumentParser(prog="python -m api.arvados.server",
                                description="Arvados-compatible container API server backed by SQLite.")
    p.add_argument("--db", required=True, help="SQLite file (created if missing)")
    p.add_argument("--token", required=True, help="admin API token to accept (e.g. the SystemRootToken)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--cluster-id", default="zzzzz")
    p.add_argument("--max-dispatch-attempts", type=int, default=10)
    p.add_argument("--always-use-preemptible-instances", action="store_true",
                   help="Containers.AlwaysUsePreemptibleInstances: child containers are made preemptible")
    args = p.parse_args(argv)
    logsetup.setup()
    try:
        store = ContainerStore(args.db, cluster_id=args.cluster_id,
                               max_dispatch_attempts=args.max_dispatch_attempts,
                               always_use_preemptible_instances=args.always_use_preemptible_instances)
    except StoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    store.add_token(args.token, admin=True)
    try:
        server = serve(store, args.host, args.port)
    except OSError as e:
        print(f"error: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        store.close()
        return 1
    log.info("API server listening", extra={"url": server.url, "db": args.db})
    print(server.url, flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    server.stop()
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
