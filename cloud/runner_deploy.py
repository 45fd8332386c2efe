"""DeployRunnerBinary: install a crunch-run binary on each VM over SSH, as Go's worker pool does.

When ``Containers.CloudVMs.DeployRunnerBinary`` names a file on the dispatcher host (e.g. the Go
crunch-run from Arvados' package), every worker, once its boot probe passes (and on every probe
while it is ``unknown``), checks ``md5sum <dir>/crunch-run~<md5>`` on the VM and uploads the file
there when the sum differs; that path is then the runner command for ``--list``, ``--detach`` and
``--kill``, so the crunch-run on the VM is exactly the one the operator chose. ``""`` (our default)
uses CrunchRunCommand from the image. Go's default ``/proc/self/exe`` means its own binary, which
contains crunch-run; our process is a Python interpreter, so that value is treated as ``""``.

The file is read once per process, lazily (from the first worker's own thread), as Go does; the
command lines (``md5sum``, the install script) are in :mod:`cloud.crunchrun`.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass

SELF_EXE = "/proc/self/exe"


@dataclass(frozen=True)
class RunnerBinary:
    data: bytes
    md5: str
    path: str  # on the VM: <DeployRunnerDirectory>/crunch-run~<md5>


_cache: dict[tuple[str, str], RunnerBinary] = {}
_lock = threading.Lock()


def deploy_source(source: str) -> str:
    """The file to deploy, or "" when nothing is deployed (unset, or Go's ``/proc/self/exe``)."""
    return "" if source in ("", SELF_EXE) else source


def load(source: str, directory: str) -> RunnerBinary | None:
    """The binary to deploy (read and hashed once per process), or None; OSError if unreadable."""
    source = deploy_source(source)
    if not source:
        return None
    key = (source, directory)
    with _lock:
        rb = _cache.get(key)
        if rb is None:
            with open(source, "rb") as f:
                data = f.read()
            md5 = hashlib.md5(data).hexdigest()  # noqa: S324 - Go's content address, not security
            rb = _cache[key] = RunnerBinary(data, md5, f"{directory.rstrip('/')}/crunch-run~{md5}")
        return rb
