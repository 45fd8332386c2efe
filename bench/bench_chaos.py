"""The chaos simulation over many seeds: faults injected, restarts, invariant checks, violations.

Each seed is tests/chaos.py's seeded run (real actors, FakeClock, stub cloud with every fault
kind, a failing and slow container API, delayed worker reports, operator and user actions,
dispatcher restarts at random moments), checking G1-G4 after every step. Prints one line per
seed and the totals; on a violation, the seed and the events that led to it.

    .venv/bin/python bench/bench_chaos.py                     # 50 seeds x 120 containers over 2 h
    .venv/bin/python bench/bench_chaos.py --seeds 1 --containers 3000 --hours 24   # a day
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.chaos import Chaos, ChaosConfig  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=50)
    ap.add_argument("--first-seed", type=int, default=1)
    ap.add_argument("--containers", type=int, default=120)
    ap.add_argument("--hours", type=float, default=2.0)
    ap.add_argument("--restart-every", type=float, default=1800.0, help="mean simulated seconds")
    ap.add_argument("--trace", type=int, default=40, help="last events printed with a violation")
    ap.add_argument("--no-g0", dest="g0", action="store_false",
                    help="do not count container API calls on an actor thread as violations")
    args = ap.parse_args()
    logging.basicConfig(level=logging.CRITICAL)
    totals: Counter = Counter()
    kinds: Counter = Counter()
    bad, errors = [], []
    t_all = time.perf_counter()
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        cfg = ChaosConfig(seed=seed, containers=args.containers, hours=args.hours,
                          restart_every=args.restart_every, check_actor_thread_calls=args.g0)
        t0 = time.perf_counter()
        c = Chaos(cfg)
        try:
            c.run()
        except Exception as e:  # the harness itself failed (say, a simulation that never settles)
            errors.append(seed)
            print(f"seed {seed:4d}: HARNESS ERROR {type(e).__name__}: {e}", flush=True)
            print(c.report_text(args.trace), flush=True)
            continue
        s = c.summary()
        wall = time.perf_counter() - t0
        for k in ("containers", "faults", "restarts", "checks", "violations", "unsettled"):
            totals[k] += s[k]
        kinds.update(c.faults)
        print(f"seed {seed:4d}: {s['containers']} containers {s['states']} over {s['simulated_hours']} h; "
              f"{s['faults']} faults, {s['restarts']} restarts, {s['checks']} checks, "
              f"{s['violations']} violations, {s['unsettled']} unsettled ({wall:.1f} s)", flush=True)
        if c.violations:
            bad.append(seed)
            print(c.report_text(args.trace), flush=True)
    print(f"\n{args.seeds} seeds, {totals['containers']} containers in "
          f"{time.perf_counter() - t_all:.0f} s: {totals['faults']} faults injected, "
          f"{totals['restarts']} restarts, {totals['checks']} invariant checks, "
          f"{totals['violations']} violations" + (f" (seeds {bad})" if bad else "")
          + f"; {totals['unsettled']} instants moved on from unsettled"
          + (f"; harness errors in seeds {errors}" if errors else ""))
    print("faults by kind: " + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())))
    return 1 if bad or errors else 0


if __name__ == "__main__":
    sys.exit(main())
