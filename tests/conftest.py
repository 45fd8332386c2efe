"""Shared test policy: no test may leak actors, and an actor crash fails the test."""

from __future__ import annotations

import logging

import pykka
import pytest

from tests.g5 import pytest_sessionfinish, pytest_sessionstart  # noqa: F401  (G5 log scan hooks)


class _ErrorCatcher(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def pytest_configure(config):
    config.addinivalue_line("markers", "allow_actor_errors: the test provokes an actor crash on purpose")


@pytest.fixture(autouse=True)
def actor_hygiene(request):
    catcher = _ErrorCatcher()
    watched = [logging.getLogger("pykka"), logging.getLogger("dispatch.actors")]
    for lg in watched:
        lg.addHandler(catcher)
    yield
    for lg in watched:
        lg.removeHandler(catcher)
    leaked = pykka.ActorRegistry.get_all()
    if leaked:
        pykka.ActorRegistry.stop_all(block=True, timeout=10)
        pytest.fail(f"test leaked {len(leaked)} actors: {sorted({r.actor_class.__name__ for r in leaked})}")
    if catcher.records and request.node.get_closest_marker("allow_actor_errors") is None:
        pytest.fail("actor error logged: " + "; ".join(r.getMessage() for r in catcher.records[:3]))


@pytest.fixture(scope="session")
def moto_server():
    """moto's EC2 endpoint on 127.0.0.1, started once per session (in a child process) and only
    for sessions that use it; tests reset its state through ``ec2_endpoint``."""
    from tests.ec2fake import MotoServer
    server = MotoServer()
    yield server
    server.stop()


@pytest.fixture
def ec2_endpoint(moto_server):
    """A fresh (reset) moto behind a new fault proxy: ``(moto, proxy)``."""
    from tests.ec2fake import Ec2Proxy
    moto_server.reset()
    proxy = Ec2Proxy(moto_server.url)
    yield moto_server, proxy
    proxy.stop()
