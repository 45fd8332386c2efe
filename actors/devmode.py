"""The embedded dev cluster: ``dispatch-cloud run`` with no ``--config``, and ``submit``.

One command brings up a whole cluster on this machine: the SQLite-backed container API on
loopback, the ``local`` driver (each "VM" a process tree with its own SSH server on 127.0.0.N),
``dispatch-cloud-crunch-run`` as crunch-run, and the management API on 127.0.0.1:9006. Its state
lives in ``<state>/dev/`` (``$DISPATCH_CLOUD_STATE``, default ``~/.local/state/dispatch-cloud``):

* ``config.yml`` — an ordinary Arvados cluster config (mode 0600) with generated tokens, which
  every other command (``submit``, ``instance ...``, ``container ...``) finds without ``--config``;
* ``dispatch_key`` — the dispatcher's SSH key (0600);
* ``containers.db`` — the container queue, so a second ``run`` resumes what the first left;
* ``local/`` — the local driver's instances.

Ctrl-C stops the dispatcher and the API server and shuts the dev VMs down, so nothing is left
running; SIGKILL leaves the VMs up (as a cloud would) and the next ``run`` adopts them.

config.yml decides which commands run as this user (CrunchRunCommand, BootProbeCommand), so an
existing state dir or config that another user owns, or that others may write, is refused
(:class:`UnsafeState`) rather than loaded.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import string
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger("dispatch.dev")

CLUSTER_ID = "xdev1"
API_PORT = 9007
MGMT_URL = "http://127.0.0.1:9006"


def state_root(explicit: str | None = None) -> Path:
    base = explicit or os.environ.get("DISPATCH_CLOUD_STATE") or os.path.join(
        os.path.expanduser("~"), ".local", "state", "dispatch-cloud")
    return Path(base) / "dev"


def _token() -> str:
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(48))


class UnsafeState(Exception):
    """The dev state dir or a file in it could have been written by someone else."""


def check_private(path: Path) -> None:
    """Refuse ``path`` unless the current user owns it and neither group nor others may write it."""
    st = path.stat()
    if st.st_uid != os.geteuid():
        raise UnsafeState(f"{path} is owned by uid {st.st_uid}, not by the current user ({os.geteuid()}): "
                          "refusing to use it")
    if st.st_mode & 0o022:
        raise UnsafeState(f"{path} is writable by group or others (mode {st.st_mode & 0o777:04o}): "
                          f"refusing to use it (chmod go-w {path} if you trust its contents)")


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


def crunch_run_path() -> str:
    """The runner console script next to this interpreter (the venv's bin)."""
    cand = Path(sys.executable).parent / "dispatch-cloud-crunch-run"
    return str(cand) if cand.exists() else (shutil.which("dispatch-cloud-crunch-run") or str(cand))


def ensure_state(root: Path) -> Path:
    """Create the dev cluster's config, key and directories on first use; returns config.yml."""
    import yaml
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519
    if root.exists():
        check_private(root)
    else:
        root.parent.mkdir(parents=True, exist_ok=True)
        root.mkdir(mode=0o700)
    cfg = root / "config.yml"
    if cfg.exists():
        check_private(cfg)
        return cfg
    key = root / "dispatch_key"
    pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    _write_private(key, pem.decode())
    ncpu = os.cpu_count() or 2
    doc = {"Clusters": {CLUSTER_ID: {
        "SystemRootToken": _token(),
        "ManagementToken": _token(),
        "Services": {
            "Controller": {"ExternalURL": f"http://127.0.0.1:{API_PORT}"},
            "DispatchCloud": {"InternalURLs": {MGMT_URL: {}}},
        },
        "Containers": {
            "DispatchPrivateKey": f"file://{key}",
            "CrunchRunCommand": crunch_run_path(),
            "RuntimeEngine": "process",
            "ReserveExtraRAM": 0,
            "LocalKeepBlobBuffersPerVCPU": 0,
            "StaleLockTimeout": "10s",
            "MaxDispatchAttempts": 5,
            "CloudVMs": {
                "Driver": "local",
                "DriverParameters": {"StateDir": str(root / "local"), "BootDelay": "2s"},
                "BootProbeCommand": "true",
                "SSHPort": "2222",
                "PollInterval": "1s",
                "ProbeInterval": "2s",
                "SyncInterval": "5s",
                "TimeoutIdle": "30s",
                "TimeoutBooting": "60s",
                "TimeoutProbe": "60s",
                "TimeoutShutdown": "10s",
                "MaxInstances": 4,
                "MaxConcurrentInstanceCreateOps": 2,
            },
        },
        "InstanceTypes": {
            "small": {"ProviderType": "local-small", "VCPUs": 1, "RAM": "1GiB",
                      "IncludedScratch": "10GB", "Price": 0.01},
            "medium": {"ProviderType": "local-medium", "VCPUs": max(2, min(4, ncpu)), "RAM": "2GiB",
                       "IncludedScratch": "20GB", "Price": 0.02},
        },
    }}}
    _write_private(cfg, yaml.safe_dump(doc, sort_keys=False))
    return cfg


def find_config(explicit_state: str | None = None) -> Path | None:
    """The dev cluster's config.yml if there is one (UnsafeState if it is not safe to read)."""
    root = state_root(explicit_state)
    p = root / "config.yml"
    if not p.exists():
        return None
    check_private(root)
    check_private(p)
    return p


# ---------------------------------------------------------------------------------------------
# `dispatch-cloud run` (dev mode)


DEMO = [  # (name, vcpus, ram MiB, command)
    ("hello", 1, 256, ["sh", "-c", "echo hello from a small instance; sleep 3"]),
    ("count", 1, 256, ["sh", "-c", "for i in 1 2 3; do echo $i; sleep 1; done"]),
    ("fails", 1, 256, ["sh", "-c", "echo about to fail >&2; exit 3"]),
    ("bigger", 2, 1536, ["sh", "-c", "echo hello from a medium instance; nproc; sleep 4"]),
]


def run_dev(args) -> int:
    from actors.service import serve
    from api.arvados.server import serve as serve_api
    from conf.loader import ConfigError, load
    root = state_root(getattr(args, "state_dir", None))
    try:
        cfg_path = ensure_state(root)
    except UnsafeState as e:
        print(f"dispatch-cloud: {e}", file=sys.stderr)
        return 1
    try:
        cluster = load(str(cfg_path))
    except ConfigError as e:
        print(f"dispatch-cloud: {e}", file=sys.stderr)
        return 1
    from conf import logsetup
    logsetup.configure(cluster, level_override=getattr(args, "log_level", None), dev=True)
    store = open_store(cluster, str(root / "containers.db"))
    if store.authenticate(cluster.system_root_token) is None:
        store.add_token(cluster.system_root_token, admin=True)
    host, port = _host_port(cluster.controller_url)
    try:
        api = serve_api(store, host, port)
    except OSError as e:
        print(f"dispatch-cloud: cannot listen on {cluster.controller_url} for the container API: {e}"
              " (is another dev cluster running?)", file=sys.stderr)
        return 1
    print(banner(cluster, cfg_path), file=sys.stderr, flush=True)
    demo = getattr(args, "demo", False)

    def on_ready(dispatcher, mgmt):
        if demo:
            threading.Thread(target=run_demo, args=(cluster,), name="demo", daemon=True).start()

    try:
        rc = serve(cluster, on_ready=on_ready, state_dir=str(root))
    finally:
        api.stop()
        if not getattr(args, "keep_vms", False):
            shutdown_vms(cluster)
        store.close()
    return rc


def open_store(cluster, path: str):
    """The dev container API's store, applying the cluster's API-server-side settings as Arvados'
    API server would: MaxDispatchAttempts, and AlwaysUsePreemptibleInstances for child containers
    (ignored when no instance type is preemptible; ``preemptible: true`` is then refused)."""
    from api.arvados.store import ContainerStore
    return ContainerStore(path, cluster_id=cluster.cluster_id,
                          max_dispatch_attempts=cluster.containers.max_dispatch_attempts,
                          always_use_preemptible_instances=cluster.containers.always_use_preemptible_instances,
                          preemptible_types=any(t.preemptible for t in cluster.instance_types.values()))


def _host_port(url: str) -> tuple[str, int]:
    from urllib.parse import urlsplit
    u = urlsplit(url)
    return u.hostname or "127.0.0.1", u.port or 80


def banner(cluster, cfg_path: Path) -> str:
    return "\n".join([
        "dispatch-cloud dev cluster",
        f"  config (tokens, mode 0600): {cfg_path}",
        f"  container API:  {cluster.controller_url}",
        f"  management API: {', '.join(cluster.dispatch_urls)}",
        "  try:  dispatch-cloud submit --wait -- echo hello",
        "        dispatch-cloud instance list --header",
        "  Ctrl-C stops everything.",
    ])


def shutdown_vms(cluster) -> None:
    """Destroy the dev VMs (after Ctrl-C nothing would watch them)."""
    from cloud.local import driver as local
    try:
        iset = local.driver(cluster.cloud_vms.driver_parameters, "dev-shutdown", cluster=cluster,
                            clock=None, logger=log)
        for inst in iset.instances({}):
            try:
                inst.destroy()
            except Exception as e:
                log.warning("could not shut down dev VM", extra={"Instance": inst.id, "error": str(e)})
        iset.stop()
    except Exception as e:
        log.warning("could not shut down dev VMs", extra={"error": str(e)})


def run_demo(cluster) -> None:
    """Queue a few containers of two sizes and report how each ends."""
    from api.arvados.client import ArvadosClient
    client = ArvadosClient(cluster.controller_url, cluster.system_root_token)
    uuids = {}
    for name, vcpus, ram, cmd in DEMO:
        ctr = client.create_container(container_fields(cmd, vcpus, ram << 20, 1, name))
        uuids[ctr["uuid"]] = name
        log.info("demo container queued", extra={"ContainerUUID": ctr["uuid"], "demo": name})
    pending = set(uuids)
    deadline = time.time() + 600
    while pending and time.time() < deadline:
        time.sleep(1)
        for uuid in sorted(pending):
            try:
                c = client.get_container(uuid)
            except Exception:
                continue
            if c["state"] in ("Complete", "Cancelled"):
                pending.discard(uuid)
                log.info("demo container finished", extra={
                    "ContainerUUID": uuid, "demo": uuids[uuid], "state": c["state"],
                    "exit_code": c.get("exit_code")})
    log.info("demo done; idle instances shut down after TimeoutIdle; Ctrl-C to stop")


# ---------------------------------------------------------------------------------------------
# `dispatch-cloud submit`


def container_fields(command: list[str], vcpus: int, ram: int, priority: int, name: str = "",
                     env: dict | None = None, cwd: str = "/tmp") -> dict:
    return {"command": list(command), "environment": env or {}, "cwd": cwd,
            "container_image": "local", "output_path": cwd, "priority": priority,
            "runtime_constraints": {"vcpus": vcpus, "ram": ram},
            "scheduling_parameters": {}, "mounts": {}}


def register(sub) -> None:
    p = sub.add_parser("submit", help="queue a container on the dev cluster (or --config's)")
    p.add_argument("--config", help="cluster config (default: the dev cluster's)")
    p.add_argument("--state-dir", help="dev cluster state directory")
    p.add_argument("--vcpus", type=int, default=1)
    p.add_argument("--ram", default="256MiB", help="RAM, e.g. 512MiB, 2GiB (default 256MiB)")
    p.add_argument("--priority", type=int, default=1)
    p.add_argument("--env", action="append", default=[], metavar="K=V")
    p.add_argument("--cwd", default="/tmp")
    p.add_argument("--wait", action="store_true", help="follow it; print state changes, output, exit code")
    p.add_argument("--timeout", type=float, default=3600.0, help="with --wait: give up after this many seconds")
    p.add_argument("cmd", nargs="+", metavar="-- CMD ARGS...")
    p.set_defaults(func=submit_command)


def submit_command(args) -> int:
    from api.arvados.client import ApiError, ArvadosClient
    from conf.loader import ConfigError, load
    from conf.units import parse_size
    try:
        path = args.config or find_config(args.state_dir)
    except UnsafeState as e:
        print(f"dispatch-cloud: {e}", file=sys.stderr)
        return 1
    if path is None:
        print("dispatch-cloud: no dev cluster found (start one with `dispatch-cloud run`) "
              "and no --config given", file=sys.stderr)
        return 1
    try:
        cluster = load(str(path))
        ram = parse_size(args.ram)
        env = dict(kv.split("=", 1) for kv in args.env)
    except ConfigError as e:
        print(f"dispatch-cloud: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"dispatch-cloud: bad --ram or --env: {e}", file=sys.stderr)
        return 2
    client = ArvadosClient(cluster.controller_url, cluster.system_root_token, retries=1)
    try:
        ctr = client.create_container(container_fields(args.cmd, args.vcpus, ram, args.priority,
                                                       env=env, cwd=args.cwd))
    except ApiError as e:
        print(f"dispatch-cloud: cannot queue the container: {e}", file=sys.stderr)
        return 1
    uuid = ctr["uuid"]
    print(uuid, flush=True)
    if not args.wait:
        return 0
    return follow(client, uuid, args.timeout)


def follow(client, uuid: str, timeout: float) -> int:
    """Print state changes until the container ends; then its stdout/stderr and exit code."""
    from api.arvados.client import ApiError
    last, deadline = None, time.time() + timeout
    while time.time() < deadline:
        try:
            c = client.get_container(uuid)
        except ApiError as e:
            print(f"dispatch-cloud: {e}", file=sys.stderr)
            time.sleep(1)
            continue
        if c["state"] != last:
            last = c["state"]
            print(f"{uuid} {last}", file=sys.stderr, flush=True)
        if last in ("Complete", "Cancelled"):
            rs = c.get("runtime_status") or {}
            for key, stream in (("stdoutPath", sys.stdout), ("stderrPath", sys.stderr)):
                try:
                    stream.write(Path(rs[key]).read_text())
                    stream.flush()
                except (KeyError, OSError):
                    pass
            if last == "Cancelled":
                why = rs.get("error") or "cancelled"
                print(f"{uuid} cancelled: {why}", file=sys.stderr)
                return 1
            code = c.get("exit_code")
            print(f"{uuid} exit code {code}", file=sys.stderr)
            return code if isinstance(code, int) and 0 <= code < 256 else 1
        time.sleep(0.5)
    print(f"dispatch-cloud: {uuid} still {last} after {timeout:.0f}s", file=sys.stderr)
    return 1
