"""Property-based exploration of interleavings: a hypothesis RuleBasedStateMachine drives the real
actors (tests/chaos.py's Chaos harness, no random timeline) with random orders of container
arrivals, clock advances (which deliver probe reports, poll results, start/kill answers and cloud
answers), worker reports held back against starts, container API outages and slow answers, SSH
drops, operator and user actions, and dispatcher restarts; G1-G4 are checked after every rule.

A counterexample hypothesis shrinks is printed with the harness's event trace; it becomes a
regression test in tests/test_scenarios.py.
"""

from __future__ import annotations

from dataclasses import replace

from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tests.chaos import Chaos, ChaosConfig
from cloud.stub.driver import StubParams
from tests.simcluster import cluster

CLUSTER = cluster(types=(1, 2), poll_interval=5.0, probe_interval=5.0, sync_interval=10.0,
                  timeout_idle=30.0, timeout_booting=60.0, timeout_probe=60.0, max_instances=6,
                  containers={"stale_lock_timeout": 30.0},
                  driver_parameters={"BootTime": "5s", "BootTimeJitter": "0s", "ContainerRunTime": "20s"})
PARAMS = StubParams(boot_time=5.0, boot_time_jitter=5.0, container_run_time=10.0,
                    container_run_time_jitter=30.0, crunch_run_crash_rate=0.1,
                    crunch_run_detach_delay=1.0, arv_mount_max_exit_lag=5.0, error_rate_create=0.1,
                    error_rate_destroy=0.1, seed=1)


class DispatcherMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.ch = Chaos(ChaosConfig(seed=1, ssh_drop_rate=0.0, report_delay_rate=0.0,
                                    slow_cloud_rate=0.0, boot_failure_rate=0.0),
                        cluster=CLUSTER, params=PARAMS, random_faults=True).start()

    def teardown(self):
        self.ch.stop()
        if self.ch.violations:
            print(self.ch.report_text(80))

    @rule(n=st.integers(1, 3))
    def submit(self, n):
        for _ in range(n):
            u = self.ch.submit()
            self.ch.note(f"rule submit {u}")

    @rule(dt=st.sampled_from((0.5, 1.0, 5.0, 13.0, 30.0, 120.0)))
    def advance(self, dt):
        self.ch.step(dt)

    @rule(rate=st.sampled_from((0.0, 0.5, 1.0)))
    def hold_back_reports(self, rate):
        """From now on this share of worker reports arrive up to a ProbeInterval late."""
        self.ch.cfg = replace(self.ch.cfg, report_delay_rate=rate)
        self.ch.note(f"rule report delay rate {rate}")

    @rule(rate=st.sampled_from((0.0, 0.2)))
    def ssh_drops(self, rate):
        self.ch.cfg = replace(self.ch.cfg, ssh_drop_rate=rate)
        self.ch.note(f"rule ssh drop rate {rate}")

    @rule(seconds=st.sampled_from((10.0, 60.0)))
    def api_outage(self, seconds):
        self.ch.outage(seconds)

    @rule(seconds=st.sampled_from((30.0, 120.0)))
    def api_slow(self, seconds):
        self.ch.slow_window(seconds)

    @rule()
    def restart(self):
        self.ch.restart()

    # Which instances exist depends on thread interleavings, not only on the rules drawn so far:
    # draw an index always (never a choice among them, nor a draw only when there are some), or
    # hypothesis' replay of an example draws differently and reports a flaky strategy.
    @rule(pick=st.integers(0, 63), behavior=st.sampled_from(("hold", "drain", "run")))
    def operator(self, pick, behavior):
        ids = sorted(iv.instance for iv in self.ch.sim.snapshot.instances
                     if iv.instance and iv.worker_state != "shutdown")
        if ids:
            self.ch.set_behavior(ids[pick % len(ids)], behavior)

    @precondition(lambda self: self.ch.submitted)
    @rule(data=st.data())
    def user_cancel(self, data):
        self.ch.user_cancel(data.draw(st.sampled_from(self.ch.submitted)))

    @invariant()
    def guarantees(self):
        self.ch.check()
        assert not self.ch.violations, self.ch.report_text(40)


DispatcherMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=30, deadline=None, derandomize=True,
    suppress_health_check=list(HealthCheck))
test_dispatcher_state_machine = DispatcherMachine.TestCase
