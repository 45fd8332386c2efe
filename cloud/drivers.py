"""The driver registry: ``Containers.CloudVMs.Driver`` -> module implementing ``driver()``.

A driver module exposes ``driver(params, set_id, *, cluster, clock, logger) -> InstanceSet``.
An InstanceSet that can run commands on its instances without SSH (the stub cloud) also has
``make_executor(instance) -> Executor``; otherwise the dispatcher uses the SSH executor.
"""

from __future__ import annotations

import importlib

DRIVERS = {
    "stub": "cloud.stub",
    "local": "cloud.local",
    "azure": "cloud.azure",
}

# Arvados driver names this dispatcher recognizes but does not implement.
NOT_IMPLEMENTED = ("ec2", "loopback")


def load(name: str):
    """The driver module for ``name``; KeyError if unknown."""
    return importlib.import_module(DRIVERS[name])
