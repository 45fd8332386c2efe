"""A driver conformance suite: what the dispatcher relies on, checked against any InstanceSet.

Each step is a claim the dispatcher's code depends on (an instance it created is listed with its
tags through :func:`cloud.base.wrap`'s filter, gets an address, keeps tags it is given, is found
again by a fresh InstanceSet after a restart, goes away when destroyed, and typed errors keep their
class). Time-dependent steps wait through a caller-supplied ``wait(predicate, what)`` so a driver on
a FakeClock (stub, fake ARM) advances simulated time while a real cloud sleeps.

Whatever happens, an instance the suite created is destroyed before it returns.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from cloud import crunchrun
from cloud.base import CloudError, InstanceSet, wrap
from conf.model import InstanceType

Wait = Callable[[Callable[[], bool], str], bool]
DEFAULT_SET_ID = "zzzzz-zzzzz-conformancetest"


@dataclass(frozen=True)
class StepResult:
    name: str
    status: str  # "ok", "FAIL" or "skip"
    seconds: float
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def line(self) -> str:
        extra = f": {self.detail}" if self.detail else ""
        return f"[{self.status}] {self.name} ({self.seconds:.1f}s){extra}"


@dataclass(frozen=True)
class ErrorCase:
    """How to make this driver's next create fail, and the error class the dispatcher must see."""

    name: str
    expect: type
    arm: Callable[[], None]
    disarm: Callable[[], None] | None = None


def polling_wait(timeout: float = 60.0, interval: float = 0.5) -> Wait:
    """A wait for real clouds: poll until true or ``timeout`` seconds (monotonic) have passed."""
    def wait(predicate, what):
        deadline = time.monotonic() + timeout
        while True:
            if predicate():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(interval)
    return wait


def stepping_wait(clock, step: float = 1.0, steps: int = 120,
                  advance: Callable[[], object] | None = None) -> Wait:
    """A wait for FakeClock drivers: move the clock ``step`` seconds (and run ``advance``) per try."""
    def wait(predicate, what):
        for _ in range(steps):
            if predicate():
                return True
            clock.advance(step)
            if advance is not None:
                advance()
        return predicate()
    return wait


class _Run:
    def __init__(self, log):
        self.results: list[StepResult] = []
        self._log = log

    def step(self, name: str, fn: Callable[[], str | None], *, skip: str = "") -> bool:
        t0 = time.monotonic()
        if skip:
            res = StepResult(name, "skip", 0.0, skip)
        else:
            try:
                detail = fn() or ""
                res = StepResult(name, "ok", time.monotonic() - t0, detail)
            except Exception as e:  # a step's failure is a result, not a crash of the suite
                res = StepResult(name, "FAIL", time.monotonic() - t0, f"{type(e).__name__}: {e}")
        self.results.append(res)
        if self._log is not None:
            self._log(res.line())
        return res.ok


class ConformanceFailure(AssertionError):
    pass


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConformanceFailure(msg)


def run_conformance(make_set: Callable[[str], InstanceSet], instance_type: InstanceType, *,
                    wait: Wait, image_id: str = "conformance-image", tags_prefix: str = "Arvados",
                    set_id: str = DEFAULT_SET_ID, public_key: str | None = None,
                    error_cases: Sequence[ErrorCase] = (), log: Callable[[str], None] | None = None,
                    ) -> list[StepResult]:
    """Run every step against ``make_set(set_id)`` (called again for the restart step)."""
    run = _Run(log)
    raw = make_set(set_id)
    cloud = wrap(raw, resource_tags={})
    secret = secrets.token_hex(20)
    id_tag = tags_prefix + "InstanceSetID"
    tags = {id_tag: set_id, tags_prefix + "InstanceType": instance_type.name,
            tags_prefix + "InstanceSecret": secret, tags_prefix + "IdleBehavior": "run"}
    init = crunchrun.init_command(secret)
    state: dict = {}
    errors: dict = {}

    def ours():
        try:
            listed = cloud.instances({id_tag: set_id})
        except CloudError as e:
            errors["list"] = e
            return {}
        return {i.id: i for i in listed}

    def listed(pred) -> Callable[[], bool]:
        def check():
            inst = ours().get(state["inst"].id)
            return inst is not None and pred(inst)
        return check

    def create():
        inst = cloud.create(instance_type, image_id, tags, init, public_key)
        state["inst"] = inst
        _check(bool(inst.id), "created instance has an empty id")
        return inst.id

    def listed_with_tags():
        ok = wait(listed(lambda i: all(i.tags.get(k) == v for k, v in tags.items())), "listed with tags")
        _check(ok, f"instance {state['inst'].id} never listed with all its tags (last list error: "
                   f"{errors.get('list')})")
        other = cloud.instances({id_tag: set_id + "-other"})
        _check(all(i.id != state["inst"].id for i in other), "the tag filter let through another set's query")
        _check(ours()[state["inst"].id].provider_type == instance_type.provider_type,
               "listed provider_type differs from the instance type's ProviderType")

    def address():
        ok = wait(listed(lambda i: bool(i.address)), "address")
        _check(ok, "instance never got an address")
        return ours()[state["inst"].id].address

    def set_tags():
        new = {**tags, tags_prefix + "IdleBehavior": "hold"}
        ours()[state["inst"].id].set_tags(new)
        ok = wait(listed(lambda i: i.tags.get(tags_prefix + "IdleBehavior") == "hold"
                         and i.tags.get(tags_prefix + "InstanceSecret") == secret), "set_tags")
        _check(ok, "tags given to set_tags never showed up (with the old ones kept) in a fresh listing")

    def restart():
        again = wrap(make_set(set_id), resource_tags={})
        try:
            found = {i.id: i for i in again.instances({id_tag: set_id})}
        finally:
            again.stop()
        _check(state["inst"].id in found, "a new InstanceSet over the same cloud does not list the instance")
        _check(found[state["inst"].id].tags.get(tags_prefix + "InstanceSecret") == secret,
               "after a restart the instance secret tag is missing")

    def error_case(case: ErrorCase):
        def run_case():
            case.arm()
            try:
                cloud.create(instance_type, image_id, {**tags, tags_prefix + "InstanceSecret": "x"}, init, public_key)
            except Exception as e:  # the class is what we check
                _check(isinstance(e, case.expect), f"expected {case.expect.__name__}, got {type(e).__name__}: {e}")
                return str(e)[:120]
            finally:
                if case.disarm is not None:
                    case.disarm()
            raise ConformanceFailure(f"create succeeded; expected {case.expect.__name__}")
        return run_case

    def destroy():
        inst = state.pop("inst")
        state["destroyed"] = inst
        inst.destroy()
        def gone():
            try:
                return all(i.id != inst.id for i in cloud.instances({id_tag: set_id}))
            except CloudError:
                return False  # a failed listing proves nothing
        ok = wait(gone, "gone")
        _check(ok, f"instance {inst.id} still listed after destroy")

    try:
        created = run.step("create instance with tags", create)
        skip = "" if created else "create failed"
        listed_ok = run.step("instance listed with its tags (through the tag filter)", listed_with_tags, skip=skip)
        skip2 = skip or ("" if listed_ok else "instance not listed")
        run.step("instance address appears", address, skip=skip2)
        run.step("set_tags persists in a fresh listing", set_tags, skip=skip2)
        run.step("same id from a new InstanceSet (restart)", restart, skip=skip2)
        for case in error_cases:
            run.step(f"typed error: {case.name} -> {case.expect.__name__}", error_case(case))
        run.step("destroy: instance goes away", destroy, skip=skip)
    finally:
        leftover = state.get("inst")
        if leftover is not None:  # a step raised past run.step, or destroy never ran
            try:
                leftover.destroy()
            except Exception as e:
                if log is not None:
                    log(f"[FAIL] cleanup: could not destroy {leftover.id}: {e}")
        _destroy_strays(cloud, id_tag, set_id, secret, tags_prefix, log)
        cloud.stop()
    return run.results


def _destroy_strays(cloud, id_tag, set_id, secret, prefix, log) -> None:
    """Destroy instances an error case created despite failing (they carry our set id)."""
    try:
        for inst in cloud.instances({id_tag: set_id}):
            if inst.tags.get(prefix + "InstanceSecret") == "x":
                inst.destroy()
    except Exception as e:
        if log is not None:
            log(f"[FAIL] cleanup: could not list/destroy stray instances: {e}")


def all_ok(results: Sequence[StepResult]) -> bool:
    return bool(results) and all(r.ok for r in results)


def summary(results: Sequence[StepResult]) -> Mapping[str, str]:
    return {r.name: r.status for r in results}
