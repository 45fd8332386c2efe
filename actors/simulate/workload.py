"""Workloads for ``dispatch-cloud simulate``: the file format, a generator, an Arvados importer.

A workload is a list of jobs (containers). In CSV, one row per job under a header naming the
columns; in YAML, a list of mappings (or ``{jobs: [...]}``) with the same keys:

=============  ========  ==================================================================
key            default   meaning
=============  ========  ==================================================================
id             row no.   a name, for ``parent`` to refer to
submit         required  when it is submitted: seconds (or a duration, ``90m``) after the
                         start of the simulation — or, for a job with a ``parent``, after
                         that parent started running (a workflow runner submits its steps)
vcpus          required  runtime_constraints.vcpus
ram            required  runtime_constraints.ram: bytes or a size (``4GiB``)
runtime        required  how long it runs once Running: seconds or a duration
scratch        0         a tmp mount of this capacity (bytes or a size)
gpu            0         CUDA devices (runtime_constraints.gpu.device_count)
preemptible    false     scheduling_parameters.preemptible
priority       500       the container's priority (1-1000)
exit_code      0         what it exits with
parent         ""        the id of the workflow supervisor that submits it
supervisor     false     scheduling_parameters.supervisor (true for a job named as a parent)
=============  ========  ==================================================================

A supervisor runs for its own ``runtime``; its children are submitted at its start plus their
``submit`` offsets (a child whose parent never starts is never submitted).

:func:`from_arvados` turns an Arvados container list (``arv container list``, the API's JSON)
into a workload: submit = created_at, runtime = finished_at - started_at, the constraints,
scheduling parameters, priority and exit code as recorded.
"""

from __future__ import annotations

import csv
import io
import json
import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from importlib import resources
from pathlib import Path

import yaml

from actors.queue import parse_time
from conf.units import parse_duration, parse_size

GiB = 1 << 30
IMAGE = "arvados/jobs"
KINDS = ("burst", "steady", "mixed")


class WorkloadError(ValueError):
    """A workload file that cannot be used; the message names the file, the row and the key."""


@dataclass(frozen=True)
class Job:
    id: str
    submit: float
    vcpus: int
    ram: int
    runtime: float
    scratch: int = 0
    gpu: int = 0
    preemptible: bool = False
    priority: int = 500
    exit_code: int = 0
    parent: str = ""
    supervisor: bool = False

    def container(self) -> dict:
        """The fields of the container record the simulation creates for this job."""
        rc: dict = {"vcpus": self.vcpus, "ram": self.ram}
        if self.gpu:
            rc["gpu"] = {"stack": "cuda", "device_count": self.gpu, "driver_version": "",
                         "hardware_target": [], "vram": 0}
        c = {"command": ["true"], "container_image": IMAGE, "priority": self.priority,
             "output_path": "/out", "cwd": "/", "runtime_constraints": rc,
             "scheduling_parameters": {"preemptible": self.preemptible, "supervisor": self.supervisor}}
        if self.scratch:
            c["mounts"] = {"/tmp": {"kind": "tmp", "capacity": self.scratch}}
        return c


COLUMNS = tuple(f.name for f in fields(Job))
REQUIRED = ("submit", "vcpus", "ram", "runtime")


# --- reading -------------------------------------------------------------------------------------


def _duration(v) -> float:
    if isinstance(v, bool):
        raise ValueError("not a duration")
    if isinstance(v, (int, float)):
        x = float(v)
    else:
        s = str(v).strip()
        try:
            x = float(s)
        except ValueError:
            x = parse_duration(s)
    if not math.isfinite(x) or x < 0:
        raise ValueError("must be a non-negative number of seconds")
    return x


def _size(v) -> int:
    if isinstance(v, str) and v.strip().isdigit():
        v = int(v.strip())
    n = parse_size(v)
    if n < 0:
        raise ValueError("must not be negative")
    return n


def _int(lo: int, hi: int):
    def conv(v) -> int:
        if isinstance(v, bool):
            raise ValueError("not an integer")
        try:
            n = int(str(v).strip()) if not isinstance(v, int) else v
        except ValueError:
            raise ValueError("not an integer") from None
        if not lo <= n <= hi:
            raise ValueError(f"must be between {lo} and {hi}")
        return n
    return conv


def _bool(v) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("true", "yes", "1"):
        return True
    if s in ("false", "no", "0", ""):
        return False
    raise ValueError("expected true or false")


_CONVERT = {"submit": _duration, "runtime": _duration, "vcpus": _int(1, 100_000), "ram": _size,
            "scratch": _size, "gpu": _int(0, 64), "preemptible": _bool, "priority": _int(1, 1000),
            "exit_code": _int(-255, 255), "parent": lambda v: str(v).strip(), "supervisor": _bool,
            "id": lambda v: str(v).strip()}


def _job(row: Mapping, where: str, default_id: str) -> Job:
    unknown = sorted(k for k in row if k not in COLUMNS)
    if unknown:
        raise WorkloadError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(COLUMNS)})")
    values = {}
    for key in COLUMNS:
        raw = row.get(key)
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            if key in REQUIRED:
                raise WorkloadError(f"{where}: {key}: required")
            continue
        try:
            values[key] = _CONVERT[key](raw)
        except ValueError as e:
            raise WorkloadError(f"{where}: {key}: {e} (got {raw!r})") from None
    values.setdefault("id", default_id)
    if not values["id"]:
        values["id"] = default_id
    return Job(**values)


def check(jobs: list[Job], source: str) -> list[Job]:
    """Unique ids, parents that exist and come first; parents become supervisors."""
    seen: dict[str, Job] = {}
    for j in jobs:
        if j.id in seen:
            raise WorkloadError(f"{source}: job {j.id!r}: id used twice")
        if j.parent:
            if j.parent == j.id:
                raise WorkloadError(f"{source}: job {j.id!r}: parent: a job cannot be its own parent")
            if j.parent not in seen:
                raise WorkloadError(f"{source}: job {j.id!r}: parent: {j.parent!r} is not an earlier job")
        seen[j.id] = j
    parents = {j.parent for j in jobs if j.parent}
    return [replace(j, supervisor=True) if j.id in parents and not j.supervisor else j for j in jobs]


def parse_csv(text: str, source: str) -> list[Job]:
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames:
        raise WorkloadError(f"{source}: empty file (expected a header: {', '.join(COLUMNS)})")
    header = [h.strip() for h in reader.fieldnames]
    reader.fieldnames = header
    missing = [k for k in REQUIRED if k not in header]
    if missing:
        raise WorkloadError(f"{source}: line 1: header lacks {', '.join(missing)}")
    jobs = []
    for i, row in enumerate(reader):
        if None in row:
            raise WorkloadError(f"{source}: line {reader.line_num}: more values than columns")
        jobs.append(_job({k: v for k, v in row.items()}, f"{source}: line {reader.line_num}", str(i + 1)))
    return check(jobs, source)


def parse_yaml(text: str, source: str) -> list[Job]:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise WorkloadError(f"{source}: invalid YAML: {getattr(e, 'problem', None) or e}") from None
    if isinstance(doc, Mapping) and "jobs" in doc:
        doc = doc["jobs"]
    if not isinstance(doc, list):
        raise WorkloadError(f"{source}: expected a list of jobs (or a mapping with 'jobs')")
    jobs = []
    for i, row in enumerate(doc):
        if not isinstance(row, Mapping):
            raise WorkloadError(f"{source}: jobs[{i}]: expected a mapping")
        jobs.append(_job(row, f"{source}: jobs[{i}]", str(i + 1)))
    return check(jobs, source)


def from_arvados(doc, source: str) -> list[Job]:
    """An Arvados container list (``{"items": [...]}`` or a list) as a workload.

    Containers that never ran (no started_at or finished_at) are left out: their run time is
    unknown. Times are relative to the earliest created_at.
    """
    items = doc.get("items") if isinstance(doc, Mapping) else doc
    if not isinstance(items, list):
        raise WorkloadError(f"{source}: expected an Arvados container list (an object with 'items')")
    rows = []
    for i, c in enumerate(items):
        where = f"{source}: items[{i}]"
        if not isinstance(c, Mapping):
            raise WorkloadError(f"{where}: expected an object")
        rc = c.get("runtime_constraints") or {}
        sp = c.get("scheduling_parameters") or {}
        if not isinstance(rc, Mapping) or not isinstance(sp, Mapping):
            raise WorkloadError(f"{where}: runtime_constraints and scheduling_parameters must be objects")
        created, started, finished = (parse_time(c.get(k)) for k in ("created_at", "started_at", "finished_at"))
        if not created:
            raise WorkloadError(f"{where}: created_at: missing or not a time")
        if not started or not finished:
            continue
        scratch = sum(int(m.get("capacity") or 0) for m in (c.get("mounts") or {}).values()
                      if isinstance(m, Mapping) and m.get("kind") == "tmp")
        gpu = rc.get("gpu") or rc.get("cuda") or {}
        row = {"id": c.get("uuid") or str(i + 1), "vcpus": rc.get("vcpus"), "ram": rc.get("ram"),
               "scratch": scratch, "gpu": int(gpu.get("device_count") or 0) if isinstance(gpu, Mapping) else 0,
               "preemptible": bool(sp.get("preemptible")), "supervisor": bool(sp.get("supervisor")),
               "priority": min(1000, max(1, int(c.get("priority") or 500))),
               "exit_code": c.get("exit_code") if c.get("exit_code") is not None else 0}
        rows.append((created, max(0.0, finished - started), row, where))
    if not rows:
        return []
    t0 = min(r[0] for r in rows)
    rows.sort(key=lambda r: (r[0], r[2]["id"]))
    jobs = [_job({**row, "submit": round(created - t0, 6), "runtime": round(runtime, 6)}, where, row["id"])
            for created, runtime, row, where in rows]
    return check(jobs, source)


def shipped() -> dict[str, Path]:
    """The sample workloads in conf/workloads/ (CSV files), by name."""
    root = resources.files("conf") / "workloads"
    return {Path(p.name).stem: Path(str(p)) for p in root.iterdir() if p.name.endswith(".csv")}


def load(path: str) -> list[Job]:
    """A workload file (.csv, .yml/.yaml, or an Arvados container list .json) or a shipped name."""
    p = Path(path)
    if not p.exists() and path in shipped():
        p = shipped()[path]
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        names = ", ".join(sorted(shipped()))
        raise WorkloadError(f"{path}: no such file (shipped workloads: {names})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise WorkloadError(f"{path}: cannot read: {e}") from None
    suffix = p.suffix.lower()
    if suffix == ".csv":
        return parse_csv(text, path)
    if suffix in (".yml", ".yaml"):
        return parse_yaml(text, path)
    if suffix == ".json":
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise WorkloadError(f"{path}: invalid JSON: line {e.lineno}: {e.msg}") from None
        return from_arvados(doc, path)
    raise WorkloadError(f"{path}: unknown workload format (expected .csv, .yml or an Arvados .json)")


# --- writing -------------------------------------------------------------------------------------


def _fmt(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:g}" if v == int(v) and abs(v) < 1e15 else repr(v)
    return v


def to_csv(jobs: Iterable[Job]) -> str:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(COLUMNS)
    for j in jobs:
        w.writerow([_fmt(v) for v in asdict(j).values()])
    return out.getvalue()


# --- the generator ---------------------------------------------------------------------------------


def generate(kind: str, count: int, seed: int = 0) -> list[Job]:
    """``count`` jobs of a realistic shape:

    * ``burst`` — a batch of large alignment-style jobs submitted within five minutes
      (8-32 VCPUs, 4-8 GiB per VCPU, 100-500 GB scratch, 40 min-4 h, log-normal);
    * ``steady`` — short small jobs (1-2 VCPUs, 1-4 GiB, 1-15 min) as a Poisson stream over
      four hours;
    * ``mixed`` — a day: arrivals follow a diurnal cycle (peak mid-afternoon, a quiet night);
      a fifth of the jobs are workflow runners (supervisors), each submitting 2-6 steps of
      mixed sizes in sequence after it starts; the rest are independent jobs of all sizes.
    """
    if kind not in KINDS:
        raise WorkloadError(f"--generate: unknown kind {kind!r} (known: {', '.join(KINDS)})")
    if count < 1:
        raise WorkloadError("--count: must be at least 1")
    rng = random.Random(f"{kind}:{count}:{seed}")
    return {"burst": _burst, "steady": _steady, "mixed": _mixed}[kind](count, rng)


def _lognormal(rng: random.Random, median: float, sigma: float, lo: float, hi: float) -> float:
    return round(min(hi, max(lo, median * math.exp(rng.gauss(0, sigma)))))


def _burst(n: int, rng: random.Random) -> list[Job]:
    jobs = []
    for i in range(n):
        v = rng.choice((8, 16, 16, 32))
        jobs.append(Job(id=f"align{i + 1}", submit=round(rng.uniform(0, 300)), vcpus=v,
                        ram=v * rng.choice((4, 8)) * GiB, scratch=rng.choice((100, 200, 500)) * 10**9,
                        runtime=_lognormal(rng, 5400, 0.5, 2400, 4 * 3600), priority=500))
    return sorted(jobs, key=lambda j: (j.submit, j.id))


def _steady(n: int, rng: random.Random) -> list[Job]:
    span, t, jobs = 4 * 3600, 0.0, []
    for i in range(n):
        t += rng.expovariate(n / span)
        v = rng.choice((1, 1, 1, 2))
        jobs.append(Job(id=f"small{i + 1}", submit=round(t, 1), vcpus=v, ram=rng.choice((1, 2, 4)) * GiB,
                        runtime=_lognormal(rng, 240, 0.7, 60, 900), priority=rng.randint(1, 1000)))
    return jobs


def _diurnal_time(rng: random.Random) -> float:
    """A time of day (seconds) drawn from a rate of 1 + 0.8 cos(2 pi (h - 15) / 24)."""
    while True:
        t = rng.uniform(0, 86400)
        if rng.uniform(0, 1.8) <= 1 + 0.8 * math.cos(2 * math.pi * (t / 3600 - 15) / 24):
            return round(t, 1)


_SIZES = ((1, 2), (2, 4), (4, 8), (8, 16), (16, 32))  # (vcpus, GiB)


def _mixed(n: int, rng: random.Random) -> list[Job]:
    jobs: list[Job] = []
    i = 0
    while i < n:
        i += 1
        at = _diurnal_time(rng)
        steps = rng.randint(2, 6)
        if rng.random() < 0.2 and i + 1 < n:  # a workflow: its runner, then its steps
            runner = f"wf{i}"
            offset, children = 0.0, []
            for _ in range(min(steps, n - i)):
                i += 1
                v, g = rng.choice(_SIZES[:4])
                rt = _lognormal(rng, 900 * v ** 0.5, 0.6, 120, 3 * 3600)
                children.append(Job(id=f"{runner}.step{len(children) + 1}", submit=round(offset, 1),
                                    vcpus=v, ram=g * GiB, runtime=rt, parent=runner, priority=600))
                offset += rt + rng.uniform(60, 300)  # steps run in sequence, with some slack
            jobs.append(Job(id=runner, submit=at, vcpus=1, ram=1 * GiB, runtime=round(offset + 300),
                            supervisor=True, priority=600))
            jobs.extend(children)
        else:
            v, g = rng.choice(_SIZES)
            jobs.append(Job(id=f"job{i}", submit=at, vcpus=v, ram=g * GiB, priority=rng.randint(1, 1000),
                            runtime=_lognormal(rng, 600 * v ** 0.5, 0.8, 30, 6 * 3600),
                            preemptible=rng.random() < 0.1))
    top = sorted((j for j in jobs if not j.parent), key=lambda j: (j.submit, j.id))
    kids: dict[str, list[Job]] = {}
    for j in jobs:
        if j.parent:
            kids.setdefault(j.parent, []).append(j)
    out = []
    for j in top:  # each runner followed by its steps, so parents come first
        out.append(j)
        out.extend(kids.get(j.id, ()))
    return out
