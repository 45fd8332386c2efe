"""``dispatch-cloud simulate``: workloads, accounting, determinism, config comparison, report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from actors.simulate import report
from actors.simulate import workload as wl
from actors.simulate.ledger import Ledger, percentile
from actors.simulate.runner import Run, cloud_params
from cloud.stub.driver import StubParams
from tests.simcluster import GiB, cluster, instance_type

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"


def job(id, submit, vcpus, ram, runtime, **kw) -> wl.Job:
    return wl.Job(id=id, submit=submit, vcpus=vcpus, ram=ram, runtime=runtime, **kw)


# --- the ledger, by hand ------------------------------------------------------------------------


def test_ledger_splits_each_instance_by_state_exactly():
    t1, t4 = instance_type(1), instance_type(4)
    a = SimpleNamespace(id="a", instance_type=t1)
    b = SimpleNamespace(id="b", instance_type=t4)
    led = Ledger(start=0.0)
    for ev, vm, at, u in [("create", a, 0, ""), ("create", b, 0, ""), ("ready", a, 100, ""),
                          ("detach", a, 100, "u1"), ("running", a, 100, "u1"), ("destroy", b, 50, ""),
                          ("remove", b, 60, ""), ("exit", a, 3700, "u1"), ("release", a, 3700, "u1"),
                          ("destroy", a, 3760, ""), ("remove", a, 3790, "")]:
        led.on_cloud(ev, vm, at, u)
    assert dict(led.seconds) == {("type1", "booting"): 100, ("type1", "busy"): 3600, ("type1", "idle"): 60,
                                 ("type1", "shutting_down"): 30, ("type4", "booting"): 50,
                                 ("type4", "shutting_down"): 10}
    assert led.total_cost == pytest.approx((3790 * 0.123 + 60 * 0.492) / 3600, abs=1e-12)
    assert (led.peak_instances, led.peak_running, led.running, led.vms) == (2, 1, 0, {})
    assert dict(led.created) == {"type1": 1, "type4": 1}


def test_percentile_is_nearest_rank():
    assert percentile([], 50) is None
    assert [percentile([1, 2, 3, 4], q) for q in (50, 95, 100)] == [2, 4, 4]


# --- a small workload through the real dispatcher, checked by hand ----------------------------------


def test_costs_of_a_hand_computed_workload():
    """A (1 VCPU, 1 h) fits type1 at $0.123/h; B (3 VCPUs, 30 min) fits type4 at $0.492/h; C fits
    nothing. Lower bound: 0.123 + 0.246; packed: B needs 3/4 of a type4. Each container keeps its
    instance busy for exactly its run time; each instance takes exactly DestroyDelay to go."""
    c = cluster(types=(1, 2, 4), driver_parameters={"BootTime": "10s", "BootTimeJitter": "0s",
                                                    "DestroyDelay": "30s"})
    jobs = [job("A", 0, 1, 256 << 20, 3600), job("B", 0, 3, 1 * GiB, 1800), job("C", 5, 64, 1 * GiB, 60)]
    run = Run(c, jobs, params=cloud_params(c, {}, "test"), seed=1)
    life: dict[str, list[float]] = {}
    ledger_listener = run.sim.cloud.listener

    def spy(event, vm, at, uuid):
        if event in ("create", "remove"):
            life.setdefault(vm.id, []).append(at)
        ledger_listener(event, vm, at, uuid)
    run.sim.cloud.listener = spy
    r = run.run().result()
    assert r["lower_bound"] == pytest.approx(0.369, abs=1e-9)
    assert r["lower_bound_packed"] == pytest.approx(0.123 + 0.75 * 0.246, abs=1e-9)
    ih = r["instance_hours"]
    assert sorted(ih) == ["type1", "type4"]
    assert ih["type1"]["hours"]["busy"] == pytest.approx(1.0, abs=1e-6)
    assert ih["type4"]["hours"]["busy"] == pytest.approx(0.5, abs=1e-6)
    for t in ("type1", "type4"):
        assert ih[t]["created"] == 1
        assert ih[t]["hours"]["shutting_down"] == pytest.approx(30 / 3600, abs=1e-6)
        assert 10 / 3600 <= ih[t]["hours"]["booting"] <= 20 / 3600  # boot + at most one probe
    # the bill is each instance's life at its price, as the cloud saw it
    prices = {"inst1": None}
    bill = 0.0
    for vm_id, (created, removed) in life.items():
        price = 0.123 if vm_id.endswith("providertype1") else 0.492
        prices[vm_id] = price
        bill += (removed - created) * price / 3600
    assert len(life) == 2
    assert r["cost"] == pytest.approx(bill, abs=1e-4)
    assert r["cost"] == pytest.approx(sum(v["cost"] for v in ih.values()), abs=1e-3)
    assert r["ratio"] == pytest.approx(r["cost"] / 0.369, abs=1e-3)
    assert r["containers"]["by_state"] == {"Cancelled": 1, "Complete": 2}
    assert r["cancelled"] == {"constraints not satisfiable by any configured instance type": 1}
    assert r["wait"]["count"] == 2 and 10 <= r["wait"]["p50"] <= r["wait"]["max"] < 60
    assert r["peak_instances"] == 2 and r["instances_created"] == 2
    assert r["series"] and r["series"][0]["t"] == 0


def test_workflow_steps_are_submitted_when_their_runner_starts():
    c = cluster(types=(1, 2), driver_parameters={"BootTime": "10s", "BootTimeJitter": "0s"})
    jobs = wl.check([job("wf", 0, 1, 256 << 20, 600), job("s1", 100, 1, 256 << 20, 60, parent="wf")], "t")
    assert jobs[0].supervisor
    run = Run(c, jobs, params=cloud_params(c, {}, "t"), seed=0).run()
    from actors.queue import parse_time
    ctrs = {j: run.containers[s.uuid] for j, s in run.submitted.items()}
    assert set(ctrs) == {"wf", "s1"}
    assert parse_time(ctrs["s1"]["created_at"]) == pytest.approx(parse_time(ctrs["wf"]["started_at"]) + 100)


# --- determinism and comparison (through the command line) ----------------------------------------


CONFIG = """\
Clusters:
  zzzzz:
    SystemRootToken: systemroottokensystemroottoken01
    Services: {{Controller: {{ExternalURL: "https://zzzzz.example.org"}}}}
    Containers:
      ReserveExtraRAM: 0
      CloudVMs:
        Driver: stub
        BootProbeCommand: "true"
        TimeoutIdle: {idle}
        MaxInstances: 8
        DriverParameters: {{BootTime: 30s, BootTimeJitter: 30s, ErrorRateCreate: 0.1,
                            CrunchRunCrashRate: 0.05, QuotaMaxInstances: 6}}
    InstanceTypes:
      small: {{VCPUs: 2, RAM: 4GiB, IncludedScratch: 50GB, Price: 0.1}}
      large: {{VCPUs: 16, RAM: 64GiB, IncludedScratch: 500GB, Price: 0.8}}
"""


def cli(*args, env=None, check=True) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "actors.cli", "simulate", *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, env={**os.environ, **(env or {})})
    if check:
        assert p.returncode == 0, p.stderr
    return p


@pytest.fixture
def configs(tmp_path):
    short, long = tmp_path / "idle-1m.yml", tmp_path / "idle-20m.yml"
    short.write_text(CONFIG.format(idle="1m"))
    long.write_text(CONFIG.format(idle="20m"))
    return short, long


def test_same_seed_gives_byte_identical_reports_in_any_process(tmp_path, configs):
    work = tmp_path / "w.csv"
    work.write_text(wl.to_csv(wl.generate("steady", 40, seed=2)))
    outs = []
    for hashseed in ("1", "2"):  # different string hashing too: nothing may depend on it
        d = tmp_path / f"r{hashseed}"
        p = cli("--config", str(configs[0]), "--workload", str(work), "--seed", "7", "--report", str(d),
                env={"PYTHONHASHSEED": hashseed})
        outs.append((p.stdout, (d / "report.json").read_bytes(), (d / "report.txt").read_bytes()))
    assert outs[0] == outs[1]
    doc = json.loads(outs[0][1])
    r = doc["runs"][0]
    assert r["containers"]["submitted"] == 40 and r["cost"] > 0
    assert r["cloud_errors"]["create_other"] + r["cloud_errors"]["create_quota"] > 0  # the errors did happen
    other = cli("--config", str(configs[0]), "--workload", str(work), "--seed", "8").stdout
    assert other != outs[0][0]  # and the seed matters


def test_two_configs_side_by_side_longer_idle_timeout_costs_idle_hours_saves_boots(tmp_path, configs):
    work = tmp_path / "w.yml"  # one small job every 5 minutes: the idle timeout decides reuse
    work.write_text("jobs:\n" + "".join(f"- {{submit: {i * 300}, vcpus: 1, ram: 1GiB, runtime: 2m}}\n"
                                        for i in range(8)))
    p = cli("--config", str(configs[0]), "--config", str(configs[1]), "--workload", str(work),
            "--report", str(tmp_path / "r"))
    header = p.stdout.splitlines()[1]
    assert "idle-1m.yml" in header and "idle-20m.yml" in header
    (short, long) = json.loads((tmp_path / "r" / "report.json").read_text())["runs"]
    idle = lambda r: sum(t["hours"]["idle"] for t in r["instance_hours"].values())  # noqa: E731
    assert long["instances_created"] < short["instances_created"]
    assert idle(long) > idle(short)
    assert short["containers"]["by_state"] == long["containers"]["by_state"] == {"Complete": 8}


# --- workloads ----------------------------------------------------------------------------------------


def test_import_of_an_arvados_container_list():
    jobs = wl.load(str(DATA / "arvados-containers.json"))
    by = {j.id: j for j in jobs}
    assert [j.id for j in jobs] == ["zzzzz-dz642-aaaaaaaaaaaaaaa", "zzzzz-dz642-ddddddddddddddd",
                                    "zzzzz-dz642-bbbbbbbbbbbbbbb"]  # by created_at; never-started left out
    a, b, d = (by[f"zzzzz-dz642-{x * 15}"] for x in "abd")
    assert (a.submit, a.runtime, a.vcpus, a.ram, a.scratch, a.supervisor, a.priority) == \
        (0, 3600, 1, 512 << 20, 10**9, True, 500)
    assert (b.submit, b.runtime, b.preemptible, b.priority, b.exit_code) == (330.5, 1800, True, 562, 1)
    assert (d.submit, d.runtime, d.gpu, d.vcpus) == (60, 45, 1, 4)
    assert d.container()["runtime_constraints"]["gpu"]["device_count"] == 1


def test_csv_roundtrip_and_generator_shapes():
    for kind in wl.KINDS:
        jobs = wl.generate(kind, 50, seed=1)
        assert len(jobs) == 50 and jobs == wl.generate(kind, 50, seed=1) != wl.generate(kind, 50, seed=2)
        assert wl.parse_csv(wl.to_csv(jobs), "x.csv") == jobs
    burst = wl.generate("burst", 50, 1)
    assert max(j.submit for j in burst) <= 300 and min(j.vcpus for j in burst) >= 8
    mixed = wl.generate("mixed", 200, 1)
    runners = {j.id for j in mixed if j.supervisor}
    assert runners and all(j.parent in runners for j in mixed if j.parent)
    assert sorted(wl.shipped()) == ["burst-alignment", "mixed-day", "steady-small"]
    assert len(wl.load("steady-small")) == 1000


@pytest.mark.parametrize("text, message", [
    ("submit,vcpus,ram,runtime\n0,2,4GiB,10m\n5,two,1GiB,1m\n", "w.csv: line 3: vcpus: not an integer (got 'two')"),
    ("submit,vcpus,ram\n0,1,1GiB\n", "w.csv: line 1: header lacks runtime"),
    ("submit,vcpus,ram,runtime,colour\n0,1,1GiB,1m,red\n", "w.csv: line 2: unknown key 'colour'"),
    ("id,submit,vcpus,ram,runtime,parent\nx,0,1,1GiB,1m,y\n", "w.csv: job 'x': parent: 'y' is not an earlier job"),
])
def test_bad_workload_is_one_line_naming_file_row_and_key(tmp_path, text, message):
    (tmp_path / "w.csv").write_text(text)
    with pytest.raises(wl.WorkloadError) as e:
        wl.load(str(tmp_path / "w.csv"))
    assert str(e.value).replace(str(tmp_path) + "/", "").startswith(message)


def test_command_errors_are_one_line(tmp_path, configs):
    (tmp_path / "w.csv").write_text("submit,vcpus,ram,runtime\n0,1,lots,1m\n")
    p = cli("--config", str(configs[0]), "--workload", str(tmp_path / "w.csv"), check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.strip().endswith("w.csv: line 2: ram: not a size (got 'lots')")
    p = cli("--config", str(configs[0]), "--workload", "steady-small", "--cloud", "BootTme=1m", check=False)
    assert p.returncode == 1 and "--cloud.BootTme: unknown stub driver parameter" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_cloud_overrides_apply_to_any_driver():
    azure = cluster(driver="azure", driver_parameters={"SubscriptionID": "x"})
    p = cloud_params(azure, {"BootTime": "2m", "QuotaMaxInstances": "5", "CapacityErrorTypes": "[a, b]"}, "f")
    assert (p.boot_time, p.boot_time_jitter, p.quota_max_instances, p.capacity_error_types) == (120, 60, 5, ("a", "b"))
    assert cloud_params(cluster(), {}, "f") == StubParams.from_driver_parameters(cluster().cloud_vms.driver_parameters)


# --- the HTML report ----------------------------------------------------------------------------------


def test_html_report_has_valid_png_plots(tmp_path):
    c = cluster(types=(1, 2), driver_parameters={"BootTime": "10s", "BootTimeJitter": "0s"})
    jobs = [job(str(i), i * 30, 1, 256 << 20, 300) for i in range(5)]
    runs = [(name, Run(c, jobs, params=cloud_params(c, {}, "t"), seed=s).run().result())
            for name, s in (("a", 1), ("b", 2))]
    files = report.write(runs, "w.csv", tmp_path)
    page = (tmp_path / "index.html").read_text()
    from PIL import Image
    for name, _ in report.PLOTS:
        assert f'<img src="{name}"' in page
        data = (tmp_path / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        with Image.open(tmp_path / name) as im:
            im.verify()
        with Image.open(tmp_path / name) as im:
            assert im.size[0] >= 600 and len(im.convert("L").getcolors(1 << 16)) > 10  # something is drawn
    assert {f.name for f in files} >= {"index.html", "report.json", "report.txt"}
    assert "<th>a</th><th>b</th>" in page and "cost / lower bound" in page
