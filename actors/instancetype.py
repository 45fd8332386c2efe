"""Which configured instance types can run a container, and what it needs from one.

The rules are those of Arvados ``lib/dispatchcloud/container/node_size.go`` (InstanceResourcesNeeded,
EstimateScratchSpace, ChooseInstanceType), written as pure functions so the queue and the scheduler
can call them in a loop without I/O or locks (fitting containers into a VM is :mod:`actors.resources`).
:class:`TypeChooser` adds a memo keyed by a container's *shape*, because a real queue holds many
thousands of containers but only a few hundred distinct sets of constraints.

A container is the Arvados container record as the API server returns it (a mapping). Missing or
null fields count as zero/empty, as Go's JSON decoding does. A record whose fields have the wrong
type raises :class:`InvalidContainer` (a :class:`ConstraintsNotSatisfiable`) naming the field, so
the queue cancels it with a readable ``runtime_status.error`` the way Arvados cancels a container
whose mounts do not decode.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from actors.resources import Resources
from conf.model import Cluster, InstanceType

MiB = 1 << 20

#: Arvados discounts configured RAM by 5% (``discountConfiguredRAMPercent``): the kernel and
#: firmware take some, so a container needing exactly the advertised RAM would not fit.
RAM_DISCOUNT_PERCENT = 5
#: keepstore process (200 MiB) + 10% for GOGC=10, when crunch-run runs a local keepstore.
KEEPSTORE_RAM = 220 * MiB
#: one keepstore blob buffer.
BLOB_BUFFER = 64 * MiB

UNSATISFIABLE = "constraints not satisfiable by any configured instance type"
NOT_CONFIGURED = "site configuration does not list any instance types"
INVALID_STACK = "Invalid GPU stack %s, expected to be blank or one of 'cuda' or 'rocm'"

_GO_INT64_MAX = (1 << 63) - 1
# RE2's \d and $ are ASCII-only and end-of-text; spell them out for Python's re.
_PDH = re.compile(r"[0-9a-f]{32}\+([0-9]+)")
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_GO_FLOAT_WORDS = {"inf": math.inf, "+inf": math.inf, "-inf": -math.inf, "infinity": math.inf,
                   "+infinity": math.inf, "-infinity": -math.inf, "nan": math.nan}


class ConstraintsNotSatisfiable(Exception):
    """No configured type can run the container; ``reason`` is the text for runtime_status.error.

    ``available`` lists every configured type, cheapest first, so a caller can tell the user what
    exists (Arvados fills it only for the "not satisfiable" case; here it is always filled).
    """

    def __init__(self, reason: str, available: tuple[InstanceType, ...] = ()):
        super().__init__(reason)
        self.reason = reason
        self.available = tuple(available)


class InstanceTypesNotConfigured(ConstraintsNotSatisfiable):
    """The configuration lists no instance types at all (Arvados' ErrInstanceTypesNotConfigured)."""

    def __init__(self):
        super().__init__(NOT_CONFIGURED)


class InvalidContainer(ConstraintsNotSatisfiable):
    """A field of the container record has the wrong type or a negative size; the reason names it."""


# --------------------------------------------------------------------------- container needs


def estimate_image_scratch(container_image: str) -> int:
    """Disk for one copy of an arv-keepdocker image, guessed from its manifest size in the PDH.

    Such a manifest is ~80 characters of file name plus 42 characters per 64 MiB block, so the
    image size follows from ``n`` in ``<md5>+n`` without fetching the collection. 0 if the PDH
    does not look like that or the manifest is too short to hold a block.
    """
    m = _PDH.fullmatch(container_image)
    if m is None:
        return 0
    n = int(m.group(1))
    if n < 122 or n > _GO_INT64_MAX:
        return 0
    return ((n - 80) // 42) * BLOB_BUFFER


def estimate_scratch(tmp_capacity: int, container_image: str, keep_cache_disk: int) -> int:
    """Scratch need: tmp mounts (at least the image's load buffer) + the unpacked image + disk cache."""
    img = estimate_image_scratch(container_image)
    return max(tmp_capacity, img) + img + keep_cache_disk


@dataclass(frozen=True, slots=True)
class Shape:
    """The validated fields of a container record that decide its needs and eligible types."""

    vcpus: int = 0
    ram: int = 0
    keep_cache_ram: int = 0
    keep_cache_disk: int = 0
    tmp_capacity: int = 0
    container_image: str = ""
    preemptible: bool = False
    supervisor: bool = False
    gpu_stack: str = ""
    gpu_device_count: int = 0
    gpu_vram: int = 0
    gpu_driver_version: str = ""
    gpu_hardware_target: tuple[str, ...] = ()


def signature(container: Mapping) -> tuple:
    """The tuple of exactly the record fields that influence the need and the type choice.

    Built with plain ``get`` calls (about a microsecond) so it can key a memo. It does not
    validate: :func:`shape_of` does that once per distinct signature. Raises TypeError or
    AttributeError when the record's structure is broken (see :func:`_diagnose`).
    """
    rc = container.get("runtime_constraints") or _EMPTY
    gpu = rc.get("gpu") or _EMPTY
    sp = container.get("scheduling_parameters") or _EMPTY
    tmp = 0
    mounts = container.get("mounts")
    if mounts:
        for m in mounts.values():
            if m.get("kind") == "tmp":
                tmp += m.get("capacity") or 0
    ht = gpu.get("hardware_target") or ()
    if ht.__class__ is list:
        ht = tuple(ht)
    return (rc.get("vcpus") or 0, rc.get("ram") or 0, rc.get("keep_cache_ram") or 0,
            rc.get("keep_cache_disk") or 0, tmp, container.get("container_image") or "",
            sp.get("preemptible") or False, sp.get("supervisor") or False,
            gpu.get("stack") or "", gpu.get("device_count") or 0, gpu.get("vram") or 0,
            gpu.get("driver_version") or "", ht)


_EMPTY: Mapping = {}
_INT_FIELDS = ("runtime_constraints.vcpus", "runtime_constraints.ram",
               "runtime_constraints.keep_cache_ram", "runtime_constraints.keep_cache_disk",
               "mounts[kind=tmp].capacity")
_GPU_INT_FIELDS = (("runtime_constraints.gpu.device_count", 9), ("runtime_constraints.gpu.vram", 10))


def shape_of(sig: tuple) -> Shape:
    """Validate a :func:`signature`; raises :class:`InvalidContainer` naming the bad field."""
    for name, v in zip(_INT_FIELDS, sig[:5]):
        _check_size(name, v)
    for name, i in _GPU_INT_FIELDS:
        _check_size(name, sig[i])
    for name, i in (("container_image", 5), ("runtime_constraints.gpu.stack", 8),
                    ("runtime_constraints.gpu.driver_version", 11)):
        if not isinstance(sig[i], str):
            raise InvalidContainer(f"invalid container record: {name} must be a string, got {sig[i]!r}")
    for name, i in (("scheduling_parameters.preemptible", 6), ("scheduling_parameters.supervisor", 7)):
        if not isinstance(sig[i], bool):
            raise InvalidContainer(f"invalid container record: {name} must be true or false, got {sig[i]!r}")
    ht = sig[12]
    if not isinstance(ht, tuple) or not all(isinstance(t, str) for t in ht):
        raise InvalidContainer("invalid container record: runtime_constraints.gpu.hardware_target "
                               f"must be a list of strings, got {ht!r}")
    return Shape(*sig)


def _check_size(name: str, v) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise InvalidContainer(f"invalid container record: {name} must be a non-negative integer, got {v!r}")


def _diagnose(container) -> InvalidContainer:
    """Name the part of a record whose structure made :func:`signature` fail."""
    if not isinstance(container, Mapping):
        return InvalidContainer(f"invalid container record: expected an object, got {type(container).__name__}")
    for key in ("runtime_constraints", "scheduling_parameters", "mounts"):
        if not isinstance(container.get(key) or _EMPTY, Mapping):
            return InvalidContainer(f"invalid container record: {key} must be an object")
    if not isinstance((container.get("runtime_constraints") or _EMPTY).get("gpu") or _EMPTY, Mapping):
        return InvalidContainer("invalid container record: runtime_constraints.gpu must be an object")
    for path, m in (container.get("mounts") or _EMPTY).items():
        if not isinstance(m, Mapping):
            return InvalidContainer(f"invalid container record: mounts[{path!r}] must be an object")
        if m.get("kind") == "tmp":
            try:
                _check_size(f"mounts[{path!r}].capacity", m.get("capacity") or 0)
            except InvalidContainer as e:
                return e
    try:
        shape_of(signature(container))  # names a scalar field holding something unhashable
    except InvalidContainer as e:
        return e
    except (TypeError, AttributeError) as e:
        return InvalidContainer(f"invalid container record: {e}")
    return InvalidContainer("invalid container record")


def _shape(container: Mapping) -> Shape:
    try:
        sig = signature(container)
    except (TypeError, AttributeError):
        raise _diagnose(container) from None
    return shape_of(sig)


def shape_needs(cfg, shape: Shape) -> Resources:
    """Resources a container of this shape takes from a VM (``cfg`` is ``cluster.containers``).

    RAM adds the keep cache, ReserveExtraRAM and, when crunch-run starts a local keepstore, its
    220 MiB plus 64 MiB +10% per blob buffer; then it is grossed up by 100/95 (integer maths,
    as in Go). DefaultKeepCacheRAM stands in for keep_cache_ram only when both keep_cache_ram and
    keep_cache_disk are 0: the API server applies that default when it resolves a request, so a
    server-made record never has both at 0 and this only matters for hand-made records.
    """
    keep_ram = shape.keep_cache_ram
    if keep_ram == 0 and shape.keep_cache_disk == 0:
        keep_ram = cfg.default_keep_cache_ram
    ram = shape.ram + keep_ram + cfg.reserve_extra_ram
    bufs = cfg.local_keep_blob_buffers_per_vcpu
    if bufs > 0:
        ram += KEEPSTORE_RAM + bufs * shape.vcpus * BLOB_BUFFER * 11 // 10
    ram = ram * 100 // (100 - RAM_DISCOUNT_PERCENT)
    scratch = estimate_scratch(shape.tmp_capacity, shape.container_image, shape.keep_cache_disk)
    return Resources(shape.vcpus, ram, scratch, shape.gpu_device_count, shape.gpu_vram)


def resources_needed(cluster: Cluster, container: Mapping) -> Resources:
    """Arvados' InstanceResourcesNeeded for one container record (see :func:`shape_needs`)."""
    return shape_needs(cluster.containers, _shape(container))


# --------------------------------------------------------------------------- type choice


def _go_float(s: str) -> float | None:
    """strconv.ParseFloat for the decimal forms a version string uses; None if it would fail."""
    if _DECIMAL.fullmatch(s):
        return float(s)
    return _GO_FLOAT_WORDS.get(s.lower())


def sort_key(it: InstanceType) -> tuple:
    """Arvados' preference among eligible types: cheaper, then more RAM, VCPUs, scratch, then name."""
    return (it.price, -it.ram, -it.vcpus, -it.scratch, it.name)


@dataclass(frozen=True, slots=True)
class _Row:
    it: InstanceType
    price: float
    scratch: int
    ram: int
    vcpus: int
    preemptible: bool
    stack: str
    gpus: int
    vram: int
    driver: float | None
    target: str
    target_version: float | None


class TypeTable:
    """The configured types pre-sorted and pre-parsed, so one choice is a single filtered scan."""

    def __init__(self, cluster: Cluster):
        types = sorted(cluster.instance_types.values(), key=sort_key)
        self.by_price = tuple(cluster.types_by_price())
        self.factor = max(cluster.containers.maximum_price_factor, 1.0)
        self.any_preemptible = any(t.preemptible for t in types)
        self.rows = tuple(
            _Row(t, t.price, t.scratch, t.ram, t.vcpus, t.preemptible, t.gpu.stack,
                 t.gpu.device_count, t.gpu.vram, _go_float(t.gpu.driver_version),
                 t.gpu.hardware_target, _go_float(t.gpu.hardware_target))
            for t in types)

    def wants_preemptible(self, shape: Shape) -> bool:
        """scheduling_parameters.preemptible, as the API server gives it.

        AlwaysUsePreemptibleInstances is applied by the Arvados API server, to *child* container
        requests only; the dispatcher cannot tell a child from a top-level container, so applying
        it here again overrode an explicit ``preemptible: false`` (issue 10 item 13)."""
        return shape.preemptible

    def choose(self, shape: Shape, need: Resources) -> tuple[InstanceType, ...]:
        """Eligible types cheapest first, capped at cheapest eligible price x max(factor, 1)."""
        if not self.rows:
            raise InstanceTypesNotConfigured()
        stack = shape.gpu_stack
        if stack not in ("", "cuda", "rocm"):
            raise ConstraintsNotSatisfiable(INVALID_STACK % _go_quote(stack), self.by_price)
        preemptible = self.wants_preemptible(shape)
        n_gpus = shape.gpu_device_count
        if n_gpus > 0:
            want_driver = _go_float(shape.gpu_driver_version)
            targets = shape.gpu_hardware_target
            want_target = _go_float(targets[0]) if stack == "cuda" and len(targets) == 1 else None
        cap = math.inf
        out = []
        for r in self.rows:
            if r.price > cap:
                break  # rows are sorted by price: everything after is over the cap too
            if (r.scratch < need.scratch or r.ram < need.ram or r.vcpus < need.vcpus
                    or r.preemptible != preemptible or r.stack != stack
                    or r.gpus < n_gpus or r.vram < shape.gpu_vram):
                continue
            if n_gpus > 0:
                if want_driver is None or r.driver is None or r.driver < want_driver:
                    continue
                if stack == "cuda" and len(targets) == 1:
                    if want_target is None or r.target_version is None or r.target_version < want_target:
                        continue
                elif r.target not in targets:  # cuda with 0 or >1 targets, or rocm
                    continue
            if not out:
                cap = r.price * self.factor
            out.append(r.it)
        if not out:
            raise ConstraintsNotSatisfiable(UNSATISFIABLE, self.by_price)
        return tuple(out)


def _go_quote(s: str) -> str:
    """Go's %q for the plain strings a GPU stack name holds."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def choose_instance_types(cluster: Cluster, container: Mapping) -> tuple[InstanceType, ...]:
    """Arvados' ChooseInstanceType: every type able to run ``container``, cheapest first.

    A type is rejected for too little scratch, RAM or VCPUs; a preemptible flag different from
    the container's (see :meth:`TypeTable.wants_preemptible`); a different GPU stack (so a
    non-GPU container never lands on a GPU type); fewer GPUs or less VRAM per GPU; and, when GPUs
    are requested, a driver version below the request (or unparsable), or the wrong hardware
    target: CUDA with one target compares versions, with several needs an exact match, with none
    rejects; ROCm needs an exact match. Types priced over the cheapest eligible one times
    max(MaximumPriceFactor, 1) are dropped. Raises :class:`ConstraintsNotSatisfiable`.

    Builds a :class:`TypeTable` per call; use :class:`TypeChooser` for repeated choices.
    """
    shape = _shape(container)
    return TypeTable(cluster).choose(shape, shape_needs(cluster.containers, shape))


# --------------------------------------------------------------------------- memo


@dataclass(frozen=True, slots=True)
class _Answer:
    need: Resources | None
    types: tuple[InstanceType, ...]
    error: ConstraintsNotSatisfiable | None


class TypeChooser:
    """Memoized :func:`choose_instance_types` and :func:`resources_needed` for one Cluster.

    The memo is keyed by :func:`signature`, so containers of the same shape share one answer.
    It is an LRU of ``maxsize`` shapes; build a new chooser when the configuration changes.
    Safe to share between threads (functools.lru_cache is).
    """

    def __init__(self, cluster: Cluster, maxsize: int = 65536):
        self.cluster = cluster
        self.table = TypeTable(cluster)
        self._answer = functools.lru_cache(maxsize=maxsize)(self._compute)

    def choose(self, container: Mapping) -> tuple[InstanceType, ...]:
        """Eligible types, cheapest first; raises :class:`ConstraintsNotSatisfiable`."""
        a = self._lookup(container)
        if a.error is not None:
            raise _fresh(a.error)
        return a.types

    def needed(self, container: Mapping) -> Resources:
        """What the container takes from a VM; raises :class:`InvalidContainer` for a bad record."""
        a = self._lookup(container)
        if a.need is None:
            raise _fresh(a.error)
        return a.need

    def cache_info(self):
        """Hits, misses and size of the shape memo (functools' CacheInfo)."""
        return self._answer.cache_info()

    def _lookup(self, container: Mapping) -> _Answer:
        try:
            sig = signature(container)
            hash(sig)  # an odd field (a dict, say) fails here rather than inside the memo
        except (TypeError, AttributeError):
            return _Answer(None, (), _diagnose(container))
        return self._answer(sig)

    def _compute(self, sig: tuple) -> _Answer:
        try:
            shape = shape_of(sig)
        except InvalidContainer as e:
            return _Answer(None, (), e)
        need = shape_needs(self.cluster.containers, shape)
        try:
            return _Answer(need, self.table.choose(shape, need), None)
        except ConstraintsNotSatisfiable as e:
            return _Answer(need, (), e)


def _fresh(e: ConstraintsNotSatisfiable) -> ConstraintsNotSatisfiable:
    """A new exception per raise: re-raising one cached instance would grow its traceback."""
    if isinstance(e, InstanceTypesNotConfigured):
        return InstanceTypesNotConfigured()
    return type(e)(e.reason, e.available)
