"""Logs for machines (JSON lines) and people (text), SystemLogs.Format/LogLevel, the status line."""

from __future__ import annotations

import io
import json
import logging
import os
import signal

import pytest
import requests
import yaml

from actors.statusline import status
from conf import logsetup
from tests import api_data as d
from tests.dispatcher_proc import LoopbackApi, RunProcess
from tests.util import free_port, wait_for


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    yield
    root.handlers[:], _ = saved
    root.setLevel(saved[1])


def test_format_choice():
    assert logsetup.choose_format("json", dev=True) == "json"  # configured wins
    assert logsetup.choose_format("text") == "text"
    assert logsetup.choose_format("", dev=True) == "text"
    assert logsetup.choose_format("", stream=io.StringIO()) == "json"  # a service: not a terminal
    master, slave = os.openpty()
    try:
        with os.fdopen(slave, "w") as tty:
            assert logsetup.choose_format("", stream=tty) == "text"
    finally:
        os.close(master)


def test_text_and_json_lines(restore_logging):
    out = io.StringIO()
    logsetup.setup("info", out, fmt="text")
    log = logging.getLogger("dispatch.test")
    log.info("instance booted", extra={"Instance": "i-1", "Reason": "two words"})
    log.debug("not shown")
    line = out.getvalue()
    assert line.endswith('INFO    instance booted  Instance=i-1 Reason="two words"\n')
    assert line[:4].isdigit() and "not shown" not in line
    out = io.StringIO()
    logsetup.setup("warn", out, fmt="json")  # Arvados' spelling
    log.info("quiet")
    log.warning("create failed", extra={"InstanceType": "small"})
    [rec] = [json.loads(x) for x in out.getvalue().splitlines()]
    assert rec["level"] == "warning" and rec["msg"] == "create failed" and rec["InstanceType"] == "small"



def test_waitress_queue_depth_is_not_logged_per_request(restore_logging):
    """Waitress warns "Task queue depth is N" for every request that waits for a thread: in a
    1,000-container burst, thousands of lines a second. Its other warnings still show."""
    out = io.StringIO()
    logsetup.setup("info", out, fmt="text")
    logging.getLogger("waitress.queue").warning("Task queue depth is %d", 3)
    logging.getLogger("waitress").warning("client overflowed")
    assert "Task queue depth" not in out.getvalue() and "client overflowed" in out.getvalue()

def test_status_line():
    msg, fields = status(d.snapshot())
    # 6 workers and a pending create; containers from the queue; spend of the workers only
    assert fields["InstancesByState"] == "booting=1 creating=1 idle=2 running=1 shutdown=1 unknown=1"
    assert fields["InstancesByType"] == "big=2 gpu=1 small=4"
    assert fields["ContainersByState"] == "Locked=1 Queued=2 Running=1"
    assert fields["QueueLength"] == 4 and fields["LongestWaitSeconds"] == 60
    workers = [v for v in d.INSTANCES if v.instance]
    assert fields["SpendPerHour"] == pytest.approx(round(sum(v.price for v in workers), 4))
    assert msg.startswith("status: 7 instances (") and "longest wait 60s" in msg and msg.endswith("at quota")


def _run(tmp_path, system_logs: dict) -> tuple[RunProcess, str, LoopbackApi]:
    api = LoopbackApi("t" * 40, tmp_path / "c.db")
    url = f"http://127.0.0.1:{free_port()}"
    cfg = tmp_path / "config.yml"
    cfg.write_text(yaml.safe_dump({"Clusters": {"zzzzz": {
        "SystemRootToken": "t" * 40, "ManagementToken": "m" * 40, "SystemLogs": system_logs,
        "Services": {"Controller": {"ExternalURL": api.url}, "DispatchCloud": {"InternalURLs": {url: {}}}},
        "Containers": {"CloudVMs": {"Driver": "stub"}},
        "InstanceTypes": {"small": {"VCPUs": 1, "RAM": "1GiB", "Price": 0.1}}}}}))
    return RunProcess(cfg, tmp_path / "run.log"), url, api


def _drive(proc, url, api, expect_status: bool) -> str:
    try:
        def dispatching():
            try:
                return requests.get(url + "/_health/dispatch", headers={"Authorization": "Bearer " + "m" * 40},
                                    timeout=5).json()["health"] == "OK"
            except requests.ConnectionError:
                return False
        wait_for(dispatching, 30, "the dispatcher to start")
        proc.send(signal.SIGUSR2)
        if expect_status:
            wait_for(lambda: "status: 0 instances" in proc.text(), 10, "the status line")
        assert proc.stop() == 0
        return proc.text()
    finally:
        proc.stop(signal.SIGKILL)
        api.close()


def test_run_honours_system_logs_text(tmp_path):
    text = _drive(*_run(tmp_path, {"Format": "text", "LogLevel": "info"}), expect_status=True)
    lines = text.splitlines()
    assert not any(x.startswith("{") for x in lines)
    [st] = [x for x in lines if "status: 0 instances" in x]
    assert " INFO " in st and "QueueLength=0" in st and "SpendPerHour=0" in st
    assert any("INFO    dispatcher started" in x for x in lines)


def test_run_honours_system_logs_json_and_level(tmp_path):
    text = _drive(*_run(tmp_path, {"Format": "json", "LogLevel": "warning"}), expect_status=False)
    recs = [json.loads(x) for x in text.splitlines()]  # every line is JSON
    assert all(r["level"] in ("warning", "error") for r in recs), recs
    assert not any(r["msg"].startswith("status:") or r["msg"] == "dispatcher started" for r in recs)
