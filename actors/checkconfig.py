"""``dispatch-cloud check-config``: load the config as the service would, and say what it means.

An operator runs this before (re)starting the service: exit 0 and a summary of the *effective*
values (fallbacks applied, types cheapest first) on stdout, warnings on stderr; or exit 1 and one
line on stderr naming the file and the key that is wrong.
"""

from __future__ import annotations

import argparse
import logging
import sys

from cloud.drivers import load_config
from conf.loader import ConfigError, default_path
from conf.model import Cluster
from conf.units import format_duration, format_size

PROG = "dispatch-cloud"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "check-config", help="validate the cluster config and print its effective values",
        description="Load the Arvados cluster config the way the dispatcher does; print a summary "
                    "or the first problem found.")
    p.add_argument("--config", metavar="FILE", default=None,
                   help="config file (default: $ARVADOS_CONFIG or /etc/arvados/config.yml)")
    p.add_argument("--cluster", metavar="ID", default=None,
                   help="cluster id, when the file defines more than one")
    p.set_defaults(func=run)


class _StderrWarnings(logging.Handler):
    """Config warnings as plain ``dispatch-cloud: warning: ...`` lines, for a person at a terminal."""

    def __init__(self, stream):
        super().__init__(logging.WARNING)
        self.stream = stream

    def emit(self, record: logging.LogRecord) -> None:
        source = getattr(record, "ConfigFile", "")
        prefix = f"{source}: " if source else ""
        print(f"{PROG}: warning: {prefix}{record.getMessage()}", file=self.stream)


def run(args: argparse.Namespace) -> int:
    logger = logging.getLogger("conf")
    handler = _StderrWarnings(sys.stderr)
    old_propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False  # shown once, as plain text, not again as JSON by a root handler
    try:
        cluster = load_config(args.config or default_path(), cluster_id=args.cluster)
    except ConfigError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    finally:
        logger.removeHandler(handler)
        logger.propagate = old_propagate
    sys.stdout.write(summary(cluster))
    return 0


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]], right: set[int]) -> list[str]:
    """Columns padded to their widest cell; numeric columns (``right``) aligned right."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    out = []
    for r in [header, *rows]:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        out.append("  " + "  ".join(cells).rstrip())
    return out


def _count(n: int, zero: str) -> str:
    return f"{n} ({zero})" if n == 0 else str(n)


def _lock(c: Cluster) -> str:
    p = c.postgresql_connection
    if p.get("host") or p.get("dbname"):
        return (f"PostgreSQL advisory lock 10005 on {p.get('host') or 'local socket'}:{p.get('port', '5432')}/"
                f"{p.get('dbname', '')} (shared with arvados-dispatch-cloud)")
    return "a lock file in the state directory (this host only: set PostgreSQL.Connection for the cluster)"


def _served(c: Cluster, url: str) -> str:
    listen = c.dispatch_listen.get(url, url)
    return url if listen == url else f"{url} (listening on {listen})"


def summary(c: Cluster) -> str:
    """The human summary ``check-config`` prints: a pure function of the loaded Cluster."""
    vms, ct = c.cloud_vms, c.containers
    lines = [
        f"Cluster {c.cluster_id}: configuration OK",
        f"  source:            {c.source}",
        f"  driver:            {vms.driver}",
        f"  management URLs:   {', '.join(_served(c, u) for u in c.dispatch_urls)}"
        + ("" if c.management_token else "  (ManagementToken is empty: API disabled)"),
        f"  controller URL:    {c.controller_url}"
        + ("  (TLS verification off)" if c.tls_insecure else ""),
        f"  dispatch lock:     {_lock(c)}",
        f"  logs:              {c.log_format or 'json (text in dev mode or on a terminal)'}, level {c.log_level}",
        "",
    ]
    types = c.types_by_price()
    if types:
        lines.append(f"Instance types, cheapest first ({len(types)}):")
        rows = []
        for t in types:
            gpus = f"{t.gpu.device_count}x {t.gpu.stack} {format_size(t.gpu.vram)}" if t.gpu.device_count else "-"
            rows.append((t.name, t.provider_type, str(t.vcpus), format_size(t.ram), format_size(t.scratch),
                         f"{t.price:.4f}", "yes" if t.preemptible else "no", gpus))
        lines += _table(("NAME", "PROVIDER TYPE", "VCPUS", "RAM", "SCRATCH", "PRICE/H", "PREEMPTIBLE", "GPUS"),
                        rows, right={2, 3, 4, 5})
    else:
        lines.append("Instance types: none configured (no container can be scheduled)")
    lines += ["", "Timeouts and limits (effective values):"]
    limits = [
        ("PollInterval", format_duration(vms.poll_interval)),
        ("ProbeInterval", format_duration(vms.probe_interval)),
        ("SyncInterval", format_duration(vms.sync_interval)),
        ("TimeoutIdle", format_duration(vms.timeout_idle)),
        ("TimeoutBooting", format_duration(vms.timeout_booting)),
        ("TimeoutProbe", format_duration(vms.timeout_probe)),
        ("TimeoutShutdown", format_duration(vms.timeout_shutdown)),
        ("TimeoutTERM", format_duration(vms.timeout_term)),
        ("TimeoutSignal", format_duration(vms.timeout_signal)),
        ("TimeoutStaleRunLock", format_duration(vms.timeout_stale_run_lock)),
        ("StaleLockTimeout", format_duration(ct.stale_lock_timeout)),
        ("MaxInstances", _count(vms.max_instances, "unlimited")),
        ("InitialQuotaEstimate", _count(vms.initial_quota_estimate, "MaxInstances")),
        ("MaxConcurrentInstanceCreateOps", _count(vms.max_concurrent_instance_create_ops, "unlimited")),
        ("MaxCloudOpsPerSecond", _count(vms.max_cloud_ops_per_second, "unlimited")),
        ("MaxProbesPerSecond", str(vms.max_probes_per_second)),
        ("MaxRunningContainersPerInstance", _count(vms.max_running_containers_per_instance, "unlimited")),
        ("SupervisorFraction", f"{vms.supervisor_fraction:g}"),
        ("MaximumPriceFactor", f"{ct.maximum_price_factor:g}"),
        ("PreemptiblePriceFactor", f"{ct.preemptible_price_factor:g}"
         + ("" if ct.preemptible_price_factor else " (no automatic preemptible types)")),
        ("ReserveExtraRAM", format_size(ct.reserve_extra_ram)),
        ("BootProbeCommand", vms.boot_probe_command),
        ("SSHPort", vms.ssh_port),
        ("TagKeyPrefix", vms.tag_key_prefix),
    ]
    width = max(len(k) for k, _ in limits)
    lines += [f"  {k.ljust(width)}  {v}" for k, v in limits]
    return "\n".join(lines) + "\n"
