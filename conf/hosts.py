"""Whether a host name or address is loopback: decided from the parsed address, never a prefix.

One rule for every place that allows plain http or a listener only on loopback (the container
API client, the management API server, the Azure and EC2 endpoint overrides), so
``127.0.0.1.example.com`` is a remote name everywhere.
"""

from __future__ import annotations

import ipaddress


def is_loopback_host(host: str) -> bool:
    """127.0.0.0/8, ::1 (bracketed or not), or the name ``localhost`` itself."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
