"""G5 across the whole test run: no configured secret in any log line.

Imported by ``tests/conftest.py`` for its two hooks. At session start it (1) wraps
``conf.model.Cluster.__init__`` so every cluster config any test builds registers its secrets
(SystemRootToken, ManagementToken, the dispatcher's private key, DriverParameters credentials),
and (2) puts a handler on the root logger that keeps every record reaching it, formatted as the
service formats it (JSON, with all structured fields and any traceback). At session end each
registered secret is looked for in every kept line; a hit fails the run and names the secret's
first characters and the logger. It does not change any logger's level (so in-process it sees
WARNING and up, plus whatever a test lowers the level to); the process-level tests scan their
processes' complete logs themselves (tests/dispatcher_proc.assert_no_secrets).
"""

from __future__ import annotations

import logging

MIN_LEN = 12  # shorter test tokens ("t", "abc") would match anything

_secrets: set[str] = set()
_lines: list[tuple[str, str]] = []


def register(value) -> None:
    if isinstance(value, str) and len(value) >= MIN_LEN:
        _secrets.add(value)


def register_cluster(cluster) -> None:
    from conf.loader import is_secret_key
    from conf.model import thaw
    register(getattr(cluster, "system_root_token", ""))
    register(getattr(cluster, "management_token", ""))
    containers = getattr(cluster, "containers", None)
    pem = getattr(containers, "dispatch_private_key", "") or ""
    for line in pem.splitlines():
        if line and not line.startswith("-----"):
            register(line)
    vms = getattr(containers, "cloud_vms", None)
    params = thaw(getattr(vms, "driver_parameters", None) or {})
    if isinstance(params, dict):
        for k, v in params.items():
            if is_secret_key(k):
                register(v if isinstance(v, str) else str(v))


class _Keep(logging.Handler):
    def __init__(self):
        super().__init__(logging.NOTSET)
        from conf.logsetup import JsonFormatter
        self.setFormatter(JsonFormatter())

    def emit(self, record):
        try:
            _lines.append((record.name, self.format(record)))
        except Exception:  # noqa: BLE001 - an unformattable record is not our business here
            pass


_handler: _Keep | None = None


def pytest_sessionstart(session):
    global _handler
    from conf import model
    orig = model.Cluster.__init__
    if not getattr(orig, "_g5", False):
        def init(self, *a, **kw):
            orig(self, *a, **kw)
            register_cluster(self)
        init._g5 = True
        model.Cluster.__init__ = init
    _handler = _Keep()
    logging.getLogger().addHandler(_handler)


def leaks() -> list[str]:
    found = []
    for secret in sorted(_secrets):
        for name, line in _lines:
            if secret in line:
                found.append(f"{secret[:6]}… in a {name} log line")
                break
    return found


def pytest_sessionfinish(session, exitstatus):
    if _handler is not None:
        logging.getLogger().removeHandler(_handler)
    found = leaks()
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"G5 log scan: {len(_secrets)} configured secrets, {len(_lines)} log lines, "
                            f"{len(found)} leaks")
    if found:
        if reporter is not None:
            for f in found:
                reporter.write_line(f"G5: secret found: {f}", red=True)
        session.exitstatus = 1
