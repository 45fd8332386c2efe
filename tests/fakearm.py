"""A fake Azure Resource Manager endpoint: the subset the Azure driver's SDK calls touch.

Served over real HTTP on 127.0.0.1 (port 0) so the SDK's own request, paging, retry and
long-running-operation code runs unchanged. It keeps NICs, VMs and managed disks in memory, answers
PUT/PATCH/DELETE as ARM does (201/200/202 + ``Azure-AsyncOperation``; the operation reports
``Succeeded`` after ``polls`` polls), pages lists with ``nextLink``, injects faults with ARM's error
bodies, and records every request so tests can assert what the SDK sent.

LRO responses carry ``Retry-After: <lro_retry_after>`` (whole seconds, as ARM sends; default 0).
azure-mgmt-core's ARMPolling treats 0 as "no hint" and falls back to the client's
``polling_interval``, so in-process tests build the driver with a tiny one; a subprocess using the
driver's defaults is better served by ``lro_retry_after="1"`` and ``polls=0``.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from urllib.parse import parse_qs

from api.wsgi import WsgiServer

KINDS = {
    "networkinterfaces": ("Microsoft.Network", "networkInterfaces"),
    "virtualmachines": ("Microsoft.Compute", "virtualMachines"),
    "disks": ("Microsoft.Compute", "disks"),
}
_RESOURCE = re.compile(r"^/subscriptions/([^/]+)/resourceGroups/([^/]+)/providers/([^/]+)/([^/]+)(?:/([^/]+))?/?$",
                       re.IGNORECASE)
_OPERATION = re.compile(r"^/fakearm/operations/([0-9a-f]+)$")


@dataclass
class Recorded:
    method: str
    path: str
    query: dict
    headers: dict
    body: object

    @property
    def kind(self) -> str:
        m = _RESOURCE.match(self.path)
        return m.group(4) if m else ""


@dataclass
class Fault:
    method: str
    kind: str  # "virtualMachines", "networkInterfaces", "disks"; "operations" (status polls), or
    # "operations:virtualMachines" (status polls of operations on VMs)
    status: int
    code: str
    message: str
    headers: dict = field(default_factory=dict)
    times: int = 1
    async_: bool = False  # accept the request, then fail the long-running operation


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat().replace("+00:00", "Z")


class FakeArm:
    """In-memory ARM. ``page_size`` bounds list pages; ``polls`` is how many polls an LRO takes."""

    def __init__(self, *, page_size: int = 100, polls: int = 2, now=time.time,
                 require_auth: bool = True, lro_retry_after: str = "0", ip_prefix: str = "10.1",
                 strict: bool = True):
        self.strict = strict  # validate api-versions and bodies as ARM does
        self.page_size = page_size
        self.lro_retry_after = lro_retry_after
        self.ip_prefix = ip_prefix
        self.polls = polls
        self.now = now
        self.require_auth = require_auth
        self.resources: dict[tuple[str, str, str], dict] = {}  # (kind, rg, name.lower()) -> json
        self.requests: list[Recorded] = []
        self.faults: list[Fault] = []
        self._ops: dict[str, dict] = {}
        self._ips = itertools.count(4)
        self._op_ids = itertools.count(1)
        self._lock = threading.RLock()
        self._server: WsgiServer | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> "FakeArm":
        self._server = WsgiServer(self, "127.0.0.1", 0, threads=4, name="fakearm").start()
        return self

    @property
    def url(self) -> str:
        return self._server.url.rstrip("/")

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- test helpers ---------------------------------------------------------------------------

    def fail(self, method: str, kind: str, status: int = 400, code: str = "BadRequest",
             message: str = "bad request", *, headers: dict | None = None, times: int = 1,
             async_: bool = False) -> None:
        """Make the next ``times`` ``method`` requests on ``kind`` fail like ARM would."""
        with self._lock:
            self.faults.append(Fault(method.upper(), kind.lower(), status, code, message,
                                     dict(headers or {}), times, async_))

    def of_kind(self, kind: str) -> list[dict]:
        with self._lock:
            return [copy.deepcopy(v) for (k, _, _), v in sorted(self.resources.items()) if k == kind.lower()]

    def get(self, kind: str, rg: str, name: str) -> dict | None:
        with self._lock:
            r = self.resources.get((kind.lower(), rg.lower(), name.lower()))
            return copy.deepcopy(r) if r else None

    def put_raw(self, kind: str, rg: str, name: str, resource: dict, sub: str = "sub") -> dict:
        """Store a resource as-is (plus id/name/type): leftovers, foreign VMs, odd shapes."""
        ns, typ = KINDS[kind.lower()]
        r = copy.deepcopy(resource)
        r.update(id=f"/subscriptions/{sub}/resourceGroups/{rg}/providers/{ns}/{typ}/{name}", name=name,
                 type=f"{ns}/{typ}")
        with self._lock:
            self.resources[(kind.lower(), rg.lower(), name.lower())] = r
        return r

    def set_vm_state(self, name: str, provisioning: str | None = None, power: str | None = None,
                     rg: str = "rg") -> None:
        """Show a VM as ARM does while it is ``Deleting`` or after it was ``deallocated``."""
        with self._lock:
            r = self.resources[("virtualmachines", rg.lower(), name.lower())]
            if provisioning:
                r["properties"]["provisioningState"] = provisioning
            if power:
                r["properties"]["instanceView"] = {"statuses": [
                    {"code": "ProvisioningState/succeeded"}, {"code": f"PowerState/{power}"}]}

    def evict(self, name: str, rg: str = "rg") -> None:
        """Evict a spot VM with evictionPolicy Delete: the VM and its OS disk go, the NIC stays."""
        with self._lock:
            vm = self.resources.pop(("virtualmachines", rg.lower(), name.lower()))
            disk = ((vm["properties"].get("storageProfile") or {}).get("osDisk") or {}).get("name")
            if disk:
                self.resources.pop(("disks", rg.lower(), disk.lower()), None)
            for (k, _, _), other in self.resources.items():
                if k == "networkinterfaces" and ((other.get("properties") or {}).get("virtualMachine") or {}).get(
                        "id", "").lower() == vm["id"].lower():
                    del other["properties"]["virtualMachine"]

    def sent(self, method: str | None = None, kind: str | None = None) -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if (method is None or r.method == method.upper())
                    and (kind is None or r.kind.lower() == kind.lower())]

    # -- WSGI -----------------------------------------------------------------------------------

    def __call__(self, environ, start_response):
        method = environ["REQUEST_METHOD"]
        path = environ.get("PATH_INFO", "")
        query = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
        headers = {k[5:].replace("_", "-").title(): v for k, v in environ.items() if k.startswith("HTTP_")}
        length = int(environ.get("CONTENT_LENGTH") or 0)
        raw = environ["wsgi.input"].read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode(errors="replace")
        base = f"{environ['wsgi.url_scheme']}://{environ['HTTP_HOST']}"
        with self._lock:
            self.requests.append(Recorded(method, path, query, headers, body))
            status, out_headers, out = self._handle(method, path, query, headers, body, base)
        data = b"" if out is None else json.dumps(out).encode()
        hdrs = [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
        hdrs += [(k, str(v)) for k, v in out_headers.items()]
        start_response(f"{status} {_REASONS.get(status, 'Status')}", hdrs)
        return [data]

    def _handle(self, method, path, query, headers, body, base):
        if self.require_auth and not headers.get("Authorization", "").startswith("Bearer "):
            return _error(401, "AuthenticationFailed", "Authentication failed: no bearer token.")
        m = _OPERATION.match(path)
        if m and method == "GET":
            return self._poll(m.group(1))
        m = _RESOURCE.match(path)
        if not m or m.group(4).lower() not in KINDS:
            return _error(404, "InvalidResourceType", f"The resource type could not be found: {path}")
        if "api-version" not in query:
            return _error(400, "MissingApiVersionParameter",
                          "The api-version query parameter (?api-version=) is required for all requests.")
        sub, rg, _, kind, name = m.groups()
        kind = kind.lower()
        if self.strict and query["api-version"] not in API_VERSIONS[kind]:
            return _error(400, "InvalidApiVersionParameter",
                          f"The api-version '{query['api-version']}' is invalid. The supported versions are "
                          f"'{','.join(sorted(API_VERSIONS[kind]))}'.")
        fault = self._take_fault(method, kind)
        if fault is not None and not fault.async_:
            return _error(fault.status, fault.code, fault.message, fault.headers)
        ctx = _Ctx(base, sub, rg, kind, query["api-version"], fault)
        if name is None:
            if method != "GET":
                return _error(405, "MethodNotAllowed", f"{method} not allowed on a collection")
            return self._list(ctx, path, query)
        key = (kind, rg.lower(), name.lower())
        if method == "GET":
            r = self.resources.get(key)
            return (200, {}, _public(r)) if r else _not_found(kind, name)
        if method == "PUT":
            problem = validate_put(kind, name, body) if self.strict else None
            if problem:
                return _error(400, *problem)
            return self._put(ctx, key, name, body or {})
        if method == "PATCH":
            r = self.resources.get(key)
            if not r:
                return _not_found(kind, name)
            problem = validate_tags((body or {}).get("tags")) if self.strict and isinstance(body, dict) else None
            if problem:
                return _error(400, *problem)
            if isinstance(body, dict) and "tags" in body:
                r["tags"] = dict(body["tags"] or {})
            return self._lro(ctx, 200, r, "Updating")
        if method == "DELETE":
            return self._delete(ctx, key, name)
        return _error(405, "MethodNotAllowed", method)

    def _take_fault(self, method, kind):
        for f in self.faults:
            if f.method == method and f.kind == kind:
                f.times -= 1
                if f.times <= 0:
                    self.faults.remove(f)
                return f
        return None

    def _list(self, ctx, path, query):
        items = [_public(v) for (k, rg, _), v in sorted(self.resources.items()) if k == ctx.kind and rg == ctx.rg.lower()]
        start = int(query.get("$skiptoken", "0"))
        page = items[start:start + self.page_size]
        out = {"value": page}
        if start + self.page_size < len(items):
            out["nextLink"] = f"{ctx.base}{path}?api-version={ctx.api_version}&$skiptoken={start + self.page_size}"
        return 200, {}, out

    def _put(self, ctx, key, name, body):
        ns, typ = KINDS[ctx.kind]
        rid = f"/subscriptions/{ctx.sub}/resourceGroups/{ctx.rg}/providers/{ns}/{typ}/{name}"
        existed = key in self.resources
        r = copy.deepcopy(body)
        r.update(id=rid, name=name, type=f"{ns}/{typ}")
        props = r.setdefault("properties", {})
        if ctx.kind == "networkinterfaces":
            for i, ipc in enumerate(props.get("ipConfigurations", [])):
                ipc["id"] = f"{rid}/ipConfigurations/{ipc.get('name', 'ip' + str(i))}"
                p = ipc.setdefault("properties", {})
                n = next(self._ips)
                p.setdefault("privateIPAddress", f"{self.ip_prefix}.{n // 250}.{n % 250 + 2}")
                p.setdefault("primary", i == 0)
                p["provisioningState"] = "Succeeded"
        elif ctx.kind == "virtualmachines":
            refs = (props.get("networkProfile") or {}).get("networkInterfaces") or []
            for ref in refs:
                nic = self._by_id(ref.get("id", ""))
                if nic is None:
                    return _error(400, "InvalidResourceReference",
                                  f"Resource {ref.get('id')} referenced by resource {rid} was not found.")
                nic.setdefault("properties", {})["virtualMachine"] = {"id": rid}
            props["vmId"] = f"vm-{next(self._op_ids):08d}"
            os_disk = (props.get("storageProfile") or {}).get("osDisk") or {}
            if os_disk.get("name") and "vhd" not in os_disk:
                self.put_raw("disks", ctx.rg, os_disk["name"], {
                    "location": r.get("location"), "managedBy": rid, "tags": {},
                    "properties": {"diskState": "Attached", "timeCreated": iso(self.now()), "osType": "Linux"}},
                    sub=ctx.sub)
        self.resources[key] = r
        return self._lro(ctx, 200 if existed else 201, r, "Updating" if existed else "Creating")

    def _delete(self, ctx, key, name):
        r = self.resources.get(key)
        if r is None:
            return 204, {}, None
        if ctx.kind == "networkinterfaces" and (r.get("properties") or {}).get("virtualMachine"):
            return _error(400, "NicInUse", f"Network Interface {r['id']} is used by existing resource "
                          f"{r['properties']['virtualMachine']['id']}. In order to delete the network "
                          "interface, it must be dissociated from the resource.")
        if ctx.kind == "disks" and r.get("managedBy"):
            return _error(409, "OperationNotAllowed", f"Disk {name} is attached to VM {r['managedBy']}.")
        del self.resources[key]
        if ctx.kind == "virtualmachines":
            for (k, _, _), other in self.resources.items():
                if k == "networkinterfaces" and ((other.get("properties") or {}).get("virtualMachine") or {}).get(
                        "id", "").lower() == r["id"].lower():
                    del other["properties"]["virtualMachine"]
                if k == "disks" and (other.get("managedBy") or "").lower() == r["id"].lower():
                    other.pop("managedBy", None)
                    other["properties"]["diskState"] = "Unattached"
        return self._lro(ctx, 202, None, None)

    def _lro(self, ctx, status, resource, state):
        op = f"{next(self._op_ids):016x}"
        error = None
        if ctx.fault is not None:  # an async fault: the operation fails after polling
            error = {"code": ctx.fault.code, "message": ctx.fault.message}
        self._ops[op] = {"left": self.polls, "resource": resource, "error": error, "kind": ctx.kind}
        if resource is not None:
            resource.setdefault("properties", {})["provisioningState"] = state
        url = f"{ctx.base}/fakearm/operations/{op}?api-version={ctx.api_version}"
        headers = {"Azure-AsyncOperation": url, "Retry-After": self.lro_retry_after}
        if status == 202:
            headers["Location"] = url
        return status, headers, (_public(resource) if resource is not None else None)

    def _poll(self, op_id):
        op = self._ops.get(op_id)
        if op is None:
            return _error(404, "OperationNotFound", op_id)
        fault = self._take_fault("GET", "operations:" + op["kind"]) or self._take_fault("GET", "operations")
        if fault is not None:  # a throttled or failing status poll; the operation goes on
            return _error(fault.status, fault.code, fault.message, fault.headers)
        if op["left"] > 0:
            op["left"] -= 1
            return 200, {"Retry-After": self.lro_retry_after}, {"status": "InProgress"}
        res = op["resource"]
        # ARM sends Retry-After on every operation-status answer, the final one included
        hdrs = {"Retry-After": self.lro_retry_after}
        if op["error"]:
            if res is not None:
                res["properties"]["provisioningState"] = "Failed"
            return 200, hdrs, {"status": "Failed", "error": op["error"]}
        if res is not None:
            res["properties"]["provisioningState"] = "Succeeded"
        return 200, hdrs, {"status": "Succeeded"}

    def _by_id(self, rid: str) -> dict | None:
        for r in self.resources.values():
            if r["id"].lower() == rid.lower():
                return r
        return None


# --- what ARM refuses ------------------------------------------------------------------------------
# api-versions ARM publishes for each resource type (azure-rest-api-specs), including those the
# azure-mgmt-compute/-network releases setup.py allows send.
API_VERSIONS = {
    "virtualmachines": {
        "2015-06-15", "2016-03-30", "2016-04-30-preview", "2017-03-30", "2017-12-01", "2018-04-01",
        "2018-06-01", "2018-10-01", "2019-03-01", "2019-07-01", "2019-12-01", "2020-06-01",
        "2020-12-01", "2021-03-01", "2021-04-01", "2021-07-01", "2021-11-01", "2022-03-01",
        "2022-08-01", "2022-11-01", "2023-03-01", "2023-07-01", "2023-09-01", "2024-03-01",
        "2024-07-01", "2024-11-01", "2025-04-01", "2025-11-01", "2026-04-01"},
    "disks": {
        "2016-04-30-preview", "2017-03-30", "2018-04-01", "2018-06-01", "2018-09-30", "2019-03-01",
        "2019-07-01", "2019-11-01", "2020-05-01", "2020-06-30", "2020-09-30", "2020-12-01",
        "2021-04-01", "2021-08-01", "2021-12-01", "2022-03-02", "2022-07-02", "2023-01-02",
        "2023-04-02", "2023-10-02", "2024-03-02", "2025-01-02", "2026-03-02"},
    "networkinterfaces": {
        "2015-06-15", "2016-03-30", "2016-06-01", "2016-09-01", "2016-12-01", "2017-03-01",
        "2017-06-01", "2017-08-01", "2017-09-01", "2017-10-01", "2017-11-01", "2018-01-01",
        "2018-02-01", "2018-04-01", "2018-06-01", "2018-07-01", "2018-08-01", "2018-10-01",
        "2018-11-01", "2018-12-01", "2019-02-01", "2019-04-01", "2019-06-01", "2019-07-01",
        "2019-08-01", "2019-09-01", "2019-11-01", "2019-12-01", "2020-03-01", "2020-04-01",
        "2020-05-01", "2020-06-01", "2020-07-01", "2020-08-01", "2020-11-01", "2021-02-01",
        "2021-03-01", "2021-05-01", "2021-08-01", "2022-01-01", "2022-05-01", "2022-07-01",
        "2022-09-01", "2022-11-01", "2023-02-01", "2023-04-01", "2023-05-01", "2023-06-01",
        "2023-09-01", "2023-11-01", "2024-01-01", "2024-03-01", "2024-05-01", "2024-07-01",
        "2024-10-01", "2025-01-01", "2025-03-01", "2025-05-01", "2025-07-01", "2026-03-01"},
}
ENUMS = {  # JSON path below "properties" -> accepted values (ARM compares case-insensitively)
    "priority": {"Regular", "Low", "Spot"},
    "evictionPolicy": {"Deallocate", "Delete"},
    "storageProfile.osDisk.createOption": {"FromImage", "Empty", "Attach", "Copy", "Restore"},
    "storageProfile.osDisk.osType": {"Windows", "Linux"},
}
_VM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}[A-Za-z0-9_]$|^[A-Za-z0-9]$")
_NIC_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,78}[A-Za-z0-9_]$|^[A-Za-z0-9]$")
_LINUX_COMPUTER_NAME = re.compile(r"^(?![0-9]+$)[A-Za-z0-9][A-Za-z0-9.-]{0,63}$")
_TAG_KEY_FORBIDDEN = set("<>%&\\?/")
_RESERVED_TAG_PREFIXES = ("microsoft", "azure", "windows")


def _at(d, path: str):
    for part in path.split("."):
        if not isinstance(d, dict):
            return None
        d = d.get(part)
    return d


def validate_tags(tags) -> tuple[str, str] | None:
    """ARM's tag rules: at most 50; names up to 512 characters without < > % & \\ ? / and not
    starting with microsoft, azure or windows; values up to 256 characters."""
    if tags is None:
        return None
    if not isinstance(tags, dict):
        return "InvalidTemplate", "tags must be an object"
    if len(tags) > 50:
        return "InvalidTagCount", f"Resource has {len(tags)} tags; at most 50 are allowed."
    for k, v in tags.items():
        if not k or len(k) > 512 or _TAG_KEY_FORBIDDEN & set(k):
            return "InvalidTagNameCharacters", f"The tag name '{k}' has invalid characters or length."
        if k.lower().startswith(_RESERVED_TAG_PREFIXES):
            return "InvalidTagName", f"The tag name '{k}' uses a reserved prefix."
        if not isinstance(v, str) or len(v) > 256:
            return "InvalidTagValueLength", f"The value of tag '{k}' is longer than 256 characters."
    return None


def validate_put(kind: str, name: str, body) -> tuple[str, str] | None:
    """(code, message) of the 400 ARM answers to this PUT body, or None if it would accept it."""
    if not isinstance(body, dict):
        return "InvalidRequestContent", "The request content was invalid and could not be deserialized."
    if not body.get("location"):
        return "LocationRequired", "The location property is required for this definition."
    problem = validate_tags(body.get("tags"))
    if problem:
        return problem
    props = body.get("properties") or {}
    if kind == "networkinterfaces":
        if not _NIC_NAME.match(name):
            return "InvalidResourceName", f"Resource name {name} is invalid."
        ipcs = props.get("ipConfigurations") or []
        if not ipcs:
            return "InvalidRequestFormat", "A network interface needs at least one IP configuration."
        for ipc in ipcs:
            p = ipc.get("properties") or {}
            if not ipc.get("name") or not _at(p, "subnet.id"):
                return "InvalidRequestFormat", "Each IP configuration needs a name and a subnet id."
            method = p.get("privateIPAllocationMethod")
            if method is not None and method.lower() not in ("static", "dynamic"):
                return "InvalidRequestFormat", f"Value '{method}' is not a valid IPAllocationMethod."
        return None
    if kind != "virtualmachines":
        return None
    if not _VM_NAME.match(name):
        return "InvalidResourceName", f"Resource name {name} is invalid (1-64 characters, ...)."
    if not _at(props, "hardwareProfile.vmSize"):
        return "InvalidParameter", "Required parameter 'hardwareProfile.vmSize' is missing (null)."
    for path, allowed in ENUMS.items():
        v = _at(props, path)
        if v is not None and str(v).lower() not in {a.lower() for a in allowed}:
            return "InvalidParameter", f"The value '{v}' of parameter '{path}' is not allowed."
    if not (_at(props, "networkProfile.networkInterfaces") or []):
        return "InvalidParameter", "Required parameter 'networkProfile.networkInterfaces' is missing."
    if str(_at(props, "storageProfile.osDisk.createOption") or "").lower() == "fromimage":
        if not _at(props, "storageProfile.imageReference") and not _at(props, "storageProfile.osDisk.image"):
            return "InvalidParameter", "Required parameter 'imageReference' is missing (null)."
        osp = props.get("osProfile") or {}
        for field in ("adminUsername", "computerName"):
            if not osp.get(field):
                return "InvalidParameter", f"Required parameter 'osProfile.{field}' is missing (null)."
        if not _LINUX_COMPUTER_NAME.match(osp["computerName"]):
            return "InvalidParameter", ("Linux host name cannot exceed 64 characters in length or contain "
                                        "the following characters: ` ~ ! @ # $ % ^ & * ( ) = + _ [ ] { } "
                                        "\\ | ; : ' \" , < > / ?.")
        linux = osp.get("linuxConfiguration") or {}
        if linux.get("disablePasswordAuthentication") and not (_at(linux, "ssh.publicKeys") or []) \
                and not osp.get("adminPassword"):
            return "InvalidParameter", ("Authentication using either SSH or by user name and password must "
                                        "be enabled in Linux profile.")
    spot = str(props.get("priority") or "Regular").lower() in ("spot", "low")
    if not spot and (props.get("evictionPolicy") is not None or props.get("billingProfile") is not None):
        return "InvalidParameter", ("Eviction policy and billing profile can be set only on Azure Spot "
                                    "Virtual Machines.")
    return None


@dataclass(frozen=True)
class _Ctx:
    base: str
    sub: str
    rg: str
    kind: str
    api_version: str
    fault: Fault | None


def _public(r: dict | None) -> dict | None:
    """What ARM shows: never the custom data it was given."""
    if r is None:
        return None
    out = copy.deepcopy(r)
    osp = (out.get("properties") or {}).get("osProfile")
    if isinstance(osp, dict):
        osp.pop("customData", None)
    return out


def _error(status, code, message, headers=None):
    return status, dict(headers or {}), {"error": {"code": code, "message": message}}


def _not_found(kind, name):
    return _error(404, "ResourceNotFound", f"The Resource '{KINDS[kind][0]}/{KINDS[kind][1]}/{name}' "
                  "under resource group was not found.")


_REASONS = {200: "OK", 201: "Created", 202: "Accepted", 204: "No Content", 400: "Bad Request",
            401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed", 409: "Conflict",
            429: "Too Many Requests", 500: "Internal Server Error", 503: "Service Unavailable"}
