"""The Go types of Arvados' ``arvados.Cluster`` (sdk/go/arvados/config.go), and the cluster config
in the JSON form Go's ``json.Marshal`` gives it.

crunch-run decodes the ``Cluster`` we send on its stdin into that struct, and hands it on to the
keepstore it starts: a value of the wrong JSON type (``SSHPort: 22``, a number, for a string field)
makes the decode fail and the container is requeued; a key left out becomes Go's zero value
(``Collections.BlobSigningTTL`` 0: signatures expire at once). :func:`to_go_json` turns the merged
config into Go's shape: every struct field present (zero value when missing), keys the struct does
not have dropped (Go ignores them), durations as Go duration strings, sizes as numbers of bytes.

Type names: ``str int float bool Duration ByteSize ByteSizeOrPercent URL StringSet TLSVersion``,
``raw`` (``json.RawMessage``: passed as is), ``any`` (``interface{}``), ``empty`` (``struct{}``);
``("map", T)`` / ``("urlmap", T)`` (``map[string]T`` / ``map[URL]T``), ``("list", T)``; a dict is
a struct, its fields in Go's order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from urllib.parse import urlsplit, urlunsplit

from conf.units import format_duration, parse_duration, parse_size


def _m(t):
    return ("map", t)


def _l(t):
    return ("list", t)


SERVICE_INSTANCE = {"ListenURL": "URL", "Rendezvous": "str"}
SERVICE = {"InternalURLs": ("urlmap", SERVICE_INSTANCE), "ExternalURL": "URL"}
GPU = {"Stack": "str", "DriverVersion": "str", "HardwareTarget": "str", "DeviceCount": "int",
       "VRAM": "ByteSize"}
INSTANCE_TYPE = {"ProviderType": "str", "VCPUs": "int", "RAM": "ByteSize", "IncludedScratch": "ByteSize",
                 "AddedScratch": "ByteSize", "Price": "float", "Preemptible": "bool", "GPU": GPU}
UPDOWN = {"Upload": "bool", "Download": "bool"}
ROLE_PERMS = {"User": UPDOWN, "Admin": UPDOWN}

CLOUD_VMS = {
    "Enable": "bool", "BootProbeCommand": "str", "InstanceInitCommand": "str",
    "DeployRunnerBinary": "str", "DeployRunnerDirectory": "str", "DeployPublicKey": "bool",
    "ImageID": "str", "MaxCloudOpsPerSecond": "int", "MaxProbesPerSecond": "int",
    "MaxConcurrentInstanceCreateOps": "int", "MaxRunningContainersPerInstance": "int",
    "MaxInstances": "int", "InitialQuotaEstimate": "int", "SupervisorFraction": "float",
    "PollInterval": "Duration", "ProbeInterval": "Duration", "SSHPort": "str",
    "SyncInterval": "Duration", "TimeoutBooting": "Duration", "TimeoutIdle": "Duration",
    "TimeoutProbe": "Duration", "TimeoutShutdown": "Duration", "TimeoutSignal": "Duration",
    "TimeoutStaleRunLock": "Duration", "TimeoutTERM": "Duration", "ResourceTags": _m("str"),
    "TagKeyPrefix": "str", "Driver": "str", "DriverParameters": "raw",
}

CONTAINERS = {
    "CloudVMs": CLOUD_VMS, "CrunchRunCommand": "str", "CrunchRunArgumentsList": _l("str"),
    "DefaultKeepCacheRAM": "ByteSize", "DispatchPrivateKey": "str", "LogReuseDecisions": "bool",
    "MaxDispatchAttempts": "int", "MaxRetryAttempts": "int", "MinRetryPeriod": "Duration",
    "ReserveExtraRAM": "ByteSize", "StaleLockTimeout": "Duration",
    "SupportedDockerImageFormats": "StringSet", "AlwaysUsePreemptibleInstances": "bool",
    "PreemptiblePriceFactor": "float", "MaximumPriceFactor": "float", "RuntimeEngine": "str",
    "LocalKeepBlobBuffersPerVCPU": "int", "LocalKeepLogsToContainerLog": "str",
    "Logging": {"LogUpdatePeriod": "Duration", "LogUpdateSize": "ByteSize"},
    "ShellAccess": {"Admin": "bool", "User": "bool"},
    "SLURM": {"PrioritySpread": "int", "SbatchArgumentsList": _l("str"),
              "SbatchGPUArgumentsList": _l("str"), "SbatchEnvironmentVariables": _m("str")},
    "LSF": {"BsubSudoUser": "str", "BsubArgumentsList": _l("str"), "BsubGPUArguments": _l("str"),
            "MaxRunTimeOverhead": "Duration", "MaxRunTimeDefault": "Duration"},
}

CLUSTER = {
    "ManagementToken": "str",
    "SystemRootToken": "str",
    "Services": {name: SERVICE for name in (
        "Composer", "ContainerWebServices", "Controller", "DispatchCloud", "DispatchLSF",
        "DispatchSLURM", "Health", "Keepbalance", "Keepproxy", "Keepstore", "RailsAPI",
        "WebDAVDownload", "WebDAV", "WebShell", "Websocket", "Workbench1", "Workbench2")},
    "InstanceTypes": _m(INSTANCE_TYPE),
    "Containers": CONTAINERS,
    "RemoteClusters": _m({"Host": "str", "Proxy": "bool", "Scheme": "str", "Insecure": "bool",
                          "ActivateUsers": "bool"}),
    "PostgreSQL": {"Connection": _m("str"), "ConnectionPool": "int"},
    "API": {
        "AsyncPermissionsUpdateInterval": "Duration", "DisabledAPIs": "StringSet",
        "MaxIndexDatabaseRead": "int", "MaxItemsPerResponse": "int",
        "MaxConcurrentRailsRequests": "int", "MaxConcurrentRequests": "int",
        "MaxQueuedRequests": "int", "MaxGatewayTunnels": "int",
        "MaxQueueTimeForLockRequests": "Duration", "MaxKeepBlobBuffers": "int",
        "MaxRequestAmplification": "int", "MaxRequestSize": "int", "MaxTokenLifetime": "Duration",
        "RequestTimeout": "Duration", "SendTimeout": "Duration", "WebsocketClientEventQueue": "int",
        "WebsocketServerEventQueue": "int", "KeepServiceRequestTimeout": "Duration",
        "VocabularyPath": "str", "FreezeProjectRequiresDescription": "bool",
        "FreezeProjectRequiresProperties": "StringSet", "UnfreezeProjectRequiresAdmin": "bool",
        "LockBeforeUpdate": "bool"},
    "AuditLogs": {"MaxAge": "Duration", "MaxDeleteBatch": "int", "UnloggedAttributes": "StringSet"},
    "Collections": {
        "BlobSigning": "bool", "BlobSigningKey": "str", "BlobSigningTTL": "Duration",
        "BlobTrash": "bool", "BlobTrashLifetime": "Duration", "BlobTrashCheckInterval": "Duration",
        "BlobTrashConcurrency": "int", "BlobDeleteConcurrency": "int",
        "BlobReplicateConcurrency": "int", "CollectionVersioning": "bool",
        "DefaultTrashLifetime": "Duration", "DefaultReplication": "int",
        "ManagedProperties": _m({"Value": "any", "Function": "str", "Protected": "bool"}),
        "PreserveVersionIfIdle": "Duration", "TrashSweepInterval": "Duration",
        "TrustAllContent": "bool", "ForwardSlashNameSubstitution": "str", "S3FolderObjects": "bool",
        "BlobMissingReport": "str", "BalancePeriod": "Duration", "BalanceCollectionBatch": "int",
        "BalanceCollectionBuffers": "int", "BalanceTimeout": "Duration",
        "BalanceUpdateLimit": "int", "BalancePullLimit": "int", "BalanceTrashLimit": "int",
        "WebDAVCache": {"TTL": "Duration", "DiskCacheSize": "ByteSizeOrPercent",
                        "MaxCollectionBytes": "ByteSize", "MaxSessions": "int"},
        "KeepproxyPermission": ROLE_PERMS, "WebDAVPermission": ROLE_PERMS,
        "WebDAVLogEvents": "bool", "WebDAVLogDownloadInterval": "Duration",
        "WebDAVOutputBuffer": "ByteSize"},
    "Login": {
        "LDAP": {"Enable": "bool", "URL": "URL", "StartTLS": "bool", "InsecureTLS": "bool",
                 "MinTLSVersion": "TLSVersion", "StripDomain": "str", "AppendDomain": "str",
                 "SearchAttribute": "str", "SearchBindUser": "str", "SearchBindPassword": "str",
                 "SearchBase": "str", "SearchFilters": "str", "EmailAttribute": "str",
                 "UsernameAttribute": "str"},
        "Google": {"Enable": "bool", "ClientID": "str", "ClientSecret": "str",
                   "AlternateEmailAddresses": "bool", "AuthenticationRequestParameters": _m("str")},
        "OpenIDConnect": {"Enable": "bool", "Issuer": "str", "ClientID": "str", "ClientSecret": "str",
                          "EmailClaim": "str", "EmailVerifiedClaim": "str", "UsernameClaim": "str",
                          "AcceptAccessToken": "bool", "AcceptAccessTokenScope": "str",
                          "AuthenticationRequestParameters": _m("str")},
        "PAM": {"Enable": "bool", "Service": "str", "DefaultEmailDomain": "str"},
        "Test": {"Enable": "bool", "Users": _m({"Email": "str", "Password": "str"})},
        "LoginCluster": "str", "RemoteTokenRefresh": "Duration", "TokenLifetime": "Duration",
        "TrustedClients": ("urlmap", "empty"), "TrustPrivateNetworks": "bool",
        "IssueTrustedTokens": "bool"},
    "SystemLogs": {"LogLevel": "str", "Format": "str", "MaxRequestLogParamsSize": "int",
                   "RequestQueueDumpDirectory": "str"},
    "TLS": {"Certificate": "str", "Key": "str", "Insecure": "bool", "ACME": {"Server": "str"}},
    "Users": {
        "ActivatedUsersAreVisibleToOthers": "bool", "AnonymousUserToken": "str",
        "AdminNotifierEmailFrom": "str", "AutoAdminFirstUser": "bool", "AutoAdminUserWithEmail": "str",
        "AutoSetupNewUsers": "bool", "AutoSetupNewUsersWithVmUUID": "str",
        "AutoSetupUsernameBlacklist": "StringSet", "EmailSubjectPrefix": "str",
        "NewInactiveUserNotificationRecipients": "StringSet",
        "NewUserNotificationRecipients": "StringSet", "NewUsersAreActive": "bool",
        "SendUserSetupNotificationEmail": "bool", "SupportEmailAddress": "str",
        "UserNotifierEmailFrom": "str", "UserNotifierEmailBcc": "StringSet",
        "UserProfileNotificationAddress": "str", "PreferDomainForUsername": "str",
        "UserSetupMailText": "str", "RoleGroupsVisibleToAll": "bool", "CanCreateRoleGroups": "bool",
        "ActivityLoggingPeriod": "Duration", "SyncIgnoredGroups": _l("str"),
        "SyncRequiredGroups": _l("str"), "SyncUserAccounts": "bool", "SyncUserAPITokens": "bool",
        "SyncUserGroups": "bool", "SyncUserSSHKeys": "bool"},
    "StorageClasses": _m({"Default": "bool", "Priority": "int"}),
    "Volumes": _m({"AccessViaHosts": ("urlmap", {"ReadOnly": "bool"}), "ReadOnly": "bool",
                   "AllowTrashWhenReadOnly": "bool", "Replication": "int",
                   "StorageClasses": _m("bool"), "Driver": "str", "DriverParameters": "raw"}),
    "Workbench": {
        "ActivationContactLink": "str", "ArvadosDocsite": "str", "ArvadosPublicDataDocURL": "str",
        "DisableSharingURLsUI": "bool", "FileViewersConfigURL": "str",
        "ShowUserAgreementInline": "bool", "SiteName": "str", "Theme": "str",
        "UserProfileFormFields": _m({"Type": "str", "FormFieldTitle": "str",
                                     "FormFieldDescription": "str", "Required": "bool",
                                     "Position": "int", "Options": _m("empty")}),
        "UserProfileFormMessage": "str", "WelcomePageHTML": "str", "InactivePageHTML": "str",
        "SSHHelpPageHTML": "str", "SSHHelpHostSuffix": "str", "IdleTimeout": "Duration",
        "BannerUUID": "str"},
}
# ServiceWithPortRange embeds Service: its fields are promoted into the same JSON object.
CLUSTER["Services"]["ContainerWebServices"] = {**SERVICE, "ExternalPortMin": "int", "ExternalPortMax": "int"}
# ServiceInstance.Rendezvous is `json:",omitempty"`.
OMITEMPTY = {"Rendezvous"}

_ZERO = {"str": "", "int": 0, "float": 0.0, "bool": False, "Duration": "0s", "ByteSize": 0,
         "ByteSizeOrPercent": 0, "URL": "", "TLSVersion": "", "StringSet": None, "raw": None,
         "any": None, "empty": {}}
_TLS = {"": "", "1.0": "1.0", "1.1": "1.1", "1.2": "1.2", "1.3": "1.3"}


class GoTypeError(ValueError):
    """A value that Go could not decode into its field; ``key`` is the dotted path below the cluster."""

    def __init__(self, key: str, reason: str):
        self.key, self.reason = key, reason
        super().__init__(f"{key}: {reason}")


def zero(t):
    """Go's zero value of ``t``, as ``json.Marshal`` writes it (nil maps and slices are null)."""
    if isinstance(t, dict):
        return {k: zero(ft) for k, ft in t.items() if k not in OMITEMPTY}
    if isinstance(t, tuple):
        return None
    return _ZERO[t]


def go_url(v: str) -> str:
    """What ``arvados.URL`` makes of a URL string: ``http://host`` gains its ``/`` path."""
    if not v:
        return ""
    p = urlsplit(v)
    if p.netloc and not p.path:
        return urlunsplit((p.scheme, p.netloc, "/", p.query, p.fragment))
    return v


def to_go_json(value, t=None, path: str = ""):
    """``value`` (a merged cluster mapping by default) in Go's JSON form for type ``t``.

    Raises :class:`GoTypeError` naming the key for a value Go could not decode; a whole number in a
    string field is the one thing we accept and convert (``SSHPort: 22`` becomes ``"22"``).
    """
    t = CLUSTER if t is None else t
    where = path or "(cluster)"
    if isinstance(t, dict):
        if value is None:
            return zero(t)
        if not isinstance(value, Mapping):
            raise GoTypeError(where, f"expected a mapping, got {_kind(value)}")
        out = {}
        for k, ft in t.items():
            if k in value:
                v = to_go_json(value[k], ft, f"{path}.{k}" if path else k)
                if k in OMITEMPTY and not v:
                    continue
                out[k] = v
            elif k not in OMITEMPTY:
                out[k] = zero(ft)
        return out
    if isinstance(t, tuple):
        kind, inner = t
        if value is None:
            return None
        if kind == "list":
            if not isinstance(value, (list, tuple)):
                raise GoTypeError(where, f"expected a list, got {_kind(value)}")
            return [to_go_json(x, inner, f"{where}[{i}]") for i, x in enumerate(value)]
        if not isinstance(value, Mapping):
            raise GoTypeError(where, f"expected a mapping, got {_kind(value)}")
        out = {}
        for k, v in value.items():
            if k == "SAMPLE":
                continue
            key = str(k)
            if kind == "urlmap":
                key = go_url(key)
            out[key] = to_go_json(v, inner, f"{where}.{k}")
        return dict(sorted(out.items()))  # Go writes map keys sorted
    return _scalar(value, t, where)


def _scalar(v, t: str, where: str):
    if t in ("raw", "any"):
        return _plain(v)
    if t == "empty":
        if v is None or (isinstance(v, Mapping) and not v):
            return {}
        raise GoTypeError(where, f"expected {{}}, got {_kind(v)}")
    if t == "StringSet":
        if v is None:
            return None
        if isinstance(v, (list, tuple)):
            items = v
        elif isinstance(v, Mapping):
            items = list(v)
        else:
            raise GoTypeError(where, f"expected a list or set of strings, got {_kind(v)}")
        for x in items:
            if not isinstance(x, str):
                raise GoTypeError(where, f"expected strings, got {_kind(x)}")
        return {x: {} for x in sorted(items)}
    if t == "str" or t == "URL":
        if isinstance(v, int) and not isinstance(v, bool):
            v = str(v)  # SSHPort: 22 -- Go's loader would refuse it; we send the string it means
        if not isinstance(v, str):  # the value is not shown: it may be a secret
            raise GoTypeError(where, f"expected a string, got {_kind(v, show=False)}")
        return go_url(v) if t == "URL" else v
    if t == "int":
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            raise GoTypeError(where, f"expected a whole number, got {_kind(v)}")
        return v
    if t == "float":
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise GoTypeError(where, f"expected a number, got {_kind(v)}")
        return float(v)
    if t == "bool":
        if not isinstance(v, bool):
            raise GoTypeError(where, f"expected true or false, got {_kind(v)}")
        return v
    if t == "Duration":
        try:
            return format_duration(parse_duration(v))
        except ValueError as e:
            raise GoTypeError(where, f"{_kind(v)} is not a duration ({e})") from None
    if t == "ByteSize":
        try:
            return parse_size(v)
        except ValueError as e:
            raise GoTypeError(where, f"{_kind(v)} is not a size ({e})") from None
    if t == "ByteSizeOrPercent":
        if isinstance(v, str) and v.strip().endswith("%"):
            pct = v.strip()[:-1].strip()
            if not pct.isdigit() or int(pct) > 100:
                raise GoTypeError(where, f"{v!r} is not a percentage between 0 and 100")
            return f"{int(pct)}%"
        return _scalar(v, "ByteSize", where)
    if t == "TLSVersion":
        key = v if isinstance(v, str) else (f"{v:.1f}" if isinstance(v, float) else None)
        if key not in _TLS:
            raise GoTypeError(where, f"{_kind(v)} is not a TLS version (\"1.0\" .. \"1.3\" or \"\")")
        return _TLS[key]
    raise AssertionError(f"unknown Go type {t!r}")


def _plain(v):
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def _kind(v, show: bool = True) -> str:
    if isinstance(v, Mapping):
        return "a mapping"
    if isinstance(v, (list, tuple)):
        return "a list"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (int, float)):
        return f"the number {v!r}" if show else "a number"
    if isinstance(v, str):
        return f"the string {v[:40]!r}"
    return type(v).__name__
