"""The periodic status line: one info log record summing up a Snapshot for a person reading logs.

Pure: ``status(snapshot)`` returns (message, fields); the run command logs it every minute and on
SIGUSR2.
"""

from __future__ import annotations

from collections import Counter

from actors.snapshot import Snapshot

INTERVAL = 60.0  # seconds between status lines


def _counts(pairs) -> str:
    """``{"idle": 2, "running": 1}`` -> ``"idle=2 running=1"`` (sorted, for stable lines)."""
    return " ".join(f"{k}={n}" for k, n in sorted(Counter(pairs).items())) or "none"


def status(snap: Snapshot) -> tuple[str, dict]:
    workers = [v for v in snap.instances if v.instance]
    pending = len(snap.instances) - len(workers)
    states = [v.worker_state for v in workers] + ["creating"] * pending
    types = [v.arvados_instance_type for v in snap.instances]
    queue = snap.queue
    containers = [str(e.container.get("state", "")) for e in queue]
    spend = sum(v.price for v in workers)  # pending creates cost nothing yet
    wait = snap.containers_longest_wait_time_seconds
    fields = {
        "Instances": len(snap.instances),
        "InstancesByState": _counts(states),
        "InstancesByType": _counts(types),
        "ContainersByState": _counts(containers),
        "QueueLength": len(queue),
        "LongestWaitSeconds": round(wait, 1),
        "SpendPerHour": round(spend, 4),
        "AtQuota": snap.at_quota,
    }
    msg = (f"status: {len(snap.instances)} instances ({fields['InstancesByState']}; "
           f"{fields['InstancesByType']}), {len(queue)} containers ({fields['ContainersByState']}), "
           f"longest wait {wait:.0f}s, spend ${spend:.2f}/h" + (", at quota" if snap.at_quota else ""))
    return msg, fields
