"""The Arvados container API as the dispatcher uses it, over HTTP.

:class:`ArvadosClient` talks to an Arvados controller (or :mod:`api.arvados.server`) over
``requests``, encoding parameters the way the Go SDK does (``sdk/go/arvados/client.go``): each
parameter a JSON value, in the query string, switching to a POST form body with
``X-Http-Method-Override: GET`` once the query passes 1000 characters. Its in-process twin,
:class:`api.arvados.inprocess.LocalArvadosClient`, shares :class:`ContainerApi` and raises the
same :class:`ApiError` subclasses, so callers cannot tell them apart. Nothing here imports the
dev SQLite store.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from urllib.parse import quote, urlencode, urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import NewConnectionError

from api.arvados.limiter import RequestLimiter
from conf.hosts import is_loopback_host

log = logging.getLogger(__name__)

POOL_SIZE = 32  # keep-alive connections kept per host: one per thread that shares the client
GET_QUERY_LIMIT = 1000  # the Go SDK's threshold for switching GET to POST + method override
RETRY_STATUSES = frozenset({500, 502, 503, 504})
# A POST that the server may have applied (lock, unlock, create) is retried only when it
# certainly was not: the connection never opened, or a gateway/unavailable answer.
RETRY_STATUSES_UNSAFE = frozenset({502, 503, 504})

# ---------------------------------------------------------------------------------------------
# Errors


class ApiError(Exception):
    """The API refused or failed a call. ``status`` is the HTTP status (None: no answer)."""

    def __init__(self, status: int | None, message: str):
        super().__init__(f"{status} {message}" if status else message)
        self.status = status
        self.message = message


class Unauthorized(ApiError):
    """401: the token is missing or unknown."""


class Forbidden(ApiError):
    """403: e.g. unlocking a container locked by a different token."""


class NotFound(ApiError):
    """404: no such container (or route)."""


class Unprocessable(ApiError):
    """422: the request was understood and refused, e.g. ``cannot lock when Locked``."""


class ApiUnavailable(ApiError):
    """No usable answer after all retries: connection failures or 5xx. Names the URL and cause."""


_BY_STATUS = {401: Unauthorized, 403: Forbidden, 404: NotFound, 422: Unprocessable}


def error_for(status: int, message: str) -> ApiError:
    """The typed error for an HTTP status; 5xx are ApiUnavailable, other codes plain ApiError."""
    if status >= 500:
        return ApiUnavailable(status, message)
    return _BY_STATUS.get(status, ApiError)(status, message)


# ---------------------------------------------------------------------------------------------
# The shared surface


class ContainerApi:
    """What the dispatcher calls. Subclasses supply the seven ``_`` primitives."""

    last_503: float | None = None

    def __init__(self):
        self._token_uuid: str | None = None

    def current_token_uuid(self) -> str:
        """The uuid of our token record: the ``locked_by_uuid`` of what we lock. Cached."""
        if self._token_uuid is None:
            self._token_uuid = self._current()["uuid"]
        return self._token_uuid

    def list_containers(self, filters: Sequence = (), order=None, select=None, limit: int | None = None,
                        offset: int = 0, count: str = "none") -> list[dict]:
        """One page of containers."""
        params: dict = {"filters": [list(f) for f in filters], "count": count}
        if order is not None:
            params["order"] = order
        if select is not None:
            params["select"] = list(select)
        if limit is not None:
            params["limit"] = limit
        if offset:
            params["offset"] = offset
        return self._list(params)["items"]

    def iter_containers(self, filters: Sequence = (), select=None, page_size: int = 1000) -> Iterator[dict]:
        """Every matching container, by uuid, with keyset paging.

        Each page adds ``["uuid", ">", <last uuid seen>]`` to the filters, so containers added,
        removed or changed between pages shift no later page: nothing is skipped or repeated.
        """
        base = [list(f) for f in filters]
        if select is not None and "uuid" not in select:
            select = [*select, "uuid"]
        last = None
        while True:
            page_filters = base + [["uuid", ">", last]] if last is not None else base
            page = self.list_containers(page_filters, order="uuid", select=select, limit=page_size)
            if not page:
                return
            yield from page
            last = page[-1]["uuid"]

    def get_container(self, uuid: str, select=None) -> dict:
        return self._get(uuid, None if select is None else list(select))

    def lock(self, uuid: str) -> dict:
        """Queued -> Locked by this token. Returns uuid, state, priority, auth_uuid, locked_by_uuid."""
        return self._lock(uuid)

    def unlock(self, uuid: str) -> dict:
        return self._unlock(uuid)

    def update(self, uuid: str, fields: Mapping) -> dict:
        return self._update(uuid, dict(fields))

    def cancel(self, uuid: str) -> dict:
        return self.update(uuid, {"state": "Cancelled"})

    def container_auth(self, uuid: str) -> dict:
        """The container's own token (``GET containers/{uuid}/auth``; the locking token only):
        an api_client_authorization with ``uuid`` and ``api_token``."""
        return self._auth(uuid)

    def create_container(self, fields: Mapping) -> dict:
        """A new Queued container (dev/test servers only: Arvados creates them from requests)."""
        return self._create(dict(fields))

    def close(self) -> None:
        """Release connections (a no-op for the in-process client)."""

    # primitives
    def _current(self) -> dict: raise NotImplementedError
    def _list(self, params: dict) -> dict: raise NotImplementedError
    def _get(self, uuid: str, select) -> dict: raise NotImplementedError
    def _lock(self, uuid: str) -> dict: raise NotImplementedError
    def _unlock(self, uuid: str) -> dict: raise NotImplementedError
    def _update(self, uuid: str, fields: dict) -> dict: raise NotImplementedError
    def _create(self, fields: dict) -> dict: raise NotImplementedError
    def _auth(self, uuid: str) -> dict: raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# Over HTTP


def base_url(api_host: str) -> str:
    """A URL or ``"host:port"`` -> ``scheme://host:port``.

    A URL keeps its scheme, whatever the host: https stays https (the token must never go out in
    clear because a name looks local). A bare ``host:port`` (ARVADOS_API_HOST, as crunch-run gets
    it) is https unless the host is a loopback address.
    """
    if not isinstance(api_host, str) or not api_host.strip():
        raise ValueError("api_host: expected host:port or a URL, got an empty value")
    api_host = api_host.strip()
    if "://" in api_host:
        parts = urlsplit(api_host)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"api_host {api_host!r}: expected an http(s) URL")
        return f"{parts.scheme}://{parts.netloc}"
    api_host = api_host.rstrip("/")
    host = urlsplit("//" + api_host).hostname or ""
    return f"{'http' if is_loopback_host(host) else 'https'}://{api_host}"


def encode_params(params: Mapping) -> dict[str, str]:
    """Go SDK encoding: strings as they are, everything else as JSON; false booleans omitted."""
    out = {}
    for k, v in params.items():
        if v is False or v is None:
            continue
        out[k] = v if isinstance(v, str) else json.dumps(v, separators=(",", ":"))
    return out


def _never_sent(exc: requests.RequestException) -> bool:
    """True if the request cannot have reached the server (connect failed or timed out)."""
    if isinstance(exc, requests.ConnectTimeout):
        return True
    cause = exc.args[0] if exc.args else None
    reason = getattr(cause, "reason", cause)
    return isinstance(reason, NewConnectionError)


def _error_message(resp: requests.Response) -> str:
    try:
        body = resp.json()
        errs = body.get("errors") if isinstance(body, dict) else None
        if errs:
            return "; ".join(str(e) for e in errs)
    except ValueError:
        pass
    text = resp.text.strip()
    return text[:200] if text else (resp.reason or f"HTTP {resp.status_code}")


def _environment_once(session: requests.Session, url: str) -> None:
    """What requests reads from the environment on every call (proxies for ``url``, the CA bundle
    variables, ~/.netrc), read once: the environment of a running dispatcher does not change, and
    reading it cost about 0.13 ms of CPU per call (a sixth of a lock's round trip here). We send
    our own Authorization header, so ~/.netrc has nothing to add."""
    settings = session.merge_environment_settings(url, {}, None, None, None)
    session.proxies.update(settings["proxies"])
    session.verify = settings["verify"]
    session.cert = settings["cert"]
    session.trust_env = False


class ArvadosClient(ContainerApi):
    """The container API over HTTP, with retries on connection errors and 5xx.

    ``timeout`` is (connect, read) seconds. A call is tried ``1 + retries`` times with
    exponential backoff (``backoff * 2**attempt``, at most ``max_delay``) between; 4xx answers
    are never retried.
    ``last_503`` is the time of the last 503 seen, which the scheduler uses to shrink
    concurrency. The token is sent only in the Authorization header and never logged.

    ``limiter`` (a :class:`RequestLimiter`, shared by every thread using this client) bounds the
    requests in flight as the Go SDK does; a slot is held across one call's retries. The session
    keeps up to ``pool_size`` connections alive: requests' default of 10 made the 11th thread's
    connection be discarded after each call (a new TCP connection per lock, and the warning
    "Connection pool is full" in the log).
    """

    def __init__(self, api_host: str, token: str, *, insecure: bool = False,
                 timeout: tuple[float, float] = (5.0, 30.0), retries: int = 4, backoff: float = 0.5,
                 max_delay: float | None = None,
                 session: requests.Session | None = None, limiter: RequestLimiter | None = None,
                 pool_size: int = POOL_SIZE,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.time):
        super().__init__()
        if not token:
            raise ValueError("token: an API token is required")
        self.base_url = base_url(api_host)
        self._token = token
        self._timeout = timeout
        self._retries = max(0, int(retries))
        self._backoff = float(backoff)
        self._max_delay = max_delay
        self._sleep = sleep
        self._clock = clock
        if session is None:
            session = requests.Session()
            for scheme in ("http://", "https://"):
                session.mount(scheme, HTTPAdapter(pool_connections=4, pool_maxsize=max(1, pool_size)))
            _environment_once(session, self.base_url)
        self._session = session
        self._limiter = limiter
        if insecure:
            self._session.verify = False
        self.last_503: float | None = None

    def __repr__(self) -> str:  # no token in reprs
        return f"ArvadosClient({self.base_url!r})"

    def close(self) -> None:
        self._session.close()

    # -- transport ------------------------------------------------------------------------------

    def _request(self, method: str, path: str, params: Mapping | None = None,
                 json_body: Mapping | None = None, *, idempotent: bool = True) -> dict:
        lim = self._limiter
        if lim is None:
            return self._attempts(method, path, params, json_body, idempotent)
        lim.acquire()
        try:
            return self._attempts(method, path, params, json_body, idempotent)
        finally:
            lim.release()

    def _attempts(self, method: str, path: str, params: Mapping | None, json_body: Mapping | None,
                  idempotent: bool) -> dict:
        url = f"{self.base_url}/arvados/v1/{path}"
        headers = {"Authorization": f"Bearer {self._token}", "Accept": "application/json"}
        query = encode_params(params or {})
        data = None
        if method == "GET" and len(urlencode(query)) >= GET_QUERY_LIMIT:
            method, data, query = "POST", query, {}
            headers["X-Http-Method-Override"] = "GET"
        retry_statuses = RETRY_STATUSES if idempotent else RETRY_STATUSES_UNSAFE
        attempt = 0
        while True:
            try:
                resp = self._session.request(method, url, params=query or None, data=data,
                                             json=json_body, headers=headers, timeout=self._timeout)
            except requests.RequestException as e:
                retriable = idempotent or _never_sent(e)
                cause = f"{type(e).__name__}: {e}"
                if not retriable or attempt >= self._retries:
                    log.warning("Arvados API request failed", extra={
                        "method": method, "url": url, "attempts": attempt + 1, "error": cause})
                    raise ApiUnavailable(None, f"{method} {url}: {cause} "
                                               f"(after {attempt + 1} attempts)") from e
                self._pause(method, url, attempt, cause)
                attempt += 1
                continue
            status = resp.status_code
            if self._limiter is not None:
                self._limiter.report(status)
            if status == 503:
                self.last_503 = self._clock()
            if status < 400:
                try:
                    return resp.json()
                except ValueError as e:
                    raise ApiError(status, f"{method} {url}: response is not JSON") from e
            message = _error_message(resp)
            if status in retry_statuses and attempt < self._retries:
                self._pause(method, url, attempt, f"HTTP {status}: {message}")
                attempt += 1
                continue
            if status >= 500:
                log.warning("Arvados API request failed", extra={
                    "method": method, "url": url, "status": status, "attempts": attempt + 1,
                    "error": message})
                raise ApiUnavailable(status, f"{method} {url}: HTTP {status}: {message} "
                                             f"(after {attempt + 1} attempts)")
            raise error_for(status, message)

    def _pause(self, method: str, url: str, attempt: int, cause: str) -> None:
        delay = self._backoff * (2 ** attempt)
        if self._max_delay is not None:
            delay = min(delay, self._max_delay)
        log.info("retrying Arvados API request", extra={
            "method": method, "url": url, "attempt": attempt + 1, "delay": delay, "error": cause})
        self._sleep(delay)

    # -- primitives -----------------------------------------------------------------------------

    def _current(self) -> dict:
        return self._request("GET", "api_client_authorizations/current")

    def _list(self, params: dict) -> dict:
        return self._request("GET", "containers", params)

    def _get(self, uuid: str, select) -> dict:
        return self._request("GET", f"containers/{quote(uuid, safe='')}",
                             {"select": select} if select is not None else None)

    def _lock(self, uuid: str) -> dict:
        return self._request("POST", f"containers/{quote(uuid, safe='')}/lock", idempotent=False)

    def _unlock(self, uuid: str) -> dict:
        return self._request("POST", f"containers/{quote(uuid, safe='')}/unlock", idempotent=False)

    def _update(self, uuid: str, fields: dict) -> dict:
        return self._request("PUT", f"containers/{quote(uuid, safe='')}", json_body={"container": fields})

    def _create(self, fields: dict) -> dict:
        return self._request("POST", "containers", json_body={"container": fields}, idempotent=False)

    def _auth(self, uuid: str) -> dict:
        return self._request("GET", f"containers/{quote(uuid, safe='')}/auth")
