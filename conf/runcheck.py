"""What ``run`` needs of a loaded config beyond what every command needs (issue 10 item 15).

The loader checks every value's form for every command (``instance list`` reads the same file);
``run`` also needs a container API to talk to and a token to talk with, which ``cloudtest`` and
the admin commands do not. ``check-config`` and ``run`` both call :func:`check_run`, so one
refuses exactly what the other would, before any cloud call.
"""

from __future__ import annotations

from conf.loader import ConfigError
from conf.model import Cluster


def check_run(cluster: Cluster) -> None:
    """ConfigError naming the file and key of the first thing ``run`` could not start without."""
    where = f"Clusters.{cluster.cluster_id}"
    if not cluster.controller_url:
        raise ConfigError(cluster.source, f"{where}.Services.Controller.ExternalURL",
                          "is empty: the dispatcher needs the container API's URL")
    if not cluster.system_root_token:
        raise ConfigError(cluster.source, f"{where}.SystemRootToken",
                          "is empty: the dispatcher cannot authenticate to the API server")
