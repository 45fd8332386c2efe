"""Shared test policy: no test may leak actors or work counted by the activity barrier, and an
actor crash fails the test."""

from __future__ import annotations

import logging

import pykka
import pytest

from actors.base import ACTIVITY

from tests.g5 import pytest_sessionfinish, pytest_sessionstart  # noqa: F401  (G5 log scan hooks)


ACTIVITY_GRACE = 10.0  # seconds a test's leftover background jobs get to finish


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
    counted = _settle_activity()
    if leaked:
        pytest.fail(f"test leaked {len(leaked)} actors: {sorted({r.actor_class.__name__ for r in leaked})}")
    if counted:
        pytest.fail(f"test left {counted} unit(s) of work counted in the activity barrier "
                    "(actors.base.ACTIVITY): later tests' wait_idle would time out")
    if catcher.records and request.node.get_closest_marker("allow_actor_errors") is None:
        pytest.fail("actor error logged: " + "; ".join(r.getMessage() for r in catcher.records[:3]))


def _settle_activity(timeout: float = ACTIVITY_GRACE) -> int:
    """0 if the process-wide barrier drains (jobs a test's teardown left running may finish a
    little later); else reset it, so the leak fails the test that made it and no later one, and
    return what was left."""
    if ACTIVITY.pending == 0:
        return 0
    try:
        ACTIVITY.wait_idle(timeout=timeout)
        return 0
    except TimeoutError:
        return ACTIVITY.reset()


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
