"""``dispatch-cloud run``: the command line over the composition root (``actors.service``).

With ``--config`` it serves that cluster; without, it prepares the embedded dev cluster
(``actors.devmode``) and serves that.
"""

from __future__ import annotations

import os
import sys


def register(sub) -> None:
    p = sub.add_parser("run", help="run the dispatcher (no --config: the embedded dev cluster)")
    p.add_argument("--config", help="Arvados cluster config file (default: embedded dev mode)")
    p.add_argument("--cluster", help="cluster id, when the file has several")
    p.add_argument("--log-level", default=os.environ.get("DISPATCH_CLOUD_LOG_LEVEL") or None,
                   help="error, warning, info or debug (default: the config's SystemLogs.LogLevel)")
    p.add_argument("--demo", action="store_true", help="dev mode: queue a short demo workload")
    p.add_argument("--state-dir", help="where the lock file (no PostgreSQL in the config) and the dev "
                   "cluster live (default $STATE_DIRECTORY, $DISPATCH_CLOUD_STATE or "
                   "~/.local/state/dispatch-cloud)")
    p.add_argument("--keep-vms", action="store_true", help="dev mode: leave the dev VMs up on exit")
    p.set_defaults(func=run_command)


def run_command(args) -> int:
    from conf import logsetup
    # until the config is read: its loader's warnings go out in the default format
    logsetup.setup(args.log_level or "info", fmt=logsetup.choose_format(dev=not args.config))
    if not args.config:
        from actors.devmode import run_dev
        return run_dev(args)
    from cloud.drivers import load_config
    from conf.loader import ConfigError
    try:
        cluster = load_config(args.config, args.cluster)
    except ConfigError as e:
        print(f"dispatch-cloud: {e}", file=sys.stderr)
        return 1
    logsetup.configure(cluster, level_override=args.log_level)
    from actors.service import serve
    return serve(cluster, state_dir=args.state_dir)


