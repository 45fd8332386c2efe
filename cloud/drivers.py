"""The driver registry: ``Containers.CloudVMs.Driver`` -> module implementing ``driver()``.

A driver module exposes ``driver(params, set_id, *, cluster, clock, logger) -> InstanceSet``, and
may expose ``check_params(params, cluster)``, which raises ValueError naming the key: run by
:func:`load_config` so ``check-config`` rejects what ``run`` would, before any cloud call.
An InstanceSet that can run commands on its instances without SSH (the stub cloud) also has
``make_executor(instance) -> Executor``; otherwise the dispatcher uses the SSH executor.
"""

from __future__ import annotations

import importlib
import inspect

from conf.loader import ConfigError, load as load_file
from conf.runcheck import check_run

DRIVERS = {
    "stub": "cloud.stub.driver",
    "local": "cloud.local.driver",
    "azure": "cloud.azure.driver",
    "ec2": "cloud.ec2.driver",
}


def load(name: str):
    """The driver module for ``name``; KeyError if unknown."""
    return importlib.import_module(DRIVERS[name])


def instance_set(mod, cluster, set_id: str, *, clock, logger, registry=None):
    """``mod.driver(...)`` for this cluster; a driver with metrics of its own (Go registers them in
    the dispatcher's registry) gets ``registry`` too."""
    extra = {}
    if registry is not None and "registry" in inspect.signature(mod.driver).parameters:
        extra["registry"] = registry
    return mod.driver(cluster.cloud_vms.driver_parameters, set_id, cluster=cluster, clock=clock,
                      logger=logger, **extra)


def check(cluster) -> None:
    """What would stop ``run`` later, found now: the driver's own DriverParameters validation,
    and the dispatcher's SSH key for a driver whose instances are reached over SSH (every one but
    the stub) or whose instances get our public key (DeployPublicKey). As a
    :class:`~conf.loader.ConfigError`, before any cloud call (issue 10 item 15)."""
    mod = load(cluster.cloud_vms.driver)
    check_params = getattr(mod, "check_params", None)
    if check_params is not None:
        try:
            check_params(cluster.cloud_vms.driver_parameters, cluster)
        except ValueError as e:
            raise ConfigError(cluster.source, "", str(e)) from None
    key = cluster.containers.dispatch_private_key
    if not getattr(mod, "OWN_EXECUTOR", False) or (cluster.cloud_vms.deploy_public_key and key):
        from cloud.ssh import load_private_key
        try:
            load_private_key(key)
        except ValueError as e:
            raise ConfigError(cluster.source, f"Clusters.{cluster.cluster_id}.Containers.DispatchPrivateKey",
                              str(e).removeprefix("DispatchPrivateKey ")) from None


def load_config(path: str | None = None, cluster_id: str | None = None, *, service: bool = True):
    """Load the cluster config and check its driver parameters: what ``run``, ``check-config``
    and ``cloudtest`` read. ``service``: also what ``run`` needs to serve
    (:func:`conf.runcheck.check_run`); ``cloudtest`` talks to the cloud only."""
    cluster = load_file(path, cluster_id)
    check(cluster)
    if service:
        check_run(cluster)
    return cluster
