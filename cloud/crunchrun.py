"""crunch-run's protocol: every command line the dispatcher sends to a VM, and what comes back.

The dispatcher drives a VM only through these (arvados-dispatcher.md §8, Go
``lib/dispatchcloud/worker/{runner,worker,verify}.go``); workers, the stub VM, cloudtest and the
conformance suite all take them from here, so a change to the protocol is a change to one file:

* the init command a new instance runs once (writes the instance secret);
* ``cat <secret file>``, the host-key fallback check;
* the boot probe (``BootProbeCommand``, ``true`` if empty; never under sudo);
* ``R --list`` and the parsing of its output;
* ``R --detach --stdin-config 'arg'... 'uuid'`` with its stdin ``ConfigData`` JSON;
* ``R --kill 15 uuid``;
* with DeployRunnerBinary, ``md5sum`` of the deployed runner and the script that installs it.

``R`` is ``Containers.CrunchRunCommand``, prefixed with ``sudo `` when the remote user is not
root. Every value placed in a command is quoted: with Go's own single-quoting where Go quotes
(``--detach`` arguments), with :func:`shlex.quote` elsewhere, which leaves the values Go sends
unquoted (container UUIDs, hex secrets) character for character as Go writes them.
"""

from __future__ import annotations

import hmac
import json
import math
import secrets
import shlex
from decimal import Decimal
from hashlib import sha256
from typing import NamedTuple
from urllib.parse import urlsplit

from cloud.base import join_host_port, split_host_port
from conf.model import Cluster, InstanceType, thaw

SECRET_FILE = "/var/run/arvados-instance-secret"
_INIT_WORDS = ["umask", "0177", "&&", "echo", "-n"]


# ---------------------------------------------------------------------------------------------
# Quoting and sudo


def go_quote(s: str) -> str:
    """``'s'`` with each ``'`` written as ``'\\''``: Go's shell quoting of crunch-run arguments."""
    return "'" + s.replace("'", "'\\''") + "'"


def needs_sudo(remote_user: str) -> bool:
    return remote_user != "root"


def _sudo(cmd: str, sudo: bool) -> str:
    return "sudo " + cmd if sudo else cmd


# ---------------------------------------------------------------------------------------------
# Command lines


def init_command(secret: str, instance_init_command: str = "") -> str:
    """What a new instance runs once: write the secret (mode 0600), then InstanceInitCommand."""
    q = shlex.quote(secret)
    value = f'"{secret}"' if q == secret else q  # Go writes "<hex>"; anything else is quoted
    return f"umask 0177 && echo -n {value} >{SECRET_FILE}\n{instance_init_command}"


def secret_from_init_command(command: str) -> str | None:
    """The secret an :func:`init_command` writes (None if it writes none): what a fake VM stores."""
    try:
        words = shlex.split((command or "").split("\n", 1)[0])
    except ValueError:
        return None
    if len(words) == 7 and words[:5] == _INIT_WORDS and words[6] == ">" + SECRET_FILE:
        return words[5]
    return None


def instance_secret_command(sudo: bool) -> str:
    return _sudo("cat " + SECRET_FILE, sudo)


def boot_probe_command(configured: str) -> str:
    """``BootProbeCommand``, or ``true`` if it is empty; run as is, without sudo."""
    return configured or "true"


def runner_args(cluster: Cluster) -> list[str]:
    """The ``--detach`` arguments before the UUID: the runtime engine, then CrunchRunArgumentsList."""
    c = cluster.containers
    return ["--runtime-engine=" + c.runtime_engine, *c.crunch_run_arguments_list]


def detach_command(runner: str, args: list[str], uuid: str, sudo: bool) -> str:
    """``R --detach --stdin-config 'arg'... 'uuid'`` (stdin: :func:`config_data`)."""
    quoted = "".join(" " + go_quote(a) for a in [*args, uuid])
    return _sudo(f"{runner} --detach --stdin-config{quoted}", sudo)


def list_command(runner: str, sudo: bool, stdin_prices: bool = False) -> str:
    return _sudo(f"{runner} --list" + (" --stdin-prices" if stdin_prices else ""), sudo)


def kill_command(runner: str, uuid: str, sudo: bool, signal: int = 15) -> str:
    """Go sends the UUID bare; shlex.quote leaves a well-formed UUID exactly so."""
    return _sudo(f"{runner} --kill {int(signal)} {shlex.quote(uuid)}", sudo)


def runner_md5sum_command(path: str) -> str:
    """DeployRunnerBinary's check (cloud/runner_deploy.py): run as is, without sudo, as Go does."""
    return "md5sum " + path


def runner_installed(md5: str, path: str, stdout: bytes, stderr: bytes, exit_status: int) -> bool:
    """Did :func:`runner_md5sum_command` show the binary with this md5 in place?"""
    return exit_status == 0 and not stderr and stdout == f"{md5}  {path}\n".encode()


def runner_install_command(path: str, sudo: bool) -> str:
    """Go's install script (stdin: the binary): touch and chmod come before the data, so a correct
    md5 never goes with a wrong mode; ``sudo sh -c '...'`` when the remote user is not root."""
    dstdir = path.rsplit("/", 1)[0] + "/"
    cmd = (f'set -e; dstdir="{dstdir}"; dstfile="{path}"; mkdir -p "$dstdir"; touch "$dstfile"; '
           f'chmod 0755 "$dstdir" "$dstfile"; cat >"$dstfile"')
    return "sudo sh -c " + go_quote(cmd) if sudo else cmd


# ---------------------------------------------------------------------------------------------
# --list output


class ListReport(NamedTuple):
    running: list[str]
    stale: list[str]
    broken: bool


def parse_list(out: str, cluster_id: str) -> ListReport:
    """``--list`` output -> running uuids, stale uuids, whether the node reports ``broken``.

    Lines of another cluster's containers (a shared host) are ignored, as Go does.
    """
    running, stale, broken = [], [], False
    for line in out.splitlines():
        line = line.strip()
        if not line:
            continue
        if line == "broken":
            broken = True
            continue
        if not line.startswith(cluster_id):
            continue
        parts = line.split()
        if len(parts) == 1:
            running.append(parts[0])
        elif len(parts) == 2 and parts[1] == "stale":
            stale.append(parts[0])
    return ListReport(running, stale, broken)


def format_list(entries: list[tuple[str, bool]], broken: bool) -> str:
    """``--list`` output for (uuid, stale) entries, as crunch-run prints it (a fake VM's side)."""
    lines = [uuid + (" stale" if is_stale else "") for uuid, is_stale in entries]
    if broken:
        lines.append("broken")
    return "".join(line + "\n" for line in lines)


# ---------------------------------------------------------------------------------------------
# --detach stdin: crunch-run's ConfigData


def gateway_auth_secret(system_root_token: str, uuid: str) -> str:
    return hmac.new(system_root_token.encode(), uuid.encode(), sha256).hexdigest()


def api_host(controller_url: str) -> str:
    """``host[:port]`` of Services.Controller.ExternalURL, as Go's ``url.Host``."""
    return urlsplit(controller_url).netloc.rpartition("@")[2]


def config_data(cluster: Cluster, instance_type: InstanceType, instance_address: str,
                uuid: str) -> bytes:
    """crunch-run's stdin ``ConfigData`` JSON for starting ``uuid`` (arvados-dispatcher.md §8.4).

    Keys and values match Go's ``json.Marshal`` (struct order, sorted map keys, Go number format).
    """
    c = cluster.containers
    env = {
        "ARVADOS_API_HOST": api_host(cluster.controller_url),
        "ARVADOS_API_TOKEN": cluster.system_root_token,
        "InstanceType": go_json(instance_type.arvados_json(), indent=4) + "\n",
        "GatewayAddress": join_host_port(split_host_port(instance_address)[0], "0"),
        "GatewayAuthSecret": gateway_auth_secret(cluster.system_root_token, uuid),
    }
    if cluster.tls_insecure:
        env["ARVADOS_API_HOST_INSECURE"] = "1"
    bufs = c.local_keep_blob_buffers_per_vcpu
    config = {
        "Env": dict(sorted(env.items())),
        "KeepBuffers": bufs * instance_type.vcpus if bufs > 0 else 0,
        "EC2SpotCheck": c.cloud_vms.driver == "ec2" and instance_type.preemptible,
        "Cluster": runner_cluster(cluster.raw) if bufs > 0 else None,
    }
    return go_json(config).encode()


# Secrets in the cluster config that neither crunch-run nor the keepstore it starts reads, by path
# below the cluster ("*" matches any map key). Go sends them all to every VM.
_UNUSED_SECRETS = (
    ("Containers", "DispatchPrivateKey"),
    ("PostgreSQL", "Connection", "password"),
    ("Login", "Google", "ClientSecret"),
    ("Login", "OpenIDConnect", "ClientSecret"),
    ("Login", "LDAP", "SearchBindPassword"),
    ("Login", "Test", "Users", "*", "Password"),
)
_CREDENTIAL_WORDS = ("secret", "password", "accesskeyid", "token")


def runner_cluster(raw) -> dict:
    """The cluster config crunch-run gets on stdin: the complete, Go-typed config the loader made
    (``Cluster.raw``) without the secrets neither crunch-run nor its local keepstore uses.

    * DispatchPrivateKey, database and login secrets: emptied.
    * Containers.CloudVMs.DriverParameters: the cloud credentials (ClientSecret, SecretAccessKey,
      AccessKeyID, any key naming a secret, password or token) are left out.
    * ManagementToken: replaced by a fresh random token. crunch-run pings its local keepstore's
      ``/_health/ping`` with ``Cluster.ManagementToken``, and keepstore answers 404 when that token
      is empty, so it cannot simply be dropped; a throwaway token works and reveals nothing.

    Volumes (with their credentials), Collections (BlobSigningKey, BlobSigningTTL, ...),
    SystemRootToken and everything else are kept: keepstore needs them.
    """
    out = thaw(raw)
    if not isinstance(out, dict):
        return out
    for path in _UNUSED_SECRETS:
        _blank(out, path)
    if "ManagementToken" in out:
        out["ManagementToken"] = secrets.token_hex(20)
    vms = (out.get("Containers") or {}).get("CloudVMs") or {}
    params = vms.get("DriverParameters")
    if isinstance(params, dict):
        vms["DriverParameters"] = {k: v for k, v in params.items()
                                   if not any(w in str(k).lower() for w in _CREDENTIAL_WORDS)}
    return out


def _blank(d, path) -> None:
    head, rest = path[0], path[1:]
    keys = list(d) if head == "*" else [head]
    for k in keys:
        if k not in d:
            continue
        if not rest:
            if isinstance(d[k], str):
                d[k] = ""
        elif isinstance(d[k], dict):
            _blank(d[k], rest)


def go_float(x: float) -> str:
    """A float as Go's encoding/json writes it: ``1`` not ``1.0``, ``1e-7`` not ``1e-07``."""
    if not math.isfinite(x):
        raise ValueError(f"{x} has no JSON form")
    if x == int(x) and abs(x) < 1e21:
        return str(int(x))
    if 1e-6 <= abs(x) < 1e21:
        return format(Decimal(repr(x)), "f")
    mant, _, exp = repr(x).partition("e")
    sign = "-" if exp.startswith("-") else "+"
    return f"{mant}e{sign}{exp.lstrip('+-').lstrip('0') or '0'}"


def go_json(value, indent: int | None = None) -> str:
    """``json.dumps`` with Go's float format, compact separators, and UTF-8 left as is."""
    floats: list[str] = []

    def mark(v):
        if isinstance(v, bool) or not isinstance(v, float):
            if isinstance(v, dict):
                return {k: mark(x) for k, x in v.items()}
            if isinstance(v, (list, tuple)):
                return [mark(x) for x in v]
            return v
        floats.append(go_float(v))
        return f"\x00{len(floats) - 1}\x00"

    seps = (",", ": ") if indent is not None else (",", ":")
    out = json.dumps(mark(value), indent=indent, separators=seps, ensure_ascii=False)
    for i, f in enumerate(floats):
        out = out.replace(f'"\\u0000{i}\\u0000"', f, 1)
    # Go escapes these inside strings (they cannot occur outside one).
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                    ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        out = out.replace(ch, esc)
    return out
