"""Loading the cluster config: layering, effective values, warnings, and one-line errors."""

import copy
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import MappingProxyType

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from actors.checkconfig import summary
from conf.loader import ConfigError, clean, load, load_text

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
ARVADOS_DEFAULTS = next((p / "shared" / "reference" / "arvados-config.default.yml" for p in (REPO.parent, REPO.parent.parent)
                         if (p / "shared" / "reference").is_dir()), REPO.parent / "shared" / "reference" / "arvados-config.default.yml")
C = "Clusters.zzzzz"
VMS = f"{C}.Containers.CloudVMs"


URL_SECRET = "hunter2-" + "q" * 24
EXTERNAL = "https://zzzzz.example.org"
D = f"{C}.Services.DispatchCloud.InternalURLs"


def services(external=EXTERNAL, internal=None) -> dict:
    out = {"Controller": {"ExternalURL": external}}
    if internal is not None:
        out["DispatchCloud"] = {"InternalURLs": internal}
    return out


def base_site() -> dict:
    return {"Clusters": {"zzzzz": {
        "ManagementToken": "m" * 40,
        "SystemRootToken": "s" * 40,
        "Services": {"Controller": {"ExternalURL": "https://zzzzz.example.org"}},
        "Containers": {"CloudVMs": {"Driver": "stub"}},
        "InstanceTypes": {"m5": {"RAM": "8GiB", "Price": 0.2}},
    }}}


def deep_update(d: dict, over: dict) -> dict:
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(d.get(k), dict):
            deep_update(d[k], v)
        else:
            d[k] = v
    return d


def site(**cluster) -> dict:
    """The base site config with ``cluster`` deep-merged into Clusters.zzzzz."""
    doc = base_site()
    deep_update(doc["Clusters"]["zzzzz"], cluster)
    return doc


def write(tmp_path, doc, name="config.yml") -> str:
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc), encoding="utf-8")
    return str(path)


def load_doc(tmp_path, doc, **kw):
    return load(write(tmp_path, doc), **kw)


def config_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("conf") and r.levelno == logging.WARNING]


# --- a minimal site, defaults and effective values ------------------------------------------------

def test_minimal_site_gets_arvados_defaults(caplog):
    caplog.set_level(logging.WARNING)
    c = load(str(DATA / "minimal.yml"))
    assert c.cluster_id == "zzzzz"
    assert c.source == str(DATA / "minimal.yml")
    assert c.dispatch_urls == ("http://localhost:9006",)
    assert c.controller_url == "" and c.tls_insecure is False
    vms = c.cloud_vms
    assert vms.driver == "stub"
    assert (vms.poll_interval, vms.probe_interval, vms.sync_interval) == (10, 10, 60)
    assert (vms.timeout_idle, vms.timeout_booting, vms.timeout_probe, vms.timeout_shutdown) == (60, 600, 600, 10)
    assert (vms.timeout_term, vms.timeout_signal, vms.timeout_stale_run_lock) == (120, 5, 5)
    assert (vms.max_instances, vms.max_cloud_ops_per_second, vms.max_concurrent_instance_create_ops) == (64, 10, 1)
    assert vms.boot_probe_command == "systemctl is-system-running"
    assert vms.ssh_port == "22" and vms.tag_key_prefix == "Arvados" and vms.deploy_public_key is True
    assert vms.deploy_runner_directory == "/tmp/arvados-crunch-run"
    assert c.containers.reserve_extra_ram == 550 * 2**20
    assert c.containers.stale_lock_timeout == 60
    assert c.containers.maximum_price_factor == 1.5
    assert c.containers.crunch_run_command == "crunch-run" and c.containers.runtime_engine == "docker"
    (t,) = c.instance_types.values()
    assert (t.name, t.provider_type, t.vcpus, t.ram, t.included_scratch, t.added_scratch, t.price) == \
        ("small", "small", 1, 4 * 2**30, 16 * 10**9, 0, 0.05)
    assert config_warnings(caplog) == []


@pytest.mark.parametrize("key, field, fallback", [
    ("ProbeInterval", "probe_interval", 10.0),
    ("SyncInterval", "sync_interval", 60.0),
    ("TimeoutIdle", "timeout_idle", 60.0),
    ("TimeoutBooting", "timeout_booting", 600.0),
    ("TimeoutProbe", "timeout_probe", 600.0),
    ("TimeoutShutdown", "timeout_shutdown", 10.0),
    ("TimeoutTERM", "timeout_term", 120.0),
    ("TimeoutSignal", "timeout_signal", 5.0),
    ("TimeoutStaleRunLock", "timeout_stale_run_lock", 5.0),
    ("MaxProbesPerSecond", "max_probes_per_second", 10),
])
def test_zero_means_the_pool_fallback(tmp_path, key, field, fallback):
    explicit = 7 if key == "MaxProbesPerSecond" else "7s"
    c = load_doc(tmp_path, site(Containers={"CloudVMs": {key: explicit}}))
    assert getattr(c.cloud_vms, field) == 7
    c = load_doc(tmp_path, site(Containers={"CloudVMs": {key: 0}}))
    assert getattr(c.cloud_vms, field) == fallback


def test_values_are_converted(tmp_path):
    c = load_doc(tmp_path, site(
        Services={"Controller": {"ExternalURL": "https://zzzzz.example.org"},
                  "DispatchCloud": {"InternalURLs": {"http://10.1.2.3:9006": {}, "http://127.0.0.1:9006": {}}}},
        TLS={"Insecure": True},
        Containers={
            "StaleLockTimeout": "1m30s", "ReserveExtraRAM": "1GiB", "DefaultKeepCacheRAM": 1024,
            "CrunchRunArgumentsList": ["--foo", "--bar=1"], "MaximumPriceFactor": 2,
            "CloudVMs": {"PollInterval": "500ms", "BootProbeCommand": "", "SSHPort": 2222,
                         "ResourceTags": {"team": "x"}, "SupervisorFraction": 0.25,
                         "DriverParameters": {"Nested": {"A": [1, 2]}, "Region": "r"}},
        },
    ))
    assert c.controller_url == "https://zzzzz.example.org" and c.tls_insecure is True
    assert c.dispatch_urls == ("http://10.1.2.3:9006", "http://127.0.0.1:9006")  # replaced, sorted
    ct, vms = c.containers, c.cloud_vms
    assert ct.stale_lock_timeout == 90.0 and ct.reserve_extra_ram == 2**30 and ct.default_keep_cache_ram == 1024
    assert ct.crunch_run_arguments_list == ("--foo", "--bar=1") and ct.maximum_price_factor == 2.0
    assert vms.poll_interval == 0.5 and vms.boot_probe_command == "true" and vms.ssh_port == "2222"
    assert dict(vms.resource_tags) == {"team": "x"} and vms.supervisor_fraction == 0.25
    assert vms.driver_parameters["Nested"]["A"] == (1, 2)


def test_result_is_frozen(tmp_path):
    c = load_doc(tmp_path, site(Containers={"CloudVMs": {"DriverParameters": {"A": {"B": 1}}}}))
    for mapping in (c.instance_types, c.raw, c.cloud_vms.driver_parameters, c.cloud_vms.driver_parameters["A"],
                    c.cloud_vms.resource_tags):
        assert isinstance(mapping, MappingProxyType)
    with pytest.raises(TypeError):
        c.raw["Containers"]["MaxDispatchAttempts"] = 1


def test_lists_replace_maps_merge_sample_and_null_dropped(tmp_path):
    c = load_doc(tmp_path, site(
        ManagementToken=None,  # null: the default ("") applies
        Containers={"CrunchRunArgumentsList": ["--only"], "CloudVMs": {
            "ResourceTags": {"SAMPLE": "tag value", "a": "b"}, "TimeoutIdle": None}},
        InstanceTypes={"SAMPLE": {"RAM": "1", "Price": 1}, "m5": {"RAM": "8GiB", "Price": 0.2}},
    ))
    assert c.containers.crunch_run_arguments_list == ("--only",)
    assert dict(c.cloud_vms.resource_tags) == {"a": "b"}
    assert c.cloud_vms.timeout_idle == 60.0
    assert c.management_token == ""
    assert list(c.instance_types) == ["m5"]
    assert "SAMPLE" not in c.raw["InstanceTypes"]
    # defaults merged under the site map: keys the site didn't give are there too
    assert c.raw["Containers"]["CloudVMs"]["TimeoutBooting"] == "10m"


def test_keys_are_case_sensitive(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    c = load_doc(tmp_path, site(Containers={"CloudVMs": {"timeoutidle": "5m"}}))
    assert c.cloud_vms.timeout_idle == 60.0
    assert config_warnings(caplog) == [
        f"{VMS}.timeoutidle: deprecated or unknown config entry (did you mean TimeoutIdle?)"]


def test_arvados_config_env_is_the_default_path(tmp_path, monkeypatch):
    path = write(tmp_path, site(Containers={"CloudVMs": {"MaxInstances": 3}}), "from-env.yml")
    monkeypatch.setenv("ARVADOS_CONFIG", path)
    c = load()
    assert c.source == path and c.cloud_vms.max_instances == 3


def test_cluster_id_chooses_among_several(tmp_path):
    doc = {"Clusters": {"aaaaa": base_site()["Clusters"]["zzzzz"],
                        "bbbbb": site(Containers={"CloudVMs": {"MaxInstances": 5}})["Clusters"]["zzzzz"]}}
    c = load_doc(tmp_path, doc, cluster_id="bbbbb")
    assert c.cluster_id == "bbbbb" and c.cloud_vms.max_instances == 5
    assert c.raw["Containers"]["CloudVMs"]["MaxInstances"] == 5


def test_load_text_names_its_source():
    text = yaml.safe_dump(site(Containers={"CloudVMs": {"MaxInstances": -1}}))
    with pytest.raises(ConfigError) as e:
        load_text(text, source="inline")
    assert str(e.value) == f"inline: {VMS}.MaxInstances: -1 is too small (minimum 0)"
    assert load_text(yaml.safe_dump(base_site())).source == "<string>"


# --- instance types ---------------------------------------------------------------------------------

def test_instance_type_defaults_and_gpu(tmp_path):
    c = load_doc(tmp_path, site(InstanceTypes={
        "gpu1": {"ProviderType": "Standard_NC6s_v3", "VCPUs": 6, "RAM": "112GiB", "IncludedScratch": "336GB",
                 "AddedScratch": "50GB", "Price": 3.06, "Preemptible": True,
                 "GPU": {"Stack": "cuda", "DriverVersion": "12.4", "HardwareTarget": "7.0",
                         "DeviceCount": 1, "VRAM": "16GiB"}}}))
    t = c.instance_types["gpu1"]
    assert (t.provider_type, t.vcpus, t.ram, t.scratch, t.price, t.preemptible) == \
        ("Standard_NC6s_v3", 6, 112 * 2**30, 386 * 10**9, 3.06, True)
    assert (t.gpu.stack, t.gpu.driver_version, t.gpu.hardware_target, t.gpu.device_count, t.gpu.vram) == \
        ("cuda", "12.4", "7.0", 1, 16 * 2**30)


def test_configured_scratch_is_ignored_with_a_warning(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    c = load_doc(tmp_path, site(InstanceTypes={"m5": {"Scratch": "1TB", "IncludedScratch": "10GB"}}))
    assert c.instance_types["m5"].scratch == 10 * 10**9
    assert config_warnings(caplog) == [
        f"{C}.InstanceTypes.m5.Scratch: is ignored: scratch is IncludedScratch + AddedScratch"]


def test_preemptible_price_factor_adds_variants(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    c = load_doc(tmp_path, site(Containers={"PreemptiblePriceFactor": 0.5}, InstanceTypes={
        "m5": {"RAM": "8GiB", "Price": 0.2, "ProviderType": "m5.large"},
        "spot": {"RAM": "4GiB", "Price": 0.03, "Preemptible": True},
    }))
    assert sorted(c.instance_types) == ["m5", "m5.preemptible", "spot"]
    v = c.instance_types["m5.preemptible"]
    assert (v.name, v.provider_type, v.ram, v.price, v.preemptible) == ("m5.preemptible", "m5.large", 8 * 2**30, 0.1, True)
    assert config_warnings(caplog) == []


def test_preemptible_variant_already_configured(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    same = {"RAM": "8GiB", "Price": 0.1, "Preemptible": True, "ProviderType": "m5"}
    c = load_doc(tmp_path, site(Containers={"PreemptiblePriceFactor": 0.5},
                                InstanceTypes={"m5.preemptible": same}))
    assert c.instance_types["m5.preemptible"].price == 0.1 and config_warnings(caplog) == []
    caplog.clear()
    c = load_doc(tmp_path, site(Containers={"PreemptiblePriceFactor": 0.5},
                                InstanceTypes={"m5.preemptible": {**same, "Price": 0.15}}))
    assert c.instance_types["m5.preemptible"].price == 0.15  # the configured one wins
    assert config_warnings(caplog) == [f"{C}.InstanceTypes.m5.preemptible: already exists, so no preemptible "
                                       "variant of m5 is added automatically"]


# --- warnings -----------------------------------------------------------------------------------------

def test_unknown_keys_in_modelled_sections_warn(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    load_doc(tmp_path, site(
        Containers={"Bogus": 1, "CloudVMs": {"MaxInstance": 3}},
        Services={"DispatchCloud": {"Extra": 1}},
        InstanceTypes={"m5": {"CUDA": {"DeviceCount": 1}, "GPU": {"Vram": "1GiB"}}},
        SomethingElse={"Whatever": 1},                 # unmodelled top-level section: silent
        API={"MaxItemsPerResponse": 5},
    ))
    assert sorted(config_warnings(caplog)) == sorted([
        f"{C}.Containers.Bogus: deprecated or unknown config entry",
        f"{VMS}.MaxInstance: deprecated or unknown config entry",
        f"{C}.Services.DispatchCloud.Extra: deprecated or unknown config entry",
        f"{C}.InstanceTypes.m5.CUDA: deprecated or unknown config entry",
        f"{C}.InstanceTypes.m5.GPU.Vram: deprecated or unknown config entry (did you mean VRAM?)",
    ])
    record = next(r for r in caplog.records if "Bogus" in r.getMessage())
    assert record.ConfigKey == f"{C}.Containers.Bogus" and record.ConfigFile.endswith("config.yml")


def test_empty_tokens_only_warn(tmp_path, caplog):
    """The loader serves every command: an empty SystemRootToken matters only to run and
    check-config, which refuse it (conf.runcheck) with the same words, said once."""
    caplog.set_level(logging.WARNING)
    c = load_doc(tmp_path, site(ManagementToken="", SystemRootToken=""))
    assert c.management_token == "" and c.system_root_token == ""
    assert config_warnings(caplog) == [
        f"{C}.ManagementToken: is empty: the management API and /metrics will refuse every request",
    ]


# --- real-world shapes ---------------------------------------------------------------------------------

def test_arvados_like_site_config(caplog):
    caplog.set_level(logging.WARNING)
    c = load(str(DATA / "arvados-like.yml"))
    assert c.cluster_id == "x1y2z"
    assert c.dispatch_urls == ("http://127.0.0.1:9006", "http://dispatch.x1y2z.internal:9006")
    assert c.controller_url == "https://x1y2z.example.org" and c.tls_insecure is True
    assert c.cloud_vms.driver == "azure" and c.cloud_vms.driver_parameters["Location"] == "eastus2"
    assert c.cloud_vms.timeout_idle == 180 and c.cloud_vms.max_instances == 200
    assert c.containers.runtime_engine == "singularity"
    assert [t.name for t in c.types_by_price()] == [
        "spot-d4", "Standard_D4s_v3.preemptible", "Standard_D4s_v3", "Standard_D16s_v3.preemptible",
        "Standard_D16s_v3", "Standard_NC6s_v3.preemptible", "Standard_NC6s_v3"]
    assert c.instance_types["Standard_NC6s_v3.preemptible"].price == pytest.approx(3.06 * 0.4)
    assert "spot-d4.preemptible" not in c.instance_types
    # unrelated sections are carried in raw, untouched
    assert c.raw["Volumes"]["x1y2z-nyw5e-000000000000000"]["Driver"] == "S3"
    assert c.raw["Containers"]["SLURM"]["PrioritySpread"] == 1000
    assert "Workbench" in c.raw
    assert config_warnings(caplog) == []


@pytest.mark.skipif(not ARVADOS_DEFAULTS.exists(), reason="no ../shared/reference/arvados-config.default.yml")
def test_full_arvados_default_file_as_site_config(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    doc = yaml.safe_load(ARVADOS_DEFAULTS.read_text(encoding="utf-8").replace("xxxxx", "zzzzz"))
    cluster = doc["Clusters"]["zzzzz"]
    cluster["ManagementToken"] = cluster["SystemRootToken"] = "t" * 40
    cluster["Containers"]["CloudVMs"]["Driver"] = "azure"
    cluster["InstanceTypes"] = {"Standard_D2s_v3": {"VCPUs": 2, "RAM": "8GiB", "Price": 0.096}}
    c = load_doc(tmp_path, doc)
    assert list(c.instance_types) == ["Standard_D2s_v3"]
    assert c.cloud_vms.driver_parameters["Location"] == "centralus"       # Arvados' Azure default
    assert c.cloud_vms.driver_parameters["SecurityGroupIDs"] == {}         # SAMPLE dropped
    assert c.dispatch_urls == ("http://localhost:9006",)                  # Arvados' SAMPLE dropped, ours kept
    assert "Volumes" in c.raw and "Workbench" in c.raw and "SAMPLE" not in c.raw["InstanceTypes"]
    # every key the Arvados defaults hold is known here; the one warning says the runner is not
    # deployed (Arvados' default DeployRunnerBinary is /proc/self/exe)
    assert [w.split(":")[0] for w in config_warnings(caplog)] == ["Clusters.zzzzz.Containers.CloudVMs.DeployRunnerBinary"]
    with pytest.raises(ConfigError, match=r'Driver: driver "loopback" is not supported'):
        cluster["Containers"]["CloudVMs"]["Driver"] = "loopback"
        load_doc(tmp_path, doc)


@pytest.mark.skipif(not ARVADOS_DEFAULTS.exists(), reason="no ../shared/reference/arvados-config.default.yml")
def test_our_defaults_match_arvados():
    """defaults.yml holds Arvados' values, except where the file marks a deliberate difference."""
    from conf.loader import _defaults

    ours = _defaults()
    theirs = clean(yaml.safe_load(ARVADOS_DEFAULTS.read_text(encoding="utf-8"))["Clusters"]["xxxxx"])
    ours_ct, theirs_ct = ours["Containers"], theirs["Containers"]
    assert set(ours_ct) == set(theirs_ct)
    assert set(ours_ct["CloudVMs"]) == set(theirs_ct["CloudVMs"])
    deviations = {"DeployRunnerBinary", "DriverParameters"}
    for k, v in ours_ct["CloudVMs"].items():
        if k not in deviations:
            assert v == theirs_ct["CloudVMs"][k], k
    for k, v in ours_ct.items():
        if k not in ("CloudVMs", "Logging", "ShellAccess", "SLURM", "LSF"):  # nested sections we don't read
            assert v == theirs_ct[k], k
    assert (ours["SystemRootToken"], ours["ManagementToken"], ours["TLS"]["Insecure"]) == ("", "", False)
    assert ours["InstanceTypes"] == theirs["InstanceTypes"] == {}


# --- bad input: one line naming the file and the key -------------------------------------------------

def _gpu(**kw):
    return {"InstanceTypes": {"m5": {"GPU": {"Stack": "cuda", "DriverVersion": "12.4", "DeviceCount": 1, **kw}}}}


def _vms(**kw):
    return {"Containers": {"CloudVMs": kw}}


BAD = [
    # (site overlay, key path, reason)
    ({"API": {"MaxConcurrentRequests": -5}}, f"{C}.API.MaxConcurrentRequests", "-5 is too small (minimum 0)"),
    ({"InstanceTypes": {"m5": {"RAM": "16 gigs"}}}, f"{C}.InstanceTypes.m5.RAM", '"16 gigs" is not a size (unknown unit "gigs")'),
    ({"InstanceTypes": {"m5": {"RAM": 0}}}, f"{C}.InstanceTypes.m5.RAM", "must be more than 0"),
    ({"InstanceTypes": {"x": {"Price": 1}}}, f"{C}.InstanceTypes.x.RAM", "is required"),
    ({"InstanceTypes": {"x": {"RAM": "1GiB"}}}, f"{C}.InstanceTypes.x.Price", "is required"),
    ({"InstanceTypes": {"m5": {"Price": -0.1}}}, f"{C}.InstanceTypes.m5.Price", "-0.1 is out of range (must be at least 0)"),
    ({"InstanceTypes": {"m5": {"VCPUs": 0}}}, f"{C}.InstanceTypes.m5.VCPUs", "0 is too small (minimum 1)"),
    ({"InstanceTypes": {"m5": {"VCPUs": 2.5}}}, f"{C}.InstanceTypes.m5.VCPUs", "expected a whole number, got 2.5"),
    ({"InstanceTypes": {"m5": {"AddedScratch": "-1G"}}}, f"{C}.InstanceTypes.m5.AddedScratch", '"-1G" is negative'),
    ({"InstanceTypes": {"m5": {"Preemptible": "yes"}}}, f"{C}.InstanceTypes.m5.Preemptible", 'expected true or false, got "yes"'),
    ({"InstanceTypes": {"m5": "big"}}, f"{C}.InstanceTypes.m5", "expected a mapping, got a string"),
    ({"InstanceTypes": [{"Name": "m5"}]}, f"{C}.InstanceTypes", "must be a mapping of type name to type (the list form is not supported)"),
    (_gpu(DriverVersion="abc"), f"{C}.InstanceTypes.m5.GPU.DriverVersion", '"abc" is not a version number like "12.4"'),
    (_gpu(DriverVersion=12.4), f"{C}.InstanceTypes.m5.GPU.DriverVersion", "expected a string, got the number 12.4 (put it in quotes)"),
    (_gpu(Stack="opencl"), f"{C}.InstanceTypes.m5.GPU.Stack", '"opencl" is not one of "cuda", "rocm" or ""'),
    (_gpu(DeviceCount=-1), f"{C}.InstanceTypes.m5.GPU.DeviceCount", "-1 is too small (minimum 0)"),
    (_vms(TimeoutIdle=10), f"{VMS}.TimeoutIdle", "10 is not a duration (missing unit)"),
    (_vms(TimeoutIdle="10"), f"{VMS}.TimeoutIdle", '"10" is not a duration (missing unit)'),
    (_vms(TimeoutIdle="2d"), f"{VMS}.TimeoutIdle", '"2d" is not a duration (unknown unit "d")'),
    (_vms(TimeoutBooting="-1s"), f"{VMS}.TimeoutBooting", '"-1s" is negative'),
    (_vms(PollInterval={"a": 1}), f"{VMS}.PollInterval", 'expected a duration like "10s", got a mapping'),
    (_vms(MaxInstances=-1), f"{VMS}.MaxInstances", "-1 is too small (minimum 0)"),
    (_vms(MaxInstances="ten"), f"{VMS}.MaxInstances", 'expected a whole number, got "ten"'),
    (_vms(MaxInstances=True), f"{VMS}.MaxInstances", "expected a whole number, got true"),
    (_vms(MaxProbesPerSecond=-5), f"{VMS}.MaxProbesPerSecond", "-5 is too small (minimum 0)"),
    (_vms(SupervisorFraction=1.5), f"{VMS}.SupervisorFraction", "1.5 is out of range (must be between 0 and 1)"),
    (_vms(SupervisorFraction="half"), f"{VMS}.SupervisorFraction", 'expected a number, got "half"'),
    (_vms(ImageID={"name": "x"}), f"{VMS}.ImageID", "expected a string, got a mapping"),
    (_vms(DeployPublicKey="no thanks"), f"{VMS}.DeployPublicKey", 'expected true or false, got "no thanks"'),
    (_vms(ResourceTags={"team": 5}), f"{VMS}.ResourceTags.team", "expected a string, got the number 5 (put it in quotes)"),
    (_vms(ResourceTags=["a"]), f"{VMS}.ResourceTags", "expected a mapping, got a list"),
    (_vms(DriverParameters="x"), f"{VMS}.DriverParameters", "expected a mapping, got a string"),
    (_vms(Driver="loopback"), f"{VMS}.Driver", 'driver "loopback" is not supported by this dispatcher (supported: azure, ec2, local, stub)'),
    (_vms(Driver="Azure"), f"{VMS}.Driver", 'unknown driver "Azure" (supported: azure, ec2, local, stub)'),
    ({"Containers": {"MaximumPriceFactor": -1}}, f"{C}.Containers.MaximumPriceFactor", "-1 is out of range (must be at least 0)"),
    ({"Containers": {"PreemptiblePriceFactor": -0.5}}, f"{C}.Containers.PreemptiblePriceFactor", "-0.5 is out of range (must be at least 0)"),
    ({"Containers": {"ReserveExtraRAM": -1}}, f"{C}.Containers.ReserveExtraRAM", "-1 is negative"),
    ({"Containers": {"StaleLockTimeout": "soon"}}, f"{C}.Containers.StaleLockTimeout", '"soon" is not a duration (invalid duration)'),
    ({"Containers": {"CrunchRunCommand": {"a": 1}}}, f"{C}.Containers.CrunchRunCommand", "expected a string, got a mapping"),
    ({"Containers": {"CrunchRunArgumentsList": "--foo"}}, f"{C}.Containers.CrunchRunArgumentsList", "expected a list of strings, got a string"),
    ({"Containers": {"CrunchRunArgumentsList": ["--a", 1]}}, f"{C}.Containers.CrunchRunArgumentsList[1]", "expected a string, got the number 1 (put it in quotes)"),
    ({"Containers": "none"}, f"{C}.Containers", "expected a mapping, got a string"),
    ({"Containers": {"DispatchPrivateKey": "file://relative/key"}}, f"{C}.Containers.DispatchPrivateKey", '"file://relative/key" must be file:///absolute/path'),
    ({"Containers": {"DispatchPrivateKey": "file:///nonexistent/dispatch-key"}}, f"{C}.Containers.DispatchPrivateKey", "cannot read /nonexistent/dispatch-key: No such file or directory"),
    ({"ManagementToken": {"a": 1}}, f"{C}.ManagementToken", "expected a string, got a mapping"),
    ({"TLS": {"Insecure": "maybe"}}, f"{C}.TLS.Insecure", 'expected true or false, got "maybe"'),
    ({"Services": {"Controller": {"ExternalURL": "zzzzz.example.org"}}}, f"{C}.Services.Controller.ExternalURL", '"zzzzz.example.org" is not an http:// or https:// URL with a host'),
    ({"Services": {"DispatchCloud": {"InternalURLs": {"localhost:9006": {}}}}}, f"{C}.Services.DispatchCloud.InternalURLs", '"localhost:9006" is not an http:// or https:// URL with a host'),
    ({"Services": {"DispatchCloud": {"InternalURLs": {"http://localhost:99999": {}}}}}, f"{C}.Services.DispatchCloud.InternalURLs", '"http://localhost:99999" is not a valid URL (Port out of range 0-65535)'),
    ({"Services": {"DispatchCloud": {"InternalURLs": {"http://h:1": "x"}}}}, f"{C}.Services.DispatchCloud.InternalURLs.http://h:1", "expected a mapping (e.g. {} or {ListenURL: ...}), got a string"),
    ({"Services": {"DispatchCloud": "http://x"}}, f"{C}.Services.DispatchCloud", "expected a mapping, got a string"),
    # URLs (issue 10 item 15): conf/urls.py's rules; never the user info or query (URL_SECRET)
    (dict(Services=services(f"https://dispatch:{URL_SECRET}@zzzzz.example.org")), f"{C}.Services.Controller.ExternalURL",
     '"https://***@zzzzz.example.org" must not hold a user name or password'),
    (dict(Services=services(f"{EXTERNAL}/arvados")), f"{C}.Services.Controller.ExternalURL",
     f"\"{EXTERNAL}/arvados\" must not have a path (got '/arvados')"),
    (dict(Services=services(f"{EXTERNAL}/?api_token={URL_SECRET}")), f"{C}.Services.Controller.ExternalURL",
     f'"{EXTERNAL}/?..." must not have a query or fragment'),
    (dict(Services=services("https://zzzzz.example.org:0")), f"{C}.Services.Controller.ExternalURL",
     '"https://zzzzz.example.org:0" has port 0 (only a listen address may ask for any free port)'),
    (dict(Services=services(internal={"https://dispatch.example:9006": {}})), D,
     '"https://dispatch.example:9006" cannot be listened on: is https: this dispatcher serves plain http '
     "(TLS belongs to a proxy in front); give it a ListenURL"),
    (dict(Services=services(internal={"http://dispatch.example:9006/mgmt": {}})), D,
     "\"http://dispatch.example:9006/mgmt\" must not have a path (got '/mgmt')"),
    (dict(Services=services(internal={"https://dispatch.example:9006": {"ListenURL": "http://0.0.0.0:port"}})),
     f"{D}.https://dispatch.example:9006.ListenURL",
     "\"http://0.0.0.0:***\" is not a valid URL (port is not a number)"),
    (dict(Services=services(internal={"https://dispatch.example:9006": {"ListenURL": "https://0.0.0.0:9006"}})),
     f"{D}.https://dispatch.example:9006.ListenURL",
     '"https://0.0.0.0:9006" is https: this dispatcher serves plain http (TLS belongs to a proxy in front)'),
    (dict(Services=services(internal={f"http://admin:{URL_SECRET}@dispatch.example:9006": {}})), D,
     '"http://***@dispatch.example:9006" must not hold a user name or password'),
    (dict(PostgreSQL={"Connection": {"host": "db.example", "port": "fivefourthreetwo", "password": URL_SECRET}}),
     f"{C}.PostgreSQL.Connection.port", '"fivefourthreetwo" is not a port number (1-65535)'),
    (dict(PostgreSQL={"Connection": {"host": "db example", "password": URL_SECRET}}),
     f"{C}.PostgreSQL.Connection.host", '"db example" is not a host name, an IP address or a socket directory'),
    (dict(PostgreSQL={"Connection": {"host": "db.example", "SSLMode": "require", "Passwd": URL_SECRET}}),
     f"{C}.PostgreSQL.Connection.Passwd", "is not a PostgreSQL connection option"),
]


@pytest.mark.parametrize("overlay, key, reason", BAD, ids=[f"{k.rsplit('.', 1)[-1]}-{i}" for i, (_, k, _) in enumerate(BAD)])
def test_bad_values_give_one_line_naming_file_and_key(tmp_path, overlay, key, reason):
    path = write(tmp_path, site(**copy.deepcopy(overlay)))
    with pytest.raises(ConfigError) as e:
        load(path)
    assert str(e.value) == f"{path}: {key}: {reason}"
    assert "\n" not in str(e.value) and URL_SECRET not in str(e.value)


@pytest.mark.parametrize("text, message", [
    ("Clusters:\n  zzzzz:\n    a: [1\n", "line 4 column 1: invalid YAML: did not find expected ',' or ']'"),
    ("Clusters:\n  zzzzz: {}\n  zzzzz: {}\n", 'line 3 column 3: invalid YAML: key "zzzzz" appears twice in one mapping'),
    ("", "empty file: expected a Clusters section"),
    ("- a\n- b\n", "expected a mapping with a Clusters section, got a list"),
    ("just text\n", "expected a mapping with a Clusters section, got a string"),
    ("API: {}\n", "Clusters: missing (the file must have a Clusters section)"),
    ("Clusters: [zzzzz]\n", "Clusters: expected a mapping of cluster ids, got a list"),
    ("Clusters: {}\n", "Clusters: no cluster defined"),
    ("Clusters: {ZZZZZ: {}}\n", 'Clusters.ZZZZZ: cluster id "ZZZZZ" must be 5 lowercase letters or digits'),
    ("Clusters: {zzzz: {}}\n", 'Clusters.zzzz: cluster id "zzzz" must be 5 lowercase letters or digits'),
    ("Clusters: {aaaaa: {}, bbbbb: {}}\n", "Clusters: holds 2 clusters (aaaaa, bbbbb): choose one (check-config --cluster ID)"),
    ("Clusters: {zzzzz: [1]}\n", "Clusters.zzzzz: expected a mapping, got a list"),
])
def test_bad_files(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load(path)
    assert str(e.value) == f"{path}: {message}"


def test_unknown_cluster_id_names_the_ids_found(tmp_path):
    path = write(tmp_path, "Clusters: {aaaaa: {}, bbbbb: {}}\n")
    with pytest.raises(ConfigError) as e:
        load(path, cluster_id="ccccc")
    assert str(e.value) == f'{path}: Clusters: no cluster "ccccc" (found: aaaaa, bbbbb)'


def test_unreadable_files(tmp_path):
    with pytest.raises(ConfigError) as e:
        load(str(tmp_path / "missing.yml"))
    assert str(e.value) == f"{tmp_path / 'missing.yml'}: no such file"
    with pytest.raises(ConfigError) as e:
        load(str(tmp_path))
    assert str(e.value) == f"{tmp_path}: is a directory, not a config file"
    binary = tmp_path / "binary.yml"
    binary.write_bytes(b"Clusters:\n  \xff\xfe\n")
    with pytest.raises(ConfigError) as e:
        load(str(binary))
    assert str(e.value) == f"{binary}: not UTF-8 text (byte 12)"


UNREADABLE = "/proc/self/mem"  # opens, but read() fails with EIO even for root


@pytest.mark.skipif(not os.path.exists(UNREADABLE), reason="needs Linux /proc")
def test_file_that_cannot_be_read(tmp_path):
    with pytest.raises(ConfigError) as e:
        load(UNREADABLE)
    assert str(e.value) == f"{UNREADABLE}: cannot read: Input/output error"
    path = write(tmp_path, site(Containers={"DispatchPrivateKey": f"file://{UNREADABLE}"}))
    with pytest.raises(ConfigError) as e:
        load(path)
    assert str(e.value) == f"{path}: {C}.Containers.DispatchPrivateKey: cannot read {UNREADABLE}: Input/output error"


# --- the dispatcher's SSH key -------------------------------------------------------------------------

def _pem(kind: str, password: bytes | None = None) -> str:
    key = {"ed25519": ed25519.Ed25519PrivateKey.generate,
           "ecdsa": lambda: ec.generate_private_key(ec.SECP256R1()),
           "rsa": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)}[kind]()
    enc = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, enc).decode()


@pytest.mark.parametrize("kind", ["ed25519", "ecdsa", "rsa"])
def test_private_key_inline_and_from_file(tmp_path, kind):
    pem = _pem(kind)
    c = load_doc(tmp_path, site(Containers={"DispatchPrivateKey": pem}))
    assert c.containers.dispatch_private_key == pem
    keyfile = tmp_path / "dispatch.key"
    keyfile.write_text(pem)
    keyfile.chmod(0o600)
    c = load_doc(tmp_path, site(Containers={"DispatchPrivateKey": f"file://{keyfile}"}))
    assert c.containers.dispatch_private_key == pem
    assert c.raw["Containers"]["DispatchPrivateKey"] == f"file://{keyfile}"


def test_bad_private_keys_are_not_echoed(tmp_path):
    secret = "-----BEGIN OPENSSH PRIVATE KEY-----\nc2VjcmV0IG1hdGVyaWFs\n-----END OPENSSH PRIVATE KEY-----\n"
    path = write(tmp_path, site(Containers={"DispatchPrivateKey": secret}))
    with pytest.raises(ConfigError) as e:
        load(path)
    assert str(e.value) == (f"{path}: {C}.Containers.DispatchPrivateKey: the value is not a valid SSH private key "
                            "(not an Ed25519, ECDSA or RSA key in PEM/OpenSSH form)")
    keyfile = tmp_path / "locked.key"
    keyfile.write_text(_pem("ed25519", password=b"hunter2"))
    keyfile.chmod(0o600)
    path = write(tmp_path, site(Containers={"DispatchPrivateKey": f"file://{keyfile}"}))
    with pytest.raises(ConfigError) as e:
        load(path)
    assert str(e.value) == (f"{path}: {C}.Containers.DispatchPrivateKey: {keyfile} is not a valid SSH private key "
                            "(it is passphrase-protected)")


# --- check-config -------------------------------------------------------------------------------------

def test_summary_lists_types_cheapest_first_aligned(tmp_path):
    c = load(str(DATA / "arvados-like.yml"))
    text = summary(c)
    lines = text.splitlines()
    header = next(i for i, l in enumerate(lines) if l.strip().startswith("NAME"))
    rows = lines[header + 1: header + 1 + len(c.instance_types)]
    assert [r.split()[0] for r in rows] == [t.name for t in c.types_by_price()]
    price_col = lines[header].index("PRICE/H") + len("PRICE/H")  # right-aligned column ends line up
    assert all(r[:price_col].endswith(f"{t.price:.4f}") for r, t in zip(rows, c.types_by_price()))
    gpu_row = next(r for r in rows if r.split()[0] == "Standard_NC6s_v3")
    assert "112GiB" in gpu_row and "336GB" in gpu_row and "1x cuda 16GiB" in gpu_row
    assert "  TimeoutIdle                      3m" in lines
    assert "  MaxInstances                     200" in lines


def _check_config(*args, env=None):
    return subprocess.run([sys.executable, "-m", "actors.cli", "check-config", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {}), "PYTHONPATH": str(REPO)})


def test_check_config_ok_prints_effective_values(tmp_path):
    path = write(tmp_path, site(ManagementToken="", Containers={
        "Bogus": 1, "CloudVMs": {"TimeoutIdle": 0, "MaxInstances": 0, "SyncInterval": "90s"}},
        InstanceTypes={"big": {"RAM": "64GiB", "VCPUs": 16, "Price": 1.5}, "m5": {"RAM": "8GiB", "Price": 0.2}}))
    r = _check_config("--config", path)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "Cluster zzzzz: configuration OK" in out and path in out and "driver:            stub" in out
    assert "http://localhost:9006" in out
    assert out.index("  m5 ") < out.index("  big ")  # cheapest first
    assert "  TimeoutIdle                      1m\n" in out   # the fallback, not 0
    assert "  SyncInterval                     1m30s\n" in out
    assert "  MaxInstances                     0 (unlimited)\n" in out
    assert r.stderr.splitlines() == [
        f"dispatch-cloud: warning: {path}: {C}.Containers.Bogus: deprecated or unknown config entry",
        f"dispatch-cloud: warning: {path}: {C}.ManagementToken: is empty: the management API and /metrics "
        "will refuse every request",
    ]


@pytest.mark.parametrize("text, tail", [
    (yaml.safe_dump(site(InstanceTypes={"m5": {"RAM": "16 gigs"}})),
     f'{C}.InstanceTypes.m5.RAM: "16 gigs" is not a size (unknown unit "gigs")'),
    ("Clusters:\n  zzzzz:\n\tbad: 1\n", "line 3 column 1: invalid YAML: found character that cannot start any token"),
    ("Clusters: {aaaaa: {}, bbbbb: {}}\n", "Clusters: holds 2 clusters (aaaaa, bbbbb): choose one (check-config --cluster ID)"),
])
def test_check_config_error_is_one_line(tmp_path, text, tail):
    path = write(tmp_path, text)
    r = _check_config("--config", path)
    assert r.returncode == 1
    assert r.stdout == ""
    assert r.stderr == f"dispatch-cloud: {path}: {tail}\n"
    assert "Traceback" not in r.stderr


def test_check_config_missing_file_and_env_default(tmp_path):
    r = _check_config("--config", str(tmp_path / "nope.yml"))
    assert (r.returncode, r.stderr) == (1, f"dispatch-cloud: {tmp_path / 'nope.yml'}: no such file\n")
    doc = {"Clusters": {"aaaaa": base_site()["Clusters"]["zzzzz"], "bbbbb": base_site()["Clusters"]["zzzzz"]}}
    path = write(tmp_path, doc)
    r = _check_config("--cluster", "bbbbb", env={"ARVADOS_CONFIG": path})
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Cluster bbbbb: configuration OK\n") and path in r.stdout
    assert r.stderr == ""


def test_local_driver_without_types_gets_one_sized_from_this_host(tmp_path):
    doc = site(Containers={"CloudVMs": {"Driver": "local", "DriverParameters": {"StateDir": str(tmp_path / "vms")}}})
    doc["Clusters"]["zzzzz"].pop("InstanceTypes", None)
    c = load_doc(tmp_path, doc)
    assert list(c.instance_types) == ["local"]
    it = c.instance_types["local"]
    assert it.vcpus == (os.cpu_count() or 1) and it.ram > 0 and it.provider_type == "local"


def test_local_driver_bad_parameters_name_the_key(tmp_path):
    doc = site(Containers={"CloudVMs": {"Driver": "local", "DriverParameters": {"BootDelay": "soon"}}})
    doc["Clusters"]["zzzzz"].pop("InstanceTypes", None)
    from cloud.drivers import check
    c = load_doc(tmp_path, doc)  # conf knows nothing of the drivers' parameters ...
    with pytest.raises(ConfigError) as e:
        check(c)  # ... the driver does, and load_config (run, check-config) asks it
    assert "DriverParameters.BootDelay" in str(e.value) and str(e.value).startswith(c.source)


def test_deploy_runner_binary_go_default_is_ignored_with_a_warning(tmp_path, caplog):
    c = load_doc(tmp_path, site(Containers={"CloudVMs": {"DeployRunnerBinary": "/proc/self/exe"}}))
    assert c.cloud_vms.deploy_runner_binary == ""
    assert any("DeployRunnerBinary: /proc/self/exe" in w and "ignored" in w for w in config_warnings(caplog))


def test_deploy_runner_binary_must_be_a_readable_file(tmp_path):
    runner = tmp_path / "crunch-run"
    runner.write_bytes(b"#!/bin/sh\n")
    c = load_doc(tmp_path, site(Containers={"CloudVMs": {"DeployRunnerBinary": str(runner)}}))
    assert c.cloud_vms.deploy_runner_binary == str(runner)
    for bad, why in ((str(tmp_path / "missing"), "not a readable file"), ("crunch-run", "absolute path")):
        with pytest.raises(ConfigError, match=f"{VMS}.DeployRunnerBinary: .*{why}"):
            load_doc(tmp_path, site(Containers={"CloudVMs": {"DeployRunnerBinary": bad}}))


def test_postgresql_connection_and_system_logs(tmp_path):
    c = load_doc(tmp_path, site())
    assert dict(c.postgresql_connection) == {} and c.log_level == "info" and c.log_format == ""
    c = load_doc(tmp_path, site(PostgreSQL={"Connection": {"host": "db.example", "Port": 5432, "user": "arvados",
                                                           "password": "", "dbname": "arvados_production",
                                                           "sslmode": ""}},
                                SystemLogs={"LogLevel": "warn", "Format": "text"}))
    assert dict(c.postgresql_connection) == {"host": "db.example", "port": "5432", "user": "arvados",
                                             "dbname": "arvados_production"}
    assert (c.log_level, c.log_format) == ("warning", "text")
    assert "dispatch lock:     PostgreSQL advisory lock 10005 on db.example:5432/arvados_production" in summary(c)
    c = load_doc(tmp_path, site(PostgreSQL={"Connection": {"host": "db", "password": "hunter2-secret"}}))
    assert c.postgresql_connection["password"] == "hunter2-secret" and "hunter2" not in summary(c)
    for key, value, words in (("LogLevel", "loud", "not a log level"), ("Format", "xml", "not a log format")):
        with pytest.raises(ConfigError, match=f"SystemLogs.{key}: .*{words}"):
            load_doc(tmp_path, site(SystemLogs={key: value}))
    with pytest.raises(ConfigError, match="PostgreSQL.Connection.port"):
        load_doc(tmp_path, site(PostgreSQL={"Connection": {"port": [1]}}))
