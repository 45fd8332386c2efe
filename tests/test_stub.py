"""The stub cloud driver: cloud operations and their errors, the fake shell and the simulated
crunch-run, all on a FakeClock; plus real-time mode and a run against the real API server."""

from __future__ import annotations

import json
import logging
import threading
import time

import pytest

from cloud.clock import FakeClock, SystemClock
from cloud import base
from cloud.base import (CapacityError, CloudError, ExecutorError, QuotaError, RateLimitError,
                        capacity_scope, is_quota_error, rate_limit_retry_at)
from cloud.stub.driver import StubCloud, StubInstanceSet, driver
from cloud.stub.vm import StubParams, StubParamsError, parse_runner_args
from conf.model import Cluster, CloudVMs, Containers, InstanceType

UUID1 = "zzzzz-dz642-000000000000001"
UUID2 = "zzzzz-dz642-000000000000002"
SECRET = "0123456789abcdef0123456789abcdef01234567"
INIT = f'umask 0177 && echo -n "{SECRET}" >/var/run/arvados-instance-secret\n'
SET_TAG = "ArvadosInstanceSetID"


def itype(i: int, preemptible: bool = False) -> InstanceType:
    return InstanceType(name=f"type{i}", provider_type=f"providertype{i}", vcpus=i,
                        ram=(i << 30) * 11 // 10, included_scratch=i << 30, added_scratch=0,
                        price=i * 0.123, preemptible=preemptible)


class FakeAPI:
    """A container API with Arvados' state rules, for the stub's own tests (no HTTP)."""

    NEXT = {"Queued": {"Locked", "Cancelled"}, "Locked": {"Queued", "Running", "Cancelled"},
            "Running": {"Complete", "Cancelled"}}

    def __init__(self):
        self.containers: dict[str, dict] = {}
        self.calls: list = []
        self.fail = False

    def add(self, uuid, state="Locked"):
        self.containers[uuid] = {"uuid": uuid, "state": state, "exit_code": None}

    def state(self, uuid):
        return self.containers[uuid]["state"]

    def factory(self, host, token):
        self.calls.append(("client", host, token))
        return _FakeClient(self)


class _FakeClient:
    def __init__(self, api):
        self.api = api

    def get_container(self, uuid):
        if self.api.fail:
            raise ConnectionError("API down")
        return dict(self.api.containers[uuid])

    def update(self, uuid, fields):
        if self.api.fail:
            raise ConnectionError("API down")
        ctr = self.api.containers[uuid]
        new = fields.get("state", ctr["state"])
        if new != ctr["state"] and new not in self.NEXT.get(ctr["state"], ()):
            raise RuntimeError(f"422 cannot change state from {ctr['state']} to {new}")
        ctr.update(fields)
        return dict(ctr)

    NEXT = FakeAPI.NEXT


def config_data(host="api.example:443", token="systoken") -> bytes:
    return json.dumps({"Env": {"ARVADOS_API_HOST": host, "ARVADOS_API_TOKEN": token,
                               "InstanceType": "{}", "GatewayAddress": "stub-inst1:0"},
                       "KeepBuffers": 0, "EC2SpotCheck": False, "Cluster": None}).encode()


def detach_cmd(uuid, runner="crunch-run"):
    return f"{runner} --detach --stdin-config '--runtime-engine=stub' '--foo' '--extra='\\''args'\\''' '{uuid}'"


def make_cloud(clock=None, api=None, **knobs) -> StubCloud:
    knobs.setdefault("boot_time", 5.0)
    knobs.setdefault("boot_time_jitter", 0.0)
    knobs.setdefault("container_run_time", 10.0)
    return StubCloud(clock or FakeClock(), StubParams(**knobs),
                     api_factory=(api or FakeAPI()).factory, seed=1)


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def api():
    return FakeAPI()


def booted_vm(cloud, clock, it=None, tags=None):
    """Create a VM and step the clock past its boot."""
    iset = cloud.instance_set("set1")
    inst = iset.create(it or itype(1), "img", tags or {SET_TAG: "set1"}, INIT, None)
    clock.set(cloud.vm(inst.id).boot_at)
    return iset, inst, iset.make_executor(inst)


def run(ex, cmd, stdin=b""):
    r = ex.execute(cmd, stdin)
    return r.exit_status, r.stdout.decode(), r.stderr.decode()


# ---------------------------------------------------------------------------------------------
# Parameters


def test_params_from_driver_parameters_camelcase_and_go_durations():
    p = StubParams.from_driver_parameters({
        "ErrorRateCreate": 0.25, "MinTimeBetweenCreateCalls": "1m30s", "QuotaMaxInstances": 3,
        "CapacityErrorTypes": ["a", "b"], "CapacityErrorAll": True, "BootTime": "250ms",
        "ContainerRunTime": 2, "Seed": 7})
    assert p.error_rate_create == 0.25 and p.min_time_between_create_calls == 90.0
    assert p.quota_max_instances == 3 and p.capacity_error_types == ("a", "b")
    assert p.capacity_error_all is True and p.boot_time == 0.25 and p.container_run_time == 2.0
    assert p.seed == 7
    assert StubParams.from_driver_parameters({}) == StubParams()
    assert StubParams().boot_time == 3.0 and StubParams().container_run_time == 3.0


@pytest.mark.parametrize("raw, key", [
    ({"ErorRateCreate": 0.1}, "ErorRateCreate"),
    ({"ErrorRateCreate": 1.5}, "ErrorRateCreate"),
    ({"BootTime": "3 parsecs"}, "BootTime"),
    ({"BootTime": "-1s"}, "BootTime"),
    ({"QuotaMaxInstances": "ten"}, "QuotaMaxInstances"),
    ({"CapacityErrorTypes": "a"}, "CapacityErrorTypes"),
    ({"CapacityErrorAll": "yes"}, "CapacityErrorAll"),
])
def test_params_bad_values_name_the_key(raw, key):
    with pytest.raises(StubParamsError) as e:
        StubParams.from_driver_parameters(raw, "cfg.yml: DriverParameters")
    assert f"cfg.yml: DriverParameters.{key}:" in str(e.value)


def test_driver_rejects_bad_parameters_with_the_key(clock):
    cluster = Cluster(source="/etc/arvados/config.yml")
    with pytest.raises(StubParamsError, match=r"config.yml: .*DriverParameters.BootTime"):
        driver({"BootTime": "soon"}, "set1", cluster=cluster, clock=clock, logger=None)


def test_parse_runner_args():
    c = parse_runner_args(["--detach", "--stdin-config", "--runtime-engine=stub", "--foo", UUID1])
    assert (c.detach, c.stdin_config, c.uuid, c.error) == (True, True, UUID1, "")
    c = parse_runner_args(["--kill", "15", UUID1])
    assert (c.kill, c.uuid) == (15, UUID1)
    assert parse_runner_args(["--list", "--stdin-prices"]).stdin_prices
    assert "container-uuid" in parse_runner_args(["--detach"]).error
    assert parse_runner_args(["-kill"]).error


# ---------------------------------------------------------------------------------------------
# Cloud operations


def test_create_and_list_through_the_wrapper_stack(clock):
    cloud = make_cloud(clock)
    iset = cloud.instance_set("set1")
    wrapped = base.wrap(iset, resource_tags={"team": "x"})
    a = wrapped.create(itype(1), "img", {SET_TAG: "set1"}, INIT, None)
    b = wrapped.create(itype(2, preemptible=True), "img", {SET_TAG: "set1"}, INIT, "ssh-rsa AAA")
    other = cloud.instance_set("set2").create(itype(3), "img", {SET_TAG: "set2"}, "", None)
    assert (a.id, b.id, other.id) == ("inst1,providertype1", "inst2,providertype2",
                                      "inst3,providertype3")
    assert a.address == "stub-inst1" and a.remote_user == "root"
    assert a.provider_type == "providertype1" and a.price_history(itype(1)) == []
    assert a.verify_host_key(None, None) is None
    assert dict(a.tags) == {"team": "x", SET_TAG: "set1"}
    assert iset.instance_quota_group(itype(2)) == "p"
    assert iset.instance_quota_group(itype(2, preemptible=True)) == "p-p"
    # the driver itself returns everything; the wrapper filters by tag
    assert [i.id for i in iset.instances({SET_TAG: "set1"})] == [a.id, b.id, other.id]
    assert sorted(i.id for i in wrapped.instances({SET_TAG: "set1"})) == [a.id, b.id]
    assert cloud.vm(b.id).public_key == "ssh-rsa AAA" and cloud.vm(a.id).init_command == INIT


def test_set_tags_is_applied_by_the_next_advance(clock):
    cloud = make_cloud(clock)
    iset = cloud.instance_set("set1")
    inst = iset.create(itype(1), "img", {SET_TAG: "set1", "ArvadosIdleBehavior": "run"}, "", None)
    inst.set_tags({SET_TAG: "set1", "ArvadosIdleBehavior": "hold"})
    assert inst.tags["ArvadosIdleBehavior"] == "run"  # a snapshot stays as it was
    assert cloud.vm(inst.id).tags["ArvadosIdleBehavior"] == "run"  # not applied yet
    assert cloud.next_event_time() == clock.now()
    cloud.advance()
    assert cloud.vm(inst.id).tags["ArvadosIdleBehavior"] == "hold"
    assert iset.instances({})[0].tags["ArvadosIdleBehavior"] == "hold"


def test_create_rate_limit_gives_exact_earliest_retry(clock):
    cloud = make_cloud(clock, min_time_between_create_calls=10.0)
    iset = cloud.instance_set("set1")
    t0 = clock.now()
    iset.create(itype(1), "img", {}, "", None)
    clock.advance(4)
    with pytest.raises(RateLimitError) as e:
        iset.create(itype(1), "img", {}, "", None)
    assert rate_limit_retry_at(e.value) == t0 + 10
    clock.advance(6)
    iset.create(itype(1), "img", {}, "", None)  # exactly at earliest_retry: allowed


def test_instances_rate_limit_gives_exact_earliest_retry(clock):
    cloud = make_cloud(clock, min_time_between_instances_calls=3.0)
    iset = cloud.instance_set("set1")
    t0 = clock.now()
    iset.instances({})
    clock.advance(1)
    with pytest.raises(RateLimitError) as e:
        iset.instances({})
    assert e.value.earliest_retry == t0 + 3
    clock.advance(2)
    assert iset.instances({}) == []


def test_quota_error_at_max_instances_and_ok_after_a_destroy(clock):
    cloud = make_cloud(clock, quota_max_instances=2)
    iset = cloud.instance_set("set1")
    a = iset.create(itype(1), "img", {}, "", None)
    iset.create(itype(1), "img", {}, "", None)
    with pytest.raises(QuotaError, match="reached QuotaMaxInstances 2") as e:
        iset.create(itype(1), "img", {}, "", None)
    assert is_quota_error(e.value)
    a.destroy()
    iset.create(itype(1), "img", {}, "", None)
    assert len(cloud.vms) == 2


def test_capacity_errors_by_type_group_and_all(clock):
    cloud = make_cloud(clock, capacity_error_types=("providertype6",),
                       capacity_error_quota_groups=("p-p",))
    iset = cloud.instance_set("set1")
    t6 = itype(6)
    with pytest.raises(CapacityError) as e:
        iset.create(t6, "img", {}, "", None)
    assert capacity_scope(e.value, t6, iset.instance_quota_group(t6)) == ("type", "providertype6", False)
    t2p = itype(2, preemptible=True)
    with pytest.raises(CapacityError) as e:
        iset.create(t2p, "img", {}, "", None)
    assert capacity_scope(e.value, t2p, iset.instance_quota_group(t2p)) == ("group", "p-p")
    iset.create(itype(2), "img", {}, "", None)  # on-demand providertype2: fine
    cloud_all = make_cloud(clock, capacity_error_all=True)
    with pytest.raises(CapacityError) as e:
        cloud_all.instance_set("s").create(itype(1), "img", {}, "", None)
    assert capacity_scope(e.value, itype(1), "p") == ("all",)
    assert cloud_all.vms == []


def test_setup_vm_hook_sets_knobs_or_fails_the_create(clock):
    cloud = make_cloud(clock)

    def setup(vm):
        if vm.provider_type == "providertype6":
            raise CapacityError("no type6 today", instance_type_specific=True)
        vm.crunch_run_missing = True
    cloud.setup_vm = setup
    iset = cloud.instance_set("set1")
    with pytest.raises(CapacityError):
        iset.create(itype(6), "img", {}, "", None)
    inst = iset.create(itype(1), "img", {}, "", None)
    assert [v.id for v in cloud.vms] == [inst.id] and cloud.vm(inst.id).crunch_run_missing


def test_error_rates_with_a_seed_are_about_right_and_repeatable(clock):
    def errors(seed):
        cloud = StubCloud(clock, StubParams(error_rate_create=0.3, error_rate_destroy=0.2),
                          seed=seed)
        iset = cloud.instance_set("s")
        created, create_errs = [], 0
        for _ in range(1000):
            try:
                created.append(iset.create(itype(1), "img", {}, "", None))
            except CloudError as e:
                assert "ErrorRateCreate" in str(e) and not isinstance(e, (QuotaError, RateLimitError))
                create_errs += 1
        destroy_errs = 0
        for inst in created:
            try:
                inst.destroy()
            except CloudError as e:
                assert "could not be destroyed" in str(e)
                destroy_errs += 1
        return create_errs, destroy_errs, len(created)
    c, d, n = errors(42)
    assert 250 <= c <= 350
    assert 0.15 * n <= d <= 0.25 * n
    assert errors(42) == (c, d, n)


def test_create_after_stop_fails_and_stop_is_idempotent(clock):
    iset = make_cloud(clock).instance_set("set1")
    iset.stop()
    iset.stop()
    with pytest.raises(CloudError, match="Create called after Stop"):
        iset.create(itype(1), "img", {}, "", None)


def test_held_cloud_ops_block_until_released(clock):
    cloud = make_cloud(clock)
    iset = cloud.instance_set("set1")
    cloud.hold_cloud_ops()
    results = []
    t = threading.Thread(target=lambda: results.append(iset.create(itype(1), "img", {}, "", None)))
    t.start()
    try:
        assert cloud.wait_held(1, timeout=5)
        assert results == [] and cloud.vms == []
        cloud.release_cloud_ops(1)
        t.join(timeout=5)
        assert not t.is_alive() and len(results) == 1 and len(cloud.vms) == 1
    finally:
        cloud.stop()
        t.join(timeout=5)


# ---------------------------------------------------------------------------------------------
# The fake shell


def test_boot_gating_and_instance_secret(clock):
    cloud = make_cloud(clock, boot_time=5.0)
    iset = cloud.instance_set("set1")
    inst = iset.create(itype(1), "img", {}, INIT, None)
    ex = iset.make_executor(inst)
    status, _, err = run(ex, "true")
    assert status == 1 and "stub is booting, ETA 5.000s" in err
    assert cloud.next_event_time() == clock.now() + 5
    clock.advance(5)
    assert run(ex, "true")[0] == 0
    assert run(ex, "systemctl is-system-running")[0] == 0
    assert run(ex, "cat /var/run/arvados-instance-secret") == (0, SECRET, "")
    assert run(ex, "sudo cat /var/run/arvados-instance-secret") == (0, SECRET, "")
    status, _, err = run(ex, "rm -rf /")
    assert status == 1 and err == '"rm -rf /": command not found\n'
    no_secret = iset.create(itype(1), "img", {}, "", None)
    clock.advance(5)
    assert run(iset.make_executor(no_secret), "cat /var/run/arvados-instance-secret")[0] == 1
    assert [r.command for r in cloud.vm(inst.id).commands][:2] == ["true", "true"]


def test_configured_boot_probe_and_runner_command(clock, api):
    cluster = Cluster(containers=Containers(
        crunch_run_command="/opt/arvados/bin/my-runner",
        cloud_vms=CloudVMs(boot_probe_command="docker ps -q")))
    cloud = make_cloud(clock, api)
    iset = driver({}, "set1", cluster=cluster, clock=clock, cloud=cloud)
    assert isinstance(iset, StubInstanceSet)
    _, inst, ex = booted_vm(cloud, clock)
    assert run(ex, "docker ps -q")[0] == 0
    assert run(ex, "/opt/arvados/bin/my-runner --list") == (0, "", "")
    api.add(UUID1)
    assert run(ex, detach_cmd(UUID1, "sudo /tmp/arvados-crunch-run/crunch-run~0123abcd"),
               config_data())[0] == 0
    assert run(ex, "sudo /opt/arvados/bin/my-runner --list")[1] == UUID1 + "\n"


def test_detach_list_and_complete(clock, api):
    cloud = make_cloud(clock, api, container_run_time=10.0, crunch_run_detach_delay=2.0,
                       container_exit_code=3)
    _, inst, ex = booted_vm(cloud, clock)
    api.add(UUID1)
    status, out, _ = run(ex, detach_cmd(UUID1), config_data("h.example:8443", "tok1"))
    assert status == 0
    reply = json.loads(out)
    assert reply["UUID"] == UUID1 and isinstance(reply["PID"], int)
    assert run(ex, "crunch-run --list") == (0, UUID1 + "\n", "")
    clock.advance(1.9)
    cloud.advance()
    assert api.state(UUID1) == "Locked"  # the detach delay has not passed
    clock.advance(0.1)
    cloud.advance()
    assert api.state(UUID1) == "Running"
    assert ("client", "h.example:8443", "tok1") in api.calls
    clock.advance(9.9)
    assert run(ex, "crunch-run --list --stdin-prices", b"[]")[1] == UUID1 + "\n"
    clock.advance(0.1)
    assert run(ex, "crunch-run --list") == (0, "", "")
    assert api.containers[UUID1]["state"] == "Complete"
    assert api.containers[UUID1]["exit_code"] == 3


def test_execute_container_hook_sets_exit_code(clock, api):
    cloud = make_cloud(clock, api)
    _, inst, ex = booted_vm(cloud, clock)
    seen = []
    cloud.vm(inst.id).execute_container = lambda ctr: seen.append(ctr["uuid"]) or 7
    api.add(UUID1)
    run(ex, detach_cmd(UUID1), config_data())
    clock.advance(10)
    cloud.advance()
    assert seen == [UUID1] and api.containers[UUID1]["exit_code"] == 7


@pytest.mark.parametrize("stdin, why", [
    (b"", "error decoding stdin config"),
    (b"{\"Env\": {\"ARVADOS_API_HOST\": \"h\"}}", "ARVADOS_API_TOKEN"),
    (b"{\"Env\": {\"ARVADOS_API_HOST\": \"\", \"ARVADOS_API_TOKEN\": \"t\"}}", "ARVADOS_API_HOST"),
])
def test_detach_rejects_bad_config_data(clock, api, stdin, why):
    cloud = make_cloud(clock, api)
    _, _, ex = booted_vm(cloud, clock)
    status, _, err = run(ex, detach_cmd(UUID1), stdin)
    assert status == 1 and why in err
    assert run(ex, "crunch-run --list")[1] == ""


def test_duplicate_detach_fails_with_lock_error(clock, api):
    cloud = make_cloud(clock, api)
    _, _, ex = booted_vm(cloud, clock)
    api.add(UUID1)
    assert run(ex, detach_cmd(UUID1), config_data())[0] == 0
    status, _, err = run(ex, detach_cmd(UUID1), config_data())
    assert status == 1
    assert err == f"lock /var/lock/crunch-run-{UUID1}.lock: resource temporarily unavailable\n"


def test_kill_before_running_leaves_container_locked(clock, api):
    cloud = make_cloud(clock, api, crunch_run_detach_delay=5.0)
    _, _, ex = booted_vm(cloud, clock)
    api.add(UUID1)
    run(ex, detach_cmd(UUID1), config_data())
    assert run(ex, f"crunch-run --kill 15 {UUID1}")[0] == 0
    clock.advance(30)
    assert run(ex, "crunch-run --list")[1] == ""
    assert api.state(UUID1) == "Locked"


def test_kill_after_running_cancels_the_container(clock, api):
    cloud = make_cloud(clock, api)
    _, _, ex = booted_vm(cloud, clock)
    api.add(UUID1)
    run(ex, detach_cmd(UUID1), config_data())
    cloud.advance()
    assert api.state(UUID1) == "Running"
    clock.advance(3)
    assert run(ex, f"sudo crunch-run --kill 15 {UUID1}")[0] == 0
    assert api.state(UUID1) == "Cancelled"
    assert run(ex, "crunch-run --list")[1] == ""


def test_kill_of_a_process_that_is_not_running_exits_0(clock, api):
    cloud = make_cloud(clock, api)
    _, _, ex = booted_vm(cloud, clock)
    assert run(ex, f"crunch-run --kill 15 {UUID2}")[0] == 0


def test_api_errors_end_the_process_quietly(clock, api, caplog):
    cloud = make_cloud(clock, api)
    _, _, ex = booted_vm(cloud, clock)
    api.add(UUID1, state="Cancelled")  # cancelled before crunch-run got to it
    api.add(UUID2)
    run(ex, detach_cmd(UUID1), config_data())
    api.fail = True
    run(ex, detach_cmd(UUID2), config_data())
    with caplog.at_level(logging.WARNING, logger="cloud.stub.driver"):
        cloud.advance()
    assert run(ex, "crunch-run --list")[1] == ""
    assert api.state(UUID1) == "Cancelled" and api.state(UUID2) == "Locked"
    failed = [r for r in caplog.records if r.getMessage() == "stub crunch-run: API call failed"]
    assert {r.ContainerUUID for r in failed} == {UUID1, UUID2}


def test_stale_lock_after_exit_until_arv_mount_lag_passes(clock, api):
    cloud = make_cloud(clock, api, arv_mount_max_exit_lag=100.0)
    _, inst, ex = booted_vm(cloud, clock)
    api.add(UUID1)
    run(ex, detach_cmd(UUID1), config_data())
    clock.advance(10)
    assert run(ex, "crunch-run --list")[1] == UUID1 + " stale\n"
    assert api.state(UUID1) == "Complete"
    # a stale lock also blocks a new start, like a lock file held by arv-mount
    assert run(ex, detach_cmd(UUID1), config_data())[0] == 1
    clock.advance(100)
    assert run(ex, "crunch-run --list")[1] == ""


def test_deadlocked_lock_stays_stale_forever(clock, api):
    cloud = make_cloud(clock, api, arv_mount_deadlock_rate=1.0)
    _, _, ex = booted_vm(cloud, clock)
    api.add(UUID1)
    run(ex, detach_cmd(UUID1), config_data())
    clock.advance(10)
    assert run(ex, "crunch-run --list")[1] == UUID1 + " stale\n"
    clock.advance(86400)
    assert run(ex, "crunch-run --list")[1] == UUID1 + " stale\n"
    assert cloud.next_event_time() is None


def test_broken_vm_fails_every_command_with_cannot_fork(clock):
    cloud = make_cloud(clock, broken_rate=1.0, broken_after=60.0)
    _, inst, ex = booted_vm(cloud, clock)
    vm = cloud.vm(inst.id)
    assert vm.boot_at <= vm.broken_at <= vm.boot_at + 60
    if clock.now() < vm.broken_at:
        assert run(ex, "true")[0] == 0
    clock.set(vm.broken_at)
    assert run(ex, "true") == (2, "", "cannot fork\n")
    assert run(ex, "crunch-run --list")[0] == 2


def test_report_broken_shows_in_list(clock, api):
    cloud = make_cloud(clock, api)
    _, inst, ex = booted_vm(cloud, clock)
    api.add(UUID1)
    run(ex, detach_cmd(UUID1), config_data())
    cloud.vm(inst.id).report_broken_at = clock.now() + 1
    assert run(ex, "crunch-run --list")[1] == UUID1 + "\n"
    clock.advance(1)
    assert run(ex, "crunch-run --list") == (0, UUID1 + "\nbroken\n", "")


def test_crunch_run_missing(clock):
    cloud = make_cloud(clock, crunch_run_missing_rate=1.0)
    _, _, ex = booted_vm(cloud, clock)
    assert run(ex, "crunch-run --list") == (1, "", "crunch-run: command not found\n")
    assert run(ex, detach_cmd(UUID1), config_data())[0] == 1
    assert run(ex, "true")[0] == 0


def test_crash_early_and_late(clock, api):
    cloud = make_cloud(clock, api, crunch_run_crash_rate=1.0)
    _, inst, ex = booted_vm(cloud, clock)
    uuids = [f"zzzzz-dz642-{i:015d}" for i in range(20)]
    for u in uuids:
        api.add(u)
        assert run(ex, detach_cmd(u), config_data())[0] == 0
    clock.advance(20)
    cloud.advance()
    assert run(ex, "crunch-run --list")[1] == ""  # every process has gone
    states = {u: api.state(u) for u in uuids}
    early = [u for u in uuids if states[u] == "Locked"]  # crashed before Running
    late = [u for u in uuids if states[u] == "Running"]  # crashed after, never completed
    assert early and late and len(early) + len(late) == len(uuids)


def test_destroy_kills_processes_and_removes_the_vm_after_delay(clock, api):
    cloud = make_cloud(clock, api, destroy_delay=30.0)
    iset, inst, ex = booted_vm(cloud, clock)
    api.add(UUID1)
    run(ex, detach_cmd(UUID1), config_data())
    cloud.advance()
    inst.destroy()
    assert run(ex, "true")[0] == 1
    clock.advance(10)
    cloud.advance()
    assert api.state(UUID1) == "Running"  # left as it was: the dispatcher must cope
    assert [i.id for i in iset.instances({})] == [inst.id]  # still listed while destroying
    clock.advance(20)
    assert iset.instances({}) == []
    with pytest.raises(ExecutorError):
        ex.execute("true")
    inst.destroy()  # destroying a gone VM is harmless


def test_executor_close(clock):
    cloud = make_cloud(clock)
    _, _, ex = booted_vm(cloud, clock)
    ex.close()
    with pytest.raises(ExecutorError):
        ex.execute("true")


def test_second_instance_set_over_same_cloud_sees_vms_and_processes(clock, api):
    cloud = make_cloud(clock, api)
    iset1, inst, ex1 = booted_vm(cloud, clock, tags={SET_TAG: "set1", "ArvadosInstanceType": "type1"})
    api.add(UUID1)
    run(ex1, detach_cmd(UUID1), config_data())
    cloud.advance()
    iset1.stop()  # the first dispatcher goes away

    iset2 = cloud.instance_set("set1")
    listed = base.wrap(iset2, resource_tags={}).instances({SET_TAG: "set1"})
    assert [(i.id, dict(i.tags)) for i in listed] == [
        (inst.id, {SET_TAG: "set1", "ArvadosInstanceType": "type1"})]
    ex2 = iset2.make_executor(listed[0])
    assert run(ex2, "crunch-run --list")[1] == UUID1 + "\n"
    assert iset2.create(itype(2), "img", {}, "", None).id == "inst2,providertype2"
    clock.advance(10)
    cloud.advance()
    assert api.state(UUID1) == "Complete"


def test_same_seed_same_cloud(clock):
    def trace():
        c = FakeClock()
        cloud = StubCloud(c, StubParams(boot_time_jitter=10, broken_rate=0.5,
                                        crunch_run_missing_rate=0.5), seed=99)
        iset = cloud.instance_set("s")
        for i in range(10):
            iset.create(itype(1), "img", {}, "", None)
        return [(v.boot_at - c.now(), v.broken_at, v.crunch_run_missing) for v in cloud.vms]
    a = trace()
    assert a == trace()
    assert len({x[0] for x in a}) > 1 and any(x[2] for x in a) and not all(x[2] for x in a)


# ---------------------------------------------------------------------------------------------
# Real time


def test_realtime_mode_runs_its_own_thread_and_stops(caplog):
    iset = driver({"BootTime": "0s", "BootTimeJitter": "0s"}, "set1", cluster=Cluster(),
                  clock=SystemClock(), logger=None)
    cloud = iset.cloud
    try:
        assert cloud.realtime
        inst = iset.create(itype(1), "img", {SET_TAG: "set1"}, "", None)
        inst.set_tags({SET_TAG: "set1", "x": "y"})
        deadline = time.monotonic() + 5
        while cloud.vm(inst.id).tags.get("x") != "y" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert cloud.vm(inst.id).tags.get("x") == "y"  # applied with nobody calling the cloud
    finally:
        iset.stop()
    assert not cloud.realtime
    assert not any(t.name == "stub-cloud-clock" for t in threading.enumerate())


def test_realtime_commands_and_creates_do_not_wait_for_other_vms_events():
    """Issue 15: with 200 fake crunch-runs calling the API from the events thread, every detach
    and create waited up to DUE_WAIT (1 s) for it. In real time the clock thread runs events, so
    a VM's command (and a create) goes ahead at once."""
    iset = driver({"BootTime": "0s", "BootTimeJitter": "0s"}, "set1", cluster=Cluster(),
                  clock=SystemClock(), logger=None)
    cloud = iset.cloud
    try:
        inst = iset.create(itype(1), "img", {SET_TAG: "set1"}, "", None)
        ex = iset.make_executor(inst)
        held, release = threading.Event(), threading.Event()

        def busy():  # another thread is running events (a fake crunch-run waiting on the API)
            with cloud._events_lock:
                held.set()
                release.wait(10)
        t = threading.Thread(target=busy)
        t.start()
        try:
            assert held.wait(5)
            t0 = time.monotonic()
            ex.execute("true")
            iset.create(itype(1), "img", {SET_TAG: "set1"}, "", None)
            took = time.monotonic() - t0
        finally:
            release.set()
            t.join(10)
        assert took < 0.5, f"waited {took:.2f}s for another thread's events"
    finally:
        iset.stop()


def test_realtime_commands_never_run_other_vms_events_themselves():
    """Issue 15: a detach that found the events lock free ran the whole backlog of due events
    (1,000 fake crunch-runs' API calls) in the worker's thread: one start waited 45 s."""
    cloud = StubCloud(SystemClock(), StubParams(boot_time=0.0, boot_time_jitter=0.0), seed=1)
    cloud.start_realtime(interval=3600)  # a clock thread that will not come round in this test
    try:
        iset = cloud.instance_set("set1")
        inst = iset.create(itype(1), "img", {SET_TAG: "set1"}, "", None)
        ran = []
        cloud._schedule(0.0, "someone else's event", lambda at: ran.append(threading.current_thread()))
        iset.make_executor(inst).execute("true")
        iset.create(itype(1), "img", {SET_TAG: "set1"}, "", None)
        assert ran == []  # left to the clock thread
    finally:
        cloud.stop()


# ---------------------------------------------------------------------------------------------
# The simulated crunch-run against the real API server, over HTTP on loopback


@pytest.fixture
def api_server():
    from api.arvados.server import serve
    from api.arvados.store import ContainerStore
    store = ContainerStore(":memory:")
    store.add_token("systemroottoken", admin=True)
    server = serve(store, "127.0.0.1", 0)
    try:
        yield store, server
    finally:
        server.stop()
        store.close()


def _queued_locked_container(server):
    from api.arvados.client import ArvadosClient
    client = ArvadosClient(server.url, "systemroottoken", retries=0)
    ctr = client.create_container({"container_image": "img", "command": ["echo", "hi"],
                                   "runtime_constraints": {"vcpus": 1, "ram": 1 << 30}})
    client.lock(ctr["uuid"])
    return client, ctr["uuid"]


def _http_config(server) -> bytes:
    host = server.url.split("://", 1)[1].rstrip("/")  # host:port, as ARVADOS_API_HOST carries it
    return config_data(host=host, token="systemroottoken")


def _state(store, uuid):
    from api.arvados.store import TokenInfo
    return store.get(uuid, caller=TokenInfo(uuid="test", admin=True))


def test_crunch_run_completes_a_container_through_the_real_api_server(clock, api_server):
    store, server = api_server
    cloud = StubCloud(clock, StubParams(boot_time=1, boot_time_jitter=0, container_run_time=5),
                      seed=3)  # default api_factory: the real HTTP client
    _, _, ex = booted_vm(cloud, clock)
    client, uuid = _queued_locked_container(server)
    try:
        assert run(ex, detach_cmd(uuid), _http_config(server))[0] == 0
        cloud.advance()
        assert _state(store, uuid)["state"] == "Running"
        clock.advance(5)
        cloud.advance()
        ctr = _state(store, uuid)
        assert (ctr["state"], ctr["exit_code"]) == ("Complete", 0)
        assert run(ex, "crunch-run --list")[1] == ""
    finally:
        client.close()
        cloud.stop()


def test_kill_after_running_cancels_through_the_real_api_server(clock, api_server):
    store, server = api_server
    cloud = StubCloud(clock, StubParams(boot_time=1, boot_time_jitter=0, container_run_time=50),
                      seed=3)
    _, _, ex = booted_vm(cloud, clock)
    client, uuid = _queued_locked_container(server)
    client2, cancelled = _queued_locked_container(server)
    try:
        assert run(ex, detach_cmd(uuid), _http_config(server))[0] == 0
        cloud.advance()
        assert _state(store, uuid)["state"] == "Running"
        clock.advance(10)
        assert run(ex, f"crunch-run --kill 15 {uuid}")[0] == 0
        assert _state(store, uuid)["state"] == "Cancelled"
        # cancelled in the API before crunch-run starts it: the 422 ends the process quietly
        client2.cancel(cancelled)
        assert run(ex, detach_cmd(cancelled), _http_config(server))[0] == 0
        cloud.advance()
        assert run(ex, "crunch-run --list")[1] == ""
        assert _state(store, cancelled)["state"] == "Cancelled"
    finally:
        client.close()
        client2.close()
        cloud.stop()


def test_realtime_stub_completes_a_container_over_http(api_server):
    store, server = api_server
    iset = driver({"BootTime": "0s", "BootTimeJitter": "0s", "ContainerRunTime": "200ms"}, "set1",
                  cluster=Cluster(), clock=SystemClock(), logger=None)
    client, uuid = _queued_locked_container(server)
    try:
        inst = iset.create(itype(1), "img", {SET_TAG: "set1"}, INIT, None)
        ex = iset.make_executor(inst)
        assert run(ex, detach_cmd(uuid), _http_config(server))[0] == 0
        deadline = time.monotonic() + 10
        while _state(store, uuid)["state"] != "Complete" and time.monotonic() < deadline:
            time.sleep(0.02)  # nobody calls the cloud: its own thread moves the container
        assert _state(store, uuid)["state"] == "Complete"
    finally:
        client.close()
        iset.stop()
