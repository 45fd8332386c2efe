"""``dispatch-cloud simulate``: what would this workload cost with this config?

    dispatch-cloud simulate --config FILE [--config FILE2 ...] --workload FILE|NAME
                            [--seed N] [--report DIR] [--cloud Key=Value ...] [--max-hours H]
    dispatch-cloud simulate --generate burst|steady|mixed --count N [--seed N] [--output FILE]

Each config runs the real dispatcher (actors, planner, worker state machine) on a simulated
cloud (the stub driver: boot times, error rates, quotas from its DriverParameters, or from
``--cloud`` for a config written for another driver) over the same workload and seed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("simulate", help="replay a workload through the dispatcher on a simulated cloud "
                       "and report the bill, the lower bound and the waits")
    p.add_argument("--config", action="append", default=[], metavar="FILE",
                   help="cluster config (repeat to compare configs side by side)")
    p.add_argument("--cluster", help="cluster id, when a file has several")
    p.add_argument("--workload", metavar="FILE",
                   help="workload: .csv, .yml, an Arvados container list .json, or a shipped name "
                        "(burst-alignment, steady-small, mixed-day)")
    p.add_argument("--seed", type=int, default=0, help="seed for the simulated cloud and the generator")
    p.add_argument("--report", metavar="DIR", help="also write report.json, report.txt and index.html with plots")
    p.add_argument("--cloud", action="append", default=[], metavar="KEY=VALUE",
                   help="a stub DriverParameters value for the simulated cloud (BootTime=2m, "
                        "QuotaMaxInstances=50, ErrorRateCreate=0.05, CapacityErrorTypes=[a,b], ...)")
    p.add_argument("--max-hours", type=float, help="stop after this many simulated hours (default: "
                   "when everything has finished, or a week after the last submission)")
    p.add_argument("--generate", metavar="KIND", help="write a generated workload (burst, steady, mixed) instead")
    p.add_argument("--count", type=int, default=100, help="with --generate: how many containers")
    p.add_argument("--output", metavar="FILE", help="with --generate: where to write it (default stdout)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--log-level", default=os.environ.get("DISPATCH_CLOUD_LOG_LEVEL", "error"))
    p.set_defaults(func=simulate_command)


def _fail(msg: str) -> int:
    print(f"dispatch-cloud simulate: {msg}", file=sys.stderr)
    return 1


def simulate_command(args) -> int:
    from actors.simulate import workload as wl
    if args.generate:
        try:
            jobs = wl.generate(args.generate, args.count, args.seed)
        except wl.WorkloadError as e:
            return _fail(str(e))
        text = wl.to_csv(jobs)
        if args.output:
            Path(args.output).write_text(text, encoding="utf-8")
        else:
            sys.stdout.write(text)
        return 0
    if not args.config:
        return _fail("--config: at least one cluster config is needed (or --generate)")
    if not args.workload:
        return _fail("--workload: which workload to replay? (a file, or a shipped name: "
                     + ", ".join(sorted(wl.shipped())) + ")")
    from conf import logsetup
    logsetup.setup(args.log_level)
    from actors.simulate.runner import Run, SimulateError, cloud_params
    from conf.loader import ConfigError, load
    overrides = {}
    for item in args.cloud:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            return _fail(f"--cloud {item!r}: expected Key=Value")
        overrides[key.strip()] = value
    try:
        jobs = wl.load(args.workload)
        if not jobs:
            return _fail(f"{args.workload}: no jobs to replay")
        clusters = [(path, load(path, args.cluster)) for path in args.config]
        params = [cloud_params(c, overrides, path) for path, c in clusters]
    except (ConfigError, wl.WorkloadError, SimulateError) as e:
        return _fail(str(e))
    labels = _labels(args.config)
    runs = []
    for (path, cluster), p, label in zip(clusters, params, labels):
        bar = _progress(label, args.no_progress)
        try:
            run = Run(cluster, jobs, params=p, seed=args.seed, max_hours=args.max_hours,
                      progress=bar.update if bar else None).run()
        finally:
            if bar:
                bar.close()
        runs.append((label, run.result()))
    from actors.simulate import report
    sys.stdout.write(report.table(runs, args.workload))
    sys.stdout.flush()
    if args.report:
        out = Path(args.report)
        try:
            files = report.write(runs, args.workload, out)
        except OSError as e:
            return _fail(f"--report {args.report}: {e.strerror or e}")
        print(f"report written: {out / 'index.html'} ({len(files)} files)", file=sys.stderr)
    return 0


def _labels(paths: list[str]) -> list[str]:
    names = [Path(p).name for p in paths]
    out = [p if names.count(Path(p).name) > 1 else Path(p).name for p in paths]
    return [f"{n} #{i + 1}" if out.count(n) > 1 else n for i, n in enumerate(out)]


class _Bar:
    """A tqdm bar over simulated hours, on stderr."""

    def __init__(self, label: str):
        from tqdm import tqdm
        self._bar = None
        self._tqdm = tqdm
        self._label = label
        self._shown = 0.0

    def update(self, now: float, run) -> None:
        from actors.sim import START
        if self._bar is None:
            total = round((run.expected_end - START) / 3600, 2)
            self._bar = self._tqdm(total=total, unit="sim h", desc=self._label, file=sys.stderr,
                                   bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.1f} sim h "
                                              "[{elapsed}<{remaining}, {rate_fmt}]{postfix}")
        h = round((now - START) / 3600, 2)
        if h > self._bar.total:
            self._bar.total = h
        self._bar.update(h - self._shown)
        self._shown = h
        led = run.ledger
        self._bar.set_postfix_str(f"instances {len(led.vms)} running {led.running} "
                                  f"cost ${led.cost_at(now):,.2f}", refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.total = self._shown  # done: the horizon was an estimate
            self._bar.refresh()
            self._bar.close()


def _progress(label: str, disabled: bool):
    if disabled or not sys.stderr.isatty():
        return None
    return _Bar(label)
