"""Serve the management API on every ``Services.DispatchCloud.InternalURLs`` address.

One :class:`api.wsgi.WsgiServer` per URL; that helper owns the Waitress loop and stops it from
the loop's own thread (no EBADF race), so ApiServer only has to start all or none and stop once.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from api.wsgi import WsgiServer, parse_listen_url
from conf.hosts import is_loopback_host

log = logging.getLogger(__name__)


class ApiServer:
    """The management API for the dispatcher's lifetime: ``start()`` binds every URL, ``stop()`` is idempotent.

    ``loopback_only`` refuses any address outside 127.0.0.0/8 and ::1 (tests and dev mode).
    Bad URLs raise ValueError naming the URL at construction, before anything listens.
    """

    def __init__(self, app, listen_urls: Iterable[str], *, loopback_only: bool = False, threads: int = 8):
        self._app = app
        self._threads = threads
        self._addrs: list[tuple[str, str, int]] = []
        for url in listen_urls:
            host, port = parse_listen_url(url)
            if loopback_only and not is_loopback_host(host):
                raise ValueError(f"listen URL {url!r}: host {host!r} is not a loopback address")
            self._addrs.append((url, host, port))
        if not self._addrs:
            raise ValueError("no listen URL for the management API (Services.DispatchCloud.InternalURLs is empty)")
        self._servers: list[WsgiServer] = []

    def start(self) -> "ApiServer":
        if self._servers:
            raise RuntimeError("ApiServer already started")
        for url, host, port in self._addrs:
            server = WsgiServer(self._app, host, port, self._threads, name="mgmt-api")
            try:
                server.start()
            except OSError as e:
                self.stop()
                raise OSError(e.errno, f"cannot listen on {url} for the management API: {e.strerror or e}") from e
            self._servers.append(server)
            log.info("management API listening", extra={"URL": url, "Listen": server.url})
        return self

    def stop(self) -> None:
        servers, self._servers = self._servers, []
        for server in servers:
            server.stop()

    @property
    def urls(self) -> list[str]:
        """The addresses actually bound (with the real port when the config said :0)."""
        return [s.url for s in self._servers]

    def __enter__(self) -> "ApiServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
