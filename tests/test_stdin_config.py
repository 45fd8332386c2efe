"""What the real Go crunch-run does with the config we send on its stdin.

crunch-run decodes ``ConfigData.Cluster`` into Go's ``arvados.Cluster`` and hands it to the keepstore
it starts: a value of the wrong JSON type fails the decode (the container is requeued), a key left
out becomes Go's zero value. These tests decode the exact bytes ``crunch_run_config`` produces.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from cloud import crunchrun
from conf import gotypes
from conf.loader import ConfigError, arvados_defaults, load_text

REPO = Path(__file__).resolve().parents[1]
# ../shared/reference next to the main checkout (also found from a worktree one level deeper)
REFERENCE = next((p / "shared" / "reference" / "arvados-config.default.yml"
                  for p in (REPO.parent, REPO.parent.parent)
                  if (p / "shared" / "reference" / "arvados-config.default.yml").exists()), None)
UUID = "zzzzz-dz642-000000000000001"
MGMT = "m" * 40
ROOT = "r" * 40
CLIENT_SECRET = "azure-client-secret-value"
VOLUME_SECRET = "s3-volume-secret-key-value"


def config(extra: str = "", lkbb: int = 1) -> str:
    return f"""
Clusters:
  zzzzz:
    SystemRootToken: {ROOT}
    ManagementToken: {MGMT}
    PostgreSQL:
      Connection: {{host: db, password: db-password-value, user: arvados}}
    Services:
      Controller: {{ExternalURL: "https://zzzzz.example.org"}}
      Keepstore:
        InternalURLs: {{"http://keep0.zzzzz.internal:25107": {{}}}}
    Collections:
      BlobSigningKey: blobsigningkeyblobsigningkeyblobsigningkey
    Volumes:
      zzzzz-nyw5e-000000000000000:
        Driver: S3
        Replication: 2
        DriverParameters: {{Bucket: b, AccessKeyID: AKIAVOLUME, SecretAccessKey: {VOLUME_SECRET}}}
    Containers:
      LocalKeepBlobBuffersPerVCPU: {lkbb}
      DispatchPrivateKey: ""
      CloudVMs:
        Driver: azure
        SSHPort: 22
        TimeoutBooting: 900s
        DriverParameters:
          SubscriptionID: sub
          ResourceGroup: rg
          Network: vnet
          Subnet: default
          ClientID: app
          TenantID: tenant
          ClientSecret: {CLIENT_SECRET}
    InstanceTypes:
      small: {{ProviderType: Standard_D2s_v3, VCPUs: 2, RAM: 8GiB, Price: 0.1}}
{extra}"""


def sent(cluster) -> dict:
    raw = crunchrun.config_data(cluster, cluster.instance_types["small"], "10.0.0.5", UUID)
    return json.loads(raw)


# --- the defaults table ---------------------------------------------------------------------------


def _diff(ours, theirs, path=""):
    """Every key path where the two trees differ (a key missing on either side, or another value)."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        out = []
        for k in sorted(set(ours) | set(theirs), key=str):
            p = f"{path}.{k}" if path else str(k)
            if k not in ours:
                out.append(f"{p}: missing from conf/arvados_defaults.yml")
            elif k not in theirs:
                out.append(f"{p}: not in Arvados' defaults")
            else:
                out += _diff(ours[k], theirs[k], p)
        return out
    if ours != theirs or type(ours) is not type(theirs):
        return [f"{path}: ours {ours!r} != Arvados' {theirs!r}"]
    return []


@pytest.mark.skipif(REFERENCE is None, reason="no ../shared/reference/arvados-config.default.yml")
def test_defaults_table_is_arvados_key_by_key_and_value_by_value():
    theirs = yaml.safe_load(REFERENCE.read_text(encoding="utf-8"))["Clusters"]["xxxxx"]
    ours = arvados_defaults()
    assert _diff(ours, theirs) == []
    assert len(json.dumps(ours)) > 10000 and len(ours) == len(theirs) > 15  # the whole file


def test_every_default_key_has_a_go_type():
    """The Go type table covers the defaults (less SAMPLE entries and DriverParameters, which Go
    keeps raw): otherwise a key would be silently left out of what crunch-run gets."""
    missing = []

    def walk(v, t, path):
        if isinstance(t, dict):
            for k, x in v.items():
                if k not in t:
                    missing.append(f"{path}.{k}")
                else:
                    walk(x, t[k], f"{path}.{k}")
    walk(arvados_defaults(), gotypes.CLUSTER, "")
    assert missing == []


# --- Go field types -------------------------------------------------------------------------------

_DURATION = re.compile(r"^(0s|-?(\d+(\.\d+)?(h|m|s|ms|µs|ns))+)$")


def check_go_types(v, t, path, problems):
    """Would Go's json.Unmarshal put ``v`` into a field of type ``t``? (independent of the encoder)"""
    if isinstance(t, dict):
        if not isinstance(v, dict):
            problems.append(f"{path}: expected an object, got {type(v).__name__}")
            return
        for k, ft in t.items():
            if k not in v and k not in gotypes.OMITEMPTY:
                problems.append(f"{path}.{k}: missing (crunch-run would use Go's zero value)")
            elif k in v:
                check_go_types(v[k], ft, f"{path}.{k}", problems)
        return
    if isinstance(t, tuple):
        if v is None:
            return
        kind, inner = t
        if kind == "list":
            if not isinstance(v, list):
                problems.append(f"{path}: expected an array")
                return
            for i, x in enumerate(v):
                check_go_types(x, inner, f"{path}[{i}]", problems)
        else:
            if not isinstance(v, dict):
                problems.append(f"{path}: expected an object")
                return
            for k, x in v.items():
                check_go_types(x, inner, f"{path}.{k}", problems)
        return
    ok = {
        "str": lambda x: isinstance(x, str),
        "URL": lambda x: isinstance(x, str),
        "TLSVersion": lambda x: x in ("", "1.0", "1.1", "1.2", "1.3"),
        "int": lambda x: isinstance(x, int) and not isinstance(x, bool),
        "ByteSize": lambda x: isinstance(x, int) and not isinstance(x, bool),
        "ByteSizeOrPercent": lambda x: (isinstance(x, int) and not isinstance(x, bool))
        or (isinstance(x, str) and x.endswith("%")),
        "float": lambda x: isinstance(x, (int, float)) and not isinstance(x, bool),
        "bool": lambda x: isinstance(x, bool),
        "Duration": lambda x: isinstance(x, str) and bool(_DURATION.match(x)),
        "StringSet": lambda x: x is None or (isinstance(x, dict) and all(y == {} for y in x.values())),
        "empty": lambda x: x == {},
        "raw": lambda x: True,
        "any": lambda x: True,
    }[t]
    if not ok(v):
        problems.append(f"{path}: {v!r} does not decode into Go type {t}")


def test_sent_cluster_decodes_into_go_types_and_is_complete(tmp_path):
    cfg = sent(load_text(config(), source="site.yml"))
    problems = []
    check_go_types(cfg["Cluster"], gotypes.CLUSTER, "Cluster", problems)
    assert problems == []
    assert cfg["KeepBuffers"] == 2


def test_values_crunch_run_and_keepstore_read_are_arvados_defaults_in_go_form():
    c = sent(load_text(config(), source="site.yml"))["Cluster"]
    vms = c["Containers"]["CloudVMs"]
    assert vms["SSHPort"] == "22"  # a YAML number, sent as the string Go's field is
    assert vms["TimeoutBooting"] == "15m" and vms["ProbeInterval"] == "10s"
    col = c["Collections"]
    assert col["BlobSigningTTL"] == "336h"  # 0 would make every signature expire at once
    assert col["DefaultReplication"] == 2 and col["BlobSigning"] is True
    assert col["BlobSigningKey"] == "blobsigningkeyblobsigningkeyblobsigningkey"
    assert col["WebDAVCache"]["DiskCacheSize"] == "10%"
    assert c["Containers"]["ReserveExtraRAM"] == 550 << 20
    assert c["Containers"]["LocalKeepLogsToContainerLog"] == "none"
    assert c["API"]["KeepServiceRequestTimeout"] == "15s"
    assert c["API"]["MaxKeepBlobBuffers"] == 128
    # Go's setImplicitStorageClasses, and the site's volume with its credentials (keepstore needs them)
    assert c["StorageClasses"] == {"default": {"Default": True, "Priority": 0}}
    vol = c["Volumes"]["zzzzz-nyw5e-000000000000000"]
    assert vol["StorageClasses"] == {"default": True} and vol["Replication"] == 2
    assert vol["DriverParameters"]["SecretAccessKey"] == VOLUME_SECRET
    # URLs as Go's arvados.URL writes them
    assert list(c["Services"]["Keepstore"]["InternalURLs"]) == ["http://keep0.zzzzz.internal:25107/"]
    assert c["Services"]["Controller"]["ExternalURL"] == "https://zzzzz.example.org/"
    assert c["InstanceTypes"]["small"]["RAM"] == 8 << 30 and "Name" not in c["InstanceTypes"]["small"]
    assert "SAMPLE" not in json.dumps(c)


def test_secrets_neither_crunch_run_nor_keepstore_uses_are_not_sent():
    cluster = load_text(config(), source="site.yml")
    first, second = sent(cluster)["Cluster"], sent(cluster)["Cluster"]
    text = json.dumps(first)
    for secret in (MGMT, CLIENT_SECRET, "db-password-value"):
        assert secret not in text
    # a throwaway token for crunch-run's health check of its local keepstore, new for every start
    assert re.fullmatch(r"[0-9a-f]{40}", first["ManagementToken"])
    assert first["ManagementToken"] != second["ManagementToken"]
    assert first["Containers"]["DispatchPrivateKey"] == ""
    params = first["Containers"]["CloudVMs"]["DriverParameters"]
    assert "ClientSecret" not in params and "SecretAccessKey" not in params and "AccessKeyID" not in params
    assert params["SubscriptionID"] == "sub" and params["Location"] == "centralus"
    # what crunch-run and keepstore do use is there
    assert first["SystemRootToken"] == ROOT
    assert first["PostgreSQL"]["Connection"]["host"] == "db"
    assert first["Volumes"]["zzzzz-nyw5e-000000000000000"]["DriverParameters"]["SecretAccessKey"] == VOLUME_SECRET
    # and the dispatcher's own config is untouched
    assert cluster.management_token == MGMT
    assert cluster.cloud_vms.driver_parameters["ClientSecret"] == CLIENT_SECRET


def test_no_cluster_without_local_keepstore():
    assert sent(load_text(config(lkbb=0), source="site.yml"))["Cluster"] is None


@pytest.mark.parametrize("change,key", [
    ({"Collections": {"BlobSigningTTL": 14}}, "Collections.BlobSigningTTL"),
    ({"API": {"MaxItemsPerResponse": "many"}}, "API.MaxItemsPerResponse"),
    ({"Users": {"NewUsersAreActive": "yes"}}, "Users.NewUsersAreActive"),
    ({"Collections": {"WebDAVCache": {"DiskCacheSize": "200%"}}}, "Collections.WebDAVCache.DiskCacheSize"),
    ({"Login": {"LDAP": {"MinTLSVersion": 1.7}}}, "Login.LDAP.MinTLSVersion"),
])
def test_a_value_go_cannot_decode_is_a_config_error_naming_the_key(change, key):
    from conf.loader import merge
    doc = yaml.safe_load(config())
    doc["Clusters"]["zzzzz"] = merge(doc["Clusters"]["zzzzz"], change)
    with pytest.raises(ConfigError, match=re.escape(f"Clusters.zzzzz.{key}")):
        load_text(yaml.safe_dump(doc), source="site.yml")
