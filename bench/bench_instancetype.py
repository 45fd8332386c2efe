"""How long instance-type choice takes for a big queue: 500 types, 100,000 containers, 300 shapes.

Prints figures only. "cold" builds a new TypeChooser per run (every shape computed once, as after
a config reload); "warm" reuses one whose memo is full (a steady-state scheduling pass).
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from pathlib import Path
from types import MappingProxyType

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actors.instancetype import (  # noqa: E402
    ConstraintsNotSatisfiable, TypeChooser, TypeTable, choose_instance_types, shape_needs, shape_of,
    signature)
from conf.model import GPU, Cluster, Containers, InstanceType  # noqa: E402

GiB = 1 << 30
MiB = 1 << 20
RUNS = 5
N_CONTAINERS = 100_000
N_SHAPES = 300


def make_types(rng: random.Random, n: int = 500) -> list[InstanceType]:
    """Cloud-like families: RAM per VCPU ratio, sizes 1..96 VCPUs, some GPUs, spot variants."""
    families = [("gp", 4, 0.048), ("cpu", 2, 0.042), ("mem", 8, 0.063), ("hmem", 16, 0.09),
                ("disk", 8, 0.08)]
    sizes = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96]
    out: list[InstanceType] = []
    gen = 0
    while len(out) < n:
        gen += 1
        for fam, gib_per_cpu, per_cpu in families:
            for v in sizes:
                if len(out) >= n:
                    break
                price = round(v * per_cpu * (1 + 0.03 * gen) * rng.uniform(0.95, 1.05), 4)
                gpu = GPU()
                if fam == "gp" and v >= 8 and gen % 3 == 0:
                    gpu = GPU("cuda", rng.choice(["11.8", "12.2", "12.4"]), rng.choice(["7.5", "8.0", "9.0"]),
                              rng.choice([1, 2, 4]), rng.choice([16, 24, 40, 80]) * GiB)
                    price *= 6
                for spot in (False, True):
                    if len(out) >= n:
                        break
                    out.append(InstanceType(
                        name=f"{fam}{gen}.{v}x{'.spot' if spot else ''}", provider_type=f"{fam}{gen}-{v}",
                        vcpus=v, ram=v * gib_per_cpu * GiB, included_scratch=v * 32 * GiB,
                        added_scratch=0, price=round(price * (0.35 if spot else 1), 4),
                        preemptible=spot, gpu=gpu))
    return out


def make_shapes(rng: random.Random) -> list[dict]:
    shapes = []
    images = [f"{rng.getrandbits(128):032x}+{rng.randint(122, 20000)}" for _ in range(20)]
    while len(shapes) < N_SHAPES:
        vcpus = rng.choice([0, 1, 1, 1, 2, 2, 4, 4, 8, 16, 32])
        rc = {"vcpus": vcpus, "ram": rng.choice([256, 512, 1024, 2048, 4096, 8192, 16384, 65536]) * MiB,
              "keep_cache_ram": 0, "keep_cache_disk": rng.choice([2, 4, 8]) * GiB}
        if rng.random() < 0.05:
            rc["gpu"] = {"stack": "cuda", "device_count": 1, "hardware_target": [rng.choice(["7.5", "8.0"])],
                         "driver_version": "11.8", "vram": 16 * GiB}
        shapes.append({
            "runtime_constraints": rc,
            "container_image": rng.choice(images),
            "mounts": {"/tmp": {"kind": "tmp", "capacity": rng.choice([1, 10, 50]) * GiB},
                       "/keep": {"kind": "collection", "portable_data_hash": images[0]}},
            "scheduling_parameters": {"preemptible": rng.random() < 0.5, "supervisor": rng.random() < 0.02},
        })
    return shapes


def make_queue(rng: random.Random, shapes: list[dict]) -> list[dict]:
    """Fresh dicts per container (as a JSON decode gives), shapes drawn with a long tail."""
    weights = [1 / (i + 1) for i in range(len(shapes))]
    queue = []
    for i, s in enumerate(rng.choices(shapes, weights, k=N_CONTAINERS)):
        c = {k: (dict(v) if isinstance(v, dict) else v) for k, v in s.items()}
        c.update(uuid=f"zzzzz-dz642-{i:015d}", state="Queued", priority=rng.randint(1, 1000))
        queue.append(c)
    return queue


def run_all(chooser: TypeChooser, queue: list[dict]) -> int:
    ok = 0
    for c in queue:
        try:
            chooser.choose(c)
            ok += 1
        except ConstraintsNotSatisfiable:
            pass
    return ok


def main() -> None:
    rng = random.Random(42)
    types = make_types(rng)
    cluster = Cluster(containers=Containers(maximum_price_factor=1.5),
                      instance_types=MappingProxyType({t.name: t for t in types}))
    shapes = make_shapes(rng)
    queue = make_queue(rng, shapes)
    n_shapes = len({signature(c) for c in queue})
    print(f"{len(types)} instance types, {len(queue)} containers, {n_shapes} distinct shapes in the queue")

    cold, warm = [], []
    warm_chooser = TypeChooser(cluster)
    run_all(warm_chooser, queue)
    for _ in range(RUNS):
        chooser = TypeChooser(cluster)
        t0 = time.perf_counter()
        ok = run_all(chooser, queue)
        cold.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        run_all(warm_chooser, queue)
        warm.append(time.perf_counter() - t0)
    print(f"satisfiable: {ok} of {len(queue)}")
    print(f"TypeChooser.choose x {len(queue)}, cold memo: median {statistics.median(cold):.3f} s, "
          f"min {min(cold):.3f} s")
    print(f"TypeChooser.choose x {len(queue)}, warm memo: median {statistics.median(warm):.3f} s, "
          f"min {min(warm):.3f} s ({min(warm) / len(queue) * 1e6:.2f} us per container)")

    sample = queue[:2000]
    t0 = time.perf_counter()
    for c in sample:
        signature(c)
    sig_us = (time.perf_counter() - t0) / len(sample) * 1e6
    print(f"signature(): {sig_us:.2f} us per container")

    table = TypeTable(cluster)
    t0 = time.perf_counter()
    for c in sample:
        shape = shape_of(signature(c))
        try:
            table.choose(shape, shape_needs(cluster.containers, shape))
        except ConstraintsNotSatisfiable:
            pass
    per = (time.perf_counter() - t0) / len(sample) * 1e6
    print(f"uncached choice, table prebuilt: {per:.1f} us per call")

    sample = queue[:300]
    t0 = time.perf_counter()
    for c in sample:
        try:
            choose_instance_types(cluster, c)
        except ConstraintsNotSatisfiable:
            pass
    per = (time.perf_counter() - t0) / len(sample) * 1e6
    print(f"uncached choose_instance_types() (sorts the 500 types each call): {per:.1f} us per call")


if __name__ == "__main__":
    main()
