#!/usr/bin/env python3
"""``dispatch-cloud simulate`` on each shipped workload under the example cluster's settings:
the cost ratio (spent / lower bound) and what the run costs in wall time. Figures only.

    .venv/bin/python bench/bench_simulate.py [--seed 0] [--config conf/workloads/example-cluster.yml]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actors.simulate import workload as wl  # noqa: E402
from actors.simulate.runner import Run, cloud_params  # noqa: E402
from conf.loader import load  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", default=str(ROOT / "conf" / "workloads" / "example-cluster.yml"))
    ap.add_argument("workloads", nargs="*", default=sorted(wl.shipped()))
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    cluster = load(args.config)
    params = cloud_params(cluster, {}, args.config)
    print(f"config {Path(args.config).name}, seed {args.seed}")
    print(f"{'workload':18} {'jobs':>5} {'sim h':>6} {'wall s':>7} {'x real':>7} {'cost':>9} "
          f"{'bound':>9} {'ratio':>6} {'packed':>9} {'ratio':>6} {'creates':>7} {'p95 wait':>9}")
    for name in args.workloads:
        jobs = wl.load(name)
        t0 = time.perf_counter()
        r = Run(cluster, jobs, params=params, seed=args.seed).run().result()
        wall = time.perf_counter() - t0
        simh = r["simulated_hours"]
        print(f"{name:18} {len(jobs):5d} {simh:6.1f} {wall:7.1f} {simh * 3600 / wall:7.0f} "
              f"{r['cost']:9.2f} {r['lower_bound']:9.2f} {r['ratio'] or 0:6.3f} {r['lower_bound_packed']:9.2f} "
              f"{r['ratio_packed'] or 0:6.3f} {r['instances_created']:7d} {r['wait']['p95'] or 0:8.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
