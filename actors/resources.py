"""What a container needs and what a VM has left, and the one rule for fitting one into the other.

The rule is Arvados' ``InstanceResources.Accommodates`` / ``Sub``
(``lib/dispatchcloud/container/node_size.go``); the planner applies it on every pass and the
tests table it, so the rule that is tested is the rule that runs.
"""

from __future__ import annotations

from typing import NamedTuple

from conf.model import InstanceType


class Resources(NamedTuple):
    """Immutable, and a tuple: the planner makes one per container it places on an instance, and
    a tuple is made several times faster than a frozen dataclass."""

    vcpus: int = 0
    ram: int = 0
    scratch: int = 0
    gpus: int = 0
    gpu_vram: int = 0

    def arvados_json(self) -> dict:
        # Capitalized: the Go struct has no JSON tags.
        return {"VCPUs": self.vcpus, "RAM": self.ram, "Scratch": self.scratch,
                "GPUs": self.gpus, "GPUVRAM": self.gpu_vram}


NOTHING = Resources()


def type_resources(it: InstanceType) -> Resources:
    """What an idle VM of this type offers. GPU VRAM is per device, as in Arvados."""
    return Resources(it.vcpus, it.ram, it.scratch, it.gpu.device_count, it.gpu.vram)


def fits(avail: Resources, need: Resources, shared_vcpu_used: bool) -> bool:
    """Can a VM with ``avail`` left also run a container needing ``need``?

    Containers asking for 0 VCPUs share one VCPU between them; once that happened
    (``shared_vcpu_used``), only ``avail.vcpus - 1`` remain for containers that ask for VCPUs.
    A VM with no VCPU left takes nothing, not even a 0-VCPU container.
    """
    return (avail.vcpus >= need.vcpus and avail.ram >= need.ram and avail.scratch >= need.scratch
            and avail.gpus >= need.gpus and avail.gpu_vram >= need.gpu_vram and avail.vcpus > 0
            and (not shared_vcpu_used or avail.vcpus > need.vcpus))


def take(avail: Resources, need: Resources, shared_vcpu_used: bool) -> tuple[Resources, bool]:
    """``avail`` minus one container's ``need`` (VRAM too, as Arvados' ``Sub``), and whether the
    shared VCPU is now in use."""
    return (Resources(avail.vcpus - need.vcpus, avail.ram - need.ram, avail.scratch - need.scratch,
                      avail.gpus - need.gpus, avail.gpu_vram - need.gpu_vram),
            shared_vcpu_used or need.vcpus == 0)
