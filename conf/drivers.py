"""What the config loader knows about drivers, so that ``conf`` imports nothing from ``cloud``.

The names ``Containers.CloudVMs.Driver`` accepts (``cloud.drivers`` maps them to modules; a test
keeps the two in step), and the ``local`` driver's host-sized default instance type: a config
default, so it is computed here, while the driver itself lives in ``cloud.local``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping

IMPLEMENTED = ("azure", "ec2", "local", "stub")
# Arvados driver names this dispatcher recognizes but does not implement.
NOT_IMPLEMENTED = ("loopback",)

LOCAL_PROVIDER_TYPE = "local"


def local_state_dir(params: Mapping | None = None) -> str:
    """The local driver's StateDir: the parameter, else ``$XDG_STATE_HOME/dispatch-cloud/local``,
    else ``~/.local/state/dispatch-cloud/local``; absolute."""
    state_dir = (params or {}).get("StateDir")
    if not state_dir:
        base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
        state_dir = os.path.join(base, "dispatch-cloud", "local")
    if not isinstance(state_dir, str):
        raise ValueError(f"DriverParameters.StateDir: expected a path, got {state_dir!r}")
    return os.path.abspath(os.path.expanduser(state_dir))


def local_default_instance_type(params: Mapping | None = None) -> dict:
    """``{"local": {...}}``: one InstanceTypes entry (Arvados config shape) sized from this host,
    for configs with ``Driver: local`` that list none. Scratch is the free space of the file
    system holding StateDir."""
    probe = local_state_dir(params)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    free = shutil.disk_usage(probe).free
    return {"local": {"ProviderType": LOCAL_PROVIDER_TYPE, "VCPUs": os.cpu_count() or 1,
                      "RAM": _mem_total(), "IncludedScratch": free, "AddedScratch": 0,
                      "Price": 0.01, "Preemptible": False}}


def _mem_total() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise OSError("MemTotal not found in /proc/meminfo")
