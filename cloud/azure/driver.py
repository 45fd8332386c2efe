"""The Azure driver: VMs and NICs through azure-mgmt-compute / azure-mgmt-network.

Behaviour follows Arvados ``lib/cloud/azure`` (names, tags, custom data, garbage collection), with
these deliberate differences:

* a 429 without Retry-After is a RateLimitError for 20 s (Arvados panics);
* allocation failures (AllocationFailed, SkuNotAvailable, ...) are CapacityErrors for the type
  (Arvados has no capacity errors on Azure);
* spot types have their own quota group ``"spot"`` (Azure counts spot vCPUs separately);
* orphan OS disks are collected in ResourceGroup, where they are created (Arvados looks in the
  image resource group);
* errors of long-running operations are never ignored; a VM create that ARM rejected or reported
  Failed deletes the VM (if ARM kept one) before its NIC, which Azure refuses to delete while
  attached. Throttled (429) or failing (5xx) status polls are retried until the operation's
  timeout, as go-autorest does (Retry-After, else 60 s), and a create whose polling gave up deletes
  nothing: the VM carries its tags, so the next listing adopts it (cloud/azure/polling.py);
* the unmanaged-VHD image mode (an ``https://`` ImageID, StorageAccount/BlobContainer) is rejected
  by ``check-config``: Azure retired unmanaged disks in September 2025;
* spot quota errors ("Low Priority Cores quota") block only the ``spot`` quota group;
* ``check-config`` rejects ``DeployPublicKey: false`` and a missing DispatchPrivateKey: Azure
  creates Linux VMs with password login disabled, so a VM without the key fails with 400;
* stop() abandons in-flight waits: a create then raises CloudError, and a VM ARM still finishes
  carries its tags, so the next dispatcher adopts it like any VM it did not create itself.

Against a loopback ``http://`` ResourceManagerEndpoint (tests, rehearsals with a fake ARM) no AAD
is reachable, so a static bearer token is used instead of ClientSecretCredential.
"""

from __future__ import annotations

import base64
import logging
import re
import secrets
import threading
import time
from datetime import datetime, timezone

from azure.core.credentials import AccessToken
from azure.core.exceptions import ResourceNotFoundError
from azure.core.pipeline.policies import RetryPolicy, SansIOHTTPPolicy
from azure.mgmt.compute import ComputeManagementClient
from azure.mgmt.compute import models as cm
from azure.mgmt.network import NetworkManagementClient
from azure.mgmt.network import models as nm

from cloud.azure import errors as azure_errors
from cloud.azure.config import RETIRED_VHD, AzureConfig, AzureConfigError, parse
from cloud.azure.polling import GO_POLLING_DELAY, PatientARMPolling
from cloud.base import CloudError, NotSupported
from conf.model import InstanceType

__all__ = ["driver", "check_params", "AzureInstanceSet", "AzureInstance", "AzureConfigError", "custom_data",
           "rfc3339nano", "parse_rfc3339"]

NAME_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
DISK_GC_INTERVAL = 300.0  # seconds of the driver's clock between orphan-disk sweeps
DEFAULT_OP_TIMEOUT = 20 * 60.0  # one long-running ARM operation (a VM create takes minutes)
# Poll interval when ARM sends no Retry-After: go-autorest's 60 s (ARM normally sends one).
DEFAULT_POLLING_INTERVAL = GO_POLLING_DELAY
CREATED_AT = "created-at"


# ---------------------------------------------------------------------------------------------
# Pure helpers


def custom_data(init_command: str) -> str:
    """What cloud-init runs at first boot, base64 as ARM wants it."""
    return base64.b64encode(("#!/bin/sh\n" + init_command + "\n").encode()).decode()


def rfc3339nano(t: float) -> str:
    """Go's ``time.RFC3339Nano`` in UTC (trailing fractional zeros dropped)."""
    ns = round(t * 1e6) * 1000  # a float holds microseconds at best
    sec, frac = divmod(ns, 10**9)
    base = datetime.fromtimestamp(sec, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    f = f"{frac:09d}".rstrip("0")
    return f"{base}.{f}Z" if f else f"{base}Z"


def parse_rfc3339(s: str) -> float | None:
    """Unix time of an RFC 3339 timestamp (any fraction length, any offset); None if unparseable."""
    m = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", s.strip())
    if not m:
        return None
    try:
        dt = datetime.fromisoformat(m.group(1) + (m.group(3) if m.group(3) != "Z" else "+00:00"))
    except ValueError:
        return None
    return dt.timestamp() + (float("0." + m.group(2)) if m.group(2) else 0.0)


def _timestamp(v) -> float | None:
    if v is None:
        return None
    if isinstance(v, datetime):
        return (v if v.tzinfo else v.replace(tzinfo=timezone.utc)).timestamp()
    return parse_rfc3339(str(v))


def is_vhd_uri(image_id: str) -> bool:
    return bool(re.match(r"^https?://", image_id or ""))


def check_params(params, cluster) -> None:
    """:mod:`cloud.drivers` hook, run by ``check-config``, ``cloudtest`` and ``run``: the
    DriverParameters (so check-config rejects what :func:`driver` would), and the parts of CloudVMs
    a VM create depends on. ValueError naming the key."""
    from conf.model import thaw
    parse(thaw(params or {}))
    vms = cluster.cloud_vms
    if not vms.deploy_public_key or not cluster.containers.dispatch_private_key:
        key = "DeployPublicKey" if not vms.deploy_public_key else "DispatchPrivateKey"
        where = "Containers.CloudVMs.DeployPublicKey" if key == "DeployPublicKey" else "Containers.DispatchPrivateKey"
        raise AzureConfigError(f"{where}: the azure driver needs DeployPublicKey: true and a DispatchPrivateKey "
                               "(Azure creates Linux VMs with password login disabled, so a VM without the "
                               "dispatcher's SSH key is refused with HTTP 400)")
    if is_vhd_uri(vms.image_id):
        raise AzureConfigError(f"Containers.CloudVMs.ImageID: is a VHD URI: {RETIRED_VHD}")


# ---------------------------------------------------------------------------------------------
# SDK plumbing


class StaticTokenCredential:
    """A TokenCredential for a loopback fake ARM, where no AAD endpoint exists."""

    def __init__(self, token: str = "loopback-fake-arm-token"):
        self._token = token

    def get_token(self, *scopes, **kwargs) -> AccessToken:
        return AccessToken(self._token, int(time.time()) + 3600)


class _LoopbackBearerPolicy(SansIOHTTPPolicy):
    """Sends the static token over plain http (azure-core's bearer policy insists on https)."""

    def __init__(self, credential, scope: str):
        self._credential = credential
        self._scope = scope

    def on_request(self, request):
        request.http_request.headers["Authorization"] = "Bearer " + self._credential.get_token(self._scope).token


class _ShortRetryPolicy(RetryPolicy):
    """Retry transient 5xx/connection errors a little; hand rate limits to the dispatcher at once.

    azure-core's default retries 429 about ten times, sleeping Retry-After each time, which would hide
    the rate limit from the dispatcher's throttle for minutes.
    """

    def is_retry(self, settings, response):
        r = response.http_response
        if r.status_code == 429 or (r.status_code >= 400 and r.headers.get("Retry-After")):
            return False
        return super().is_retry(settings, response)


def make_clients(cfg: AzureConfig, *, polling_interval: float = DEFAULT_POLLING_INTERVAL):
    """(compute, network, credential) clients, all pointed at ``cfg.arm_endpoint``."""
    scope = cfg.arm_endpoint + "/.default"
    common = {
        "base_url": cfg.arm_endpoint,
        "credential_scopes": [scope],
        "retry_policy": _ShortRetryPolicy(retry_total=2, retry_connect=2, retry_read=1, retry_status=2,
                                          retry_backoff_factor=0.5, retry_backoff_max=4),
        "connection_timeout": 10,
        "read_timeout": 120,
        "polling_interval": polling_interval,
    }
    if cfg.arm_is_loopback_http:
        credential = StaticTokenCredential()
        common["authentication_policy"] = _LoopbackBearerPolicy(credential, scope)
    else:
        from azure.identity import ClientSecretCredential
        credential = ClientSecretCredential(cfg.tenant_id, cfg.client_id, cfg.client_secret,
                                            authority=cfg.aad_authority)
    compute = ComputeManagementClient(credential, cfg.subscription_id, **common)
    network = NetworkManagementClient(credential, cfg.subscription_id, **common)
    return compute, network, credential


# ---------------------------------------------------------------------------------------------
# The driver


def driver(params, set_id: str, *, cluster=None, clock=None, logger=None,
           polling_interval: float = DEFAULT_POLLING_INTERVAL, op_timeout: float = DEFAULT_OP_TIMEOUT,
           clients=None) -> "AzureInstanceSet":
    """An :class:`AzureInstanceSet` for raw DriverParameters; AzureConfigError names a bad key."""
    cfg = parse(params)
    if clock is None:
        from cloud.clock import SystemClock
        clock = SystemClock()
    logger = logger or logging.getLogger("cloud.azure.driver")
    compute, network, _ = clients or make_clients(cfg, polling_interval=polling_interval)
    return AzureInstanceSet(cfg, set_id, compute=compute, network=network, clock=clock, logger=logger,
                            op_timeout=op_timeout, polling_interval=polling_interval)


class AzureInstanceSet:
    """Creates and lists this dispatcher's VMs in one resource group; collects leftover NICs/disks."""

    def __init__(self, cfg: AzureConfig, set_id: str, *, compute, network, clock, logger,
                 op_timeout: float = DEFAULT_OP_TIMEOUT, polling_interval: float = DEFAULT_POLLING_INTERVAL):
        self.cfg = cfg
        self.set_id = set_id
        self.name_prefix = f"compute-{set_id}-"
        self._compute = compute
        self._network = network
        self._clock = clock
        self._log = logger
        self._op_timeout = op_timeout
        self._polling_interval = polling_interval  # also the wait after a throttled/failed poll
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._creating: set[str] = set()  # names whose NIC may legitimately be unattached
        self._next_disk_gc = clock.now()

    # -- helpers ---------------------------------------------------------------------------

    def _error(self, err: BaseException, doing: str) -> CloudError:
        typed = azure_errors.wrap(err, self._clock.now(), doing)
        self._log.warning("azure call failed", extra={"operation": doing, "error": str(typed),
                                                       "errorClass": type(typed).__name__})
        return typed

    def _polling(self, deadline: float) -> PatientARMPolling:
        return PatientARMPolling(self._polling_interval, deadline=deadline, retry_delay=self._polling_interval,
                                 stopping=self._stopping.is_set,
                                 path_format_arguments={"endpoint": self.cfg.arm_endpoint})

    def _wait(self, start, doing: str):
        """Start a long-running operation (``start(polling)``) and wait for it, bounded and
        abandoned on stop(). A raised CloudError carries ``arm_outcome``: "rejected" (the request
        itself failed), "failed" (ARM reported the operation Failed/Canceled) or "unknown" (polling
        gave up: the operation may still succeed, so nothing may be deleted on its account)."""
        outcome, polling = "rejected", None
        try:
            deadline = time.monotonic() + self._op_timeout
            polling = self._polling(deadline)
            poller = start(polling)
            outcome = "unknown"
            while not poller.done():
                if self._stopping.is_set():
                    raise CloudError(f"{doing}: abandoned because the instance set is stopping")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CloudError(f"{doing}: no result after {self._op_timeout:g}s")
                poller.wait(min(0.2, left))
            return poller.result()
        except Exception as e:
            if polling is not None and polling.terminal_failure:
                outcome = "failed"
            if self._stopping.is_set() and not isinstance(e, CloudError):
                e = CloudError(f"{doing}: abandoned because the instance set is stopping ({type(e).__name__})")
            typed = self._error(e, doing)
            typed.arm_outcome = outcome
            raise typed from e

    def _fire(self, start, doing: str, **fields) -> bool:
        """Send one request of a long-running operation without polling it (cleanup, GC)."""
        try:
            start()
            return True
        except ResourceNotFoundError:
            return True
        except Exception as e:
            self._log.warning("azure cleanup call failed", extra={"operation": doing, "error": str(
                azure_errors.wrap(e, self._clock.now(), doing)), **fields})
            return False

    def _image_profile(self, name: str, image_id: str) -> cm.StorageProfile:
        cfg = self.cfg
        os_disk = {"os_type": "Linux", "name": name + "-os", "create_option": "FromImage"}
        if is_vhd_uri(image_id):
            raise CloudError(f"ImageID {image_id!r} is a VHD URI: {RETIRED_VHD}")
        base = f"/subscriptions/{cfg.subscription_id}/resourceGroups/{cfg.effective_image_resource_group}"
        if cfg.shared_image_gallery_name:
            image = (f"{base}/providers/Microsoft.Compute/galleries/{cfg.shared_image_gallery_name}/"
                     f"images/{image_id}/versions/{cfg.shared_image_gallery_image_version}")
        else:
            image = f"{base}/providers/Microsoft.Compute/images/{image_id}"
        return cm.StorageProfile(image_reference=cm.ImageReference(id=image), os_disk=cm.OSDisk(**os_disk))

    # -- InstanceSet -----------------------------------------------------------------------

    def create(self, it: InstanceType, image_id: str, tags, init_command: str,
               public_key: str | None) -> "AzureInstance":
        if it.added_scratch > 0:
            raise CloudError(f"cannot create instance type {it.name!r}: driver does not implement "
                             f"non-zero AddedScratch ({it.added_scratch})")
        if not image_id:
            raise CloudError("CloudVMs.ImageID is empty: the azure driver needs an image to create a VM")
        if self._stopping.is_set():
            raise CloudError("create called after stop")
        cfg = self.cfg
        name = self.name_prefix + "".join(secrets.choice(NAME_ALPHABET) for _ in range(15))
        all_tags = {**tags, CREATED_AT: rfc3339nano(self._clock.now())}
        storage = self._image_profile(name, image_id)
        log_fields = {"InstanceName": name, "InstanceType": it.name, "ProviderType": it.provider_type,
                      "Preemptible": it.preemptible}
        self._log.info("creating azure instance", extra=log_fields)
        with self._lock:
            self._creating.add(name)
        try:
            nic_params = nm.NetworkInterface(
                location=cfg.location, tags=all_tags,
                ip_configurations=[nm.NetworkInterfaceIPConfiguration(
                    name="ip1", subnet=nm.Subnet(id=cfg.subnet_id), private_ip_allocation_method="Dynamic")])
            nic = self._wait(lambda polling: self._network.network_interfaces.begin_create_or_update(
                cfg.resource_group, name + "-nic", nic_params, polling=polling), f"create NIC {name}-nic")
            linux = cm.LinuxConfiguration(disable_password_authentication=True)
            if public_key:
                linux.ssh = cm.SshConfiguration(public_keys=[cm.SshPublicKey(
                    path=f"/home/{cfg.admin_username}/.ssh/authorized_keys", key_data=public_key.strip())])
            vm_params = cm.VirtualMachine(
                location=cfg.location, tags=all_tags,
                hardware_profile=cm.HardwareProfile(vm_size=it.provider_type),
                storage_profile=storage,
                network_profile=cm.NetworkProfile(network_interfaces=[
                    cm.NetworkInterfaceReference(id=nic.id, primary=True)]),
                os_profile=cm.OSProfile(computer_name=name, admin_username=cfg.admin_username,
                                        custom_data=custom_data(init_command), linux_configuration=linux))
            if it.preemptible:
                vm_params.priority = "Spot"
                vm_params.eviction_policy = "Delete"
                vm_params.billing_profile = cm.BillingProfile(max_price=-1)
            try:
                vm = self._wait(lambda polling: self._compute.virtual_machines.begin_create_or_update(
                    cfg.resource_group, name, vm_params, polling=polling), f"create VM {name}")
            except CloudError as e:
                if getattr(e, "arm_outcome", "rejected") == "unknown":
                    # Go never deletes on a poll error: ARM may still be building the VM, which
                    # carries our tags, so the next listing adopts it if it comes up
                    self._log.warning("VM create outcome unknown; leaving it to the next listing",
                                      extra={**log_fields, "error": str(e)})
                    raise
                self._log.warning("VM create failed; deleting its NIC", extra={**log_fields, "error": str(e)})
                self._cleanup_failed(name)
                raise
        finally:
            with self._lock:
                self._creating.discard(name)
        self._log.info("created azure instance", extra={**log_fields, "Instance": vm.id})
        return AzureInstance(self, vm, nic)

    def _cleanup_failed(self, name: str) -> None:
        """Remove what a failed create left: a VM in state Failed (if ARM kept one), then the NIC."""
        rg = self.cfg.resource_group
        try:
            poller = self._compute.virtual_machines.begin_delete(rg, name)
            deadline = time.monotonic() + min(self._op_timeout, 300)
            while not poller.done() and time.monotonic() < deadline and not self._stopping.is_set():
                poller.wait(0.2)
            if poller.done():
                poller.result()
        except ResourceNotFoundError:
            pass
        except Exception as e:
            self._log.warning("could not delete VM of failed create", extra={
                "InstanceName": name, "error": str(azure_errors.wrap(e, self._clock.now(), "delete VM"))})
        self._fire(lambda: self._network.network_interfaces.begin_delete(rg, name + "-nic", polling=False),
                   f"delete NIC {name}-nic", InstanceName=name)

    def instances(self, tags) -> list["AzureInstance"]:
        """Every VM in ResourceGroup (the wrapper filters by tag), with addresses from our NICs."""
        now = self._clock.now()
        rg = self.cfg.resource_group
        nics = self._manage_nics(now)
        try:
            vms = list(self._compute.virtual_machines.list(rg))
        except Exception as e:
            raise self._error(e, "list VMs") from e
        with self._lock:
            sweep_disks = now >= self._next_disk_gc
            if sweep_disks:
                self._next_disk_gc = now + DISK_GC_INTERVAL
        if sweep_disks:
            self._manage_disks(now)
        out = []
        for vm in vms:
            nic = None
            refs = (vm.network_profile.network_interfaces or []) if vm.network_profile else []
            if refs and refs[0].id:
                nic = nics.get(refs[0].id.lower())
            out.append(AzureInstance(self, vm, nic))
        return out

    def _manage_nics(self, now: float) -> dict:
        """Our attached NICs by lower-cased id; starts deleting unattached ones past their age."""
        try:
            listed = list(self._network.network_interfaces.list(self.cfg.resource_group))
        except Exception as e:
            raise self._error(e, "list NICs") from e
        attached = {}
        with self._lock:
            creating = {n + "-nic" for n in self._creating}
        for nic in listed:
            name = nic.name or ""
            if not name.startswith(self.name_prefix):
                continue
            if nic.virtual_machine is not None:
                attached[(nic.id or "").lower()] = nic
                continue
            born = parse_rfc3339((nic.tags or {}).get(CREATED_AT, ""))
            if name in creating or born is None or now - born < self.cfg.delete_dangling_resources_after:
                continue
            self._log.info("deleting dangling NIC", extra={"NIC": name, "ageSeconds": round(now - born, 3)})
            self._fire(lambda n=name: self._network.network_interfaces.begin_delete(
                self.cfg.resource_group, n, polling=False), f"delete NIC {name}", NIC=name)
        return attached

    def _manage_disks(self, now: float) -> None:
        """Delete our unattached ``-os`` disks older than DeleteDanglingResourcesAfter (errors logged)."""
        rg = self.cfg.resource_group
        pattern = re.compile("^" + re.escape(self.name_prefix) + ".*-os$")
        try:
            disks = list(self._compute.disks.list_by_resource_group(rg))
        except Exception as e:
            self._error(e, "list disks")
            return
        for d in disks:
            if not pattern.match(d.name or "") or (d.disk_state or "").lower() != "unattached":
                continue
            born = _timestamp(d.time_created)
            if born is None or now - born < self.cfg.delete_dangling_resources_after:
                continue
            self._log.info("deleting dangling disk", extra={"Disk": d.name, "ageSeconds": round(now - born, 3)})
            self._fire(lambda n=d.name: self._compute.disks.begin_delete(rg, n, polling=False),
                       f"delete disk {d.name}", Disk=d.name)

    def instance_quota_group(self, it: InstanceType) -> str:
        return "spot" if it.preemptible else ""

    def stop(self) -> None:
        """Abandon in-flight waits (creates raise CloudError) and close the SDK clients."""
        self._stopping.set()
        for c in (self._compute, self._network):
            try:
                c.close()
            except Exception:  # closing twice or a half-built client: nothing left to release
                pass


class AzureInstance:
    """One VM snapshot (plus its NIC for the address)."""

    def __init__(self, owner: AzureInstanceSet, vm, nic):
        self._set = owner
        self._vm = vm
        self._nic = nic
        self._tags = dict(vm.tags or {})

    @property
    def id(self) -> str:
        return self._vm.id

    @property
    def name(self) -> str:
        return self._vm.name

    @property
    def address(self) -> str:
        try:
            configs = self._nic.ip_configurations or []
        except AttributeError:
            return ""
        primary = [c for c in configs if getattr(c, "primary", False)] or configs
        return (primary[0].private_ip_address or "") if primary else ""

    @property
    def remote_user(self) -> str:
        return self._set.cfg.admin_username

    @property
    def provider_type(self) -> str:
        # The raw JSON string, not the SDK's case-normalizing enum: it must equal the configured ProviderType.
        hp = (self._vm.get("properties") or {}).get("hardwareProfile") or {}
        return str(hp.get("vmSize") or "")

    @property
    def tags(self):
        return dict(self._tags)

    def set_tags(self, tags) -> None:
        merged = {**self._tags, **tags}
        s = self._set
        vm = s._wait(lambda polling: s._compute.virtual_machines.begin_update(
            s.cfg.resource_group, self.name, cm.VirtualMachineUpdate(tags=merged), polling=polling),
            f"set tags on {self.name}")
        self._vm = vm
        self._tags = dict(vm.tags or merged)

    def destroy(self) -> None:
        s = self._set
        try:
            s._wait(lambda polling: s._compute.virtual_machines.begin_delete(
                s.cfg.resource_group, self.name, polling=polling), f"delete VM {self.name}")
        except CloudError as e:
            if isinstance(e.__cause__, ResourceNotFoundError):
                return
            raise
        s._log.info("destroyed azure instance", extra={"Instance": self.id})

    def verify_host_key(self, host_key, transport) -> None:
        raise NotSupported("the azure driver cannot verify host keys; the instance secret is checked instead")

    def price_history(self, it: InstanceType) -> list:
        return []

    def __repr__(self) -> str:
        return f"<AzureInstance {self.name}>"
