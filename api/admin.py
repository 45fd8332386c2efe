"""``dispatch-cloud instance ...`` and ``dispatch-cloud container ...``: the admin command line.

It talks to the management API of every dispatcher URL in the config
(``Services.DispatchCloud.InternalURLs``) with the ManagementToken, like ``arvados-server
instance``. Lists print tab-separated rows on stdout; actions print one status line per id and
URL on stderr. Exit status: 0 when everything worked (an action: every id got 200 from some URL),
1 otherwise, 2 for usage errors. Failures are one line each, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import requests

DEFAULT_CONFIG = "/etc/arvados/config.yml"
PREFIX = "/arvados/v1/dispatch"
INSTANCE_COLUMNS = ("instance", "address", "state", "idle-behavior", "config-type", "provider-type",
                    "price", "running-containers")
CONTAINER_COLUMNS = ("uuid", "state", "priority", "instance-type", "scheduling-status")


class CliError(Exception):
    """A failure to report as one line, with an exit status."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


# -- where to talk to --------------------------------------------------------------------------

def dev_config_path(env=os.environ) -> Path:
    state = env.get("DISPATCH_CLOUD_STATE") or "~/.local/state/dispatch-cloud"
    return Path(state).expanduser() / "dev" / "config.yml"


def config_candidates(explicit: str | None, env=os.environ) -> list[Path]:
    """The config files to try, in order: --config alone if given, else the default then dev mode's."""
    if explicit:
        return [Path(explicit)]
    return [Path(env.get("ARVADOS_CONFIG") or DEFAULT_CONFIG), dev_config_path(env)]


def resolve_target(args, env=os.environ) -> tuple[list[str], str]:
    """(dispatcher URLs, management token) from --url/--token, else from the cluster config."""
    urls = [u.rstrip("/") for u in args.url or []]
    token = args.token or ""
    if urls and token:
        return urls, token
    tried = config_candidates(args.config, env)
    path = next((p for p in tried if p.is_file()), None)
    if path is None:
        raise CliError(f"no config file found (tried {', '.join(map(str, tried))}); "
                       "give --config FILE, or --url and --token")
    try:
        from conf.loader import load
    except ImportError as e:
        raise CliError(f"cannot load {path}: the config loader is not available ({e})") from None
    try:
        cluster = load(str(path), None)
    except Exception as e:  # the loader's messages name the file and key; pass them on
        raise CliError(f"cannot load config {path}: {e}") from None
    urls = urls or [u.rstrip("/") for u in cluster.dispatch_urls]
    token = token or cluster.management_token
    if not urls:
        raise CliError(f"{path}: Services.DispatchCloud.InternalURLs is empty; give --url")
    if not token:
        raise CliError(f"{path}: ManagementToken is not set; give --token")
    return urls, token


# -- HTTP --------------------------------------------------------------------------------------

def _why(exc: Exception) -> str:
    """The useful end of a requests/urllib3 error chain, e.g. "Connection refused"."""
    if isinstance(exc, requests.Timeout):
        return "timed out"
    m = re.findall(r"\[Errno -?\d+\] ([^'\")\]]+)", str(exc))
    if m:
        return m[-1].strip()
    return type(exc).__name__


def _error_text(resp: requests.Response) -> str:
    try:
        return "; ".join(map(str, resp.json()["errors"]))
    except (ValueError, KeyError, TypeError):
        return resp.text.strip().splitlines()[0] if resp.text.strip() else resp.reason or ""


def _explain(resp: requests.Response, url: str) -> str:
    status = f"{resp.status_code} {resp.reason}"
    if resp.status_code in (401, 403):
        return f"{status} ({url}): management token rejected"
    return f"{status} ({url}): {_error_text(resp)}"


class Client:
    def __init__(self, token: str, timeout: float):
        self._session = requests.Session()
        self._session.headers["Authorization"] = "Bearer " + token
        self._timeout = timeout

    def get_items(self, url: str, path: str) -> list[dict]:
        try:
            resp = self._session.get(url + path, timeout=self._timeout)
        except requests.RequestException as e:
            raise CliError(f"cannot reach dispatcher at {url}: {_why(e)}") from None
        if resp.status_code != 200:
            raise CliError(_explain(resp, url))
        try:
            items = resp.json()["items"]
        except (ValueError, KeyError, TypeError) as e:
            raise CliError(f"bad response from {url}{path}: {e}") from None
        return items or []

    def post(self, url: str, path: str, params: dict) -> tuple[bool, str]:
        """(ok, status text) for one action on one URL."""
        try:
            resp = self._session.post(url + path, params=params, timeout=self._timeout)
        except requests.RequestException as e:
            return False, f"cannot reach dispatcher at {url}: {_why(e)}"
        if resp.status_code == 200:
            return True, f"{resp.status_code} {resp.reason} ({url})"
        return False, _explain(resp, url)


# -- formatting (pure) -------------------------------------------------------------------------

def _cell(v) -> str:
    s = "" if v is None else str(v)
    return s if s else "-"


def instance_row(item: dict) -> str:
    return "\t".join([
        _cell(item.get("instance")), _cell(item.get("address")), _cell(item.get("worker_state")),
        _cell(item.get("idle_behavior")), _cell(item.get("arvados_instance_type")),
        _cell(item.get("provider_instance_type")), f"{float(item.get('price') or 0):f}",
        _cell(",".join(item.get("running_container_uuids") or [])),
    ])


def container_row(item: dict) -> str:
    ctr = item.get("container") or {}
    itype = item.get("instance_type") or {}
    return "\t".join([_cell(ctr.get("uuid")), _cell(ctr.get("state")), _cell(ctr.get("priority")),
                      _cell(itype.get("Name")), _cell(item.get("scheduling_status"))])


# -- commands ------------------------------------------------------------------------------------

def _list(args, path: str, columns: tuple[str, ...], row) -> int:
    urls, token = resolve_target(args)
    client = Client(token, args.timeout)
    out = [("\t".join(columns))] if args.header else []
    failed = []
    for url in urls:
        try:
            out.extend(row(item) for item in client.get_items(url, path))
        except CliError as e:
            failed.append(str(e))
    if out:
        print("\n".join(out), flush=True)
    for msg in failed:
        print(f"dispatch-cloud: {msg}", file=sys.stderr)
    return 1 if failed else 0


def _act(args, path: str, id_param: str, with_reason: bool) -> int:
    urls, token = resolve_target(args)
    client = Client(token, args.timeout)
    all_ok = True
    for ident in args.ids:
        params = {id_param: ident}
        if with_reason:
            params["reason"] = args.reason
        ok_somewhere = False
        for url in urls:
            ok, text = client.post(url, path, params)
            print(f"{ident}: {text}", file=sys.stderr)
            ok_somewhere |= ok
        all_ok &= ok_somewhere
    return 0 if all_ok else 1


def _run(fn):
    def func(args) -> int:
        try:
            return fn(args)
        except CliError as e:
            print(f"dispatch-cloud: {e}", file=sys.stderr)
            return e.code
        except Exception as e:  # never a traceback for an operator
            print(f"dispatch-cloud: {args.command} failed: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
    return func


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE",
                   help=f"cluster config (default $ARVADOS_CONFIG or {DEFAULT_CONFIG}, "
                        "else the dev cluster's $DISPATCH_CLOUD_STATE/dev/config.yml)")
    p.add_argument("--url", action="append", metavar="URL",
                   help="dispatcher management URL (repeatable; default Services.DispatchCloud.InternalURLs)")
    p.add_argument("--token", help="management token (default ManagementToken from the config)")
    p.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS", help="per-request timeout")


def _list_parser(sub, help_text: str, path: str, columns, row) -> None:
    p = sub.add_parser("list", help=help_text)
    _common(p)
    p.add_argument("--header", action="store_true", help="print column headings first")
    p.set_defaults(func=_run(lambda a: _list(a, PREFIX + path, columns, row)))


def _action_parser(sub, action: str, help_text: str, path: str, param: str, metavar: str,
                   reason: bool) -> None:
    p = sub.add_parser(action, help=help_text)
    _common(p)
    if reason:
        p.add_argument("--reason", default="", help="logged by the dispatcher")
    p.add_argument("ids", nargs="+", metavar=metavar)
    p.set_defaults(func=_run(lambda a: _act(a, PREFIX + path, param, reason)))


def register(subparsers) -> None:
    inst = subparsers.add_parser("instance", help="list the dispatcher's cloud instances, or hold/drain/run/kill them")
    isub = inst.add_subparsers(dest="action", metavar="ACTION")
    isub.required = True
    _list_parser(isub, "print one tab-separated line per instance", "/instances", INSTANCE_COLUMNS,
                 instance_row)
    for action, text in (("hold", "stop scheduling on the instances and keep them up"),
                         ("drain", "shut the instances down once idle"),
                         ("run", "resume normal scheduling on the instances")):
        _action_parser(isub, action, text, f"/instances/{action}", "instance_id", "INSTANCE_ID", False)
    _action_parser(isub, "kill", "shut the instances down now (their containers are killed)",
                   "/instances/kill", "instance_id", "INSTANCE_ID", True)

    ctr = subparsers.add_parser("container", help="list the dispatcher's container queue, or kill containers")
    csub = ctr.add_subparsers(dest="action", metavar="ACTION")
    csub.required = True
    _list_parser(csub, "print one tab-separated line per queued or running container", "/containers",
                 CONTAINER_COLUMNS, container_row)
    _action_parser(csub, "kill", "kill the containers' crunch-run processes", "/containers/kill",
                   "container_uuid", "UUID", True)
