"""Run a WSGI app on Waitress in a background thread, and stop it cleanly.

Waitress has no public stop. Closing its sockets from another thread races the select() in its
loop (EBADF), so :class:`WsgiServer` drives the loop itself: :meth:`WsgiServer.stop` only pulls the
server's trigger with a thunk that raises a flag, and the loop thread — the one that owns the
sockets — closes the listener, the open connections and the trigger, then stops the worker
threads. The API server of the dev cluster and the management API both use this.

Hostile or unlucky clients (:class:`Limits`): Waitress' defaults (100 connections, 120 s idle
timeout, 1 GiB bodies spooled to /tmp, ``select()``) let 100 half-open connections lock every
operator out, and make the server drop its listener for good once the process holds a file
descriptor above 1023. Here the loop uses ``poll()``, connections are many and short-lived when
idle, and a body over the cap is refused from its Content-Length before it is read.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from waitress import wasyncore
from waitress.server import create_server

from conf.urls import check_listen_url, shown

log = logging.getLogger(__name__)

# Waitress resolves "localhost" to every address it has (IPv4 and IPv6) and then builds a
# multi-socket server with a different shape; one loopback socket is what callers mean.
_ALIASES = {"localhost": "127.0.0.1", "": "127.0.0.1"}


@dataclass(frozen=True)
class Limits:
    """What one client may cost the server (Waitress adjustments, see the module doc).

    ``idle_timeout`` closes a connection that sends nothing for that long (a half-sent request
    included); ``max_connections`` is far above what operators and Prometheus need so that many
    such connections cannot starve them in the meantime; ``max_body`` is refused with 413 before
    the body is read (a chunked body is cut off at the cap); nothing larger than ``max_body`` is
    ever buffered, and nothing goes to a temporary file.
    """

    max_connections: int = 1000
    idle_timeout: float = 10.0
    max_body: int = 4 << 10
    max_header: int = 16 << 10

    def adjustments(self) -> dict:
        return {
            "connection_limit": self.max_connections,
            "channel_timeout": self.idle_timeout,
            # how often idle connections are looked for; bounded by the loop's poll timeout
            "cleanup_interval": max(1, int(self.idle_timeout / 4)),
            "max_request_body_size": self.max_body,
            "max_request_header_size": self.max_header,
            "inbuf_overflow": max(self.max_body, self.max_header) + 1,  # never spool to disk
            "asyncore_use_poll": True,
            "asyncore_loop_timeout": 1,
        }


MANAGEMENT_LIMITS = Limits()
# The dev container API takes container records (mounts, runtime_status) and POST-as-GET filters.
CONTAINER_API_LIMITS = Limits(max_body=1 << 20, max_header=64 << 10)


def parse_listen_url(url: str) -> tuple[str, int]:
    """``"http://localhost:9006"`` -> ``("127.0.0.1", 9006)``; ValueError naming the URL if bad.

    Only plain http is served here (TLS belongs to a proxy in front, as with Arvados'
    InternalURLs); a URL without a port listens on 80. The rules are the config loader's
    (:func:`conf.urls.check_listen_url`), so ``check-config`` refuses what this would.
    """
    try:
        parts = check_listen_url(url)
    except ValueError as e:
        raise ValueError(f"listen URL {shown(url)!r} {e}") from None
    port = parts.port
    return _ALIASES.get(parts.hostname, parts.hostname), 80 if port is None else port


class WsgiServer:
    """One Waitress server on one socket, served from a daemon thread.

    ``host`` may also be a listen URL (``"http://localhost:9006"``), in which case ``port`` is
    taken from it. ``port=0`` picks a free port; read :attr:`port` after :meth:`start`.
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, threads: int = 8,
                 *, name: str = "wsgi", limits: Limits = MANAGEMENT_LIMITS):
        if "://" in host:
            host, port = parse_listen_url(host)
        self._app = app
        self._host = _ALIASES.get(host, host)
        self._want_port = int(port)
        self._threads = int(threads)
        self._name = name
        self._limits = limits
        self._server = None
        self._loop_thread: threading.Thread | None = None
        self._stop_requested = False
        self._stopped = threading.Event()

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> "WsgiServer":
        """Bind and start serving; returns once the socket listens and the workers are ready."""
        if self._server is not None:
            raise RuntimeError("WsgiServer already started")
        # create_server binds and listens before returning, so the port is usable at once.
        self._server = create_server(self._app, host=self._host, port=self._want_port,
                                     threads=self._threads, clear_untrusted_proxy_headers=True,
                                     ident=None, **self._limits.adjustments())
        self._wait_for_idle_workers(self._server.task_dispatcher)
        self._loop_thread = threading.Thread(target=self._loop, name=f"{self._name}-loop:{self.port}",
                                             daemon=True)
        self._loop_thread.start()
        log.debug("wsgi server listening", extra={"url": self.url})
        return self

    @staticmethod
    def _wait_for_idle_workers(dispatcher, timeout: float = 2.0) -> None:
        # Worker threads count as busy until they first wait for work; a request arriving
        # before that makes Waitress log a spurious "Task queue depth" warning.
        deadline = time.monotonic() + timeout
        while dispatcher.active_count > 0 and time.monotonic() < deadline:
            time.sleep(0.001)

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the loop thread to close everything, then wait for it (at most ``timeout`` s).

        In-flight requests get up to 5 s to finish. Don't call this from a request handler of
        the same server: the loop would wait for that handler while it waits for the loop.
        """
        server, thread = self._server, self._loop_thread
        if server is None or thread is None or self._stopped.is_set():
            return
        try:
            server.trigger.pull_trigger(self._request_stop)
        except OSError:  # the loop already ended (and closed the trigger) on its own
            pass
        thread.join(timeout)
        if thread.is_alive():
            log.error("wsgi server did not stop in time", extra={"url": self.url, "timeout": timeout})

    def __enter__(self) -> "WsgiServer":
        return self.start() if self._server is None else self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- addresses -----------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("WsgiServer not started")
        return int(self._server.effective_port)

    @property
    def host(self) -> str:
        return self._host

    @property
    def url(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}"

    # -- the loop thread -----------------------------------------------------------------------

    def _request_stop(self) -> None:
        # Runs in the loop thread (a trigger thunk); the loop checks the flag after this poll.
        self._stop_requested = True

    def _loop(self) -> None:
        server = self._server
        socket_map = server._map  # waitress keeps the channel map here; no public accessor
        timeout = server.adj.asyncore_loop_timeout
        try:
            while not self._stop_requested and socket_map:
                wasyncore.loop(timeout=timeout, use_poll=True, map=socket_map, count=1)
        except Exception:
            log.exception("wsgi server loop failed", extra={"url": self.url})
        finally:
            self._close_in_loop(server, socket_map)
            self._stopped.set()

    @staticmethod
    def _close_in_loop(server, socket_map) -> None:
        """Shut down from the loop's own thread, in an order that never closes a live fd.

        Worker threads pull the trigger when they finish a response, so the trigger must outlive
        them: stop accepting, let the workers finish (the loop keeps flushing their output
        meanwhile), then close the connections and, last, the trigger.
        """
        wasyncore.dispatcher.close(server)  # the listening socket only

        def stop_workers():
            server.task_dispatcher.shutdown(cancel_pending=True, timeout=5)
            server.trigger.pull_trigger()  # wake the loop now rather than at its next timeout

        stopper = threading.Thread(target=stop_workers, name="wsgi-shutdown", daemon=True)
        stopper.start()
        while stopper.is_alive():
            wasyncore.loop(timeout=0.05, use_poll=True, map=socket_map, count=1)
        for channel in list(socket_map.values()):
            if channel is not server.trigger:
                try:
                    channel.close()
                except OSError:
                    pass
        server.trigger.close()
        socket_map.clear()
