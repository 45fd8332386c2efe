"""The ``dispatch-cloud`` command: one subcommand per operator task.

Each subcommand lives with what it drives and exposes ``register(subparsers)``; this module only
collects them, so a broken optional piece (say, the Azure SDK) cannot stop ``check-config``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# (module, what it adds)
SUBCOMMANDS = (
    "actors.checkconfig",  # check-config
    "actors.run",       # run
    "api.admin",        # instance ..., container ...
    "actors.devmode",   # submit
    "cloud.cloudtest",  # cloudtest
    "actors.simulate.command",  # simulate
)


def version() -> str:
    """The installed distribution's version (a source checkout that was never installed: "unknown")."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version
    try:
        return dist_version("dispatch-cloud")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dispatch-cloud",
                                description="Cloud dispatcher for Arvados container queues.")
    p.add_argument("--version", action="version", version=f"dispatch-cloud {version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in SUBCOMMANDS:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # not built yet
                continue
            raise
        mod.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
